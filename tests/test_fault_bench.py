"""The fault drill's own logic, without Ray: how a stream's outcome is classified, and the counts and
recovery times computed from a recorded run (bench/fault_bench.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from bench.fault_bench import one_stream, parse_args, registered_checkpoint, summarize


def chunk(finish_reason=None):
    return SimpleNamespace(choices=[SimpleNamespace(finish_reason=finish_reason)])


class FakeClient:
    """AsyncOpenAI's shape: chat.completions.create(...) -> an async iterator of chunks, which may
    raise after some of them (the connection dropped mid-answer)."""

    def __init__(self, chunks, error=None, fail_at_create=False):
        self.chunks, self.error, self.fail_at_create = chunks, error, fail_at_create
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    async def create(self, **_kwargs):
        if self.fail_at_create:
            raise self.error
        return self.stream()

    async def stream(self):
        for item in self.chunks:
            yield item
        if self.error:
            raise self.error


def outcome(client) -> dict:
    ticks = iter(range(100))
    return asyncio.run(one_stream(client, "drill", 4, lambda: next(ticks)))


def test_a_stream_is_ok_only_when_it_ends_with_a_finish_reason():
    assert outcome(FakeClient([chunk(), chunk("length"), SimpleNamespace(choices=[])]))["outcome"] == "ok"
    silent_end = outcome(FakeClient([chunk(), chunk()]))
    assert silent_end["outcome"] == "cut" and "finish reason" in silent_end["error"]


def test_an_error_after_part_of_the_answer_is_a_cut_stream_before_it_a_failure():
    cut = outcome(FakeClient([chunk()], error=ConnectionResetError("peer closed")))
    assert cut["outcome"] == "cut" and cut["error"].startswith("ConnectionResetError")
    refused = outcome(FakeClient([], error=RuntimeError("503"), fail_at_create=True))
    assert refused["outcome"] == "failed" and refused["started"] < refused["ended"]


def record(started, ended, outcome="ok", error=None):
    return {"started": started, "ended": ended, "outcome": outcome, **({"error": error} if error else {})}


def test_counts_and_recovery_times_from_a_recorded_run():
    records = [
        record(0, 1),
        record(1, 9, "failed", "APIConnectionError: refused"),  # failed before the kill at 10: counted apart
        record(8, 11, "cut", "RemoteProtocolError: incomplete"),  # in flight at the kill
        record(9, 12, "failed", "InternalServerError: 500"),
        record(10.5, 14),  # sent after the kill: the first success ends at 14
        record(11, 13, "failed", "InternalServerError: 500"),
        record(12, 20),
    ]
    polls = [{"at": 9.5, "healthy": True}, {"at": 10.5, "healthy": True},  # Serve has not noticed yet
             {"at": 11, "healthy": False}, {"at": 15, "healthy": False}, {"at": 16, "healthy": True}]
    summary = summarize(records, polls, killed_at=10)
    assert (summary["sent"], summary["completed"], summary["failed"]) == (7, 3, 4)
    assert (summary["cut_mid_stream"], summary["before_answer"], summary["failed_before_kill"]) == (1, 3, 1)
    assert summary["serve_healthy_s"] == 6 and summary["first_success_s"] == 4 and summary["recovery_s"] == 6
    assert summary["last_failure_s"] == 3
    assert summary["errors"]["InternalServerError: 500"] == 2


def test_recovery_is_unknown_when_it_was_not_observed():
    # Serve never reported the deployment unhealthy, and nothing sent after the kill succeeded.
    summary = summarize([record(0, 12, "failed", "APITimeoutError: timed out")], [{"at": 11, "healthy": True}], killed_at=10)
    assert summary["serve_unhealthy_seen"] is False
    assert summary["serve_healthy_s"] is None and summary["first_success_s"] is None and summary["recovery_s"] is None
    assert summarize([record(11, 12)], [], killed_at=10)["last_failure_s"] is None


@pytest.mark.parametrize("argv", [["--clients", "0"], ["--max-tokens", "-1"], ["--parts", "everything"]])
def test_nonsense_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_the_training_drill_waits_for_a_checkpoint_ray_train_registered(tmp_path):
    """The kill must come after Ray Train's controller recorded the checkpoint (its manager snapshot),
    not when the folder appears: resuming uses only registered checkpoints."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState, _TrainingResultState)

    run = tmp_path / "ray_train" / "run-1"
    (run / "checkpoint_2026-12-02_10-00-00.000000").mkdir(parents=True)  # uploading, not registered
    assert registered_checkpoint(tmp_path / "ray_train") is None
    state = dict(checkpoint_results=[], checkpoint_report_indices=[], pending_training_results=[],
                 pending_validation_specs=[], current_report_index=1, validated_checkpoint_dir_names=[],
                 timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    snapshot = run / "checkpoint_manager_snapshot.json"
    snapshot.write_text(_CheckpointManagerState(**state).json())
    assert registered_checkpoint(tmp_path / "ray_train") is None
    snapshot.write_text("{\"latest_checkpoint_res")  # being written
    assert registered_checkpoint(tmp_path / "ray_train") is None
    latest = _TrainingResultState(checkpoint_dir_name="checkpoint_2026-12-02_10-00-00.000000", metrics={"step": 4})
    snapshot.write_text(_CheckpointManagerState(**state, latest_checkpoint_result=latest).json())
    assert registered_checkpoint(tmp_path / "ray_train") == "checkpoint_2026-12-02_10-00-00.000000"
