"""`/v1/classify` against the evaluation's own offline label scoring, one run (`make bench`).

The same held-out tweets, the same model folder (a classification model: `make demo`'s), the same
prompts (the folder's system prompt, template and preprocessing), measured one after the other on
this machine:

1. offline: `jobs.evaluation.scoring.score_labels`, the evaluation's scorer (transformers, one
   forward pass per batch of prompts, every label scored from it), on all cores, batches of 16;
2. the endpoint as the demo ships it (`serving.app:build_app`, Ray Serve LLM + vLLM behind the
   gateway, with the pipeline's own admin key): closed loops of 1 and 32 clients, each request
   one text (`{"text": ...}`), and one client sending `texts` of 32 per request.

Reported: texts/s for each, latency p50/p99 per request, and the share of texts where the
endpoint's label equals the offline scorer's (the two must agree: the same model, prompt and label
words; small differences come from vLLM's and transformers' kernels on near-ties).

    python -m bench.classify_bench [--model-dir outputs/registry/airline_sentiment/v0001] [--texts 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.serve_bench import held_out_tweets, percentiles
from bench.vllm_serve_bench import MODEL_ID, wait_for_first_answer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
OFFLINE_BATCH = 16  # the evaluation's default batch size (eval.batch_size)


def classification_prompts(model_dir: Path, texts: list[str]) -> tuple[list[list[int]], list[list[int]], list[str], int]:
    """The prompts /v1/classify builds for `texts` (preprocessed as in training), the label words' ids,
    the labels and the padding token's id."""
    from transformers import AutoTokenizer

    from cluster.contracts import ModelArtifact
    from cluster.prompting import label_token_ids, pad_token_id, prompt_ids
    from cluster.text import Preprocessor

    artifact = ModelArtifact.read(model_dir)
    if not artifact.labels:
        raise SystemExit(f"{model_dir} is not a classification model folder (its lakeforge_model.json has no labels)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    preprocess = Preprocessor(artifact.preprocessing)
    prompts = [prompt_ids(tokenizer, artifact.system_prompt, preprocess(text)) for text in texts]
    return prompts, label_token_ids(tokenizer, artifact.labels), artifact.labels, pad_token_id(tokenizer)


def run_offline(model_dir: Path, texts: list[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.evaluation.scoring import score_labels

    prompts, labels, label_words, pad = classification_prompts(model_dir, texts)
    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    score_labels(model, prompts[:OFFLINE_BATCH], labels, pad)  # warm-up: first-call allocations are not the scorer's speed
    started = time.perf_counter()
    predicted = []
    for start in range(0, len(prompts), OFFLINE_BATCH):
        scores = score_labels(model, prompts[start:start + OFFLINE_BATCH], labels, pad)
        predicted += [label_words[i] for i in scores.argmax(dim=1).tolist()]
    seconds = time.perf_counter() - started
    return {"texts": len(texts), "seconds": seconds, "texts_per_s": len(texts) / seconds, "labels": predicted,
            "batch_size": OFFLINE_BATCH, "threads": torch.get_num_threads()}


async def closed_loop(base_url: str, key: str, texts: list[str], clients: int, per_request: int) -> dict:
    """`clients` loops, each sending the next `per_request` texts as soon as its last answer came."""
    import httpx

    batches = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    pending = iter(range(len(batches)))
    labels: list[list[str] | None] = [None] * len(batches)
    latencies, failures = [], []

    async def client_loop(http):
        for index in pending:
            body = {"model": MODEL_ID, **({"text": batches[index][0]} if per_request == 1 else {"texts": batches[index]})}
            sent = time.perf_counter()
            response = await http.post(f"{base_url}/v1/classify", json=body, headers={"Authorization": f"Bearer {key}"})
            latencies.append(time.perf_counter() - sent)
            if response.status_code != 200:
                failures.append(f"{response.status_code}: {response.text[:200]}")
                continue
            labels[index] = [result["label"] for result in response.json()["results"]]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
    answered = [label for batch in labels if batch for label in batch]
    return {"clients": clients, "texts_per_request": per_request, "texts": len(answered), "failed_requests": len(failures),
            "failures": failures[:5], "seconds": seconds, "texts_per_s": len(answered) / seconds,
            "latency_s": percentiles(latencies),
            "labels": [label for batch in labels for label in (batch or [None] * per_request)][:len(texts)]}


def run_endpoint(model_dir: Path, texts: list[str], args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from cluster.contracts import EndpointSettings
    from cluster.endpoints import deploy, with_local_key
    from cluster.ray_cluster import connect

    key, settings = with_local_key(EndpointSettings.model_validate({
        "model_id": MODEL_ID, "model_dir": str(model_dir), "port": args.port, "app_name": "classify-bench",
        "security": {"open_routes": ["/health"], "audit": {"path": str(Path(args.work) / "audit.jsonl")}}}))
    os.environ.pop("RAY_ADDRESS", None)  # an embedded cluster, never someone else's
    started = time.perf_counter()
    connect()
    try:
        base_url = deploy("serving.app:build_app", settings)
        ready = wait_for_first_answer(base_url, key, started, args.start_timeout)
        print(f"[bench] endpoint answered {ready:.0f}s after the cluster start")
        asyncio.run(closed_loop(base_url, key, texts[:8], 1, 1))  # warm-up: the first requests pay for lazy setup
        loops = {}
        for name, clients, per_request in (("1_client", 1, 1), ("32_clients", 32, 1), ("1_client_batches_of_32", 1, 32)):
            loops[name] = asyncio.run(closed_loop(base_url, key, texts, clients, per_request))
            row = loops[name]
            print(f"[bench] /v1/classify {name}: {row['texts_per_s']:.1f} texts/s, "
                  f"latency p50 {row['latency_s']['p50']:.2f}s p99 {row['latency_s']['p99']:.2f}s, "
                  f"{row['failed_requests']} failed")
        return {"ready_seconds": ready, "max_num_seqs": settings.max_num_seqs, "loops": loops}
    finally:
        serve.shutdown()
        ray.shutdown()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(REPO / "outputs" / "airline_sentiment" / "model"),
                        help="a classification model folder (default: the one `make demo` exported)")
    parser.add_argument("--texts", type=int, default=256, help="held-out tweets classified by each system")
    parser.add_argument("--port", type=int, default=8163)
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--work", default="", help="the audit file (default: a fresh temporary folder)")
    parser.add_argument("--output", default=str(RESULTS / "classify_bench.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise SystemExit(f"--model-dir {model_dir} is not a folder: run `make demo` first, or name a classification model folder")
    args.work = args.work or tempfile.mkdtemp(prefix="classify_bench_")
    texts = held_out_tweets(args.texts)
    offline = run_offline(model_dir, texts)
    print(f"[bench] offline label scoring: {offline['texts_per_s']:.1f} texts/s ({offline['threads']} threads)")
    endpoint = run_endpoint(model_dir, texts, args)
    ratios, agreement = {}, {}
    for name, row in endpoint["loops"].items():
        ratios[name] = row["texts_per_s"] / offline["texts_per_s"]
        agreement[name] = float(np.mean([a == b for a, b in zip(row.pop("labels"), offline["labels"])]))
    offline.pop("labels")
    print(f"\n{'system':34} {'texts/s':>8} {'/offline':>9} {'same label':>11}")
    print(f"{'offline label scoring':34} {offline['texts_per_s']:8.1f} {1.0:9.2f} {'':>11}")
    for name, row in endpoint["loops"].items():
        print(f"{'/v1/classify ' + name:34} {row['texts_per_s']:8.1f} {ratios[name]:9.2f} {agreement[name]:11.1%}")
    print("goal: /v1/classify at 32 clients within 2x of offline label scoring (ratio >= 0.5)")
    result = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model_dir": str(model_dir), "texts": len(texts),
              "cpus": os.cpu_count(), "offline": offline, "endpoint": endpoint,
              "endpoint_over_offline_texts_per_s": ratios, "same_label_as_offline": agreement,
              "goal": {"32_clients_over_offline": 0.5}}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"[bench] results: {args.output}")


if __name__ == "__main__":
    main()
