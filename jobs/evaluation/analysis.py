"""Where the fine-tuned model errs: its worst and most confident mistakes per class, and metrics by
slice (source, length, configured terms); for generative runs its best and worst answers."""

from __future__ import annotations

import numpy as np
import pandas as pd

def error_analysis(frame: pd.DataFrame, labels: list[str], worst: int, per_class: int = 3) -> dict:
    """The most confident mistakes, and for each true label its most confident mistakes."""
    mistakes = frame[frame["pred_id"] != frame["label_id"]].sort_values("confidence", ascending=False)

    def rows(subset: pd.DataFrame) -> list[dict]:
        return [{"text": r.text, "label": labels[r.label_id], "predicted": labels[r.pred_id], "confidence": float(r.confidence)}
                for r in subset.itertuples()]

    return {
        "mistakes": int(len(mistakes)),
        "worst": rows(mistakes.head(worst)),
        "per_class": {label: rows(mistakes[mistakes["label_id"] == i].head(per_class)) for i, label in enumerate(labels)},
    }


def slice_masks(texts: pd.Series, terms: list[str]) -> dict[str, np.ndarray]:
    """Row masks of the slices reported: text length in words, each term's presence, and the
    source a row came from where the data has several."""
    words = texts.str.count(r"\S+").to_numpy()  # not str.split(): on Arrow strings it yields Arrow lists
    lowered = texts.str.lower()
    masks = {"length: 1-10 words": words <= 10, "length: 11-20 words": (words > 10) & (words <= 20),
             "length: 21+ words": words > 20}
    for term in terms:
        present = lowered.str.contains(term.lower(), regex=False).to_numpy()
        masks[f'contains "{term}"'] = present
        masks[f'no "{term}"'] = ~present
    return masks


def slice_metrics(predictions: dict[str, pd.DataFrame], labels: list[str], terms: list[str]) -> list[dict]:
    from sklearn.metrics import f1_score

    first = next(iter(predictions.values()))
    masks = slice_masks(first["text"], terms)
    if "source" in first.columns and first["source"].nunique() > 1:
        masks.update({f"source: {name}": (first["source"] == name).to_numpy() for name in sorted(first["source"].unique())})
    result = []
    for name, mask in masks.items():
        systems = {}
        for system, frame in predictions.items():
            y_true, y_pred = frame["label_id"].to_numpy()[mask], frame["pred_id"].to_numpy()[mask]
            systems[system] = {
                "accuracy": float((y_true == y_pred).mean()) if mask.any() else None,
                "macro_f1": float(f1_score(y_true, y_pred, labels=list(range(len(labels))), average="macro", zero_division=0))
                if mask.any() else None,
            }
        result.append({"slice": name, "examples": int(mask.sum()), "systems": systems})
    return result


def answer_examples(predictions: dict[str, pd.DataFrame], metric: str, count: int) -> dict:
    """Generative runs: the fine-tuned model's best and worst test rows by `metric`, each with every
    system's answer and score beside the prompt and the reference (the frames' rows line up)."""
    fine_tuned = predictions["fine_tuned"]
    order = fine_tuned[metric].sort_values(kind="stable").index  # worst first; ties keep key order

    def rows(chosen) -> list[dict]:
        return [{"prompt": fine_tuned.at[i, "text"], "reference": fine_tuned.at[i, "label"],
                 "answers": {system: {"text": frame.at[i, "generated"], "score": float(frame.at[i, metric])}
                             for system, frame in predictions.items()}}
                for i in chosen]

    return {"metric": metric, "best": rows(order[::-1][:count]), "worst": rows(order[:count])}
