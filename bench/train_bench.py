"""Training benchmarks (`make bench`): both sides measured in one run, ratios printed.

1. Useful tokens/s (non-padding tokens through forward+backward+step) of the 2-worker Ray Train +
   DeepSpeed job vs a plain single-process PyTorch loop with the same model, data order, batch
   sizes, optimizer, steps and total threads (2 workers x 1 thread vs 1 process x 2 threads).
2. Peak memory per worker (peak RSS on CPU) for ZeRO-1/2/3 full fine-tuning and for LoRA.

    python -m bench.train_bench [--steps 6]      # SmolLM2-135M-Instruct, the tweets; ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import pandas as pd
import torch

from cluster.config import load_config
from cluster.ray_cluster import connect
from jobs import data
from jobs.config import RunConfig
from jobs.finetune import run_finetune
from jobs.train_loop import answer_loss, collate

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def bench_config(steps: int, *overrides: str) -> RunConfig:
    return load_config(RunConfig, REPO / "configs" / "airline_sentiment.yaml", [
        f"storage_root={REPO / 'outputs' / 'bench'}", f"model_cache={REPO / 'models'}", "name=train_bench",
        f"train.max_steps={steps}", f"train.eval_every={steps}", "train.warmup_steps=1",
        "train.max_validation_examples=16", "tracking.enabled=false", *overrides])


def plain_pytorch_tokens_per_s(cfg: RunConfig, base_dir: Path, data_dir: Path) -> dict:
    """The same optimization in one process: AdamW, same micro-batch, accumulation and global batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = cfg.train
    torch.manual_seed(train.seed)
    torch.set_num_threads(int(train.cpus_per_worker * train.num_workers))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * train.num_workers
    rows = pd.read_parquet(data_dir / "train").head(global_batch * train.max_steps)
    micro_batches = [rows.iloc[i: i + train.micro_batch_size] for i in range(0, len(rows), train.micro_batch_size)]
    accumulation = global_batch // train.micro_batch_size
    tokens, started = 0, time.perf_counter()
    for index, frame in enumerate(micro_batches):
        batch = collate({"input_ids": frame["input_ids"].to_numpy(), "prompt_len": frame["prompt_len"].to_numpy()},
                        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        (answer_loss(model, batch) / accumulation).backward()
        tokens += int(batch["attention_mask"].sum())
        if (index + 1) % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.gradient_clipping)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per measured run")
    args = parser.parse_args()
    connect()
    cfg = bench_config(args.steps)
    base_dir, data_dir, _ = data.prepare_run_inputs(cfg)

    ray_run = run_finetune(cfg, base_dir, data_dir)
    plain = plain_pytorch_tokens_per_s(cfg, base_dir, data_dir)
    throughput = {
        "ray_train_deepspeed_2_workers": {"tokens_per_s": ray_run["tokens_per_s"], "tokens": ray_run["train_tokens"]},
        "plain_pytorch_1_process": plain,
        "ratio_ray_over_plain": ray_run["tokens_per_s"] / plain["tokens_per_s"],
        "overhead": 1 - ray_run["tokens_per_s"] / plain["tokens_per_s"],
    }
    print(f"[bench] useful tokens/s: Ray Train + DeepSpeed (2 workers x 1 thread) {ray_run['tokens_per_s']:.1f}, "
          f"plain PyTorch (1 process x 2 threads) {plain['tokens_per_s']:.1f}: ratio {throughput['ratio_ray_over_plain']:.2f}")

    memory = {}
    for name, overrides in {
        "zero1_full": ["train.zero_stage=1"], "zero2_full": ["train.zero_stage=2"],
        "zero3_full": ["train.zero_stage=3"], "zero2_lora": ["train.zero_stage=2", "train.method=lora", "train.learning_rate=2e-4"],
    }.items():
        record = run_finetune(bench_config(2, *overrides), base_dir, data_dir)
        memory[name] = {"peak_rss_gib_max_worker": record["peak_memory_gib_max_worker"], "tokens_per_s": record["tokens_per_s"]}
        print(f"[bench] {name}: peak memory per worker {record['peak_memory_gib_max_worker']:.2f} GiB, "
              f"{record['tokens_per_s']:.1f} tokens/s")
    reference = memory["zero1_full"]["peak_rss_gib_max_worker"]
    for name, row in memory.items():
        row["ratio_to_zero1_full"] = row["peak_rss_gib_max_worker"] / reference
    result = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": args.steps,
              "model": cfg.model.base, "throughput": throughput, "peak_memory": memory,
              "machine": {"cpus": torch.get_num_threads(), "note": "CPU only; peak memory is the worker process's peak RSS"}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "training.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({"throughput_ratio": throughput["ratio_ray_over_plain"],
                      "memory_ratio_to_zero1": {k: round(v["ratio_to_zero1_full"], 3) for k, v in memory.items()}}, indent=2))
    print(f"[bench] results: {path}")


if __name__ == "__main__":
    main()
