"""Micro-batches from shard rows: padded to the longest example, or packed side by side."""

from __future__ import annotations

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

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
