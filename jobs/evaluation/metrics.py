"""Classification metrics (scikit-learn), calibration, the reference metrics of generated answers
(ROUGE-L, chrF, exact match) and format checks, answer perplexity, and paired bootstrap intervals:
every system is scored on the same rows, so differences are paired."""

from __future__ import annotations

import json
import string
from typing import Callable

import numpy as np
import pandas as pd

from jobs.config import FormatChecks

GENERATIVE_METRICS = ("rouge_l", "chrf", "exact_match")  # every generative run's; format checks add theirs

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


def paired_bootstrap(rows: int, statistics: dict[str, dict[str, Callable[[np.ndarray], float]]], resamples: int = 1000,
                     level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap intervals of every system's metrics, and of the paired differences
    between systems: each resample draws one set of rows (indices into the test rows) on which every
    system's statistic is computed, so a difference compares the systems on the same rows.
    `statistics`: system -> metric -> the metric on the given rows; every system has the same metrics."""
    systems = list(statistics)
    metrics = list(statistics[systems[0]])
    rng = np.random.default_rng(seed)
    samples = {name: {metric: [] for metric in metrics} for name in systems}
    for _ in range(resamples):
        chosen = rng.integers(0, rows, size=rows)
        for name in systems:
            for metric in metrics:
                samples[name][metric].append(statistics[name][metric](chosen))
    tail = (1 - level) / 2 * 100

    def interval(values) -> list[float]:
        return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]

    result = {"level": level, "resamples": resamples, "systems": {}, "differences": {}}
    for name in systems:
        result["systems"][name] = {metric: interval(values) for metric, values in samples[name].items()}
    for i, first in enumerate(systems):
        for second in systems[i + 1:]:
            result["differences"][f"{first} - {second}"] = {
                metric: interval(np.subtract(samples[first][metric], samples[second][metric])) for metric in metrics}
    return result


def bootstrap_intervals(y_true, predictions: dict[str, np.ndarray], labels: list[str], resamples: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict:
    """Classification: `paired_bootstrap` of accuracy and macro-F1 for every system's predicted label ids."""
    from sklearn.metrics import f1_score

    y_true = np.asarray(y_true)
    classes = list(range(len(labels)))

    def statistics(predicted: np.ndarray) -> dict[str, Callable[[np.ndarray], float]]:
        return {"accuracy": lambda rows: float((predicted[rows] == y_true[rows]).mean()),
                "macro_f1": lambda rows: float(f1_score(y_true[rows], predicted[rows], labels=classes, average="macro",
                                                        zero_division=0))}

    return paired_bootstrap(len(y_true), {name: statistics(np.asarray(predicted)) for name, predicted in predictions.items()},
                            resamples, level, seed)


def normalized_answer(text: str) -> str:
    """What exact match compares: lower case, single spaces, no surrounding spaces or punctuation."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def reference_scores(answers: list[str], references: list[str]) -> pd.DataFrame:
    """Per-row agreement of each answer with its reference: ROUGE-L F1 (rouge-score, its default
    tokenizer: lower case, letters and digits), sentence chrF (sacrebleu's defaults, divided by 100
    so that every metric runs from 0 to 1) and exact match of the normalized texts."""
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import CHRF

    rouge, chrf = RougeScorer(["rougeL"]), CHRF()
    return pd.DataFrame({
        "rouge_l": [rouge.score(reference, answer)["rougeL"].fmeasure for answer, reference in zip(answers, references)],
        "chrf": [chrf.sentence_score(answer, [reference]).score / 100 for answer, reference in zip(answers, references)],
        "exact_match": [float(normalized_answer(answer) == normalized_answer(reference))
                        for answer, reference in zip(answers, references)],
    })


def format_check_results(answers: list[str], checks: FormatChecks) -> pd.DataFrame:
    """Per-row 1/0 of each configured format check (format_<check>), and format_pass: all of them;
    no columns when no check is configured."""
    results = {}
    if checks.max_words is not None:
        results["format_max_words"] = [float(len(answer.split()) <= checks.max_words) for answer in answers]
    if checks.required_phrase is not None:
        phrase = checks.required_phrase.lower()
        results["format_required_phrase"] = [float(phrase in answer.lower()) for answer in answers]
    if checks.valid_json:
        results["format_valid_json"] = [float(_parses_as_json(answer)) for answer in answers]
    if results:
        results["format_pass"] = np.prod(list(results.values()), axis=0).astype(float)
    return pd.DataFrame(results, index=range(len(answers)))


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def generative_metrics(frame: pd.DataFrame, metrics: list[str]) -> dict:
    """The means over the test rows of the per-row scores in `metrics` (columns of `frame`), and the
    answers' mean length in words."""
    return {"examples": int(len(frame)), **{metric: float(frame[metric].mean()) for metric in metrics},
            # str.count, not str.split: on Arrow strings split yields Arrow lists
            "mean_answer_words": float(frame["generated"].str.count(r"\S+").mean())}


def answer_perplexity(frame: pd.DataFrame) -> float:
    """exp(mean negative log-likelihood per gold answer token) over the test rows."""
    return float(np.exp(-frame["gold_logprob"].sum() / frame["answer_tokens"].sum()))
