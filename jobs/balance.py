"""Class rebalancing of a training split, with light label-preserving augmentation (off by default).

For imbalanced tasks such as the tweets (18% positive): over-sample the small classes (copies are
lightly perturbed so they are not exact duplicates) or under-sample the large ones, to an exact
per-class target. Apply it to the TRAIN split only, after the split: rebalancing validation or test
rows would change what the scores measure, and copies of a row on both sides of a split leak it.

Pure pandas/numpy, deterministic for a seed; the data job calls `rebalance` on the train split.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from cluster.config import StrictModel

# Never dropped or moved: PII placeholders (<URL>, <EMAIL_1a2b3c4d5e>), @handles, URLs, and
# negations, whose loss or move could flip the label ("not happy" -> "happy").
_PROTECTED = re.compile(
    r"<[^<>\s]+>|@\w|://|n't\b"
    r"|^(?:not|no|never|nor|none|nothing|nobody|cannot|without|dont|cant|wont|didnt|doesnt|isnt|arent|wasnt"
    r"|werent|havent|hasnt|couldnt|shouldnt|wouldnt)\W*$", re.IGNORECASE)


class AugmentSettings(StrictModel):
    """Perturbation of over-sampled copies; no synonyms, only word order and omission."""

    enabled: bool = Field(True, description="Perturb over-sampled copies so they are not exact duplicates.")
    word_dropout: float = Field(0.1, ge=0.0, le=0.5, description=(
        "Probability of dropping each unprotected word of a copy (placeholders, @handles, URLs and "
        "negations are never dropped)."))
    swap_probability: float = Field(0.1, ge=0.0, le=0.5, description=(
        "Probability of swapping each unprotected word with the next unprotected word of a copy."))

    @model_validator(mode="after")
    def _does_something(self) -> "AugmentSettings":
        if self.enabled and self.word_dropout == 0 and self.swap_probability == 0:
            raise ValueError("augmentation is enabled but word_dropout and swap_probability are both 0")
        return self


class BalanceSettings(StrictModel):
    """Class rebalancing of the train split (`data.balance`)."""

    strategy: Literal["none", "oversample", "undersample"] = Field("none", description=(
        "'oversample' copies rows of classes below the target size, 'undersample' drops rows of "
        "classes above it, 'none' leaves the split as it is."))
    target: Literal["majority", "minority"] | None = Field(None, description=(
        "Reference class size: the largest ('majority') or smallest ('minority') class; default "
        "majority when over-sampling and minority when under-sampling."))
    ratio: float = Field(1.0, gt=0.0, le=100.0, description=(
        "Target size = round(ratio x reference size). Over-sampling raises smaller classes to it, "
        "under-sampling cuts larger ones to it; e.g. oversample with ratio 0.5 lifts every class to "
        "at least half the majority."))
    seed: int = Field(0, description="Seed of the sampling and augmentation; the same seed gives the same rows.")
    augmentation: AugmentSettings = Field(default_factory=AugmentSettings,
                                          description="Perturbation of over-sampled copies.")

    @model_validator(mode="after")
    def _changes_something(self) -> "BalanceSettings":
        reference = self.reference
        if self.strategy == "oversample" and reference == "minority" and self.ratio <= 1:
            raise ValueError("oversample to ratio <= 1 of the minority class would never add a row")
        if self.strategy == "undersample" and reference == "majority" and self.ratio >= 1:
            raise ValueError("undersample to ratio >= 1 of the majority class would never drop a row")
        return self

    @property
    def reference(self) -> str:
        return self.target or ("majority" if self.strategy == "oversample" else "minority")


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
