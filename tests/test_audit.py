import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.audit import AuditError, AuditLog, AuditSettings, AuditWriter, LocalFileKey, entry_hash, verify

REPO = Path(__file__).resolve().parents[1]


def write_log(path, count=5, key_provider=None):
    log = AuditLog(path, key_provider)
    return [log.append({"principal": f"user-{i}", "model": "acme-sentiment", "outcome": "allowed", "tokens": i})
            for i in range(count)]


def lines(path):
    return path.read_text().splitlines(keepends=True)


def key_of(path):
    """The key a log's writer made beside it (`<log>.key`)."""
    return LocalFileKey(f"{path}.key", create=False).key()


def check(path, **options):
    return verify(path, key_of(path), **options)


def test_chain_of_entries_verifies_and_resumes(tmp_path):
    path = tmp_path / "audit" / "log.jsonl"  # the folder is created
    entries = write_log(path, 3)
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev_hash"] == "0" * 64 and entries[1]["prev_hash"] == entries[0]["hash"]
    assert entries[2]["principal"] == "user-2" and entries[2]["time"].endswith("+00:00")
    resumed = AuditLog(path).append({"event": "restart"})  # a new writer continues the chain
    assert resumed["seq"] == 4 and resumed["prev_hash"] == entries[2]["hash"]
    report = check(path)
    assert report.ok and report.entries == 4 and str(report).startswith("OK: 4 entries, chain intact, signed with key")


def test_edited_field_is_caught_at_its_line(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)
    content = lines(path)
    content[2] = content[2].replace('"outcome":"allowed"', '"outcome":"denied"')
    path.write_text("".join(content))
    report = check(path)
    assert (report.ok, report.first_bad_line, report.entries) == (False, 3, 2)
    assert "edited" in report.reason


def test_deleted_line_is_caught(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)
    content = lines(path)
    del content[1]
    path.write_text("".join(content))
    report = check(path)
    assert (report.ok, report.first_bad_line) == (False, 2) and "prev_hash" in report.reason


def test_first_line_deleted_is_caught(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)
    path.write_text("".join(lines(path)[1:]))
    assert check(path).first_bad_line == 1


def test_swapped_lines_are_caught(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)
    content = lines(path)
    content[2], content[3] = content[3], content[2]
    path.write_text("".join(content))
    report = check(path)
    assert (report.ok, report.first_bad_line) == (False, 3)


def test_truncated_last_line_is_caught_and_blocks_appends(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)
    path.write_bytes(path.read_bytes()[:-20])
    report = check(path)
    assert (report.ok, report.first_bad_line) == (False, 5) and "incomplete" in report.reason
    with pytest.raises(AuditError, match="incomplete line"):
        AuditLog(path).append({"event": "x"})


def forge(path, edit_seq, strip_signatures=False):
    """What a forger without the key can do: change entry `edit_seq` and recompute every hash after it,
    keeping the entries' key ids and MACs (they cannot make new ones), or dropping them."""
    content, prev_hash = [json.loads(line) for line in lines(path)], "0" * 64
    for entry in content:
        if strip_signatures:
            del entry["mac_key"], entry["mac"]
        if entry["seq"] == edit_seq:
            entry["outcome"] = "denied"
        entry["prev_hash"] = prev_hash
        entry["hash"] = prev_hash = entry_hash(entry)
    path.write_text("".join(json.dumps(entry) + "\n" for entry in content))


def test_every_entry_is_signed_and_the_log_verifies_with_its_key(tmp_path):
    path = tmp_path / "log.jsonl"
    entries = write_log(path, 3)
    key_file = tmp_path / "log.jsonl.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) == 32
    assert len({entry["mac_key"] for entry in entries}) == 1 and all(len(entry["mac"]) == 64 for entry in entries)
    report = check(path)
    assert report.ok and str(report) == f"OK: 3 entries, chain intact, signed with key {entries[0]['mac_key']}"


@pytest.mark.parametrize("edit_seq", [1, 3])
def test_a_rechained_rewrite_fails_without_the_key(tmp_path, edit_seq):
    path = tmp_path / "log.jsonl"
    write_log(path, 5)
    forge(path, edit_seq)
    report = check(path)
    assert (report.status, report.first_bad_line) == ("TAMPERED", edit_seq) and "without the key" in report.reason
    # Dropping the key ids and MACs does not help: an unsigned log is not OK.
    forge(path, edit_seq, strip_signatures=True)
    assert check(path).status == "UNSIGNED"


def test_another_key_is_a_wrong_key(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path, 3)
    other = LocalFileKey(tmp_path / "other.key").key()
    report = verify(path, other)
    assert report.status == "WRONG KEY" and "signed with key" in str(report)
    assert verify(path, None).status == "WRONG KEY"  # no key at all


def test_an_unsigned_log_is_ok_only_when_allowed_and_intact(tmp_path):
    path = tmp_path / "old.jsonl"
    write_unsigned_log(path, 4)
    report = verify(path, None)
    assert report.status == "UNSIGNED" and str(report).startswith("UNSIGNED: 4 entries carry no HMAC")
    assert verify(path, None, allow_unsigned=True).ok
    content = lines(path)
    content[1] = content[1].replace('"n":1', '"n":7')
    path.write_text("".join(content))
    assert verify(path, None, allow_unsigned=True).status == "TAMPERED"


def write_unsigned_log(path, count):
    """A log as written before entries were signed: the plain SHA-256 chain only."""
    prev_hash, content = "0" * 64, []
    for seq in range(1, count + 1):
        entry = {"seq": seq, "time": "2026-01-01T00:00:00+00:00", "event": "request", "n": seq - 1, "prev_hash": prev_hash}
        entry["hash"] = prev_hash = entry_hash(entry)
        content.append(json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n")
    path.write_text("".join(content))
    return prev_hash


def rotated_aside(path, reason):
    [aside] = path.parent.glob(f"{path.name}.*.{reason}")
    return aside


def test_an_unsigned_log_is_rotated_aside_and_the_new_log_describes_it(tmp_path):
    path = tmp_path / "audit.jsonl"
    last_hash = write_unsigned_log(path, 4)
    old_bytes = path.read_bytes()
    entry = AuditLog(path).append({"event": "request"})
    aside = rotated_aside(path, "unsigned")
    assert aside.read_bytes() == old_bytes
    first, second = [json.loads(line) for line in lines(path)]
    assert first["event"] == "log_rotated" and first["reason"] == "unsigned" and first["seq"] == 1
    assert first["predecessor"] | {"check": None} == {
        "file": aside.name, "sha256": hashlib.sha256(old_bytes).hexdigest(), "lines": 4, "last_hash": last_hash,
        "mac_key": None, "check": None}
    assert first["predecessor"]["check"].startswith("UNSIGNED: 4 entries")
    assert entry == second and second["seq"] == 2 and check(path).ok


def test_a_log_of_another_key_is_rotated_aside(tmp_path):
    path = tmp_path / "audit.jsonl"
    old = write_log(path, 3, LocalFileKey(tmp_path / "old.key"))
    old_bytes = path.read_bytes()
    writer = AuditLog(path)  # its own key, audit.jsonl.key
    writer.append({"event": "request"})
    aside = rotated_aside(path, "other-key")
    first = json.loads(lines(path)[0])
    assert (first["event"], first["reason"]) == ("log_rotated", "other-key")
    assert first["predecessor"]["sha256"] == hashlib.sha256(old_bytes).hexdigest() == hashlib.sha256(aside.read_bytes()).hexdigest()
    assert (first["predecessor"]["lines"], first["predecessor"]["last_hash"]) == (3, old[-1]["hash"])
    assert first["predecessor"]["mac_key"] == old[0]["mac_key"] != first["mac_key"]
    assert check(path).ok and check(path).entries == 2
    assert verify(aside, LocalFileKey(tmp_path / "old.key").key()).ok  # the old log still verifies with its key
    # A writer that has started does not rotate again: a log another key took over is an error.
    AuditLog(path, LocalFileKey(tmp_path / "old.key")).append({"event": "started elsewhere"})
    with pytest.raises(AuditError, match="different key"):
        writer.append({"event": "request"})


@pytest.mark.parametrize("line", [1, 2])
def test_a_tampered_log_of_this_key_is_refused_not_rotated(tmp_path, line):
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    if line == 1:  # line 1 garbled: whose log it is cannot be told, so it is not taken for an unsigned one
        path.write_text("x" + path.read_text())
    else:
        forge(path, line)
    with pytest.raises(AuditError, match=f"TAMPERED: line {line}"):
        AuditLog(path).append({"event": "request"})
    assert list(tmp_path.glob("audit.jsonl.*.*")) == []


def test_a_tail_appended_after_the_check_without_lock_is_checked_under_it(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    late = AuditLog(path)
    late.append({"event": "first"})  # checked the two entries, appended a third
    other = AuditLog(path)
    other.append({"event": "second"})
    content = lines(path)
    path.write_text("".join(content[:3]) + content[3].replace('"second"', '"forged"'))
    with pytest.raises(AuditError, match="line 4"):
        late.append({"event": "third"})


@pytest.mark.parametrize("mode, error", [(0o640, "readable by group or others"), (0o604, "readable by group or others")])
def test_a_key_file_others_may_read_is_refused(tmp_path, mode, error):
    key_file = tmp_path / "audit.jsonl.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(mode)
    with pytest.raises(AuditError, match=error):
        AuditLog(tmp_path / "audit.jsonl")


def test_an_existing_key_file_is_kept_and_made_owner_only(tmp_path):
    key_file = tmp_path / "audit.jsonl.key"
    key = os.urandom(32)
    key_file.write_bytes(key)
    key_file.chmod(0o400)
    AuditLog(tmp_path / "audit.jsonl").append({"event": "request"})
    assert key_file.read_bytes() == key and key_file.stat().st_mode & 0o777 == 0o600
    key_file.write_bytes(b"short")
    with pytest.raises(AuditError, match="holds 5 bytes, not 32"):
        AuditLog(tmp_path / "audit.jsonl")


def test_the_old_hmac_key_env_setting_names_its_replacement():
    with pytest.raises(ValidationError, match="hmac_key_env was replaced by audit.key"):
        AuditSettings(hmac_key_env="AUDIT_KEY")
    assert AuditSettings(key={"path": "/secrets/audit.key"}).key.provider == "local_file"
    with pytest.raises(ValidationError, match="extra"):
        AuditSettings(key={"file": "/secrets/audit.key"})


def test_reserved_fields_cannot_be_set(tmp_path):
    log = AuditLog(tmp_path / "log.jsonl")
    for field in ("hash", "mac", "mac_key"):
        with pytest.raises(ValueError, match="reserved"):
            log.append({field: "0" * 64})
    assert log.append({"key_id": "crm-2"})["key_id"] == "crm-2"  # the gateway's API key id is an event field


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


@pytest.mark.parametrize("existing", ["none", "unsigned"])
def test_processes_appending_concurrently_keep_one_chain(tmp_path, existing):
    """Three processes start at once, on no log or on an old one that each finds it must rotate:
    one of them rotates it, and all append to the one new chain."""
    path = tmp_path / "log.jsonl"
    if existing == "unsigned":
        write_unsigned_log(path, 3)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(path), w, 50)) for w in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    rotated = existing == "unsigned"
    assert len(list(tmp_path.glob("log.jsonl.*.unsigned"))) == rotated
    report = check(path)
    assert report.ok and report.entries == 150 + rotated
    entries = [json.loads(line) for line in lines(path)][rotated:]
    assert sorted((e["worker"], e["i"]) for e in entries) == [(w, i) for w in range(3) for i in range(50)]


def test_verify_cli_says_what_it_found_and_exits_nonzero_unless_ok(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path)

    def run(*options):
        result = subprocess.run([sys.executable, "-m", "cluster.audit", "verify", str(path), *options],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
        return result.returncode, result.stdout.strip()
    code, out = run()  # the key file beside the log, by default
    assert code == 0 and out.startswith("OK: 5 entries, chain intact, signed with key")
    LocalFileKey(tmp_path / "other.key").key()
    code, out = run("--key-file", str(tmp_path / "other.key"))
    assert code == 1 and out.startswith("WRONG KEY: the 5 entries are signed with key")
    code, out = run("--key-file", str(tmp_path / "missing.key"))
    assert code == 1 and out.startswith("ERROR: audit key file") and "does not exist" in out
    content = lines(path)
    content[3] = content[3].replace('"tokens":3', '"tokens":0')
    path.write_text("".join(content))
    code, out = run()
    assert code == 1 and out.startswith("TAMPERED: line 4: hash does not match")
    forge(path, 2)
    code, out = run()
    assert code == 1 and out.startswith("TAMPERED: line 2: mac does not match")
    write_unsigned_log(path, 3)
    (tmp_path / "log.jsonl.key").unlink()  # an old log has no key file: none is needed
    code, out = run()
    assert code == 1 and out.startswith("UNSIGNED: 3 entries")
    code, out = run("--allow-unsigned")
    assert code == 0 and out.startswith("OK: 3 entries, chain intact (unsigned")
    path.unlink()
    assert run()[0] == 1


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

    log = AuditLog(path)  # its key file is made (and fsynced) first
    monkeypatch.setattr(os, "fsync", slow_fsync)
    writer = AuditWriter(log)
    first = writer.submit({"n": 0})
    assert entered.wait(60)  # the first entry is being written alone; the rest queue up behind it
    rest = [writer.submit({"n": n}) for n in range(1, 50)]
    rest[10].cancel()  # a waiter that gave up: its entry is written all the same
    release.set()
    assert writer.flush(60)
    assert fsyncs == ["lakeforge-audit-writer"] * 2  # two batches, one fsync each
    assert [future.result()["seq"] for future in (first, *rest) if not future.cancelled()] == [
        n for n in range(1, 51) if n != 12]
    assert [json.loads(line)["n"] for line in lines(path)] == list(range(50)) and check(path).ok
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
