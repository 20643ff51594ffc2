"""HTML data quality report: stage counts, per-source accounting, quarantine reasons with examples,
duplicates, token lengths and labels, in one self-contained page (plots inlined as PNGs).

The rows and figures are computed here; jobs/templates/quality_report.html lays them out, with
autoescaping (source names, reasons, raw values and texts come from the data)."""

from __future__ import annotations

from pathlib import Path

from markupsafe import Markup

from jobs.html import png_tag, render


def _bar(labels: list[str], values: list[float], title: str, xlabel: str = "") -> Markup:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar([str(label) for label in labels], values, color="#4878a8")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="x", labelrotation=30)
    return png_tag(fig, title)


def _per_source_plot(per_source: dict) -> Markup:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_source)
    parts = {
        "kept": [e["kept"] for e in per_source.values()],
        "quarantined": [sum(e["quarantined"].values()) for e in per_source.values()],
        "filtered": [sum(e["filtered"].values()) for e in per_source.values()],
        "duplicates": [e["exact_duplicates"] + e["near_duplicates"] for e in per_source.values()],
    }
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(names)))
    left = [0] * len(names)
    for part, values in parts.items():
        ax.barh(names, values, left=left, label=part)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("rows")
    ax.set_title("Where each source's rows went")
    ax.legend(loc="lower right", fontsize=8)
    return png_tag(fig, "rows per source")


def write_quality_report(report: dict, path: Path) -> Path:
    counts = report["counts"]
    stages = report["stages"]
    reasons = {**counts["quarantined"], **counts["filtered"]}
    near = report["near_duplicate_clusters"]
    histogram = report["token_length_histogram"]
    train_labels = sorted(report["labels"]["train"])
    page = render(
        "quality_report.html",
        title="Data quality report",
        counts=counts,
        wall_s=report["wall_s"],
        warnings=report.get("warnings") or [],
        examples_left_out=report.get("examples_left_out"),
        stages=[[name, rows] for name, rows in stages.items()],
        stages_figure=_bar(list(stages), list(stages.values()), "Rows after each stage"),
        per_source=[[name, e.get("physical_records", ""), e["rows_read"], e["kept"], sum(e["quarantined"].values()),
                     sum(e["filtered"].values()), e["exact_duplicates"], e["near_duplicates"]]
                    for name, e in report["per_source"].items()],
        per_source_figure=_per_source_plot(report["per_source"]),
        reasons=[[reason, rows] for reason, rows in reasons.items()],
        reasons_figure=_bar(list(reasons), list(reasons.values()), "Rows set aside, by reason") if reasons else None,
        reason_examples=[[reason, reasons.get(reason, 0), f"{ex['source']}:{ex['source_row']}", ex["raw"][:160]]
                         for reason, examples in report["quarantine_examples"].items() for ex in examples],
        duplicate_rate=report["duplicate_rate"],
        near_duplicate_clusters=near["clusters"],
        exact_duplicates=[[e["text"], e["label"], e["group_size"], e["label_conflict"]] for e in report["exact_duplicate_examples"]],
        near_duplicates=[[c["size"], c["kept"], " | ".join(c["removed"])] for c in near["examples"]],
        cleaning=[["encoding repaired (mojibake)", counts["encoding_repaired"]],
                  *[[f"PII redacted: {kind}", rows] for kind, rows in counts.get("pii", {}).items()]],
        pii_rate=report.get("pii_rate"),
        pii_examples=[[f"{e['source']}:{e['source_row']}", e["text"]] for e in report.get("pii_examples") or []],
        token_length_figure=_bar(list(histogram["bins"]), list(histogram["bins"].values()), "Templated example length",
                                 f"tokens (bins of {histogram['bin_width']})"),
        labels=train_labels,
        imbalance_ratio=report["imbalance_ratio"] if train_labels else None,
        label_rows=[[split, *[labels.get(label, 0) for label in train_labels]] for split, labels in report["labels"].items()],
        labels_figure=_bar(train_labels, [report["labels"]["train"][label] for label in train_labels], "Train label distribution")
        if train_labels else None,
    )
    path.write_text(page)
    return path
