"""Templating and tokenizing: each example rendered with the model's chat template (or the compact
one), the loss masked to the answer, and the length filters applied."""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd

from cluster.prompting import chat_messages, use_template

class Templater:
    """Ray Data UDF: chat-template each example with the model's own template, mask the loss to the
    assistant turns, and filter by length."""

    def __init__(self, model_dir: str, system_prompt: str, labels: list[str], min_text_tokens: int = 0,
                 max_text_tokens: int | None = None, max_seq_len: int | None = None, template: str = "model"):
        from transformers import AutoTokenizer

        self.tokenizer = use_template(AutoTokenizer.from_pretrained(model_dir), template)
        self.system_prompt = system_prompt
        self.label_index = {label: i for i, label in enumerate(labels)}
        self.min_text_tokens, self.max_text_tokens, self.max_seq_len = min_text_tokens, max_text_tokens, max_seq_len

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode_messages(self, messages: list[dict]) -> tuple[list[int], list[int], int]:
        """Token ids, loss mask (1 on assistant-turn tokens) and where the final answer starts.

        Each assistant turn is found by rendering the conversation up to it with a generation
        prompt: that must be a prefix of the full rendering (true of ChatML-style templates)."""
        render = functools.partial(self.tokenizer.apply_chat_template, tokenize=False)
        full = render(messages)
        ids: list[int] = []
        mask: list[int] = []
        done = prompt_len = 0
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, through = render(messages[:turn], add_generation_prompt=True), render(messages[:turn + 1])
            if not (full.startswith(through) and through.startswith(prompt) and len(prompt) >= done):
                raise ValueError("chat template does not render the prompt as a prefix of the full conversation")
            context = self._ids(full[done:len(prompt)])
            answer = self._ids(full[len(prompt):len(through)])
            ids += context + answer
            mask += [0] * len(context) + [1] * len(answer)
            prompt_len, done = len(ids) - len(answer), len(through)
        tail = self._ids(full[done:])
        return ids + tail, mask + [0] * len(tail), prompt_len

    def encode(self, text: str, label: str) -> tuple[list[int], int]:
        """A classification example: token ids of prompt+answer, and the prompt's length."""
        ids, _, prompt_len = self.encode_messages(chat_messages(self.system_prompt, text, label))
        return ids, prompt_len

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        ids_column, mask_column, prompt_lens, num_tokens, status = [], [], [], [], []
        for row_status, messages, text in zip(batch["status"], batch["messages"], batch["text"]):
            ids, mask, prompt_len = [], [], 0
            if row_status == "ok":
                try:
                    ids, mask, prompt_len = self.encode_messages(json.loads(messages))
                except Exception:  # a template that rejects the conversation (roles out of order, ...)
                    row_status = "template_error"
                text_tokens = len(self._ids(text)) if row_status == "ok" else 0
                if row_status == "ok" and text_tokens < self.min_text_tokens:
                    row_status = "too_short"
                elif row_status == "ok" and ((self.max_text_tokens and text_tokens > self.max_text_tokens)
                                             or (self.max_seq_len and len(ids) > self.max_seq_len)):
                    row_status = "too_long"
            status.append(row_status)
            # Lists, not arrays: Ray stores equal-length arrays as a fixed-shape tensor column.
            ids_column.append(ids)
            mask_column.append(mask)
            prompt_lens.append(prompt_len)
            num_tokens.append(len(ids))
        batch["status"] = status
        batch["input_ids"], batch["loss_mask"] = ids_column, mask_column
        batch["prompt_len"] = np.asarray(prompt_lens, dtype=np.int32)
        batch["num_tokens"] = np.asarray(num_tokens, dtype=np.int32)
        batch["label_id"] = np.asarray([self.label_index.get(label, -1) for label in batch["label"]], dtype=np.int32)
        return batch
