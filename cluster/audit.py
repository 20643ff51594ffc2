"""Append-only, hash-chained and keyed audit log (one JSON object per line) and its verifier.

Every entry carries `seq` (its 1-based line number), `time` (UTC ISO 8601), the event's fields,
`mac_key` (the id of the key that signed it), `prev_hash` (the previous entry's `hash`; 64 zeros for the first),
`hash`: SHA-256 over the canonical JSON of the entry without `hash` and `mac` (sorted keys, no
spaces), and `mac`: HMAC-SHA256 of `hash` under a secret key. The chain makes an edited, deleted,
reordered or truncated line break at a line `verify` names; the MAC makes a rewritten and
re-chained file fail too, as recomputing the hashes is easy but signing them needs the key.
Dropping the newest lines (tail truncation) is not caught: ship the latest hash elsewhere for that.

The key comes from a `KeyProvider`; `LocalFileKey` keeps 32 random bytes in an owner-only file,
by default `<log>.key`, created on first use.

Several processes (Serve replicas on one node) may append to one file: each append takes an
exclusive `fcntl.flock`, checks the entries appended since it last looked (so every entry is
verified before anything is chained onto it), writes its lines and fsyncs, so the chain stays
linear. A process checks the existing log once when it starts, without the lock (a long log must
not hold the others up), and the tail appended meanwhile under it. A log it cannot sign onto
(written before logs were keyed, or signed with another key) is rotated aside, not refused: it
becomes `<log>.<UTC time>.unsigned|other-key` and the new log's first entry, `log_rotated`, records
its file name, SHA-256, line count and last hash, so the chain of logs stays checkable. A log of
this key that fails its check stops the writer (the gateway answers 503) until someone looks.
The path must be on a local filesystem (flock does not work on object stores).

`AuditWriter` does the appending on a background thread for async code (the gateway): entries are
queued in order, and whatever has queued up while one batch was being written goes to disk as the
next batch, under one lock and one fsync (group commit); a caller awaits its entry's future, so the
event loop never waits on the disk, yet nothing is answered before its entry is durable.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import hashlib
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Protocol

from pydantic import Field, field_validator, model_validator

from cluster import keys
from cluster.config import StrictModel

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
CHAIN_FIELDS = ("seq", "time", "prev_hash", "hash")  # in every entry, also in logs from before keys
RESERVED_FIELDS = (*CHAIN_FIELDS, "mac_key", "mac")  # not `key_id`: the gateway's events name API keys with it
READ_CHUNK = 1 << 20


class AuditKeySettings(StrictModel):
    """Where the key that signs the audit log's entries comes from."""

    provider: Literal["local_file"] = Field(
        default="local_file",
        description="`local_file`: 32 random bytes in an owner-only file, created (mode 0600) when missing; "
                    "a file readable by group or others, or of another length, is refused.")
    path: str | None = Field(
        default=None,
        description="The key file; unset = the log's path with `.key` appended. Keep it where whoever may write "
                    "or copy the log cannot read it (the key is what a forger would need).")

    @field_validator("path")
    @classmethod
    def _a_local_file(cls, value: str | None) -> str | None:
        return keys.refuse_uri(value, "the audit key file needs a local file path, not a URI")


class AuditSettings(StrictModel):
    """Where access decisions and requests are recorded, and how much of them."""

    path: str = Field(default="~/.lakeforge/audit.jsonl",
                      description="Local file the hash-chained audit log is appended to (created with its folder).")
    log_prompts: bool = Field(default=False,
                              description="Also record prompt and completion text; off by default, as they may hold personal data.")
    key: AuditKeySettings = Field(default_factory=AuditKeySettings,
                                  description="The key every entry's HMAC is made with, so a rewritten and re-chained log fails `verify`.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data):
        # Entries are always signed now; the old switch named an env var holding a shared secret.
        if isinstance(data, dict) and "hmac_key_env" in data:
            raise ValueError("audit.hmac_key_env was replaced by audit.key (a key file: "
                             "audit.key.provider=local_file, audit.key.path=FILE); every entry is signed now")
        return data

    @field_validator("path")
    @classmethod
    def _not_an_object_store(cls, value: str) -> str:
        if "://" in value:
            raise ValueError("the audit log needs a local file path (file locking), not a URI")
        return value


class AuditError(RuntimeError):
    """The log cannot be appended to safely (for example its last line is incomplete), or its key cannot be had."""


class KeyProvider(Protocol):
    """Where the audit log's HMAC key comes from: a local file today; a KMS or secret store would be another."""

    def key(self) -> bytes:
        """The key's bytes; an AuditError saying why when it cannot be had safely."""


class LocalFileKey(keys.LocalFileKey):
    """The audit log's key file (cluster.keys.LocalFileKey): its errors are AuditErrors naming the audit key file."""

    what = "audit key file"
    error = AuditError


def key_id(key: bytes) -> str:
    """A short public name for a key (says which key signed a log, reveals nothing of it)."""
    return hmac.new(key, b"lakeforge audit key id", hashlib.sha256).hexdigest()[:16]


def _canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict) -> str:
    """SHA-256 of an entry without its `hash` and `mac` fields."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k not in ("hash", "mac")})).hexdigest()


def entry_mac(key: bytes, chain_hash: str) -> str:
    return hmac.new(key, chain_hash.encode(), hashlib.sha256).hexdigest()


@dataclass
class VerifyReport:
    status: str  # OK, TAMPERED, WRONG KEY or UNSIGNED
    entries: int  # entries that verified (before the first bad line, if any)
    first_bad_line: int | None = None  # 1-based
    reason: str = ""  # what is wrong (or, for OK, what was checked)

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    def __str__(self) -> str:
        if self.status == "TAMPERED":
            return f"TAMPERED: line {self.first_bad_line}: {self.reason} ({self.entries} entries before it verified)"
        return f"{self.status}: {self.reason}"


class ChainCheck:
    """How far a log has been verified: fed its lines in order, it keeps the chain's end and the
    first problem. `verify` reads a whole file with one; a writer keeps one per file it appends to
    and feeds it only what was appended since."""

    def __init__(self, key: bytes | None, inode: tuple[int, int] | None = None):
        self.key = key
        self.key_id = key_id(key) if key else None
        self.inode = inode  # (st_dev, st_ino) of the file it reads
        self.offset = 0  # bytes of complete lines consumed
        self.lines = 0
        self.prev_hash = GENESIS_HASH  # the hash of the last entry that verified
        self.signer: str | None = None  # key id of the first entry; None: unsigned (or no entry yet)
        self.first_bad_line: int | None = None
        self.reason = ""

    def read(self, fd: int, end: int) -> None:
        """Feed the complete lines between `offset` and `end`; a line still being written is left for later."""
        pending = b""
        position = self.offset
        while position < end:
            data = os.pread(fd, min(READ_CHUNK, end - position), position)
            if not data:
                break
            position += len(data)
            *complete, pending = (pending + data).split(b"\n")
            for line in complete:
                self.feed(line + b"\n")

    def feed(self, raw: bytes) -> None:
        self.offset += len(raw)
        self.lines += 1
        if self.first_bad_line is None:
            reason = self._problem(raw)
            if reason:
                self.first_bad_line, self.reason = self.lines, reason

    def _problem(self, raw: bytes) -> str:
        """Why the next line breaks the chain ("" if it does not); advances the chain's end if not."""
        if not raw.endswith(b"\n"):
            return "last line is incomplete (no newline): truncated or partly written"
        try:
            entry = json.loads(raw)
        except ValueError:
            return "not valid JSON"
        if not isinstance(entry, dict) or not all(name in entry for name in CHAIN_FIELDS):
            return "missing chain fields"
        if entry["hash"] != entry_hash(entry):
            return "hash does not match the entry's content (edited)"
        if entry["prev_hash"] != self.prev_hash:
            return "prev_hash does not match the previous entry (line deleted, inserted or reordered)"
        if entry["seq"] != self.lines:
            return f"seq {entry['seq']} where {self.lines} was expected"
        signer = entry.get("mac_key")
        if self.lines == 1:
            self.signer = signer  # a log is signed by one key throughout, or not at all (before keys)
        elif signer != self.signer:
            return (f"signed with key {signer} in a log signed with key {self.signer}" if signer and self.signer
                    else "an unsigned entry in a signed log" if self.signer else "a signed entry in an unsigned log")
        if signer is not None:
            if not isinstance(entry.get("mac"), str):
                return "a signed entry without its mac"
            if signer == self.key_id and not hmac.compare_digest(entry["mac"], entry_mac(self.key, entry["hash"])):
                return "mac does not match: the entry was rewritten (and the chain recomputed) without the key"
        elif "mac" in entry:
            return "a mac without its mac_key"
        self.prev_hash = entry["hash"]
        return ""

    def report(self, allow_unsigned: bool = False) -> VerifyReport:
        verified = self.lines if self.first_bad_line is None else self.first_bad_line - 1
        if self.first_bad_line is not None:
            return VerifyReport("TAMPERED", verified, self.first_bad_line, self.reason)
        if self.lines and self.signer is None:
            if allow_unsigned:
                return VerifyReport("OK", verified, reason=f"{verified} entries, chain intact (unsigned: "
                                                           "accepted with --allow-unsigned; anyone can recompute it)")
            return VerifyReport("UNSIGNED", verified, reason=(
                f"{verified} entries carry no HMAC (a log from before keyed audit logs); their chain is intact, but "
                "anyone can recompute it: --allow-unsigned accepts it"))
        if self.lines and self.signer != self.key_id:
            held = f"the key given is {self.key_id}" if self.key else "no key was given (--key-file)"
            return VerifyReport("WRONG KEY", verified, reason=(
                f"the {verified} entries are signed with key {self.signer}; {held} (their chain is intact, "
                "their MACs unchecked)"))
        signed = f", signed with key {self.key_id}" if self.lines else ""
        return VerifyReport("OK", verified, reason=f"{verified} entries, chain intact{signed}")


def _inode(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


class AuditLog:
    """Appends hash-chained, signed entries to `path`; safe for several processes appending to one file."""

    def __init__(self, path: str | Path, key_provider: KeyProvider | None = None):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.key_provider = key_provider or LocalFileKey(f"{self.path}.key")
        self._key = self.key_provider.key()  # now: a missing or unsafe key stops a replica at start, not per request
        self.key_id = key_id(self._key)
        self._check: ChainCheck | None = None  # how far this process has verified the file it appends to
        # Set by the first write: a log found unsignable after that is another writer's doing
        # (one with another key), an error to look into, not something to rotate away again.
        self._started = False

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> "AuditLog":
        return cls(settings.path, LocalFileKey(settings.key.path or f"{Path(settings.path).expanduser()}.key"))

    def append(self, event: dict) -> dict:
        """Write one entry for `event` and return it (with seq, time, mac_key, prev_hash, hash, mac)."""
        return self.append_many([event])[0]

    @staticmethod
    def check_event(event: dict) -> None:
        clash = [name for name in RESERVED_FIELDS if name in event]
        if clash:
            raise ValueError(f"audit event may not set reserved field(s) {clash}")

    def _entry(self, seq: int, prev_hash: str, event: dict) -> dict:
        entry = {"seq": seq, "time": datetime.now(timezone.utc).isoformat(), **event,
                 "mac_key": self.key_id, "prev_hash": prev_hash}
        entry["hash"] = entry_hash(entry)
        entry["mac"] = entry_mac(self._key, entry["hash"])
        return entry

    def append_many(self, events: list[dict]) -> list[dict]:
        """Write one entry per event, in order, under one lock and one fsync; return the entries."""
        for event in events:
            self.check_event(event)
        if not events:
            return []
        if self._check is None:
            self._check = self._check_without_lock()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # held across check + write: one linear chain
                info = os.fstat(fd)
                try:
                    replaced = _inode(os.stat(self.path)) != _inode(info)
                except FileNotFoundError:
                    replaced = True
                if replaced:  # another process rotated the log while we waited: append to the new one
                    continue
                check = self._checked_to_end(fd, info)
                # Whose log it is, line 1 says: if that line itself is broken, no one can tell, so it is not rotated.
                rotate_reason = ("unsigned" if check.signer is None else "other-key") if (
                    check.lines and check.first_bad_line != 1 and check.signer != self.key_id and not self._started) else None
                if rotate_reason:
                    self._rotate(info.st_size, check, rotate_reason)
                    continue
                if info.st_size > check.offset:
                    raise AuditError(f"{self.path} ends with an incomplete line; run "
                                     f"`python -m cluster.audit verify {self.path}` before appending")
                report = check.report()
                if not report.ok:
                    hint = ("another writer with a different key is appending to it" if report.status != "TAMPERED"
                            else f"run `python -m cluster.audit verify {self.path}`")
                    raise AuditError(f"{self.path} cannot be appended to: {report}; {hint}")
                entries, lines = [], []
                for event in events:
                    entry = self._entry(check.lines + len(entries) + 1, entries[-1]["hash"] if entries else check.prev_hash, event)
                    entries.append(entry)
                    lines.append(_canonical(entry) + b"\n")
                data = memoryview(b"".join(lines))
                while data:  # a regular file takes it in one write; a short write is continued, not lost
                    data = data[os.write(fd, data):]
                os.fsync(fd)
                for line in lines:  # what we wrote is verified already: the next append reads on after it
                    check.feed(line)
                self._started = True
                return entries
            finally:
                os.close(fd)  # also releases the lock

    def _check_without_lock(self) -> ChainCheck:
        """The existing log verified as far as it goes now; the tail appended meanwhile is checked under the lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return ChainCheck(self._key)
        try:
            info = os.fstat(fd)
            check = ChainCheck(self._key, _inode(info))
            check.read(fd, info.st_size)
            return check
        finally:
            os.close(fd)

    def _checked_to_end(self, fd: int, info: os.stat_result) -> ChainCheck:
        """This process's check of the locked file, fed what was appended since it last looked."""
        check = self._check
        if check is None or check.inode != _inode(info) or info.st_size < check.offset or check.first_bad_line:
            # Another file (rotated or replaced), a shorter one (repaired), or one that failed before: read it all.
            check = self._check = ChainCheck(self._key, _inode(info))
        check.read(fd, info.st_size)
        return check

    def _rotate(self, size: int, check: ChainCheck, reason: str) -> None:
        """Move the locked log aside and put a new one in its place whose first entry describes it."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(f"{self.path.name}.{stamp}.{reason}")
        with open(self.path, "rb") as handle:  # the locked file: the path was checked to name it
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        entry = self._entry(1, GENESIS_HASH, {"event": "log_rotated", "reason": reason, "predecessor": {
            "file": aside.name, "sha256": digest, "lines": check.lines + (size > check.offset),
            "last_hash": check.prev_hash, "mac_key": check.signer, "check": str(check.report())}})
        # The new log is complete before it takes the name, so no process sees the path missing or empty.
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex}.new")
        new = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(new, _canonical(entry) + b"\n")
            os.fsync(new)
        finally:
            os.close(new)
        os.link(self.path, aside)  # a link, not a rename: never overwrites an earlier aside file
        os.replace(temporary, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        logger.warning("audit log %s: %s, moved aside to %s; a new log starts with its log_rotated entry",
                       self.path, check.report(), aside.name)


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


def verify(path: str | Path, key: bytes | None, allow_unsigned: bool = False) -> VerifyReport:
    """Check every line's hash, its link to the line before and its MAC under `key`; report the first break."""
    with open(Path(path).expanduser(), "rb") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        check = ChainCheck(key)
        check.read(fd, size)
        if size > check.offset:  # a last line without its newline
            check.feed(os.pread(fd, size - check.offset, check.offset))
    return check.report(allow_unsigned)


def add_commands(parser: argparse.ArgumentParser) -> None:
    """`verify`, under `python -m cluster.audit` and `lakeforge audit`; it sets `handler`."""
    commands = parser.add_subparsers(dest="audit_command", required=True)
    check = commands.add_parser("verify", help="verify a log's hash chain and HMACs; exit 0 if OK, 1 if not")
    check.add_argument("file")
    check.add_argument("--key-file", default=None, help="the key the log is signed with (default: FILE.key)")
    check.add_argument("--allow-unsigned", action="store_true",
                       help="accept a log from before keyed audit logs if its chain is intact")
    check.set_defaults(handler=_verify_command)


def _verify_command(args: argparse.Namespace) -> int:
    key_file = Path(args.key_file or f"{args.file}.key").expanduser()
    try:
        # Without --key-file a missing default key is no error: an unsigned log needs none.
        key = LocalFileKey(key_file, create=False).key() if args.key_file or key_file.exists() else None
        report = verify(args.file, key, args.allow_unsigned)
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
