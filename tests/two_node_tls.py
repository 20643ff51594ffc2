"""Ray's own TLS (mutual TLS on every gRPC channel) on a two-node cluster simulated with Ray's test
utilities. Run by tests/test_ray_tls.py in a subprocess, with Ray's TLS settings in its environment
(every Ray process of both nodes inherits them, as every node's `ray start` does in cluster.yaml):

    RAY_USE_TLS=1 RAY_TLS_SERVER_CERT=... RAY_TLS_SERVER_KEY=... RAY_TLS_CA_CERT=... \\
        python -m tests.two_node_tls OUT_DIR

One task runs on each node (a custom resource per node places it) and returns its node id. Then two
gRPC clients try the GCS: one without TLS, as a process without Ray's TLS settings connects, and one
with the CA and the certificate. Everything is written to OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def channel_connects(address: str, credentials=None, timeout_s: float = 10) -> bool:
    import grpc

    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def main(out_dir: Path) -> None:
    import grpc
    import ray
    from ray.cluster_utils import Cluster

    os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head_slot": 1}})
    cluster.add_node(num_cpus=1, resources={"worker_slot": 1})
    ray.init(address=cluster.address)
    try:
        @ray.remote(num_cpus=0)
        def node_id() -> str:
            return ray.get_runtime_context().get_node_id()

        ran_on = ray.get([node_id.options(resources={slot: 1}).remote() for slot in ("head_slot", "worker_slot")])
        read = lambda variable: Path(os.environ[variable]).read_bytes()  # noqa: E731
        with_certificate = grpc.ssl_channel_credentials(root_certificates=read("RAY_TLS_CA_CERT"),
                                                        private_key=read("RAY_TLS_SERVER_KEY"),
                                                        certificate_chain=read("RAY_TLS_SERVER_CERT"))
        result = {
            "cluster": sorted(node["NodeID"] for node in ray.nodes() if node["Alive"]),
            "tasks_ran_on": ran_on,
            "gcs_without_tls_connects": channel_connects(cluster.address),
            "gcs_with_certificate_connects": channel_connects(cluster.address, with_certificate),
        }
        (out_dir / "result.json").write_text(json.dumps(result))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
