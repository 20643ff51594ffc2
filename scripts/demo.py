"""`make demo`: a local Ray cluster, the pipeline submitted as a job, then a live endpoint.

Does exactly what a user does against a remote cluster: `ray job submit --working-dir .`
(without the venv, models, data or outputs), following the job's logs; then classifies a few
messages through the endpoint with the official `openai` client and leaves it running.

    python scripts/demo.py [--smoke] [key=value overrides of the run config ...]

`--smoke` (`make demo-smoke`, run by CI): the same path on the tiny random model and a few hundred
rows, in a few minutes; it checks the path works, not what the model learns.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

from cluster.config import load_config_or_exit
from cluster.contracts import ModelArtifact
from cluster.security import KEY_RECORD_ENV, LOCAL_KEY_ENV, ApiKeyRecord, new_api_key, record_for_key
from cluster.ray_cluster import WORKING_DIR_EXCLUDES, ray_cli, job_client_env, local_head_running, start_local_head
from jobs.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/airline_sentiment.yaml"
MESSAGES = [
    "@united thanks for rebooking me so fast, the gate agent in Denver was fantastic!",
    "@AmericanAir three hours on the tarmac and no one tells us anything. Never again.",
    "@SouthwestAir what time does the first flight from Dallas to Austin leave on Monday?",
    "@JetBlue my bag is lost and your call center hung up on me twice",
]
# The tiny model's settings of the tests (tests/conftest.py), on every 60th tweet of the same corpus.
SMOKE_OVERRIDES = [
    "name=demo_smoke", "model.base=tiny-random", "data.sample_every=60",
    "train.micro_batch_size=4", "train.gradient_accumulation_steps=1", "train.learning_rate=2e-3",
    "train.warmup_steps=1", "train.max_steps=4", "train.eval_every=2", "train.max_validation_examples=16",
    "eval.max_test_examples=24", "serve.check_examples=2", "serve.deploy_unpromoted=true",
    "serve.endpoint.model_id=demo-smoke", "serve.endpoint.max_model_len=256",
    "serve.endpoint.engine_overrides={enforce_eager: true}",
    "explain.examples=2", "explain.dependence_examples=4", "explain.ig_steps=8", "explain.shap_max_evals=20",
    "eval.test_keys=null",  # the pinned keys are rows of the full corpus, not of the sample
]


def compile_caches() -> list[Path]:
    """Where a run leaves compiled code that makes the next one faster: DeepSpeed's JIT-built CPU Adam,
    vLLM's torch.compile cache, torch inductor's kernels and Triton's."""
    home = Path.home()
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"
    return [Path(os.environ.get("TORCH_EXTENSIONS_DIR") or home / ".cache/torch_extensions"),
            Path(os.environ.get("VLLM_CACHE_ROOT") or home / ".cache/vllm"), Path(inductor), home / ".triton"]


def cold_start(outputs: Path, models: Path) -> dict:
    """What this run could reuse from an earlier one. A cold run (the README's figure) has none of it."""
    def has_files(path: Path) -> bool:
        return path.is_dir() and any(path.iterdir())
    warm = [str(path) for path in (outputs, models, *compile_caches()) if has_files(path)]
    return {"cold": not warm, "reused": warm}


def final_job_status(address: str, submission_id: str) -> str:
    """The job's terminal status. `ray job submit` returns when its log stream ends, which can be
    before the job does (seen: it returned 0 with the job RUNNING): wait for the job itself."""
    reported = None
    while True:
        result = subprocess.run([ray_cli(), "job", "status", "--address", address, submission_id],
                                capture_output=True, text=True, env=job_client_env())
        output = result.stdout + result.stderr
        # `ray job status` words the three ends as sentences and any other state as "Status for job ...: X".
        ended = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}
        found = re.search(r"Job '[^']*' (succeeded|failed|was stopped)|Status for job '[^']*': (\w+)", output)
        if not found:
            return f"UNKNOWN (ray job status: {output.strip()[-300:]})"
        status = ended[found.group(1)] if found.group(1) else found.group(2)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        if status != reported:
            print(f"[demo] job {submission_id} is {status}; waiting for it to end (ray job logs --follow {submission_id})", flush=True)
            reported = status
        time.sleep(10)


def demo_key() -> tuple[str, ApiKeyRecord]:
    """The demo's admin key and its record: $LAKEFORGE_API_KEY when set in this shell, else a fresh one.
    The key stays in this process; the job gets only the record (the key's digest)."""
    key = os.environ.get(LOCAL_KEY_ENV)
    if key:
        return key, record_for_key(key, "demo", ["admin"], "lakeforge")
    return new_api_key("demo", ["admin"], "lakeforge", key_id="demo")


def submit_command(address: str, submission_id: str, overrides: list[str], record: ApiKeyRecord) -> list[str]:
    """The `ray job submit` command line. It holds no secret: the job gets the demo key's record (id,
    digest, roles, tenant), never the key, so neither argv nor Ray's job metadata holds one."""
    runtime_env = {"excludes": WORKING_DIR_EXCLUDES, "env_vars": {KEY_RECORD_ENV: record.model_dump_json()}}
    return [
        ray_cli(), "job", "submit", "--address", address, "--submission-id", submission_id, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "-m", "jobs.pipeline", "--config", CONFIG, *overrides,
    ]


def main(argv: list[str]) -> None:
    # `make demo` passes the moment make started (setup included); run by hand, the script's own start.
    started_wall = float(os.environ.get("LAKEFORGE_DEMO_STARTED") or time.time())
    setup_seconds = time.time() - started_wall
    smoke = "--smoke" in argv
    overrides = [*(SMOKE_OVERRIDES if smoke else []), *(arg for arg in argv if arg != "--smoke")]
    outputs, models = REPO / "outputs", REPO / "models"
    overrides = [f"storage_root={outputs}", f"model_cache={models}", *overrides]
    # Validated here, before a cluster starts: a typo in an override fails in a second, by name.
    cfg = load_config_or_exit(RunConfig, ["--config", CONFIG, *overrides])
    start_state = cold_start(outputs, models)
    if smoke and local_head_running():
        sys.exit("a local Ray cluster is already running (a demo?): the smoke check starts and stops its own; "
                 "run `make down` first")
    cluster_started = time.time()
    address = start_local_head()
    cluster_start_seconds = time.time() - cluster_started
    # The endpoint accepts only keys it is told about: the job adds this one's record (its digest) as admin.
    api_key, record = demo_key()
    submission_id = f"lakeforge-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = submit_command(address, submission_id, overrides, record)
    assert api_key not in " ".join(command)
    print("$", " ".join(command), flush=True)  # no secret in it; the key is printed once, at the end
    for attempt in range(12):
        returncode = subprocess.run(command, env=job_client_env(), cwd=REPO).returncode
        status = final_job_status(address, submission_id)
        # A head that has just started may refuse jobs until its job agent is up ("No available
        # agent to submit job"): the job was never created, so the same submission can be retried.
        if not status.startswith("UNKNOWN") or "does not exist" not in status:
            break
        print(f"[demo] the cluster did not take the job yet (attempt {attempt + 1}); retrying in 5 s", flush=True)
        time.sleep(5)
    if returncode != 0 or status != "SUCCEEDED":
        sys.exit(f"the pipeline job {submission_id} ended {status}: its log is above (also: ray job logs {submission_id})")

    summary_path = cfg.run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    version = summary["version"]
    print(f"\nData quality report: {summary['data']['quality_report']}")
    print(f"\nModel version {version['version']}: {'deployable' if version['deployable'] else 'NOT deployable'} "
          f"({version['gate']['reason']})")
    if "url" not in summary["serving"]:
        sys.exit(f"nothing served: {summary['serving']['skipped']}\nReport: {summary['report']}")
    artifact = ModelArtifact.read(summary["model_dir"])
    url = summary["serving"]["url"]
    matches, checked = summary["serving"]["classify_matches_offline"].split("/")
    if matches != checked:
        sys.exit(f"the endpoint's /v1/classify disagrees with the evaluated model on {int(checked) - int(matches)} of "
                 f"{checked} test rows: the served model is not the one evaluated (answers in {summary_path})")
    print(f"Serving version {summary['serving']['version']}")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key)
    # Only the text: the endpoint applies the model folder's system prompt and preprocessing.
    print(f"\nClassifying through {url}/v1/chat/completions with the openai client (the text alone):")
    for text in MESSAGES:
        reply = client.chat.completions.create(
            model=artifact.name, max_tokens=4, temperature=0, messages=[{"role": "user", "content": text}])
        print(f"  {reply.choices[0].message.content.strip():<10} <- {text}")

    scores = summary["test_split"]
    print(f"\nHeld-out test split ({scores['examples']} tweets):")
    for system in ("fine_tuned", "previous_version", "base_zero_shot", "baseline_tfidf_logreg"):
        if system not in scores:
            continue
        low, high = scores[system]["interval_95"]["macro_f1"]
        print(f"  {system:<24} accuracy {scores[system]['accuracy']:.3f}  "
              f"macro-F1 {scores[system]['macro_f1']:.3f} (95% bootstrap interval {low:.3f}-{high:.3f})  "
              f"ECE {scores[system]['expected_calibration_error']:.3f}")
    if "explanations" in summary:
        faithfulness = summary["explanations"]["faithfulness"]
        print(f"\nFaithfulness: deleting the top-attributed words lowers the predicted label's probability by "
              f"{faithfulness['mean_drop_top']:.3f} on average, as many random words by "
              f"{faithfulness['mean_drop_random']:.3f} (gap {faithfulness['gap']:+.3f}, {faithfulness['examples']} tweets)")
    # Recorded beside the pipeline's own wall_seconds (which starts inside the submitted job).
    timing = {"seconds": round(time.time() - started_wall, 1), "setup_seconds": round(setup_seconds, 1),
              "cluster_start_seconds": round(cluster_start_seconds, 1), "pipeline_job_seconds": summary["wall_seconds"],
              "measured_from": "make demo" if os.environ.get("LAKEFORGE_DEMO_STARTED") else "scripts/demo.py", **start_state}
    summary["demo_timing"] = timing
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nThe demo took {timing['seconds'] / 60:.1f} minutes from `{timing['measured_from']}` to the answers above "
          f"(setup {timing['setup_seconds']:.0f} s, cluster start {timing['cluster_start_seconds']:.0f} s, "
          f"the pipeline job {summary['wall_seconds'] / 60:.1f} min), "
          + ("cold: nothing reused from an earlier run" if timing["cold"] else f"NOT cold: reused {', '.join(timing['reused'])}"))
    print(f"Report (metrics, errors, slices, explanations): {summary['report']}")
    print(f"Summary: {summary_path}")
    print(f"Endpoint (still running): {url}/v1  model={artifact.name}  api_key={api_key}")
    print("Ray dashboard: http://127.0.0.1:8265   Stop everything: make down")


if __name__ == "__main__":
    main(sys.argv[1:])
