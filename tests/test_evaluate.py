import numpy as np
import pandas as pd
import pytest
import torch

from jobs.evaluation.metrics import classification_metrics
from jobs.evaluation.scoring import score_labels


def brute_force_log_likelihood(model, prompt: list[int], label: list[int]) -> float:
    ids = torch.tensor([prompt + label])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(prompt) - 1 + k, token]) for k, token in enumerate(label))


def test_label_scores_equal_the_sequence_log_likelihood(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Two labels of several tokens: each continues the prompts' KV cache, cropped back in between.
    labels = ["negative", "very mixed feelings", "positive", "quite positive overall"]
    label_ids = [tokenizer(label, add_special_tokens=False).input_ids for label in labels]
    assert len(label_ids[1]) > 2 and len(label_ids[3]) > 1
    prompts = [tokenizer(text).input_ids for text in ("short", "a much longer prompt to force padding here")]

    scores = score_labels(model, prompts, label_ids, pad_id=2)

    expected = [[brute_force_log_likelihood(model, p, l) for l in label_ids] for p in prompts]
    np.testing.assert_allclose(scores.numpy(), np.array(expected), rtol=1e-4, atol=1e-4)


def test_classification_metrics_match_hand_computation():
    labels = ["negative", "neutral", "positive"]
    metrics = classification_metrics([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], labels)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    negative = metrics["per_class"]["negative"]
    assert negative["precision"] == pytest.approx(1 / 2) and negative["recall"] == pytest.approx(1 / 2)
    assert metrics["per_class"]["neutral"]["precision"] == pytest.approx(1 / 2)
    assert metrics["per_class"]["positive"]["f1"] == pytest.approx(0.8)
    assert metrics["macro"]["f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert metrics["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_classification_metrics_count_unpredicted_classes_as_zero():
    metrics = classification_metrics([0, 1, 2], [0, 0, 0], ["a", "b", "c"])
    assert metrics["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_bootstrap_intervals_contain_the_estimate_and_separate_clearly_different_systems():
    from jobs.evaluation.metrics import bootstrap_intervals

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=400)
    good = np.where(rng.random(400) < 0.9, y, (y + 1) % 3)   # about 90% right
    poor = np.where(rng.random(400) < 0.5, y, (y + 1) % 3)   # about 50% right
    result = bootstrap_intervals(y, {"good": good, "poor": poor}, ["a", "b", "c"], resamples=300)
    low, high = result["systems"]["good"]["accuracy"]
    assert low < (good == y).mean() < high and high - low < 0.1
    diff_low, diff_high = result["differences"]["good - poor"]["accuracy"]
    assert 0.3 < diff_low < diff_high < 0.5
    # Identical systems: the paired difference is exactly zero on every resample.
    same = bootstrap_intervals(y, {"x": good, "y": good.copy()}, ["a", "b", "c"], resamples=50)
    assert same["differences"]["x - y"] == {"accuracy": [0.0, 0.0], "macro_f1": [0.0, 0.0]}


def test_weighted_averages_match_scikit_learn():
    from sklearn.metrics import f1_score

    y_true, y_pred = [0, 0, 0, 1, 2, 2], [0, 1, 0, 1, 2, 0]
    metrics = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert metrics["weighted"]["f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert "calibration" not in metrics


def test_expected_calibration_error_by_hand():
    from jobs.evaluation.metrics import calibration

    # Bin [0.9, 1.0): two predictions at 0.95, one right -> |0.5 - 0.95| = 0.45 over 2/4 of the rows.
    # Bin [0.6, 0.7): two predictions at 0.6, both right -> |1.0 - 0.6| = 0.4 over 2/4 of the rows.
    result = calibration([True, False, True, True], [0.95, 0.95, 0.6, 0.6])
    assert result["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.4)
    assert [row["examples"] for row in result["reliability"]] == [2, 2]
    perfect = calibration([True] * 5, [1.0] * 5)
    assert perfect["ece"] == 0.0 and perfect["reliability"][0]["bin"] == [0.9, 1.0]


def _bootstrap_of(y, systems: dict) -> dict:
    from jobs.evaluation.metrics import bootstrap_intervals

    return bootstrap_intervals(y, systems, ["a", "b", "c"], resamples=200)


@pytest.fixture(scope="module")
def labelled_rows():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, size=300)
    return y, np.where(rng.random(300) < 0.9, y, (y + 1) % 3), np.where(rng.random(300) < 0.6, y, (y + 2) % 3)


def test_gate_promotes_a_clearly_better_model_over_the_current_version(labelled_rows):
    from jobs.evaluation.gate import promotion_gate

    y, better, worse = labelled_rows
    gate = promotion_gate(_bootstrap_of(y, {"fine_tuned": better, "previous_version": worse, "base_zero_shot": worse}),
                          "macro_f1", 0.0)
    assert gate["deployable"] and gate["reference"] == "previous_version"
    assert gate["difference_interval"][0] > 0 and "beats previous_version" in gate["reason"]
    # The same gap is not enough when the configured margin is larger than it.
    strict = promotion_gate(_bootstrap_of(y, {"fine_tuned": better, "previous_version": worse}), "accuracy", 0.5)
    assert not strict["deployable"]


def test_gate_rejects_a_worse_or_indistinguishable_model(labelled_rows):
    from jobs.evaluation.gate import promotion_gate

    y, better, worse = labelled_rows
    assert not promotion_gate(_bootstrap_of(y, {"fine_tuned": worse, "previous_version": better}), "macro_f1", 0.0)["deployable"]
    # Retraining to the same predictions: the paired interval is [0, 0], not a win.
    same = promotion_gate(_bootstrap_of(y, {"fine_tuned": better, "previous_version": better.copy()}), "accuracy", 0.0)
    assert not same["deployable"] and same["difference_interval"] == [0.0, 0.0]
    # Before the first version the reference is the base model zero-shot.
    first = promotion_gate(_bootstrap_of(y, {"fine_tuned": better, "base_zero_shot": worse}), "accuracy", 0.0)
    assert first["reference"] == "base_zero_shot" and first["deployable"]


def test_error_analysis_lists_the_most_confident_mistakes_first():
    import pandas as pd

    from jobs.evaluation.analysis import error_analysis

    frame = pd.DataFrame({
        "text": ["w1", "ok", "w2", "w3"], "label_id": [0, 1, 2, 2], "pred_id": [1, 1, 0, 1],
        "confidence": [0.6, 0.99, 0.9, 0.7],
    })
    errors = error_analysis(frame, ["a", "b", "c"], worst=2)
    assert errors["mistakes"] == 3
    assert [row["text"] for row in errors["worst"]] == ["w2", "w3"]
    assert errors["worst"][0] == {"text": "w2", "label": "c", "predicted": "a", "confidence": 0.9}
    assert [row["text"] for row in errors["per_class"]["c"]] == ["w2", "w3"] and errors["per_class"]["b"] == []


def test_slice_metrics_match_scikit_learn_on_each_slice():
    import pandas as pd
    import pyarrow as pa
    from sklearn.metrics import f1_score

    from jobs.evaluation.analysis import slice_metrics

    texts = ["flight delay again", "thanks", "delay delay " + "word " * 20, "great crew on this flight today ok"]
    # Arrow-backed strings, as Ray Data's to_pandas() returns them.
    frame = pd.DataFrame({"text": pd.Series(texts, dtype=pd.ArrowDtype(pa.string())), "label_id": [0, 2, 0, 2], "pred_id": [0, 2, 1, 0]})
    slices = {s["slice"]: s for s in slice_metrics({"m": frame}, ["a", "b", "c"], ["Delay"])}
    delay = slices['contains "Delay"']  # case-insensitive
    assert delay["examples"] == 2 and delay["systems"]["m"]["accuracy"] == 0.5
    assert delay["systems"]["m"]["macro_f1"] == pytest.approx(
        f1_score([0, 0], [0, 1], labels=[0, 1, 2], average="macro", zero_division=0))
    assert slices['no "Delay"']["examples"] == 2 and slices["length: 21+ words"]["examples"] == 1
    assert slices["length: 11-20 words"]["systems"]["m"]["accuracy"] is None  # empty slice: no figure


def test_answer_perplexity_is_per_answer_token():
    import pandas as pd

    from jobs.evaluation.metrics import answer_perplexity

    # Two answers: one token at log p = -1, two tokens at log p total -3 -> exp(4 / 3).
    frame = pd.DataFrame({"gold_logprob": [-1.0, -3.0], "answer_tokens": [1, 2]})
    assert answer_perplexity(frame) == pytest.approx(np.exp(4 / 3))


def test_generation_exact_match_ignores_case_and_final_punctuation():
    import pandas as pd

    from jobs.evaluation.metrics import generation_metrics

    frame = pd.DataFrame({"label": ["negative", "neutral", "positive", "positive"],
                          "generated": [" Negative.", "The sentiment is neutral", None, "positive!"]})
    result = generation_metrics(frame, ["negative", "neutral", "positive"])
    assert result == {"examples": 3, "exact_match": pytest.approx(2 / 3), "label_word_rate": pytest.approx(2 / 3)}


def test_label_scorer_batched_answers_equal_one_by_one_generation(tiny_model_dir):
    from transformers import AutoTokenizer

    from jobs.evaluation.scoring import LabelScorer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["short", "a much longer message that forces left padding in the batch", "mid length text"]
    prompts = [tokenizer(t).input_ids for t in texts]
    width = max(map(len, prompts))
    batch = {"text": np.array(texts, dtype=object), "label": np.array(["a", "b", "a"], dtype=object),
             "label_id": np.array([0, 1, 0]), "prompt_len": np.array([len(p) for p in prompts]),
             "input_ids": [np.array(p + [0] * (width - len(p))) for p in prompts]}
    scorer = LabelScorer(str(tiny_model_dir), ["a", "b"], threads=1, generation_fraction=1.0)
    result = scorer(batch)
    assert list(result["generated"]) == [scorer.generate([p])[0] for p in prompts]
    assert result["probabilities"].shape == (3, 2) and np.allclose(result["probabilities"].sum(axis=1), 1)
    assert list(LabelScorer(str(tiny_model_dir), ["a", "b"], 1, generation_fraction=0.0)(batch)["generated"]) == [None] * 3


def test_the_baseline_chooses_its_regularization_on_validation_and_reads_character_ngrams():
    from sklearn.metrics import f1_score

    from jobs.evaluation.baseline import BASELINE_C_GRID, tfidf_baseline

    rng = np.random.default_rng(0)
    words = {0: ["awful", "delayed", "lost", "rude"], 1: ["when", "which", "gate", "schedule"],
             2: ["great", "thanks", "lovely", "friendly"]}
    filler = ["flight", "plane", "today", "crew", "seat", "the", "my", "again"]

    def rows(n: int) -> pd.DataFrame:
        labels = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])  # imbalanced, as the tweets are
        texts = [" ".join(rng.choice(words[y], 2).tolist() + rng.choice(filler, 3).tolist()) for y in labels]
        return pd.DataFrame({"text": texts, "label_id": labels})

    train, validation = rows(400), rows(120)
    pipeline, chosen = tfidf_baseline(train, validation, classes=3)
    features, model = pipeline.steps[0][1], pipeline.steps[1][1]
    assert chosen in BASELINE_C_GRID and model.C == chosen and model.class_weight == "balanced"
    # The chosen C is the validation macro-F1's best (ties: the smaller C), refitted nowhere else.
    from sklearn.linear_model import LogisticRegression

    x_train, x_validation = features.transform(train["text"]), features.transform(validation["text"])
    scores = {c: f1_score(validation["label_id"], LogisticRegression(C=c, class_weight="balanced", max_iter=3000)
                          .fit(x_train, train["label_id"]).predict(x_validation), average="macro")
              for c in BASELINE_C_GRID}
    assert scores[chosen] == max(scores.values()) and chosen == min(c for c in scores if scores[c] == scores[chosen])
    # Character n-grams: misspellings never seen as words still read as their label.
    assert pipeline.predict(["graaate thankss lovelyy crew"]).tolist() == [2]
    assert pipeline.predict(["awfull delayeddd rudee seat"]).tolist() == [0]
