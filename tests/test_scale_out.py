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
