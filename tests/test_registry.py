import hashlib
import json
import os

import pytest

from cluster import registry as registry_module
from cluster.registry import ModelFilesChanged, ModelRegistry, RegistryLockTimeout


def _model_folder(path, weights: bytes):
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "config.json").write_text("{}")
    return path


def _gate(deployable: bool) -> dict:
    return {"deployable": deployable, "reason": "constructed", "metric": "macro_f1"}


def test_only_deployable_versions_become_current(tmp_path):
    registry = ModelRegistry(tmp_path, "sentiment")
    assert registry.current() is None and registry.versions() == []

    run_model = _model_folder(tmp_path / "run" / "model", b"weights-1")
    rejected = registry.register(run_model, _gate(False), metrics={"macro_f1": 0.3}, run="r1")
    assert rejected["version"] == "v0001" and registry.current() is None

    _model_folder(run_model, b"weights-2")
    promoted = registry.register(run_model, _gate(True), metrics={"macro_f1": 0.7}, run="r2")
    assert registry.current()["version"] == "v0002"

    registry.register(_model_folder(run_model, b"weights-3"), _gate(False), metrics={}, run="r3")
    assert registry.current()["version"] == "v0002"  # a rejected version never displaces the current one
    assert [v["version"] for v in registry.versions()] == ["v0001", "v0002", "v0003"]
    assert json.loads((registry.root / "index.json").read_text())["current"] == "v0002"
    assert registry.get("v0002")["metrics"] == {"macro_f1": 0.7}
    assert promoted["gate"]["deployable"] is True


def test_versions_are_copies_that_later_runs_cannot_change(tmp_path):
    registry = ModelRegistry(tmp_path, "m")
    run_model = _model_folder(tmp_path / "model", b"first")
    (tmp_path / "evaluation.json").write_text('{"accuracy": 1}')
    entry = registry.register(run_model, _gate(True), metrics={}, run="r",
                              attachments=[tmp_path / "evaluation.json", tmp_path / "missing.json"])
    (run_model / "model.safetensors").write_bytes(b"overwritten by the next training run")
    version_dir = registry.root / entry["version"]
    assert (version_dir / "model.safetensors").read_bytes() == b"first"
    assert (version_dir / "evaluation.json").is_file() and not (version_dir / "missing.json").exists()


def test_unknown_version_is_named_in_the_error(tmp_path):
    registry = ModelRegistry(tmp_path, "m")
    registry.register(_model_folder(tmp_path / "model", b"w"), _gate(True), metrics={}, run="r")
    with pytest.raises(KeyError, match="no version 'v0009'.*v0001"):
        registry.get("v0009")


@pytest.mark.parametrize("name", ["..", "../../etc", "", "/abs"])
def test_a_model_name_cannot_leave_the_registry(tmp_path, name):
    with pytest.raises(ValueError, match="leads outside"):
        ModelRegistry(tmp_path, name)


def _register_many(root: str, model_dir: str, start, count: int) -> list[str]:
    start.wait()  # every process starts registering at the same moment
    registry = ModelRegistry(root, "concurrent")
    return [registry.register(model_dir, _gate(True), metrics={}, run=f"pid{os.getpid()}")["version"]
            for _ in range(count)]


def test_runs_registering_at_once_get_distinct_versions_and_none_is_lost(tmp_path):
    """Four processes register five versions each, all at once: 20 distinct versions, every one in
    the index with its own folder (without the lock they read the same index and overwrite each
    other's entries)."""
    import multiprocessing

    model_dir = _model_folder(tmp_path / "model", b"weights")
    context = multiprocessing.get_context("spawn")
    start = context.Manager().Barrier(4)
    with context.Pool(4) as pool:
        results = pool.starmap(_register_many, [(str(tmp_path), str(model_dir), start, 5)] * 4)
    versions = [version for result in results for version in result]
    registry = ModelRegistry(tmp_path, "concurrent")
    assert sorted(versions) == [f"v{n:04d}" for n in range(1, 21)]
    assert [entry["version"] for entry in registry.versions()] == [f"v{n:04d}" for n in range(1, 21)]
    assert all((registry.root / version / "model.safetensors").is_file() for version in versions)
    assert not list(registry.root.glob(".staging-*"))



def _record_many(root: str, start, count: int) -> None:
    start.wait()
    registry = ModelRegistry(root, "concurrent")
    for n in range(count):
        registry.record_deployment("v0001", url="http://127.0.0.1:8000/v1", model_id=f"pid{os.getpid()}-{n}",
                                   app_name="lakeforge", forced=False, by="test")


def test_deployments_recorded_at_once_are_all_kept(tmp_path):
    """Two processes each record 25 deployments of one version at once: all 50 stay in the index
    (without the lock each reads the index, appends its own and writes back over the other's)."""
    import multiprocessing

    ModelRegistry(tmp_path, "concurrent").register(_model_folder(tmp_path / "model", b"w"), _gate(True), metrics={}, run="r")
    context = multiprocessing.get_context("spawn")
    start = context.Manager().Barrier(2)
    with context.Pool(2) as pool:
        pool.starmap(_record_many, [(str(tmp_path), start, 25)] * 2)
    deployments = ModelRegistry(tmp_path, "concurrent").get("v0001")["deployments"]
    assert len({deployment["model_id"] for deployment in deployments}) == len(deployments) == 50


def test_a_registry_locked_too_long_is_named_in_the_error(tmp_path, monkeypatch):
    from filelock import FileLock

    registry = ModelRegistry(tmp_path, "m")
    registry.register(_model_folder(tmp_path / "model", b"w"), _gate(True), metrics={}, run="r")
    monkeypatch.setattr(registry_module, "LOCK_TIMEOUT_SECONDS", 0.2)
    with FileLock(registry.root / ".index.lock"):  # another holder: flock conflicts between open files
        with pytest.raises(RegistryLockTimeout, match=r"'m': the registry's lock .*\.index\.lock was held .* over 0.2 s"):
            registry.register(tmp_path / "model", _gate(True), metrics={}, run="r2")
        with pytest.raises(RegistryLockTimeout):
            registry.record_deployment("v0001", url="u", model_id="m", app_name="a", forced=False, by="test")
    assert [entry["version"] for entry in registry.versions()] == ["v0001"]
    assert not list(registry.root.glob(".staging-*"))  # the copy made before waiting is removed


LINEAGE = {"sources": {"tweets": {"/data/tweets.csv": {"sha256": "ab" * 32}}}, "parent_version": None}


def test_a_version_records_its_lineage_and_the_hash_of_every_file(tmp_path):
    registry = ModelRegistry(tmp_path, "m")
    run_model = _model_folder(tmp_path / "model", b"weights")
    (run_model / "tokenizer").mkdir()
    (run_model / "tokenizer" / "vocab.json").write_text("{}")
    (tmp_path / "evaluation.json").write_text('{"accuracy": 1}')
    entry = registry.register(run_model, _gate(True), metrics={}, run="r", lineage=LINEAGE,
                              attachments=[tmp_path / "evaluation.json"])
    assert entry["lineage"] == LINEAGE and entry["deployments"] == []
    assert entry["files"] == {
        "config.json": hashlib.sha256(b"{}").hexdigest(), "evaluation.json": hashlib.sha256(b'{"accuracy": 1}').hexdigest(),
        "model.safetensors": hashlib.sha256(b"weights").hexdigest(), "tokenizer/vocab.json": hashlib.sha256(b"{}").hexdigest()}
    assert registry.get("v0001") == entry and registry.check_files("v0001") == entry


@pytest.mark.parametrize("change, named", [
    (lambda folder: (folder / "model.safetensors").write_bytes(b"other weights"), "changed: model.safetensors"),
    (lambda folder: (folder / "config.json").unlink(), "missing: config.json"),
    (lambda folder: (folder / "adapter.bin").write_bytes(b"planted"), "not registered: adapter.bin"),
])
def test_a_file_changed_after_registration_is_named(tmp_path, change, named):
    registry = ModelRegistry(tmp_path, "m")
    registry.register(_model_folder(tmp_path / "model", b"weights"), _gate(True), metrics={}, run="r")
    change(registry.folder("v0001"))
    with pytest.raises(ModelFilesChanged, match=f"'m' v0001: its files differ.*{named}"):
        registry.check_files("v0001")


def test_a_file_written_after_registration_is_accepted_once_attached(tmp_path):
    registry = ModelRegistry(tmp_path, "m")
    registry.register(_model_folder(tmp_path / "model", b"weights"), _gate(True), metrics={}, run="r")
    report = registry.folder("v0001") / "report.html"
    report.write_text("<html></html>")
    with pytest.raises(ModelFilesChanged, match="not registered: report.html"):
        registry.check_files("v0001")
    assert registry.attach("v0001", report)["files"]["report.html"] == hashlib.sha256(b"<html></html>").hexdigest()
    registry.check_files("v0001")
    entry = registry.record_deployment("v0001", url="http://127.0.0.1:8000/v1", model_id="m", app_name="lakeforge",
                                       forced=False, by="test")
    assert registry.get("v0001")["deployments"] == entry["deployments"] and entry["deployments"][0]["model_id"] == "m"


@pytest.mark.parametrize("version", ["..", "../other", "/etc"])
def test_a_version_cannot_leave_the_registry(tmp_path, version):
    registry = ModelRegistry(tmp_path, "m")
    registry.register(_model_folder(tmp_path / "model", b"w"), _gate(True), metrics={}, run="r")
    for call in (registry.check_files, registry.folder, lambda v: registry.attach(v, tmp_path / "model" / "config.json")):
        with pytest.raises(ValueError, match="leads outside"):
            call(version)
