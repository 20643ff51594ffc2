"""The retraining trigger, run by `jobs.monitor` after it measured the windows: whether the served
(current) version needs retraining, why, and the Ray job that does it.

`retrain_decision` is a pure function of the monitor's summary, the version's registry entry, the
count of new labelled rows and the time of the previous submission. It retrains when any enabled
signal crosses its threshold: input drift or a label mix shift in the version's latest window tested
for drift; the upper bootstrap bound of the online macro-F1 (latest window with enough feedback)
more than `max_f1_drop` below the version's test macro-F1; `min_new_rows` rows labelled since the
newest registered version. A signal that cannot be measured (no such window, no test figure) is
listed under `missing`, and crosses nothing. A submission younger than `min_hours_between` holds
the next one back, so a lasting condition does not start a retraining per monitor run.

`run_trigger` gathers the inputs, submits `python -m jobs.retrain` with `JobSubmissionClient`
when the decision says so, and appends the decision (and the submission id, or why it failed) to
the audit log."""

from __future__ import annotations

import json
import os
import shlex
import time
from datetime import datetime, timedelta
from pathlib import Path

from cluster.audit import AuditLog
from cluster.config import load_config
from cluster.monitoring import utc_now
from cluster.ray_cluster import WORKING_DIR_EXCLUDES
from cluster.registry import ModelRegistry
from jobs.config import MonitorConfig, MonitorThresholds, RetrainTrigger, RunConfig
from jobs.lifecycle.rows import labelled_rows

STATE_FILE = "retrain_trigger.json"  # in the monitor's output: the last submission, for min_hours_between
REGISTRY_TIME = "%Y-%m-%dT%H:%M:%S%z"  # how the registry stamps `created`


def retrain_decision(summary: dict, version: dict | None, new_rows: int | None, trigger: RetrainTrigger,
                     thresholds: MonitorThresholds, last_submitted: datetime | None, now: datetime) -> dict:
    """{"retrain", "version", "reasons", "missing", "held_back"}: retrain when a reason was found and
    no recent submission holds it back (module doc)."""
    decision = {"retrain": False, "version": None, "reasons": [], "missing": [], "held_back": None, "new_rows": new_rows}
    if version is None:
        decision["missing"].append("no current version in the registry: the pipeline registers the first one")
        return decision
    name = decision["version"] = version["version"]
    windows = summary["versions"].get(name) or []
    reasons, missing = decision["reasons"], decision["missing"]
    if trigger.drift:
        window = next((w for w in reversed(windows) if w["drift"]), None)
        if window is None:
            missing.append(f"drift: no window of {name} with {thresholds.min_predictions} predictions tested against a reference")
        else:
            drift, start = window["drift"], window["start"]
            if drift["length_psi"] > thresholds.psi and drift["length_ks"]["pvalue"] < thresholds.ks_pvalue:
                reasons.append(f"input length drift in the window from {start}: PSI {drift['length_psi']:.3f} > "
                               f"{thresholds.psi}, KS p={drift['length_ks']['pvalue']:.2g} < {thresholds.ks_pvalue}")
            if drift["label_mix"]["pvalue"] < thresholds.label_mix_pvalue:
                reasons.append(f"predicted label mix shift in the window from {start}: chi-square "
                               f"p={drift['label_mix']['pvalue']:.2g} < {thresholds.label_mix_pvalue}")
    if trigger.max_f1_drop is not None:
        test_f1 = (version.get("metrics") or {}).get("macro_f1")
        window = next((w for w in reversed(windows) if w["quality"] and w["quality"]["rows"] >= thresholds.min_feedback), None)
        if test_f1 is None:
            missing.append(f"online macro-F1: {name} has no test macro-F1 in the registry to compare with")
        elif window is None:
            missing.append(f"online macro-F1: no window of {name} with {thresholds.min_feedback} labelled predictions")
        elif window["quality"]["macro_f1_interval"][1] < test_f1 - trigger.max_f1_drop:
            quality = window["quality"]
            reasons.append(f"online macro-F1 {quality['macro_f1']:.3f} (upper bound {quality['macro_f1_interval'][1]:.3f}, "
                           f"{quality['rows']} labelled predictions, window from {window['start']}) more than "
                           f"{trigger.max_f1_drop} below the test macro-F1 {test_f1:.3f}")
    if trigger.min_new_rows is not None:
        if new_rows is None:
            missing.append("new labelled rows: not counted")
        elif new_rows >= trigger.min_new_rows:
            reasons.append(f"{new_rows} new labelled rows with their text (threshold {trigger.min_new_rows})")
    if reasons and last_submitted is not None and now - last_submitted < timedelta(hours=trigger.min_hours_between):
        decision["held_back"] = (f"a retraining was submitted at {last_submitted.isoformat()}, less than "
                                 f"{trigger.min_hours_between:g} h ago")
    decision["retrain"] = bool(reasons) and decision["held_back"] is None
    return decision


def retrain_entrypoint(cfg: MonitorConfig) -> str:
    """The job's command: jobs.retrain on the run config, reading the feedback this monitor read."""
    trigger = cfg.retrain
    tables = json.dumps([table.model_dump() for table in cfg.feedback_tables])  # JSON is YAML: one override
    return shlex.join(["python", "-m", "jobs.retrain", "--config", trigger.run_config, *trigger.overrides,
                       f"retrain.monitoring_root={cfg.root}", f"retrain.feedback_tables={tables}"])


def submit_retrain(cfg: MonitorConfig, model: str, client_factory=None) -> str:
    """Submit the retraining as a Ray job; returns its submission id."""
    trigger = cfg.retrain
    address = trigger.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("retrain.address is not set and neither is RAY_ADDRESS: no cluster to submit the retraining to")
    if client_factory is None:
        from ray.job_submission import JobSubmissionClient as client_factory
    runtime_env = {"working_dir": trigger.working_dir, "excludes": WORKING_DIR_EXCLUDES} if trigger.working_dir else None
    # The SDK sends ~/.ray/auth_token to a token-auth cluster only with RAY_AUTH_MODE=token; set for the
    # submission alone: left in this process's environment it would change how a later ray.init starts.
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        return client_factory(address).submit_job(
            entrypoint=retrain_entrypoint(cfg), runtime_env=runtime_env,
            submission_id=f"lakeforge-retrain-{model}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    finally:
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)


def new_labelled_rows(cfg: MonitorConfig, labels: list[str], since: datetime | None) -> int:
    """Predictions with a logged text and a known label, labelled after `since` (all when None)."""
    rows = labelled_rows(cfg.root, cfg.feedback_tables, labels).rows
    rows = rows[rows["label"].isin(labels)]
    return int(len(rows) if since is None else (rows["labelled_time"] > since).sum())


def run_trigger(cfg: MonitorConfig, summary: dict, now: datetime | None = None, client_factory=None) -> dict:
    """Decide (`retrain_decision`), submit when it says so (unless `dry_run`), audit the decision;
    returns it, with `submission_id` or `submission_error`."""
    trigger, now = cfg.retrain, now or utc_now()
    run = load_config(RunConfig, trigger.run_config, trigger.overrides)
    registry = ModelRegistry(run.storage_root, run.name)
    versions = registry.versions()
    since = datetime.strptime(versions[-1]["created"], REGISTRY_TIME) if versions else None
    new_rows = new_labelled_rows(cfg, run.data.labels, since) if trigger.min_new_rows is not None else None
    state_path = Path(cfg.output).expanduser() / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    last = datetime.fromisoformat(state["submitted"]) if state.get("submitted") else None
    decision = {"model": run.name, **retrain_decision(summary, registry.current(), new_rows, trigger, cfg.thresholds, last, now),
                "new_rows_since": since.isoformat() if since else None, "dry_run": trigger.dry_run}
    if decision["retrain"] and not trigger.dry_run:
        try:
            decision["submission_id"] = submit_retrain(cfg, run.name, client_factory)
            decision["entrypoint"] = retrain_entrypoint(cfg)
            state_path.parent.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps({"submitted": now.isoformat(), "submission_id": decision["submission_id"]}))
        except Exception as error:  # noqa: BLE001 - audited, then reported by the monitor's exit status
            decision["submission_error"] = f"{type(error).__name__}: {error}"
    AuditLog.from_settings(trigger.audit).append({"event": "retrain_decision", "actor": "jobs.monitor", **decision})
    return decision
