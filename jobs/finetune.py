"""Fine-tune with Ray Train + DeepSpeed ZeRO (full or LoRA), then export the best checkpoint as one
HF folder (LoRA: merged weights, and the adapter alone in `adapter/`). Logic: jobs/train/.

    python -m jobs.finetune --config configs/airline_sentiment.yaml [key=value ...]
"""

from __future__ import annotations

from cluster.config import load_config_or_exit
from cluster.ray_cluster import connect
from jobs.config import RunConfig
from jobs.data.prepare import prepare_run_inputs
from jobs.train.run import run_finetune


def main(argv: list[str] | None = None) -> None:
    cfg = load_config_or_exit(RunConfig, argv)
    connect()
    base_dir, data_dir, _ = prepare_run_inputs(cfg)
    record = run_finetune(cfg, base_dir, data_dir)
    print(f"[finetune] done in {record['wall_seconds']:.0f}s: {record['model_dir']}")


if __name__ == "__main__":
    main()
