"""Generative runs (instruction, chat): every test prompt answered by an LLM through vLLM on Ray Data,
set up as batch inference runs it (`BatchEngineSection.processor_config`), and the reference answer's
likelihood under the same model, for its perplexity.

Both requests of a row are built from the row's shard tokens, exactly as training saw them: the
prompt is the example's tokens up to its final answer (`prompt_len`), the reference request the
prompt followed by the final answer's tokens (its loss-masked span)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cluster.prompting import answer_logprob
from jobs.config import EvalSection

GENERATION_SEED = 1  # greedy decoding needs none; fixed so that a sampling engine default cannot vary
PASSTHROUGH = ("key", "text", "label", "source")


def requests(batch: pd.DataFrame) -> pd.DataFrame:
    """Ray Data UDF: two requests per test row, `answer` (the prompt, answered freely) and `reference`
    (prompt + reference answer, its prompt logprobs scoring the answer)."""
    answers, references, prompt_lens = [], [], []
    for ids, mask, prompt_len in zip(batch["input_ids"], batch["loss_mask"], batch["prompt_len"]):
        ids, prompt_len = [int(token) for token in ids], int(prompt_len)
        answer_end = prompt_len + int(np.asarray(mask[prompt_len:]).sum())  # the final answer is the last masked span
        answers.append(ids[:prompt_len])
        references.append(ids[:answer_end])
        prompt_lens.append(prompt_len)
    rows = batch[[column for column in PASSTHROUGH if column in batch]]
    return pd.concat([rows.assign(request="answer", tokenized_prompt=answers, prompt_len=prompt_lens),
                      rows.assign(request="reference", tokenized_prompt=references, prompt_len=prompt_lens)],
                     ignore_index=True)


def generate_answers(model_dir: Path, test, settings: EvalSection) -> pd.DataFrame:
    """One row per test row, sorted by key (so every system's rows line up for paired intervals):
    the passthrough columns, `generated` (the greedy answer), and `gold_logprob` / `answer_tokens`
    (log P(reference answer | prompt) and its token count)."""
    from ray.data.llm import build_processor

    # Both requests ask for prompt logprobs although only the reference's are read: the rows' sampling
    # params travel as one Arrow column, where None beside 0 turns the field into a float vLLM rejects.
    answer = {"max_tokens": settings.max_new_tokens, "temperature": 0.0, "seed": GENERATION_SEED, "prompt_logprobs": 0}
    # One token is the least vLLM generates: the reference request is there for its prompt logprobs.
    reference = {**answer, "max_tokens": 1}
    columns = [column for column in PASSTHROUGH if column in test.schema().names]

    def postprocess(row: dict) -> dict:
        kept = {column: row[column] for column in (*columns, "request")}
        if row["request"] == "answer":
            return {**kept, "generated": row["generated_text"].strip(), "gold_logprob": np.nan, "answer_tokens": 0}
        answer_ids = [int(token) for token in row["prompt_token_ids"][row["prompt_len"]:]]  # what vLLM was sent
        return {**kept, "generated": None, "answer_tokens": len(answer_ids),
                "gold_logprob": answer_logprob(row["prompt_logprobs"], answer_ids, row["prompt_len"])}

    processor = build_processor(settings.engine.processor_config(model_dir),
                                preprocess=lambda row: {**row, "sampling_params": answer if row["request"] == "answer" else reference},
                                postprocess=postprocess)
    frame = processor(test.map_batches(requests, batch_format="pandas")).to_pandas()
    answered = frame[frame["request"] == "answer"].set_index("key")
    scored = frame[frame["request"] == "reference"].set_index("key")
    if len(answered) != len(scored) or not answered.index.is_unique:
        raise RuntimeError(f"{model_dir}: {len(answered)} answers and {len(scored)} reference scores for the test rows")
    return (answered.drop(columns=["request", "gold_logprob", "answer_tokens"])
            .join(scored[["gold_logprob", "answer_tokens"]]).sort_index().reset_index())
