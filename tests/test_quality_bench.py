"""The quality bench's levers are valid run configs, cumulative, and reach the shipped recipe at SHIPPED_LEVER."""

from bench.quality_bench import LEVERS, REPO, SHIPPED_LEVER, lever_config
from cluster.config import load_config
from jobs.config import RunConfig


def test_levers_are_cumulative_valid_configs_from_the_old_demo_to_the_shipped_recipe():
    overrides = []
    configs = {}
    for name, (_, added) in LEVERS.items():
        overrides += added
        cfg = lever_config(overrides, budget=60, validation=100)
        assert cfg.train.max_train_seconds == 60 and cfg.train.max_validation_examples == 100
        assert not cfg.tracking.enabled
        configs[name] = cfg
    names = list(LEVERS)
    assert all(configs[name].train.lr_schedule == "constant" for name in names[:names.index(SHIPPED_LEVER) + 1])
    first, last = configs[names[0]], configs[SHIPPED_LEVER]
    assert first.data.template == "model" and first.train.zero_stage == 2 and first.train.trainable_layers is None
    shipped = load_config(RunConfig, REPO / "configs" / "airline_sentiment.yaml")
    assert last.data == shipped.data
    bench_only = {"max_steps", "max_train_seconds", "eval_every", "max_validation_examples"}
    assert last.train.model_dump(exclude=bench_only) == shipped.train.model_dump(exclude=bench_only)
