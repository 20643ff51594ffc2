"""The classical yardsticks, fixed recipes fitted on the training rows: TF-IDF + logistic regression
(classification), the answer of the most similar training prompt by TF-IDF cosine (generative runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cluster.encryption import EncryptionSettings
from jobs.data.split import split_dataset

BASELINE_C_GRID = (1.0, 4.0, 16.0)  # inverse regularization strengths tried on the validation split


def tfidf_baseline(train: pd.DataFrame, validation: pd.DataFrame, classes: int):
    """The classical yardstick, fixed on purpose (no knobs in run configs, so it cannot move while the
    LLM is tuned): TF-IDF over word 1-2 grams and character 2-5 grams within word boundaries,
    logistic regression with balanced class weights, its regularization chosen by validation
    macro-F1 (each fitted on the train split). Returns the chosen pipeline and its C."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True),
    ).fit(train["text"])
    x_train, x_validation = features.transform(train["text"]), features.transform(validation["text"])
    y_train = train["label_id"].astype(int)

    models = {c: LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(x_train, y_train)
              for c in BASELINE_C_GRID}
    scores = {c: f1_score(validation["label_id"].astype(int), model.predict(x_validation),
                          labels=list(range(classes)), average="macro", zero_division=0) for c, model in models.items()}
    best = max(BASELINE_C_GRID, key=lambda c: (scores[c], -c))  # ties: the stronger regularization
    return make_pipeline(features, models[best]), best


def evaluate_baseline(data_dir: Path, test: pd.DataFrame, classes: int,
                      encryption: EncryptionSettings | None = None) -> pd.DataFrame:
    """`tfidf_baseline` trained on every row of the train split, scored on the test rows."""
    train, validation = (split_dataset(data_dir, split, encryption).select_columns(["text", "label_id"]).to_pandas()
                         for split in ("train", "validation"))
    classifier, _ = tfidf_baseline(train, validation, classes)
    probs = np.zeros((len(test), classes))
    # classes_ takes the label column's dtype, which Ray may hand over as an object array.
    probs[:, classifier.classes_.astype(int)] = classifier.predict_proba(test["text"])
    return test.assign(pred_id=probs.argmax(axis=1), confidence=probs.max(axis=1), probabilities=list(probs))


def retrieval_baseline(train_prompts: pd.Series, train_answers: pd.Series, prompts: pd.Series) -> np.ndarray:
    """The classical yardstick of generative runs, fixed like `tfidf_baseline`: each prompt gets the
    answer of the training prompt most similar to it by TF-IDF cosine (word 1-2 grams, sublinear tf);
    of equally similar training prompts the first wins."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True).fit(train_prompts)
    # TF-IDF rows are L2-normalised: their dot product is the cosine.
    similarity = (vectorizer.transform(prompts) @ vectorizer.transform(train_prompts).T).toarray()
    return np.asarray(train_answers, dtype=object)[similarity.argmax(axis=1)]
