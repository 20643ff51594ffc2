"""Scoring an LLM on labelled rows by likelihood, not by parsing free text: each label word's
log-probability as the assistant's answer to the templated prompt; the prediction is the most
likely label. A sample of rows is also answered freely (greedy generation) to check that the chat
answer agrees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from cluster.prompting import label_probabilities, label_token_ids, pad_token_id
from jobs.config import EvalSection
from jobs.data.dedup import dedup_key
from jobs.data.split import split_position

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

    One forward pass over the prompts scores every label's first token and keeps their KV cache;
    a label of several tokens then feeds only its own earlier tokens (teacher-forced) on top of that
    cache, so a long text is read once however many labels span several tokens (Reuters R8: 3 of
    8). Vocabulary logits are computed only where a label token is scored: the LM head and its
    softmax over every position would cost more than the model itself on long texts.
    """
    rows = torch.arange(len(prompts))
    ends = torch.as_tensor([len(ids) for ids in prompts])
    several = any(len(ids) > 1 for ids in label_token_ids)
    keep, column = torch.unique(ends - 1, return_inverse=True)
    with torch.no_grad():
        input_ids, attention_mask = _padded(prompts, pad_id)
        prompt_pass = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=several)
        first = torch.log_softmax(prompt_pass.logits[rows, column].float(), dim=-1)
        scores = torch.stack([first[:, ids[0]] for ids in label_token_ids], dim=1)
        cache, width = prompt_pass.past_key_values, input_ids.shape[1]
        for j, ids in enumerate(label_token_ids):
            if len(ids) == 1:
                continue
            # The continuation sits after the padding in the cache but at the positions right after
            # each prompt, the padding masked out: the same computation as the unpadded prompt+label.
            steps = len(ids) - 1
            logits = model(
                input_ids=torch.as_tensor(ids[:-1]).expand(len(prompts), -1),
                attention_mask=torch.cat([attention_mask, torch.ones(len(prompts), steps, dtype=attention_mask.dtype)], dim=1),
                position_ids=ends.unsqueeze(1) + torch.arange(steps), cache_position=torch.arange(width, width + steps),
                past_key_values=cache, use_cache=True).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            scores[:, j] += logprobs[:, torch.arange(steps), torch.as_tensor(ids[1:])].sum(dim=1)
            cache.crop(-steps)  # back to the prompts alone for the next label
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
                  if split_position(dedup_key(text), GENERATION_SEED) < self.generation_fraction]
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


def evaluate_llm(model_dir: Path, test, labels: list[str], settings: EvalSection) -> pd.DataFrame:
    """Per-example predictions (see LabelScorer) of the model in `model_dir`."""
    return test.map_batches(
        LabelScorer, batch_format="numpy", batch_size=settings.batch_size, num_cpus=settings.cpus,
        compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"model_dir": str(model_dir), "labels": labels, "threads": settings.cpus,
                               "generation_fraction": settings.generation_fraction},
    ).to_pandas()
