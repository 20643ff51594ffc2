import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.audit import AuditError, AuditLog, AuditSettings, AuditWriter, verify

REPO = Path(__file__).resolve().parents[1]


def write_log(path, count=5, key=None):
    log = AuditLog(path, key)
    return [log.append({"principal": f"user-{i}", "model": "acme-sentiment", "outcome": "allowed", "tokens": i})
            for i in range(count)]


def lines(path):
    return path.read_text().splitlines(keepends=True)


def test_chain_of_entries_verifies_and_resumes(tmp_path):
    path = tmp_path / "audit" / "log.jsonl"  # the folder is created
    entries = write_log(path, 3)
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev_hash"] == "0" * 64 and entries[1]["prev_hash"] == entries[0]["hash"]
    assert entries[2]["principal"] == "user-2" and entries[2]["time"].endswith("+00:00")
    resumed = AuditLog(path).append({"event": "restart"})  # a new writer continues the chain
    assert resumed["seq"] == 4 and resumed["prev_hash"] == entries[2]["hash"]
    report = verify(path)
    assert report.ok and report.entries == 4 and str(report) == "OK: 4 entries, chain intact"


def test_edited_field_is_caught_at_its_line(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)
    content = lines(path)
    content[2] = content[2].replace('"outcome":"allowed"', '"outcome":"denied"')
    path.write_text("".join(content))
    report = verify(path)
    assert (report.ok, report.first_bad_line, report.entries) == (False, 3, 2)
    assert "edited" in report.reason


def test_deleted_line_is_caught(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)
    content = lines(path)
    del content[1]
    path.write_text("".join(content))
    report = verify(path)
    assert (report.ok, report.first_bad_line) == (False, 2) and "prev_hash" in report.reason


def test_first_line_deleted_is_caught(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)
    path.write_text("".join(lines(path)[1:]))
    assert verify(path).first_bad_line == 1


def test_swapped_lines_are_caught(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)
    content = lines(path)
    content[2], content[3] = content[3], content[2]
    path.write_text("".join(content))
    report = verify(path)
    assert (report.ok, report.first_bad_line) == (False, 3)


def test_truncated_last_line_is_caught_and_blocks_appends(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)
    path.write_bytes(path.read_bytes()[:-20])
    report = verify(path)
    assert (report.ok, report.first_bad_line) == (False, 5) and "incomplete" in report.reason
    with pytest.raises(AuditError, match="incomplete line"):
        AuditLog(path).append({"event": "x"})


def test_rewritten_chain_is_caught_only_with_the_hmac_key(tmp_path):
    path = tmp_path / "log.jsonl"
    key = b"k" * 32
    write_log(path, 3, key)
    assert verify(path, key).ok and not verify(path).ok  # an HMAC chain is not a plain-hash chain
    # an attacker without the key rewrites entry 2 and recomputes the chain with plain SHA-256
    forged = tmp_path / "forged.jsonl"
    forger = AuditLog(forged)
    for entry in (json.loads(line) for line in lines(path)):
        event = {k: v for k, v in entry.items() if k not in ("seq", "time", "prev_hash", "hash")}
        forger.append({**event, "outcome": "denied"} if entry["seq"] == 2 else event)
    report = verify(forged, key)
    assert (report.ok, report.first_bad_line) == (False, 1)


def test_reserved_fields_cannot_be_set(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        AuditLog(tmp_path / "log.jsonl").append({"hash": "0" * 64})


def _append_many(path, worker, count):
    log = AuditLog(path)
    if worker % 2:  # odd workers append in batches through a background writer
        writer = AuditWriter(log, max_batch=7)
        futures = [writer.submit({"worker": worker, "i": i}) for i in range(count)]
        writer.close()
        assert all(future.result(0) for future in futures)
        return
    for i in range(count):
        log.append({"worker": worker, "i": i})


def test_processes_appending_concurrently_keep_one_chain(tmp_path):
    path = tmp_path / "log.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(path), w, 50)) for w in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    report = verify(path)
    assert report.ok and report.entries == 150
    entries = [json.loads(line) for line in lines(path)]
    assert sorted((e["worker"], e["i"]) for e in entries) == [(w, i) for w in range(3) for i in range(50)]


def test_verify_cli_exit_codes(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)

    def run():
        return subprocess.run([sys.executable, "-m", "cluster.audit", "verify", str(path)],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
    good = run()
    assert good.returncode == 0 and good.stdout.strip() == "OK: 5 entries, chain intact"
    content = lines(path)
    content[3] = content[3].replace('"tokens":3', '"tokens":0')
    path.write_text("".join(content))
    bad = run()
    assert bad.returncode == 1 and bad.stdout.startswith("TAMPERED: line 4:")
    path.unlink()
    assert run().returncode == 1


def test_settings_reject_object_store_paths():
    with pytest.raises(ValidationError, match="local file path"):
        AuditSettings(path="s3://bucket/audit.jsonl")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_writer_keeps_order_and_writes_what_queued_up_as_one_batch(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    entered, release, fsyncs = threading.Event(), threading.Event(), []
    real_fsync = os.fsync

    def slow_fsync(fd):
        fsyncs.append(threading.current_thread().name)
        entered.set()
        release.wait(60)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    writer = AuditWriter(AuditLog(path))
    first = writer.submit({"n": 0})
    assert entered.wait(60)  # the first entry is being written alone; the rest queue up behind it
    rest = [writer.submit({"n": n}) for n in range(1, 50)]
    rest[10].cancel()  # a waiter that gave up: its entry is written all the same
    release.set()
    assert writer.flush(60)
    assert fsyncs == ["lakeforge-audit-writer"] * 2  # two batches, one fsync each
    assert [future.result()["seq"] for future in (first, *rest) if not future.cancelled()] == [
        n for n in range(1, 51) if n != 12]
    assert [json.loads(line)["n"] for line in lines(path)] == list(range(50)) and verify(path).ok
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(AuditError, match="stopped"):
        writer.submit({"n": 50})
    another = AuditWriter(AuditLog(path))
    with pytest.raises(ValueError, match="reserved"):
        another.submit({"seq": 1})
    another.close()


def test_writer_failure_fails_the_batch_and_is_down_until_a_batch_is_written(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"seq": 1, "hash": "trunc')  # a half-written last line
    clock, errors, recoveries = FakeClock(), [], []
    writer = AuditWriter(AuditLog(path), retry_s=1.0, clock=clock, on_error=errors.append,
                         on_recovery=lambda: recoveries.append(True))
    with pytest.raises(AuditError, match="incomplete line"):
        writer.submit({"n": 1}).result(60)
    assert writer.down and len(errors) == 1 and isinstance(errors[0], AuditError)
    assert not writer.probe_due()  # tried just now
    clock.now += 1.0
    assert writer.probe_due() and not writer.probe_due()  # one caller per interval tries again
    path.write_text("")  # repaired
    assert writer.submit({"n": 2}).result(60)["seq"] == 1
    assert not writer.down and recoveries == [True] and writer.probe_due()
    writer.close()
