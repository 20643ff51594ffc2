"""A 2-step training run on a two-node cluster simulated with Ray's own test utilities.

Run by tests/test_scale_out.py in a subprocess (it cannot share the session's embedded cluster):

    python -m tests.two_node_train OUT_DIR MODEL_DIR CSV

Each simulated node offers one `trainer` slot and the job asks for one per worker, so the two
workers must land on different nodes; the node ids each rank saw are written to OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(out_dir: Path, model_dir: Path, csv: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from jobs.data.prepare import prepare_run_inputs
    from jobs.train.run import run_finetune
    from tests.conftest import tiny_run_config

    os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"trainer": 1}})
    cluster.add_node(num_cpus=3, resources={"trainer": 1})
    ray.init(address=cluster.address)
    try:
        cfg = tiny_run_config(out_dir, model_dir, csv, "train.max_steps=2", "train.eval_every=2", "train.warmup_steps=1",
                              "tracking.enabled=false", "train.worker_resources={trainer: 1}", "train.placement_strategy=SPREAD")
        base_dir, data_dir, _ = prepare_run_inputs(cfg)
        record = run_finetune(cfg, base_dir, data_dir)
        nodes = {"cluster": sorted(node["NodeID"] for node in ray.nodes() if node["Alive"]),
                 "workers": record["final"]["worker_nodes"], "step": record["final"]["step"]}
        (out_dir / "result.json").write_text(json.dumps(nodes))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:4]))
