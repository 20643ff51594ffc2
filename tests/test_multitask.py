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
        # A further generative task is evaluated through the eval engine too: its prompts must fit.
        ("tasks=[{name: qa, data: {task: instruction, max_seq_len: 1000}}]", "longest test prompt (tasks[0].data.max_seq_len 1000)"),
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


# A generative primary task and two further tasks, one of each kind: every one is evaluated by its kind.
TWEET_LABELS = ["unhappy", "calm", "happy"]  # not the primary's (the default) labels: each task scores its own
EVALUATED_TASKS = [
    "primary_task={name: support, weight: 2}", "data.task=instruction", "data.source=support.jsonl",
    "data.system_prompt=Answer the customer.", "eval.format_checks.max_words=4", "eval.test_keys=pinned_keys.txt",
    "tasks=[{name: tweets, data: {source: tweets.csv, labels: [%s], system_prompt: 'Mood of this tweet?'}}, "
    "{name: qa, data: {task: instruction, source: qa.jsonl}}]" % ", ".join(TWEET_LABELS)]


def made_up_predictions(data, settings, data_dir, llms, test_keys, encryption):
    """Stands in for `task_predictions` (the part that needs Ray and the models): 12 test rows and each
    system's per-row output of the task's kind, the fine-tuned model right more often than the others."""
    keys = [f"{i:032x}" for i in range(12)]
    rows = pd.DataFrame({"key": keys, "text": [f"{data_dir.name} row {i}" for i in range(12)]})
    right = {"fine_tuned": 10, "base_zero_shot": 5, "baseline_tfidf_logreg": 7, "baseline_tfidf_retrieval": 7}
    systems = [system for system, model in llms.items() if model is not None]
    if data.task == "classification":
        rows = rows.assign(label_id=np.arange(12) % len(data.labels), label=[data.labels[i % len(data.labels)] for i in range(12)])
        systems.append("baseline_tfidf_logreg")
        predictions = {system: rows.drop(columns="key").assign(
            pred_id=np.where(np.arange(12) < right[system], rows["label_id"], (rows["label_id"] + 1) % len(data.labels)),
            confidence=0.8, gold_logprob=-0.5, answer_tokens=1, generated=None) for system in systems}
    else:
        rows = rows.assign(label=[f"It ships on day {i}." for i in range(12)])
        systems.append("baseline_tfidf_retrieval")
        predictions = {system: rows.assign(
            generated=[label if i < right[system] else "no idea at all" for i, label in enumerate(rows["label"])],
            gold_logprob=-2.0, answer_tokens=4) for system in systems}
    made_up_predictions.calls.append({"folder": data_dir, "labels": data.labels, "test_keys": test_keys,
                                      "system_prompt": data.system_prompt})
    return rows, predictions


def test_every_task_is_evaluated_on_its_own_split_by_its_kind_and_reported(tmp_path, monkeypatch):
    """The per-task evaluation without a cluster: each task's systems give made-up per-row outputs
    (`task_predictions`, the Ray part), the rest is the real evaluation. Each task is read from its
    own shards, scored by its kind (a classification task on its own labels), written to its own
    folder, summarized under its name and given a section of the report; the gate, the pinned test
    keys and the format checks stay the primary task's."""
    from jobs.data.prepare import task_data_dirs
    from jobs.evaluation import run as evaluation_run
    from jobs.evaluation.report import write_report
    from jobs.pipeline import evaluation_summary

    made_up_predictions.calls = []
    monkeypatch.setattr(evaluation_run, "task_predictions", made_up_predictions)
    cfg = load_config(RunConfig, None, [f"storage_root={tmp_path}", "name=mixed", *EVALUATED_TASKS])
    folders = task_data_dirs(cfg)
    report, predictions = evaluation_run.run_evaluation(cfg, tmp_path / "base", folders["support"], tmp_path / "model")

    calls = made_up_predictions.calls
    assert [call["folder"] for call in calls] == [folders["support"], folders["tweets"], folders["qa"]]
    assert [call["test_keys"] for call in calls] == ["pinned_keys.txt", None, None]
    assert calls[1]["labels"] == TWEET_LABELS and calls[1]["system_prompt"] == "Mood of this tweet?"
    tweets, qa = report["further_tasks"]["tweets"], report["further_tasks"]["qa"]
    assert report["task_name"] == "support" and report["task"] == "instruction" and "format_max_words" in report["fine_tuned"]
    assert report["gate"]["metric"] == "rouge_l" and report["gate"]["deployable"]
    assert "gate" not in tweets and "gate" not in qa
    # The classification task: the primary classification path's metrics, on its own labels.
    assert tweets["task"] == "classification" and tweets["labels"] == TWEET_LABELS
    assert tweets["prompt_and_labels_from"] == "tasks[0].data" and tweets["system_prompt"] == "Mood of this tweet?"
    assert set(tweets["fine_tuned"]["per_class"]) == set(TWEET_LABELS)
    assert tweets["fine_tuned"]["accuracy"] == pytest.approx(10 / 12) and tweets["base_zero_shot"]["accuracy"] == pytest.approx(5 / 12)
    assert set(tweets["bootstrap"]["systems"]) == {"fine_tuned", "base_zero_shot", "baseline_tfidf_logreg"}
    low, high = tweets["bootstrap"]["systems"]["fine_tuned"]["macro_f1"]
    assert low <= tweets["fine_tuned"]["macro"]["f1"] <= high and "slices" in tweets and "errors" in tweets
    # The further generative task: reference metrics, but not the primary task's format checks.
    assert qa["task"] == "instruction" and qa["fine_tuned"]["exact_match"] == pytest.approx(10 / 12)
    assert not any(metric.startswith("format_") for metric in qa["bootstrap"]["systems"]["fine_tuned"])
    assert qa["examples"]["metric"] == "rouge_l"

    assert json.loads((cfg.run_dir / "evaluation.json").read_text()) == json.loads(json.dumps(report))
    assert sorted(path.name for path in (cfg.run_dir / "predictions").iterdir()) == [
        "base_zero_shot.parquet", "baseline_tfidf_retrieval.parquet", "fine_tuned.parquet"]
    written = pd.read_parquet(cfg.run_dir / "task_predictions" / "tweets" / "fine_tuned.parquet")
    assert written["text"].str.startswith("tweets row").all() and (cfg.run_dir / "task_predictions" / "qa" / "fine_tuned.parquet").is_file()
    assert predictions["fine_tuned"]["text"].str.startswith("data row").all()  # the primary task's are returned

    summary = evaluation_summary(report)
    assert list(summary["tasks"]) == ["support", "tweets", "qa"]
    assert [task["gated"] for task in summary["tasks"].values()] == [True, False, False]
    figures = summary["tasks"]["tweets"]
    assert figures["task"] == "classification" and figures["examples"] == 12
    assert figures["fine_tuned"]["macro_f1"] == tweets["fine_tuned"]["macro"]["f1"] and "interval_95" in figures["fine_tuned"]
    assert "fine_tuned - base_zero_shot" in figures["paired_differences_95"]
    assert summary["tasks"]["qa"]["fine_tuned"]["rouge_l"] == qa["fine_tuned"]["rouge_l"]
    assert {key: value for key, value in summary["tasks"]["support"].items() if key not in ("task", "gated")} == summary["test_split"]
    assert "tasks" not in evaluation_summary({key: value for key, value in report.items() if key != "further_tasks"})

    page = write_report(tmp_path / "report.html", report).read_text()
    for heading in ("Task support (instruction, the primary task)", "Task tweets (classification)", "Task qa (instruction)"):
        assert heading in page
    assert "decided on the primary task, support" in page and page.count("Not part of the promotion gate") == 2
    assert "<code>tasks[0].data</code>" in page and "Mood of this tweet?" in page
    assert page.count("Confusion matrices") == 1 and "unhappy" in page and page.count("Best answers of fine_tuned") == 2
