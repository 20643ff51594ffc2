"""Ray's TLS between processes: a simulated two-node cluster runs with RAY_USE_TLS on, certificates
from a CA made here (its own cluster, in a subprocess: TLS is set before any Ray process starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_test_pki

pytestmark = pytest.mark.integration


def test_a_two_node_cluster_runs_with_ray_tls_and_refuses_plain_connections(tmp_path):
    from ray.util import get_node_ip_address

    # The simulated nodes listen on this machine's address, which is what Ray's clients dial and check.
    pki = write_test_pki(tmp_path / "pki", ip_addresses=("127.0.0.1", get_node_ip_address()))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update({"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(pki["cert"]), "RAY_TLS_SERVER_KEY": str(pki["key"]),
                "RAY_TLS_CA_CERT": str(pki["ca"])})
    subprocess.run([sys.executable, "-m", "tests.two_node_tls", str(tmp_path)], cwd=REPO, env=env, check=True,
                   timeout=600)
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["cluster"]) == 2
    assert sorted(result["tasks_ran_on"]) == result["cluster"]  # one task on each node
    assert result["gcs_with_certificate_connects"] is True
    assert result["gcs_without_tls_connects"] is False
