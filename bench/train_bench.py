"""Training benchmarks (`make bench`): both sides measured in one run, ratios printed.

1. Useful tokens/s (non-padding tokens through forward+backward+step) of the 2-worker Ray Train +
   DeepSpeed job vs a plain single-process PyTorch loop with the same model, data order, batch
   sizes, optimizer, precision, steps and total threads (2 workers x 1 thread vs 1 process x 2
   threads): at the demo's settings (ZeRO-1, global batch 32) and at a global batch of 128. Both
   over all steps and "steady" (without the first step,
   which on the Ray side waits for the data pipeline's first batch; both sides allocate the
   optimizer state in it).
2. Peak memory per worker (peak RSS on CPU) for ZeRO-1/2/3 full fine-tuning and for LoRA.
3. Sequence packing vs padding on the tweets: the share of computed token slots that are real
   (non-padding) tokens over the whole train split, and useful tokens/s of the same 2-worker job
   with each (same examples per step).

    python -m bench.train_bench [--steps 6] [--parts throughput memory packing]
    # SmolLM2-135M-Instruct, the tweets; ~20 min on 2 cores for all parts
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
from cluster.prompting import pad_token_id
from cluster.ray_cluster import connect
from jobs.data.prepare import prepare_run_inputs
from jobs.config import RunConfig
from jobs.train.run import label_first_token_ids, run_finetune
from jobs.train.batches import collate
from jobs.train.engine import prepare_model, resolve_precision
from jobs.train.losses import answer_loss

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO / "bench" / "results" / "training.json"


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
    # The job's own freezing (trainable_layers, freeze_embeddings, LoRA): the same parameters train.
    model = prepare_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), train.model_dump()).train()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay)
    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * train.num_workers
    rows = pd.read_parquet(data_dir / "train").head(global_batch * train.max_steps)
    micro_batches = [rows.iloc[i: i + train.micro_batch_size] for i in range(0, len(rows), train.micro_batch_size)]
    accumulation = global_batch // train.micro_batch_size
    label_ids = label_first_token_ids(cfg, base_dir)
    tokens, started = 0, time.perf_counter()
    first_step = None  # (tokens, seconds) when the first optimizer step is done
    # The job's precision on this CPU: bf16 autocast over fp32 weights where the CPU has bf16 instructions.
    autocast = resolve_precision(train.precision, use_gpu=False) == "bf16"
    for index, frame in enumerate(micro_batches):
        batch = collate({"input_ids": frame["input_ids"].to_numpy(), "prompt_len": frame["prompt_len"].to_numpy()},
                        pad_token_id(tokenizer))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = answer_loss(model, batch, label_ids, train.label_loss_weight) / accumulation
        loss.backward()
        tokens += int(batch["attention_mask"].sum())
        if (index + 1) % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(trainable, train.gradient_clipping)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            first_step = first_step or (tokens, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "autocast_bf16": autocast,
            "steady_tokens_per_s": (tokens - first_step[0]) / (seconds - first_step[1]) if train.max_steps > 1 else None,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def packing_share(data_dir: Path, micro_batch_size: int, packed_length: int | None) -> float:
    """Real tokens / computed token slots over the train split, in the job's micro-batches."""
    frame = pd.read_parquet(data_dir / "train", columns=["input_ids", "prompt_len"])
    real = slots = 0
    for start in range(0, len(frame), micro_batch_size):
        rows = frame.iloc[start: start + micro_batch_size]
        batch = collate({"input_ids": rows["input_ids"].to_numpy(), "prompt_len": rows["prompt_len"].to_numpy()},
                        pad_id=0, packed_length=packed_length)
        real += int(batch["attention_mask"].sum())
        slots += batch["attention_mask"].numel()
    return real / slots


def packing_bench(steps: int, base_dir: Path, data_dir: Path) -> dict:
    cfg = bench_config(steps)
    shares = {}
    for micro in sorted({cfg.train.micro_batch_size, 32}):
        shares[f"micro_batch_{micro}"] = {
            "padding": packing_share(data_dir, micro, None),
            "packing": packing_share(data_dir, micro, cfg.train.packed_length)}
        print(f"[bench] non-padding share of token slots, micro-batch {micro}: padding "
              f"{shares[f'micro_batch_{micro}']['padding']:.1%}, packing {shares[f'micro_batch_{micro}']['packing']:.1%}")
    runs = {}
    for name, overrides in {"padding": [], "packing": ["train.packing=true"]}.items():
        record = run_finetune(bench_config(steps, *overrides), base_dir, data_dir)
        runs[name] = {"tokens_per_s": record["tokens_per_s"], "tokens": record["train_tokens"],
                      "non_padding_share_trained": record["final"]["non_padding_share"],
                      "final_train_loss": record["final"]["train_loss"], "final_val_loss": record["final"]["val_loss"]}
    ratio = runs["packing"]["tokens_per_s"] / runs["padding"]["tokens_per_s"]
    print(f"[bench] useful tokens/s (micro-batch {cfg.train.micro_batch_size}, packed_length {cfg.train.packed_length}): "
          f"padding {runs['padding']['tokens_per_s']:.1f}, packing {runs['packing']['tokens_per_s']:.1f}: ratio {ratio:.2f}")
    return {"non_padding_share": shares, "runs": runs, "ratio_packing_over_padding": ratio,
            "packed_length": cfg.train.packed_length}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per measured run")
    parser.add_argument("--parts", nargs="+", choices=["throughput", "memory", "packing"],
                        default=["throughput", "memory", "packing"], help="which measurements to run")
    args = parser.parse_args()
    connect()
    cfg = bench_config(args.steps)
    base_dir, data_dir, _ = prepare_run_inputs(cfg)
    # A run of some parts keeps the other parts' last results.
    result = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.is_file() else {}
    result.update({"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": args.steps, "model": cfg.model.base,
                   "machine": {"cpus": torch.get_num_threads(), "note": "CPU only; peak memory is the worker process's peak RSS"}})
    if "packing" in args.parts:
        result["packing"] = packing_bench(args.steps, base_dir, data_dir)
        write_results(result)
    if "throughput" in args.parts:
        result["throughput"] = throughput_bench(args.steps, base_dir, data_dir)
        write_results(result)
    if "memory" in args.parts:
        result["peak_memory"] = memory_bench(base_dir, data_dir)
        write_results(result)


def write_results(result: dict) -> None:
    """Written after each part, so a long run that is stopped keeps what it measured."""
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(result, indent=2))
    print(f"[bench] results: {RESULTS_FILE}")


def throughput_bench(steps: int, base_dir: Path, data_dir: Path) -> dict:
    """Plain PyTorch and the Ray Train + DeepSpeed job at each global batch, in one run."""
    throughput = {}
    # The demo's settings (ZeRO-1, micro-batches of 16, global batch 32), then a 4x larger global batch.
    for accumulation, stages in ((1, (1,)), (4, (1,))):
        batch_overrides = [f"train.gradient_accumulation_steps={accumulation}"]
        cfg = bench_config(steps, *batch_overrides)
        global_batch = cfg.train.micro_batch_size * accumulation * cfg.train.num_workers
        plain = plain_pytorch_tokens_per_s(cfg, base_dir, data_dir)
        runs = {"plain_pytorch_1_process": plain}
        for stage in stages:
            record = run_finetune(bench_config(steps, *batch_overrides, f"train.zero_stage={stage}"), base_dir, data_dir)
            runs[f"ray_train_deepspeed_zero{stage}_2_workers"] = {
                key: record[key] for key in ("tokens_per_s", "steady_tokens_per_s", "first_batch_seconds", "train_tokens")}
            for measure in ("tokens_per_s", "steady_tokens_per_s"):
                runs[f"zero{stage}_ratio_{measure}"] = record[measure] / plain[measure]
            print(f"[bench] global batch {global_batch}, useful tokens/s, all {steps} steps / steady (without step 1): "
                  f"Ray Train + DeepSpeed ZeRO-{stage} (2 workers x 1 thread) {record['tokens_per_s']:.1f} / "
                  f"{record['steady_tokens_per_s']:.1f}, plain PyTorch (1 process x 2 threads) {plain['tokens_per_s']:.1f} / "
                  f"{plain['steady_tokens_per_s']:.1f}: ratios {runs[f'zero{stage}_ratio_tokens_per_s']:.2f} / "
                  f"{runs[f'zero{stage}_ratio_steady_tokens_per_s']:.2f}; first batch after {record['first_batch_seconds']:.1f} s")
        throughput[f"global_batch_{global_batch}"] = runs
    return throughput


def memory_bench(base_dir: Path, data_dir: Path) -> dict:
    memory = {}
    for name, overrides in {
        "zero1_full": ["train.zero_stage=1"], "zero2_full": ["train.zero_stage=2"],
        "zero3_full": ["train.zero_stage=3"],
        "zero2_lora": ["train.zero_stage=2", "train.method=lora", "train.trainable_layers=null", "train.freeze_embeddings=false",
                       "train.learning_rate=2e-4"],
    }.items():
        record = run_finetune(bench_config(2, *overrides), base_dir, data_dir)
        memory[name] = {"peak_rss_gib_max_worker": record["peak_memory_gib_max_worker"], "tokens_per_s": record["tokens_per_s"]}
        print(f"[bench] {name}: peak memory per worker {record['peak_memory_gib_max_worker']:.2f} GiB, "
              f"{record['tokens_per_s']:.1f} tokens/s")
    reference = memory["zero1_full"]["peak_rss_gib_max_worker"]
    for name, row in memory.items():
        row["ratio_to_zero1_full"] = row["peak_rss_gib_max_worker"] / reference
    print(json.dumps({"memory_ratio_to_zero1": {k: round(v["ratio_to_zero1_full"], 3) for k, v in memory.items()}}))
    return memory


if __name__ == "__main__":
    main()
