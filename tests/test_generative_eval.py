"""Evaluation of generative runs (instruction, chat): reference metrics, format checks, the retrieval
baseline, the gate on a generative metric, the report, and the evaluation and pipeline on a tiny
instruction dataset (the tiny model through vLLM on the shared Ray cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cluster.config import ConfigError, load_config
from jobs.config import FormatChecks, RunConfig
from jobs.evaluation.metrics import format_check_results, normalized_answer, paired_bootstrap, reference_scores
from tests.conftest import EAGER

# A support desk's answers with a mapping a model can learn a little: the reply names the item and
# colour asked about and the item's shipping day. 10 items x 10 colours: 100 distinct rows.
ITEMS = ["lamp", "chair", "kettle", "blanket", "mirror", "toaster", "rug", "clock", "vase", "desk"]
COLOURS = ["red", "blue", "green", "black", "white", "grey", "yellow", "pink", "brown", "orange"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def support_rows() -> list[dict]:
    return [{"question": f"Where is my {colour} {item}?", "answer": f"Your {colour} {item} ships on {DAYS[i % len(DAYS)]}."}
            for i, item in enumerate(ITEMS) for colour in COLOURS]


def instruction_config(tmp_path: Path, tiny_model_dir: Path, *overrides: str) -> RunConfig:
    source = tmp_path / "support.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in support_rows()))
    return load_config(RunConfig, None, [
        "name=support", f"storage_root={tmp_path / 'runs'}", f"model_cache={tmp_path / 'models'}",
        f"model.base={tiny_model_dir}", "data.task=instruction", f"data.source={source}",
        "data.prompt_column=question", "data.response_column=answer", "data.system_prompt=Answer the customer.",
        "data.near_dedup.enabled=false",  # templated rows are near-duplicates by design
        "data.test_fraction=0.2", "data.max_seq_len=64",
        "eval.max_new_tokens=16", "eval.format_checks.max_words=8", "eval.format_checks.required_phrase=ships",
        "eval.side_by_side_examples=3", "eval.engine.max_model_len=128", "eval.engine.batch_size=16",
        "eval.engine.engine_overrides={enforce_eager: true}",
        "train.max_steps=8", "train.warmup_steps=1", "train.eval_every=4", "train.micro_batch_size=4",
        "train.learning_rate=2e-3", "serve.enabled=false", "tracking.enabled=false", *overrides])


def test_reference_metrics_on_known_strings():
    scores = reference_scores(
        ["the cat sat on the mat", "the cat sat", "Paris.", "xyz"],
        ["the cat sat on the mat", "the cat sat on the mat", "paris", "abc"])
    # ROUGE-L: LCS 3 of 3 answer words and 6 reference words: P 1, R 1/2, F1 2/3.
    assert scores["rouge_l"].tolist() == pytest.approx([1.0, 2 / 3, 1.0, 0.0])
    assert scores["chrf"][0] == pytest.approx(1.0) and scores["chrf"][3] == 0.0  # identical; no character in common
    assert 0 < scores["chrf"][1] < 1 and 0 < scores["chrf"][2] < 1  # chrF is case-sensitive: "Paris." is not "paris"
    assert scores["exact_match"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert normalized_answer("  Yes,  PLEASE!! ") == "yes, please"


def test_format_checks_pass_only_answers_of_the_configured_form():
    results = format_check_results(['{"refund": true}', "It ships today, thanks", "ok"],
                                   FormatChecks(max_words=3, required_phrase="THANKS", valid_json=True))
    assert results.to_dict("list") == {"format_max_words": [1.0, 0.0, 1.0], "format_required_phrase": [0.0, 1.0, 0.0],
                                       "format_valid_json": [1.0, 0.0, 0.0], "format_pass": [0.0, 0.0, 0.0]}
    assert format_check_results(["a"], FormatChecks()).columns.tolist() == []  # none configured, none reported


def test_retrieval_baseline_answers_with_the_nearest_training_prompt():
    from jobs.evaluation.baseline import retrieval_baseline

    train = pd.DataFrame({"text": ["where is my red lamp", "cancel my order please", "my invoice is wrong"],
                          "label": ["lamp answer", "cancel answer", "invoice answer"]})
    answers = retrieval_baseline(train["text"], train["label"], pd.Series(["please cancel the order", "red lamp?", "wrong invoice"]))
    assert answers.tolist() == ["cancel answer", "lamp answer", "invoice answer"]


def _gate_of(fine_tuned: np.ndarray, base: np.ndarray) -> dict:
    from jobs.evaluation.gate import promotion_gate

    scores = {"fine_tuned": fine_tuned, "base_zero_shot": base}
    bootstrap = paired_bootstrap(len(base), {system: {"rouge_l": lambda rows, s=s: float(s[rows].mean())}
                                             for system, s in scores.items()}, resamples=200)
    return promotion_gate(bootstrap, "rouge_l", 0.0)


def test_the_gate_on_a_generative_metric_passes_only_a_paired_interval_above_zero():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 0.5, 80)
    assert _gate_of(base + 0.3, base)["deployable"]
    same = _gate_of(base.copy(), base)  # the interval is [0, 0]: its lower end is not above 0
    assert not same["deployable"] and same["difference_interval"] == [0.0, 0.0]
    worse = _gate_of(np.clip(base - 0.2 + rng.normal(0, 0.05, 80), 0, 1), base)
    assert not worse["deployable"] and worse["difference_interval"][1] < 0


def test_config_rejects_generative_settings_that_cannot_work():
    with pytest.raises(ConfigError, match="format_checks apply to instruction and chat runs"):
        load_config(RunConfig, None, ["eval.format_checks.valid_json=true"])
    with pytest.raises(ConfigError, match="must hold the longest test prompt"):
        load_config(RunConfig, None, ["data.task=instruction", "data.max_seq_len=1000", "eval.max_new_tokens=100"])
    with pytest.raises(ConfigError, match="generative_metric"):
        load_config(RunConfig, None, ["data.task=chat", "eval.generative_metric=bleu"])


def test_the_report_of_a_generative_run_shows_metrics_with_intervals_and_answers_side_by_side(tmp_path):
    """The report from an evaluation built of the real pieces (no cluster): per-row scores, their
    means with paired intervals, the gate, the best and worst rows; every text escaped."""
    from jobs.evaluation.analysis import answer_examples
    from jobs.evaluation.gate import promotion_gate
    from jobs.evaluation.metrics import generative_metrics
    from jobs.evaluation.report import write_report

    rows = support_rows()[:12]
    prompts, references = [row["question"] for row in rows], [row["answer"] for row in rows]
    answers = {"fine_tuned": references[:8] + ["<b>no idea</b>"] * 4, "base_zero_shot": ["Hello & welcome"] * 12,
               "baseline_tfidf_retrieval": references[1:] + references[:1]}
    predictions = {}
    for system, generated in answers.items():
        frame = pd.DataFrame({"key": [f"k{i:02d}" for i in range(12)], "text": prompts, "label": references,
                              "generated": generated})
        predictions[system] = frame.join(reference_scores(generated, references)).join(
            format_check_results(generated, FormatChecks(max_words=6)))
    metrics = ["rouge_l", "chrf", "exact_match", "format_max_words", "format_pass"]
    report = {"task": "instruction", "test_examples": 12, "models": {"fine_tuned": "m", "base_zero_shot": "b"},
              **{system: generative_metrics(frame, metrics) for system, frame in predictions.items()}}
    report["fine_tuned"]["answer_perplexity"] = 3.5
    report["bootstrap"] = paired_bootstrap(12, {system: {metric: lambda r, s=frame[metric].to_numpy(): float(s[r].mean())
                                                         for metric in metrics} for system, frame in predictions.items()},
                                           resamples=100)
    report["examples"] = answer_examples(predictions, "rouge_l", 2)
    report["gate"] = promotion_gate(report["bootstrap"], "rouge_l", 0.0)
    assert report["fine_tuned"]["exact_match"] == pytest.approx(8 / 12) and report["base_zero_shot"]["rouge_l"] == 0.0
    assert report["gate"]["deployable"] and report["gate"]["reference"] == "base_zero_shot"
    assert [row["answers"]["fine_tuned"]["score"] for row in report["examples"]["best"]] == [1.0, 1.0]
    assert report["examples"]["worst"][0]["answers"]["fine_tuned"]["text"] == "<b>no idea</b>"

    page = write_report(tmp_path / "report.html", json.loads(json.dumps(report))).read_text()
    assert "Promotion gate: Deployable" in page and "ROUGE-L [95% CI]" in page and "format: max words" in page
    assert "fine_tuned - baseline_tfidf_retrieval" in page and "3.50" in page
    assert "&lt;b&gt;no idea&lt;/b&gt;" in page and "<b>no idea</b>" not in page and "Hello &amp; welcome" in page
    assert "Worst answers of fine_tuned by ROUGE-L" in page


def _check_generative_evaluation(report: dict, predictions: dict, cfg: RunConfig, train_answers: set[str]) -> None:
    """What every generative evaluation must hold: the systems, metrics that are the means of the
    per-row scores recomputed from the answers, intervals around them, the baseline's answers from
    the training rows, the side-by-side examples and the written files."""
    metrics = ["rouge_l", "chrf", "exact_match", "format_max_words", "format_required_phrase", "format_pass"]
    systems = ["fine_tuned", "base_zero_shot", "baseline_tfidf_retrieval"]
    assert report["task"] == "instruction" and list(report["bootstrap"]["systems"]) == systems
    test_rows = report["test_examples"]
    for system in systems:
        frame = predictions[system]
        assert len(frame) == test_rows and frame["generated"].map(lambda answer: isinstance(answer, str)).all(), system
        recomputed = reference_scores(frame["generated"].tolist(), frame["label"].tolist())
        for metric in metrics:
            low, high = report["bootstrap"]["systems"][system][metric]
            assert 0 <= low <= report[system][metric] <= high <= 1, (system, metric)
        for metric in ("rouge_l", "chrf", "exact_match"):
            assert report[system][metric] == pytest.approx(recomputed[metric].mean()), (system, metric)
        assert report[system]["format_max_words"] == pytest.approx(frame["generated"].map(lambda answer: len(answer.split()) <= 8).mean())
        written = pd.read_parquet(cfg.run_dir / "predictions" / f"{system}.parquet")
        assert written["key"].tolist() == predictions["fine_tuned"]["key"].tolist(), system  # rows line up
    for system in ("fine_tuned", "base_zero_shot"):  # the reference answers' perplexity under each LLM
        frame = predictions[system]
        assert (frame["answer_tokens"] > 0).all() and (frame["gold_logprob"] < 0).all()
        assert report[system]["answer_perplexity"] == pytest.approx(
            np.exp(-frame["gold_logprob"].sum() / frame["answer_tokens"].sum()))
    assert set(predictions["baseline_tfidf_retrieval"]["generated"]) <= train_answers
    assert set(report["bootstrap"]["differences"]) == {"fine_tuned - base_zero_shot", "fine_tuned - baseline_tfidf_retrieval",
                                                       "base_zero_shot - baseline_tfidf_retrieval"}
    examples = report["examples"]
    assert examples["metric"] == "rouge_l" and len(examples["best"]) == len(examples["worst"]) == 3
    best, worst = ([row["answers"]["fine_tuned"]["score"] for row in examples[side]] for side in ("best", "worst"))
    assert best == sorted(best, reverse=True) and worst == sorted(worst) and min(best) >= max(worst)
    assert set(examples["best"][0]["answers"]) == set(systems)
    assert json.loads((cfg.run_dir / "evaluation.json").read_text())["gate"] == report["gate"]


# The multi-task case: a generative primary task and the tweet classification as a second task.
TWEET_TASK = "tasks=[{name: tweets, data: {source: %s, system_prompt: 'Is this tweet negative, neutral or positive?'}}]"


def _check_tweet_task(report: dict, cfg: RunConfig) -> None:
    """The second task's evaluation: the classification metrics on its own test split and labels,
    with intervals, its predictions in its own folder, outside the gate."""
    from sklearn.metrics import f1_score

    from jobs.data.prepare import MANIFEST, task_data_dirs

    tweets = report["further_tasks"]["tweets"]
    manifest = json.loads((task_data_dirs(cfg)["tweets"] / MANIFEST).read_text())
    assert tweets["task"] == "classification" and tweets["labels"] == ["negative", "neutral", "positive"]
    assert tweets["prompt_and_labels_from"] == "tasks[0].data" and "gate" not in tweets
    assert tweets["test_examples"] == manifest["splits"]["test"]["rows"] >= 10
    assert list(tweets["bootstrap"]["systems"]) == ["fine_tuned", "base_zero_shot", "baseline_tfidf_logreg"]
    for system in tweets["bootstrap"]["systems"]:
        frame = pd.read_parquet(cfg.run_dir / "task_predictions" / "tweets" / f"{system}.parquet")
        assert len(frame) == tweets["test_examples"]
        macro_f1 = f1_score(frame["label_id"], frame["pred_id"], labels=[0, 1, 2], average="macro", zero_division=0)
        low, high = tweets["bootstrap"]["systems"][system]["macro_f1"]
        assert tweets[system]["macro"]["f1"] == pytest.approx(macro_f1) and low <= macro_f1 <= high, system


@pytest.mark.integration
@pytest.mark.slow  # 393 s in CI (2026-12-02) with the tweets task; test_multitask checks the per-task plumbing fast
def test_evaluation_of_an_instruction_run_and_its_tweet_task_scores_every_system_and_the_gate_blocks_an_unchanged_model(
        ray_cluster, tmp_path, tiny_model_dir, small_csv):
    """The evaluation on prepared shards, with the base model standing in for the fine-tuned one: the
    two answer alike (greedy decoding), so every paired difference is 0 and the gate must block. A
    second task, the tweets' sentiment, is scored by its own kind beside the instruction task, and
    both show in the summary's figures and the report."""
    from jobs.data.prepare import prepare_run_inputs
    from jobs.data.split import split_dataset
    from jobs.evaluation.report import write_report
    from jobs.evaluation.run import run_evaluation
    from jobs.pipeline import evaluation_summary

    cfg = instruction_config(tmp_path, tiny_model_dir, "primary_task={name: support}", TWEET_TASK % small_csv)
    base_dir, data_dir, manifest = prepare_run_inputs(cfg)
    assert manifest["counts"]["kept"] == 100

    report, predictions = run_evaluation(cfg, base_dir, data_dir, finetuned_dir=base_dir)

    train_answers = set(split_dataset(data_dir, "train").to_pandas()["label"])
    assert report["test_examples"] == manifest["splits"]["test"]["rows"] >= 10
    _check_generative_evaluation(report, predictions, cfg, train_answers)
    pd.testing.assert_series_equal(predictions["fine_tuned"]["generated"], predictions["base_zero_shot"]["generated"])
    gate = report["gate"]
    assert gate["metric"] == "rouge_l" and gate["reference"] == "base_zero_shot"
    assert gate["difference_interval"] == [0.0, 0.0] and not gate["deployable"]
    _check_tweet_task(report, cfg)
    assert report["further_tasks"]["tweets"]["bootstrap"]["differences"]["fine_tuned - base_zero_shot"]["macro_f1"] == [0.0, 0.0]
    summary = evaluation_summary(report)
    assert list(summary["tasks"]) == ["support", "tweets"]
    assert {"rouge_l", "chrf", "interval_95"} <= set(summary["tasks"]["support"]["fine_tuned"])
    assert {"macro_f1", "accuracy", "expected_calibration_error", "interval_95"} <= set(summary["tasks"]["tweets"]["fine_tuned"])

    page = write_report(tmp_path / "report.html", report).read_text()
    assert "Not deployable" in page and "ROUGE-L" in page and "chrF" in page and "baseline_tfidf_retrieval" in page
    assert "Best answers of fine_tuned by ROUGE-L" in page and "Worst answers" in page
    assert "Task support (instruction, the primary task)" in page and "Task tweets (classification)" in page
    assert page.count("Confusion matrices") == 1 and "baseline_tfidf_logreg" in page  # the tweets' section alone
    prompt = predictions["fine_tuned"]["text"].iloc[0].replace("'", "&#39;")
    assert prompt in page


@pytest.mark.integration
@pytest.mark.slow
def test_pipeline_on_an_instruction_dataset_trains_evaluates_gates_and_reports(ray_cluster, tmp_path, tiny_model_dir,
                                                                              small_csv, capsys):
    """Issue 22 end to end: an instruction dataset through data, training, evaluation (fine-tuned,
    base, retrieval baseline, with intervals), the gate, registration and the report; with the tweet
    classification as a second task, whose metrics the summary and the report show too."""
    from jobs.data.prepare import task_data_dirs
    from jobs.data.split import split_dataset
    from jobs.pipeline import run_pipeline

    cfg = instruction_config(tmp_path, tiny_model_dir, "primary_task={name: support}", TWEET_TASK % small_csv)
    summary = run_pipeline(cfg)

    assert "explanations skipped" in capsys.readouterr().out and "explanations" not in summary
    assert summary["data"]["counts"]["kept"] == 100
    assert [point["step"] for point in summary["training"]["learning_curve"]] == [4, 8]
    figures = summary["test_split"]
    assert figures["examples"] == summary["data"]["splits"]["test"]["rows"]
    for system in ("fine_tuned", "base_zero_shot", "baseline_tfidf_retrieval"):
        assert set(figures[system]) >= {"rouge_l", "chrf", "exact_match", "format_pass", "interval_95"}, system
    assert "answer_perplexity" in figures["fine_tuned"] and "answer_perplexity" not in figures["baseline_tfidf_retrieval"]
    report = json.loads((cfg.run_dir / "evaluation.json").read_text())
    predictions = {system: pd.read_parquet(cfg.run_dir / "predictions" / f"{system}.parquet")
                   for system in ("fine_tuned", "base_zero_shot", "baseline_tfidf_retrieval")}
    train_answers = set(split_dataset(task_data_dirs(cfg)[cfg.primary_task.name], "train").to_pandas()["label"])
    _check_generative_evaluation(report, predictions, cfg, train_answers)
    gate = summary["version"]["gate"]
    low = report["bootstrap"]["differences"]["fine_tuned - base_zero_shot"]["rouge_l"][0]
    assert gate["metric"] == "rouge_l" and gate["deployable"] == (low > 0)
    artifact = json.loads((Path(summary["model_dir"]) / "lakeforge_model.json").read_text())
    assert artifact["labels"] == []  # served and batch-inferred as a generative model, not a classifier
    _check_tweet_task(report, cfg)
    assert list(summary["tasks"]) == ["support", "tweets"] and summary["tasks"]["tweets"]["task"] == "classification"
    assert summary["tasks"]["tweets"]["fine_tuned"]["macro_f1"] == report["further_tasks"]["tweets"]["fine_tuned"]["macro"]["f1"]
    assert summary["tasks"]["support"]["fine_tuned"]["rouge_l"] == figures["fine_tuned"]["rouge_l"]
    page = Path(summary["report"]).read_text()
    assert "ROUGE-L" in page and "Best answers of fine_tuned" in page
    assert "Task tweets (classification)" in page and "Confusion matrices" in page
