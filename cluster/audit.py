"""Append-only, hash-chained audit log (one JSON object per line) and its verifier.

Every entry carries `seq` (its 1-based line number), `time` (UTC ISO 8601), the event's fields,
`prev_hash` (the previous entry's `hash`; 64 zeros for the first) and `hash`: SHA-256 over the
canonical JSON of the entry without `hash` (sorted keys, no spaces). So an edited, deleted,
reordered or truncated line breaks the chain at a line `verify` names.

Several processes (Serve replicas on one node) may append to one file: each append takes an
exclusive `fcntl.flock`, reads the last entry's hash, writes its lines and fsyncs, so the chain
stays linear. The path must be on a local filesystem (flock does not work on object stores).

`AuditWriter` does the appending on a background thread for async code (the gateway): entries are
queued in order, and whatever has queued up while one batch was being written goes to disk as the
next batch, under one lock and one fsync (group commit); a caller awaits its entry's future, so the
event loop never waits on the disk, yet nothing is answered before its entry is durable.

Threat model: a plain SHA-256 chain catches accidental damage and edits by someone who does not
rewrite every later line; an attacker who can rewrite the whole file can recompute the chain.
With `hmac_key_env` set, each hash is an HMAC keyed by a secret the attacker must also steal.
Neither catches dropping the newest lines (tail truncation); ship the latest hash elsewhere for that.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import Field, field_validator

from cluster.config import StrictModel

GENESIS_HASH = "0" * 64
RESERVED_FIELDS = ("seq", "time", "prev_hash", "hash")


class AuditSettings(StrictModel):
    """Where access decisions and requests are recorded, and how much of them."""

    path: str = Field(default="~/.lakeforge/audit.jsonl",
                      description="Local file the hash-chained audit log is appended to (created with its folder).")
    log_prompts: bool = Field(default=False,
                              description="Also record prompt and completion text; off by default, as they may hold personal data.")
    hmac_key_env: str | None = Field(default=None,
                                     description="Name of an env var holding a secret that keys the chain (HMAC-SHA256), "
                                                 "so rewriting the whole file cannot recompute it; unset = plain SHA-256.")

    @field_validator("path")
    @classmethod
    def _not_an_object_store(cls, value: str) -> str:
        if "://" in value:
            raise ValueError("the audit log needs a local file path (file locking), not a URI")
        return value


class AuditError(RuntimeError):
    """The log cannot be appended to safely (for example its last line is incomplete)."""


def _canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict, key: bytes | None = None) -> str:
    """Hash of an entry without its `hash` field: HMAC-SHA256 under `key`, else SHA-256."""
    body = _canonical({k: v for k, v in entry.items() if k != "hash"})
    if key:
        return hmac.new(key, body, hashlib.sha256).hexdigest()
    return hashlib.sha256(body).hexdigest()


def key_from_env(name: str | None) -> bytes | None:
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise AuditError(f"audit HMAC key env var {name} is not set")
    return value.encode()


def _last_line(fd: int, size: int) -> bytes:
    """The file's last line (without its newline), reading backwards in chunks."""
    end = size - 1  # skip the final newline
    chunk, start = 65536, end
    while True:
        start = max(0, start - chunk)
        data = os.pread(fd, end - start, start)
        newline = data.rfind(b"\n")
        if newline != -1:
            return data[newline + 1:]
        if start == 0:
            return data


class AuditLog:
    """Appends hash-chained entries to `path`; safe for several processes appending to one file."""

    def __init__(self, path: str | Path, hmac_key: bytes | None = None):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = hmac_key

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> "AuditLog":
        return cls(settings.path, key_from_env(settings.hmac_key_env))

    def append(self, event: dict) -> dict:
        """Write one entry for `event` and return it (with seq, time, prev_hash, hash)."""
        return self.append_many([event])[0]

    @staticmethod
    def check_event(event: dict) -> None:
        clash = [name for name in RESERVED_FIELDS if name in event]
        if clash:
            raise ValueError(f"audit event may not set reserved field(s) {clash}")

    def append_many(self, events: list[dict]) -> list[dict]:
        """Write one entry per event, in order, under one lock and one fsync; return the entries."""
        for event in events:
            self.check_event(event)
        if not events:
            return []
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held across read-last-hash + write: one linear chain
            size = os.fstat(fd).st_size
            seq, prev_hash = 1, GENESIS_HASH
            if size:
                if os.pread(fd, 1, size - 1) != b"\n":
                    raise AuditError(f"{self.path} ends with an incomplete line; run "
                                     f"`python -m cluster.audit verify {self.path}` before appending")
                try:
                    last = json.loads(_last_line(fd, size))
                    seq, prev_hash = last["seq"] + 1, last["hash"]
                except (ValueError, KeyError, TypeError):  # not JSON, or no chain fields: nothing to chain to
                    raise AuditError(f"{self.path}: the last entry is unreadable; run "
                                     f"`python -m cluster.audit verify {self.path}`") from None
            entries, lines = [], []
            for event in events:
                entry = {"seq": seq, "time": datetime.now(timezone.utc).isoformat(), **event, "prev_hash": prev_hash}
                entry["hash"] = prev_hash = entry_hash(entry, self._key)
                entries.append(entry)
                lines.append(_canonical(entry) + b"\n")
                seq += 1
            data = memoryview(b"".join(lines))
            while data:  # a regular file takes it in one write; a short write is continued, not lost
                data = data[os.write(fd, data):]
            os.fsync(fd)
            return entries
        finally:
            os.close(fd)  # also releases the lock


class AuditWriter:
    """Appends to an `AuditLog` on one background thread, in submission order, a batch per fsync.

    `submit` queues an event and returns a future of its entry (its exception when the batch could
    not be written; async code awaits it with `asyncio.wrap_future`). After a failed batch the writer is `down`
    (the cause is logged once per failed batch) until a later batch is written; `probe_due` tells a
    caller whether to try the store again (at most every `retry_s` seconds) or refuse straight away.
    `flush` waits for everything submitted so far; `close` flushes and stops the thread (further
    submissions fail). Thread-safe.
    """

    def __init__(self, log: AuditLog, *, max_batch: int = 512, retry_s: float = 1.0,
                 on_error: Callable[[Exception], None] | None = None, on_recovery: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.log = log
        self.max_batch = max_batch
        self.retry_s = retry_s
        self.clock = clock
        self._on_error = on_error
        self._on_recovery = on_recovery
        self._cond = threading.Condition()
        self._pending: list[tuple[dict, concurrent.futures.Future]] = []
        self._submitted = self._done = 0
        self._closed = False
        self.error: Exception | None = None  # the last batch's failure while down, else None
        self._last_try = float("-inf")
        self._thread = threading.Thread(target=self._run, name="lakeforge-audit-writer", daemon=True)
        self._thread.start()

    @property
    def down(self) -> bool:
        return self.error is not None

    def probe_due(self) -> bool:
        """Whether a caller should write (and so try the store) now: always while the store works,
        else once per `retry_s` (the caller that gets True is the probe)."""
        with self._cond:
            if self.error is None:
                return True
            now = self.clock()
            if now - self._last_try >= self.retry_s:
                self._last_try = now
                return True
            return False

    def submit(self, event: dict) -> concurrent.futures.Future:
        AuditLog.check_event(event)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise AuditError("the audit writer is stopped")
            self._pending.append((event, future))
            self._submitted += 1
            self._cond.notify_all()
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted before this call is written (or failed); False on timeout."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._done >= target or not self._thread.is_alive(), timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Write what is pending, then stop the thread; idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @staticmethod
    def _call(callback, *args) -> None:
        if callback is not None:
            try:
                callback(*args)
            except Exception:  # noqa: BLE001 - a failing callback must not stop the writer
                pass

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return  # closed and drained
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            # A waiter that went away (a cancelled request) cancels its future, never its entry:
            # the event is written all the same, its result just has no one to go to.
            batch = [(event, future if future.set_running_or_notify_cancel() else None) for event, future in batch]
            try:
                entries = self.log.append_many([event for event, _ in batch])
            except Exception as error:  # noqa: BLE001 - any failure fails the batch; the thread lives on
                with self._cond:
                    self.error, self._last_try = error, self.clock()
                self._call(self._on_error, error)
                for _, future in batch:
                    if future is not None:
                        future.set_exception(error)
            else:
                with self._cond:
                    recovered, self.error = self.error is not None, None
                if recovered:
                    self._call(self._on_recovery)
                for (_, future), entry in zip(batch, entries):
                    if future is not None:
                        future.set_result(entry)
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()


@dataclass
class VerifyReport:
    ok: bool
    entries: int  # entries that verified (before the first bad line, if any)
    first_bad_line: int | None = None  # 1-based
    reason: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"OK: {self.entries} entries, chain intact"
        return f"TAMPERED: line {self.first_bad_line}: {self.reason} ({self.entries} entries before it verified)"


def _problem(raw: bytes, number: int, prev_hash: str, key: bytes | None) -> tuple[str, dict | None]:
    """Why line `number` breaks the chain ("" if it does not), and the entry it holds."""
    if not raw.endswith(b"\n"):
        return "last line is incomplete (no newline): truncated or partly written", None
    try:
        entry = json.loads(raw)
    except ValueError:
        return "not valid JSON", None
    if not isinstance(entry, dict) or not all(name in entry for name in RESERVED_FIELDS):
        return "missing chain fields", None
    if entry["hash"] != entry_hash(entry, key):
        return "hash does not match the entry's content (edited)", None
    if entry["prev_hash"] != prev_hash:
        return "prev_hash does not match the previous entry (line deleted, inserted or reordered)", None
    if entry["seq"] != number:
        return f"seq {entry['seq']} where {number} was expected", None
    return "", entry


def verify(path: str | Path, hmac_key: bytes | None = None) -> VerifyReport:
    """Check every line's hash and its link to the line before; report the first break."""
    prev_hash, count = GENESIS_HASH, 0
    with open(Path(path).expanduser(), "rb") as handle:
        for count, raw in enumerate(handle, start=1):
            reason, entry = _problem(raw, count, prev_hash, hmac_key)
            if reason:
                return VerifyReport(False, count - 1, count, reason)
            prev_hash = entry["hash"]
    return VerifyReport(True, count)


def add_commands(parser: argparse.ArgumentParser) -> None:
    """`verify`, under `python -m cluster.audit` and `lakeforge audit`; it sets `handler`."""
    commands = parser.add_subparsers(dest="audit_command", required=True)
    check = commands.add_parser("verify", help="verify a log's hash chain; exit 0 if intact, 1 if not")
    check.add_argument("file")
    check.add_argument("--hmac-key-env", default=None, help="env var holding the chain's HMAC key, if it has one")
    check.set_defaults(handler=_verify_command)


def _verify_command(args: argparse.Namespace) -> int:
    try:
        report = verify(args.file, key_from_env(args.hmac_key_env))
    except (OSError, AuditError) as error:
        print(f"ERROR: {error}")
        return 1
    print(report)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.audit", description=__doc__.split("\n")[0])
    add_commands(parser)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
