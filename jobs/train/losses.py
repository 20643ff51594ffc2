"""The training objective: cross-entropy over the answer tokens, plus an optional loss over the
label words at each answer's first token."""

from __future__ import annotations

import torch

def answer_loss(engine, batch: dict[str, torch.Tensor], label_ids: list[int] | None = None,
                label_weight: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens; with `label_weight`, plus that weight times a
    cross-entropy over the label words only at each answer's first token (a verbalizer objective:
    the gradient goes to telling the labels apart, not to the rest of the vocabulary, while the
    full-vocabulary term keeps the label the model's free answer, so chat and classify agree)."""
    logits, targets, kept = answer_logits(engine, batch)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    if label_weight and label_ids:
        rows, first = first_answer_positions(batch, kept)
        gold = targets[rows, first]
        ids = torch.tensor(label_ids, device=gold.device)
        is_label = gold.unsqueeze(1) == ids  # rows whose answer is a label (all of them in classification)
        if is_label.any():
            keep = is_label.any(dim=1)
            label_logits = logits[rows, first][keep][:, ids].float()
            loss = loss + label_weight * torch.nn.functional.cross_entropy(label_logits, is_label[keep].int().argmax(dim=1))
    return loss


def answer_logits(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def first_answer_positions(batch: dict[str, torch.Tensor], kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns among the `kept` ones of answer_logits) where each answer's first token is
    predicted: the start of every run of answer targets, so each example of a packed row counts.
    Runs are found in the whole row, before columns are dropped: a column no row answers in may be
    all that separates two answers of a packed row, and dropping it would join them into one."""
    answer = batch["labels"][:, 1:] != -100
    starts = answer & ~torch.nn.functional.pad(answer[:, :-1], (1, 0), value=False)
    return starts[:, kept].nonzero(as_tuple=True)
