"""The quality bench's levers are valid run configs, cumulative, and end at the shipped recipe."""

from bench.quality_bench import LEVERS, REPO, lever_config
from cluster.config import load_config
from jobs.config import RunConfig


def test_levers_are_cumulative_valid_configs_from_the_old_demo_to_the_shipped_recipe():
    overrides = []
    configs = []
    for _, added in LEVERS.values():
        overrides += added
        cfg = lever_config(overrides, budget=60, validation=100)
        assert cfg.train.max_train_seconds == 60 and cfg.train.max_validation_examples == 100
        assert not cfg.tracking.enabled and cfg.train.lr_schedule == "constant"
        configs.append(cfg)
    first, last = configs[0], configs[-1]
    assert first.data.template == "model" and first.train.zero_stage == 2 and first.train.trainable_layers is None
    shipped = load_config(RunConfig, REPO / "configs" / "airline_sentiment.yaml")
    assert last.data == shipped.data
    bench_only = {"max_steps", "max_train_seconds", "eval_every", "max_validation_examples"}
    assert last.train.model_dump(exclude=bench_only) == shipped.train.model_dump(exclude=bench_only)
