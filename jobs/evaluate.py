"""Held-out evaluation: the fine-tuned model vs the current version, the base model zero-shot and
a TF-IDF baseline, with the promotion gate's decision. Logic: jobs/evaluation/.

    python -m jobs.evaluate --config configs/airline_sentiment.yaml [key=value ...]
"""

from __future__ import annotations

from pathlib import Path

from cluster.config import load_config_or_exit
from cluster.ray_cluster import connect
from cluster.registry import ModelRegistry
from jobs.config import RunConfig
from jobs.data.prepare import prepare_run_inputs
from jobs.evaluation.report import write_report
from jobs.evaluation.run import run_evaluation


def main(argv: list[str] | None = None) -> None:
    """Evaluate the run's model against the current registry version; registering is the pipeline's job."""
    cfg = load_config_or_exit(RunConfig, argv)
    connect()
    base_dir, data_dir, _ = prepare_run_inputs(cfg)
    finetuned_dir = cfg.run_dir / "model"
    current = ModelRegistry(cfg.storage_root, cfg.name).current()
    report, _ = run_evaluation(cfg, base_dir, data_dir, finetuned_dir if finetuned_dir.is_dir() else None,
                               Path(current["path"]) if current else None)
    print(f"[evaluate] report: {write_report(cfg.run_dir / 'report.html', report)}")


if __name__ == "__main__":
    main()
