"""The evaluation run: every system (fine-tuned, current version, base zero-shot, TF-IDF) on the
same held-out rows, with intervals, slices, errors and the promotion gate. Training and checkpoint
selection never saw these rows, so paired bootstrap intervals compare the systems honestly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from jobs.config import RunConfig
from jobs.data.split import pinned_test_rows, read_test_keys, split_dataset
from jobs.evaluation.analysis import error_analysis, slice_metrics
from jobs.evaluation.baseline import evaluate_baseline
from jobs.evaluation.gate import promotion_gate
from jobs.evaluation.metrics import answer_perplexity, bootstrap_intervals, classification_metrics, generation_metrics
from jobs.evaluation.report import SYSTEMS
from jobs.evaluation.scoring import evaluate_llm

def run_evaluation(cfg: RunConfig, base_dir: Path, data_dir: Path, finetuned_dir: Path | None,
                   previous_dir: Path | None = None) -> tuple[dict, dict]:
    """Metrics of every system on the same test rows, error analysis, slices and (with a fine-tuned
    model) the promotion gate; writes evaluation.json and per-example predictions."""
    if cfg.eval.test_keys:
        test = pinned_test_rows(data_dir, read_test_keys(cfg.eval.test_keys))
    else:
        test = split_dataset(data_dir, "test")
        if cfg.eval.max_test_examples:
            test = test.limit(cfg.eval.max_test_examples)  # shards are in hash order: a uniform sample
        test = test.materialize()
    labels = cfg.data.labels
    llms = {"fine_tuned": finetuned_dir, "previous_version": previous_dir, "base_zero_shot": base_dir}
    predictions = {}  # fine-tuned first, so paired differences read "fine_tuned - other"
    for system, model_dir in llms.items():
        if model_dir is not None:
            predictions[system] = evaluate_llm(model_dir, test, labels, cfg.eval)
    columns = [column for column in ("text", "label", "label_id", "source") if column in test.schema().names]
    predictions["baseline_tfidf_logreg"] = evaluate_baseline(
        data_dir, test.select_columns(columns).to_pandas(), len(cfg.data.labels))
    test_keys = sorted(test.unique("key"))
    report = {"test_examples": test.count(), "labels": labels, "test_keys_pinned": bool(cfg.eval.test_keys),
              "test_keys_sha256": hashlib.sha256("\n".join(test_keys).encode()).hexdigest(),
              "models": {system: str(path) for system, path in llms.items() if path is not None}}
    out_dir = cfg.run_dir / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    for system, frame in predictions.items():
        report[system] = classification_metrics(frame["label_id"], frame["pred_id"], labels, frame["confidence"])
        if system in llms:
            report[system]["answer_perplexity"] = answer_perplexity(frame)
            report[system]["generation"] = generation_metrics(frame, labels)
        frame.to_parquet(out_dir / f"{system}.parquet")
    y_true = next(iter(predictions.values()))["label_id"].to_numpy()
    report["bootstrap"] = bootstrap_intervals(y_true, {name: frame["pred_id"].to_numpy() for name, frame in predictions.items()}, labels)
    report["slices"] = slice_metrics(predictions, labels, cfg.eval.terms)
    if finetuned_dir is not None:
        report["errors"] = error_analysis(predictions["fine_tuned"], labels, cfg.eval.worst_errors)
        report["gate"] = promotion_gate(report["bootstrap"], cfg.eval.gate_metric, cfg.eval.gate_min_improvement)
    (cfg.run_dir / "evaluation.json").write_text(json.dumps(report, indent=2))
    print(format_table(report))
    return report, predictions


def format_table(report: dict) -> str:
    intervals = report["bootstrap"]["systems"]
    lines = [f"[evaluate] held-out test split, {report['test_examples']} examples, "
             f"{report['bootstrap']['level']:.0%} bootstrap intervals",
             f"{'system':<24}{'accuracy':>24}{'macro-F1':>24}"]
    for name in SYSTEMS:
        if name in report:
            values = {"accuracy": report[name]["accuracy"], "macro_f1": report[name]["macro"]["f1"]}
            cells = [f"{values[key]:.3f} [{intervals[name][key][0]:.3f}, {intervals[name][key][1]:.3f}]" for key in values]
            lines.append(f"{name:<24}{cells[0]:>24}{cells[1]:>24}")
    if "gate" in report:
        lines.append(f"[gate] {'DEPLOYABLE' if report['gate']['deployable'] else 'NOT deployable'}: {report['gate']['reason']}")
    return "\n".join(lines)
