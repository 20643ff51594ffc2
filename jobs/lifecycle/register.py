"""A trained and evaluated model registered as a version: its metrics, the gate's decision, its
lineage (sources to evaluation) and its HTML report. The pipeline and retraining register alike."""

from __future__ import annotations

from pathlib import Path

from cluster.registry import ModelRegistry, file_sha256
from jobs.config import RunConfig
from jobs.evaluation.report import SYSTEMS, task_reports, write_report
from jobs.evaluation.run import headline_metrics
from jobs.train.tracking import MetricLogger, code_version


def register_run(cfg: RunConfig, registry: ModelRegistry, training: dict, report: dict, explanations: dict | None, *,
                 sources: dict, manifest_path: Path, counts: dict, parent: dict | None,
                 **more_lineage) -> tuple[dict, Path]:
    """Log the test metrics and the gate to the training's MLflow run, register `training`'s model with
    `report`'s gate, write the version's report.html; returns the version's entry and the report's path.
    `sources` are the fingerprints of the sources the training data came from, `manifest_path` its
    data manifest (with `counts`), `parent` the version it was compared with (None: the first);
    `more_lineage` is recorded beside the rest (retraining's rows)."""
    MetricLogger(training["tracking"]["uri"], training["tracking"]["run_id"]).log({
        **{f"test_{metric}": value for metric, value in headline_metrics(report, "fine_tuned").items()},
        **{f"test_{metric}/{task['task_name']}": value for task in task_reports(report)[1:]
           for metric, value in headline_metrics(task, "fine_tuned").items()},
        "gate_deployable": float(report["gate"]["deployable"])}, training["best_step"])
    version = registry.register(
        training["model_dir"], gate=report["gate"], run=cfg.name,
        metrics={**headline_metrics(report, "fine_tuned"), "compared_with": report["models"]},
        attachments=[cfg.run_dir / "evaluation.json", cfg.run_dir / "explanations.json"],
        # What `python -m jobs.lineage` shows: the chain from the source files to this version.
        lineage={
            "sources": sources,
            "data_manifest": {"path": str(manifest_path), "sha256": file_sha256(manifest_path), "counts": counts},
            "run_config": cfg.model_dump(mode="json"),  # secrets (the PII salt) as fingerprints
            "code_version": code_version(),
            "parent_version": parent["version"] if parent else None,
            "training": {"tracking": training["tracking"], "model_dir": training["model_dir"],
                         "checkpoint_uri": training["checkpoint_uri"], "best_step": training["best_step"],
                         "best_val_loss": training["best_val_loss"]},
            "evaluation": {"test_examples": report["test_examples"], "gate": report["gate"],
                           "systems": {system: headline_metrics(report, system) for system in SYSTEMS if system in report}},
            **more_lineage,
        })
    report_path = write_report(Path(version["path"]) / "report.html", report, explanations, version,
                               learning_curve=training["learning_curve"])
    version = registry.attach(version["version"], report_path)  # so its files check includes the report
    print(f"[registry] registered {registry.name} {version['version']} "
          f"({'deployable' if version['deployable'] else 'not deployable'}); report: {report_path}")
    return version, report_path
