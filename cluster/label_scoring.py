"""Label scoring, the way lakeforge classifies with an LLM: each label word's log-probability as the
assistant's answer to the chat-templated prompt, normalised over the labels. Shared so the serving
side scores exactly what the evaluation scored (same template, same tokens), without importing jobs.
"""

from __future__ import annotations

import math


def chat_prompt_ids(tokenizer, system_prompt: str, text: str) -> list[int]:
    """Token ids of the system + user turns followed by the assistant's generation prompt."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(prompt, add_special_tokens=False).input_ids


def label_token_ids(tokenizer, labels: list[str]) -> list[list[int]]:
    return [tokenizer(label, add_special_tokens=False).input_ids for label in labels]


def label_probabilities(logprobs: list[float]) -> list[float]:
    """Softmax over the labels' log-likelihoods: P(label | prompt, the answer is a label)."""
    top = max(logprobs)
    weights = [math.exp(value - top) for value in logprobs]
    total = sum(weights)
    return [weight / total for weight in weights]
