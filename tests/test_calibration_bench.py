"""The calibration bench's two fits, on scores with a known class-prior shift."""

import numpy as np
from scipy.special import log_softmax, softmax
from sklearn.metrics import f1_score

from bench.calibration_bench import fit_by_likelihood, fit_by_macro_f1


def _shifted_scores(shift, rows=4000, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(rows, 3))
    gold = np.array([rng.choice(3, p=p) for p in softmax(logits, axis=1)])
    return log_softmax(logits - np.asarray(shift), axis=1), gold  # the model under-rates classes by `shift`


def test_likelihood_fit_recovers_a_known_prior_shift():
    log_probs, gold = _shifted_scores([0.0, 0.8, -0.5])
    np.testing.assert_allclose(fit_by_likelihood(log_probs, gold), [0.0, 0.8, -0.5], atol=0.15)


def test_macro_f1_fit_never_does_worse_than_no_bias_on_the_rows_it_was_fitted_on():
    log_probs, gold = _shifted_scores([0.0, 1.5, -1.0], rows=1000)
    bias = fit_by_macro_f1(log_probs, gold)
    before = f1_score(gold, log_probs.argmax(axis=1), average="macro")
    after = f1_score(gold, (log_probs + bias).argmax(axis=1), average="macro")
    assert bias[0] == 0.0 and after > before + 0.02
    # the grid's own macro-F1 is sklearn's: no better bias on the grid by sklearn's count
    from bench.calibration_bench import GRID
    best = max(f1_score(gold, (log_probs + np.array([0.0, a, b])).argmax(axis=1), average="macro")
               for a in GRID[::10] for b in GRID[::10])
    assert after >= best - 1e-12
