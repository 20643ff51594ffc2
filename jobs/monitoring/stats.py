"""The statistics of the monitor: online classification metrics with bootstrap intervals, and the
drift tests of production inputs and predictions against the training reference.

- Population stability index (PSI) of a numeric distribution (text length) over the reference's
  quantile bins: sum over bins of (p_current - p_reference) * ln(p_current / p_reference). Common
  reading: < 0.1 stable, 0.1-0.25 a moderate shift, > 0.25 a large one.
- Kolmogorov-Smirnov two-sample test of the same distribution (`scipy.stats.ks_2samp`): its p-value
  says how surprising the difference is; with thousands of rows even a harmless shift is
  "significant", so PSI (an effect size) is the figure to alert on and KS the confirmation.
- Chi-square goodness of fit of the predicted label counts against the test split's label mix
  (`scipy.stats.chisquare`).
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

PSI_BINS = 10
# A bin empty on one side would make PSI infinite; this share stands in for "almost none".
EMPTY_BIN_SHARE = 1e-4


def psi(reference, current, bins: int = PSI_BINS) -> float:
    """Population stability index of `current` against `reference`, over the reference's quantile bins."""
    reference, current = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    # Bins are (edge_i, edge_i+1]; values beyond the reference's range fall in the outer bins.
    reference_share = np.bincount(np.searchsorted(edges, reference, side="left"), minlength=len(edges) + 1) / len(reference)
    current_share = np.bincount(np.searchsorted(edges, current, side="left"), minlength=len(edges) + 1) / len(current)
    reference_share, current_share = (np.clip(share, EMPTY_BIN_SHARE, None) for share in (reference_share, current_share))
    return float(np.sum((current_share - reference_share) * np.log(current_share / reference_share)))


def ks_test(reference, current) -> dict:
    """Two-sample Kolmogorov-Smirnov: the largest gap between the two CDFs and its p-value."""
    result = stats.ks_2samp(np.asarray(reference, dtype=float), np.asarray(current, dtype=float))
    return {"statistic": float(result.statistic), "pvalue": float(result.pvalue)}


def label_mix_test(reference_labels, predicted_labels, labels: list[str]) -> dict:
    """Chi-square test of the predicted label counts against the reference's label shares (each
    share smoothed by half a count, so a label absent from the reference does not divide by zero)."""
    reference_counts = np.array([np.sum(np.asarray(reference_labels) == label) for label in labels], dtype=float) + 0.5
    observed = np.array([np.sum(np.asarray(predicted_labels) == label) for label in labels], dtype=float)
    expected = reference_counts / reference_counts.sum() * observed.sum()
    result = stats.chisquare(observed, expected)
    return {"statistic": float(result.statistic), "pvalue": float(result.pvalue),
            "reference_share": dict(zip(labels, (reference_counts / reference_counts.sum()).round(4).tolist())),
            "predicted_share": dict(zip(labels, (observed / observed.sum()).round(4).tolist()))}


def classification_metrics(true_labels, predicted_labels, labels: list[str], *, bootstrap_samples: int,
                           seed: int, confidence: float = 0.95) -> dict:
    """Accuracy, per-class precision/recall/F1 and macro-F1 (over `labels`), with percentile bootstrap
    intervals of accuracy and macro-F1 (rows resampled with replacement)."""
    true_labels, predicted_labels = np.asarray(true_labels), np.asarray(predicted_labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        true_labels, predicted_labels, labels=labels, zero_division=0)
    macro_f1 = lambda truth, predicted: f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)  # noqa: E731
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(true_labels), size=(bootstrap_samples, len(true_labels)))
    tail = (1 - confidence) / 2 * 100
    interval = lambda values: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]  # noqa: E731
    return {
        "rows": int(len(true_labels)),
        "accuracy": float(accuracy_score(true_labels, predicted_labels)),
        "accuracy_interval": interval([accuracy_score(true_labels[s], predicted_labels[s]) for s in samples]),
        "macro_f1": float(macro_f1(true_labels, predicted_labels)),
        "macro_f1_interval": interval([macro_f1(true_labels[s], predicted_labels[s]) for s in samples]),
        "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                      for label, p, r, f, n in zip(labels, precision, recall, f1, support)},
    }
