"""Held-out evaluation: the fine-tuned model vs the current version, the base model zero-shot and
a TF-IDF baseline, with the promotion gate's decision.

    python -m jobs.evaluate --config configs/airline_sentiment.yaml [key=value ...]

The LLMs are scored by likelihood, not by parsing free text: each label word's log-probability
as the assistant's answer to the templated prompt; the prediction is the most likely label. All
systems see the same test rows, which training and checkpoint selection never saw, so paired
bootstrap intervals compare them honestly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from cluster.prompting import label_probabilities, label_token_ids, pad_token_id
from cluster.ray_cluster import connect
from cluster.registry import ModelRegistry
from jobs import data
from jobs.config import EvalSection, RunConfig
from jobs.report import SYSTEMS, write_report

GENERATION_SEED = 1  # not the split seed: the generated rows are a sample within the test sample


def _padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def score_labels(model, prompts: list[list[int]], label_token_ids: list[list[int]], pad_id: int) -> torch.Tensor:
    """log P(label | prompt) for every prompt and label: a [len(prompts), len(labels)] tensor.

    One forward pass over the prompts scores every label's first token; only labels of several
    tokens need another pass, with the earlier label tokens teacher-forced.
    """
    rows = torch.arange(len(prompts))
    ends = torch.as_tensor([len(ids) for ids in prompts])
    # Vocabulary logits only at the positions that end a prompt (the LM head is costly).
    keep, column = torch.unique(ends - 1, return_inverse=True)
    with torch.no_grad():
        input_ids, attention_mask = _padded(prompts, pad_id)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        first = torch.log_softmax(logits[rows, column].float(), dim=-1)
        scores = torch.stack([first[:, ids[0]] for ids in label_token_ids], dim=1)
        for j, ids in enumerate(label_token_ids):
            if len(ids) == 1:
                continue
            input_ids, attention_mask = _padded([prompt + ids[:-1] for prompt in prompts], pad_id)
            logprobs = torch.log_softmax(model(input_ids, attention_mask).logits.float(), dim=-1)
            for k in range(1, len(ids)):
                scores[:, j] += logprobs[rows, ends - 1 + k, ids[k]]
    return scores


class LabelScorer:
    """Ray Data UDF: per-label log-likelihoods -> prediction, label probabilities, the gold answer's
    log-likelihood; on a fixed share of rows also the model's free (greedy) answer."""

    def __init__(self, model_dir: str, labels: list[str], threads: int, generation_fraction: float):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = pad_token_id(self.tokenizer)
        self.label_token_ids = label_token_ids(self.tokenizer, labels)
        self.generation_fraction = generation_fraction
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(self, prompts: list[list[int]]) -> list[str]:
        """Greedy answers, a few tokens longer than the longest label (enough to see extra words)."""
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.as_tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=self.pad_id,
                max_new_tokens=max(len(ids) for ids in self.label_token_ids) + 2)
        return self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [list(ids[:n]) for ids, n in zip(batch["input_ids"], batch["prompt_len"])]
        scores = score_labels(self.model, prompts, self.label_token_ids, self.pad_id).numpy()
        probs = label_probabilities(scores)
        gold = batch["label_id"].astype(int)
        # Which rows also generate is fixed by their text, so every model answers the same rows.
        chosen = [i for i, text in enumerate(batch["text"])
                  if data.split_position(data.dedup_key(text), GENERATION_SEED) < self.generation_fraction]
        generated = np.full(len(prompts), None, dtype=object)
        if chosen:
            generated[chosen] = self.generate([prompts[i] for i in chosen])
        passthrough = {column: batch[column] for column in ("text", "label", "label_id", "source") if column in batch}
        return {**passthrough,
                "pred_id": scores.argmax(axis=1), "confidence": probs.max(axis=1), "probabilities": probs,
                # log P(gold answer | prompt) and its token count: the held-out answers' perplexity
                "gold_logprob": scores[np.arange(len(gold)), gold],
                "answer_tokens": np.asarray([len(self.label_token_ids[g]) for g in gold]),
                "generated": generated}


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


def evaluate_llm(model_dir: Path, test, labels: list[str], settings: EvalSection) -> pd.DataFrame:
    """Per-example predictions (see LabelScorer) of the model in `model_dir`."""
    return test.map_batches(
        LabelScorer, batch_format="numpy", batch_size=settings.batch_size, num_cpus=settings.cpus,
        compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"model_dir": str(model_dir), "labels": labels, "threads": settings.cpus,
                               "generation_fraction": settings.generation_fraction},
    ).to_pandas()


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


def evaluate_baseline(data_dir: Path, test: pd.DataFrame, classes: int) -> pd.DataFrame:
    """`tfidf_baseline` trained on every row of the train split, scored on the test rows."""
    train, validation = (data.split_dataset(data_dir, split).select_columns(["text", "label_id"]).to_pandas()
                         for split in ("train", "validation"))
    classifier, _ = tfidf_baseline(train, validation, classes)
    probs = np.zeros((len(test), classes))
    # classes_ takes the label column's dtype, which Ray may hand over as an object array.
    probs[:, classifier.classes_.astype(int)] = classifier.predict_proba(test["text"])
    return test.assign(pred_id=probs.argmax(axis=1), confidence=probs.max(axis=1), probabilities=list(probs))


def answer_perplexity(frame: pd.DataFrame) -> float:
    """exp(mean negative log-likelihood per gold answer token) over the test rows."""
    return float(np.exp(-frame["gold_logprob"].sum() / frame["answer_tokens"].sum()))


def promotion_gate(bootstrap: dict, metric: str, min_improvement: float) -> dict:
    """Deployable only if the fine-tuned model beats the current version (or, before the first
    version, the base model zero-shot) by more than `min_improvement` at the interval's lower end."""
    reference = "previous_version" if "previous_version" in bootstrap["systems"] else "base_zero_shot"
    low, high = bootstrap["differences"][f"fine_tuned - {reference}"][metric]
    deployable = low > min_improvement
    verdict = "beats" if deployable else "does not beat"
    return {
        "metric": metric, "reference": reference, "min_improvement": min_improvement,
        "difference_interval": [low, high], "level": bootstrap["level"], "deployable": deployable,
        "reason": f"fine_tuned {verdict} {reference} on {metric}: {bootstrap['level']:.0%} paired interval of the "
                  f"difference [{low:+.3f}, {high:+.3f}], lower end {'>' if deployable else '<='} {min_improvement:+.3f}",
    }


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


def run_evaluation(cfg: RunConfig, base_dir: Path, data_dir: Path, finetuned_dir: Path | None,
                   previous_dir: Path | None = None) -> tuple[dict, dict]:
    """Metrics of every system on the same test rows, error analysis, slices and (with a fine-tuned
    model) the promotion gate; writes evaluation.json and per-example predictions."""
    if cfg.eval.test_keys:
        test = data.pinned_test_rows(data_dir, data.read_test_keys(cfg.eval.test_keys))
    else:
        test = data.split_dataset(data_dir, "test")
        if cfg.eval.max_test_examples:
            test = test.limit(cfg.eval.max_test_examples)  # shards are in hash order: a uniform sample
        test = test.materialize()
    labels = cfg.data.labels
    llms = {"fine_tuned": finetuned_dir, "previous_version": previous_dir, "base_zero_shot": base_dir}
    predictions = {}  # fine-tuned first, so paired differences read "fine_tuned - other"
    for system, model_dir in llms.items():
        if model_dir is not None:
            predictions[system] = evaluate_llm(model_dir, test, labels, cfg.eval)
    columns = [column for column in ("text", "label", "label_id", "source") if column in test.schema().names]
    predictions["baseline_tfidf_logreg"] = evaluate_baseline(
        data_dir, test.select_columns(columns).to_pandas(), len(cfg.data.labels))
    test_keys = sorted(test.unique("key"))
    report = {"test_examples": test.count(), "labels": labels, "test_keys_pinned": bool(cfg.eval.test_keys),
              "test_keys_sha256": hashlib.sha256("\n".join(test_keys).encode()).hexdigest(),
              "models": {system: str(path) for system, path in llms.items() if path is not None}}
    out_dir = cfg.run_dir / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    for system, frame in predictions.items():
        report[system] = classification_metrics(frame["label_id"], frame["pred_id"], labels, frame["confidence"])
        if system in llms:
            report[system]["answer_perplexity"] = answer_perplexity(frame)
            report[system]["generation"] = generation_metrics(frame, labels)
        frame.to_parquet(out_dir / f"{system}.parquet")
    y_true = next(iter(predictions.values()))["label_id"].to_numpy()
    report["bootstrap"] = bootstrap_intervals(y_true, {name: frame["pred_id"].to_numpy() for name, frame in predictions.items()}, labels)
    report["slices"] = slice_metrics(predictions, labels, cfg.eval.terms)
    if finetuned_dir is not None:
        report["errors"] = error_analysis(predictions["fine_tuned"], labels, cfg.eval.worst_errors)
        report["gate"] = promotion_gate(report["bootstrap"], cfg.eval.gate_metric, cfg.eval.gate_min_improvement)
    (cfg.run_dir / "evaluation.json").write_text(json.dumps(report, indent=2))
    print(format_table(report))
    return report, predictions


def format_table(report: dict) -> str:
    intervals = report["bootstrap"]["systems"]
    lines = [f"[evaluate] held-out test split, {report['test_examples']} examples, "
             f"{report['bootstrap']['level']:.0%} bootstrap intervals",
             f"{'system':<24}{'accuracy':>24}{'macro-F1':>24}"]
    for name in SYSTEMS:
        if name in report:
            values = {"accuracy": report[name]["accuracy"], "macro_f1": report[name]["macro"]["f1"]}
            cells = [f"{values[key]:.3f} [{intervals[name][key][0]:.3f}, {intervals[name][key][1]:.3f}]" for key in values]
            lines.append(f"{name:<24}{cells[0]:>24}{cells[1]:>24}")
    if "gate" in report:
        lines.append(f"[gate] {'DEPLOYABLE' if report['gate']['deployable'] else 'NOT deployable'}: {report['gate']['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Evaluate the run's model against the current registry version; registering is the pipeline's job."""
    from cluster.config import load_config_or_exit

    cfg = load_config_or_exit(RunConfig, argv)
    connect()
    base_dir, data_dir, _ = data.prepare_run_inputs(cfg)
    finetuned_dir = cfg.run_dir / "model"
    current = ModelRegistry(cfg.storage_root, cfg.name).current()
    report, _ = run_evaluation(cfg, base_dir, data_dir, finetuned_dir if finetuned_dir.is_dir() else None,
                               Path(current["path"]) if current else None)
    print(f"[evaluate] report: {write_report(cfg.run_dir / 'report.html', report)}")


if __name__ == "__main__":
    main()
