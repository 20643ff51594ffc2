"""Scale-out: one worker per node on a simulated two-node cluster (its own cluster, in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_node_cluster_runs_one_worker_per_node(tmp_path, tiny_model_dir, small_csv):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    subprocess.run([sys.executable, "-m", "tests.two_node_train", str(tmp_path), str(tiny_model_dir), str(small_csv)],
                   cwd=REPO, env=env, check=True, timeout=900)
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["cluster"]) == 2 and result["step"] == 2
    assert len(result["workers"]) == 2 and len(set(result["workers"])) == 2  # two ranks, two nodes
    assert set(result["workers"]) == set(result["cluster"])


def test_a_killed_node_s_training_worker_is_replaced_and_the_run_resumes(tmp_path, tiny_model_dir):
    """bench.fault_bench's training drill: the second node (one of the two workers on it) is killed
    with SIGKILL after the first checkpoint, a replacement node joins, and the run resumes from that
    checkpoint on it and ends as the uninterrupted run did."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    subprocess.run([sys.executable, "-m", "bench.fault_bench", "--child-training", str(tmp_path), "--train-steps", "12",
                    "--train-eval-every", "4", "--model-cache", str(tiny_model_dir.parent)],
                   cwd=REPO, env=env, check=True, timeout=1500)
    drill = json.loads((tmp_path / "training_drill.json").read_text())
    uninterrupted, killed = drill["uninterrupted"], drill["killed"]
    assert drill["kill_happened_mid_run"] and drill["step_at_kill"] >= 4
    assert drill["killed_node"] not in killed["worker_nodes"] and drill["replacement_node"] in killed["worker_nodes"]
    assert 4 <= killed["resumed_from_step"] <= drill["step_at_kill"]  # from a checkpoint, not from scratch
    assert uninterrupted["resumed_from_step"] == 0
    assert killed["step"] == uninterrupted["step"] == 12
    assert killed["train_tokens"] == uninterrupted["train_tokens"] and drill["same_result"]
