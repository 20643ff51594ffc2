"""The evaluation run: every system (fine-tuned, current version, base zero-shot, a TF-IDF baseline)
on the same held-out rows, with intervals and the promotion gate; slices and errors for
classification, side-by-side answers for generative runs (instruction, chat). Training and checkpoint
selection never saw these rows, so paired bootstrap intervals compare the systems honestly.

A multi-task run evaluates every task on its own test split, each by its kind: the primary task as
a single-task run is, each further task (`tasks[]`) the same way with its own labels and with the
prompt its own shards were templated with. The gate is the primary task's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from cluster.encryption import EncryptionSettings
from cluster.storage import path_inside
from jobs.config import DataSection, EvalSection, FormatChecks, RunConfig
from jobs.data.prepare import task_data_dirs
from jobs.data.split import pinned_test_rows, read_test_keys, split_dataset
from jobs.evaluation.analysis import answer_examples, error_analysis, slice_metrics
from jobs.evaluation.baseline import evaluate_baseline, retrieval_baseline
from jobs.evaluation.gate import promotion_gate
from jobs.evaluation.generation import generate_answers
from jobs.evaluation.metrics import (GENERATIVE_METRICS, answer_perplexity, bootstrap_intervals, classification_metrics,
                                     format_check_results, generation_metrics, generative_metrics, paired_bootstrap,
                                     reference_scores)
from jobs.evaluation.report import METRIC_NAMES, RETRIEVAL_BASELINE, SYSTEMS, task_reports
from jobs.evaluation.scoring import evaluate_llm


def run_evaluation(cfg: RunConfig, base_dir: Path, data_dir: Path, finetuned_dir: Path | None,
                   previous_dir: Path | None = None) -> tuple[dict, dict]:
    """Metrics of every system on the same test rows and (with a fine-tuned model) the promotion gate;
    for classification also error analysis and slices, for generative runs (instruction, chat) the
    best and worst answers side by side. Writes evaluation.json and per-example predictions.

    Returns the primary task's report and predictions; a multi-task run's report holds every further
    task's report under `further_tasks` (by task name), its predictions in
    `<run>/task_predictions/<task>/`."""
    llms = {"fine_tuned": finetuned_dir, "previous_version": previous_dir, "base_zero_shot": base_dir}
    report, predictions = evaluate_task(cfg.data, cfg.eval, data_dir, llms, cfg.run_dir / "predictions",
                                        cfg.eval.test_keys, cfg.eval.format_checks, cfg.security.encryption)
    if finetuned_dir is not None:
        gate_metric = cfg.eval.gate_metric if cfg.data.task == "classification" else cfg.eval.generative_metric
        report["gate"] = promotion_gate(report["bootstrap"], gate_metric, cfg.eval.gate_min_improvement)
    if cfg.tasks:
        # Which config section each task's prompt (its shards' template) and labels come from: the
        # model folder's lakeforge_model.json records the primary task's, the ones serving applies.
        report.update(task_name=cfg.primary_task.name, prompt_and_labels_from="data", system_prompt=cfg.data.system_prompt)
        folders = task_data_dirs(cfg)
        report["further_tasks"] = {}
        for index, task in enumerate(cfg.tasks):
            # The pinned test keys and the format checks are the primary task's (the gate's) settings.
            further, _ = evaluate_task(task.data, cfg.eval, folders[task.name], llms,
                                       path_inside(cfg.run_dir / "task_predictions", task.name), None, FormatChecks(),
                                       cfg.security.encryption)
            report["further_tasks"][task.name] = {"task_name": task.name, "prompt_and_labels_from": f"tasks[{index}].data",
                                                  "system_prompt": task.data.system_prompt, **further}
    (cfg.run_dir / "evaluation.json").write_text(json.dumps(report, indent=2))
    print("\n".join(format_table(task) for task in task_reports(report)))
    return report, predictions


def evaluate_task(data: DataSection, settings: EvalSection, data_dir: Path, llms: dict[str, Path | None],
                  predictions_dir: Path, test_keys: str | None, format_checks: FormatChecks,
                  encryption: EncryptionSettings | None) -> tuple[dict, dict]:
    """One task's report (its kind's metrics of every system, with intervals) and per-row predictions,
    written to `predictions_dir`. The prompts are the task's shard tokens, templated with its own
    `data` (system prompt, template); a classification task is scored on its own `data.labels`."""
    test_rows, predictions = task_predictions(data, settings, data_dir, llms, test_keys, encryption)
    generative = data.task != "classification"
    keys = sorted(test_rows["key"])
    report = {"task": data.task, "test_examples": len(test_rows), **({} if generative else {"labels": data.labels}),
              "test_keys_pinned": bool(test_keys),
              "test_keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
              "models": {system: str(path) for system, path in llms.items() if path is not None}}
    if generative:
        for system, frame in predictions.items():
            if frame["key"].tolist() != test_rows["key"].tolist():
                raise RuntimeError(f"{system}: its answers are not for the test rows in key order")
            answers = frame["generated"].tolist()
            predictions[system] = frame = frame.join(reference_scores(answers, frame["label"].tolist())).join(
                format_check_results(answers, format_checks))
        metrics = [column for column in frame.columns if column in GENERATIVE_METRICS or column.startswith("format_")]
        for system, frame in predictions.items():
            report[system] = generative_metrics(frame, metrics)
        report["bootstrap"] = paired_bootstrap(len(test_rows), {
            system: {metric: lambda rows, scores=frame[metric].to_numpy(): float(scores[rows].mean()) for metric in metrics}
            for system, frame in predictions.items()})
        if "fine_tuned" in predictions:
            report["examples"] = answer_examples(predictions, settings.generative_metric, settings.side_by_side_examples)
    else:
        labels = data.labels
        for system, frame in predictions.items():
            report[system] = classification_metrics(frame["label_id"], frame["pred_id"], labels, frame["confidence"])
            if system in llms:
                report[system]["generation"] = generation_metrics(frame, labels)
        y_true = next(iter(predictions.values()))["label_id"].to_numpy()
        report["bootstrap"] = bootstrap_intervals(y_true, {name: frame["pred_id"].to_numpy() for name, frame in predictions.items()}, labels)
        report["slices"] = slice_metrics(predictions, labels, settings.terms)
        if "fine_tuned" in predictions:
            report["errors"] = error_analysis(predictions["fine_tuned"], labels, settings.worst_errors)
    for system in llms:
        if system in predictions:
            report[system]["answer_perplexity"] = answer_perplexity(predictions[system])
    predictions_dir.mkdir(parents=True, exist_ok=True)
    for system, frame in predictions.items():
        frame.to_parquet(predictions_dir / f"{system}.parquet")
    return report, predictions


def task_predictions(data: DataSection, settings: EvalSection, data_dir: Path, llms: dict[str, Path | None],
                     test_keys: str | None, encryption: EncryptionSettings | None) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """A task's test rows (the pinned ones, or a uniform sample of max_test_examples) and every system's
    per-row predictions on them: each LLM given, fine-tuned first (so paired differences read
    "fine_tuned - other"), then the task kind's classical baseline. `encryption`: the run's
    settings, to read shards the data job encrypted."""
    if test_keys:
        test = pinned_test_rows(data_dir, read_test_keys(test_keys), encryption)
    else:
        test = split_dataset(data_dir, "test", encryption)
        if settings.max_test_examples:
            test = test.limit(settings.max_test_examples)  # shards are in hash order: a uniform sample
        test = test.materialize()
    generative = data.task != "classification"
    predictions = {}
    for system, model_dir in llms.items():
        if model_dir is not None:
            predictions[system] = (generate_answers(model_dir, test, settings) if generative
                                   else evaluate_llm(model_dir, test, data.labels, settings))
    columns = [column for column in ("key", "text", "label", "label_id", "source") if column in test.schema().names]
    test_rows = test.select_columns(columns).to_pandas()
    if generative:
        train = split_dataset(data_dir, "train", encryption).select_columns(["text", "label"]).to_pandas()
        test_rows = test_rows.sort_values("key", ignore_index=True)  # the LLMs' rows are in key order too
        predictions[RETRIEVAL_BASELINE] = test_rows.assign(
            generated=retrieval_baseline(train["text"], train["label"], test_rows["text"]))
    else:
        predictions["baseline_tfidf_logreg"] = evaluate_baseline(data_dir, test_rows.drop(columns="key"), len(data.labels), encryption)
    return test_rows, predictions


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
    task = f"task {report['task_name']} ({report['task']}): " if "task_name" in report else ""
    lines = [f"[evaluate] {task}held-out test split, {report['test_examples']} examples, "
             f"{report['bootstrap']['level']:.0%} bootstrap intervals",
             f"{'system':<26}" + "".join(f"{METRIC_NAMES.get(metric, metric):>24}" for metric in metrics)]
    for name in systems:
        values = headline_metrics(report, name)
        lines.append(f"{name:<26}" + "".join(
            f"{f'{values[key]:.3f} [{intervals[name][key][0]:.3f}, {intervals[name][key][1]:.3f}]':>24}" for key in metrics))
    if "gate" in report:
        lines.append(f"[gate] {'DEPLOYABLE' if report['gate']['deployable'] else 'NOT deployable'}: {report['gate']['reason']}")
    return "\n".join(lines)
