import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.audit import AuditError, AuditLog, AuditSettings, verify

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
