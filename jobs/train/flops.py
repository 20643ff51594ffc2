"""Throughput yardsticks: the FLOPs a trained token costs, the device's peak FLOP/s, peak memory."""

from __future__ import annotations

import time

import torch

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


def train_flops_per_token(model) -> float:
    """Model FLOPs per trained token, from which weights train: forward 2N over the non-embedding
    parameters N (the LM head runs only at answer positions, so it is left out); backward 2N' for
    the activation gradients, N' being the layers from the lowest one with a trainable weight up
    (below it no gradient is needed: the recipe's frozen lower layers, while LoRA adapters in every
    layer need them all), plus 2T for the gradients of the T trainable weights. Full fine-tuning of
    every layer gives the usual 6N; LoRA about 4N."""
    embedding = model.get_input_embeddings().weight
    non_embedding = sum(parameter.numel() for parameter in model.parameters()) - embedding.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and p is not embedding)
    layers = list(model.get_decoder().layers)
    lowest = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())), len(layers))
    below = sum(parameter.numel() for layer in layers[:lowest] for parameter in layer.parameters())
    # T leaves out the embeddings: their gradient is a scatter of the tokens' rows, not a matmul.
    return 2 * non_embedding + 2 * (non_embedding - below) + 2 * trainable


def peak_memory_gib(device) -> float:
    """Peak memory of this worker: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
