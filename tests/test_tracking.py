import importlib.metadata
import json

import pytest

from cluster.config import load_config
from jobs.config import RunConfig
from tests.conftest import SHIPPED_CONFIG


def test_a_run_records_what_reproduces_it_and_its_metrics(tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs.train.tracking import MetricLogger, start_run

    cfg = load_config(RunConfig, SHIPPED_CONFIG, [f"storage_root={tmp_path}", "train.method=lora", "train.trainable_layers=null", "train.freeze_embeddings=false"])
    manifest = {"identity": {"source_sha256": "abc"}, "counts": {"kept": 10}}
    uri, run_id = start_run(cfg, manifest)
    assert uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"

    logger = MetricLogger(uri, run_id)
    logger.log({"train_loss": 2.0, "mfu": 0.1}, step=1)
    logger.log({"train_loss": 1.5}, step=2)
    logger.finish()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["lakeforge.method"] == "lora"
    assert run.data.params["train.method"] == "lora" and run.data.params["train.lora.rank"] == "16"
    assert [m.value for m in client.get_metric_history(run_id, "train_loss")] == [2.0, 1.5]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"config.json", "data_manifest.json", "code_version.json"}
    local = client.download_artifacts(run_id, "data_manifest.json", str(tmp_path / "download"))
    assert json.loads(open(local).read()) == manifest
    assert str(tmp_path / "mlflow" / "artifacts") in run.info.artifact_uri  # not ./mlruns of the cwd


def test_code_version_names_the_commit_and_hashes_the_source(tmp_path, monkeypatch):
    from jobs.train import tracking
    from jobs.train.tracking import code_version

    version = code_version()
    assert len(version["source_sha256"]) == 64 and len(version["git_commit"]) == 40  # this checkout

    # A job's working-dir copy has no .git: the source hash alone still tells two versions apart.
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(tracking, "REPO", tmp_path)
    first = code_version()
    assert "git_commit" not in first and first["package_version"] == importlib.metadata.version("lakeforge")  # then the package's
    (tmp_path / "jobs" / "a.py").write_text("x = 2\n")
    assert code_version()["source_sha256"] != first["source_sha256"]


@pytest.mark.parametrize("uri", [None, "sqlite"])
def test_metric_logger_without_a_run_logs_nothing(tmp_path, monkeypatch, uri):
    """Other ranks, or tracking disabled: no MLflow client is made or called, no store appears."""
    import mlflow
    import mlflow.tracking

    from jobs.train.tracking import MetricLogger

    touched = []

    class RecordingClient:
        def __init__(self, *args, **kwargs):
            touched.append(("MlflowClient", args, kwargs))

        def __getattr__(self, name):
            touched.append(name)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", RecordingClient)
    monkeypatch.setattr(mlflow, "MlflowClient", RecordingClient)
    # Any MLflow default store (./mlruns, ./mlflow.db) would appear in this empty folder.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    logger = MetricLogger(f"sqlite:///{store / 'mlflow.db'}" if uri else None, None)
    logger.log({"x": 1.0}, step=1)
    logger.finish()
    logger.finish("FAILED")
    assert touched == []
    assert list(tmp_path.iterdir()) == []
