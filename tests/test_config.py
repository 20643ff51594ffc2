import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, load_config, load_config_or_exit
from cluster.contracts import EndpointSettings
from cluster.security import ApiKeyRecord, JwtSettings, ModelAccess, RateLimit
from jobs.config import BatchInferConfig, MonitorConfig, RunConfig, SourceSection, TaskSection
from jobs.deploy import DeployConfig
from serving.queue_consumer import ConsumerSettings
from tests.conftest import SHIPPED_CONFIG, config_models, undescribed_fields, write_new_dataset_config

REPO = Path(__file__).resolve().parents[1]
# Every shipped config is validated by the model of what reads it: serve.yaml is Ray's own
# Serve schema (tests/test_serve_config.py), monitoring/alerts.yaml Prometheus's rules
# (tests/test_monitoring.py); the rest by the job or app that reads them.
SCHEMAS = {"deploy.yaml": DeployConfig, "batch_infer": BatchInferConfig, "queue_consumer": ConsumerSettings,
           "monitoring": MonitorConfig}
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.name not in ("serve.yaml", "alerts.yaml"))
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


# The recipe measured on the demo (README, "Does fine-tuning beat the baseline?"): the run config's
# defaults, so a new dataset gets it without copying anything from configs/airline_sentiment.yaml.
RECIPE = {
    "data.template": "compact", "data.validation_fraction": 0.05, "data.test_fraction": 0.10, "data.max_seq_len": 256,
    "train.zero_stage": 1, "train.trainable_layers": 10, "train.freeze_embeddings": True, "train.freeze_layers": 0,
    "train.label_loss_weight": 1.0, "train.balance_classes": True, "train.micro_batch_size": 16,
    "train.gradient_accumulation_steps": 1, "train.learning_rate": 3e-4, "train.lr_schedule": "constant",
    "train.warmup_steps": 10, "train.max_steps": 100_000, "train.max_train_seconds": 720, "train.eval_every": 50,
    "train.max_validation_examples": 256, "eval.max_test_examples": 600, "eval.batch_size": 16,
    "explain.examples": 6, "explain.dependence_examples": 8, "explain.ig_steps": 32, "serve.enabled": True,
    "serve.check_examples": 8, "serve.endpoint.max_model_len": 512, "serve.endpoint.cpu_kv_cache_gib": 1,
    "serve.endpoint.port": 8000,
}
# What is specific to a dataset: the only keys the shipped demo config sets.
DATASET_KEYS = {"name", "data.source", "data.text_column", "data.label_column", "data.labels", "data.system_prompt",
                "data.pii.allow_handles", "eval.test_keys", "serve.endpoint.model_id"}


def dotted(cfg, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    return {key for name, value in tree.items()
            for key in (flat_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}"})}


def test_a_new_dataset_needs_only_its_source_columns_labels_and_prompt(tmp_path):
    path = write_new_dataset_config(tmp_path)
    assert flat_keys(yaml.safe_load(path.read_text())) == {
        "name", "data.source", "data.text_column", "data.label_column", "data.labels", "data.system_prompt"}
    cfg = load_config_or_exit(RunConfig, ["--config", str(path)])  # as every job reads --config
    assert {key: dotted(cfg, key) for key in RECIPE} == RECIPE
    source, = cfg.data.resolved_sources()
    assert source.kind == "csv" and Path(source.path).is_file()
    assert cfg.data.column_map(source) == {"text": "message", "label": "intent"}
    assert cfg.data.labels == ["billing", "delivery", "account"] and cfg.data.task == "classification"
    # The demo runs the same recipe: its config sets only what is specific to its data.
    shipped = load_config(RunConfig, SHIPPED_CONFIG)
    assert flat_keys(yaml.safe_load(SHIPPED_CONFIG.read_text())) <= DATASET_KEYS
    assert {key: dotted(shipped, key) for key in RECIPE} == RECIPE
    specific = {"name": True, "data": {"source", "text_column", "label_column", "labels", "system_prompt", "pii"},
                "eval": {"test_keys"}, "serve": {"endpoint": {"model_id"}}}
    assert cfg.model_dump(exclude=specific) == shipped.model_dump(exclude=specific)


@pytest.mark.parametrize("overrides, expected", [
    # The recipe's layer freezing is for full fine-tuning from the bottom up: LoRA or freeze_layers turn it off.
    (["train.method=lora"], {"train.trainable_layers": None, "train.freeze_embeddings": False}),
    (["train.freeze_layers=4"], {"train.freeze_layers": 4, "train.trainable_layers": None, "train.freeze_embeddings": False}),
    (["train.freeze_layers=4", "train.freeze_embeddings=true"], {"train.trainable_layers": None, "train.freeze_embeddings": True}),
    (["train.trainable_layers=null"], {"train.trainable_layers": None, "train.freeze_embeddings": True}),
    (["train.trainable_layers=4"], {"train.trainable_layers": 4, "train.freeze_embeddings": True}),
    # Class balancing is for one classification task: a mixture or another task kind turns it off.
    (["tasks=[{name: qa, data: {task: instruction, source: qa.jsonl}}]"], {"train.balance_classes": False}),
    (["data.task=instruction"], {"train.balance_classes": False}),
    (["train.balance_classes=false"], {"train.balance_classes": False}),
    # A config that sets max_steps runs that many steps; the 12-minute budget is the default's.
    (["train.max_steps=500"], {"train.max_steps": 500, "train.max_train_seconds": None}),
    (["train.max_steps=500", "train.max_train_seconds=60"], {"train.max_steps": 500, "train.max_train_seconds": 60}),
    (["train.max_train_seconds=60"], {"train.max_steps": 100_000, "train.max_train_seconds": 60}),
    (["train.max_steps=500", "train.lr_schedule=cosine"], {"train.lr_schedule": "cosine", "train.max_train_seconds": None}),
    # The endpoint's context follows the trained length unless set.
    (["data.max_seq_len=1024"], {"serve.endpoint.max_model_len": 2048}),
    (["data.max_seq_len=1024", "serve.endpoint.max_model_len=1500"], {"serve.endpoint.max_model_len": 1500}),
])
def test_the_recipe_defaults_give_way_to_what_a_config_chooses(tmp_path, overrides, expected):
    cfg = load_config(RunConfig, write_new_dataset_config(tmp_path), overrides)
    assert {key: dotted(cfg, key) for key in expected} == expected
    # Resolved values validate again as given (a config dumped and reloaded, e.g. the summary's).
    assert RunConfig.model_validate(cfg.model_dump()) == cfg


@pytest.mark.parametrize("overrides, named", [
    (["train.method=lora", "train.trainable_layers=10"], "apply to method full"),
    (["train.method=lora", "train.freeze_embeddings=true"], "apply to method full"),
    (["train.freeze_layers=4", "train.trainable_layers=10"], "not both"),
    (["tasks=[{name: qa, data: {task: instruction, source: qa.jsonl}}]", "train.balance_classes=true"],
     "balance_classes needs a single classification task"),
    (["data.task=instruction", "train.balance_classes=true"], "balance_classes needs a single classification task"),
    (["train.lr_schedule=linear"], "decays to zero at max_steps: set max_steps"),
    (["train.max_steps=5"], "warmup_steps (10) must be smaller than max_steps (5)"),
])
def test_a_config_that_sets_what_contradicts_the_recipe_is_refused(tmp_path, overrides, named):
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, write_new_dataset_config(tmp_path), overrides)
    assert named in str(error.value)


def test_the_gpu_config_trains_every_weight_on_the_natural_mix_for_its_steps():
    """It relied on the defaults of before the recipe became them, and says so explicitly now."""
    gpu = load_config(RunConfig, REPO / "configs" / "airline_sentiment_gpu.yaml")
    train = gpu.train
    assert (train.trainable_layers, train.freeze_embeddings, train.freeze_layers, train.balance_classes) == (None, False, 0, False)
    assert (train.max_steps, train.max_train_seconds, train.lr_schedule) == (1000, None, "cosine")
    assert (gpu.explain.examples, gpu.explain.dependence_examples, gpu.explain.ig_steps) == (24, 64, 64)
    assert gpu.serve.endpoint.max_model_len == 512 and gpu.data.template == "compact"
