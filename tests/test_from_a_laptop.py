"""From a laptop: a cluster started with `ray start` (a head and a second node), a job submitted by
another process that holds only the dashboard's address and the cluster token, its result read
back with the job SDK; a submission without the token, or with another one, is refused.

The cluster is this test's own: its own ports, token and temp dir, each node a `ray start --block`
in a session of its own, so ending those sessions ends every process it started and nothing else
(`ray stop` would end every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import free_port

# The job: a task that only the second node can run (it alone has the resource), reporting its node.
JOB = """
import ray
ray.init()
@ray.remote(resources={"second_node": 1})
def node_id():
    return ray.get_runtime_context().get_node_id()
print("task ran on node", ray.get(node_id.remote()))
"""

# The laptop: RAY_ADDRESS is the dashboard, RAY_AUTH_MODE=token makes the SDK send ~/.ray/auth_token
# (what docs/operations.md tells a user to set). It prints what it saw as JSON, or the refusal.
LAPTOP = """
import json, shlex, sys, time
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes
try:
    client = JobSubmissionClient()
    job_id = client.submit_job(entrypoint="python -c " + shlex.quote(sys.argv[1]))
except Exception as refused:
    print(json.dumps({"refused": f"{type(refused).__name__}: {refused}"}))
    sys.exit(0)
status = client.get_job_status(job_id)
for _ in range(600):
    if status.is_terminal():
        break
    time.sleep(0.5)
    status = client.get_job_status(job_id)
nodes = [{"node_id": node.node_id, "is_head": node.is_head_node, "resources": node.resources_total}
         for node in list_nodes(address=client.get_address())]
print(json.dumps({"status": status.value, "logs": client.get_job_logs(job_id), "nodes": nodes}))
"""


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def laptop(dashboard: str, home: Path, token: str | None) -> dict:
    """Run LAPTOP in an environment holding the address and, in its ~/.ray/auth_token, `token` (None: no token)."""
    if token is not None:
        (home / ".ray").mkdir(parents=True, exist_ok=True)
        (home / ".ray" / "auth_token").write_text(token)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "RAY_ADDRESS": dashboard,
           **({"RAY_AUTH_MODE": "token"} if token is not None else {})}
    result = subprocess.run([sys.executable, "-c", LAPTOP, JOB], env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def session_processes(session: int) -> list[psutil.Process]:
    """The live processes of a session: a node's `ray start`, what it started and what those started
    (Ray's workers lead process groups of their own, but stay in the session)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


@pytest.fixture
def cluster(tmp_path):
    """(dashboard URL, token) of a two-node cluster started with `ray start`, stopped afterwards."""
    # Short: Ray's socket paths (temp dir + session folder + socket name) must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="lakeforge-ray-")
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
    token_file = tmp_path / "cluster_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    # The job's `python` is this environment's, as `lakeforge cluster up` arranges.
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    gcs_port, dashboard_port = free_port(), free_port()
    # Every port named: a benchmark's cluster may run beside this one on Ray's defaults.
    common = ["--block", f"--temp-dir={temp_dir}", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000",
              "--disable-usage-stats"]

    def own_ports() -> list[str]:
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    head = subprocess.Popen(
        [ray_cli(), "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}", *own_ports(), *common],
        env=env, start_new_session=True, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    nodes = [head]
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + 180
        while not dashboard_answers(dashboard, token):
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        nodes.append(subprocess.Popen(
            [ray_cli(), "start", f"--address=127.0.0.1:{gcs_port}", '--resources={"second_node": 1}', *own_ports(), *common],
            env=env, start_new_session=True, stdout=open(tmp_path / "second_node.log", "w"), stderr=subprocess.STDOUT))
        yield dashboard, token
    finally:
        stop(nodes)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not [process for node in nodes for process in session_processes(node.pid)]


def dashboard_answers(dashboard: str, token: str) -> bool:
    try:
        return requests.get(f"{dashboard}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=5).ok
    except requests.RequestException:
        return False


def stop(nodes: list[subprocess.Popen]) -> None:
    """SIGTERM to each `ray start --block` (second node first), which ends its node's processes; then
    SIGKILL to whatever is left in its session, which holds only what that node started."""
    for node in reversed(nodes):
        node.terminate()
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        left = session_processes(node.pid)
        for process in left:
            process.kill()
        psutil.wait_procs(left, timeout=30)
        node.wait()


def test_a_job_submitted_with_only_the_address_and_token_runs_on_the_second_node(cluster, tmp_path):
    dashboard, token = cluster
    submitted = laptop(dashboard, tmp_path / "laptop", token)
    assert submitted.get("status") == "SUCCEEDED", submitted
    (second,) = [node for node in submitted["nodes"] if "second_node" in node["resources"]]
    assert not second["is_head"] and len(submitted["nodes"]) == 2
    assert f"task ran on node {second['node_id']}" in submitted["logs"]

    without_token = laptop(dashboard, tmp_path / "no-token", None)
    assert "AuthenticationError: Authentication required: Unauthorized: Missing authentication token" in \
        without_token.get("refused", ""), without_token  # HTTP 401
    with_another_token = laptop(dashboard, tmp_path / "other-token", secrets.token_hex(32))
    assert "AuthenticationError: Authentication failed: Forbidden: Invalid authentication token" in \
        with_another_token.get("refused", ""), with_another_token  # HTTP 403
    jobs = requests.get(f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
    assert len(jobs) == 1  # the refused ones left nothing behind
