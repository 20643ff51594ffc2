"""What the monitor writes: the JSON summary, an HTML report with plots, and the latest window of
each version as Prometheus gauges in the node exporter's textfile format.

Nothing is pushed: a node exporter's textfile collector (or any scraper of the file) picks the
gauges up; `lakeforge_monitor_last_run_timestamp_seconds` lets an alert notice a monitor that stopped."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from jobs.html import png_tag, render

TEXTFILE = "lakeforge_monitor.prom"
# Gauge name -> (help, the latest window's value, or None where it was not measured).
GAUGES = {
    "lakeforge_monitor_predictions": ("Predictions in the version's latest window.", lambda w: w["predictions"]),
    "lakeforge_monitor_feedback": ("Predictions of the latest window with a right label.", lambda w: w["feedback"]),
    "lakeforge_monitor_accuracy": ("Accuracy on the latest window's labelled predictions.",
                                   lambda w: w["quality"] and w["quality"]["accuracy"]),
    "lakeforge_monitor_macro_f1": ("Macro-F1 on the latest window's labelled predictions.",
                                   lambda w: w["quality"] and w["quality"]["macro_f1"]),
    "lakeforge_monitor_macro_f1_lower": ("Lower end of the macro-F1's 95% bootstrap interval.",
                                         lambda w: w["quality"] and w["quality"]["macro_f1_interval"][0]),
    "lakeforge_monitor_length_psi": ("PSI of input text length against the training split.",
                                     lambda w: w["drift"] and w["drift"]["length_psi"]),
    "lakeforge_monitor_length_ks_pvalue": ("KS p-value of input text length against the training split.",
                                           lambda w: w["drift"] and w["drift"]["length_ks"]["pvalue"]),
    "lakeforge_monitor_label_mix_pvalue": ("Chi-square p-value of the predicted label mix against the test split's.",
                                           lambda w: w["drift"] and w["drift"]["label_mix"]["pvalue"]),
    "lakeforge_monitor_alerts": ("Alerts the monitor raised on the latest window.", lambda w: len(w["alerts"])),
}
LAST_RUN = "lakeforge_monitor_last_run_timestamp_seconds"


def write_textfile(summary: dict, path: Path) -> Path:
    """The latest window's figures per version as gauges (`version` label), written atomically
    (prometheus_client writes a temporary file and renames it)."""
    registry = CollectorRegistry()
    gauges = {name: Gauge(name, text, ["version"], registry=registry) for name, (text, _) in GAUGES.items()}
    f1 = Gauge("lakeforge_monitor_f1", "F1 of one label on the latest window's labelled predictions.",
               ["version", "label"], registry=registry)
    for version, windows in summary["versions"].items():
        # The version's last window that saw predictions: its current state.
        window = next((w for w in reversed(windows) if w["predictions"]), windows[-1])
        for name, (_, value) in GAUGES.items():
            measured = value(window)
            if measured is not None:
                gauges[name].labels(version=version).set(measured)
        for label, scores in ((window["quality"] or {}).get("per_class") or {}).items():
            f1.labels(version=version, label=label).set(scores["f1"])
    Gauge(LAST_RUN, "When the monitor last finished (Unix time).", registry=registry).set_to_current_time()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
    return path


def _figures(summary: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    starts = [start[:16] for start, _ in summary["windows"]]
    fig, (quality, drift) = plt.subplots(1, 2, figsize=(11, 3.4))
    for version, windows in summary["versions"].items():
        points = [(k, w["quality"]) for k, w in enumerate(windows) if w["quality"]]
        if points:
            xs = [k for k, _ in points]
            quality.errorbar(xs, [q["macro_f1"] for _, q in points], label=version, marker="o", capsize=3,
                             yerr=[[q["macro_f1"] - q["macro_f1_interval"][0] for _, q in points],
                                   [q["macro_f1_interval"][1] - q["macro_f1"] for _, q in points]])
        drifted = [(k, w["drift"]["length_psi"]) for k, w in enumerate(windows) if w["drift"]]
        if drifted:
            drift.plot([k for k, _ in drifted], [value for _, value in drifted], marker="o", label=version)
    for axes, title in ((quality, "macro-F1 on labelled predictions (95% interval)"), (drift, "input length PSI")):
        axes.set_title(title)
        axes.set_xticks(range(len(starts)), starts, rotation=30, ha="right", fontsize=7)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    drift.axhline(summary["thresholds"]["psi"], color="red", linestyle="--", linewidth=1)
    figures["trend"] = png_tag(fig, "macro-F1 and input length PSI per window")
    return figures


def write_report(summary: dict, output: Path) -> dict[str, Path]:
    """monitor.json, monitor.html and the textfile in `output`."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"summary": output / "monitor.json", "report": output / "monitor.html", "textfile": output / TEXTFILE}
    paths["summary"].write_text(json.dumps(summary, indent=2))
    rows = {version: [[w["start"][:16], w["predictions"], w["feedback"],
                       "-" if not w["quality"] else f"{w['quality']['accuracy']:.3f}",
                       "-" if not w["quality"] else "{:.3f} [{:.3f}, {:.3f}]".format(
                           w["quality"]["macro_f1"], *w["quality"]["macro_f1_interval"]),
                       "-" if not w["drift"] else f"{w['drift']['length_psi']:.3f}",
                       "-" if not w["drift"] else f"{w['drift']['length_ks']['pvalue']:.2g}",
                       "-" if not w["drift"] else f"{w['drift']['label_mix']['pvalue']:.2g}",
                       "; ".join(w["alerts"])] for w in windows]
            for version, windows in summary["versions"].items()}
    paths["report"].write_text(render("monitor_report.html", title="lakeforge monitoring", summary=summary,
                                      rows=rows, **_figures(summary)))
    write_textfile(summary, paths["textfile"])
    return paths
