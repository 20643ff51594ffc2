"""Append-only, hash-chained audit log (one JSON object per line) and its verifier.

Every entry carries `seq` (its 1-based line number), `time` (UTC ISO 8601), the event's fields,
`prev_hash` (the previous entry's `hash`; 64 zeros for the first) and `hash`: SHA-256 over the
canonical JSON of the entry without `hash` (sorted keys, no spaces). So an edited, deleted,
reordered or truncated line breaks the chain at a line `verify` names.

Several processes (Serve replicas on one node) may append to one file: each append takes an
exclusive `fcntl.flock`, reads the last entry's hash, writes one line and fsyncs, so the chain
stays linear. The path must be on a local filesystem (flock does not work on object stores).

Threat model: a plain SHA-256 chain catches accidental damage and edits by someone who does not
rewrite every later line; an attacker who can rewrite the whole file can recompute the chain.
With `hmac_key_env` set, each hash is an HMAC keyed by a secret the attacker must also steal.
Neither catches dropping the newest lines (tail truncation); ship the latest hash elsewhere for that.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import hmac
import json
import os
import sys
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
        clash = [name for name in RESERVED_FIELDS if name in event]
        if clash:
            raise ValueError(f"audit event may not set reserved field(s) {clash}")
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
            entry = {"seq": seq, "time": datetime.now(timezone.utc).isoformat(), **event, "prev_hash": prev_hash}
            entry["hash"] = entry_hash(entry, self._key)
            os.write(fd, _canonical(entry) + b"\n")
            os.fsync(fd)
            return entry
        finally:
            os.close(fd)  # also releases the lock


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.audit", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="verify a log's hash chain; exit 0 if intact, 1 if not")
    check.add_argument("file")
    check.add_argument("--hmac-key-env", default=None, help="env var holding the chain's HMAC key, if it has one")
    args = parser.parse_args(argv)
    try:
        report = verify(args.file, key_from_env(args.hmac_key_env))
    except (OSError, AuditError) as error:
        print(f"ERROR: {error}")
        return 1
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
