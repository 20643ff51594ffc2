"""jobs.lineage: a version's lineage as text and JSON, its files checked again, hostile names refused."""

import json

import pytest

from cluster.registry import ModelRegistry
from jobs import cli, lineage

LINEAGE = {
    "sources": {"tweets": {"/data/tweets.csv": {"sha256": "ab" * 32}}},
    "data_manifest": {"path": "/runs/r/data/manifest.json", "sha256": "cd" * 32, "counts": {"kept": 100}},
    "run_config": {"name": "r", "model": {}}, "code_version": {"source_sha256": "ef" * 32, "git_commit": "1" * 40, "git_dirty": False},
    "parent_version": "v0001",
    "training": {"tracking": {"uri": "sqlite:///m.db", "run_id": "run-7"}, "model_dir": "/runs/r/model",
                 "checkpoint_uri": "/runs/r/checkpoints/step_40", "best_step": 40, "best_val_loss": 0.12},
    "evaluation": {"test_examples": 200, "gate": {"deployable": True, "reason": "beats v0001"},
                   "systems": {"fine_tuned": {"accuracy": 0.9, "macro_f1": 0.88}, "base_zero_shot": {"accuracy": 0.5, "macro_f1": 0.4}}},
}


@pytest.fixture
def registry(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    registry = ModelRegistry(tmp_path, "sentiment")
    registry.register(model_dir, {"deployable": False, "reason": "first"}, metrics={}, run="r0")
    registry.register(model_dir, {"deployable": True, "reason": "beats v0001"}, metrics={}, run="r", lineage=LINEAGE)
    registry.record_deployment("v0002", url="http://127.0.0.1:8000/v1", model_id="sentiment", app_name="lakeforge",
                               forced=False, by="jobs.deploy")
    return registry


def run(registry, capsys, *args):
    code = lineage.main([registry.name, *args, "--storage-root", str(registry.root.parent.parent)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_chain_from_sources_to_the_endpoint(registry, capsys):
    code, out, _ = run(registry, capsys, "v0002")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("sentiment v0002 (registered ")
    order = ["source tweets:", "data manifest: /runs/r/data/manifest.json", "code: git 1111", "parent version: v0001",
             "training: MLflow run run-7", "evaluation on 200 held-out examples:", "promotion gate: deployable",
             "model version: ", "deployments: 1"]
    positions = [next(i for i, line in enumerate(lines) if line.strip().startswith(step)) for step in order]
    assert positions == sorted(positions)
    assert "    fine_tuned: accuracy 0.900, macro-F1 0.880" in lines
    assert lines[-1].strip().endswith("http://127.0.0.1:8000/v1 as model 'sentiment' (app lakeforge, by jobs.deploy)")


def test_json_holds_the_whole_record(registry, capsys):
    code, out, _ = run(registry, capsys, "v0002", "--json")
    record = json.loads(out)
    assert code == 0 and record["lineage"] == LINEAGE and list(record["files"]) == ["model.safetensors"]
    assert record["deployments"][0]["url"] == "http://127.0.0.1:8000/v1" and "files_check" not in record


def test_check_files_says_which_file_changed(registry, capsys):
    assert run(registry, capsys, "v0002", "--check-files")[1].count("files check: OK: 1 files match") == 1
    (registry.folder("v0002") / "model.safetensors").write_bytes(b"swapped")
    code, out, _ = run(registry, capsys, "v0002", "--check-files")
    assert code == 1 and "files check: CHANGED: " in out and "changed: model.safetensors" in out
    code, out, _ = run(registry, capsys, "v0002", "--check-files", "--json")
    assert code == 1 and json.loads(out)["files_check"]["changed"] == ["model.safetensors"]


def test_a_version_without_lineage_says_so(registry, capsys):
    code, out, _ = run(registry, capsys, "v0001")
    assert code == 0 and "no lineage recorded" in out and "deployments: none recorded" in out


@pytest.mark.parametrize("name, version, error", [
    ("..", "v0001", "leads outside"), ("sentiment", "..", "leads outside"), ("sentiment", "../../etc", "leads outside"),
    ("sentiment", "v0009", "no version 'v0009'"),
])
def test_hostile_or_unknown_names_are_refused(registry, capsys, name, version, error):
    code = lineage.main([name, version, "--storage-root", str(registry.root.parent.parent)])
    assert code == 2 and error in capsys.readouterr().err


def test_the_lakeforge_command_runs_it(registry, capsys):
    assert cli.main(["lineage", "sentiment", "v0002", "--storage-root", str(registry.root.parent.parent)]) == 0
    assert "source tweets:" in capsys.readouterr().out


def test_a_version_registered_before_hashing_is_refused_until_its_files_are_recorded(registry, capsys):
    """v0001 stands for a version registered before files were hashed: deploy's check refuses it and
    says how to record them; --record-files does once, and a second time is refused."""
    entry = registry.get("v0001")
    registry._update("v0001", lambda entry: entry.pop("files"))
    code, out, _ = run(registry, capsys, "v0001", "--check-files")
    assert code == 1 and "--record-files" in out and "not registered: model.safetensors" in out
    code, _, _ = run(registry, capsys, "v0001", "--record-files", "--check-files")
    assert code == 0 and registry.get("v0001")["files"] == entry["files"]
    code, _, err = run(registry, capsys, "v0001", "--record-files")
    assert code == 2 and "already has its files' hashes; they are not rewritten" in err
