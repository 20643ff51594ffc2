"""How a text becomes the model's prompt, and label scores its answer: the one definition that data
templating, training, evaluation, explanations, batch inference and the gateway all call, so that
every stage prompts and scores exactly as training did.

A classification model is asked with its chat template: the model folder's system prompt
(`lakeforge_model.json`) and the text as the user's turn; its answer is one of the label words.
Labels are scored by likelihood: log P(label tokens | prompt) per label, normalised over the
labels. Lives in `cluster/` because both `jobs` and `serving` use it and never import each other.
"""

from __future__ import annotations

# The compact template (`data.template: compact`): each turn on a line of its own, no role markers,
# no default system prompt, the answer closed by the end token. A classification example is then
# its system line (when set), the text and the label: about half the tokens of SmolLM2's ChatML
# with the demo's prompt, so twice the examples per CPU-second. The exported model folder carries
# it as its chat template, so vLLM's chat route, /v1/classify and batch inference prompt the same.
COMPACT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
    "{%- else -%}{{ message['content'] + '\n' }}{%- endif -%}"
    "{%- endfor -%}"
)
TEMPLATES = ("model", "compact")


def use_template(tokenizer, template: str):
    """The tokenizer with the run's chat template: the model's own ("model") or the compact one.
    Data templating and the training workers (whose checkpoints export the tokenizer) both call it."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}: expected one of {TEMPLATES}")
    if template == "compact":
        tokenizer.chat_template = COMPACT_CHAT_TEMPLATE
    return tokenizer



def pad_token_id(tokenizer) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its end token (SmolLM2 has no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chat_messages(system_prompt: str, text: str, answer: str | None = None) -> list[dict]:
    """The conversation a classification example is: system prompt, the text, and (training) the answer.

    An empty system prompt sends no system turn, so the chat template's own default applies.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": text})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def prompt_text(tokenizer, system_prompt: str, text: str) -> str:
    """The chat-templated prompt, ending where the model's answer starts."""
    return tokenizer.apply_chat_template(chat_messages(system_prompt, text), add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, system_prompt: str, text: str) -> list[int]:
    """Token ids of `prompt_text` (the template already holds the special tokens)."""
    return tokenizer(prompt_text(tokenizer, system_prompt, text), add_special_tokens=False).input_ids


def label_token_ids(tokenizer, labels: list[str]) -> list[list[int]]:
    """Each label word's token ids as an answer (no special tokens)."""
    return [tokenizer(label, add_special_tokens=False).input_ids for label in labels]


def label_probabilities(scores):
    """Softmax over the labels' log-likelihoods (last axis): P(label | prompt, the answer is a label).

    Takes a list or numpy array (returns numpy), or a torch tensor (returns a tensor that keeps the
    autograd graph: the explanations differentiate through it).
    """
    if hasattr(scores, "softmax"):  # torch.Tensor
        return scores.softmax(dim=-1)
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)



def answer_logprob(prompt_logprobs: list, answer_ids: list[int], start: int) -> float:
    """log P(answer | prompt) from vLLM's prompt logprobs of a request that is prompt + answer:
    the answer's tokens start at position `start`. Batch inference scores labels with it, the
    evaluation of generative runs the reference answers."""
    total = 0.0
    for k, token in enumerate(answer_ids):
        entry = prompt_logprobs[start + k]
        found = entry.get(token, entry.get(str(token)))  # keys may come back as strings from Arrow
        total += float(found["logprob"])
    return total
