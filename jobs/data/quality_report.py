"""HTML data quality report: stage counts, per-source accounting, quarantine reasons with examples,
duplicates, token lengths and labels, in one self-contained page (plots inlined as PNGs)."""

from __future__ import annotations

import html
from pathlib import Path

from jobs.html import STYLE, png_tag


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td class=text>{html.escape(str(cell))}</td>" if isinstance(cell, str) and len(cell) > 20
                                    else f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _bar(labels: list[str], values: list[float], title: str, xlabel: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar([str(label) for label in labels], values, color="#4878a8")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="x", labelrotation=30)
    return png_tag(fig, title)


def _per_source_plot(per_source: dict) -> str:
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
    sections = [f"<h1>Data quality report</h1><p class=muted>{counts['rows_read']} rows read, {counts['kept']} kept; "
                f"built in {report['wall_s']} s.</p>"]

    if report.get("warnings"):
        sections.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"]) + "</ul>")

    stages = report["stages"]
    sections.append("<h2>Counts at every stage</h2>" + _table(["stage", "rows"], [[k, v] for k, v in stages.items()])
                    + _bar(list(stages), list(stages.values()), "Rows after each stage"))

    rows = [[name, e.get("physical_records", ""), e["rows_read"], e["kept"], sum(e["quarantined"].values()), sum(e["filtered"].values()),
             e["exact_duplicates"], e["near_duplicates"]] for name, e in report["per_source"].items()]
    sections.append("<h2>Per source</h2><p>rows read = kept + quarantined + filtered + duplicates, checked per source; "
                    "rows read = physical records (lines, Parquet rows, query count), checked unless a sample was asked for.</p>"
                    + _table(["source", "physical records", "read", "kept", "quarantined", "filtered", "exact dup.", "near dup."], rows)
                    + _per_source_plot(report["per_source"]))

    reasons = {**counts["quarantined"], **counts["filtered"]}
    example_rows = [[reason, reasons.get(reason, 0), f"{ex['source']}:{ex['source_row']}", ex["raw"][:160]]
                    for reason, examples in report["quarantine_examples"].items() for ex in examples]
    sections.append("<h2>Quarantine and filters</h2>"
                    + (_table(["reason", "rows"], [[r, n] for r, n in reasons.items()]) + _bar(list(reasons), list(reasons.values()), "Rows set aside, by reason")
                       + "<h3>Examples</h3>" + _table(["reason", "rows", "source:row", "raw value"], example_rows)
                       if reasons else "<p>No row was set aside.</p>"))

    near = report["near_duplicate_clusters"]
    sections.append(
        f"<h2>Duplicates</h2><p>Duplicate rate {report['duplicate_rate']:.2%}: {counts['exact_duplicates']} exact duplicates "
        f"({counts['duplicate_groups_with_label_conflict']} groups with conflicting labels), {counts['near_duplicates']} "
        f"near-duplicates in {near['clusters']} clusters.</p><h3>Largest exact-duplicate groups</h3>"
        + _table(["text", "label", "copies", "label conflict"],
                 [[e["text"], e["label"], e["group_size"], e["label_conflict"]] for e in report["exact_duplicate_examples"]])
        + "<h3>Near-duplicate clusters (kept / removed)</h3>"
        + _table(["size", "kept", "removed (up to 3)"], [[c["size"], c["kept"], " | ".join(c["removed"])] for c in near["examples"]]))

    sections.append("<h2>Cleaning</h2>" + _table(["measure", "rows"], [["encoding repaired (mojibake)", counts["encoding_repaired"]],
                                                                     *[[f"PII redacted: {k}", v] for k, v in counts.get("pii", {}).items()]])
                    + (f"<p>PII rate: {report['pii_rate']:.2%} of valid rows had at least one redaction.</p>" if "pii_rate" in report else "")
                    + (_table(["source:row", "redacted text"], [[f"{e['source']}:{e['source_row']}", e["text"]] for e in report["pii_examples"]])
                       if report.get("pii_examples") else ""))

    histogram = report["token_length_histogram"]
    sections.append("<h2>Token lengths of kept examples</h2>"
                    + _bar(list(histogram["bins"]), list(histogram["bins"].values()), "Templated example length",
                           f"tokens (bins of {histogram['bin_width']})"))

    label_rows = [[split, *[labels.get(l, 0) for l in sorted(report["labels"]["train"])]] for split, labels in report["labels"].items()]
    if report["labels"]["train"]:
        sections.append(f"<h2>Labels</h2><p>Imbalance ratio (largest / smallest train class): {report['imbalance_ratio']:.2f}</p>"
                        + _table(["split", *sorted(report["labels"]["train"])], label_rows)
                        + _bar(sorted(report["labels"]["train"]), [report["labels"]["train"][l] for l in sorted(report["labels"]["train"])],
                               "Train label distribution"))
    path.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>Data quality report</title>"
                    f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    return path
