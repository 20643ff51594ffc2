"""The model and its DeepSpeed engine settings: precision, the ZeRO config, which weights train
(full, top layers only, or LoRA adapters)."""

from __future__ import annotations

import copy

import torch


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX-512 BF16). With AMX a
    bf16 matmul ran ~8x faster than fp32 on the 2-core machine we develop on; without either,
    PyTorch emulates bf16 and it is slower than fp32."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_precision(requested: str, use_gpu: bool) -> str:
    """'auto' -> on GPU bf16 where supported (Ampere and newer), else fp16; on CPU bf16 where the
    CPU has bf16 instructions, else fp32. Resolved on the worker: it is the worker's device that counts."""
    if requested == "bf16" and not use_gpu and not cpu_has_bf16():
        raise ValueError("precision bf16 on CPU workers needs a CPU with AMX or AVX-512 BF16 instructions, and this "
                         "worker's CPU has neither: set train.precision to fp32 or auto")
    if requested != "auto":
        return requested
    if not use_gpu:
        return "bf16" if cpu_has_bf16() else "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_attention(requested: str, use_gpu: bool) -> str:
    """'auto' -> transformers' sdpa on GPU; eager on CPU, where for the short examples of
    classification runs PyTorch's flash-attention CPU kernel (sdpa) is the slower one, its backward
    most of all (one worker's training step ~14% faster eager, 1 thread, bf16, the tweets)."""
    if requested != "auto":
        return requested
    return "sdpa" if use_gpu else "eager"


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
    elif train["lr_schedule"] == "cosine":  # ratios of the optimizer's own lr
        scheduler = {"type": "WarmupCosineLR", "params": {
            "warmup_min_ratio": 0.0, "warmup_num_steps": train["warmup_steps"], "total_num_steps": train["max_steps"],
            "cos_min_ratio": 0.0, "warmup_type": "linear"}}
    else:  # linear_budget: the training loop sets the rate (budget_learning_rate), DeepSpeed's schedulers count steps
        scheduler = None
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
        **({"scheduler": scheduler} if scheduler else {}),
        "bf16": {"enabled": precision == "bf16" and train["use_gpu"]},
        # bf16 on CPU is mixed precision by autocast: weights, gradients and optimizer state stay
        # fp32, matrix multiplies run in bf16 (the engine's forward applies it: an autocast opened
        # around the engine would be switched off inside it).
        # No module's weights are marked for bf16 communication: ZeRO-3 would otherwise gather them in
        # bf16 for every forward (the trained model would be bf16-rounded, unlike its fp32 export), and
        # ZeRO-1/2 would reduce their gradients in bf16.
        "torch_autocast": {"enabled": precision == "bf16" and not train["use_gpu"], "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},
        "fp16": {"enabled": precision == "fp16"},  # dynamic loss scaling by default
        # ZeRO lists Adam-family optimizers as tested; SGD's state (momentum) partitions the same way.
        "zero_allow_untested_optimizer": train["optimizer"] == "sgd",
        "steps_per_print": 10**9,  # our own per-step lines replace DeepSpeed's
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, train["deepspeed_overrides"])


def budget_learning_rate(train: dict, steps_done: int, seconds_trained: float) -> float:
    """The next optimizer step's learning rate under lr_schedule linear_budget: a linear warm-up over
    warmup_steps steps, times the share of max_train_seconds still left (zero when it is spent)."""
    warm = min(1.0, (steps_done + 1) / train["warmup_steps"]) if train["warmup_steps"] else 1.0
    return train["learning_rate"] * warm * max(0.0, 1.0 - seconds_trained / train["max_train_seconds"])


def set_learning_rate(engine, learning_rate: float) -> None:
    # The ZeRO optimizers proxy param_groups to the wrapped torch optimizer, which reads lr at each step.
    for group in engine.optimizer.param_groups:
        group["lr"] = learning_rate


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
