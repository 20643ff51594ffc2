"""Multi-task training streams: each task's rows in proportion to its weight, in one seeded shuffle."""

from __future__ import annotations

import hashlib
import json
import math

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


def mixture_pass(weights: list[float], rows: list[int]) -> int:
    """Examples of one pass of a mixture: the fewest in which every task's weighted share holds all
    of its rows (a task whose share exceeds its rows is cycled within the pass). The train stream is
    at most this long; the training loop repeats it when a run needs more, so a long step budget
    (the time-budgeted recipe's max_steps is only a cap) never builds a stream of millions of rows."""
    if min(rows) < 1:
        raise ValueError(f"every task needs training rows, got {rows}")
    total = sum(weights)
    return max(math.ceil(round(count * total / weight, 6)) for weight, count in zip(weights, rows))


def _mix_keys(batch: pd.DataFrame, task_id: int, copies: list[int], seed: int) -> pd.DataFrame:
    """The rows once per copy, tagged with their task and a seeded hash of (copy, row): sorting by it
    is a reproducible shuffle, and each copy of a row lands elsewhere."""
    tagged = []
    for copy in copies:
        keys = [hashlib.blake2b(json.dumps([seed, task_id, copy, source, int(position), text]).encode(), digest_size=8).hexdigest()
                for source, position, text in zip(batch["source"], batch["position"], batch["text"])]
        tagged.append(batch.assign(task_id=task_id, mix_key=keys))
    return pd.concat(tagged, ignore_index=True)


def mixture_dataset(splits: list[ray.data.Dataset], rows: list[int], weights: list[float], examples: int,
                    seed: int) -> tuple[ray.data.Dataset, list[int]]:
    """A train stream of exactly `examples` rows, mixed by weight: each task gives its share of rows,
    cycling through its rows when it has fewer (whole passes, then a seeded sample of the rest), all
    in one seeded shuffle. Ray Data operations only: nothing is collected on the driver."""
    counts = mixture_counts(weights, rows, examples)
    parts = []
    for task_id, (split, available, wanted) in enumerate(zip(splits, rows, counts)):
        passes, rest = divmod(wanted, available)
        # Whole passes in one operator (however many), then a seeded sample of the rest.
        if passes:
            parts.append(split.map_batches(_mix_keys, batch_format="pandas",
                                           fn_kwargs={"task_id": task_id, "copies": list(range(passes)), "seed": seed}))
        if rest:
            parts.append(split.map_batches(_mix_keys, batch_format="pandas",
                                           fn_kwargs={"task_id": task_id, "copies": [passes], "seed": seed}).sort("mix_key").limit(rest))
    mixed = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return mixed.sort("mix_key").drop_columns(["mix_key"]), counts
