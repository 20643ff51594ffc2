"""Does per-class bias calibration help? (`make bench` part; issue: the fine-tuned model vs TF-IDF)

A trained run's model scores its validation split (each label's log-likelihood, as evaluation
scores); per-class additive biases on those log-likelihoods are fitted there, two ways: by
likelihood (the biases that minimize the validation log-loss: restores the class priors a
class-balanced training stream moved) and by macro-F1 (a grid search over the biases, the metric
the demo reports). Each is then applied to the run's own held-out test predictions (the
probabilities its evaluation saved) and scored against the uncalibrated model, with paired
bootstrap intervals on the same rows. Nothing is written into the model folder: this measures
whether calibration is worth shipping.

    python -m bench.calibration_bench --run outputs/airline_sentiment [--validation-rows 1000]

Writes bench/results/calibration.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize
from scipy.special import log_softmax
from sklearn.metrics import f1_score

from jobs.evaluation.metrics import bootstrap_intervals
from jobs.evaluation.scoring import LabelScorer

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO / "bench" / "results" / "calibration.json"
GRID = np.round(np.arange(-3.0, 3.0001, 0.05), 2)  # bias of each class after the first (fixed at 0)


def validation_scores(run_dir: Path, labels: list[str], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Label log-likelihoods (rows x labels) and gold label ids of up to `rows` validation rows."""
    frame = pd.concat(pd.read_parquet(path) for path in sorted((run_dir / "data" / "validation").glob("*.parquet")))
    frame = frame.head(rows)
    scorer = LabelScorer(str(run_dir / "model"), labels, threads=torch.get_num_threads(), generation_fraction=0.0)
    scores, gold = [], []
    for start in range(0, len(frame), 64):
        batch = {column: frame[column].to_numpy()[start: start + 64] for column in ("input_ids", "prompt_len", "label_id", "text")}
        out = scorer(batch)
        scores.append(np.log(np.clip(np.stack(out["probabilities"]), 1e-12, None)))
        gold.append(batch["label_id"].astype(int))
    return np.concatenate(scores), np.concatenate(gold)


def fit_by_likelihood(log_probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    def loss(free: np.ndarray) -> float:
        shifted = log_softmax(log_probs + np.concatenate([[0.0], free]), axis=1)
        return -float(shifted[np.arange(len(gold)), gold].mean())
    return np.concatenate([[0.0], minimize(loss, np.zeros(log_probs.shape[1] - 1), method="Nelder-Mead").x])


def fit_by_macro_f1(log_probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    classes = log_probs.shape[1]
    best, best_f1 = np.zeros(classes), -1.0
    for free in itertools.product(GRID, repeat=classes - 1):
        bias = np.concatenate([[0.0], free])
        # sklearn's macro-F1 (zero_division=0) from the confusion matrix: 2TP / (support + predicted)
        confusion = np.bincount(gold * classes + (log_probs + bias).argmax(axis=1), minlength=classes**2).reshape(classes, classes)
        denominator = confusion.sum(axis=0) + confusion.sum(axis=1)
        f1 = float(np.mean(np.divide(2 * np.diag(confusion), denominator, out=np.zeros(classes), where=denominator > 0)))
        if f1 > best_f1 + 1e-12 or (abs(f1 - best_f1) <= 1e-12 and np.abs(bias).sum() < np.abs(best).sum()):
            best, best_f1 = bias, f1  # ties: the smallest correction
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "outputs" / "airline_sentiment", help="a trained and evaluated run folder")
    parser.add_argument("--validation-rows", type=int, default=1000)
    args = parser.parse_args()
    evaluation = json.loads((args.run / "evaluation.json").read_text())
    labels = evaluation["labels"]
    started = time.perf_counter()
    log_probs, gold = validation_scores(args.run, labels, args.validation_rows)
    scoring_seconds = time.perf_counter() - started
    test = pd.read_parquet(args.run / "predictions" / "fine_tuned.parquet")
    test_log_probs = np.log(np.clip(np.stack(test["probabilities"].to_numpy()), 1e-12, None))
    test_gold = test["label_id"].to_numpy().astype(int)
    baseline = pd.read_parquet(args.run / "predictions" / "baseline_tfidf_logreg.parquet")
    assert baseline["text"].tolist() == test["text"].tolist(), "the systems' predictions are not on the same rows"
    classes = list(range(len(labels)))
    biases = {"likelihood": fit_by_likelihood(log_probs, gold), "macro_f1": fit_by_macro_f1(log_probs, gold)}
    predictions = {"uncalibrated": test_log_probs.argmax(axis=1),
                   **{f"calibrated_{name}": (test_log_probs + bias).argmax(axis=1) for name, bias in biases.items()},
                   "baseline_tfidf_logreg": baseline["pred_id"].to_numpy()}
    result = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": str(args.run), "labels": labels,
        "validation_rows": int(len(gold)), "validation_scoring_seconds": round(scoring_seconds, 1), "test_rows": int(len(test_gold)),
        "biases": {name: [round(float(b), 3) for b in bias] for name, bias in biases.items()},
        "validation_macro_f1": {name: float(f1_score(gold, (log_probs + bias).argmax(axis=1), labels=classes, average="macro"))
                                for name, bias in {"uncalibrated": np.zeros(len(labels)), **biases}.items()},
        "test_macro_f1": {name: float(f1_score(test_gold, predicted, labels=classes, average="macro"))
                          for name, predicted in predictions.items()},
        "test_intervals": bootstrap_intervals(test_gold, predictions, labels),
    }
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(result, indent=2))
    for name, value in result["test_macro_f1"].items():
        print(f"[calibration] test macro-F1 {name}: {value:.3f}")
    for pair, interval in result["test_intervals"]["differences"].items():
        print(f"[calibration] {pair}: macro-F1 paired 95% [{interval['macro_f1'][0]:+.3f}, {interval['macro_f1'][1]:+.3f}]")
    print(f"[calibration] results: {RESULTS_FILE}")


if __name__ == "__main__":
    main()
