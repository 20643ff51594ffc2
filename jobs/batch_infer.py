"""Batch inference: a table in, the fine-tuned model through vLLM on Ray Data, a table out.

    python -m jobs.batch_infer --config batch.yaml [key=value ...]

Every row is prompted as in training (the model folder's system prompt, the tokenizer's chat
template, the row's text as the one user message). A classification model's prediction is
scored, not parsed: like jobs.evaluate, each label's log-probability as the answer (vLLM prompt
logprobs over prompt+label), giving the predicted label and every label's probability. A model
without labels answers greedily (`generated_text`).

Resumable: rows get stable ids (their position in the input), and results land in Parquet parts
named by row id, each written atomically. A rerun into the same output folder skips every row
already in a part, so a crash costs only the rows not yet written, and every row is written once.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import ray

from cluster.contracts import ModelArtifact, TextPreprocessing
from cluster.prompting import label_token_ids, prompt_ids
from cluster.text import Preprocessor
from cluster.ray_cluster import connect
from jobs.config import BatchInferConfig, BatchInputSection

ROW_ID = "row_id"
MANIFEST = "_batch_infer.json"  # a leading underscore: Parquet readers skip it


def read_table(cfg: BatchInputSection) -> ray.data.Dataset:
    """The input table with a `row_id` column: each row's position, the same on every run."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # positions are ids
    if cfg.parquet is not None:
        if not Path(cfg.parquet).exists():
            raise FileNotFoundError(f"input.parquet={cfg.parquet!r}: no such file or folder")
        table = ray.data.read_parquet(cfg.parquet)
    else:
        if not Path(cfg.database).is_file():
            raise FileNotFoundError(f"input.database={cfg.database!r}: no such file")
        # A picklable factory: Ray's read tasks open their own connection.
        table = ray.data.read_sql(cfg.sql, functools.partial(sqlite3.connect, cfg.database))
    table = table.materialize()
    rows = table.count()
    if rows == 0:
        raise ValueError("input table is empty")
    columns = table.schema().names
    if cfg.text_column not in columns:
        raise ValueError(f"input table lacks the text column {cfg.text_column!r} (input.text_column); it has {columns}")
    if ROW_ID in columns:
        raise ValueError(f"input table already has a column named {ROW_ID!r}; rename it")
    # zip pairs rows by position, so row_id is each row's position in the (ordered) input.
    return table.zip(ray.data.range(rows).rename_columns({"id": ROW_ID}))


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


def _label_logprob(row: dict, label_ids: list[list[int]]) -> float:
    """log P(label | prompt): the prompt logprobs at the label's positions."""
    ids = label_ids[row["label_index"]]
    total = 0.0
    for k, token in enumerate(ids):
        entry = row["prompt_logprobs"][row["prompt_len"] + k]
        found = entry.get(token, entry.get(str(token)))  # keys may come back as strings from Arrow
        total += float(found["logprob"])
    return total


class PartWriter:
    """Ray Data UDF (one actor): gathers each row's label scores, then writes finished rows as one
    Parquet part, atomically (temporary name, then rename), named by its first row id."""

    def __init__(self, out_dir: str, labels: list[str], columns: list[str]):
        self.out_dir, self.labels, self.columns = Path(out_dir), labels, columns
        self.pending: dict[int, dict] = {}  # row id -> {label index: logprob} until every label is in
        self.rows: dict[int, dict] = {}
        self.written: set[int] = set()  # a retried upstream task may deliver a row again

    def finished_rows(self, batch: pd.DataFrame) -> pd.DataFrame:
        if not self.labels:
            return batch[self.columns + ["generated_text"]]
        done = []
        for row in batch.to_dict("records"):
            row_id = int(row[ROW_ID])
            if row_id in self.written:
                continue
            self.rows.setdefault(row_id, {column: row[column] for column in self.columns})
            scores = self.pending.setdefault(row_id, {})
            scores[int(row["label_index"])] = row["label_logprob"]
            if len(scores) == len(self.labels):
                logprobs = np.array([scores[i] for i in range(len(self.labels))])
                probs = np.exp(logprobs - logprobs.max())
                probs /= probs.sum()  # P(label | prompt, the answer is one of the labels)
                result = self.rows.pop(row_id)
                del self.pending[row_id]
                result.update({"prediction": self.labels[int(probs.argmax())], "prediction_confidence": float(probs.max())})
                result.update({f"prob_{label}": float(p) for label, p in zip(self.labels, probs)})
                done.append(result)
        return pd.DataFrame(done)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        finished = self.finished_rows(batch)
        finished = finished[~finished[ROW_ID].isin(self.written)] if len(finished) else finished
        if len(finished):
            finished = finished.sort_values(ROW_ID)
            name = f"part-{int(finished[ROW_ID].iloc[0]):012d}-{len(finished)}.parquet"
            staging = self.out_dir / f".{name}.tmp"  # a leading dot: readers skip a half-written part
            finished.to_parquet(staging, index=False)
            os.replace(staging, self.out_dir / name)
            self.written.update(int(i) for i in finished[ROW_ID])
        return pd.DataFrame({"rows": [len(finished)]})


def done_row_ids(out_dir: Path) -> np.ndarray:
    parts = sorted(out_dir.glob("part-*.parquet"))
    if not parts:
        return np.empty(0, dtype=np.int64)
    return pads.dataset(parts, format="parquet").to_table(columns=[ROW_ID])[ROW_ID].to_numpy()


def _check_identity(out_dir: Path, identity: dict) -> None:
    """A rerun may only resume the same job: other rows or another model would mix two tables."""
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        previous = json.loads(manifest.read_text())["identity"]
        if previous != identity:
            changed = sorted(key for key in identity if identity[key] != previous.get(key))
            raise ValueError(f"output {out_dir} holds results of a different job (changed: {changed}); "
                             "choose another output folder or delete it")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"identity": identity, "complete": False}, indent=2))


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


def run_batch_inference(cfg: BatchInferConfig) -> dict:
    """Predict every input row not yet in the output; returns row counts of this run."""
    from ray.data.llm import build_processor

    model_dir = Path(cfg.model_dir).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model_dir={cfg.model_dir!r} is not a Hugging Face model folder")
    artifact = ModelArtifact.read(model_dir)
    Preprocessor(artifact.preprocessing)  # a missing PII hash salt stops the job here, not in a Ray actor
    out_dir = Path(cfg.output).expanduser().resolve()
    table = read_table(cfg.input)
    input_columns = [c for c in table.schema().names if c != ROW_ID]
    prediction_columns = (["prediction", "prediction_confidence", *(f"prob_{label}" for label in artifact.labels)]
                          if artifact.labels else ["generated_text"])
    clash = set(input_columns) & set(prediction_columns)
    if clash:
        raise ValueError(f"input columns {sorted(clash)} clash with the prediction columns; rename them")
    rows_total = table.count()
    _check_identity(out_dir, {"input": cfg.input.model_dump(), "rows": rows_total, "model_dir": str(model_dir),
                              "artifact": artifact.model_dump()})

    done = np.zeros(rows_total, dtype=bool)
    done[done_row_ids(out_dir)] = True
    rows_done_before = int(done.sum())
    written = 0
    if rows_done_before < rows_total:
        from transformers import AutoTokenizer

        label_ids = label_token_ids(AutoTokenizer.from_pretrained(model_dir), artifact.labels)
        # The done-rows bitmap (one bit a row, as bytes) travels with the filter tasks.
        pending = table.map_batches(lambda batch, done: batch[~done[batch[ROW_ID].to_numpy()]],
                                    batch_format="pandas", fn_args=(done,))
        prompted = pending.map_batches(
            Prompter, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1),
            fn_constructor_kwargs={"model_dir": str(model_dir), "system_prompt": artifact.system_prompt,
                                   "preprocessing": artifact.preprocessing,
                                   "text_column": cfg.input.text_column, "label_ids": label_ids})
        keep = [*input_columns, ROW_ID, "label_index"]
        if artifact.labels:
            sampling = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
            postprocess = lambda row: {**{c: row[c] for c in keep}, "label_logprob": _label_logprob(row, label_ids)}  # noqa: E731
        else:
            sampling = {"max_tokens": cfg.max_new_tokens, "temperature": 0.0}
            postprocess = lambda row: {**{c: row[c] for c in keep}, "generated_text": row["generated_text"]}  # noqa: E731
        processor = build_processor(engine_config(cfg, model_dir),
                                    preprocess=lambda row: {**row, "sampling_params": sampling},
                                    postprocess=postprocess)
        results = processor(prompted).map_batches(
            PartWriter, batch_format="pandas", batch_size=cfg.part_rows * max(1, len(artifact.labels)),
            compute=ray.data.ActorPoolStrategy(size=1),
            fn_constructor_kwargs={"out_dir": str(out_dir), "labels": artifact.labels,
                                   "columns": [*input_columns, ROW_ID]})
        written = int(sum(row["rows"] for row in results.take_all()))

    ids = done_row_ids(out_dir)
    if len(ids) != rows_total or len(np.unique(ids)) != rows_total:
        raise RuntimeError(f"output holds {len(ids)} rows ({len(np.unique(ids))} distinct) for {rows_total} input rows; "
                           "rerun to complete it")
    summary = {"rows_total": rows_total, "rows_done_before": rows_done_before, "rows_written": written,
               "output": str(out_dir), "columns": [*input_columns, ROW_ID, *prediction_columns]}
    manifest = json.loads((out_dir / MANIFEST).read_text())
    (out_dir / MANIFEST).write_text(json.dumps({**manifest, "complete": True, "last_run": summary}, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    from cluster.config import load_config_or_exit

    cfg = load_config_or_exit(BatchInferConfig, argv)
    connect()
    summary = run_batch_inference(cfg)
    print(f"[batch_infer] {json.dumps(summary)}")


if __name__ == "__main__":
    main()
