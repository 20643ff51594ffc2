"""Batch inference's model side: every row prompted as in training (the model folder's system
prompt and preprocessing, its chat template), and the vLLM engine that scores or answers them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cluster.contracts import TextPreprocessing
from cluster.prompting import prompt_ids
from cluster.text import Preprocessor
from jobs.config import BatchInferConfig

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
    ids = label_ids[row["label_index"]]
    total = 0.0
    for k, token in enumerate(ids):
        entry = row["prompt_logprobs"][row["prompt_len"] + k]
        found = entry.get(token, entry.get(str(token)))  # keys may come back as strings from Arrow
        total += float(found["logprob"])
    return total


def engine_config(cfg: BatchInferConfig, model_dir: Path):
    from ray.data.llm import vLLMEngineProcessorConfig

    engine = cfg.engine
    if engine.use_gpu:
        bundles, env_vars = [{"GPU": 1, "CPU": engine.cpus}], {}
    else:
        # Without an explicit CPU bundle ray.data.llm asks for a GPU and waits forever.
        bundles, env_vars = [{"CPU": engine.cpus}], {"VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kv_cache_gib)}
    return vLLMEngineProcessorConfig(
        model_source=str(model_dir),
        engine_kwargs={"dtype": engine.dtype, "max_model_len": engine.max_model_len,
                       "max_num_seqs": engine.max_num_seqs, **engine.engine_overrides},
        placement_group_config={"bundles": bundles},
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", **env_vars}},
        concurrency=engine.replicas, batch_size=engine.batch_size,
        # Prompts arrive already templated and tokenized (Prompter), exactly as in training.
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
    )
