"""The fine-tuning run on the driver: the training stream (balanced, or a task mixture), a Ray Train
TorchTrainer over `worker.train_loop_per_worker`, then the best checkpoint exported and verified."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from cluster.contracts import ModelArtifact, TextPreprocessing
from cluster.prompting import label_token_ids
from cluster.storage import filesystem_for, uri_of
from jobs.config import RunConfig
from jobs.data.balance import balanced_class_rows, balanced_sample
from jobs.data.mixtures import mixture_dataset, mixture_pass
from jobs.data.prepare import MANIFEST, task_data_dirs
from jobs.data.split import split_dataset
from jobs.train.export import EXPORT_TOLERANCE, HF_EXPORT_DIR, PROBE_FILE, export_model, verify_export
from jobs.train.tracking import MetricLogger, start_run
from jobs.train.worker import FAULT_MARKER, LEARNING_CURVE_FILE, PHASES, train_loop_per_worker

def label_first_token_ids(cfg: RunConfig, base_dir: Path) -> list[int] | None:
    """Each label's first token, for the validation macro-F1 of the learning curve; None when the
    task is not classification or two labels start with the same token."""
    if cfg.data.task != "classification":
        return None
    from transformers import AutoTokenizer

    firsts = [ids[0] for ids in label_token_ids(AutoTokenizer.from_pretrained(base_dir), cfg.data.labels)]
    return firsts if len(set(firsts)) == len(firsts) else None


def read_learning_curve(path: Path) -> list[dict]:
    """The validations of a run in step order; a step validated twice (a restart after a fault
    repeats the steps since its checkpoint) keeps its last line."""
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        point = json.loads(line)
        by_step[point["step"]] = point
    return [by_step[step] for step in sorted(by_step)]


@dataclass
class Streams:
    """What the workers train and validate on, and the task mixture when there is one."""
    train: ray.data.Dataset
    validation: ray.data.Dataset
    mixture: dict | None = None


def run_finetune(cfg: RunConfig, base_dir: Path, data_dir: Path) -> dict:
    """Train on the prepared shards; returns the training record (best step, losses, wall time)."""
    task_dirs = {**task_data_dirs(cfg), cfg.primary_task.name: data_dir}
    manifests = {name: json.loads((folder / MANIFEST).read_text()) for name, folder in task_dirs.items()}
    uri, run_id = (None, None)
    if cfg.tracking.enabled:
        further = {name: manifest for name, manifest in manifests.items() if name != cfg.primary_task.name}
        uri, run_id = start_run(cfg, manifests[cfg.primary_task.name], task_manifests=further)
        print(f"[finetune] tracking: MLflow run {run_id} at {uri}")
    streams = training_streams(cfg, task_dirs, manifests)
    trainer = build_trainer(cfg, base_dir, streams, list(task_dirs), uri, run_id)
    tracker = MetricLogger(uri, run_id)
    (cfg.run_dir / FAULT_MARKER).unlink(missing_ok=True)  # a fault drill fires once per run, not once ever
    if not cfg.train.resume_from:  # a hand restart continues its run's curve
        (cfg.run_dir / LEARNING_CURVE_FILE).unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except BaseException:
        tracker.finish("FAILED")
        raise
    wall_seconds = time.perf_counter() - started

    best_checkpoint, best_metrics = min(result.best_checkpoints, key=lambda pair: pair[1]["val_loss"])
    export_dir, export_diff = export_best(cfg, base_dir, best_checkpoint, best_metrics)
    tracker.log({"best_val_loss": best_metrics["val_loss"], "best_step": best_metrics["step"],
                 "export_max_abs_logit_diff": export_diff, "wall_seconds": wall_seconds}, best_metrics["step"])
    tracker.finish()
    print(f"[finetune] exported step {best_metrics['step']} (val loss {best_metrics['val_loss']:.4f}) to {export_dir}; "
          f"reload max |logit diff| {export_diff:.2e}")
    last = result.metrics  # the final report's metrics
    return {
        "model_dir": str(export_dir),
        "best_step": best_metrics["step"],
        "best_val_loss": best_metrics["val_loss"],
        "tokens_per_s": last["tokens_per_s"],
        # Without each attempt's first step (data pipeline start-up, optimizer state allocation).
        "steady_tokens_per_s": last["steady_tokens_per_s"],
        "first_batch_seconds": last["first_batch_seconds"],
        # Where the training seconds went (mean over workers): waiting for data, forward+backward, optimizer.
        "time_shares": {phase: last[f"{phase}_seconds"] / sum(last[f"{p}_seconds"] for p in PHASES) for phase in PHASES}
        if all(f"{phase}_seconds" in last for phase in PHASES) else None,
        "train_tokens": last["train_tokens"],
        "examples_seen": last["examples_seen"],
        "learning_curve": read_learning_curve(cfg.run_dir / LEARNING_CURVE_FILE),
        "history": [entry for _, entry in sorted(result.best_checkpoints, key=lambda pair: pair[1]["step"])],
        "wall_seconds": wall_seconds,
        "export_max_abs_logit_diff": export_diff,
        "checkpoint_path": best_checkpoint.path,
        "checkpoint_uri": uri_of(best_checkpoint.filesystem, best_checkpoint.path),  # for train.resume_from
        "final": {key: last[key] for key in (
            "step", "train_loss", "val_loss", "resumed_from_step", "non_padding_share", "worker_nodes")},
        "mfu": last["mfu"],
        "peak_memory_gib_max_worker": last["peak_memory_gib_max_worker"],
        "tracking": {"uri": uri, "run_id": run_id},
        # Multi-task runs: the planned mix, and what the workers really trained on per task up to the
        # last report; each history entry holds val_loss/<task>.
        "tasks": None if streams.mixture is None else {
            **streams.mixture, "train_examples_seen": {name: last[f"train_examples/{name}"] for name in task_dirs}},
        "settings": cfg.train.model_dump(),
    }


def training_streams(cfg: RunConfig, task_dirs: dict[str, Path], manifests: dict[str, dict]) -> Streams:
    """The primary task's train split (class-balanced when train.balance_classes) and up to
    max_validation_examples of its validation split; with further tasks, their weighted mixture."""
    train, primary = cfg.train, cfg.primary_task.name
    data_dir = task_dirs[primary]
    encryption = cfg.security.encryption
    streams = Streams(split_dataset(data_dir, "train", encryption),
                      split_dataset(data_dir, "validation", encryption).limit(train.max_validation_examples))
    if train.balance_classes:
        label_rows = manifests[primary]["splits"]["train"]["labels"]
        streams.train = balanced_sample(streams.train, label_rows, train.seed, train.balance_min_rows)
        print(f"[finetune] class-balanced training stream: about {balanced_class_rows(label_rows, train.balance_min_rows)} rows of each of {len(label_rows)} labels, "
              f"all rows of the smaller ones (train split {label_rows})")
    if not cfg.tasks:
        return streams
    # The examples max_steps optimizer steps consume, or one pass of the mixture when that is
    # fewer (every task's rows at least once; the training loop repeats the stream), each task
    # its weighted share; validation: up to max_validation_examples of every task, tagged with its task id.
    task_names = list(task_dirs)
    rows = [manifests[name]["splits"]["train"]["rows"] for name in task_names]
    weights = [weight for _, weight in cfg.mixture()]
    budget = train.max_steps * train.micro_batch_size * train.gradient_accumulation_steps * train.num_workers
    examples = min(budget, mixture_pass(weights, rows))
    streams.train, counts = mixture_dataset(
        [split_dataset(folder, "train", encryption) for folder in task_dirs.values()], rows, weights, examples, train.seed)
    first, *further = [
        split_dataset(folder, "validation", encryption).limit(train.max_validation_examples).map_batches(
            lambda batch, task_id=task_id: batch.assign(task_id=task_id), batch_format="pandas")
        for task_id, folder in enumerate(task_dirs.values())]
    streams.validation = first.union(*further)
    streams.mixture = {"weights": dict(cfg.mixture()), "train_rows": dict(zip(task_names, rows)),
                       "planned_examples": dict(zip(task_names, counts)), "budget_examples": budget}
    print(f"[finetune] task mixture: {streams.mixture['planned_examples']} examples of {examples}"
          + (f" (one pass of the mixture, repeated as the run needs: max_steps would consume {budget})" if examples < budget else ""))
    return streams


def build_trainer(cfg: RunConfig, base_dir: Path, streams: Streams, task_names: list[str], uri: str | None, run_id: str | None):
    """A TorchTrainer of train.num_workers workers over the streams, checkpointing to
    train.checkpoint_storage (or the run folder) and keeping the best by validation loss."""
    import ray.train
    from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = cfg.train
    # The filesystem objects travel to the Train controller and workers (other processes, other
    # nodes) without credentials: each resolves its own node's (see cluster.storage.filesystem_for).
    storage_fs, storage_path = filesystem_for(train.checkpoint_storage or str(cfg.run_dir / "ray_train"))
    resume = None
    if train.resume_from:
        resume_fs, resume_path = filesystem_for(train.resume_from)
        resume = Checkpoint(resume_path, filesystem=resume_fs)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": train.model_dump(), "base_model_dir": str(base_dir), "resume_checkpoint": resume,
                           "tracking_uri": uri, "tracking_run_id": run_id, "storage_dir": str(cfg.run_dir),
                           "task_names": task_names, "template": cfg.data.template,
                           "label_first_token_ids": label_first_token_ids(cfg, base_dir)},
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **train.worker_resources},
            placement_strategy=train.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        datasets={"train": streams.train, "validation": streams.validation},
        dataset_config=DataConfig(datasets_to_split=["train", "validation"]),
        run_config=ray.train.RunConfig(
            name=f"finetune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=train.keep_checkpoints, checkpoint_score_attribute="val_loss", checkpoint_score_order="min",
            ),
        ),
    )


def export_best(cfg: RunConfig, base_dir: Path, checkpoint, metrics: dict) -> tuple[Path, float]:
    """The best checkpoint as `<run>/model`, verified against its probe logits, with the model
    folder's record of labels, prompt and preprocessing (what serving applies to incoming text)."""
    export_dir = cfg.run_dir / "model"
    with checkpoint.as_directory() as folder:
        export_model(Path(folder) / HF_EXPORT_DIR, base_dir, export_dir)
        probe_logits = torch.load(Path(folder) / PROBE_FILE)
    # CPU workers keep fp32 weights whatever the precision (bf16 there is autocast, which the probe skips).
    export_diff = verify_export(export_dir, probe_logits, EXPORT_TOLERANCE[metrics["precision"] if cfg.train.use_gpu else "fp32"])
    ModelArtifact(
        name=cfg.serve.endpoint.model_id, base_model=cfg.model.base,
        # No labels: serving and batch inference answer freely (the labels field's default is the demo's).
        labels=cfg.data.labels if cfg.data.task == "classification" else [],
        system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len,
        # What the data stage did to every text before templating: clean_text, then the PII rules.
        preprocessing=TextPreprocessing(clean=True, pii=cfg.data.pii if cfg.data.pii.enabled else None),
    ).write(export_dir)
    return export_dir, export_diff
