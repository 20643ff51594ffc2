"""Batch inference's tables: the input (Parquet, CSV, JSONL or a SQL query) with stable row ids,
and the output as Parquet parts named by row id, each written atomically, so a rerun skips the rows
already written and a crash costs only the rows not yet written."""

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

from jobs.config import BatchInputSection

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


def check_identity(out_dir: Path, identity: dict) -> None:
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
