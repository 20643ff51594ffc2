"""The batch inference run: a table in, the fine-tuned model through vLLM on Ray Data, a table out.

A classification model's prediction is scored, not parsed: like the evaluation, each label's
log-probability as the answer (vLLM prompt logprobs over prompt+label), giving the predicted label
and every label's probability. A model without labels answers greedily (`generated_text`)."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import ray

from cluster.contracts import ModelArtifact
from cluster.monitoring import PREDICTION_SCHEMA, PREDICTIONS, ParquetLog, text_stats, utc_now
from cluster.prompting import label_token_ids
from cluster.text import Preprocessor
from jobs.config import BatchInferConfig
from jobs.inference.prompts import Prompter, label_logprob
from jobs.inference.tables import MANIFEST, ROW_ID, PartWriter, check_identity, done_row_ids, read_table

logger = logging.getLogger(__name__)

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
    check_identity(out_dir, {"input": cfg.input.model_dump(), "rows": rows_total, "model_dir": str(model_dir),
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
            postprocess = lambda row: {**{c: row[c] for c in keep}, "label_logprob": label_logprob(row, label_ids)}  # noqa: E731
        else:
            sampling = {"max_tokens": cfg.max_new_tokens, "temperature": 0.0}
            postprocess = lambda row: {**{c: row[c] for c in keep}, "generated_text": row["generated_text"]}  # noqa: E731
        processor = build_processor(cfg.engine.processor_config(model_dir),
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
    if cfg.monitoring.enabled and artifact.labels and written:
        parts = pads.dataset(sorted(out_dir.glob("part-*.parquet")), format="parquet").to_table().to_pandas()
        summary["rows_logged"] = log_batch_predictions(parts[~done[parts[ROW_ID].to_numpy()]], cfg, out_dir,
                                                       model_dir, artifact.labels)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    (out_dir / MANIFEST).write_text(json.dumps({**manifest, "complete": True, "last_run": summary}, indent=2))
    return summary


def log_batch_predictions(rows: pd.DataFrame, cfg: BatchInferConfig, out_dir: Path, model_dir: Path,
                          labels: list[str]) -> int:
    """Write output rows to the prediction log (`cfg.monitoring`), as the gateway records a prediction;
    returns how many were written. A row's request id is `batch-<output folder's id>-<row id>`, the same
    on every rerun into that folder, so bulk feedback can name it. A log that cannot be written is
    logged and leaves the predictions (the job's output) as they are."""
    monitoring = cfg.monitoring
    run_id = uuid.uuid5(uuid.NAMESPACE_URL, out_dir.as_uri()).hex
    failed = []
    log = ParquetLog(monitoring.root, PREDICTIONS, PREDICTION_SCHEMA, monitoring,
                     on_failure=lambda count, error: failed.append(count))
    now, version = utc_now(), monitoring.version or model_dir.name
    log.append([{"request_id": f"batch-{run_id}-{row[ROW_ID]}", "index": 0, "time": now, "source": "batch",
                 "model": model_dir.name, "version": version, "label": row["prediction"],
                 "confidence": row["prediction_confidence"],
                 "probabilities": {label: row[f"prob_{label}"] for label in labels},
                 **text_stats(str(row[cfg.input.text_column])),
                 "text": str(row[cfg.input.text_column]) if monitoring.log_text else None}
                for row in rows.to_dict("records")])
    log.close()
    if failed:
        logger.error("batch inference: %d of %d predictions not written to the prediction log", sum(failed), len(rows))
    return len(rows) - sum(failed)
