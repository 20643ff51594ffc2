import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.contracts import EndpointSettings
from jobs.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(RunConfig, path)
    assert cfg.name
    # Every shipped config says how to launch it, on top.
    assert "python -m jobs." in path.read_text().split("\nname:")[0]


def test_every_config_field_is_described():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)
    walk(RunConfig)
    walk(EndpointSettings)


def test_overrides_are_parsed_as_yaml_and_nested():
    cfg = load_config(RunConfig, SHIPPED[0], ["train.max_steps=7", "train.use_gpu=true", "data.labels=[a, b]",
                                              "serve.endpoint.port=9001"])
    assert cfg.train.max_steps == 7 and cfg.train.use_gpu is True
    assert cfg.data.labels == ["a", "b"] and cfg.serve.endpoint.port == 9001


@pytest.mark.parametrize("override, named", [
    ("train.zero_stag=2", "train.zero_stag: unknown key"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("serve.endpoint.port=http", "serve.endpoint.port"),
    ("data.labels=[a, a]", "data.labels"),
    ("train.warmup_steps=500", "warmup_steps (500) must be smaller than max_steps"),
    ("nam=x", "nam: unknown key"),
    ("storage_root=s3://bucket/runs", "storage_root must be a filesystem path"),
    ("train.worker_resources={CPU: 2}", "set CPUs with cpus_per_worker"),
    ("train.placement_strategy=RANDOM", "train.placement_strategy"),
])
def test_bad_keys_and_values_are_named(override, named):
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, SHIPPED[0], [override])
    assert named in str(error.value)


def test_missing_file_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, "configs/nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(RunConfig, None, ["train.max_steps"])


def test_cli_rejects_a_bad_config_with_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--config", str(SHIPPED[0]), "train.zero_stag=2"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["config error: invalid config: train.zero_stag: unknown key"]
