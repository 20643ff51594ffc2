"""Pin a run's test rows: write the keys of the first N test rows (in split-position order, a
uniform sample) of a prepared run, for `eval.test_keys`. Done once, on purpose: the pinned rows are
the yardstick every later change is measured on.

    python scripts/pin_test_keys.py --config configs/airline_sentiment.yaml --rows 600 --out configs/airline_sentiment.test_keys.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.config import load_config
from cluster.ray_cluster import connect
from jobs.data.prepare import prepare_run_inputs
from jobs.data.split import split_dataset
from jobs.config import RunConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run config whose data job defines the test split")
    parser.add_argument("--rows", type=int, default=600, help="how many test rows to pin")
    parser.add_argument("--out", required=True, help="key file to write (one key per line)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    cfg = load_config(RunConfig, args.config, args.overrides)
    connect()
    _, data_dir, _ = prepare_run_inputs(cfg)
    keys = [row["key"] for row in split_dataset(data_dir, "test", cfg.security.encryption).select_columns(["key"]).limit(args.rows).take_all()]
    if len(keys) < args.rows:
        raise SystemExit(f"the test split has only {len(keys)} rows, fewer than --rows {args.rows}")
    Path(args.out).write_text("\n".join(keys) + "\n")
    print(f"pinned {len(keys)} test rows in {args.out}")


if __name__ == "__main__":
    main()
