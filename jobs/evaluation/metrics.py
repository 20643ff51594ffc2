"""Classification metrics (scikit-learn), calibration, answer perplexity and paired bootstrap
intervals: every system is scored on the same rows, so differences are paired."""

from __future__ import annotations

import numpy as np
import pandas as pd

def generation_metrics(frame: pd.DataFrame, labels: list[str]) -> dict:
    """Exact match of the free answer with the reference label (case, spaces and final punctuation
    ignored), and how often the answer is one of the label words at all."""
    answers = frame["generated"].dropna().str.strip().str.strip(".!").str.lower()
    references = frame.loc[answers.index, "label"].str.lower()
    return {"examples": int(len(answers)),
            "exact_match": float((answers == references).mean()) if len(answers) else None,
            "label_word_rate": float(answers.isin([label.lower() for label in labels]).mean()) if len(answers) else None}


def calibration(correct, confidence, bins: int = 10) -> dict:
    """Expected calibration error over equal-width confidence bins, with the reliability table."""
    correct, confidence = np.asarray(correct, dtype=float), np.asarray(confidence, dtype=float)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = index == b
        if not members.any():
            continue
        accuracy, mean_confidence = correct[members].mean(), confidence[members].mean()
        ece += members.mean() * abs(accuracy - mean_confidence)
        table.append({"bin": [b / bins, (b + 1) / bins], "examples": int(members.sum()),
                      "mean_confidence": float(mean_confidence), "accuracy": float(accuracy)})
    return {"ece": float(ece), "bins": bins, "reliability": table}


def classification_metrics(y_true, y_pred, labels: list[str], confidence=None) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    classes = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    averaged = {
        average: dict(zip(("precision", "recall", "f1"), map(float, precision_recall_fscore_support(
            y_true, y_pred, labels=classes, average=average, zero_division=0)[:3])))
        for average in ("macro", "weighted")
    }
    return {
        "examples": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        **averaged,
        **({"calibration": calibration(np.asarray(y_true) == np.asarray(y_pred), confidence)} if confidence is not None else {}),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": {"rows_true_cols_pred": labels, "matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist()},
    }


def bootstrap_intervals(y_true, predictions: dict[str, np.ndarray], labels: list[str], resamples: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap intervals of accuracy and macro-F1 for every system, and of the paired
    differences between systems (all resampled on the same rows, so the comparison is fair)."""
    from sklearn.metrics import f1_score

    y_true = np.asarray(y_true)
    systems = list(predictions)
    rng = np.random.default_rng(seed)
    classes = list(range(len(labels)))
    samples = {name: {"accuracy": [], "macro_f1": []} for name in systems}
    for _ in range(resamples):
        rows = rng.integers(0, len(y_true), size=len(y_true))
        for name in systems:
            predicted = np.asarray(predictions[name])[rows]
            samples[name]["accuracy"].append(float((predicted == y_true[rows]).mean()))
            samples[name]["macro_f1"].append(float(f1_score(y_true[rows], predicted, labels=classes, average="macro", zero_division=0)))
    tail = (1 - level) / 2 * 100

    def interval(values) -> list[float]:
        return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]

    result = {"level": level, "resamples": resamples, "systems": {}, "differences": {}}
    for name in systems:
        result["systems"][name] = {metric: interval(values) for metric, values in samples[name].items()}
    for i, first in enumerate(systems):
        for second in systems[i + 1:]:
            result["differences"][f"{first} - {second}"] = {
                metric: interval(np.subtract(samples[first][metric], samples[second][metric]))
                for metric in ("accuracy", "macro_f1")
            }
    return result


def answer_perplexity(frame: pd.DataFrame) -> float:
    """exp(mean negative log-likelihood per gold answer token) over the test rows."""
    return float(np.exp(-frame["gold_logprob"].sum() / frame["answer_tokens"].sum()))
