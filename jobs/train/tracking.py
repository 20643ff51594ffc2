"""Experiment tracking in MLflow: one MLflow run per training run.

The driver opens the run and records what reproduces it (the config, the data manifest, the code
version); rank 0 of the training workers logs the step metrics into the same run by id; the
pipeline adds the evaluation. Without `tracking.uri` the store is an embedded SQLite file under
`<storage_root>/mlflow/` (MLflow's plain-file store is deprecated); point `tracking.uri` at a
tracking server (http://...) on a real cluster.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import time
from pathlib import Path

from jobs.config import RunConfig

SOURCE_PACKAGES = ("cluster", "jobs", "serving")
REPO = Path(__file__).resolve().parents[2]


def tracking_uri(cfg: RunConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    folder = Path(cfg.storage_root).expanduser().resolve() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def code_version() -> dict:
    """The git commit where there is one (else the installed package's version), and always a hash
    of the source as it ran: a job submitted with `--working-dir` runs a copy without `.git`."""
    digest = hashlib.sha256()
    for path in sorted(p for package in SOURCE_PACKAGES for p in (REPO / package).rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    version = {"source_sha256": digest.hexdigest()}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *SOURCE_PACKAGES], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            version.update(git_commit=commit.stdout.strip(), git_dirty=bool(dirty.stdout.strip()))
    except (OSError, subprocess.TimeoutExpired):
        pass
    if "git_commit" not in version:
        try:
            version["package_version"] = importlib.metadata.version("lakeforge")
        except importlib.metadata.PackageNotFoundError:
            pass
    return version


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def start_run(cfg: RunConfig, manifest: dict, task_manifests: dict[str, dict] | None = None) -> tuple[str, str]:
    """Create the MLflow run for a training run; returns (tracking URI, run id). `task_manifests`:
    the data manifests of a multi-task run's further tasks, by task name."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        # Artifacts beside the store, not in ./mlruns of whatever directory the job started in.
        artifacts = Path(cfg.storage_root).expanduser().resolve() / "mlflow" / "artifacts"
        experiment_id = client.create_experiment(
            cfg.tracking.experiment, artifact_location=None if cfg.tracking.uri else artifacts.as_uri())
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"lakeforge.run": cfg.name, "lakeforge.method": cfg.train.method})
    run_id = run.info.run_id
    # MLflow params are short strings; the whole config is also logged as a JSON artifact.
    for key, value in _flatten(cfg.model_dump()).items():
        client.log_param(run_id, key, str(value)[:500])
    client.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")
    client.log_dict(run_id, manifest, "data_manifest.json")
    for name, task_manifest in (task_manifests or {}).items():
        client.log_dict(run_id, task_manifest, f"data_manifest_{name}.json")
    client.log_dict(run_id, code_version(), "code_version.json")
    return uri, run_id


class MetricLogger:
    """Logs step metrics into an existing run (used by rank 0 inside the training workers)."""

    def __init__(self, uri: str | None, run_id: str | None):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(uri) if run_id else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])

    def finish(self, status: str = "FINISHED") -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)
