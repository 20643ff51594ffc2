"""Why the fine-tuned model predicts what it does: attributions, importance, dependence, faithfulness.
Logic: jobs/evaluation/explanations.py.

    python -m jobs.explain --config configs/airline_sentiment.yaml [key=value ...]

Reads the fine-tuned model (`<run>/model`) and its test predictions, so run jobs.finetune and
jobs.evaluate (or jobs.pipeline) first.
"""

from __future__ import annotations

import sys

from cluster.config import load_config_or_exit
from cluster.ray_cluster import connect
from jobs.config import RunConfig
from jobs.evaluation.explanations import explain, explain_inputs


def main(argv: list[str] | None = None) -> None:
    cfg = load_config_or_exit(RunConfig, argv)
    if cfg.data.task != "classification":
        sys.exit(f"explain: explanations attribute a classifier's label probabilities; this is a {cfg.data.task} run")
    try:
        explain_inputs(cfg)  # before starting Ray: a missing input is a one-line error, not a traceback
    except FileNotFoundError as error:
        sys.exit(f"explain: {error}")
    connect()
    explain(cfg)


if __name__ == "__main__":
    main()
