"""The quality bench's levers are valid run configs and cumulative (bench/quality_bench.py)."""

from bench.quality_bench import LEVERS, lever_config


def test_every_lever_is_a_valid_config_that_keeps_the_levers_before_it():
    overrides = []
    for _, added in LEVERS.values():
        overrides += added
        cfg = lever_config(overrides, budget=60, validation=100)
        assert cfg.train.max_train_seconds == 60 and cfg.train.max_validation_examples == 100
        assert not cfg.tracking.enabled and cfg.train.lr_schedule == "constant"
    assert cfg.data.template == "compact" and cfg.train.zero_stage == 1 and cfg.train.freeze_layers == 20
