"""What each Ray Train worker runs: DeepSpeed ZeRO over shards streamed from Ray Data.

Read top to bottom like nanoGPT's train.py: build the engine, loop over streamed batches, log,
validate and checkpoint every `eval_every` steps. One code path for CPU (gloo) and GPU (nccl);
DeepSpeed picks its accelerator from the machine.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from cluster.prompting import pad_token_id, use_template
from jobs.train.batches import Collate
from jobs.train.engine import deepspeed_config, prepare_model, resolve_precision
from jobs.train.export import HF_EXPORT_DIR, PROBE_FILE, PROBE_IDS
from jobs.train.flops import measure_peak_flops, peak_memory_gib, train_flops_per_token
from jobs.train.losses import answer_logits, answer_loss, first_answer_positions
from jobs.train.tracking import MetricLogger

def say(message: str) -> None:
    """One console line from a training worker.

    Ray Train patches `print` on its workers to log each call *and* echo it to the wrapped stdout,
    so every line reached the job's log twice; the process's own stdout takes it once.
    """
    print(message, file=sys.__stdout__, flush=True)


DEEPSPEED_TAG = "deepspeed"
FAULT_MARKER = "fault_injected"
LEARNING_CURVE_FILE = "learning_curve.jsonl"  # in the run folder: one line per validation, by rank 0


def _all_reduce(values: list[float], device, op=torch.distributed.ReduceOp.SUM) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=op)
    return tensor.tolist()


def _validate(engine, shard, micro_batch_size: int, collate_fn, device, num_tasks: int = 1,
              label_ids: list[int] | None = None) -> tuple[float, list[float], float | None]:
    """Mean answer-token loss over all workers' validation shards: overall, and per task (the task
    of each answer token, from `task_ids`; all task 0 in a single-task run). With `label_ids` (each
    label's first token) also the macro-F1 of the most likely label at each answer's first token,
    over the examples whose answer is a label: the learning curve's quality axis."""
    engine.eval()
    loss_sums, tokens = torch.zeros(num_tasks, dtype=torch.float64), torch.zeros(num_tasks, dtype=torch.float64)
    predicted, gold = [], []
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=micro_batch_size, collate_fn=collate_fn):
            batch = {key: value.to(device) for key, value in batch.items()}
            logits, targets, keep = answer_logits(engine, batch)
            losses = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none").cpu().double()
            answer = targets.flatten().cpu() != -100
            task_ids = batch["task_ids"][:, 1:][:, keep].flatten().cpu() if "task_ids" in batch else torch.zeros_like(answer, dtype=torch.long)
            loss_sums.index_add_(0, task_ids[answer], losses[answer])
            tokens.index_add_(0, task_ids[answer], torch.ones(int(answer.sum()), dtype=torch.float64))
            if label_ids:
                rows, first = first_answer_positions(targets)
                gold_tokens = targets[rows, first].tolist()
                scores = logits[rows, first][:, label_ids].argmax(dim=-1).tolist()
                for token, choice in zip(gold_tokens, scores):
                    if token in label_ids:
                        gold.append(label_ids.index(token))
                        predicted.append(choice)
    engine.train()
    totals = _all_reduce([*loss_sums.tolist(), *tokens.tolist()], device)
    loss_sums, tokens = totals[:num_tasks], totals[num_tasks:]
    macro_f1 = None
    if label_ids:
        from sklearn.metrics import f1_score

        pairs = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(pairs, (predicted, gold))
        predicted, gold = [p for pair in pairs for p in pair[0]], [g for pair in pairs for g in pair[1]]
        macro_f1 = float(f1_score(gold, predicted, labels=list(range(len(label_ids))), average="macro",
                                  zero_division=0)) if gold else None
    return sum(loss_sums) / max(sum(tokens), 1), [loss / max(n, 1) for loss, n in zip(loss_sums, tokens)], macro_f1


def _save_checkpoint(engine, zero_stage: int, tokenizer, folder: Path, rank: int, device, position: dict) -> None:
    """Every rank writes its DeepSpeed shard (weights, optimizer, scheduler, step) and its RNG
    state; rank 0 also writes the data position, a Hugging Face export and probe logits."""
    engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, client_state={"position": position})
    torch.save(torch.get_rng_state(), folder / f"rng_rank{rank}.pt")  # dropout draws continue as if never stopped
    # ZeRO-3 weights are partitioned: gathering them is a collective every rank must join.
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    engine.eval()  # dropout off (LoRA has some): the probe is what the exported model must give
    with torch.no_grad():
        probe_logits = engine(input_ids=PROBE_IDS.to(device)).logits[0, -1].float().cpu()
    engine.train()
    if rank == 0:
        export = folder / HF_EXPORT_DIR
        module = engine.module
        module.save_pretrained(export, state_dict=state_dict if state_dict is not None else module.state_dict(), safe_serialization=True)
        tokenizer.save_pretrained(export)
        torch.save(probe_logits, folder / PROBE_FILE)


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = config["train"]
    task_names = config.get("task_names") or ["primary"]
    multi_task = len(task_names) > 1
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    examples_per_step = train["micro_batch_size"] * train["gradient_accumulation_steps"] * world_size
    device = ray.train.torch.get_device()
    torch.manual_seed(train["seed"])
    torch.set_num_threads(max(1, int(train["cpus_per_worker"])))

    # With the run's chat template: the checkpoints' export carries it to serving.
    tokenizer = use_template(AutoTokenizer.from_pretrained(config["base_model_dir"]), config["template"])
    pad_id = pad_token_id(tokenizer)
    precision = resolve_precision(train["precision"], train["use_gpu"])
    # Weights stay fp32 for fp16 training: DeepSpeed keeps fp32 masters and casts itself.
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = prepare_model(AutoModelForCausalLM.from_pretrained(config["base_model_dir"], dtype=dtype), train)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    # Counted before DeepSpeed: ZeRO-3 partitions parameters, leaving each rank's tensors empty.
    flops_per_token = train_flops_per_token(model, train["method"])
    trainable_count, total_count = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=deepspeed_config(train, world_size, precision),
    )
    peak_flops = train["peak_flops_per_worker"] or measure_peak_flops(device, dtype)
    tracker = MetricLogger(config["tracking_uri"], config["tracking_run_id"]) if rank == 0 else MetricLogger(None, None)
    if rank == 0:
        say(f"[train] method {train['method']}, precision {precision}: "
            f"{trainable_count:,} of {total_count:,} parameters trainable; "
            f"{flops_per_token / 1e9:.2f} GFLOP per token, peak {peak_flops / 1e9:.1f} GFLOP/s per worker")

    # Where each rank runs (Ray node ids), reported with the metrics: placement is checkable.
    worker_nodes = [None] * world_size
    torch.distributed.all_gather_object(worker_nodes, ray.get_runtime_context().get_node_id())
    train_shard = ray.train.get_dataset_shard("train")
    validation_shard = ray.train.get_dataset_shard("validation")
    packed_length = train["packed_length"] if train["packing"] else None
    collate_fn = Collate(pad_id, packed_length)  # the shards stay one example per row
    batches = lambda: train_shard.iter_torch_batches(  # noqa: E731 - a fresh pass per epoch
        batch_size=train["micro_batch_size"], collate_fn=collate_fn,
    )

    # Resume: after a worker or job failure Ray Train hands back the latest reported checkpoint;
    # a run restarted by hand names one. Weights, optimizer, scheduler, step, RNG and the data
    # position all come back, so the run continues as if it had never stopped.
    checkpoint = ray.train.get_checkpoint() or config["resume_checkpoint"]
    position = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "total_tokens": 0.0, "total_slots": 0.0, "compute_seconds": 0.0,
                "warmup_tokens": 0.0, "warmup_seconds": 0.0, "task_examples": [0.0] * len(task_names)}
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _, client_state = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)
            position = client_state["position"]
            torch.set_rng_state(torch.load(Path(folder) / f"rng_rank{rank}.pt"))
        if rank == 0:
            say(f"[train] resumed from step {position['step']} (epoch {position['epoch']}, "
                f"{position['batches_in_epoch']} micro-batches into it)")

    fault_marker = Path(config["storage_dir"]) / FAULT_MARKER
    resumed_from_step = position["step"]
    step, epoch, step_at_window_start = position["step"], position["epoch"], position["step"]
    skip_batches = position["batches_in_epoch"]
    last_train_loss = float("nan")
    # All workers' tokens; time spent in training steps only.
    # Slots: token positions computed, padding included (packing makes them fewer for the same tokens).
    total_tokens, total_slots, compute_seconds = position["total_tokens"], position["total_slots"], position["compute_seconds"]
    # Each attempt's first logged window also waits for the data pipeline's first batch and
    # allocates the optimizer state: steady_tokens_per_s leaves those windows out.
    warmup_tokens, warmup_seconds = position.get("warmup_tokens", 0.0), position.get("warmup_seconds", 0.0)
    first_window, first_batch_seconds = True, None
    window_loss, window_micro, window_tokens, window_slots = 0.0, 0, 0, 0
    # Training examples per task: all workers' count at the checkpoint resumed from, plus this worker's since.
    task_examples_before = position.get("task_examples", [0.0] * len(task_names))
    task_examples = torch.zeros(len(task_names), dtype=torch.float64)
    window_start = run_start = time.perf_counter()
    out_of_time = False  # max_train_seconds reached (decided together: the slowest rank's clock)
    while step < train["max_steps"] and not out_of_time:
        for batch_index, batch in enumerate(batches()):
            if first_batch_seconds is None:
                first_batch_seconds = time.perf_counter() - run_start
            if batch_index < skip_batches:
                continue  # consumed before the checkpoint this run resumed from (same order: no shuffle)
            if multi_task:
                task_examples += torch.bincount(batch["example_tasks"], minlength=len(task_names)).double()
            batch = {key: value.to(device) for key, value in batch.items()}
            loss = answer_loss(engine, batch, config.get("label_first_token_ids"), train["label_loss_weight"])
            engine.backward(loss)
            engine.step()
            window_loss += loss.detach().item()  # detached: torch warns on a scalar taken from a tensor that requires grad
            window_micro += 1
            window_tokens += int(batch["attention_mask"].sum())
            window_slots += batch["attention_mask"].numel()
            if engine.global_steps == step:
                continue  # still accumulating gradients
            step = engine.global_steps
            if train["max_train_seconds"]:
                (trained,) = _all_reduce([compute_seconds + time.perf_counter() - window_start], device,
                                         op=torch.distributed.ReduceOp.MAX)
                out_of_time = trained >= train["max_train_seconds"]
            if step == train["fault_at_step"] and rank == world_size - 1 and not fault_marker.exists():
                fault_marker.touch()  # once per run: the restarted worker group must get past this step
                raise RuntimeError(f"fault drill: worker {rank} fails at step {step} (train.fault_at_step)")

            if step % train["log_every"] == 0 or step == train["max_steps"] or out_of_time:
                loss_sum, micro, tokens, slots = _all_reduce([window_loss, window_micro, window_tokens, window_slots], device)
                (memory,) = _all_reduce([peak_memory_gib(device)], device, op=torch.distributed.ReduceOp.MAX)
                elapsed = time.perf_counter() - window_start
                steps_in_window = step - step_at_window_start
                mfu = tokens / elapsed * flops_per_token / (peak_flops * world_size)
                if rank == 0:
                    say(f"[train] step {step}/{train['max_steps']} epoch {epoch} loss {loss_sum / micro:.4f} "
                        f"lr {engine.get_lr()[0]:.2e} tokens/s {tokens / elapsed:.0f} MFU {mfu:.1%} "
                        f"peak mem {memory:.2f} GiB elapsed {time.perf_counter() - run_start:.0f}s")
                    tracker.log({"train_loss": loss_sum / micro, "learning_rate": engine.get_lr()[0],
                                 "tokens_per_s": tokens / elapsed, "step_seconds": elapsed / max(steps_in_window, 1),
                                 "mfu": mfu, "peak_memory_gib_max_worker": memory}, step)
                step_at_window_start = step
                last_train_loss = loss_sum / micro
                total_tokens += tokens
                total_slots += slots
                compute_seconds += elapsed
                if first_window:
                    warmup_tokens, warmup_seconds, first_window = warmup_tokens + tokens, warmup_seconds + elapsed, False
                window_loss, window_micro, window_tokens, window_slots = 0.0, 0, 0, 0
                window_start = time.perf_counter()

            if step % train["eval_every"] == 0 or step == train["max_steps"] or out_of_time:
                val_loss, task_losses, val_macro_f1 = _validate(
                    engine, validation_shard, train["micro_batch_size"], collate_fn, device, len(task_names),
                    config.get("label_first_token_ids"))
                (memory,) = _all_reduce([peak_memory_gib(device)], device, op=torch.distributed.ReduceOp.MAX)
                seen = [before + now for before, now in zip(task_examples_before, _all_reduce(task_examples.tolist(), device))]
                per_task = {}
                if multi_task:
                    per_task = {**{f"val_loss/{name}": loss for name, loss in zip(task_names, task_losses)},
                                **{f"train_examples/{name}": n for name, n in zip(task_names, seen)}}
                if rank == 0:
                    by_task = "".join(f" {name} {loss:.4f}" for name, loss in zip(task_names, task_losses)) if multi_task else ""
                    f1_text = f" macro-F1 {val_macro_f1:.3f}" if val_macro_f1 is not None else ""
                    say(f"[train] step {step} validation loss {val_loss:.4f}{f1_text}{by_task} "
                        f"({step * examples_per_step:,} examples seen)")
                    tracker.log({"val_loss": val_loss, **per_task,
                                 **({"val_macro_f1": val_macro_f1} if val_macro_f1 is not None else {})}, step)
                    with (Path(config["storage_dir"]) / LEARNING_CURVE_FILE).open("a") as curve:
                        curve.write(json.dumps({"step": step, "examples_seen": step * examples_per_step,
                                                "train_tokens": total_tokens, "train_seconds": compute_seconds,
                                                "val_loss": val_loss, "val_macro_f1": val_macro_f1}) + "\n")
                metrics = {
                    "step": step, "epoch": epoch, "resumed_from_step": resumed_from_step, "precision": precision, "val_loss": val_loss, "train_loss": last_train_loss,
                    "val_macro_f1": val_macro_f1, "examples_seen": step * examples_per_step,
                    "train_tokens": total_tokens, "non_padding_share": total_tokens / max(total_slots, 1), "worker_nodes": worker_nodes,
                    "tokens_per_s": total_tokens / max(compute_seconds, 1e-9),
                    "steady_tokens_per_s": (total_tokens - warmup_tokens) / (compute_seconds - warmup_seconds)
                    if compute_seconds > warmup_seconds else None,
                    "first_batch_seconds": first_batch_seconds,
                    "train_seconds": time.perf_counter() - run_start, "peak_memory_gib_max_worker": memory,
                    "mfu": total_tokens / max(compute_seconds, 1e-9) * flops_per_token / (peak_flops * world_size),
                    **per_task,
                }
                with tempfile.TemporaryDirectory() as folder:
                    position = {"step": step, "epoch": epoch, "batches_in_epoch": batch_index + 1,
                                "total_tokens": total_tokens, "total_slots": total_slots, "compute_seconds": compute_seconds,
                                "warmup_tokens": warmup_tokens, "warmup_seconds": warmup_seconds, "task_examples": seen}
                    _save_checkpoint(engine, train["zero_stage"], tokenizer, Path(folder), rank, device, position)
                    # report() is not a barrier (ray PR #42422): wait until every shard is on disk.
                    torch.distributed.barrier()
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
                window_start = time.perf_counter()  # validation and saving are not training throughput
            if step >= train["max_steps"] or out_of_time:
                break
        epoch += 1
        skip_batches = 0
