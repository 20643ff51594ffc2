"""HTML report of a model version: evaluation (metrics with intervals, confusion matrices,
reliability, slices, worst errors, gate decision) and explanations, in one self-contained page.

Plots are matplotlib figures embedded as base64 PNGs, so the page can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path


def png_tag(fig, alt: str) -> str:
    """A matplotlib figure as an inline <img>; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child, td.text { text-align: left; }
.pass { background: #e3f5e1; border: 1px solid #7bc47f; padding: 0.6em; }
.fail { background: #fbe3e1; border: 1px solid #d77; padding: 0.6em; }
.muted { color: #777; }
"""


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _systems(evaluation: dict) -> list[str]:
    from jobs.evaluate import SYSTEMS

    return [name for name in SYSTEMS if name in evaluation]


def _generation_cell(generation: dict | None) -> str:
    if not generation or not generation["examples"]:
        return "-"
    return f"{generation['exact_match']:.3f} / {generation['label_word_rate']:.3f} ({generation['examples']})"


def _metrics_table(evaluation: dict) -> str:
    intervals = evaluation["bootstrap"]["systems"]
    rows = []
    for name in _systems(evaluation):
        m = evaluation[name]
        acc, f1 = intervals[name]["accuracy"], intervals[name]["macro_f1"]
        rows.append(
            f"<tr><td>{name}</td><td>{m['accuracy']:.3f} <span class=muted>[{acc[0]:.3f}, {acc[1]:.3f}]</span></td>"
            f"<td>{m['macro']['f1']:.3f} <span class=muted>[{f1[0]:.3f}, {f1[1]:.3f}]</span></td>"
            f"<td>{m['weighted']['f1']:.3f}</td><td>{m['calibration']['ece']:.3f}</td>"
            f"<td>{_fmt(m.get('answer_perplexity'), 2)}</td><td>{_generation_cell(m.get('generation'))}</td></tr>")
    level = evaluation["bootstrap"]["level"]
    differences = "".join(
        f"<tr><td>{html.escape(pair)}</td><td>[{d['accuracy'][0]:+.3f}, {d['accuracy'][1]:+.3f}]</td>"
        f"<td>[{d['macro_f1'][0]:+.3f}, {d['macro_f1'][1]:+.3f}]</td></tr>"
        for pair, d in evaluation["bootstrap"]["differences"].items())
    return (
        f"<h2>Held-out test split: {evaluation['test_examples']} examples</h2>"
        f"<table><tr><th>system</th><th>accuracy [{level:.0%} CI]</th><th>macro-F1 [{level:.0%} CI]</th>"
        f"<th>weighted F1</th><th>ECE</th><th>answer perplexity</th><th>free answer: exact match / is a label "
        f"(examples)</th></tr>{''.join(rows)}</table>"
        f"<h3>Paired differences ({level:.0%} bootstrap intervals, same resampled rows)</h3>"
        f"<table><tr><th>difference</th><th>accuracy</th><th>macro-F1</th></tr>{differences}</table>")


def _per_class_table(evaluation: dict) -> str:
    systems = _systems(evaluation)
    header = "".join(f"<th>{name}<br>P / R / F1</th>" for name in systems)
    rows = []
    for label in evaluation["labels"]:
        cells = "".join(
            "<td>{precision:.2f} / {recall:.2f} / {f1:.2f}</td>".format(**evaluation[name]["per_class"][label])
            for name in systems)
        support = evaluation[systems[0]]["per_class"][label]["support"]
        rows.append(f"<tr><td>{html.escape(label)} <span class=muted>({support})</span></td>{cells}</tr>")
    return f"<h3>Per class</h3><table><tr><th>label (support)</th>{header}</tr>{''.join(rows)}</table>"


def _confusion_figure(evaluation: dict) -> str:
    import matplotlib.pyplot as plt

    systems, labels = _systems(evaluation), evaluation["labels"]
    fig, axes = plt.subplots(1, len(systems), figsize=(3.4 * len(systems), 3.2), squeeze=False)
    for axis, name in zip(axes[0], systems):
        matrix = evaluation[name]["confusion_matrix"]["matrix"]
        axis.imshow(matrix, cmap="Blues")
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                axis.text(j, i, str(count), ha="center", va="center", fontsize=9)
        axis.set_xticks(range(len(labels)), labels, rotation=30)
        axis.set_yticks(range(len(labels)), labels)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("predicted")
    axes[0][0].set_ylabel("true")
    return "<h3>Confusion matrices</h3>" + png_tag(fig, "confusion matrices")


def _reliability_figure(evaluation: dict) -> str:
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(4.5, 4))
    axis.plot([0, 1], [0, 1], color="#999", linestyle="--", label="perfect calibration")
    for name in _systems(evaluation):
        table = evaluation[name]["calibration"]["reliability"]
        axis.plot([b["mean_confidence"] for b in table], [b["accuracy"] for b in table], marker="o",
                  label=f"{name} (ECE {evaluation[name]['calibration']['ece']:.3f})")
    axis.set_xlabel("confidence (bin mean)")
    axis.set_ylabel("accuracy")
    axis.legend(fontsize=7)
    return "<h3>Reliability</h3>" + png_tag(fig, "reliability diagram")


def _slices_table(evaluation: dict) -> str:
    systems = _systems(evaluation)
    header = "".join(f"<th>{name}<br>acc / macro-F1</th>" for name in systems)
    rows = "".join(
        f"<tr><td>{html.escape(s['slice'])}</td><td>{s['examples']}</td>"
        + "".join(f"<td>{_fmt(s['systems'][n]['accuracy'])} / {_fmt(s['systems'][n]['macro_f1'])}</td>" for n in systems)
        + "</tr>" for s in evaluation["slices"])
    return f"<h2>Slices</h2><table><tr><th>slice</th><th>examples</th>{header}</tr>{rows}</table>"


def _errors_section(errors: dict) -> str:
    def table(rows: list[dict]) -> str:
        body = "".join(
            f"<tr><td class=text>{html.escape(r['text'])}</td><td>{html.escape(r['label'])}</td>"
            f"<td>{html.escape(r['predicted'])}</td><td>{r['confidence']:.3f}</td></tr>" for r in rows)
        return f"<table><tr><th>text</th><th>true</th><th>predicted</th><th>confidence</th></tr>{body}</table>"

    per_class = "".join(f"<h4>true label: {html.escape(label)}</h4>{table(rows)}" for label, rows in errors["per_class"].items() if rows)
    return (f"<h2>Error analysis (fine_tuned): {errors['mistakes']} mistakes</h2>"
            f"<h3>Most confident mistakes</h3>{table(errors['worst'])}<h3>Per class</h3>{per_class}")


def write_report(path: Path, evaluation: dict, explanations: dict | None = None, version: dict | None = None) -> Path:
    """Render one model version's evaluation (and explanations) as a self-contained HTML page."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    title = f"lakeforge model report: {html.escape(evaluation['models'].get('fine_tuned', 'evaluation'))}"
    parts = [f"<h1>{title}</h1>"]
    if version:
        parts.append(f"<p>Version <b>{html.escape(version['version'])}</b> of <b>{html.escape(version['name'])}</b>, "
                     f"created {html.escape(version['created'])}</p>")
    if "gate" in evaluation:
        gate = evaluation["gate"]
        verdict = "Deployable" if gate["deployable"] else "Not deployable"
        parts.append(f"<p class={'pass' if gate['deployable'] else 'fail'}><b>Promotion gate: {verdict}.</b> "
                     f"{html.escape(gate['reason'])}</p>")
    parts += [_metrics_table(evaluation), _per_class_table(evaluation), _confusion_figure(evaluation),
              _reliability_figure(evaluation), _slices_table(evaluation)]
    if "errors" in evaluation:
        parts.append(_errors_section(evaluation["errors"]))
    if explanations is not None:
        from jobs.explain import explanations_html

        parts.append(explanations_html(explanations))
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
                    f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    return path
