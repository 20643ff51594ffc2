"""Getting a Ray cluster: the one place jobs, the demo and the tests decide where work runs.

- `RAY_ADDRESS` set (a submitted job, or a user pointing at a remote cluster): connect to it.
- Otherwise: an embedded local cluster with more *logical* CPUs than cores, so a 2-worker Ray
  Train run, a Ray Data pipeline and a Serve LLM replica (each asking for whole CPUs) can all be
  scheduled on a 2-core laptop. Ray's CPU counts are scheduling tokens, not cores.

Ray 2.60 clusters started here use token authentication; it stays on. `ray.init` creates the
token (~/.ray/auth_token) when it is missing, but `ray start` does not: it fails on a machine that
never ran Ray. So `ensure_auth_token` creates it first, through Ray's own CLI, readable by its
owner only (Ray leaves it 0644; whoever reads it can run code on the cluster). `job_client_env`
tells the job CLI/SDK to send it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import ray

LOCAL_LOGICAL_CPUS = int(os.environ.get("LAKEFORGE_LOCAL_CPUS", "8"))
DASHBOARD_PORT = 8265
# The local head's GCS port. Not Ray's default 6379: that is also Redis's, and `make test` installs
# a redis-server that an init system may start there. Named, so `ray status` finds this head only.
HEAD_PORT = int(os.environ.get("LAKEFORGE_HEAD_PORT", "6390"))
# The head's dashboard agent, which runs submitted jobs. Not Ray's default 52365: an embedded cluster
# (a test session, a bench) started first takes that one, and the head's job submissions then fail
# with "No available agent to submit job".
DASHBOARD_AGENT_PORT = int(os.environ.get("LAKEFORGE_DASHBOARD_AGENT_PORT", "52390"))

# Never upload these with `ray job submit --working-dir .` (ray #45602): the venv, model weights,
# datasets and run outputs belong in storage, not in every job's package.
WORKING_DIR_EXCLUDES = [
    "/.git", "/.venv", "/models", "/data", "/outputs", "/bench/results", "__pycache__", ".pytest_cache",
]


def auth_token_path() -> Path:
    """Where Ray reads the cluster token: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def ensure_auth_token() -> Path | None:
    """Create the cluster token if there is none, and make it readable by its owner only.

    Returns the token file, or None when the token comes from $RAY_AUTH_TOKEN (no file involved).
    """
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = auth_token_path()
    if not path.exists() and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        # Ray generates only the default file; a named path points at a token someone else holds.
        raise RuntimeError(f"RAY_AUTH_TOKEN_PATH names {path}, which does not exist: put the cluster's token "
                           f"there, or unset it to use ~/.ray/auth_token (created when missing)")
    if not path.exists():
        # umask 077: the file is never readable by others, not even between creation and chmod.
        subprocess.run([ray_cli(), "get-auth-token", "--generate"], check=True, stdout=subprocess.DEVNULL,
                       env=job_client_env(), umask=0o077)
        if not path.exists():
            raise RuntimeError(f"`ray get-auth-token --generate` did not create {path}")
    path.chmod(0o600)
    return path


def connect(local_num_cpus: int = LOCAL_LOGICAL_CPUS, **init_kwargs) -> None:
    """Connect this process to the cluster at RAY_ADDRESS, or start an embedded local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **init_kwargs)
    else:
        ensure_auth_token()
        # "local": a fresh embedded cluster even if `ray start` left one running on this machine.
        ray.init(address="local", num_cpus=local_num_cpus, include_dashboard=False, **init_kwargs)


def job_client_env() -> dict[str, str]:
    """Environment for `ray job submit` / JobSubmissionClient against a token-auth cluster."""
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")
    return env


def ray_cli() -> str:
    beside_python = Path(sys.executable).with_name("ray")
    return str(beside_python) if beside_python.exists() else "ray"


def local_head_running() -> bool:
    result = subprocess.run([ray_cli(), "status", f"--address=127.0.0.1:{HEAD_PORT}"], capture_output=True, text=True,
                            env=job_client_env())
    return result.returncode == 0


def start_local_head(num_cpus: int = LOCAL_LOGICAL_CPUS) -> str:
    """Start (or reuse) a persistent local head node and return its dashboard address.

    Unlike `connect()`'s embedded cluster this one outlives the process that started it, so a
    submitted job can deploy a Serve endpoint that keeps running after the job ends.
    """
    if not local_head_running():
        for port, variable in ((HEAD_PORT, "LAKEFORGE_HEAD_PORT"), (DASHBOARD_AGENT_PORT, "LAKEFORGE_DASHBOARD_AGENT_PORT")):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    raise RuntimeError(f"port {port} is taken by another program, not this Ray head: "
                                       f"set {variable} to a free port")
        ensure_auth_token()
        # Jobs run `python -m ...` from the raylet's PATH: put this interpreter's bin first so a
        # venv that was never activated still runs the job.
        env = job_client_env()
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # The demo's API key stays in the shell that set it: not in the head's (so every job's) environment.
        env.pop("LAKEFORGE_API_KEY", None)
        subprocess.run(
            [ray_cli(), "start", "--head", f"--port={HEAD_PORT}", f"--num-cpus={num_cpus}", "--num-gpus=0",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
             f"--dashboard-agent-listen-port={DASHBOARD_AGENT_PORT}", "--disable-usage-stats"],
            check=True, env=env,
        )
    return f"http://127.0.0.1:{DASHBOARD_PORT}"


def head_processes(port: int) -> list:
    """This head's processes: those Ray started with its GCS port in their arguments (GCS server,
    raylet, dashboard, monitors, client server) and every process they started (workers, job
    drivers, a Serve replica's vLLM engine processes). Another cluster on this machine has another
    port, so none of its processes is among them."""
    import psutil

    def of_this_head(cmdline: list[str]) -> bool:
        return any(arg == f"--gcs_server_port={port}"
                   or (arg.startswith(("--gcs-address=", "--address=")) and arg.endswith(f":{port}")) for arg in cmdline)

    found = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if of_this_head(process.info["cmdline"] or []):
                for member in (process, *process.children(recursive=True)):
                    found[member.pid] = member
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def stop_local_head(grace_seconds: float = 10) -> None:
    """Stop the local head and every process it started, and nothing else: not `ray stop`, which
    ends every Ray process of the user on the machine (another cluster, a test session). A Serve
    replica's vLLM engine runs in child processes that would outlive their replica, so they are
    ended too. SIGTERM first (Ray's processes clean up on it), SIGKILL what is left after the grace."""
    import psutil

    processes = head_processes(HEAD_PORT)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_seconds)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> None:
    """`python -m cluster.ray_cluster up|down|status` for the Makefile and humans."""
    command = (argv if argv is not None else sys.argv[1:] or ["status"])[0]
    if command == "up":
        print(start_local_head())
    elif command == "down":
        stop_local_head()
    elif command == "status":
        print("running" if local_head_running() else "not running")
    else:
        raise SystemExit(f"unknown command {command!r}: expected up, down or status")


if __name__ == "__main__":
    main()
