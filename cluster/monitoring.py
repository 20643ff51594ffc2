"""The prediction and feedback logs: what a model predicted in production, and what the right answer
was, as Parquet tables that `jobs.monitor` joins into online metrics and drift figures.

Both the gateway (`/v1/classify`, `/v1/feedback`) and batch inference write them, so the records
and the writer sit here, where `serving` and `jobs` meet. Layout under `monitoring.root`:

    predictions/day=YYYY-MM-DD/version=<version>/part-<time>-<uuid>.parquet
    feedback/day=YYYY-MM-DD/part-<time>-<uuid>.parquet

(hive partitions: `pyarrow.dataset` reads `day` and `version` back as columns). Feedback has no
version partition: the client sending it knows only the request id, and the join finds the version.

`ParquetLog` keeps records in memory and a background thread writes them, one part per day and
version, when `flush_rows` are waiting or `flush_seconds` have passed: a request only appends to a
list. A write that fails is logged and counted (`on_failure`), never raised into a request, and its
rows are dropped (retrying them would grow the buffer while storage is down). The buffer holds at
most `max_buffer_rows`: beyond that the oldest rows are dropped and counted (`on_drop`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from cluster.config import StrictModel
from cluster.storage import filesystem_for

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions"
FEEDBACK = "feedback"
# A prediction's request id: the UUID (32 hex digits) the gateway answers /v1/classify with, or for
# batch inference `batch-<run uuid>-<row id>`; a text's position in its request is the `index` column.
REQUEST_ID_PATTERN = r"^(?:[0-9a-f]{32}|batch-[0-9a-f]{32}-[0-9]{1,12})$"

PREDICTION_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("index", pa.int32()), ("time", pa.timestamp("us", tz="UTC")),
    ("source", pa.string()), ("model", pa.string()), ("version", pa.string()), ("label", pa.string()),
    ("confidence", pa.float64()), ("probabilities", pa.map_(pa.string(), pa.float64())),
    ("text_chars", pa.int32()), ("text_words", pa.int32()), ("text_tokens", pa.int32()), ("text", pa.string()),
])
FEEDBACK_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("index", pa.int32()), ("time", pa.timestamp("us", tz="UTC")),
    ("label", pa.string()), ("source", pa.string()), ("subject", pa.string()),
])


class MonitoringSettings(StrictModel):
    """The prediction and feedback logs of an endpoint or a batch inference run (`cluster.monitoring`)."""

    enabled: bool = Field(default=False, description="Log every prediction (and accept /v1/feedback) under `root`.")
    root: str = Field(default="", description="Folder (or s3:// gs:// URI) holding predictions/ and feedback/; required "
                                              "when enabled. The monitor job reads the same folder.")
    version: str = Field(default="", description="Model version the predictions are logged under (e.g. the registry's "
                                                 "v0003; jobs.deploy fills it in); empty: the model folder's name. An "
                                                 "adapter's predictions are logged under the adapter's name.")
    log_text: bool = Field(default=False, description="Also log each input text (personal data: off unless the "
                                                      "retention of the text is agreed); its length is always logged.")
    flush_rows: int = Field(default=1000, ge=1, description="Write a Parquet part when this many records are waiting.")
    flush_seconds: float = Field(default=60.0, gt=0, description="Write waiting records at least this often.")
    max_buffer_rows: int = Field(default=100_000, ge=1, description="Most records waiting in memory; beyond it the "
                                                                   "oldest are dropped (lakeforge_monitoring_dropped).")

    @model_validator(mode="after")
    def _root_when_enabled(self) -> "MonitoringSettings":
        if self.enabled and not self.root:
            raise ValueError("monitoring.enabled needs monitoring.root (the folder the logs are written under)")
        return self


def text_stats(text: str, tokens: int | None = None) -> dict:
    """What the drift checks compare without keeping the text: its length in characters, words, tokens."""
    return {"text_chars": len(text), "text_words": len(text.split()), "text_tokens": tokens}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class ParquetLog:
    """Records buffered in memory and written as Parquet parts by a background thread (module doc)."""

    def __init__(self, root: str, kind: str, schema: pa.Schema, settings: MonitoringSettings, *,
                 on_failure: Callable[[int, Exception], None] = lambda rows, error: None,
                 on_drop: Callable[[int], None] = lambda rows: None, clock: Callable[[], float] = time.monotonic):
        self.filesystem, self.path = filesystem_for(root)
        self.kind, self.schema, self.settings = kind, schema, settings
        self.on_failure, self.on_drop, self.clock = on_failure, on_drop, clock
        self._buffer: deque[dict] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._last_flush = clock()
        self._thread = threading.Thread(target=self._run, name=f"lakeforge-{kind}-log", daemon=True)
        self._thread.start()

    def append(self, records: list[dict]) -> None:
        """Queue records (never blocks on storage); the oldest are dropped past `max_buffer_rows`."""
        with self._lock:
            if self._closed:
                self.on_drop(len(records))
                return
            self._buffer.extend(records)
            overflow = len(self._buffer) - self.settings.max_buffer_rows
            for _ in range(max(0, overflow)):
                self._buffer.popleft()
            if len(self._buffer) >= self.settings.flush_rows:
                self._wake.notify()
        if overflow > 0:
            self.on_drop(overflow)

    def flush(self) -> None:
        """Write everything queued so far, on the calling thread (shutdown, tests, batch jobs)."""
        with self._lock:
            records, self._buffer = list(self._buffer), deque()
            self._last_flush = self.clock()
        self._write(records)

    def close(self) -> None:
        """Stop the background thread and write what is left; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        self._thread.join()
        self.flush()

    def _run(self) -> None:
        while True:
            with self._lock:
                waited = self.clock() - self._last_flush
                if not self._closed and len(self._buffer) < self.settings.flush_rows and waited < self.settings.flush_seconds:
                    self._wake.wait(self.settings.flush_seconds - waited)
                    continue
                if self._closed:
                    return  # close() writes the rest
            self.flush()

    def _write(self, records: list[dict]) -> None:
        groups: dict[tuple[str, ...], list[dict]] = {}
        for record in records:
            partition = [f"day={record['time']:%Y-%m-%d}"]
            if "version" in self.schema.names:
                partition.append(f"version={record['version']}")
            groups.setdefault(tuple(partition), []).append(record)
        for partition, rows in groups.items():
            folder = "/".join([self.path, self.kind, *partition])
            name = f"part-{utc_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex}.parquet"
            try:
                self.filesystem.create_dir(folder, recursive=True)
                table = pa.Table.from_pylist(rows, schema=self.schema)
                # A temporary name first, so a reader never sees a half-written part.
                pq.write_table(table, f"{folder}/.{name}.tmp", filesystem=self.filesystem)
                self.filesystem.move(f"{folder}/.{name}.tmp", f"{folder}/{name}")
            except Exception as error:  # noqa: BLE001 - a log that cannot be written must not fail what is logged
                logger.error("%s log under %s: %d records not written: %s", self.kind, self.path, len(rows), error)
                self.on_failure(len(rows), error)
