"""Multi-task runs: config validation, exact mixture proportions, per-task validation and counts."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from cluster.config import ConfigError, load_config
from jobs.config import RunConfig
from jobs.data.mixtures import mixture_counts, mixture_pass
from jobs.train.batches import collate
from tests.conftest import SHIPPED_CONFIG, tiny_run_config

QA_TASK = "tasks=[{name: qa, weight: 1, data: {task: instruction, source: %s, system_prompt: '', near_dedup: {enabled: false}}}]"


def test_a_config_without_tasks_is_the_single_task_run():
    cfg = load_config(RunConfig, SHIPPED_CONFIG)
    assert cfg.tasks == [] and cfg.mixture() == [("primary", 1.0)]


def test_tasks_are_validated_and_named_in_errors():
    cfg = load_config(RunConfig, SHIPPED_CONFIG, ["primary_task={name: tweets, weight: 3}", QA_TASK % "qa.jsonl"])
    assert cfg.mixture() == [("tweets", 3.0), ("qa", 1.0)] and cfg.tasks[0].data.task == "instruction"
    # The recipe balances a single task's classes; with a mixture (which sets the shares) that default is off.
    assert load_config(RunConfig, SHIPPED_CONFIG).train.balance_classes and not cfg.train.balance_classes
    with pytest.raises(ConfigError, match="balance_classes needs a single classification task"):
        load_config(RunConfig, SHIPPED_CONFIG, [QA_TASK % "qa.jsonl", "train.balance_classes=true"])
    for override, named in [
        ("tasks=[{name: primary, weight: 1, data: {}}]", "task names (primary_task.name and tasks[].name) must be distinct"),
        ("tasks=[{name: a, weight: 0, data: {}}]", "tasks.0.weight"),
        ("tasks=[{name: a, data: {}, wieght: 2}]", "tasks.0.wieght: unknown key"),
        ("tasks=[{name: 'a b', data: {}}]", "tasks.0.name"),
        ("tasks=[{name: a}]", "tasks.0.data"),
        ("primary_task={weight: -1}", "primary_task.weight"),
    ]:
        with pytest.raises(ConfigError) as error:
            load_config(RunConfig, SHIPPED_CONFIG, [override])
        assert named in str(error.value), (override, str(error.value))


@pytest.mark.parametrize("weights, rows, examples", [
    ([3, 1], [500, 40], 64), ([1, 1, 1], [10, 10, 10], 100), ([0.2, 0.5, 0.3], [7, 1000, 3], 33), ([5], [9], 20)])
def test_mixture_counts_are_the_weighted_shares_of_the_budget(weights, rows, examples):
    counts = mixture_counts(weights, rows, examples)
    assert sum(counts) == examples
    for weight, count in zip(weights, counts):  # each within rounding of its exact share
        assert abs(count - examples * weight / sum(weights)) < 1
    with pytest.raises(ValueError, match="every task needs training rows"):
        mixture_counts(weights, [0] * len(rows), examples)


@pytest.mark.parametrize("weights, rows, expected", [
    ([3, 1], [500, 40], 667),    # the big task's rows set the pass; the small one is cycled within it
    ([1, 1], [60, 30000], 60000),
    ([1, 1, 1], [10, 10, 10], 30),
    ([0.2, 0.5, 0.3], [7, 1000, 3], 2000),
    ([5], [9], 9),
])
def test_a_mixture_pass_holds_every_row_of_every_task_at_its_weighted_share(weights, rows, expected):
    """The stream of a mixture run is at most one pass (the training loop repeats it): the recipe's
    time-budgeted max_steps (100000, a cap) must not build a stream of millions of rows."""
    examples = mixture_pass(weights, rows)
    assert examples == expected
    counts = mixture_counts(weights, rows, examples)
    assert all(count >= available for count, available in zip(counts, rows))
    assert any(count == available for count, available in zip(counts, rows))  # no longer than needed
    with pytest.raises(ValueError, match="every task needs training rows"):
        mixture_pass(weights, [0] * len(rows))


def test_mix_keys_tags_every_copy_of_every_row_once_and_reproducibly():
    from jobs.data.mixtures import _mix_keys

    batch = pd.DataFrame({"source": "qa", "position": np.arange(4), "text": [f"q{i}" for i in range(4)]})
    three = _mix_keys(batch, task_id=1, copies=[0, 1, 2], seed=3)
    assert len(three) == 12 and (three["task_id"] == 1).all() and three["mix_key"].is_unique
    assert three["text"].tolist() == batch["text"].tolist() * 3
    # Copy 2 alone keys its rows as it does among the others: a rest drawn after whole passes.
    assert _mix_keys(batch, 1, [2], 3)["mix_key"].tolist() == three["mix_key"].tolist()[8:]
    assert _mix_keys(batch, 1, [2], 4)["mix_key"].tolist() != three["mix_key"].tolist()[8:]


def test_collate_tags_every_token_and_example_with_its_task():
    batch = {"input_ids": np.array([[5, 6, 7], [8, 9], [1, 2, 3, 4]], dtype=object), "prompt_len": np.array([1, 1, 2]),
             "task_id": np.array([1, 0, 1])}
    for packed_length in (None, 16):
        out = collate(batch, pad_id=0, packed_length=packed_length)
        assert out["example_tasks"].tolist() == [1, 0, 1]
        assert int((out["task_ids"] == 1).sum()) == 7 and int((out["task_ids"] == 0).sum()) == 2
        assert ((out["task_ids"] == -1) == (out["attention_mask"] == 0)).all()
    assert "task_ids" not in collate({key: batch[key] for key in ("input_ids", "prompt_len")}, pad_id=0)


@pytest.mark.integration
def test_mixture_dataset_has_the_exact_shares_and_a_reproducible_order(ray_cluster):
    import ray

    from jobs.data.mixtures import mixture_dataset

    def frame(name, n):
        return ray.data.from_pandas(pd.DataFrame({"source": name, "position": np.arange(n), "text": [f"{name} {i}" for i in range(n)]}))

    rows = [50, 7]  # the small task must be cycled: 3 passes over its 7 rows and 3 more
    mixed, counts = mixture_dataset([frame("big", 50), frame("small", 7)], rows, [2.0, 1.0], 72, seed=3)
    first = mixed.to_pandas()
    assert counts == [48, 24] and Counter(first["task_id"]) == {0: 48, 1: 24}
    assert first[first.task_id == 0]["text"].is_unique  # enough rows: none repeated
    small = Counter(first[first.task_id == 1]["text"])
    assert len(small) == 7 and sorted(small.values()) == [3, 3, 3, 3, 4, 4, 4]
    assert not first["task_id"].is_monotonic_increasing  # shuffled, not one task after the other
    again = mixture_dataset([frame("big", 50), frame("small", 7)], rows, [2.0, 1.0], 72, seed=3)[0].to_pandas()
    assert first["text"].tolist() == again["text"].tolist()
    other = mixture_dataset([frame("big", 50), frame("small", 7)], rows, [2.0, 1.0], 72, seed=4)[0].to_pandas()
    assert first["text"].tolist() != other["text"].tolist()


@pytest.mark.integration
@pytest.mark.slow
def test_a_two_task_run_mixes_by_weight_and_validates_each_task(ray_cluster, tmp_path, tiny_model_dir, small_csv):
    from mlflow.tracking import MlflowClient

    from jobs.data.prepare import MANIFEST, prepare_run_inputs, task_data_dirs
    from jobs.train.run import run_finetune

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i + 1}?", "response": f"{2 * i + 1}."}) + "\n"
                          for i in range(60)))
    cfg = tiny_run_config(tmp_path, tiny_model_dir, small_csv, "primary_task={name: tweets, weight: 3}", QA_TASK % qa,
                          "train.keep_checkpoints=3")
    base_dir, data_dir, _ = prepare_run_inputs(cfg)
    assert task_data_dirs(cfg)["qa"].joinpath(MANIFEST).is_file()
    record = run_finetune(cfg, base_dir, data_dir)

    train = cfg.train
    examples = train.max_steps * train.micro_batch_size * train.gradient_accumulation_steps * train.num_workers
    tasks = record["tasks"]
    assert tasks["planned_examples"] == {"tweets": examples * 3 // 4, "qa": examples // 4}
    # What the workers counted in the batches they trained on: the configured 3:1 shares.
    assert tasks["train_examples_seen"] == tasks["planned_examples"]
    history = record["history"]
    assert [m["step"] for m in history] == [4, 8]
    for metrics in history:
        assert metrics["val_loss/tweets"] > 0 and metrics["val_loss/qa"] > 0
        # The overall loss is the token-weighted mean of the two: between them.
        low, high = sorted([metrics["val_loss/tweets"], metrics["val_loss/qa"]])
        assert low <= metrics["val_loss"] <= high
    client = MlflowClient(record["tracking"]["uri"])
    run_id = record["tracking"]["run_id"]
    for name in ("val_loss", "val_loss/tweets", "val_loss/qa"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [4, 8]
    assert "data_manifest_qa.json" in {a.path for a in client.list_artifacts(run_id)}
