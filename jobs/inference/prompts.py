"""Batch inference's model side: every row prompted as in training (the model folder's system
prompt and preprocessing, its chat template), and each label's score from vLLM's prompt logprobs.
The vLLM engine setup is the config's (`BatchEngineSection.processor_config`), shared with the
evaluation of generative runs."""

from __future__ import annotations

import pandas as pd

from cluster.contracts import TextPreprocessing
from cluster.prompting import answer_logprob, prompt_ids
from cluster.text import Preprocessor

class Prompter:
    """Ray Data UDF: template each row as in training; for classification one request per label
    (prompt + label tokens), whose prompt logprobs score the label."""

    def __init__(self, model_dir: str, system_prompt: str, preprocessing: TextPreprocessing, text_column: str,
                 label_ids: list[list[int]]):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.system_prompt, self.text_column, self.label_ids = system_prompt, text_column, label_ids
        self.preprocess = Preprocessor(preprocessing)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # As training and evaluation render prompts (shared with serving's /v1/classify), from the
        # text as training saw it (cleaned, PII redacted).
        prompts = [prompt_ids(self.tokenizer, self.system_prompt, self.preprocess(str(text)))
                   for text in batch[self.text_column]]
        if not self.label_ids:
            return batch.assign(tokenized_prompt=prompts, prompt_len=[len(ids) for ids in prompts], label_index=-1)
        # A row's label requests side by side, so the writer gets each row's scores together.
        n = len(self.label_ids)
        return batch.loc[batch.index.repeat(n)].assign(
            tokenized_prompt=[prompt + ids for prompt in prompts for ids in self.label_ids],
            prompt_len=[len(prompt) for prompt in prompts for _ in range(n)],
            label_index=list(range(n)) * len(prompts),
        ).reset_index(drop=True)


def label_logprob(row: dict, label_ids: list[list[int]]) -> float:
    """log P(label | prompt): the prompt logprobs at the label's positions."""
    return answer_logprob(row["prompt_logprobs"], label_ids[row["label_index"]], row["prompt_len"])
