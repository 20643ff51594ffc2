"""Multi-task training streams: each task's rows in proportion to its weight, in one seeded shuffle."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import ray

def mixture_counts(weights: list[float], rows: list[int], examples: int) -> list[int]:
    """Rows each task contributes to `examples` training examples: shares exactly proportional to
    the weights up to rounding (largest remainder, so the counts add up to `examples`)."""
    if min(rows) < 1:
        raise ValueError(f"every task needs training rows, got {rows}")
    quotas = [examples * weight / sum(weights) for weight in weights]
    counts = [int(quota) for quota in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: examples - sum(counts)]:
        counts[i] += 1
    return counts


def _mix_keys(batch: pd.DataFrame, task_id: int, copy: int, seed: int) -> pd.DataFrame:
    """Tag rows with their task and a seeded hash: sorting by it is a reproducible shuffle."""
    keys = [hashlib.blake2b(json.dumps([seed, task_id, copy, source, int(position), text]).encode(), digest_size=8).hexdigest()
            for source, position, text in zip(batch["source"], batch["position"], batch["text"])]
    return batch.assign(task_id=task_id, mix_key=keys)


def mixture_dataset(splits: list[ray.data.Dataset], rows: list[int], weights: list[float], examples: int,
                    seed: int) -> tuple[ray.data.Dataset, list[int]]:
    """A train stream of exactly `examples` rows, mixed by weight: each task gives its share of rows,
    cycling through its rows when it has fewer (whole passes, then a seeded sample of the rest), all
    in one seeded shuffle. Ray Data operations only: nothing is collected on the driver."""
    counts = mixture_counts(weights, rows, examples)
    parts = []
    for task_id, (split, available, wanted) in enumerate(zip(splits, rows, counts)):
        passes, rest = divmod(wanted, available)
        keyed = [split.map_batches(_mix_keys, batch_format="pandas", fn_kwargs={"task_id": task_id, "copy": copy, "seed": seed})
                 for copy in range(passes + (rest > 0))]
        if rest:
            keyed[-1] = keyed[-1].sort("mix_key").limit(rest)
        parts += keyed
    mixed = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return mixed.sort("mix_key").drop_columns(["mix_key"]), counts
