import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.contracts import EndpointSettings
from cluster.security import ApiKeyRecord, JwtSettings, ModelAccess, RateLimit
from jobs.config import BatchInferConfig, RunConfig, SourceSection, TaskSection
from jobs.deploy import DeployConfig
from serving.queue_consumer import ConsumerSettings
from tests.conftest import config_models, undescribed_fields

REPO = Path(__file__).resolve().parents[1]
# Every shipped config is validated by the model of what reads it: serve.yaml is Ray's own
# Serve schema (tests/test_serve_config.py); the rest by the job or app that reads them.
SCHEMAS = {"deploy.yaml": DeployConfig, "batch_infer": BatchInferConfig, "queue_consumer": ConsumerSettings}
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.name != "serve.yaml")
RUN_CONFIGS = [p for p in SHIPPED if p.parent.name == "configs" and p.name not in SCHEMAS]


def schema_of(path: Path):
    return SCHEMAS.get(path.name) or SCHEMAS.get(path.parent.name) or RunConfig


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_validates(path):
    assert load_config(schema_of(path), path)
    # Every shipped config says how to launch it, on top.
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "python -m jobs." in header or "python -m serving." in header


def test_every_config_field_is_described():
    roots = (RunConfig, EndpointSettings, BatchInferConfig, ConsumerSettings, DeployConfig)
    # Models inside list[...], X | None and dict[str, ...] fields are walked too.
    assert {TaskSection, SourceSection, ApiKeyRecord, JwtSettings, ModelAccess, RateLimit} <= set(config_models(*roots))
    assert undescribed_fields(*roots) == []


def test_the_description_walk_reaches_models_behind_any_typing_wrapper():
    from typing import Annotated, Literal, Optional, Union

    from pydantic import BaseModel, Field

    def bare(name: str) -> type:
        return type(name, (BaseModel,), {"__annotations__": {"x": int}})

    a, b, c, d, e, f, g = (bare(name) for name in "ABCDEFG")

    class Root(BaseModel):
        listed: list[a] = Field(description=".")
        optional: Optional[b] = Field(description=".")
        either: b | c | None = Field(description=".")
        mapped: dict[str, list[d]] = Field(description=".")
        tagged: Annotated[Union[e, f], Field(description=".")]
        kind: Literal["x", "y"] = Field(description=".")
        plain: g = Field(description=".")

    assert config_models(Root) == [Root, a, b, c, d, e, f, g]
    assert undescribed_fields(Root) == [f"{model.__module__}.{model.__name__}.x" for model in (a, b, c, d, e, f, g)]


def test_overrides_are_parsed_as_yaml_and_nested():
    cfg = load_config(RunConfig, RUN_CONFIGS[0], ["train.max_steps=70", "train.use_gpu=true", "data.labels=[a, b]",
                                              "serve.endpoint.port=9001"])
    assert cfg.train.max_steps == 70 and cfg.train.use_gpu is True
    assert cfg.data.labels == ["a", "b"] and cfg.serve.endpoint.port == 9001


@pytest.mark.parametrize("override, named", [
    ("train.zero_stag=2", "train.zero_stag: unknown key"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("serve.endpoint.port=http", "serve.endpoint.port"),
    ("data.labels=[a, a]", "data.labels"),
    ("train.warmup_steps=200000", "warmup_steps (200000) must be smaller than max_steps"),
    ("nam=x", "nam: unknown key"),
    ("storage_root=s3://bucket/runs", "storage_root must be a filesystem path"),
    ("train.worker_resources={CPU: 2}", "set CPUs with cpus_per_worker"),
    ("train.placement_strategy=RANDOM", "train.placement_strategy"),
])
def test_bad_keys_and_values_are_named(override, named):
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, RUN_CONFIGS[0], [override])
    assert named in str(error.value)


def test_missing_file_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, "configs/nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(RunConfig, None, ["train.max_steps"])


def test_cli_rejects_a_bad_config_with_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--config", str(RUN_CONFIGS[0]), "train.zero_stag=2"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["config error: invalid config: train.zero_stag: unknown key"]



@pytest.mark.parametrize("model, overrides", [
    (RunConfig, ["name={}"]),
    (RunConfig, ["primary_task.name={}"]),
    (RunConfig, ["tasks=[{{name: '{}', data: {{}}}}]"]),
    (RunConfig, ["data.sources=[{{name: '{}', path: a.csv}}]"]),
    (DeployConfig, ["name={}"]),
], ids=["run", "primary_task", "task", "source", "deploy"])
@pytest.mark.parametrize("name", ["..", ".", "../other", "a/b", "/etc", ".hidden", "x" * 129],
                         ids=["dot-dot", "dot", "parent-path", "nested", "absolute", "hidden", "too-long"])
def test_names_that_become_folders_are_plain_path_segments(model, overrides, name):
    with pytest.raises(ConfigError, match="should match pattern"):
        load_config(model, None, [override.format(name) for override in overrides])
    assert load_config(model, None, [override.format("run_2.v1-a") for override in overrides])


def test_a_run_folder_outside_storage_root_is_refused(tmp_path):
    cfg = RunConfig(storage_root=str(tmp_path))
    assert cfg.run_dir == tmp_path.resolve() / "run"
    for name in ("..", "../elsewhere", ""):
        with pytest.raises(ValueError, match="leads outside"):
            cfg.model_copy(update={"name": name}).run_dir  # unvalidated, as a bypassed validator would leave it


def test_shipped_test_keys_are_well_formed_and_split_to_test():
    """The pinned test rows the demo and the GPU config score: 600 keys, each one a row the split
    function sends to test under the configs' own seed and fractions."""
    from jobs.data.split import assign_splits, read_test_keys, split_position

    pinned = [load_config(RunConfig, path) for path in RUN_CONFIGS]
    pinned = [cfg for cfg in pinned if cfg.eval.test_keys]
    assert {cfg.name for cfg in pinned} >= {"airline_sentiment", "airline_sentiment_gpu"}
    for cfg in pinned:
        keys = read_test_keys(Path(__file__).resolve().parents[1] / cfg.eval.test_keys)
        positions = [split_position(key, cfg.data.split_seed) for key in keys]
        assert len(keys) == 600 and set(assign_splits(positions, cfg.data.validation_fraction, cfg.data.test_fraction)) == {"test"}
