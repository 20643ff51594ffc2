"""Fine-tuning quality levers (`make bench` part): what each lever buys in one run, on the product's
own job (Ray Train + DeepSpeed, 2 workers, SmolLM2-135M-Instruct, the tweets).

Every lever trains for the same budget of training seconds (`train.max_train_seconds`; validations
and checkpoints not counted) and reports training examples/s and the validation macro-F1 of its
learning curve at the end of the budget, on the same validation rows. Levers are cumulative, in
the order listed, so each row shows what its lever adds to the ones above it.

    python -m bench.quality_bench [--budget 300] [--validation 400] [--levers baseline compact ...]

Writes bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cluster.config import load_config
from cluster.ray_cluster import connect
from jobs.data.prepare import prepare_run_inputs
from jobs.config import RunConfig
from jobs.train.run import run_finetune

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO / "bench" / "results" / "quality.json"

# name -> (what it is, the overrides it adds to the levers before it). The first row undoes the
# shipped recipe back to the demo's settings of 2026-11-26; each later row puts one lever back, so
# the SHIPPED_LEVER row is the shipped demo config (a test checks it). Rows after it are candidates,
# measured here before the recipe (and the demo's figures) would change.
OLD_SYSTEM_PROMPT = "Classify the sentiment of the customer's message. Answer with one word: negative, neutral or positive."
LEVERS = {
    "baseline": ("the demo's settings of 2026-11-26: model chat template + long system prompt, lr 5e-5, ZeRO-2, "
                 "every layer trained, natural class mix",
                 ["data.template=model", f'data.system_prompt="{OLD_SYSTEM_PROMPT}"', "train.balance_classes=false",
                  "train.zero_stage=2", "train.trainable_layers=null", "train.freeze_embeddings=false",
                  "train.label_loss_weight=0", "train.learning_rate=5e-5", "train.micro_batch_size=8",
                  "train.gradient_accumulation_steps=2", "train.precision=fp32"]),
    "compact": ("compact template and a short prompt", ["data.template=compact",
                'data.system_prompt="Is this customer message negative, neutral or positive?"']),
    "lr": ("learning rate 3e-4 (constant after warm-up)", ["train.learning_rate=3e-4"]),
    "zero1": ("ZeRO-1 instead of ZeRO-2, micro-batches of 16", ["train.zero_stage=1", "train.micro_batch_size=16",
                                                               "train.gradient_accumulation_steps=1"]),
    "freeze": ("only the top 10 of 30 layers trained, embeddings frozen", ["train.trainable_layers=10", "train.freeze_embeddings=true"]),
    "label_loss": ("plus a cross-entropy over the label words", ["train.label_loss_weight=1.0"]),
    "balance": ("class-balanced training stream", ["train.balance_classes=true"]),
    "bf16": ("bf16 mixed precision (autocast, fp32 weights) on a CPU with bf16 instructions", ["train.precision=auto"]),
}
SHIPPED_LEVER = "bf16"
LEVERS |= {
    "decay": ("the learning rate decays linearly to zero over the time budget", ["train.lr_schedule=linear_budget"]),
}


def lever_config(overrides: list[str], budget: float, validation: int) -> RunConfig:
    return load_config(RunConfig, REPO / "configs" / "airline_sentiment.yaml", [
        f"storage_root={REPO / 'outputs' / 'bench'}", f"model_cache={REPO / 'models'}", "name=quality_bench",
        "train.max_steps=100000", f"train.max_train_seconds={budget}", "train.eval_every=100000",
        "train.lr_schedule=constant", f"train.max_validation_examples={validation}", "tracking.enabled=false",
        *overrides])


def run_lever(cfg: RunConfig) -> dict:
    base_dir, data_dir, manifest = prepare_run_inputs(cfg)
    train_tokens = manifest["splits"]["train"].get("tokens")
    record = run_finetune(cfg, base_dir, data_dir)
    final = record["learning_curve"][-1]
    return {
        "examples_seen": final["examples_seen"], "train_seconds": round(final["train_seconds"], 1),
        "examples_per_s": round(final["examples_seen"] / final["train_seconds"], 2),
        "tokens_per_s": round(record["tokens_per_s"], 1), "time_shares": record["time_shares"], "val_macro_f1": final["val_macro_f1"],
        "val_loss": final["val_loss"], "steps": final["step"], "train_split_tokens": train_tokens,
    }


def markdown_table(results: dict) -> str:
    """The README/figures table: one row per lever, each with what the levers above it already add."""
    lines = ["| lever (cumulative) | examples/s | examples seen | validation macro-F1 |", "|---|---|---|---|"]
    for name, row in results["levers"].items():
        lines.append(f"| {name}: {row['description']} | {row['examples_per_s']:.2f} | {row['examples_seen']:,} | "
                     f"{row['val_macro_f1']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300, help="training seconds per lever")
    parser.add_argument("--validation", type=int, default=400, help="validation rows scored at the end")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    args = parser.parse_args()
    connect()
    results, overrides = {"budget_seconds": args.budget, "validation_rows": args.validation, "levers": {}}, []
    for name in LEVERS:
        overrides += LEVERS[name][1]
        if name not in args.levers:
            continue
        started = time.perf_counter()
        row = {"description": LEVERS[name][0], "overrides": list(overrides),
               **run_lever(lever_config(overrides, args.budget, args.validation))}
        row["wall_seconds"] = round(time.perf_counter() - started, 1)
        results["levers"][name] = row
        print(f"[quality] {name}: {row['examples_per_s']} examples/s, {row['examples_seen']} examples, "
              f"validation macro-F1 {row['val_macro_f1']:.3f} ({row['description']})", flush=True)
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_FILE.write_text(json.dumps(results, indent=2))  # after every lever: a partial run keeps its rows
    print(json.dumps(results, indent=2))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
