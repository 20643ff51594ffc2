"""Batch retraining: the current version trained further on new labelled rows, with a replayed
sample of the original training split against forgetting, then judged like any run.

1. New rows: the feedback joined with the prediction log (`rows`), written as a Parquet source
   `feedback`, and `retrain.new_sources`, prepared by the data stage with the run's own data
   settings: the same cleaning, PII rules, quarantine, dedup and split rule (a pure function of each
   row's text), so a new row whose text is in the original test split lands in the new test split
   too and is never trained on. Only the new rows' train split is trained on.
2. The training split: every new train row plus a seeded sample of `replay_fraction` of the original
   train rows, in one seeded shuffle (the multi-task mixture's machinery, `jobs.data.mixtures`);
   validation is the original validation split, so the checkpoint is chosen on the old distribution.
3. Training starts from the current version's model folder (`run_finetune` with it as the base).
4. The run's evaluation on the original held-out test split (the same rows and TF-IDF baseline the
   current version was judged on) and its gate against the current version; the same on the new
   rows' own test split (the recent feedback window), whose gate binds too once it has
   `feedback_gate_min_rows` rows; then the registry.

Works in `<storage_root>/<name>-retrain/` and registers under the run's own model name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ray

from cluster.registry import ModelRegistry
from jobs import base_models
from jobs.config import FEEDBACK_SOURCE, RunConfig, SourceSection
from jobs.data.mixtures import mixture_dataset
from jobs.data.prepare import MANIFEST, prepare, task_data_dirs
from jobs.data.split import split_dataset
from jobs.evaluation.run import run_evaluation
from jobs.lifecycle.register import register_run
from jobs.lifecycle.rows import labelled_rows
from jobs.train.run import run_finetune

RETRAIN_SUFFIX = "-retrain"


def new_sources(cfg: RunConfig, rows_dir: Path) -> tuple[list[SourceSection], dict]:
    """The sources of the new labelled rows: the labelled predictions (written to `rows_dir` as
    Parquet) and `retrain.new_sources`; with the counts of the feedback join. Fails, saying why,
    when there is nothing to train on."""
    settings = cfg.retrain
    if settings.monitoring_root is not None and cfg.data.task != "classification":
        raise ValueError(f"retrain.monitoring_root: feedback labels are label words, and this is a {cfg.data.task} "
                         "run; give its new rows as retrain.new_sources")
    labelled = labelled_rows(settings.monitoring_root, settings.feedback_tables, cfg.data.labels)
    for note in labelled.notes():
        print(f"[retrain] {note}")
    sources = list(settings.new_sources)
    if len(labelled.rows):
        rows_dir.mkdir(parents=True, exist_ok=True)
        path = rows_dir / "feedback.parquet"
        labelled.rows.to_parquet(path, index=False)
        sources.insert(0, SourceSection(name=FEEDBACK_SOURCE, path=str(path), columns={"text": "text", "label": "label"}))
    if not sources:
        if settings.monitoring_root is None:
            raise ValueError("nothing to retrain on: set retrain.monitoring_root (the feedback joined with the "
                             "prediction log) or retrain.new_sources (new labelled files)")
        why = "; ".join(labelled.notes()) or "no feedback was given"
        raise ValueError(f"nothing to retrain on: no labelled prediction under {settings.monitoring_root} has its "
                         f"text ({why}), and retrain.new_sources is empty")
    return sources, labelled.counts


def build_training_split(cfg: RunConfig, new_dir: Path, original_dir: Path, out_dir: Path, new_manifest: dict,
                         original_manifest: dict) -> dict:
    """`out_dir`'s train split (every new train row and the replayed sample, shuffled together) and
    validation split (the original's), with the manifest `run_finetune` reads; returns the manifest."""
    new_rows = new_manifest["splits"]["train"]["rows"]
    original_rows = original_manifest["splits"]["train"]["rows"]
    replayed = round(cfg.retrain.replay_fraction * original_rows)
    splits, rows, wanted = [split_dataset(new_dir, "train")], [new_rows], [new_rows]
    if replayed:
        splits.append(split_dataset(original_dir, "train"))
        rows.append(original_rows)
        wanted.append(replayed)
    # Weights equal to the wanted counts: every new row once, and a seeded sample of the original rows.
    mixed, counts = mixture_dataset(splits, rows, wanted, sum(wanted), cfg.retrain.seed)
    shutil.rmtree(out_dir, ignore_errors=True)
    mixed.drop_columns(["task_id"]).write_parquet(str(out_dir / "train"))
    shutil.copytree(original_dir / "validation", out_dir / "validation")
    written = ray.data.read_parquet(str(out_dir / "train"))
    labels = {row["label"]: int(row["count()"]) for row in written.groupby("label").count().take_all()}
    manifest = {
        "task": cfg.data.task, "new_data": str(new_dir), "original_data": str(original_dir),
        "counts": {"new_train_rows": counts[0], "replayed_rows": counts[1] if replayed else 0,
                   "original_train_rows": original_rows, "replay_fraction": cfg.retrain.replay_fraction,
                   "seed": cfg.retrain.seed, "new_data": new_manifest["counts"]},
        "splits": {"train": {"rows": written.count(), "labels": labels},
                   "validation": original_manifest["splits"]["validation"]},
    }
    if manifest["splits"]["train"]["rows"] != sum(counts):
        raise RuntimeError(f"the retraining split holds {manifest['splits']['train']['rows']} rows, not the "
                           f"{sum(counts)} planned ({counts})")
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def feedback_window(original_dir: Path, new_dir: Path, run_dir: Path) -> Path:
    """A data folder whose test split is the new rows' and whose train and validation splits are the
    original's (links, not copies), so the TF-IDF baseline is the one the current version faced."""
    folder = run_dir / "data"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for split, source in (("train", original_dir), ("validation", original_dir), ("test", new_dir)):
        (folder / split).symlink_to((source / split).resolve(), target_is_directory=True)
    return folder


def with_window_gate(test_gate: dict, window_gate: dict, rows: int, min_rows: int) -> dict:
    """The held-out test split's gate, deployable only if the feedback window's gate passes too when
    the window has `min_rows` rows (with fewer its verdict is recorded, not binding)."""
    binding = rows >= min_rows
    note = "" if binding else f", fewer than {min_rows}: reported, not gating"
    return {**test_gate, "deployable": test_gate["deployable"] and (window_gate["deployable"] or not binding),
            "feedback_window": {**window_gate, "rows": rows, "binding": binding},
            "reason": f"{test_gate['reason']}; on the new rows' test split ({rows} rows{note}): {window_gate['reason']}"}


def run_retrain(cfg: RunConfig) -> dict:
    """New rows, the replayed sample, training from the current version, evaluation and gate against
    it on the original test split, registration; writes `<name>-retrain/retrain.json` and returns it."""
    if cfg.tasks:
        raise ValueError("jobs.retrain continues a single-task run; this run mixes further tasks (tasks), which "
                         "retraining does not support")
    if cfg.security.encryption.enabled:
        # Its new rows and mixed split would be written in the clear beside the run's encrypted shards.
        raise ValueError("jobs.retrain does not support security.encryption yet: its new and mixed shards would be "
                         "written unencrypted; retrain with the pipeline (jobs.pipeline) on the new data instead")
    registry = ModelRegistry(cfg.storage_root, cfg.name)
    current = registry.current()
    if current is None:
        raise ValueError(f"model {cfg.name!r} has no current version in {registry.root}: retraining continues from "
                         "one; run the pipeline first")
    registry.check_files(current["version"])  # continue from the files the gate judged, nothing else
    original_dir = task_data_dirs(cfg)[cfg.primary_task.name]
    if not (original_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{original_dir} holds no prepared shards ({MANIFEST}): the replayed rows and the "
                                "held-out test split are the run's own; run the pipeline with this config first")
    original_manifest = json.loads((original_dir / MANIFEST).read_text())
    work = cfg.model_copy(update={"name": f"{cfg.name}{RETRAIN_SUFFIX}"})
    work.run_dir.mkdir(parents=True, exist_ok=True)
    sources, feedback_counts = new_sources(cfg, work.run_dir / "new_rows")
    base_dir = base_models.materialize(cfg.model.base, cfg.model_cache)
    # A sample of the run (limit_rows, sample_every) must not thin out the new rows.
    new_data = cfg.data.model_copy(update={"source": None, "sources": sources, "limit_rows": None, "sample_every": None})
    new_dir = work.run_dir / "new_data"
    new_manifest = prepare(new_data, base_dir, new_dir, optional_splits=("validation", "test"))
    data_dir = work.run_dir / "data"
    manifest = build_training_split(cfg, new_dir, original_dir, data_dir, new_manifest, original_manifest)
    print(f"[retrain] from {cfg.name} {current['version']}: {manifest['counts']['new_train_rows']} new rows "
          f"and {manifest['counts']['replayed_rows']} replayed of {manifest['counts']['original_train_rows']}")
    current_dir = Path(current["path"])
    training = run_finetune(work, current_dir, data_dir)
    report, _ = run_evaluation(work, base_dir, original_dir, finetuned_dir=Path(training["model_dir"]),
                               previous_dir=current_dir)
    window_rows = new_manifest["splits"]["test"]["rows"]
    if window_rows:  # the recent feedback window: the new rows' own held-out test split, whole
        window_cfg = cfg.model_copy(update={"name": f"{work.name}-window", "eval": cfg.eval.model_copy(
            update={"test_keys": None, "max_test_examples": None})})
        window_report, _ = run_evaluation(window_cfg, base_dir, feedback_window(original_dir, new_dir, window_cfg.run_dir),
                                          finetuned_dir=Path(training["model_dir"]), previous_dir=current_dir)
        report["gate"] = with_window_gate(report["gate"], window_report["gate"], window_rows,
                                          cfg.retrain.feedback_gate_min_rows)
        (work.run_dir / "evaluation.json").write_text(json.dumps(report, indent=2))  # the version's copy: both gates
    rows = {"feedback": feedback_counts, "train": manifest["counts"],
            "new_splits": {name: split["rows"] for name, split in new_manifest["splits"].items()}}
    version, report_path = register_run(
        work, registry, training, report, None,
        sources={**original_manifest["identity"]["sources"], **new_manifest["identity"]["sources"]},
        manifest_path=data_dir / MANIFEST, counts=manifest["counts"], parent=current, retrain=rows)
    summary = {"model": cfg.name, "from_version": current["version"], "version": version["version"],
               "deployable": version["deployable"], "gate": version["gate"], "report": str(report_path), "rows": rows,
               "training": {key: training[key] for key in ("best_step", "best_val_loss", "wall_seconds", "examples_seen")}}
    (work.run_dir / "retrain.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
