"""The evaluation run: every system (fine-tuned, current version, base zero-shot, a TF-IDF baseline)
on the same held-out rows, with intervals and the promotion gate; slices and errors for
classification, side-by-side answers for generative runs (instruction, chat). Training and checkpoint
selection never saw these rows, so paired bootstrap intervals compare the systems honestly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from jobs.config import RunConfig
from jobs.data.split import pinned_test_rows, read_test_keys, split_dataset
from jobs.evaluation.analysis import answer_examples, error_analysis, slice_metrics
from jobs.evaluation.baseline import evaluate_baseline, retrieval_baseline
from jobs.evaluation.gate import promotion_gate
from jobs.evaluation.generation import generate_answers
from jobs.evaluation.metrics import (GENERATIVE_METRICS, answer_perplexity, bootstrap_intervals, classification_metrics,
                                     format_check_results, generation_metrics, generative_metrics, paired_bootstrap,
                                     reference_scores)
from jobs.evaluation.report import METRIC_NAMES, RETRIEVAL_BASELINE, SYSTEMS
from jobs.evaluation.scoring import evaluate_llm

def run_evaluation(cfg: RunConfig, base_dir: Path, data_dir: Path, finetuned_dir: Path | None,
                   previous_dir: Path | None = None) -> tuple[dict, dict]:
    """Metrics of every system on the same test rows and (with a fine-tuned model) the promotion gate;
    for classification also error analysis and slices, for generative runs (instruction, chat) the
    best and worst answers side by side. Writes evaluation.json and per-example predictions."""
    if cfg.eval.test_keys:
        test = pinned_test_rows(data_dir, read_test_keys(cfg.eval.test_keys), cfg.security.encryption)
    else:
        test = split_dataset(data_dir, "test", cfg.security.encryption)
        if cfg.eval.max_test_examples:
            test = test.limit(cfg.eval.max_test_examples)  # shards are in hash order: a uniform sample
        test = test.materialize()
    generative = cfg.data.task != "classification"
    labels = cfg.data.labels
    llms = {"fine_tuned": finetuned_dir, "previous_version": previous_dir, "base_zero_shot": base_dir}
    predictions = {}  # fine-tuned first, so paired differences read "fine_tuned - other"
    for system, model_dir in llms.items():
        if model_dir is not None:
            predictions[system] = (generate_answers(model_dir, test, cfg.eval) if generative
                                   else evaluate_llm(model_dir, test, labels, cfg.eval))
    columns = [column for column in ("key", "text", "label", "label_id", "source") if column in test.schema().names]
    test_rows = test.select_columns(columns).to_pandas()
    if generative:
        train = split_dataset(data_dir, "train", cfg.security.encryption).select_columns(["text", "label"]).to_pandas()
        test_rows = test_rows.sort_values("key", ignore_index=True)  # the LLMs' rows are in key order too
        predictions[RETRIEVAL_BASELINE] = test_rows.assign(
            generated=retrieval_baseline(train["text"], train["label"], test_rows["text"]))
    else:
        predictions["baseline_tfidf_logreg"] = evaluate_baseline(data_dir, test_rows.drop(columns="key"), len(labels),
                                                                     cfg.security.encryption)
    test_keys = sorted(test.unique("key"))
    report = {"task": cfg.data.task, "test_examples": test.count(), **({} if generative else {"labels": labels}),
              "test_keys_pinned": bool(cfg.eval.test_keys),
              "test_keys_sha256": hashlib.sha256("\n".join(test_keys).encode()).hexdigest(),
              "models": {system: str(path) for system, path in llms.items() if path is not None}}
    if generative:
        gate_metric = cfg.eval.generative_metric
        for system, frame in predictions.items():
            if frame["key"].tolist() != test_rows["key"].tolist():
                raise RuntimeError(f"{system}: its answers are not for the test rows in key order")
            answers = frame["generated"].tolist()
            predictions[system] = frame = frame.join(reference_scores(answers, frame["label"].tolist())).join(
                format_check_results(answers, cfg.eval.format_checks))
        metrics = [column for column in frame.columns if column in GENERATIVE_METRICS or column.startswith("format_")]
        for system, frame in predictions.items():
            report[system] = generative_metrics(frame, metrics)
        report["bootstrap"] = paired_bootstrap(len(test_rows), {
            system: {metric: lambda rows, scores=frame[metric].to_numpy(): float(scores[rows].mean()) for metric in metrics}
            for system, frame in predictions.items()})
        if finetuned_dir is not None:
            report["examples"] = answer_examples(predictions, gate_metric, cfg.eval.side_by_side_examples)
    else:
        gate_metric = cfg.eval.gate_metric
        for system, frame in predictions.items():
            report[system] = classification_metrics(frame["label_id"], frame["pred_id"], labels, frame["confidence"])
            if system in llms:
                report[system]["generation"] = generation_metrics(frame, labels)
        y_true = next(iter(predictions.values()))["label_id"].to_numpy()
        report["bootstrap"] = bootstrap_intervals(y_true, {name: frame["pred_id"].to_numpy() for name, frame in predictions.items()}, labels)
        report["slices"] = slice_metrics(predictions, labels, cfg.eval.terms)
        if finetuned_dir is not None:
            report["errors"] = error_analysis(predictions["fine_tuned"], labels, cfg.eval.worst_errors)
    for system in llms:
        if system in predictions:
            report[system]["answer_perplexity"] = answer_perplexity(predictions[system])
    out_dir = cfg.run_dir / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    for system, frame in predictions.items():
        frame.to_parquet(out_dir / f"{system}.parquet")
    if finetuned_dir is not None:
        report["gate"] = promotion_gate(report["bootstrap"], gate_metric, cfg.eval.gate_min_improvement)
    (cfg.run_dir / "evaluation.json").write_text(json.dumps(report, indent=2))
    print(format_table(report))
    return report, predictions


def headline_metrics(report: dict, system: str) -> dict[str, float]:
    """The figures a system is judged by, those with bootstrap intervals: accuracy and macro-F1 for
    classification; ROUGE-L, chrF, exact match (and format pass rates) for generative runs."""
    figures = report[system]
    if report.get("task", "classification") == "classification":
        return {"accuracy": figures["accuracy"], "macro_f1": figures["macro"]["f1"]}
    return {metric: figures[metric] for metric in report["bootstrap"]["systems"][system]}


def format_table(report: dict) -> str:
    intervals = report["bootstrap"]["systems"]
    systems = [name for name in SYSTEMS if name in report]
    metrics = list(headline_metrics(report, systems[0]))
    lines = [f"[evaluate] held-out test split, {report['test_examples']} examples, "
             f"{report['bootstrap']['level']:.0%} bootstrap intervals",
             f"{'system':<26}" + "".join(f"{METRIC_NAMES.get(metric, metric):>24}" for metric in metrics)]
    for name in systems:
        values = headline_metrics(report, name)
        lines.append(f"{name:<26}" + "".join(
            f"{f'{values[key]:.3f} [{intervals[name][key][0]:.3f}, {intervals[name][key][1]:.3f}]':>24}" for key in metrics))
    if "gate" in report:
        lines.append(f"[gate] {'DEPLOYABLE' if report['gate']['deployable'] else 'NOT deployable'}: {report['gate']['reason']}")
    return "\n".join(lines)
