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
