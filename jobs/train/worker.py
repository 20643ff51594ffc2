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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cluster.prompting import pad_token_id, use_template
from jobs.train.batches import Collate
from jobs.train.engine import (budget_learning_rate, deepspeed_config, prepare_model, resolve_attention, resolve_precision,
                               set_learning_rate)
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


@dataclass
class Worker:
    """One Ray Train worker's fixed parts, built once per attempt."""
    config: dict
    rank: int
    world_size: int
    device: Any
    engine: Any
    tokenizer: Any
    precision: str
    collate_fn: Collate
    flops_per_token: float
    peak_flops: float
    tracker: MetricLogger
    worker_nodes: list[str]  # Ray node id of every rank, reported with the metrics: placement is checkable
    train_shard: Any
    validation_shard: Any

    @property
    def train(self) -> dict:
        return self.config["train"]

    @property
    def task_names(self) -> list[str]:
        return self.config.get("task_names") or ["primary"]

    @property
    def examples_per_step(self) -> int:
        return self.train["micro_batch_size"] * self.train["gradient_accumulation_steps"] * self.world_size

    def mfu(self, tokens_per_s: float) -> float:
        return tokens_per_s * self.flops_per_token / (self.peak_flops * self.world_size)


@dataclass
class Position:
    """Where the run stands, saved in every checkpoint: a resumed run continues as if it had never
    stopped. Tokens are all workers'; seconds count training steps only (not validation or saving).
    Slots: token positions computed, padding included (packing makes them fewer for the same tokens).
    Each attempt's first logged window also waits for the data pipeline's first batch and allocates
    the optimizer state: warmup_* keep those windows apart, for steady_tokens_per_s."""
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    total_tokens: float = 0.0
    total_slots: float = 0.0
    compute_seconds: float = 0.0
    warmup_tokens: float = 0.0
    warmup_seconds: float = 0.0
    task_examples: list[float] = field(default_factory=list)  # training examples per task, all workers
    phase_seconds: dict[str, float] = field(default_factory=dict)  # training seconds by PHASES, mean over workers

    @classmethod
    def from_checkpoint(cls, state: dict, tasks: int) -> "Position":
        return cls(**{"task_examples": [0.0] * tasks, **state})  # older checkpoints lack some fields


# Where a worker's training time goes: waiting for the next batch from Ray Data, forward and
# backward (DeepSpeed's gradient all-reduce included), and the optimizer step.
PHASES = ("data", "forward_backward", "optimizer")


@dataclass
class Window:
    """This worker's micro-batches since the last log line."""
    loss: float = 0.0
    micro_batches: int = 0
    tokens: int = 0
    slots: int = 0
    started: float = field(default_factory=time.perf_counter)
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    last_lap: float = field(default_factory=time.perf_counter)

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to `phase`."""
        now = time.perf_counter()
        self.phase_seconds[phase] += now - self.last_lap
        self.last_lap = now

    def restart(self) -> None:
        """Validation and saving are not training throughput."""
        self.started = self.last_lap = time.perf_counter()

    def add(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self.loss += loss.detach().item()  # detached: torch warns on a scalar taken from a tensor that requires grad
        self.micro_batches += 1
        self.tokens += int(batch["attention_mask"].sum())
        self.slots += batch["attention_mask"].numel()


def train_loop_per_worker(config: dict) -> None:
    """Train until max_steps or max_train_seconds; log, validate and checkpoint on schedule."""
    worker = start_worker(config)
    train = worker.train
    position = resume_position(worker)
    fault_marker = Path(config["storage_dir"]) / FAULT_MARKER
    resumed_from_step, step_at_window_start = position.step, position.step
    skip_batches = position.batches_in_epoch
    last_train_loss = float("nan")
    first_window, first_batch_seconds = True, None
    # Training examples per task: all workers' count at the checkpoint resumed from, plus this worker's since.
    task_examples_before = position.task_examples
    task_examples = torch.zeros(len(worker.task_names), dtype=torch.float64)
    window, run_start = Window(), time.perf_counter()
    out_of_time = False  # max_train_seconds reached (decided together: the slowest rank's clock)
    budget_schedule = train["lr_schedule"] == "linear_budget"
    if budget_schedule:
        set_learning_rate(worker.engine, budget_learning_rate(train, position.step, position.compute_seconds))
    while position.step < train["max_steps"] and not out_of_time:
        # A fresh pass per epoch, in the same order every time (no shuffle): a resumed run skips what it consumed.
        for batch_index, batch in enumerate(worker.train_shard.iter_torch_batches(batch_size=train["micro_batch_size"], collate_fn=worker.collate_fn)):
            if first_batch_seconds is None:
                first_batch_seconds = time.perf_counter() - run_start
            if batch_index < skip_batches:
                continue  # consumed before the checkpoint this run resumed from
            if len(worker.task_names) > 1:
                task_examples += torch.bincount(batch["example_tasks"], minlength=len(worker.task_names)).double()
            batch = {key: value.to(worker.device) for key, value in batch.items()}
            window.lap("data")
            loss = answer_loss(worker.engine, batch, config.get("label_first_token_ids"), train["label_loss_weight"])
            worker.engine.backward(loss)
            window.lap("forward_backward")
            worker.engine.step()
            window.lap("optimizer")
            window.add(loss, batch)
            if worker.engine.global_steps == position.step:
                continue  # still accumulating gradients
            position.step = step = worker.engine.global_steps
            if train["max_train_seconds"]:
                (trained,) = _all_reduce([position.compute_seconds + time.perf_counter() - window.started], worker.device,
                                         op=torch.distributed.ReduceOp.MAX)
                out_of_time = trained >= train["max_train_seconds"]
                if budget_schedule:  # the same rate on every rank: from the all-reduced clock
                    set_learning_rate(worker.engine, budget_learning_rate(train, step, trained))
            if step == train["fault_at_step"] and worker.rank == worker.world_size - 1 and not fault_marker.exists():
                fault_marker.touch()  # once per run: the restarted worker group must get past this step
                raise RuntimeError(f"fault drill: worker {worker.rank} fails at step {step} (train.fault_at_step)")
            last_step = step >= train["max_steps"] or out_of_time

            if step % train["log_every"] == 0 or last_step:
                last_train_loss = close_window(worker, window, position, step - step_at_window_start, first_window, run_start)
                step_at_window_start, window, first_window = step, Window(), False

            if step % train["eval_every"] == 0 or last_step:
                position.batches_in_epoch = batch_index + 1
                position.task_examples = [before + now for before, now in zip(
                    task_examples_before, _all_reduce(task_examples.tolist(), worker.device))]
                validate_and_checkpoint(worker, position, resumed_from_step, last_train_loss, first_batch_seconds, run_start)
                window.restart()
            if last_step:
                break
        position.epoch += 1
        skip_batches = 0


def start_worker(config: dict) -> Worker:
    """Seed and threads, the model (with the run's chat template: the export carries it to serving),
    the DeepSpeed engine, the FLOPs yardsticks and the tracker."""
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = config["train"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(train["seed"])
    torch.set_num_threads(max(1, int(train["cpus_per_worker"])))
    tokenizer = use_template(AutoTokenizer.from_pretrained(config["base_model_dir"]), config["template"])
    precision = resolve_precision(train["precision"], train["use_gpu"])
    # Weights stay fp32 for fp16 training (DeepSpeed keeps fp32 masters and casts itself) and for
    # bf16 on CPU (autocast, see deepspeed_config).
    dtype = torch.bfloat16 if precision == "bf16" and train["use_gpu"] else torch.float32
    model = prepare_model(AutoModelForCausalLM.from_pretrained(
        config["base_model_dir"], dtype=dtype, attn_implementation=resolve_attention(train["attention"], train["use_gpu"])), train)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    # Counted before DeepSpeed: ZeRO-3 partitions parameters, leaving each rank's tensors empty.
    flops_per_token = train_flops_per_token(model)
    trainable_count, total_count = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=deepspeed_config(train, world_size, precision),
    )
    # The yardstick is the dtype the matrix multiplies run in (bf16 under CPU autocast).
    peak_flops = train["peak_flops_per_worker"] or measure_peak_flops(device, torch.bfloat16 if precision == "bf16" else dtype)
    tracker = MetricLogger(config["tracking_uri"], config["tracking_run_id"]) if rank == 0 else MetricLogger(None, None)
    if rank == 0:
        say(f"[train] method {train['method']}, precision {precision}: "
            f"{trainable_count:,} of {total_count:,} parameters trainable; "
            f"{flops_per_token / 1e9:.2f} GFLOP per token, peak {peak_flops / 1e9:.1f} GFLOP/s per worker")
    worker_nodes = [None] * world_size
    torch.distributed.all_gather_object(worker_nodes, ray.get_runtime_context().get_node_id())
    packed_length = train["packed_length"] if train["packing"] else None
    return Worker(config, rank, world_size, device, engine, tokenizer, precision,
                  Collate(pad_token_id(tokenizer), packed_length),  # the shards stay one example per row
                  flops_per_token, peak_flops, tracker, worker_nodes,
                  ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("validation"))


def resume_position(worker: Worker) -> Position:
    """After a worker or job failure Ray Train hands back the latest reported checkpoint; a run
    restarted by hand names one. Weights, optimizer, scheduler, step, RNG and the data position all
    come back; a fresh run starts at zero."""
    import ray.train

    checkpoint = ray.train.get_checkpoint() or worker.config["resume_checkpoint"]
    if checkpoint is None:
        return Position(task_examples=[0.0] * len(worker.task_names))
    with checkpoint.as_directory() as folder:
        _, client_state = worker.engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)
        position = Position.from_checkpoint(client_state["position"], len(worker.task_names))
        torch.set_rng_state(torch.load(Path(folder) / f"rng_rank{worker.rank}.pt"))
    if worker.rank == 0:
        say(f"[train] resumed from step {position.step} (epoch {position.epoch}, "
            f"{position.batches_in_epoch} micro-batches into it)")
    return position


def close_window(worker: Worker, window: Window, position: Position, steps_in_window: int, first: bool,
                 run_start: float) -> float:
    """All workers' figures for the steps since the last log line: one log line and tracked metrics,
    added to the position's totals (the attempt's first window also to its warm-up). Returns the
    window's mean training loss."""
    engine, device, step = worker.engine, worker.device, position.step
    loss_sum, micro, tokens, slots, *phase_sums = _all_reduce(
        [window.loss, window.micro_batches, window.tokens, window.slots, *window.phase_seconds.values()], device)
    (memory,) = _all_reduce([peak_memory_gib(device)], device, op=torch.distributed.ReduceOp.MAX)
    elapsed = time.perf_counter() - window.started
    mfu = worker.mfu(tokens / elapsed)
    shares = {phase: total / worker.world_size / elapsed for phase, total in zip(PHASES, phase_sums)}  # mean over workers
    for phase, total in zip(PHASES, phase_sums):
        position.phase_seconds[phase] = position.phase_seconds.get(phase, 0.0) + total / worker.world_size
    if worker.rank == 0:
        say(f"[train] step {step}/{worker.train['max_steps']} epoch {position.epoch} loss {loss_sum / micro:.4f} "
            f"lr {engine.get_lr()[0]:.2e} tokens/s {tokens / elapsed:.0f} MFU {mfu:.1%} "
            f"(time: data {shares['data']:.0%}, forward+backward {shares['forward_backward']:.0%}, "
            f"optimizer {shares['optimizer']:.0%}) peak mem {memory:.2f} GiB elapsed {time.perf_counter() - run_start:.0f}s")
        worker.tracker.log({"train_loss": loss_sum / micro, "learning_rate": engine.get_lr()[0],
                            "tokens_per_s": tokens / elapsed, "step_seconds": elapsed / max(steps_in_window, 1),
                            "mfu": mfu, "peak_memory_gib_max_worker": memory,
                            **{f"time_share/{phase}": share for phase, share in shares.items()}}, step)
    position.total_tokens += tokens
    position.total_slots += slots
    position.compute_seconds += elapsed
    if first:
        position.warmup_tokens += tokens
        position.warmup_seconds += elapsed
    return loss_sum / micro


def validate_and_checkpoint(worker: Worker, position: Position, resumed_from_step: int, train_loss: float,
                            first_batch_seconds: float | None, run_start: float) -> None:
    """Validation loss (and macro-F1) over all workers, a learning-curve line, then a checkpoint
    reported to Ray Train with the run's metrics."""
    import ray.train
    from ray.train import Checkpoint

    train, device, step, task_names = worker.train, worker.device, position.step, worker.task_names
    label_ids = worker.config.get("label_first_token_ids")
    val_loss, task_losses, val_macro_f1 = _validate(
        worker.engine, worker.validation_shard, train["micro_batch_size"], worker.collate_fn, device, len(task_names), label_ids)
    (memory,) = _all_reduce([peak_memory_gib(device)], device, op=torch.distributed.ReduceOp.MAX)
    per_task = {}
    if len(task_names) > 1:
        per_task = {**{f"val_loss/{name}": loss for name, loss in zip(task_names, task_losses)},
                    **{f"train_examples/{name}": n for name, n in zip(task_names, position.task_examples)}}
    examples_seen = step * worker.examples_per_step
    if worker.rank == 0:
        by_task = "".join(f" {name} {loss:.4f}" for name, loss in zip(task_names, task_losses)) if per_task else ""
        f1_text = f" macro-F1 {val_macro_f1:.3f}" if val_macro_f1 is not None else ""
        say(f"[train] step {step} validation loss {val_loss:.4f}{f1_text}{by_task} ({examples_seen:,} examples seen)")
        worker.tracker.log({"val_loss": val_loss, **per_task,
                            **({"val_macro_f1": val_macro_f1} if val_macro_f1 is not None else {})}, step)
        with (Path(worker.config["storage_dir"]) / LEARNING_CURVE_FILE).open("a") as curve:
            curve.write(json.dumps({"step": step, "examples_seen": examples_seen,
                                    "train_tokens": position.total_tokens, "train_seconds": position.compute_seconds,
                                    "val_loss": val_loss, "val_macro_f1": val_macro_f1}) + "\n")
    tokens, seconds = position.total_tokens, position.compute_seconds
    metrics = {
        "step": step, "epoch": position.epoch, "resumed_from_step": resumed_from_step, "precision": worker.precision,
        "val_loss": val_loss, "train_loss": train_loss, "val_macro_f1": val_macro_f1, "examples_seen": examples_seen,
        "train_tokens": tokens, "non_padding_share": tokens / max(position.total_slots, 1), "worker_nodes": worker.worker_nodes,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "steady_tokens_per_s": (tokens - position.warmup_tokens) / (seconds - position.warmup_seconds)
        if seconds > position.warmup_seconds else None,
        "first_batch_seconds": first_batch_seconds,
        "train_seconds": time.perf_counter() - run_start, "peak_memory_gib_max_worker": memory,
        "mfu": worker.mfu(tokens / max(seconds, 1e-9)),
        **{f"{phase}_seconds": value for phase, value in position.phase_seconds.items()},
        **per_task,
    }
    with tempfile.TemporaryDirectory() as folder:
        _save_checkpoint(worker.engine, train["zero_stage"], worker.tokenizer, Path(folder), worker.rank, device, asdict(position))
        # report() is not a barrier (ray PR #42422): wait until every shard is on disk.
        torch.distributed.barrier()
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


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
                rows, first = first_answer_positions(batch, keep)
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
        # The module, not the engine: the engine's forward would apply CPU bf16 autocast, and the probe
        # must be what the weights give as exported (fp32 on CPU).
        probe_logits = engine.module(input_ids=PROBE_IDS.to(device)).logits[0, -1].float().cpu()
    engine.train()
    if rank == 0:
        export = folder / HF_EXPORT_DIR
        module = engine.module
        module.save_pretrained(export, state_dict=state_dict if state_dict is not None else module.state_dict(), safe_serialization=True)
        tokenizer.save_pretrained(export)
        torch.save(probe_logits, folder / PROBE_FILE)
