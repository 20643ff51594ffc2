"""Batch inference: a table in, the fine-tuned model through vLLM on Ray Data, a table out.
Logic: jobs/inference/.

    python -m jobs.batch_infer --config batch.yaml [key=value ...]

Every row is prompted as in training (the model folder's system prompt, preprocessing and chat
template, the row's text as the one user message). Resumable: rows get stable ids (their position
in the input), and results land in Parquet parts named by row id, each written atomically. A rerun
into the same output folder skips every row already in a part, so a crash costs only the rows not
yet written, and every row is written once.
"""

from __future__ import annotations

import json

from cluster.config import load_config_or_exit
from cluster.ray_cluster import connect
from jobs.config import BatchInferConfig
from jobs.inference.run import run_batch_inference


def main(argv: list[str] | None = None) -> None:
    cfg = load_config_or_exit(BatchInferConfig, argv)
    connect()
    summary = run_batch_inference(cfg)
    print(f"[batch_infer] {json.dumps(summary)}")


if __name__ == "__main__":
    main()
