"""Why the fine-tuned model predicts what it does: attributions, importance, dependence, faithfulness.

Reads the fine-tuned model (`<run>/model`) and its test predictions
(`<run>/predictions/fine_tuned.parquet`), so run jobs.finetune and jobs.evaluate (or jobs.pipeline)
first. Writes `<run>/explanations.json`; the report (evaluation/report.py) renders it.

- Integrated gradients (Captum) on the input embeddings, for P(predicted label), the softmax over
  the labels' log-likelihoods as the answer (what evaluation/scoring.py predicts with). The baseline is the
  same prompt with every user-text token replaced by the pad token: template tokens are identical in
  input and baseline, so only the text is attributed, and attributions add up to f(input) - f(baseline).
- SHAP (partition explainer, whitespace-word masker) of every label's probability.
- Word importance per label, aggregated from both.
- Dependence curves by intervention on the text (length, terms, a leading @handle).
- Faithfulness: deleting the top-attributed words must hurt the prediction more than deleting
  as many random words; otherwise the attributions do not describe the model.

Every row costs a backward pass per integration step, so rows are spread over Ray tasks that
each load the model once; the driver only merges their results.
"""

from __future__ import annotations

import bisect
import json
import re
import string
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from cluster.contracts import ARTIFACT_FILE, ModelArtifact
from cluster.prompting import label_probabilities, label_token_ids, pad_token_id, prompt_text
from jobs.config import ExplainSection, RunConfig
from jobs.evaluation.scoring import score_labels

LENGTH_GRID = (2, 4, 8, 16)  # words kept by the length intervention, then the whole text
HANDLE = "@airline"
LEADING_HANDLES = re.compile(r"^(?:@\w+\s*)+")
SCORE_BATCH = 16  # prompts per no-grad forward pass
IG_BATCH = 8  # integration steps per backward pass: bounds activation memory on a 30-layer model
TOP_WORDS = 10
MIN_WORD_COUNT = 2  # a word seen once says more about its example than about the label


def embedding_label_probabilities(model, inputs_embeds: torch.Tensor, label_token_ids: list[list[int]]) -> torch.Tensor:
    """P(label | prompt) over the labels, differentiable in `inputs_embeds` [batch, prompt, hidden].

    The same quantity as softmax(score_labels(...)), for prompts of one length (no padding):
    multi-token labels get a pass with their earlier tokens teacher-forced.
    """
    batch = inputs_embeds.shape[0]
    first = torch.log_softmax(model(inputs_embeds=inputs_embeds, logits_to_keep=1).logits[:, -1].float(), dim=-1)
    scores = []
    for ids in label_token_ids:
        score = first[:, ids[0]]
        if len(ids) > 1:
            forced = model.get_input_embeddings()(torch.tensor(ids[:-1])).expand(batch, -1, -1)
            logits = model(inputs_embeds=torch.cat([inputs_embeds, forced], dim=1), logits_to_keep=len(ids) - 1).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # position k predicts label token k + 1
            score = score + sum(logprobs[:, k, ids[k + 1]] for k in range(len(ids) - 1))
        scores.append(score)
    return label_probabilities(torch.stack(scores, dim=1))


class LabelModel:
    """A fine-tuned model folder as a function of text: label probabilities and attributions."""

    def __init__(self, model_dir: str | Path, threads: int = 1):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        artifact = ModelArtifact.read(model_dir)
        self.labels, self.system_prompt = artifact.labels, artifact.system_prompt
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = pad_token_id(self.tokenizer)
        self.label_token_ids = label_token_ids(self.tokenizer, self.labels)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
        sentinel = "\x00TEXT\x00"
        self.text_start = self._render(sentinel).index(sentinel)  # where the user text begins in every prompt

    def _render(self, text: str) -> str:
        return prompt_text(self.tokenizer, self.system_prompt, text)

    def encode(self, text: str) -> tuple[list[int], list[int | None]]:
        """Prompt token ids as jobs.data builds them, and for each token the index of the text's
        whitespace-separated word it belongs to (None for template tokens)."""
        prompt = self._render(text)
        start, end = self.text_start, self.text_start + len(text)
        if prompt[start:end] != text:
            raise ValueError("the chat template alters the user text; cannot locate its tokens")
        word_starts = [match.start() for match in re.finditer(r"\S+", text)]
        encoding = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        owners: list[int | None] = []
        for token_start, token_end in encoding.offset_mapping:
            if token_end <= start or token_start >= end or not word_starts:
                owners.append(None)
            else:  # the last word starting before the token ends: "Ġgreat" and a lone "Ġ" join a word
                owners.append(max(bisect.bisect_left(word_starts, token_end - start) - 1, 0))
        return encoding.input_ids, owners

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """[len(texts), labels] label probabilities, as evaluation/scoring.py computes them."""
        batches = []
        for first in range(0, len(texts), SCORE_BATCH):
            prompts = [self.encode(text)[0] for text in texts[first:first + SCORE_BATCH]]
            batches.append(label_probabilities(score_labels(self.model, prompts, self.label_token_ids, self.pad_id)).numpy())
        return np.concatenate(batches) if batches else np.zeros((0, len(self.labels)))

    def integrated_gradients(self, text: str, target: int, steps: int) -> dict:
        """Word attributions for P(labels[target]) and the completeness check of the integral."""
        from captum.attr import IntegratedGradients

        ids, owners = self.encode(text)
        embed = self.model.get_input_embeddings()
        inputs = embed(torch.tensor([ids]))
        # The text's tokens replaced by the pad token (Captum's usual text reference), the template kept.
        # On SmolLM2 this path is smoother than all-zero embeddings: fewer steps for the same completeness.
        baseline = embed(torch.tensor([[self.pad_id if owner is not None else token for token, owner in zip(ids, owners)]]))

        def forward(embeds: torch.Tensor) -> torch.Tensor:
            return embedding_label_probabilities(self.model, embeds, self.label_token_ids)

        attributions, delta = IntegratedGradients(forward).attribute(
            inputs, baselines=baseline, target=target, n_steps=steps,
            internal_batch_size=IG_BATCH, return_convergence_delta=True)
        per_token = attributions.sum(dim=-1)[0].tolist()
        words = text.split()
        per_word = [0.0] * len(words)
        for owner, value in zip(owners, per_token):
            if owner is not None:
                per_word[owner] += value
        with torch.no_grad():
            f_input, f_baseline = forward(torch.cat([inputs, baseline]))[:, target].tolist()
        return {"target": self.labels[target], "words": words, "attributions": per_word, "sum": float(sum(per_token)),
                "f_input": f_input, "f_baseline": f_baseline, "difference": f_input - f_baseline,
                "convergence_delta": float(delta[0])}

    def shap_values(self, text: str, max_evals: int) -> dict:
        """SHAP values of every label's probability for each whitespace-separated word."""
        import shap

        masker = shap.maskers.Text(r"\s+")
        if len(masker.data_transform(text)[0]) < 2:  # no partition tree for one word; its value is exact anyway
            masked = str(masker(np.zeros(1, dtype=bool), text)[0][0])
            base, full = self.probabilities([masked, text])
            return {"tokens": [text.strip()], "values": (full - base)[:, None].tolist(), "base_values": base.tolist()}
        explainer = shap.Explainer(lambda texts: self.probabilities([str(t) for t in texts]),
                                   masker, output_names=self.labels, algorithm="partition")
        explanation = explainer([text], max_evals=max_evals, batch_size=SCORE_BATCH, silent=True)[0]
        return {"tokens": [token.strip() for token in explanation.data],
                "values": explanation.values.T.tolist(),  # [labels, tokens]
                "base_values": np.asarray(explanation.base_values).tolist()}


def interventions(text: str, terms: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Per feature: its grid point names and the text rewritten for each point."""
    words = text.split()
    rewritten = {"words kept": ([str(k) for k in LENGTH_GRID] + ["all"],
                                [" ".join(words[:k]) for k in LENGTH_GRID] + [" ".join(words)])}
    for term in terms:  # substring match, as the evaluation slices define presence ("thank" in "thanks")
        without = " ".join(re.sub(re.escape(term), " ", text, flags=re.IGNORECASE).split())
        rewritten[f"term: {term}"] = (["removed", "appended"], [without, f"{without} {term}".strip()])
    unhandled = LEADING_HANDLES.sub("", text)
    rewritten["leading handle"] = (["removed", f"{HANDLE} prefixed"], [unhandled, f"{HANDLE} {unhandled}"])
    return rewritten


def _explain_row(model: LabelModel, row: dict, settings: ExplainSection, terms: list[str]) -> dict:
    """IG for every row; SHAP for token-level rows; interventions and deletions for dependence rows."""
    probs = model.probabilities([row["text"]])[0]
    target = int(probs.argmax())
    result = {**row, "predicted": model.labels[target], "probabilities": dict(zip(model.labels, probs.tolist())),
              "integrated_gradients": model.integrated_gradients(row["text"], target, settings.ig_steps)}
    if row["token_level"]:
        result["shap"] = model.shap_values(row["text"], settings.shap_max_evals)
    if row["dependence"]:
        features = interventions(row["text"], terms)
        words, attributions = result["integrated_gradients"]["words"], result["integrated_gradients"]["attributions"]
        deleted = max(1, round(settings.deletion_fraction * len(words)))
        top = set(np.argsort(attributions, kind="stable")[::-1][:deleted].tolist())
        # Seeded by row, not by task, so the random baseline does not depend on how rows are chunked.
        rng = np.random.default_rng([settings.seed, row["row"]])
        random_words = set(rng.choice(len(words), size=deleted, replace=False).tolist())
        deletions = [" ".join(words)] + [" ".join(w for i, w in enumerate(words) if i not in drop) for drop in (top, random_words)]
        texts = [text for _, rewritten in features.values() for text in rewritten] + deletions
        probs_all = model.probabilities(texts)
        result["interventions"], offset = {}, 0
        for feature, (grid, _) in features.items():
            result["interventions"][feature] = probs_all[offset:offset + len(grid)].tolist()
            offset += len(grid)
        kept, after_top, after_random = probs_all[offset:, target]
        result["faithfulness"] = {"deleted": deleted, "top_words": [words[i] for i in sorted(top)],
                                  "drop_top": float(kept - after_top), "drop_random": float(kept - after_random)}
    return result


@ray.remote
def _explain_chunk(model_dir: str, rows: list[dict], settings: ExplainSection, terms: list[str]) -> list[dict]:
    model = LabelModel(model_dir, threads=max(1, int(settings.cpus_per_task)))
    return [_explain_row(model, row, settings, terms) for row in rows]


def pick_rows(predictions: pd.DataFrame, settings: ExplainSection) -> list[dict]:
    """The rows to explain: `examples` token-level ones stratified by predicted label with up to a
    third mistakes, and a uniform sample of `dependence_examples`; a row may be in both."""
    predictions = predictions.reset_index(drop=True)  # row ids are positions
    rng = np.random.default_rng(settings.seed)

    def round_robin(frame: pd.DataFrame, count: int) -> pd.DataFrame:
        shuffled = frame.sample(frac=1.0, random_state=rng)
        rank = shuffled.groupby("pred_id").cumcount().to_numpy()  # first of every label, then second...
        return shuffled.iloc[np.argsort(rank, kind="stable")[:count]]

    count = min(settings.examples, len(predictions))
    wrong = predictions[predictions["pred_id"] != predictions["label_id"]]
    mistakes = round_robin(wrong, min(len(wrong), max(1, count // 3)))
    chosen = pd.concat([mistakes, round_robin(predictions.drop(mistakes.index), count - len(mistakes))])
    dependence = set(rng.choice(len(predictions), size=min(settings.dependence_examples, len(predictions)), replace=False).tolist())
    token_level = chosen.index.tolist()
    return [{"row": int(position), "text": str(predictions.at[position, "text"]), "label": str(predictions.at[position, "label"]),
             "token_level": position in token_level, "dependence": position in dependence}
            for position in token_level + sorted(dependence - set(token_level))]


def _top_words(contributions: list[tuple[str, str, float]], labels: list[str]) -> dict[str, list[dict]]:
    """Mean contribution of each normalised word to each label; the strongest words per label."""
    collected: dict[str, dict[str, list[float]]] = {label: defaultdict(list) for label in labels}
    for label, word, value in contributions:
        word = word.lower().strip(string.punctuation)
        if word:
            collected[label][word].append(value)
    return {label: sorted(({"word": word, "score": float(np.mean(values)), "count": len(values)}
                           for word, values in words.items() if len(values) >= MIN_WORD_COUNT),
                          key=lambda item: -item["score"])[:TOP_WORDS] for label, words in collected.items()}


def explain_predictions(model_dir: str | Path, predictions: pd.DataFrame, settings: ExplainSection, terms: list[str]) -> dict:
    """Explain the model in `model_dir` on rows of its evaluation predictions, with Ray tasks.

    `predictions` needs text, label, label_id and pred_id (the latter two only to pick rows); the
    probabilities and predicted label reported are recomputed by the model, which IG then explains.
    """
    labels = ModelArtifact.read(model_dir).labels
    if predictions.empty:
        raise ValueError("no predictions to explain")
    rows = pick_rows(predictions, settings)
    chunks = [rows[task::settings.tasks] for task in range(settings.tasks) if rows[task::settings.tasks]]
    remote = _explain_chunk.options(num_cpus=settings.cpus_per_task)
    by_row = {r["row"]: r for chunk in ray.get([remote.remote(str(model_dir), c, settings, terms) for c in chunks]) for r in chunk}
    results = [by_row[row["row"]] for row in rows]
    examples = [{key: r[key] for key in ("row", "text", "label", "predicted", "probabilities", "integrated_gradients", "shap")}
                for r in results if r["token_level"]]
    dependent = [r for r in results if r["dependence"]]
    dependence = []
    for feature, (grid, _) in interventions("", terms).items():  # feature names and grids do not depend on the text
        mean = np.mean([r["interventions"][feature] for r in dependent], axis=0)  # [grid, labels]
        dependence.append({"feature": feature, "grid": grid, "examples": len(dependent),
                           "mean_probability": {label: mean[:, j].tolist() for j, label in enumerate(labels)}})
    drops = np.array([[r["faithfulness"]["drop_top"], r["faithfulness"]["drop_random"]] for r in dependent])
    shap_words = [(label, token, values[t]) for e in examples for label, values in zip(labels, e["shap"]["values"])
                  for t, token in enumerate(e["shap"]["tokens"])]
    ig_words = [(r["predicted"], word, value) for r in results
                for word, value in zip(r["integrated_gradients"]["words"], r["integrated_gradients"]["attributions"])]
    errors = np.abs([r["integrated_gradients"]["sum"] - r["integrated_gradients"]["difference"] for r in results])
    return {
        "labels": labels, "model_dir": str(model_dir), "settings": settings.model_dump(), "terms": list(terms),
        "examples": examples,
        "importance": {"shap": _top_words(shap_words, labels), "integrated_gradients": _top_words(ig_words, labels)},
        "min_word_count": MIN_WORD_COUNT,
        "dependence": dependence,
        "faithfulness": {
            "examples": len(dependent), "deletion_fraction": settings.deletion_fraction,
            "mean_drop_top": float(drops[:, 0].mean()), "mean_drop_random": float(drops[:, 1].mean()),
            "gap": float((drops[:, 0] - drops[:, 1]).mean()), "share_top_greater": float((drops[:, 0] > drops[:, 1]).mean()),
            "per_example": [{"row": r["row"], "text": r["text"], "predicted": r["predicted"], **r["faithfulness"]} for r in dependent],
        },
        "completeness": {"rows": len(results), "mean_abs_error": float(errors.mean()), "max_abs_error": float(errors.max())},
    }


def explain_inputs(cfg: RunConfig) -> tuple[Path, Path]:
    model_dir = cfg.run_dir / "model"
    predictions = cfg.run_dir / "predictions" / "fine_tuned.parquet"
    for path, producer in ((model_dir / ARTIFACT_FILE, "jobs.finetune"), (predictions, "jobs.evaluate")):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run {producer} (or jobs.pipeline) with this config first")
    return model_dir, predictions


def explain(cfg: RunConfig) -> dict:
    """Explain the run's fine-tuned model on its test predictions; writes `<run>/explanations.json`."""
    model_dir, predictions = explain_inputs(cfg)
    started = time.perf_counter()
    explanations = explain_predictions(model_dir, pd.read_parquet(predictions), cfg.explain, cfg.eval.terms)
    explanations["seconds"] = time.perf_counter() - started
    (cfg.run_dir / "explanations.json").write_text(json.dumps(explanations, indent=2))
    print(summary(explanations))
    return explanations


def summary(explanations: dict) -> str:
    faithfulness, completeness = explanations["faithfulness"], explanations["completeness"]
    lines = [
        f"[explain] {len(explanations['examples'])} examples explained token by token, {faithfulness['examples']} "
        f"dependence rows, {explanations['settings']['tasks']} Ray tasks",
        f"[explain] IG completeness |sum - (f(x) - f(baseline))|: mean {completeness['mean_abs_error']:.2e}, "
        f"max {completeness['max_abs_error']:.2e}",
        f"[explain] faithfulness: deleting the top {faithfulness['deletion_fraction']:.0%} words by IG drops P(predicted) "
        f"by {faithfulness['mean_drop_top']:.3f} vs {faithfulness['mean_drop_random']:.3f} for random words "
        f"(gap {faithfulness['gap']:+.3f}, top > random in {faithfulness['share_top_greater']:.0%})",
    ]
    for label, words in explanations["importance"]["shap"].items():
        lines.append(f"[explain] top words (SHAP) for {label}: " + (", ".join(w["word"] for w in words[:5]) or "-"))
    return "\n".join(lines)
