"""What each Ray Train worker runs: DeepSpeed ZeRO over shards streamed from Ray Data.

Read top to bottom like nanoGPT's train.py: build the engine, loop over streamed batches, log,
validate and checkpoint every `eval_every` steps. One code path for CPU (gloo) and GPU (nccl);
DeepSpeed picks its accelerator from the machine.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from cluster.prompting import pad_token_id, use_template
from jobs.tracking import MetricLogger


def say(message: str) -> None:
    """One console line from a training worker.

    Ray Train patches `print` on its workers to log each call *and* echo it to the wrapped stdout,
    so every line reached the job's log twice; the process's own stdout takes it once.
    """
    print(message, file=sys.__stdout__, flush=True)

HF_EXPORT_DIR = "hf_model"
DEEPSPEED_TAG = "deepspeed"
FAULT_MARKER = "fault_injected"
PROBE_FILE = "probe_logits.pt"
LEARNING_CURVE_FILE = "learning_curve.jsonl"  # in the run folder: one line per validation, by rank 0
# A fixed input whose logits are saved beside each export: reloading the export must reproduce them.
PROBE_IDS = torch.arange(1, 33).unsqueeze(0)


def resolve_precision(requested: str, use_gpu: bool) -> str:
    """'auto' -> fp32 on CPU; on GPU bf16 where supported (Ampere and newer), else fp16."""
    if requested != "auto":
        return requested
    if not use_gpu:
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def deepspeed_config(train: dict, world_size: int, precision: str) -> dict:
    """DeepSpeed config from the typed train section, with the expert overrides merged last."""
    if train["optimizer"] == "adamw":
        # torch_adam: PyTorch's AdamW instead of DeepSpeed's compiled CPU/fused Adam ops, which
        # would need a JIT build on every fresh node (also with offload: slower, but no build).
        optimizer = {"type": "AdamW", "params": {
            "lr": train["learning_rate"], "weight_decay": train["weight_decay"],
            "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}}
    else:  # DeepSpeed takes any torch.optim class by name
        optimizer = {"type": "SGD", "params": {
            "lr": train["learning_rate"], "momentum": train["momentum"], "weight_decay": train["weight_decay"]}}
    if train["lr_schedule"] == "linear":
        scheduler = {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": train["learning_rate"], "warmup_num_steps": train["warmup_steps"],
            "total_num_steps": train["max_steps"], "warmup_type": "linear"}}
    elif train["lr_schedule"] == "constant":
        # DeepSpeed's WarmupLR needs at least one warm-up step (its step 0 is at warmup_min_lr either way).
        scheduler = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": train["learning_rate"],
            "warmup_num_steps": max(train["warmup_steps"], 1), "warmup_type": "linear"}}
    else:  # ratios of the optimizer's own lr
        scheduler = {"type": "WarmupCosineLR", "params": {
            "warmup_min_ratio": 0.0, "warmup_num_steps": train["warmup_steps"], "total_num_steps": train["max_steps"],
            "cos_min_ratio": 0.0, "warmup_type": "linear"}}
    zero = {"stage": train["zero_stage"]}
    if train["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train["use_gpu"]}
    if train["offload_parameters"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": train["use_gpu"]}
    if train["zero_stage"] == 3:
        # Lets rank 0 gather full weights for the Hugging Face export.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": train["micro_batch_size"],
        "gradient_accumulation_steps": train["gradient_accumulation_steps"],
        "train_batch_size": train["micro_batch_size"] * train["gradient_accumulation_steps"] * world_size,
        "gradient_clipping": train["gradient_clipping"],
        "zero_optimization": zero,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},  # dynamic loss scaling by default
        # ZeRO lists Adam-family optimizers as tested; SGD's state (momentum) partitions the same way.
        "zero_allow_untested_optimizer": train["optimizer"] == "sgd",
        "steps_per_print": 10**9,  # our own per-step lines replace DeepSpeed's
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, train["deepspeed_overrides"])


def prepare_model(model, train: dict):
    """Apply the training method: LoRA adapters on a frozen base, or full fine-tuning with
    optional frozen embeddings / first layers. Returns the model to train."""
    if train["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = train["lora"]
        return get_peft_model(model, LoraConfig(
            r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    if train["freeze_embeddings"]:
        model.get_input_embeddings().requires_grad_(False)  # a tied LM head is the same tensor
    layers = model.model.layers
    if train["freeze_layers"] > len(layers):
        raise ValueError(f"freeze_layers={train['freeze_layers']} but the model has {len(layers)} layers")
    frozen = max(len(layers) - train["trainable_layers"], 0) if train.get("trainable_layers") else train["freeze_layers"]
    for layer in layers[:frozen]:
        layer.requires_grad_(False)
    return model


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def collate(batch: dict[str, np.ndarray], pad_id: int, packed_length: int | None = None) -> dict[str, torch.Tensor]:
    """Rows for one micro-batch, with the loss only on the answer tokens: where `loss_mask` is 1 when
    the shards have one (every assistant turn of a chat), else after `prompt_len`.

    Padding (packed_length None): one example per row, padded to the longest. Packing: the examples
    share as few rows of at most packed_length tokens (or the longest example's length, if more) as
    they fit in, balanced so that little padding is left, with position ids restarting
    at 0 for each example. `attention_mask` marks real tokens either way; for packed rows
    `answer_loss` gives the model the position ids instead, from which transformers builds a
    block-diagonal causal mask (no attention across examples).

    Multi-task batches (a `task_id` column) also get `task_ids`, each token's task (-1 on
    padding), for per-task validation loss, and `example_tasks`, each example's task.
    """
    # np.array copies: Arrow hands read-only arrays, which torch would share (and warn about).
    examples = [torch.from_numpy(np.array(ids, dtype=np.int64)) for ids in batch["input_ids"]]
    masks = batch.get("loss_mask")
    rows = [[index] for index in range(len(examples))]
    if packed_length is not None:
        # Longest first into the emptiest row, with the fewest rows that keep each within the limit:
        # the rows come out nearly equal, so padding them to the longest wastes little.
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
        limit = max(packed_length, len(examples[order[0]]))
        count = -(-sum(len(ids) for ids in examples) // packed_length)
        while True:
            rows, loads = [[] for _ in range(count)], [0] * count
            for index in order:
                row = loads.index(min(loads))
                rows[row].append(index)
                loads[row] += len(examples[index])
            if max(loads) <= limit:
                break
            count += 1
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    # Padding after the last example continues as one more "example" (0, 1, ...): it attends only
    # to itself, carries no loss, and a row holding one example keeps positions 0..width-1.
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    task_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    tasks = batch.get("task_id")
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            ids, end = examples[index], start + len(examples[index])
            input_ids[r, start:end] = ids
            attention_mask[r, start:end] = 1
            if masks is not None:
                answer = torch.as_tensor(np.asarray(masks[index], dtype=bool))
                labels[r, start:end] = torch.where(answer, ids, -100)
            else:
                prompt_len = int(batch["prompt_len"][index])
                labels[r, start + prompt_len: end] = ids[prompt_len:]
            position_ids[r, start:end] = torch.arange(len(ids))
            if tasks is not None:
                task_ids[r, start:end] = int(tasks[index])
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    rows_out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if tasks is not None:
        rows_out |= {"task_ids": task_ids, "example_tasks": torch.as_tensor(np.asarray(tasks, dtype=np.int64))}
    return rows_out if packed_length is None else {**rows_out, "position_ids": position_ids}


class Collate(NumpyBatchCollateFn):
    """`collate` as the callable class Ray Data's `iter_torch_batches` takes (a plain function is deprecated)."""

    def __init__(self, pad_id: int, packed_length: int | None = None):
        super().__init__()
        self.pad_id, self.packed_length = pad_id, packed_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_id, self.packed_length)


def answer_loss(engine, batch: dict[str, torch.Tensor], label_ids: list[int] | None = None,
                label_weight: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens; with `label_weight`, plus that weight times a
    cross-entropy over the label words only at each answer's first token (a verbalizer objective:
    the gradient goes to telling the labels apart, not to the rest of the vocabulary, while the
    full-vocabulary term keeps the label the model's free answer, so chat and classify agree)."""
    logits, targets, _ = _answer_logits(engine, batch)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    if label_weight and label_ids:
        rows, first = _first_answer_positions(targets)
        gold = targets[rows, first]
        ids = torch.tensor(label_ids, device=gold.device)
        is_label = gold.unsqueeze(1) == ids  # rows whose answer is a label (all of them in classification)
        if is_label.any():
            keep = is_label.any(dim=1)
            label_logits = logits[rows, first][keep][:, ids].float()
            loss = loss + label_weight * torch.nn.functional.cross_entropy(label_logits, is_label[keep].int().argmax(dim=1))
    return loss


def _answer_logits(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict an answer token, their targets, and those positions.

    The LM head over a 49k vocabulary is about a fifth of a small model's compute; the answer is a
    few tokens of each example, so only the positions that predict one get logits.
    """
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
    if "position_ids" in batch:
        # Packed rows: transformers' masking_utils derives one causal block per example from the
        # position-id resets, but only when no 2D mask and no KV cache are given.
        inputs = {"position_ids": batch["position_ids"], "use_cache": False}
    else:
        inputs = {"attention_mask": batch["attention_mask"]}
    logits = engine(input_ids=batch["input_ids"], logits_to_keep=keep, **inputs).logits
    return logits, targets[:, keep], keep


def _all_reduce(values: list[float], device, op=torch.distributed.ReduceOp.SUM) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=op)
    return tensor.tolist()


def measure_peak_flops(device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.5) -> float:
    """Dense matmul FLOP/s this worker reaches: the MFU denominator when none is configured."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up (kernel selection, thread pool start)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * calls / (time.perf_counter() - start)


def train_flops_per_token(model, method: str) -> float:
    """Model FLOPs per trained token: forward 2N over the non-embedding parameters N (the LM head
    runs only at answer positions, so it is left out); backward 2N more for the activations, and
    2N for the weight gradients in full fine-tuning only."""
    embeddings = model.get_input_embeddings().weight.numel()
    non_embedding = sum(parameter.numel() for parameter in model.parameters()) - embeddings
    return (4 if method == "lora" else 6) * non_embedding


def peak_memory_gib(device) -> float:
    """Peak memory of this worker: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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
            logits, targets, keep = _answer_logits(engine, batch)
            losses = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none").cpu().double()
            answer = targets.flatten().cpu() != -100
            task_ids = batch["task_ids"][:, 1:][:, keep].flatten().cpu() if "task_ids" in batch else torch.zeros_like(answer, dtype=torch.long)
            loss_sums.index_add_(0, task_ids[answer], losses[answer])
            tokens.index_add_(0, task_ids[answer], torch.ones(int(answer.sum()), dtype=torch.float64))
            if label_ids:
                rows, first = _first_answer_positions(targets)
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


def _first_answer_positions(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) where each answer's first token is predicted: the start of every run of answer
    targets, so each example of a packed row counts, not only the row's first."""
    answer = targets != -100
    starts = answer & ~torch.nn.functional.pad(answer[:, :-1], (1, 0), value=False)
    return starts.nonzero(as_tuple=True)


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
