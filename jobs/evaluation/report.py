"""HTML report of a model version: evaluation (metrics with intervals, confusion matrices,
reliability, slices, worst errors, gate decision) and explanations, in one self-contained page.

Plots are matplotlib figures embedded as base64 PNGs, so the page can be mailed or archived as is.
"""

from __future__ import annotations

import html
from pathlib import Path

from jobs.html import STYLE, png_tag

# Report order: the candidate, what it must beat, where it started, what a classical model does.
SYSTEMS = ("fine_tuned", "previous_version", "base_zero_shot", "baseline_tfidf_logreg")


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _systems(evaluation: dict) -> list[str]:
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


def _learning_curve_figure(curve: list[dict], evaluation: dict) -> str:
    """Validation macro-F1 against training examples seen, beside the test macro-F1 of the systems
    that need no training (their lines are the bar the curve has to cross)."""
    import matplotlib.pyplot as plt

    points = [point for point in curve if point.get("val_macro_f1") is not None]
    if not points:
        return ""
    fig, axis = plt.subplots(figsize=(6, 3.6))
    axis.plot([p["examples_seen"] for p in points], [p["val_macro_f1"] for p in points], marker="o",
              label="fine-tuning (validation split)")
    for name, style in (("base_zero_shot", ":"), ("baseline_tfidf_logreg", "--")):
        if name in evaluation:
            axis.axhline(evaluation[name]["macro"]["f1"], linestyle=style, color="#555", label=f"{name} (test split)")
    axis.set_xlabel("training examples seen")
    axis.set_ylabel("macro-F1")
    axis.legend(fontsize=7)
    rows = "".join(f"<tr><td>{p['step']}</td><td>{p['examples_seen']:,}</td><td>{p['train_tokens']:,.0f}</td>"
                   f"<td>{p['val_loss']:.4f}</td><td>{_fmt(p['val_macro_f1'])}</td></tr>" for p in curve)
    return ("<h2>Learning curve</h2>" + png_tag(fig, "learning curve")
            + "<table><tr><th>step</th><th>examples seen</th><th>tokens seen</th><th>validation loss</th>"
            f"<th>validation macro-F1</th></tr>{rows}</table>")


def write_report(path: Path, evaluation: dict, explanations: dict | None = None, version: dict | None = None,
                 learning_curve: list[dict] | None = None) -> Path:
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
    if learning_curve:
        parts.append(_learning_curve_figure(learning_curve, evaluation))
    if "errors" in evaluation:
        parts.append(_errors_section(evaluation["errors"]))
    if explanations is not None:
        parts.append(explanations_html(explanations))
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
                    f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    return path


def _highlight(words: list[str], values: list[float]) -> str:
    """Words on a green (towards) / red (against) background scaled to the strongest |value|."""
    scale = max((abs(value) for value in values), default=0.0) or 1.0
    spans = []
    for word, value in zip(words, values):
        rgb = "0, 150, 0" if value >= 0 else "210, 0, 0"
        spans.append(f'<span style="background: rgba({rgb}, {0.7 * abs(value) / scale:.2f})" '
                     f'title="{value:+.4f}">{html.escape(word)}</span>')
    return " ".join(spans)


def _importance_figure(importance: dict[str, list[dict]], title: str, min_count: int):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(importance), figsize=(4 * len(importance), 3.2), squeeze=False)
    for ax, (label, words) in zip(axes[0], importance.items()):
        ax.barh([w["word"] for w in words][::-1], [w["score"] for w in words][::-1], color="tab:blue")
        ax.set_title(f"{label}" if words else f"{label} (no word seen {min_count}+ times)", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _dependence_figure(curve: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.8))
    for label, means in curve["mean_probability"].items():
        ax.plot(range(len(curve["grid"])), means, marker="o", label=label)
    ax.set_xticks(range(len(curve["grid"])), curve["grid"], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean P(label)")
    ax.set_title(f"{curve['feature']} ({curve['examples']} texts)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def explanations_html(explanations: dict) -> str:
    """The report page's explanations section: highlighted examples, importance, dependence, faithfulness."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    esc = html.escape
    parts = ["<section>", "<h2>Explanations</h2>",
             "<p>Green words push towards the label, red words against it; hover a word for its value. "
             "Integrated gradients attribute P(predicted label) against the prompt with the text's tokens "
             "replaced by padding; SHAP values are per label, against the text fully masked.</p>"]
    for example in explanations["examples"]:
        ig = example["integrated_gradients"]
        probabilities = ", ".join(f"{esc(label)} {p:.2f}" for label, p in example["probabilities"].items())
        parts += [
            '<div class="explain-example">',
            f"<p><b>true</b> {esc(example['label'])} &middot; <b>predicted</b> {esc(example['predicted'])} "
            f"&middot; P: {probabilities}</p>",
            f"<p>IG for P({esc(ig['target'])}): {_highlight(ig['words'], ig['attributions'])}</p>",
            f"<p><small>IG sum {ig['sum']:+.4f}; f(x) - f(baseline) {ig['difference']:+.4f}; "
            f"convergence delta {ig['convergence_delta']:+.2e}</small></p>",
            "<table><tr><th>label</th><th>SHAP</th></tr>",
            *(f"<tr><td>{esc(label)}</td><td>{_highlight(example['shap']['tokens'], values)}</td></tr>"
              for label, values in zip(explanations["labels"], example["shap"]["values"])),
            "</table></div>",
        ]
    parts.append("<h3>Word importance</h3>")
    for method, title in (("shap", "mean SHAP value per word and label"),
                          ("integrated_gradients", "mean IG attribution per word, by predicted label")):
        figure = _importance_figure(explanations["importance"][method], title, explanations["min_word_count"])
        parts.append(png_tag(figure, title))
    parts.append("<h3>Dependence on the text</h3>")
    parts += [png_tag(_dependence_figure(curve), f"dependence on {curve['feature']}") for curve in explanations["dependence"]]
    f = explanations["faithfulness"]
    parts += [
        "<h3>Faithfulness</h3>",
        f"<p>Deleting the top {f['deletion_fraction']:.0%} of words by IG attribution (at least one) vs as many "
        f"random words, over {f['examples']} texts: drop in P(predicted label).</p>",
        "<table><tr><th>top-attributed</th><th>random</th><th>gap</th><th>top &gt; random</th></tr>",
        f"<tr><td>{f['mean_drop_top']:.3f}</td><td>{f['mean_drop_random']:.3f}</td><td>{f['gap']:+.3f}</td>"
        f"<td>{f['share_top_greater']:.0%}</td></tr></table>",
        "</section>",
    ]
    return "\n".join(parts)
