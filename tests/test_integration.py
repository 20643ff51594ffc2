"""The real stack on one shared embedded Ray cluster, with the tiny model and a few hundred real tweets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import tiny_run_config

pytestmark = pytest.mark.integration
VLLM_MAX_TOKENS = 6


def _train(tmp_path: Path, tiny_model_dir: Path, small_csv: Path, *overrides: str) -> tuple:
    """(config, base model folder, training record) of one tiny run with the given overrides."""
    from jobs.data.prepare import prepare_run_inputs
    from jobs.train.run import run_finetune

    cfg = tiny_run_config(tmp_path, tiny_model_dir, small_csv, *overrides)
    base_dir, data_dir, _ = prepare_run_inputs(cfg)
    return cfg, base_dir, run_finetune(cfg, base_dir, data_dir)


# Each training run costs minutes on two CPU cores: runs that several tests read are made once per module.
@pytest.fixture(scope="module")
def zero3_run(ray_cluster, tmp_path_factory, tiny_model_dir, small_csv):
    return _train(tmp_path_factory.mktemp("zero3"), tiny_model_dir, small_csv, "train.zero_stage=3", "train.keep_checkpoints=3")


@pytest.fixture(scope="module")
def lora_zero3_run(ray_cluster, tmp_path_factory, tiny_model_dir, small_csv):
    # LoRA under ZeRO-3: the adapter and the merged export come out of partitioned parameters
    # (the shipped config covers full fine-tuning on ZeRO-1, the default, in the pipeline test).
    # A high adapter rate that decays (the shipped constant schedule at 1e-2 lets 8 steps wander).
    return _train(tmp_path_factory.mktemp("lora"), tiny_model_dir, small_csv, "train.zero_stage=3", "train.method=lora",
                  "train.trainable_layers=null", "train.freeze_embeddings=false", "train.lr_schedule=linear",
                  "train.label_loss_weight=0", "train.learning_rate=1e-2", "train.lora.rank=8")


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tmp_path_factory, tiny_model_dir, small_csv):
    """An uninterrupted, padded run with a checkpoint every 2 steps: what resumed and packed runs must match."""
    return _train(tmp_path_factory.mktemp("reference"), tiny_model_dir, small_csv,
                  "train.eval_every=2", "train.keep_checkpoints=4", "tracking.enabled=false")


def test_data_preparation_accounts_for_every_row_and_is_cached(ray_cluster, tmp_path, tiny_model_dir, small_csv):
    from jobs.data.prepare import MANIFEST, prepare_run_inputs
    from jobs.data.split import SPLITS, assign_splits, split_position

    cfg = tiny_run_config(tmp_path, tiny_model_dir, small_csv)
    base_dir, data_dir, manifest = prepare_run_inputs(cfg)
    counts = manifest["counts"]
    assert counts["rows_read"] == len(small_csv.read_bytes().strip().split(b"\n")) - 1
    assert counts["quarantined"] == {"empty_text": 1, "unknown_label": 1}
    assert counts["exact_duplicates"] >= 1  # the case-variant "THANK YOU @united" row
    assert counts["rows_read"] == (counts["kept"] + sum(counts["quarantined"].values()) + sum(counts["filtered"].values())
                                   + counts["duplicates_removed"])
    assert manifest["per_source"]["tweets_small"]["rows_read"] == counts["rows_read"]

    splits = {name: pd.read_parquet(data_dir / name) for name in SPLITS}
    assert sum(len(frame) for frame in splits.values()) == counts["kept"]
    keys = {name: set(frame["text"].str.lower()) for name, frame in splits.items()}
    assert not keys["test"] & keys["train"] and not keys["test"] & keys["validation"]
    # Each row's split is a function of its own key alone: its position (a hash of key and seed)
    # against the fractions.
    test_fraction, validation_fraction = cfg.data.test_fraction, cfg.data.validation_fraction
    for name, frame in splits.items():
        assert (frame["position"] == [split_position(key, cfg.data.split_seed) for key in frame["key"]]).all()
        assert assign_splits(frame["position"].to_numpy(), validation_fraction, test_fraction).tolist() == [name] * len(frame)
    assert set(splits["train"]["label"]) == set(splits["test"]["label"]) == set(cfg.data.labels)
    # Loss-mask inputs are consistent: the prompt is shorter than the example.
    train = splits["train"]
    assert (train["prompt_len"] < train["num_tokens"]).all()

    stamp = (data_dir / MANIFEST).stat().st_mtime_ns
    assert prepare_run_inputs(cfg)[2] == manifest
    more_actors = tiny_run_config(tmp_path, tiny_model_dir, small_csv, "data.tokenizer_actors=3")
    assert prepare_run_inputs(more_actors)[2] == manifest  # how many actors tokenize does not change the shards
    assert (data_dir / MANIFEST).stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_zero3_training_lowers_loss_and_exports_weights_that_reload(zero3_run):
    from transformers import AutoModelForCausalLM

    from jobs.train.export import PROBE_FILE, PROBE_IDS

    cfg, base_dir, record = zero3_run

    history = record["history"]
    assert [m["step"] for m in history] == [4, 8]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert record["tokens_per_s"] > 0 and record["train_tokens"] > 0
    assert 0 < record["mfu"] < 1 and record["peak_memory_gib_max_worker"] > 0.1
    # The tracked run holds the step metrics logged by rank 0 and what reproduces the run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(record["tracking"]["uri"])
    run_id = record["tracking"]["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [4, 8]
    assert len(client.get_metric_history(run_id, "train_loss")) == 8
    # tokens/s over all steps, and steady (without step 1, which waited for the first batch), agree
    # with the per-step history: tokens = tokens/s x seconds of each step.
    history_of = lambda key: sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)  # noqa: E731
    per_step = [(tps.value, seconds.value) for tps, seconds in zip(history_of("tokens_per_s"), history_of("step_seconds"))]
    assert record["tokens_per_s"] == pytest.approx(sum(t * s for t, s in per_step) / sum(s for _, s in per_step), rel=1e-6)
    assert record["steady_tokens_per_s"] == pytest.approx(
        sum(t * s for t, s in per_step[1:]) / sum(s for _, s in per_step[1:]), rel=1e-6)
    assert 0 < record["first_batch_seconds"] < per_step[0][1]
    assert {"config.json", "data_manifest.json", "code_version.json"} <= {a.path for a in client.list_artifacts(run_id)}
    assert client.get_run(run_id).info.status == "FINISHED"
    # Independently of the job's own check: the exported folder reproduces the trained model.
    reloaded = AutoModelForCausalLM.from_pretrained(record["model_dir"]).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=PROBE_IDS).logits[0, -1]
    trained = torch.load(f"{record['checkpoint_path']}/{PROBE_FILE}")
    torch.testing.assert_close(logits, trained, rtol=0, atol=1e-4)
    # And it differs from the starting weights: training really changed the model.
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=PROBE_IDS).logits[0, -1], logits, atol=1e-3)


def _assert_trained_and_exported(cfg, base_dir: Path, record: dict) -> None:
    """Validation loss fell, and the export reloads in transformers as a model that differs from the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jobs.train.export import ADAPTER_DIR
    from jobs.train.export import PROBE_IDS

    history = record["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    export = Path(record["model_dir"])
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(export).eval()(input_ids=PROBE_IDS).logits[0, -1]
        assert not torch.allclose(base(input_ids=PROBE_IDS).logits[0, -1], exported, atol=1e-3)
        if cfg.train.method == "lora":
            # The adapter alone on the base model gives what the merged export gives.
            adapted = PeftModel.from_pretrained(base, export / ADAPTER_DIR).eval()
            torch.testing.assert_close(adapted(input_ids=PROBE_IDS).logits[0, -1], exported, rtol=0, atol=1e-4)
        else:
            # Frozen embeddings: the exported embedding matrix is the base model's.
            assert torch.equal(AutoModelForCausalLM.from_pretrained(export).get_input_embeddings().weight,
                               base.get_input_embeddings().weight)
    assert not (export / ADAPTER_DIR).exists() or cfg.train.method == "lora"


@pytest.mark.slow
def test_a_time_budget_ends_training_at_the_step_that_crosses_it(ray_cluster, tmp_path, tiny_model_dir, small_csv):
    """train.max_train_seconds: every rank stops at the same step, which is validated, checkpointed
    and exported like a last step; a constant schedule keeps the peak rate after warm-up."""
    cfg, _, record = _train(tmp_path, tiny_model_dir, small_csv, "train.max_steps=50", "train.eval_every=50",
                            "train.max_train_seconds=0.001", "train.lr_schedule=constant", "train.warmup_steps=0",
                            "tracking.enabled=false")
    assert record["final"]["step"] == 1 and [m["step"] for m in record["history"]] == [1]
    assert [point["step"] for point in record["learning_curve"]] == [1]
    assert Path(record["model_dir"], "model.safetensors").is_file()


@pytest.mark.slow
def test_zero1_sgd_cosine_offload_with_frozen_embeddings_lowers_loss_and_exports(ray_cluster, tmp_path, tiny_model_dir, small_csv):
    _assert_trained_and_exported(*_train(
        tmp_path, tiny_model_dir, small_csv, "train.zero_stage=1", "train.optimizer=sgd", "train.learning_rate=0.1",
        "train.lr_schedule=cosine", "train.offload_optimizer=true", "train.freeze_embeddings=true"))


@pytest.mark.slow
def test_lora_on_zero3_lowers_loss_and_exports_adapter_and_merged_model(lora_zero3_run):
    _assert_trained_and_exported(*lora_zero3_run)


@pytest.mark.slow
def test_full_and_lora_exports_reload_in_vllm_as_the_trained_model(zero3_run, lora_zero3_run, tmp_path):
    """The ZeRO-3 full export, the merged LoRA export and the adapter served on the base model, each
    loaded by vLLM's offline engine, give the trained model's greedy tokens and log-probabilities."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.train.export import ADAPTER_DIR
    from jobs.train.export import PROBE_FILE, PROBE_IDS
    from tests.conftest import REPO

    records = {"full": zero3_run[2], "lora": lora_zero3_run[2]}
    base_dir = zero3_run[1]
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base_probe = torch.log_softmax(base(input_ids=PROBE_IDS).logits[0, -1], dim=-1)

    tokenizer = AutoTokenizer.from_pretrained(records["full"]["model_dir"])
    prompts = [PROBE_IDS[0].tolist(), tokenizer("The flight was delayed again and")["input_ids"]]
    spec = {"prompts": prompts, "max_tokens": VLLM_MAX_TOKENS, "models": [
        {"name": "full", "path": records["full"]["model_dir"]},
        {"name": "lora_merged", "path": records["lora"]["model_dir"]},
        {"name": "lora_adapter", "path": str(base_dir), "lora": str(Path(records["lora"]["model_dir"]) / ADAPTER_DIR)}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    # vLLM's offline engine in its own process, off the test cluster: it must not join Ray.
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")} | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    finished = subprocess.run([sys.executable, "-m", "tests.vllm_outputs", str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
                              cwd=REPO, env=env, timeout=900, capture_output=True, text=True)
    assert finished.returncode == 0, f"vLLM run failed ({finished.returncode}):\n{finished.stderr[-4000:]}"
    served = json.loads((tmp_path / "out.json").read_text())

    for name, export in (("full", "full"), ("lora_merged", "lora"), ("lora_adapter", "lora")):
        record = records[export]
        # The trained model's own next-token distribution on the probe, saved by the workers.
        trained = torch.log_softmax(torch.load(f"{record['checkpoint_path']}/{PROBE_FILE}").float(), dim=-1)
        assert not torch.allclose(trained, base_probe, atol=1e-3), name  # training changed the model
        first = served[name][0]
        assert first["tokens"][0] == int(trained.argmax()), name
        assert first["logprobs"][0] == pytest.approx(float(trained[first["tokens"][0]]), abs=2e-3), name
        # Every greedy step, teacher-forced through the export in transformers.
        model = AutoModelForCausalLM.from_pretrained(record["model_dir"], dtype=torch.float32).eval()
        for prompt, out in zip(prompts, served[name]):
            assert len(out["tokens"]) == VLLM_MAX_TOKENS
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + out["tokens"]])).logits[0]
            logprobs = torch.log_softmax(logits[len(prompt) - 1: -1].float(), dim=-1)
            assert logprobs.argmax(dim=-1).tolist() == out["tokens"], name
            expected = logprobs[torch.arange(VLLM_MAX_TOKENS), torch.tensor(out["tokens"])].tolist()
            assert out["logprobs"] == pytest.approx(expected, abs=2e-3), name
    # The adapter served on the base model is the merged model, token for token.
    assert [o["tokens"] for o in served["lora_adapter"]] == [o["tokens"] for o in served["lora_merged"]]


@pytest.mark.slow
def test_a_worker_failure_resumes_from_the_last_checkpoint_exactly(reference_run, tmp_path, tiny_model_dir, small_csv):
    """A worker raises at step 5; Ray Train restarts the group, which resumes from the step-4
    checkpoint (weights, optimizer, scheduler, RNG, data position) and ends where an
    uninterrupted run with the same seed ends."""
    from jobs.train.worker import FAULT_MARKER

    uninterrupted = reference_run[2]
    failing_cfg, _, resumed = _train(tmp_path, tiny_model_dir, small_csv, "train.eval_every=2", "train.keep_checkpoints=1",
                                     "tracking.enabled=false", "train.fault_at_step=5")

    assert (failing_cfg.run_dir / FAULT_MARKER).exists()  # the fault did fire
    assert uninterrupted["final"]["resumed_from_step"] == 0
    assert resumed["final"]["resumed_from_step"] == 4  # from the checkpoint, not from scratch
    assert resumed["final"]["step"] == uninterrupted["final"]["step"] == 8
    assert resumed["final"]["train_loss"] == pytest.approx(uninterrupted["final"]["train_loss"], rel=1e-5)
    assert resumed["final"]["val_loss"] == pytest.approx(uninterrupted["final"]["val_loss"], rel=1e-5)
    assert resumed["train_tokens"] == uninterrupted["train_tokens"]  # no batch skipped or seen twice


def _assert_figures_recomputed(figures: dict, evaluated: dict, frame: pd.DataFrame, classes: int, system: str) -> None:
    """A system's summary figures equal those of evaluation.json and those recomputed from its
    per-example predictions (accuracy, macro-F1, 10-bin expected calibration error)."""
    from sklearn.metrics import f1_score

    truth, predicted = frame["label_id"].to_numpy(), frame["pred_id"].to_numpy()
    probabilities = _rows(frame["probabilities"])
    assert (predicted == probabilities.argmax(axis=1)).all(), system
    confidence = frame["confidence"].to_numpy()
    assert confidence == pytest.approx(probabilities.max(axis=1)), system
    correct = predicted == truth
    assert figures["accuracy"] == evaluated["accuracy"] == pytest.approx(correct.mean(), abs=1e-12), system
    macro_f1 = f1_score(truth, predicted, labels=list(range(classes)), average="macro", zero_division=0)
    assert figures["macro_f1"] == evaluated["macro"]["f1"] == pytest.approx(macro_f1, abs=1e-12), system
    bins = np.minimum(np.floor(confidence * 10), 9)
    ece = sum((bins == b).mean() * abs(correct[bins == b].mean() - confidence[bins == b].mean()) for b in np.unique(bins))
    assert figures["expected_calibration_error"] == evaluated["calibration"]["ece"] == pytest.approx(ece, abs=1e-9), system
    if "answer_perplexity" in figures:  # the LLMs: exp(mean NLL per gold answer token)
        perplexity = np.exp(-frame["gold_logprob"].sum() / frame["answer_tokens"].sum())
        assert figures["answer_perplexity"] == evaluated["answer_perplexity"] == pytest.approx(perplexity, rel=1e-9), system


def _rows(column: pd.Series) -> np.ndarray:
    """A column of per-row arrays (Ray's tensor extension, or plain objects) as one 2-D array."""
    return np.stack(list(column.to_numpy()))


def test_pipeline_trains_evaluates_and_serves_through_the_openai_client(ray_cluster, tmp_path, tiny_model_dir, small_csv, monkeypatch,
                                                                       request):
    import openai
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.security import new_api_key
    from jobs.pipeline import run_pipeline

    # One Serve proxy per test session and every app on route "/": later modules deploy their own.
    request.addfinalizer(lambda: serve.delete(tiny_run_config(tmp_path, tiny_model_dir, small_csv).serve.endpoint.app_name))

    api_key, record = new_api_key("test", ["admin"], "lakeforge", key_id="test")
    monkeypatch.setenv("LAKEFORGE_API_KEY_RECORD", record.model_dump_json())  # the endpoint accepts this key (its digest only)

    cfg = tiny_run_config(tmp_path, tiny_model_dir, small_csv)
    summary = run_pipeline(cfg)

    assert json.loads((cfg.run_dir / "summary.json").read_text())["run"] == "tiny"
    split = summary["test_split"]
    assert split["examples"] == 24
    # The headline figures are those of the per-example predictions the evaluation wrote (read
    # now: the re-evaluation at the end of this test rewrites them).
    evaluation = json.loads((cfg.run_dir / "evaluation.json").read_text())
    frames = {system: pd.read_parquet(cfg.run_dir / "predictions" / f"{system}.parquet")
              for system in ("fine_tuned", "base_zero_shot", "baseline_tfidf_logreg")}
    for system, frame in frames.items():
        assert len(frame) == 24, system
        # Every system on the same rows in the same order: the paired intervals depend on it.
        assert frame["text"].tolist() == frames["fine_tuned"]["text"].tolist(), system
        assert frame["label_id"].tolist() == frames["fine_tuned"]["label_id"].tolist(), system
        _assert_figures_recomputed(split[system], evaluation[system], frame, len(cfg.data.labels), system)
    low, high = split["fine_tuned"]["interval_95"]["accuracy"]
    assert low <= split["fine_tuned"]["accuracy"] <= high
    assert set(split["paired_differences_95"]) == {
        "fine_tuned - base_zero_shot", "fine_tuned - baseline_tfidf_logreg", "base_zero_shot - baseline_tfidf_logreg"}
    assert summary["training"]["settings"]["zero_stage"] == cfg.train.zero_stage
    # where the training seconds went: shares of data wait, forward+backward and optimizer
    shares = summary["training"]["time_shares"]
    assert set(shares) == {"data", "forward_backward", "optimizer"} and sum(shares.values()) == pytest.approx(1.0)
    assert shares["forward_backward"] > 0 and shares["optimizer"] > 0
    # The learning curve: every validation (eval_every 4 of 8 steps), 8 examples a step (4 per
    # worker, 2 workers), a macro-F1 over the validation rows' labels.
    curve = summary["training"]["learning_curve"]
    assert [point["step"] for point in curve] == [4, 8]
    assert [point["examples_seen"] for point in curve] == [32, 64] and summary["training"]["examples_seen"] == 64
    best = next(point for point in curve if point["step"] == summary["training"]["best_step"])
    assert best["val_loss"] == pytest.approx(summary["training"]["best_val_loss"])
    # The exported (best) step's point: the macro-F1 of the evaluation's own label scoring of the
    # export on the same validation rows.
    from sklearn.metrics import f1_score

    from jobs.data.split import split_dataset
    from jobs.evaluation.scoring import score_labels

    rows = split_dataset(cfg.run_dir / "data", "validation").limit(cfg.train.max_validation_examples).to_pandas()
    export = Path(summary["model_dir"])
    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    label_ids = [tokenizer(label, add_special_tokens=False).input_ids for label in cfg.data.labels]
    prompts = [list(ids[:n]) for ids, n in zip(rows["input_ids"], rows["prompt_len"])]
    predicted = score_labels(exported, prompts, label_ids, tokenizer.eos_token_id).argmax(dim=1).numpy()
    expected = f1_score(rows["label_id"], predicted, labels=[0, 1, 2], average="macro", zero_division=0)
    assert best["val_macro_f1"] == pytest.approx(expected, abs=1e-9)

    # The run became version v0001 of the model, with its evaluation, explanations and report.
    version_dir = Path(summary["version"]["path"])
    assert summary["version"]["version"] == "v0001"
    for name in ("model.safetensors", "lakeforge_model.json", "evaluation.json", "explanations.json", "report.html"):
        assert (version_dir / name).is_file(), name
    assert summary["report"] == str(version_dir / "report.html")
    assert "Promotion gate" in (version_dir / "report.html").read_text()

    serving = summary["serving"]
    assert serving["version"] == "v0001"  # promoted, or served anyway (deploy_unpromoted)
    assert serving["models_listed"] == ["tiny"]
    # The endpoint check sent the first check_examples test rows and compared each served answer
    # with the served version's (this run's fine-tuned model's) offline prediction of that row.
    answers = serving["answers"]
    assert len(answers) == cfg.serve.check_examples == 2
    offline = frames["fine_tuned"].head(len(answers))
    assert [a["text"] for a in answers] == offline["text"].tolist()
    assert [a["label"] for a in answers] == offline["label"].tolist()
    assert [a["offline_prediction"] for a in answers] == [cfg.data.labels[i] for i in offline["pred_id"]]
    agree = sum(a["served_answer"] == a["offline_prediction"] for a in answers)
    assert serving["served_matches_offline"] == f"{agree}/{len(answers)}"  # chat agreement: reported, not required
    assert serving["bad_request_status"] == {"no_credentials": 401, "unknown_model": 404, "over_long_prompt": 400,
                                             "malformed_body": 400}

    # What the endpoint serves is the exported model: its first-token log-probabilities
    # match transformers' on the same folder.
    client = openai.OpenAI(base_url=f"{serving['url']}/v1", api_key=api_key)
    tokenizer = AutoTokenizer.from_pretrained(summary["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(summary["model_dir"]).eval()
    prompt = "The flight was delayed again and"
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=5)
    served_token, served_logprob = next(iter(reply.choices[0].logprobs.top_logprobs[0].items()))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1], dim=-1)
    served_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(served_token))[0]
    assert float(logprobs[served_id]) == pytest.approx(served_logprob, abs=1e-2)
    assert float(logprobs.max() - logprobs[served_id]) < 1e-2  # vLLM's greedy pick is transformers' argmax
    # /v1/classify scores the labels as the evaluation does: the same label on every row, and the
    # same probabilities up to the engines' float differences.
    assert serving["classify_matches_offline"] == f"{len(answers)}/{len(answers)}"
    for answer, probabilities in zip(answers, _rows(offline["probabilities"])):
        assert answer["classify_label"] == answer["offline_prediction"], answer
        served = [answer["classify_probabilities"][label] for label in cfg.data.labels]
        assert served == pytest.approx(probabilities.tolist(), abs=1e-2), answer

    # Retraining to the same weights is no improvement: against the registered version as the
    # previous one, the gate's paired interval is [0, 0] and the version is not deployable.
    from cluster.registry import ModelRegistry
    from jobs.data.prepare import prepare_run_inputs
    from jobs.evaluation.run import run_evaluation

    base_dir, data_dir, _ = prepare_run_inputs(cfg)
    report, _ = run_evaluation(cfg, base_dir, data_dir, finetuned_dir=Path(summary["model_dir"]),
                               previous_dir=version_dir)
    assert report["gate"]["reference"] == "previous_version"
    assert report["gate"]["difference_interval"] == [0.0, 0.0] and not report["gate"]["deployable"]
    assert report["previous_version"]["accuracy"] == report["fine_tuned"]["accuracy"]
    registry = ModelRegistry(cfg.storage_root, cfg.name)
    current_before = registry.current()
    assert registry.register(summary["model_dir"], report["gate"], metrics={}, run="again")["version"] == "v0002"
    assert registry.current() == current_before


def test_a_new_dataset_with_only_sources_columns_labels_and_prompt_runs_the_recipe(ray_cluster, tmp_path, tiny_model_dir):
    """Issue 21, "one recipe, the default": a config for a new classification dataset (a CSV of
    made-up customer messages, its own columns and labels) that sets nothing but its source,
    columns, labels and prompt is fine-tuned and evaluated with the recipe's defaults. The overrides
    only point the run at a temporary folder and the tiny model, and shorten it: no other setting."""
    from cluster.config import load_config
    from jobs.config import RunConfig
    from jobs.pipeline import run_pipeline
    from tests.conftest import NEW_DATASET_LABELS, new_dataset_rows, write_new_dataset_config

    rows = 120
    cfg = load_config(RunConfig, write_new_dataset_config(tmp_path / "dataset", rows), [
        f"storage_root={tmp_path / 'runs'}", f"model.base={tiny_model_dir}",
        # Seconds instead of the recipe's 12 minutes; nothing served or explained.
        "train.max_steps=8", "train.warmup_steps=1", "train.eval_every=4", "train.micro_batch_size=4",
        "serve.enabled=false", "explain.enabled=false", "tracking.enabled=false"])
    # The recipe is in force: the top 10 layers (every layer of the 2-layer tiny model), frozen
    # embeddings, ZeRO-1, a class-balanced stream, the label-word loss, the compact template.
    assert (cfg.train.trainable_layers, cfg.train.freeze_embeddings, cfg.train.zero_stage) == (10, True, 1)
    assert cfg.train.balance_classes and cfg.train.label_loss_weight == 1.0 and cfg.data.template == "compact"

    summary = run_pipeline(cfg)

    assert json.loads((cfg.run_dir / "summary.json").read_text())["run"] == "support_messages"
    counts, splits = summary["data"]["counts"], summary["data"]["splits"]
    assert counts["rows_read"] == rows
    assert counts["rows_read"] == (counts["kept"] + sum(counts["quarantined"].values()) + sum(counts["filtered"].values())
                                   + counts["duplicates_removed"])
    assert counts["kept"] == rows  # distinct, clean, short messages: every one kept
    assert sum(split["rows"] for split in splits.values()) == counts["kept"]
    written = {label: sum(split["labels"].get(label, 0) for split in splits.values()) for label in NEW_DATASET_LABELS}
    assert written == {label: sum(1 for _, row_label in new_dataset_rows(rows) if row_label == label)
                       for label in NEW_DATASET_LABELS}
    assert all(split["rows"] > 0 for split in splits.values())

    training = summary["training"]
    assert [point["step"] for point in training["learning_curve"]] == [4, 8]
    assert training["examples_seen"] == 8 * 4 * cfg.train.num_workers
    assert training["settings"]["trainable_layers"] == 10 and training["settings"]["balance_classes"]
    export = Path(summary["model_dir"])
    assert (export / "model.safetensors").is_file()
    artifact = json.loads((export / "lakeforge_model.json").read_text())
    assert artifact["labels"] == NEW_DATASET_LABELS and artifact["system_prompt"] == cfg.data.system_prompt

    # Every test row scored by every system (fewer than eval.max_test_examples), on the same rows.
    test_rows = splits["test"]["rows"]
    assert summary["test_split"]["examples"] == test_rows
    for system in ("fine_tuned", "base_zero_shot", "baseline_tfidf_logreg"):
        frame = pd.read_parquet(cfg.run_dir / "predictions" / f"{system}.parquet")
        assert len(frame) == test_rows and set(frame["label"]) <= set(NEW_DATASET_LABELS), system
        assert 0 <= summary["test_split"][system]["macro_f1"] <= 1, system
    assert summary["version"]["version"] == "v0001" and Path(summary["report"]).is_file()
    assert "serving" not in summary and "explanations" not in summary


@pytest.mark.slow
def test_packed_training_matches_padded_training(reference_run, tmp_path, tiny_model_dir, small_csv):
    """Packing changes how the same examples are laid out, not what is learned: on the same data and
    steps the losses follow the padded run's, over the same real tokens."""
    padded = reference_run[2]
    _, _, packed = _train(tmp_path, tiny_model_dir, small_csv, "train.eval_every=2", "train.keep_checkpoints=4",
                          "tracking.enabled=false", "train.packing=true", "train.packed_length=256")

    assert [m["step"] for m in packed["history"]] == [m["step"] for m in padded["history"]] == [2, 4, 6, 8]
    assert packed["history"][-1]["val_loss"] < packed["history"][0]["val_loss"]
    for a, b in zip(packed["history"], padded["history"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
    assert packed["final"]["train_loss"] == pytest.approx(padded["final"]["train_loss"], rel=1e-3)
    assert packed["train_tokens"] == padded["train_tokens"]  # the same real tokens...
    assert packed["final"]["non_padding_share"] > padded["final"]["non_padding_share"]  # ...in fewer computed slots


@pytest.mark.slow
def test_checkpoints_go_to_s3_and_a_run_restarts_by_hand_from_one(ray_cluster, s3_server, tmp_path, tiny_model_dir, small_csv):
    """Every rank's checkpoint shards land on the loopback S3 server; a second run named with
    train.resume_from=s3://... continues from that step, not from 0."""
    import boto3

    from jobs.data.prepare import prepare_run_inputs
    from jobs.train.run import run_finetune

    boto3.client("s3").create_bucket(Bucket="lakeforge-ckpt")
    settings = ("train.eval_every=2", "tracking.enabled=false", "train.checkpoint_storage=s3://lakeforge-ckpt/runs")
    first_cfg = tiny_run_config(tmp_path, tiny_model_dir, small_csv, *settings, "train.max_steps=4")
    base_dir, data_dir, _ = prepare_run_inputs(first_cfg)
    first = run_finetune(first_cfg, base_dir, data_dir)

    keys = [item["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="lakeforge-ckpt")
            for item in page.get("Contents", [])]
    assert first["checkpoint_uri"].startswith("s3://lakeforge-ckpt/runs/")
    best = first["checkpoint_uri"].removeprefix("s3://lakeforge-ckpt/")
    in_best = {key.removeprefix(best + "/") for key in keys if key.startswith(best + "/")}
    assert {"rng_rank0.pt", "rng_rank1.pt", "hf_model/model.safetensors"} <= in_best
    assert sum("zero_pp_rank_" in key for key in in_best) == 2  # each rank's optimizer shard
    assert not (tmp_path / first_cfg.name / "ray_train").exists()  # nothing went to local storage
    assert Path(first["model_dir"]).is_dir()  # the export is local (storage_root), reloaded and checked

    resumed_cfg = tiny_run_config(tmp_path, tiny_model_dir, small_csv, *settings, "train.max_steps=6",
                                  f"train.resume_from={first['checkpoint_uri']}")
    resumed = run_finetune(resumed_cfg, base_dir, data_dir)
    assert resumed["final"]["resumed_from_step"] == first["best_step"]
    assert resumed["final"]["step"] == 6
    assert [m["step"] for m in resumed["history"]] == [step for step in (2, 4, 6) if step > first["best_step"]]
