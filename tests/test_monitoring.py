"""Model monitoring without a cluster: the prediction/feedback logs (cluster.monitoring), the drift and
quality statistics on samples whose answer is known, the monitor job end to end on logs written by
the same writer the gateway uses, and the alert rules and dashboard against the metrics that exist."""

import json
import re
import shutil
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cluster.monitoring import (
    PREDICTION_SCHEMA, PREDICTIONS, REQUEST_ID_PATTERN, MonitoringSettings, ParquetLog, text_stats,
)
from jobs.config import BatchInferConfig, MonitorConfig
from jobs.monitor import main as monitor_main
from jobs.monitoring.run import read_log, run_monitor, window_bounds
from jobs.monitoring.stats import classification_metrics, ks_test, label_mix_test, psi

REPO = Path(__file__).resolve().parents[1]
LABELS = ["negative", "neutral", "positive"]
END = datetime(2026, 11, 4, tzinfo=timezone.utc)


# ----- statistics with known answers -----

def test_psi_of_identical_samples_is_zero_and_of_a_shifted_one_above_the_threshold():
    rng = np.random.default_rng(0)
    reference = rng.normal(100, 20, 5000)
    assert psi(reference, reference) == pytest.approx(0, abs=1e-12)
    assert psi(reference, rng.normal(100, 20, 5000)) < 0.02  # another sample of the same distribution
    assert psi(reference, rng.normal(130, 20, 5000)) > 0.25  # shifted by 1.5 standard deviations: a large shift
    assert psi(reference, np.full(100, 1e6)) > 5  # all mass beyond the reference's range lands in its last bin


def test_ks_statistic_and_pvalue():
    same = ks_test(np.arange(1, 101), np.arange(1, 101))
    assert same == {"statistic": 0.0, "pvalue": 1.0}
    half = ks_test(np.arange(1, 101), np.arange(51, 151))  # the CDFs are 0.5 apart from 50 to 100
    assert half["statistic"] == pytest.approx(0.5) and half["pvalue"] < 1e-9
    rng = np.random.default_rng(1)
    assert ks_test(rng.normal(0, 1, 400), rng.normal(0, 1, 400))["pvalue"] > 0.01


def test_label_mix_chi_square():
    reference = ["negative"] * 600 + ["neutral"] * 250 + ["positive"] * 150
    assert label_mix_test(reference, reference[::5], LABELS)["pvalue"] > 0.9  # the same mix
    skewed = label_mix_test(reference, ["positive"] * 150 + ["negative"] * 50, LABELS)
    assert skewed["pvalue"] < 1e-10 and skewed["predicted_share"]["positive"] == 0.75
    assert label_mix_test(["negative"] * 10, ["negative", "unseen"], ["negative", "unseen"])["pvalue"] < 0.05


def test_classification_metrics_and_bootstrap_interval():
    truth = ["negative"] * 50 + ["positive"] * 50
    perfect = classification_metrics(truth, truth, ["negative", "positive"], bootstrap_samples=100, seed=0)
    assert perfect["accuracy"] == perfect["macro_f1"] == 1.0 and perfect["macro_f1_interval"] == [1.0, 1.0]
    half = classification_metrics(truth, ["negative"] * 100, ["negative", "positive"], bootstrap_samples=200, seed=0)
    assert half["accuracy"] == 0.5 and half["per_class"]["positive"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                                          "support": 50}
    assert half["macro_f1"] == pytest.approx(1 / 3)
    low, high = half["accuracy_interval"]
    assert low < 0.5 < high and high - low < 0.3


# ----- the log writer -----

def prediction(request_id: str, time: datetime, label: str, version: str = "v0001", chars: int = 40,
               index: int = 0) -> dict:
    probabilities = {name: (0.8 if name == label else 0.1) for name in LABELS}
    return {"request_id": request_id, "index": index, "time": time, "source": "test", "model": "m", "version": version,
            "label": label, "confidence": 0.8, "probabilities": probabilities,
            **text_stats("x" * chars, chars // 4), "text": None}


def settings(tmp_path, **extra) -> MonitoringSettings:
    return MonitoringSettings(enabled=True, root=str(tmp_path / "monitoring"), **extra)


def test_the_log_writes_parts_by_day_and_version_when_enough_rows_wait(tmp_path):
    log = ParquetLog(str(tmp_path / "monitoring"), PREDICTIONS, PREDICTION_SCHEMA,
                     settings(tmp_path, flush_rows=3, flush_seconds=3600))
    day = datetime(2026, 11, 1, 12, tzinfo=timezone.utc)
    log.append([prediction(f"{n:032x}", day, "neutral") for n in range(2)])
    log.append([prediction(f"{n:032x}", day + timedelta(days=1), "neutral", "v0002") for n in range(2, 3)])
    for _ in range(100):  # the background thread writes; the request never waits for it
        parts = sorted(path.relative_to(tmp_path / "monitoring") for path in (tmp_path / "monitoring").rglob("part-*.parquet"))
        if len(parts) == 2:
            break
        threading.Event().wait(0.05)
    assert [str(part.parent) for part in parts] == ["predictions/day=2026-11-01/version=v0001",
                                                    "predictions/day=2026-11-02/version=v0002"]
    log.close()
    table = read_log(str(tmp_path / "monitoring"), PREDICTIONS, PREDICTION_SCHEMA)
    assert sorted(table["request_id"]) == [f"{n:032x}" for n in range(3)]
    assert dict(table["probabilities"][0])["neutral"] == 0.8 and table["text"].isna().all()


def test_the_log_flushes_on_its_interval(tmp_path):
    log = ParquetLog(str(tmp_path / "monitoring"), PREDICTIONS, PREDICTION_SCHEMA,
                     settings(tmp_path, flush_rows=1000, flush_seconds=0.1))
    log.append([prediction("a" * 32, END, "neutral")])
    for _ in range(100):
        if list((tmp_path / "monitoring").rglob("part-*.parquet")):
            break
        threading.Event().wait(0.05)
    assert len(list((tmp_path / "monitoring").rglob("part-*.parquet"))) == 1
    log.close()


def test_a_full_buffer_drops_the_oldest_and_a_failed_write_is_counted_not_raised(tmp_path, caplog):
    dropped, failed = [], []
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the log's folder should be")
    log = ParquetLog(str(blocked), PREDICTIONS, PREDICTION_SCHEMA, settings(tmp_path, flush_rows=100, max_buffer_rows=3,
                                                                            flush_seconds=3600),
                     on_failure=lambda rows, error: failed.append(rows), on_drop=dropped.append)
    log.append([prediction(f"{n:032x}", END, "neutral") for n in range(5)])
    assert dropped == [2] and [record["request_id"][-1] for record in log._buffer] == ["2", "3", "4"]
    log.close()  # writes the 3 kept rows, which fails: counted and logged, not raised
    assert failed == [3] and "3 records not written" in caplog.text
    log.append([prediction("f" * 32, END, "neutral")])  # after close: counted as dropped
    assert dropped == [2, 1]


# ----- the monitor job -----

@pytest.fixture
def logs(tmp_path):
    """Three daily windows of v0001 ending at END: day 1 predictions right (per feedback), day 2 the
    feedback flips every label and the texts are 5x longer, day 3 empty; v0002 on day 2 only."""
    root = tmp_path / "monitoring"
    rng = np.random.default_rng(0)
    reference_texts = ["w " * int(n) for n in rng.normal(40, 8, 2000).clip(2)]
    reference = tmp_path / "reference"
    reference.mkdir()
    pd.DataFrame({"text": reference_texts}).to_parquet(reference / "train.parquet")
    pd.DataFrame({"label": rng.choice(LABELS, 600, p=[0.6, 0.25, 0.15])}).to_parquet(reference / "test.parquet")
    predictions = ParquetLog(str(root), PREDICTIONS, PREDICTION_SCHEMA, settings(tmp_path))
    feedback_rows, bulk = [], []
    for day, scale in ((1, 1), (2, 5)):
        start = END - timedelta(days=4 - day)
        for n in range(200):
            label = rng.choice(LABELS, p=[0.6, 0.25, 0.15])
            request_id = f"{day:04x}{n:028x}"
            chars = int(len(reference_texts[n]) * scale)
            predictions.append([prediction(request_id, start + timedelta(minutes=n), label, chars=chars)])
            true = label if day == 1 else LABELS[(LABELS.index(label) + 1) % 3]
            (feedback_rows if n % 2 else bulk).append({"request_id": request_id, "index": 0, "label": true})
    predictions.append([prediction("e" * 32, END - timedelta(days=2, hours=1), "neutral", "v0002")])
    predictions.close()
    feedback_log = root / "feedback" / "day=2026-11-03"
    feedback_log.mkdir(parents=True)
    pd.DataFrame([{**row, "time": pd.Timestamp(END), "source": "test", "subject": "t"} for row in feedback_rows]).astype(
        {"index": "int32"}).to_parquet(feedback_log / "part-0.parquet")
    pd.DataFrame(bulk + [{"request_id": "0" * 32, "index": 0, "label": "neutral"}]).to_csv(tmp_path / "bulk.csv", index=False)
    return {"root": str(root), "output": str(tmp_path / "out"), "end": END.isoformat(), "windows": 3,
            "reference": {"train": str(reference / "train.parquet"), "test": str(reference / "test.parquet")},
            "feedback_tables": [{"path": str(tmp_path / "bulk.csv")}], "bootstrap_samples": 100}


def test_window_bounds_are_aligned_to_the_window_length():
    cfg = MonitorConfig(root="r", output="o", window_hours=6, windows=2)
    now = datetime(2026, 11, 4, 13, 5, tzinfo=timezone.utc)
    assert window_bounds(cfg, now) == [(datetime(2026, 11, 4, 6, tzinfo=timezone.utc), datetime(2026, 11, 4, 12, tzinfo=timezone.utc)),
                                       (datetime(2026, 11, 4, 12, tzinfo=timezone.utc), datetime(2026, 11, 4, 18, tzinfo=timezone.utc))]


def test_flipped_labels_and_longer_texts_raise_alerts_and_an_empty_window_is_reported(logs):
    summary = run_monitor(MonitorConfig(**logs))
    first, flipped, empty = summary["versions"]["v0001"]
    assert [window["predictions"] for window in (first, flipped, empty)] == [200, 200, 0]
    assert first["feedback"] == flipped["feedback"] == 200  # half from the feedback log, half from the CSV
    assert first["quality"]["macro_f1"] == 1.0 and flipped["quality"]["macro_f1"] == 0.0
    assert first["drift"]["length_psi"] < 0.1 and flipped["drift"]["length_psi"] > 1
    assert flipped["drift"]["length_ks"]["pvalue"] < 1e-10
    assert first["alerts"] == []
    assert any(alert.startswith("macro-F1 0.000") for alert in flipped["alerts"])
    assert any(alert.startswith("input length drift") for alert in flipped["alerts"])
    assert empty == {**empty, "feedback": 0, "quality": None, "drift": None, "alerts": [], "mean_confidence": None}
    assert summary["versions"]["v0002"][1]["drift"] is None  # one prediction: too few to test
    assert summary["feedback_unmatched"] == 1  # the CSV's unknown request id
    assert len(summary["alerts"]) == len(flipped["alerts"])


def test_the_monitor_command_writes_summary_report_and_gauges(logs, tmp_path):
    config = tmp_path / "monitor.yaml"
    config.write_text(yaml.safe_dump({**logs, "textfile": str(tmp_path / "collector" / "lakeforge_monitor.prom")}))
    (tmp_path / "collector").mkdir()
    summary = monitor_main(["--config", str(config)])
    out = Path(logs["output"])
    assert json.loads((out / "monitor.json").read_text())["alerts"] == summary["alerts"]
    html = (out / "monitor.html").read_text()
    assert "Version v0001" in html and "data:image/png;base64," in html and "macro-F1 0.000" in html
    gauges = {(sample.name, sample.labels.get("version"), sample.labels.get("label")): sample.value
              for family in text_string_to_metric_families((tmp_path / "collector" / "lakeforge_monitor.prom").read_text())
              for sample in family.samples}
    # The latest window with predictions: v0001's flipped day.
    assert gauges[("lakeforge_monitor_macro_f1", "v0001", None)] == 0.0
    assert gauges[("lakeforge_monitor_f1", "v0001", "negative")] == 0.0
    assert gauges[("lakeforge_monitor_length_psi", "v0001", None)] > 1
    assert gauges[("lakeforge_monitor_alerts", "v0001", None)] >= 2
    assert ("lakeforge_monitor_macro_f1", "v0002", None) not in gauges  # not measured: no gauge, not a 0
    assert gauges[("lakeforge_monitor_last_run_timestamp_seconds", None, None)] > 0


def test_a_monitor_of_an_empty_root_reports_no_versions(tmp_path):
    summary = run_monitor(MonitorConfig(root=str(tmp_path / "nothing"), output=str(tmp_path / "out")))
    assert summary["versions"] == {} and summary["alerts"] == [] and summary["feedback_rows"] == 0


def test_batch_inference_rows_are_logged_as_predictions_with_stable_ids(tmp_path):
    from jobs.inference.run import log_batch_predictions

    cfg = BatchInferConfig(model_dir="m", input={"parquet": "in.parquet", "text_column": "tweet"}, output="out",
                           monitoring={"enabled": True, "root": str(tmp_path / "monitoring"), "version": "v0003"})
    rows = pd.DataFrame({"tweet": ["late again", "fine"], "row_id": [7, 8], "prediction": ["negative", "neutral"],
                         "prediction_confidence": [0.9, 0.6], "prob_negative": [0.9, 0.3], "prob_neutral": [0.05, 0.6],
                         "prob_positive": [0.05, 0.1]})
    assert log_batch_predictions(rows, cfg, tmp_path / "out", tmp_path / "model", LABELS) == 2
    assert log_batch_predictions(rows[:1], cfg, tmp_path / "out", tmp_path / "model", LABELS) == 1
    logged = read_log(str(tmp_path / "monitoring"), PREDICTIONS, PREDICTION_SCHEMA)
    ids = logged["request_id"].tolist()
    assert len(ids) == 3 and len(set(ids)) == 2  # a row keeps its id across runs into the same output
    assert all(re.fullmatch(REQUEST_ID_PATTERN, request_id) for request_id in ids)
    assert set(logged["version"]) == {"v0003"} and set(logged["source"]) == {"batch"}
    assert logged["text"].isna().all() and sorted(logged["text_chars"]) == [4, 10, 10]


# ----- alert rules and dashboard -----

MONITORING_CONFIGS = REPO / "configs" / "monitoring"
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
DURATION = r"[0-9]+(ms|s|m|h|d|w|y)"


def metric_names(expr: str) -> set[str]:
    """The series an expression reads: identifiers that are not functions, keywords, label names in
    `{...}` or `by (...)`, durations in `[...]`, or numbers."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(by|without|on|ignoring)\s*\([^)]*\)|\"[^\"]*\"", " ", expr)
    return {name for name in re.findall(r"\b[A-Za-z_][A-Za-z0-9_:]*\b(?!\s*\()", bare) if name not in PROMQL_WORDS}


@pytest.fixture
def known_metrics(logs):
    """Every series Prometheus gets: the gateway's Ray metrics as Ray exports them (`ray_` prefix, a
    counter's `_total`, a histogram's `_bucket`/`_count`/`_sum`), and the monitor's textfile gauges."""
    from ray.util import metrics

    from serving.gateway import GatewayMetrics
    from jobs.monitoring.report import write_textfile

    names = set()
    for metric in vars(GatewayMetrics()).values():
        name = f"ray_{metric.info['name']}"
        if isinstance(metric, metrics.Counter):
            names.add(f"{name}_total")
        elif isinstance(metric, metrics.Histogram):
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(name)
    textfile = write_textfile(run_monitor(MonitorConfig(**logs)), Path(logs["output"]) / "gauges.prom")
    names.update(family.name for family in text_string_to_metric_families(textfile.read_text()))
    return names


def test_the_metric_name_extraction():
    assert metric_names('sum by (route) (rate(ray_x_total{status=~"5.."}[5m])) / sum(rate(ray_y_total[5m])) > 0.05') == {
        "ray_x_total", "ray_y_total"}
    assert metric_names("time() - a_seconds > 2 * 86400 and b < 0.01") == {"a_seconds", "b"}


def test_alert_rules_follow_prometheus_schema_and_read_existing_metrics(known_metrics):
    path = MONITORING_CONFIGS / "alerts.yaml"
    rules = yaml.safe_load(path.read_text())
    assert set(rules) == {"groups"} and rules["groups"]
    alerts = []
    for group in rules["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]) and re.fullmatch(DURATION, rule["for"])
            assert rule["labels"]["severity"] in {"page", "warning", "info"}
            assert {"summary", "description"} <= set(rule["annotations"])
            assert all(isinstance(value, str) for value in (*rule["labels"].values(), *rule["annotations"].values()))
            unknown = metric_names(rule["expr"]) - known_metrics
            assert not unknown, f"{rule['alert']} reads metrics nothing exports: {unknown}"
            alerts.append(rule["alert"])
    assert len(alerts) == len(set(alerts))
    assert any("lakeforge_monitor_" in rule["expr"] for group in rules["groups"] for rule in group["rules"])
    promtool = shutil.which("promtool")
    if promtool:  # Prometheus's own check, where it is installed
        subprocess.run([promtool, "check", "rules", str(path)], check=True)


def test_the_dashboard_is_valid_json_with_panels_reading_existing_metrics(known_metrics):
    dashboard = json.loads((MONITORING_CONFIGS / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    read = set()
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["type"] and panel["targets"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names and not names - known_metrics, f"{panel['title']}: {names - known_metrics}"
            read |= names
    # Every gateway metric of the monitoring logs, and every monitor gauge, is on the dashboard.
    assert {name for name in known_metrics if "monitor" in name and not name.endswith(("_count", "_sum"))} <= read
