"""Online metrics and drift of served models, from the prediction and feedback logs. Logic: jobs/monitoring/.

    python -m jobs.monitor --config configs/monitoring/monitor.yaml [key=value ...]

Reads `<root>/predictions` and `<root>/feedback` (and any bulk feedback tables), measures each time
window of each model version, and writes monitor.json, monitor.html and lakeforge_monitor.prom to
`output`. Needs no Ray cluster: the logs are a few columns per prediction. Exit status 0 with or
without alerts (they are in the summary, the report and the gauges; alert on the gauges).

With a `retrain` section it then decides whether the current version needs retraining (drift, an
online macro-F1 drop, new labelled rows; jobs/lifecycle/trigger.py), submits `jobs.retrain` as a Ray
job when it does, and audits the decision; a submission that failed exits 1 after the reports are written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cluster.config import load_config_or_exit
from jobs.config import MonitorConfig
from jobs.monitoring.report import write_report
from jobs.lifecycle.trigger import run_trigger
from jobs.monitoring.run import run_monitor


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config_or_exit(MonitorConfig, argv)
    summary = run_monitor(cfg)
    if cfg.retrain is not None:
        summary["retrain"] = run_trigger(cfg, summary)
    paths = write_report(summary, Path(cfg.output).expanduser())
    if cfg.textfile:
        # A copy beside the others, then a rename: the collector never reads a half-written file.
        target = Path(cfg.textfile).expanduser()
        shutil.copyfile(paths["textfile"], target.with_name(f".{target.name}.tmp"))
        target.with_name(f".{target.name}.tmp").replace(target)
    print(f"[monitor] {json.dumps({'alerts': summary['alerts'], **{k: str(v) for k, v in paths.items()}})}")
    if "retrain" in summary:
        print(f"[monitor] retraining: {json.dumps(summary['retrain'])}")
        if "submission_error" in summary["retrain"]:
            raise SystemExit(f"retraining decided but not submitted: {summary['retrain']['submission_error']}")
    return summary


if __name__ == "__main__":
    main()
