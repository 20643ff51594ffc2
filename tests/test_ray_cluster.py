"""The local cluster's token and port: what a machine that never ran Ray needs before `ray start`."""

from __future__ import annotations

import socket
import stat

import pytest

from cluster import ray_cluster


@pytest.fixture
def token_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return tmp_path / "home" / ".ray" / "auth_token"


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_missing_token_is_created_readable_by_its_owner_only(token_path):
    assert not token_path.exists()
    assert ray_cluster.ensure_auth_token() == token_path
    assert mode(token_path) == 0o600 and len(token_path.read_text().strip()) >= 32
    token = token_path.read_text()
    ray_cluster.ensure_auth_token()  # a second call keeps the token: running clusters depend on it
    assert token_path.read_text() == token


def test_an_existing_world_readable_token_is_kept_and_locked_down(token_path):
    token_path.parent.mkdir(parents=True)
    token_path.write_text("abc123")
    token_path.chmod(0o644)  # as `ray.init` leaves it
    ray_cluster.ensure_auth_token()
    assert token_path.read_text() == "abc123" and mode(token_path) == 0o600


def test_the_token_path_and_variable_are_honoured(tmp_path, token_path, monkeypatch):
    elsewhere = tmp_path / "secrets" / "ray_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(elsewhere))
    with pytest.raises(RuntimeError, match="RAY_AUTH_TOKEN_PATH names .*ray_token, which does not exist"):
        ray_cluster.ensure_auth_token()  # Ray only generates the default file: a named one is the user's
    elsewhere.parent.mkdir()
    elsewhere.write_text("abc123")
    assert ray_cluster.ensure_auth_token() == elsewhere and mode(elsewhere) == 0o600
    assert not token_path.exists()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-environment")
    elsewhere.unlink()
    assert ray_cluster.ensure_auth_token() is None and not elsewhere.exists()


@pytest.mark.parametrize("setting, variable", [("HEAD_PORT", "LAKEFORGE_HEAD_PORT"),
                                               ("DASHBOARD_AGENT_PORT", "LAKEFORGE_DASHBOARD_AGENT_PORT")])
def test_the_head_s_ports_are_not_the_defaults_others_take_and_a_taken_port_is_named(monkeypatch, setting, variable):
    # Redis's port, and the dashboard agent port every embedded cluster (tests, benches) takes.
    assert ray_cluster.HEAD_PORT != 6379 and ray_cluster.DASHBOARD_AGENT_PORT != 52365
    with socket.socket() as unused:  # the other port free (a demo's head may hold the real one)
        unused.bind(("127.0.0.1", 0))
        free = unused.getsockname()[1]
    monkeypatch.setattr(ray_cluster, "HEAD_PORT", free)
    monkeypatch.setattr(ray_cluster, "DASHBOARD_AGENT_PORT", free)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        monkeypatch.setattr(ray_cluster, setting, port)
        monkeypatch.setattr(ray_cluster, "local_head_running", lambda: False)
        with pytest.raises(RuntimeError, match=f"port {port} is taken.*{variable}"):
            ray_cluster.start_local_head()


def test_stopping_the_head_ends_its_processes_and_what_they_started_and_no_other_cluster_s(tmp_path, monkeypatch):
    """A Serve replica's vLLM engine processes outlive their replica: stop_local_head ends every
    process of this head (named by its GCS port) and their descendants, and leaves another
    cluster's processes (another port) and unrelated processes alone."""
    import subprocess
    import sys
    import time

    import psutil

    # Ports no head uses: the real default (6390) would end a demo running beside the tests.
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    port, other_port = ports
    fake_raylet = tmp_path / "raylet"  # a process named like a head's raylet, with its GCS address
    fake_raylet.symlink_to(sys.executable)
    spawn = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    raylet = subprocess.Popen([str(fake_raylet), "-c", spawn, f"--gcs-address=127.0.0.1:{port}"])
    gcs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", f"--gcs_server_port={port}"])
    other_cluster = subprocess.Popen([str(fake_raylet), "-c", spawn, f"--gcs-address=127.0.0.1:{other_port}"])
    bystander = subprocess.Popen(["sleep", "300"])
    grandchildren = []
    try:
        deadline = time.monotonic() + 30
        while not (psutil.Process(raylet.pid).children() and psutil.Process(other_cluster.pid).children()) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        (engine,) = psutil.Process(raylet.pid).children()
        (other_engine,) = psutil.Process(other_cluster.pid).children()
        grandchildren += [engine, other_engine]
        monkeypatch.setattr(ray_cluster, "HEAD_PORT", port)
        ray_cluster.stop_local_head(grace_seconds=5)
        assert raylet.wait(timeout=30) is not None and gcs.wait(timeout=30) is not None
        assert ended(engine)  # the head's descendants too
        assert other_cluster.poll() is None and other_engine.is_running()  # another cluster: untouched
        assert bystander.poll() is None  # not the head's: untouched
    finally:
        for process in (raylet, gcs, other_cluster, bystander):
            process.kill()
            process.wait()
        for process in grandchildren:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def ended(process, seconds: float = 30) -> bool:
    import time

    import psutil

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False
