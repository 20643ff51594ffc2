"""jobs.deploy: which registered version gets deployed (fast), and a real deploy of the tiny model."""

from __future__ import annotations

import json

import pytest
import requests

from cluster.config import load_config
from cluster.registry import ModelRegistry
from jobs.deploy import DeployConfig, DeployError, resolve_version
from tests.conftest import REPO

DEPLOY_PORT = 8151  # not TEST_SERVE_PORT: other tests' endpoints may run beside this one


def _register(registry: ModelRegistry, model_dir, deployable: bool) -> dict:
    gate = {"deployable": deployable, "reason": "passed" if deployable else "macro_f1 gain below the minimum"}
    return registry.register(model_dir, gate, metrics={"macro_f1": 0.5}, run="test")


@pytest.fixture
def registry_with_versions(tmp_path):
    """v0001 deployable, v0002 rejected by the gate: v0001 stays current."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    registry = ModelRegistry(tmp_path, "m")
    _register(registry, model_dir, True)
    _register(registry, model_dir, False)
    return tmp_path


def _config(root, *overrides: str) -> DeployConfig:
    return load_config(DeployConfig, REPO / "configs" / "deploy.yaml", ["name=m", f"storage_root={root}", *overrides])


def test_current_version_is_deployed_by_default(registry_with_versions):
    assert resolve_version(_config(registry_with_versions))["version"] == "v0001"
    assert resolve_version(_config(registry_with_versions, "version=v0001"))["version"] == "v0001"


def test_rejected_version_needs_force(registry_with_versions):
    with pytest.raises(DeployError, match="v0002 is not deployable.*gain below the minimum.*force=true"):
        resolve_version(_config(registry_with_versions, "version=v0002"))
    assert resolve_version(_config(registry_with_versions, "version=v0002", "force=true"))["version"] == "v0002"


def test_unknown_version_and_empty_registry_are_named(registry_with_versions, tmp_path):
    with pytest.raises(DeployError, match="no version 'v0009'.*v0001, v0002"):
        resolve_version(_config(registry_with_versions, "version=v0009"))
    with pytest.raises(DeployError, match="no deployable version"):
        resolve_version(_config(tmp_path / "empty"))


def test_cli_refuses_a_rejected_version_with_one_line_and_exit_2(registry_with_versions, capsys):
    from jobs.deploy import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(REPO / "configs" / "deploy.yaml"), "name=m", f"storage_root={registry_with_versions}",
              "version=v0002"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("deploy error: m v0002 is not deployable")


@pytest.mark.parametrize("version", ["v0001", "v0002"])
def test_a_version_whose_files_changed_is_refused_even_with_force(registry_with_versions, capsys, version):
    from jobs.deploy import main

    weights = ModelRegistry(registry_with_versions, "m").folder(version) / "config.json"
    weights.write_text('{"tampered": true}')
    with pytest.raises(DeployError, match=f"'m' {version}: its files differ.*changed: config.json"):
        resolve_version(_config(registry_with_versions, f"version={version}", "force=true"))
    with pytest.raises(SystemExit) as exit_info:  # before any cluster is started or joined
        main(["--config", str(REPO / "configs" / "deploy.yaml"), "name=m", f"storage_root={registry_with_versions}",
              f"version={version}", "force=true"])
    assert exit_info.value.code == 2 and "changed: config.json" in capsys.readouterr().err


@pytest.mark.integration
def test_deploy_job_serves_the_current_version(ray_cluster, tiny_model_dir, tmp_path, capsys):
    from ray import serve

    from jobs.deploy import main

    from cluster.security import new_api_key

    registry = ModelRegistry(tmp_path, "tiny")
    version = _register(registry, tiny_model_dir, True)
    app_name = "deploy-test"
    # The endpoint accepts only the keys its settings list (by digest): give it one admin key.
    key, record = new_api_key("deploy-test", ["admin"], "lakeforge")
    try:
        base_url = main(["--config", str(REPO / "configs" / "deploy.yaml"), "name=tiny", f"storage_root={tmp_path}",
                         f"endpoint.port={DEPLOY_PORT}", f"endpoint.app_name={app_name}", "endpoint.model_id=tiny-v1",
                         "endpoint.max_model_len=256", "endpoint.engine_overrides={enforce_eager: true}", f"endpoint.security.api_keys={json.dumps([record.model_dump()])}",
                         f"endpoint.security.audit.path={tmp_path / 'audit.jsonl'}"])
        assert f"tiny {version['version']} serving as model 'tiny-v1' at {base_url}/v1" in capsys.readouterr().out
        assert requests.get(f"{base_url}/v1/models", timeout=60).status_code == 401  # no key, no answer
        listed = requests.get(f"{base_url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=60).json()
        assert [model["id"] for model in listed["data"]] == ["tiny-v1"]
        assert serve.status().applications[app_name].status == "RUNNING"
    finally:
        serve.delete(app_name)
