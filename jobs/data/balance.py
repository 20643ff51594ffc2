"""Class rebalancing of a training split, with light label-preserving augmentation (off by default).

For imbalanced tasks such as the tweets (18% positive): over-sample the small classes (copies are
lightly perturbed so they are not exact duplicates) or under-sample the large ones, to an exact
per-class target. Apply it to the TRAIN split only, after the split: rebalancing validation or test
rows would change what the scores measure, and copies of a row on both sides of a split leak it.

Deterministic for a seed; the data job calls `rebalance_class` on each class of the train split.
`balanced_sample` is the other way, at training time: the shards stay whole and the training
stream takes an equal share of each class.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import ray

from jobs.config import AugmentSettings, BalanceSettings
from jobs.data.split import split_position

# Never dropped or moved: PII placeholders (<URL>, <EMAIL_1a2b3c4d5e>), @handles, URLs, and
# negations, whose loss or move could flip the label ("not happy" -> "happy").
_PROTECTED = re.compile(
    r"<[^<>\s]+>|@\w|://|n't\b"
    r"|^(?:not|no|never|nor|none|nothing|nobody|cannot|without|dont|cant|wont|didnt|doesnt|isnt|arent|wasnt"
    r"|werent|havent|hasnt|couldnt|shouldnt|wouldnt)\W*$", re.IGNORECASE)


def target_size(class_sizes: pd.Series, settings: BalanceSettings) -> int:
    """The per-class row count the strategy aims at."""
    reference = class_sizes.max() if settings.reference == "majority" else class_sizes.min()
    return max(1, int(round(settings.ratio * reference)))


def augment(text: str, settings: AugmentSettings, rng: np.random.Generator) -> str:
    """Drop and swap random unprotected words; if that changed nothing, drop one (when 2+ can go)."""
    words = text.split()
    movable = [not _PROTECTED.search(word) for word in words]
    kept = [(w, m) for w, m in zip(words, movable) if not (m and rng.random() < settings.word_dropout)]
    if not any(m for _, m in kept):  # keep at least one ordinary word
        kept = list(zip(words, movable))
    i = 0
    while i < len(kept) - 1:
        if kept[i][1] and kept[i + 1][1] and rng.random() < settings.swap_probability:
            kept[i], kept[i + 1] = kept[i + 1], kept[i]
            i += 2  # a word moves at most one place
        else:
            i += 1
    out = [w for w, _ in kept]
    if out == words and sum(movable) >= 2:  # so that a copy is never an exact duplicate
        drop = rng.choice(np.flatnonzero(movable))
        out = words[:drop] + words[drop + 1:]
    return " ".join(out)


def rebalance(frame: pd.DataFrame, settings: BalanceSettings, text_column: str = "text",
              label_column: str = "label") -> pd.DataFrame:
    """Over- or under-sample one split (the TRAIN split only: never validation or test) to the target.

    Returns the rows with two more columns: `source_row`, the position in `frame` of the row each
    output row comes from, and `augmented`, True for over-sampled copies. Originals come first in
    their order, then copies; the result is the same for the same input and seed.
    """
    for column in ("source_row", "augmented"):
        if column in frame.columns:
            raise ValueError(f"rebalance: the input already has a {column!r} column")
    if label_column not in frame.columns:
        raise ValueError(f"rebalance: no {label_column!r} column in {list(frame.columns)}")
    out = frame.reset_index(drop=True).assign(source_row=np.arange(len(frame)), augmented=False)
    if settings.strategy == "none" or out.empty:
        return out
    rng = np.random.default_rng(settings.seed)
    sizes = out[label_column].value_counts()
    target = target_size(sizes, settings)
    if settings.strategy == "undersample":
        keep = []
        for label in sorted(sizes.index, key=str):
            rows = np.flatnonzero(out[label_column].to_numpy() == label)
            keep.append(rows if len(rows) <= target else rng.choice(rows, target, replace=False))
        return out.iloc[np.sort(np.concatenate(keep))].reset_index(drop=True)
    copies = []
    for label in sorted(sizes.index, key=str):
        rows = np.flatnonzero(out[label_column].to_numpy() == label)
        need = target - len(rows)
        if need <= 0:
            continue
        # Whole shuffled passes over the class, so no row is copied twice before all are copied once.
        passes = -(-need // len(rows))
        copies.append(np.concatenate([rng.permutation(rows) for _ in range(passes)])[:need])
    if not copies:
        return out
    extra = out.iloc[np.concatenate(copies)].copy()
    extra["augmented"] = True
    if settings.augmentation.enabled:
        extra[text_column] = [augment(text, settings.augmentation, rng) for text in extra[text_column]]
    return pd.concat([out, extra], ignore_index=True)


def rebalance_class(group: pd.DataFrame, settings, target: int) -> pd.DataFrame:
    """One train class sampled to the run-wide target ; augmented copies get their
    conversation rewritten, so the Templater re-encodes what they now say."""
    exact = settings.model_copy(update={"ratio": target / len(group)})  # one class: its size is the reference
    out = rebalance(group.rename(columns={"source_row": "origin_row"}), exact)
    out = out.drop(columns=["source_row"]).rename(columns={"origin_row": "source_row"})
    copies = out["augmented"].to_numpy()
    out.loc[copies, "messages"] = [
        json.dumps([turn | {"content": text} if turn["role"] == "user" else turn for turn in json.loads(messages)], ensure_ascii=False)
        for messages, text in zip(out.loc[copies, "messages"], out.loc[copies, "text"])]
    return out


def balanced_class_rows(label_rows: dict[str, int], min_rows: int = 1) -> int:
    """Rows per class in the balanced training stream: the smallest class's, or min_rows if more."""
    return max(min(label_rows.values()), min_rows)


def balanced_sample(split: ray.data.Dataset, label_rows: dict[str, int], seed: int, min_rows: int = 1) -> ray.data.Dataset:
    """The split's rows with every class cut to the smallest class's size, or to `min_rows` if that
    is more (classes below it keep every row), for the training stream: each row is kept with
    probability target / its class's rows, decided by a hash of its key (deterministic, independent
    of the split's own hash, in shard order). The shards stay whole, so the baseline and evaluation
    still see every row."""
    target = balanced_class_rows(label_rows, min_rows)
    keep = {label: min(1.0, target / rows) for label, rows in label_rows.items()}
    return split.filter(lambda row: split_position(row["key"], f"balance-{seed}") < keep[row["label"]])
