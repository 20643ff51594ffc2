"""Faults under load (`make bench`): what clients see when a process of the service is killed.

Serving: the endpoint (`serving.app:build_app` through `cluster.endpoints.deploy`, embedded Ray
cluster; the tiny random model by default, `--model-dir` for a real one) under a closed loop of
`--clients` streaming chat clients, each the official `openai` client (AsyncOpenAI). `--kill-after`
seconds into the load one replica's process is killed with SIGKILL (a real process kill, not
ray.kill): the vLLM engine replica (scenario "engine") or the gateway replica (scenario "gateway").
Every scenario runs twice: clients with retries (`--retries`, the client's own backoff) and with
max_retries=0; with `--replicas 1,2` the whole set runs at one and at two replicas per deployment.
Per run:

- sent: requests the callers made (one call, whatever the client retried inside it);
- completed: the stream ended with a finish reason;
- failed: an exception reached the caller, or the stream ended without a finish reason; of them
  `cut_mid_stream` had received part of the answer, `before_answer` had received nothing;
- lost: the failures of a run with client retries on (the goal is 0);
- serve_healthy_s: from the kill until Serve reports the deployment HEALTHY with all its replicas
  RUNNING again (after it first reported otherwise); first_success_s: from the kill until the
  first request sent after the kill ended successfully; recovery_s: the later of the two;
  last_failure_s: from the kill until the last failed request ended.

Training: a two-node local cluster (`ray.cluster_utils.Cluster`, each node offering one `trainer`
slot, so one worker per node) runs a short tiny-model fine-tuning run with checkpoints, uninterrupted
first; then the same run again, and after its first checkpoint the second node is killed
(`remove_node(allow_graceful=False)`: SIGKILL of its raylet and every process on it, the training
worker included) and a replacement node is added, as an autoscaler would. Recorded: the step of
the checkpoint resumed from, seconds from the kill to the next validation of the resumed run, and
whether the run ended as the uninterrupted one did (steps, training tokens, losses).

    python -m bench.fault_bench [--parts serving training] [--replicas 1,2] [--model-dir DIR]
    # tiny model: ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO / "bench" / "results" / "faults.json"
MESSAGES = [{"role": "user", "content": "My bag did not arrive in Denver, what should I do?"}]
APP_NAME = "fault-drill"
GATEWAY = "Gateway"  # serving.app's name for the ingress deployment; the other one is the engine
REQUEST_TIMEOUT_S = 120  # a request hanging longer than this counts as failed


def summarize(records: list[dict], polls: list[dict], killed_at: float) -> dict:
    """Counts and recovery times of one run from what it recorded.

    records: one per caller request, {"started", "ended" (seconds), "outcome": "ok" | "failed" |
    "cut"} ("cut": part of the answer arrived, then an error or an end without finish reason), and
    "error" when not ok; polls: Serve's view of the killed deployment, {"at", "healthy"} in time
    order; killed_at: when the kill signal was sent.
    """
    failed = [r for r in records if r["outcome"] != "ok"]
    after_kill_ok = [r["ended"] for r in records if r["outcome"] == "ok" and r["started"] >= killed_at]
    first_success_s = min(after_kill_ok) - killed_at if after_kill_ok else None
    # Serve notices a dead replica a moment after the kill: "healthy again" is the first healthy poll
    # after the first unhealthy one that follows the kill.
    down = next((p["at"] for p in polls if p["at"] >= killed_at and not p["healthy"]), None)
    up = next((p["at"] for p in polls if down is not None and p["at"] > down and p["healthy"]), None)
    serve_healthy_s = up - killed_at if up is not None else None
    recovery_s = (max(serve_healthy_s, first_success_s)
                  if serve_healthy_s is not None and first_success_s is not None else None)
    return {
        "sent": len(records),
        "completed": len(records) - len(failed),
        "failed": len(failed),
        "cut_mid_stream": sum(r["outcome"] == "cut" for r in failed),
        "before_answer": sum(r["outcome"] == "failed" for r in failed),
        "failed_before_kill": sum(r["ended"] < killed_at for r in failed),
        "serve_unhealthy_seen": down is not None,
        "serve_healthy_s": serve_healthy_s,
        "first_success_s": first_success_s,
        "recovery_s": recovery_s,
        "last_failure_s": max(r["ended"] for r in failed) - killed_at if failed else None,
        "errors": dict(collections.Counter(r["error"] for r in failed).most_common(8)),
    }


async def one_stream(client, model_id: str, max_tokens: int, clock) -> dict:
    record = {"started": clock(), "outcome": "failed"}
    received, finished = False, False
    try:
        stream = await client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=max_tokens,
                                                      temperature=0, stream=True)
        async for chunk in stream:
            received = True
            finished = finished or any(choice.finish_reason for choice in chunk.choices)
        record["outcome"] = "ok" if finished else "cut"
        if not finished:
            record["error"] = "stream ended without a finish reason"
    except Exception as error:  # noqa: BLE001 - whatever reaches the caller is the measurement
        record["outcome"] = "cut" if received else "failed"
        record["error"] = f"{type(error).__name__}: {str(error)[:120]}"
    record["ended"] = clock()
    return record


def deployment_healthy(deployment: str) -> bool:
    """Serve's view: the deployment HEALTHY and every one of its replicas RUNNING."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    status = app.deployments.get(deployment) if app else None
    return (status is not None and status.status == "HEALTHY"
            and set(status.replica_states) == {"RUNNING"} and status.replica_states["RUNNING"] > 0)


def replica_process(deployment: str) -> tuple[int, list[int]]:
    """The PID of one live replica of `deployment` in this process's own Ray cluster, and its child
    processes (the vLLM engine core of an engine replica)."""
    import psutil
    from ray._private import state  # the GCS's actor table with PIDs; the state API needs the dashboard

    pids = sorted(actor["Pid"] for actor in state.actors().values()
                  if actor["State"] == "ALIVE" and actor["ActorClassName"] == f"ServeReplica:{APP_NAME}:{deployment}")
    if not pids:
        raise RuntimeError(f"no live replica of {deployment} to kill")
    return pids[0], [child.pid for child in psutil.Process(pids[0]).children(recursive=True)]


async def run_scenario(base_url: str, api_key: str, model_id: str, deployment: str, retries: int, args) -> dict:
    """Closed-loop load; the kill `args.kill_after` s in; the load goes on for `args.after_kill` s and
    until a request sent after the kill has succeeded (at most `args.max_wait` s after the kill)."""
    import httpx
    import psutil
    from openai import AsyncOpenAI

    start = time.monotonic()
    clock = lambda: time.monotonic() - start  # noqa: E731 - one time base for records and polls
    attempts = 0

    async def count_attempt(_request):
        nonlocal attempts
        attempts += 1

    records, polls, kill = [], [], {}
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=args.clients * 2),
                             event_hooks={"request": [count_attempt]})
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=retries, timeout=REQUEST_TIMEOUT_S,
                         http_client=http)

    def done() -> bool:
        if "at" not in kill:
            return False
        since = clock() - kill["at"]
        recovered = any(r["outcome"] == "ok" and r["started"] >= kill["at"] for r in records)
        return since >= args.max_wait or (since >= args.after_kill and recovered)

    async def worker():
        while not done():
            records.append(await one_stream(client, model_id, args.max_tokens, clock))

    async def killer():
        await asyncio.sleep(args.kill_after)
        pid, children = await asyncio.to_thread(replica_process, deployment)
        kill.update(at=clock(), pid=pid, children=children)
        os.kill(pid, signal.SIGKILL)
        print(f"[faults] SIGKILL {deployment} replica pid {pid} at {kill['at']:.1f}s", flush=True)

    async def poller():
        while not done() or not (polls and polls[-1]["healthy"]):
            healthy = await asyncio.to_thread(deployment_healthy, deployment)
            polls.append({"at": clock(), "healthy": healthy})
            if "at" in kill and clock() - kill["at"] > args.max_wait:
                break
            await asyncio.sleep(0.5)

    await asyncio.gather(killer(), poller(), *(worker() for _ in range(args.clients)))
    await http.aclose()
    # A replica process killed alone leaves its children (vLLM's engine core) behind: counted, then
    # ended (they are this drill's own processes) so the next run has the machine it started with.
    orphans = [pid for pid in kill["children"] if psutil.pid_exists(pid)]
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    summary = summarize(records, polls, kill["at"])
    return {"deployment": deployment, "client_retries": retries, "killed_at_s": kill["at"],
            "load_seconds": clock(), "http_attempts": attempts, "orphaned_children": len(orphans), **summary}


def wait_until_serving(base_url: str, api_key: str, model_id: str, deployments: list[str], timeout_s: float = 600) -> None:
    """Every deployment healthy and one request answered: a run starts from a recovered service."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=30)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if all(deployment_healthy(name) for name in deployments):
                client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=2)
                return
        except openai.OpenAIError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{APP_NAME} did not recover within {timeout_s:.0f}s")


def serving_drill(args, model_dir: Path, replicas: int) -> dict:
    from ray import serve

    from cluster.contracts import EndpointSettings
    from cluster.endpoints import deploy, with_local_key
    from cluster.ray_cluster import connect

    os.environ.pop("RAY_ADDRESS", None)  # an embedded cluster, never someone else's
    connect()
    api_key, settings = with_local_key(EndpointSettings.model_validate({
        "model_id": "drill", "model_dir": str(model_dir), "port": args.port, "app_name": APP_NAME,
        "max_model_len": 512, "max_num_seqs": args.clients, "cpu_kv_cache_gib": 1, "replica_cpus": args.replica_cpus,
        # Eager mode: each engine (re)start skips torch.compile (tiny model: ~20 s instead of ~40 s).
        "engine_overrides": {"enforce_eager": True},
        "autoscaling": {"min_replicas": replicas, "max_replicas": replicas},
        # Room for every client at the gateway: a 503 here would measure the limits, not the fault.
        "limits": {"max_ongoing_requests": args.clients * 2, "max_queued_requests": args.clients * 2},
    }))
    started = time.monotonic()
    base_url = deploy("serving.app:build_app", settings)
    result = {"replicas": replicas, "deploy_seconds": time.monotonic() - started, "runs": []}
    try:
        deployments = list(serve.status().applications[APP_NAME].deployments)
        engine = next(name for name in deployments if name != GATEWAY)
        for deployment in (engine, GATEWAY):
            for retries in (args.retries, 0):
                wait_until_serving(base_url, api_key, settings.model_id, deployments)
                run = asyncio.run(run_scenario(base_url, api_key, settings.model_id, deployment, retries, args))
                run["scenario"] = "engine" if deployment == engine else "gateway"
                result["runs"].append(run)
                print(f"[faults] {replicas} replica(s), {run['scenario']} killed, retries {retries}: sent {run['sent']}, "
                      f"failed {run['failed']} (cut {run['cut_mid_stream']}), Serve healthy after "
                      f"{run['serve_healthy_s']}s, first success after {run['first_success_s']}s", flush=True)
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
        import ray

        ray.shutdown()
    return result


def training_config(root: Path, name: str, args):
    from cluster.config import load_config
    from jobs.config import RunConfig

    return load_config(RunConfig, REPO / "configs" / "airline_sentiment.yaml", [
        f"storage_root={root}", f"model_cache={args.model_cache}", f"name={name}", "model.base=tiny-random",
        "data.sample_every=20",  # every 20th tweet: the drill is about the kill, not the data stage
        "train.micro_batch_size=4", "train.gradient_accumulation_steps=1", "train.warmup_steps=1",
        f"train.max_steps={args.train_steps}", f"train.eval_every={args.train_eval_every}",
        "train.max_validation_examples=16", "train.keep_checkpoints=1", "tracking.enabled=false",
        "train.worker_resources={trainer: 1}", "train.placement_strategy=SPREAD"])


def registered_checkpoint(storage: Path) -> str | None:
    """The latest checkpoint Ray Train's controller has registered for a run under `storage`, if any."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    for snapshot in storage.glob(f"*/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, json.JSONDecodeError):  # being written
            continue
        if latest:
            return latest["checkpoint_dir_name"]
    return None


def training_drill_child(args) -> None:
    """In a fresh process (a cluster of its own): the uninterrupted run, then the killed one."""
    import ray
    from ray.cluster_utils import Cluster

    from jobs.data.prepare import prepare_run_inputs
    from jobs.train.run import run_finetune
    from jobs.train.worker import LEARNING_CURVE_FILE

    os.environ.pop("RAY_ADDRESS", None)
    root = Path(args.child_training)
    # No dashboard: its fixed port may be taken by another cluster on the same machine.
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 3, "resources": {"trainer": 1}, "include_dashboard": False})
    second = cluster.add_node(num_cpus=3, resources={"trainer": 1})
    ray.init(address=cluster.address)
    try:
        reference_cfg = training_config(root, "uninterrupted", args)
        reference = run_finetune(reference_cfg, *prepare_run_inputs(reference_cfg)[:2])
        cfg = training_config(root, "killed", args)
        base_dir, data_dir, _ = prepare_run_inputs(cfg)
        second_id = second.node_id
        drill = {"killed_node": second_id}
        curve = cfg.run_dir / LEARNING_CURVE_FILE

        def validated_steps() -> list[int]:
            return [json.loads(line)["step"] for line in curve.read_text().splitlines()] if curve.is_file() else []

        # The run goes on in a thread: Ray starts a node only from the main thread (signal handlers).
        started = time.monotonic()
        run = concurrent.futures.ThreadPoolExecutor(max_workers=1).submit(run_finetune, cfg, base_dir, data_dir)
        # After the first checkpoint is registered: Ray Train resumes only from a checkpoint its controller
        # recorded (in its manager snapshot) once every rank reported; a folder being uploaded does not count.
        while not registered_checkpoint(cfg.run_dir / "ray_train") and not run.done():
            time.sleep(0.1)
        if not run.done():
            drill["step_at_kill"] = max(validated_steps(), default=0)
            killed_at = time.monotonic()
            cluster.remove_node(second, allow_graceful=False)  # SIGKILL: raylet, workers, the training worker
            drill["replacement_node"] = cluster.add_node(num_cpus=3, resources={"trainer": 1}).node_id
            drill["replacement_added_s"] = time.monotonic() - killed_at
            while not [step for step in validated_steps() if step > drill["step_at_kill"]] and not run.done():
                time.sleep(0.2)
            drill["next_validation_after_kill_s"] = time.monotonic() - killed_at
        killed = run.result()
        drill["run_seconds"] = time.monotonic() - started
        keys = ("step", "train_loss", "val_loss", "resumed_from_step", "worker_nodes")
        drill.update({
            "kill_happened_mid_run": "step_at_kill" in drill and drill["step_at_kill"] < killed["final"]["step"],
            "uninterrupted": {**{k: reference["final"][k] for k in keys}, "train_tokens": reference["train_tokens"],
                              "examples_seen": reference["examples_seen"], "wall_seconds": reference["wall_seconds"]},
            "killed": {**{k: killed["final"][k] for k in keys}, "train_tokens": killed["train_tokens"],
                       "examples_seen": killed["examples_seen"], "wall_seconds": killed["wall_seconds"]},
        })
        drill["same_result"] = (drill["killed"]["step"] == drill["uninterrupted"]["step"]
                                and drill["killed"]["train_tokens"] == drill["uninterrupted"]["train_tokens"]
                                and abs(drill["killed"]["val_loss"] - drill["uninterrupted"]["val_loss"])
                                <= 1e-5 * abs(drill["uninterrupted"]["val_loss"]))
        (root / "training_drill.json").write_text(json.dumps(drill, indent=2))
    finally:
        ray.shutdown()
        cluster.shutdown()


def training_drill(args) -> dict:
    root = REPO / "outputs" / "fault_bench" / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    subprocess.run([sys.executable, "-m", "bench.fault_bench", "--child-training", str(root),
                    "--train-steps", str(args.train_steps), "--train-eval-every", str(args.train_eval_every),
                    "--model-cache", args.model_cache], cwd=REPO, env=env, check=True, timeout=1800)
    return json.loads((root / "training_drill.json").read_text())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["serving", "training"], default=["serving", "training"])
    parser.add_argument("--model-dir", help="a Hugging Face model folder to serve (default: the tiny random model)")
    parser.add_argument("--model-cache", default=str(REPO / "models"), help="where the tiny model is materialized")
    parser.add_argument("--replicas", default="1,2", help="replicas per deployment, one full set of runs each")
    parser.add_argument("--replica-cpus", type=float, default=0.5, help="logical CPUs reserved per engine replica")
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--retries", type=int, default=5, help="the openai client's max_retries in the runs with retries")
    parser.add_argument("--kill-after", type=float, default=10, help="seconds of load before the kill")
    parser.add_argument("--after-kill", type=float, default=30, help="least seconds of load after the kill")
    parser.add_argument("--max-wait", type=float, default=300, help="most seconds of load after the kill")
    parser.add_argument("--port", type=int, default=8152, help="Serve HTTP port of the drilled endpoint")
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--train-eval-every", type=int, default=4)
    parser.add_argument("--note", default="", help="recorded in the results (e.g. other load on the machine)")
    parser.add_argument("--output", default=str(RESULTS_FILE))
    parser.add_argument("--child-training", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("clients", "max_tokens", "train_steps", "train_eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.child_training:
        return training_drill_child(args)
    from jobs.base_models import TINY, materialize

    output = Path(args.output)
    settings = {k: v for k, v in vars(args).items() if k not in ("child_training", "output", "parts")}
    if "serving" in args.parts:
        model_dir = Path(args.model_dir) if args.model_dir else materialize(TINY, args.model_cache)
        for replicas in args.replicas.split(","):
            started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            drill = serving_drill(args, model_dir, int(replicas))
            write_results(output, args, "serving", {"measured_at": started, "model": str(args.model_dir or TINY),
                                                    "settings": settings, **drill})
    if "training" in args.parts:
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_results(output, args, "training", {"measured_at": started, "settings": settings, **training_drill(args)})
    print_table(json.loads(output.read_text()))


def write_results(output: Path, args, part: str, measured: dict) -> None:
    """The part's figures into the results file as it is now: a run of one part (or of one replica
    count) keeps the others' last results."""
    result = json.loads(output.read_text()) if output.is_file() else {}
    measured["machine"] = {"cpus": os.cpu_count(), "note": args.note or "CPU only"}
    if part == "serving":  # one entry per replica count, each from its own run
        kept = [drill for drill in result.get("serving", []) if drill["replicas"] != measured["replicas"]]
        result["serving"] = sorted([*kept, measured], key=lambda drill: drill["replicas"])
    else:
        result[part] = measured
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"[faults] {part} results: {output}")


def print_table(result: dict) -> None:
    seconds = lambda value: "-" if value is None else f"{value:.1f}"  # noqa: E731
    print(f"\n{'replicas':>8} {'killed':8} {'retries':>7} {'sent':>5} {'failed':>6} {'cut':>4} "
          f"{'Serve healthy s':>15} {'1st success s':>13}")
    for drill in result.get("serving", []):
        for run in drill["runs"]:
            print(f"{drill['replicas']:>8} {run['scenario']:8} {run['client_retries']:>7} {run['sent']:>5} {run['failed']:>6} "
                  f"{run['cut_mid_stream']:>4} {seconds(run['serve_healthy_s']):>15} {seconds(run['first_success_s']):>13}")
    if "training" in result:
        training = result["training"]
        print(f"training: node killed at step {training.get('step_at_kill')}, resumed from step "
              f"{training['killed']['resumed_from_step']}, next validation {seconds(training.get('next_validation_after_kill_s'))}s "
              f"after the kill; same result as uninterrupted: {training['same_result']}")


if __name__ == "__main__":
    main()
