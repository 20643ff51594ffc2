"""Batch retraining: continue from the registry's current version on new labelled rows (feedback
joined with the prediction log, new source files) and a replayed sample of the original training
split, then the run's evaluation and gate against the current version, and the registry. Logic:
jobs/lifecycle/retrain.py.

    python -m jobs.retrain --config configs/airline_sentiment.yaml retrain.monitoring_root=... [key=value ...]

`jobs.monitor` submits it as a Ray job when its `retrain` trigger fires. Writes
<storage_root>/<name>-retrain/retrain.json.
"""

from __future__ import annotations

import json

from cluster.config import load_config_or_exit
from cluster.ray_cluster import connect
from jobs.config import RunConfig
from jobs.lifecycle.retrain import run_retrain


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config_or_exit(RunConfig, argv)
    connect()
    summary = run_retrain(cfg)
    print(f"[retrain] {json.dumps({key: summary[key] for key in ('from_version', 'version', 'deployable')})}: "
          f"{summary['gate']['reason']}")
    return summary


if __name__ == "__main__":
    main()
