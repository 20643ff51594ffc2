"""HTML report of a model version: evaluation (metrics with intervals, confusion matrices,
reliability, slices, worst errors, gate decision; for generative runs reference metrics with
intervals and the best and worst answers side by side), a section per task of a multi-task run, and
explanations, in one self-contained page.

The numbers, rows and figures are computed here; jobs/templates/model_report.html (and
explanations.html) lays them out, with autoescaping. Plots are matplotlib figures embedded as base64
PNGs, so the page can be mailed or archived as is.
"""

from __future__ import annotations

from pathlib import Path

from markupsafe import Markup

from jobs.html import png_tag, render

# Report order: the candidate, what it must beat, where it started, what a classical model does
# (classification: TF-IDF + logistic regression; generative runs: the nearest training prompt's answer).
RETRIEVAL_BASELINE = "baseline_tfidf_retrieval"
SYSTEMS = ("fine_tuned", "previous_version", "base_zero_shot", "baseline_tfidf_logreg", RETRIEVAL_BASELINE)
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "rouge_l": "ROUGE-L", "chrf": "chrF",
                "exact_match": "exact match", "format_max_words": "format: max words",
                "format_required_phrase": "format: required phrase", "format_valid_json": "format: valid JSON",
                "format_pass": "format: all checks"}


def _systems(evaluation: dict) -> list[str]:
    return [name for name in SYSTEMS if name in evaluation]


def _metrics_rows(evaluation: dict) -> list[dict]:
    intervals = evaluation["bootstrap"]["systems"]
    rows = []
    for name in _systems(evaluation):
        m = evaluation[name]
        generation = m.get("generation")
        rows.append({"name": name, "accuracy": m["accuracy"], "accuracy_ci": intervals[name]["accuracy"],
                     "macro_f1": m["macro"]["f1"], "macro_f1_ci": intervals[name]["macro_f1"],
                     "weighted_f1": m["weighted"]["f1"], "ece": m["calibration"]["ece"],
                     "perplexity": m.get("answer_perplexity"),
                     "generation": generation if generation and generation["examples"] else None})
    return rows


def _per_class_rows(evaluation: dict) -> list[dict]:
    systems = _systems(evaluation)
    return [{"label": label, "support": evaluation[systems[0]]["per_class"][label]["support"],
             "cells": [evaluation[name]["per_class"][label] for name in systems]}
            for label in evaluation["labels"]]


def _confusion_figure(evaluation: dict) -> Markup:
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
    return png_tag(fig, "confusion matrices")


def _reliability_figure(evaluation: dict) -> Markup:
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
    return png_tag(fig, "reliability diagram")


def _learning_curve(curve: list[dict], evaluation: dict) -> dict | None:
    """Validation macro-F1 against training examples seen, beside the test macro-F1 of the systems
    that need no training (their lines are the bar the curve has to cross), and the points as a
    table. None when no point has a validation macro-F1 (the section is left out)."""
    import matplotlib.pyplot as plt

    points = [point for point in curve if point.get("val_macro_f1") is not None]
    if not points:
        return None
    fig, axis = plt.subplots(figsize=(6, 3.6))
    axis.plot([p["examples_seen"] for p in points], [p["val_macro_f1"] for p in points], marker="o",
              label="fine-tuning (validation split)")
    for name, style in (("base_zero_shot", ":"), ("baseline_tfidf_logreg", "--")):
        if name in evaluation:
            axis.axhline(evaluation[name]["macro"]["f1"], linestyle=style, color="#555", label=f"{name} (test split)")
    axis.set_xlabel("training examples seen")
    axis.set_ylabel("macro-F1")
    axis.legend(fontsize=7)
    rows = [{"step": p["step"], "examples_seen": p["examples_seen"], "train_tokens": p["train_tokens"],
             "val_loss": p["val_loss"], "val_macro_f1": p["val_macro_f1"]} for p in curve]
    return {"figure": png_tag(fig, "learning curve"), "points": rows}


def _errors(errors: dict) -> dict:
    return {"mistakes": errors["mistakes"], "worst": errors["worst"],
            "per_class": [(label, rows) for label, rows in errors["per_class"].items() if rows]}


def _generative_context(evaluation: dict) -> dict:
    """The metric table (each metric with its interval), paired differences and side-by-side answers
    of a generative run."""
    intervals, systems = evaluation["bootstrap"]["systems"], _systems(evaluation)
    metrics = list(intervals[systems[0]])
    return {
        "task": evaluation["task"],
        "metric_names": [METRIC_NAMES.get(metric, metric) for metric in metrics],
        "metrics": [{"name": name, "cells": [(evaluation[name][metric], intervals[name][metric]) for metric in metrics],
                     "perplexity": evaluation[name].get("answer_perplexity"),
                     "mean_answer_words": evaluation[name]["mean_answer_words"]} for name in systems],
        "differences": [(pair, [d[metric] for metric in metrics]) for pair, d in evaluation["bootstrap"]["differences"].items()],
        "examples": evaluation.get("examples"),
        "example_metric": METRIC_NAMES.get(evaluation["examples"]["metric"]) if "examples" in evaluation else None,
    }


def task_reports(evaluation: dict) -> list[dict]:
    """Every task's evaluation, the primary (the report itself) first, then a multi-task run's further tasks."""
    return [evaluation, *evaluation.get("further_tasks", {}).values()]


def _task_section(evaluation: dict) -> dict:
    """One task's part of the page: its metrics with intervals and paired differences, then by kind the
    per-class tables, figures, slices and errors, or the side-by-side answers. A multi-task run's task
    is named, with the config section its prompt and labels come from."""
    section = {"name": evaluation.get("task_name"), "kind": evaluation.get("task", "classification"),
               "test_examples": evaluation["test_examples"], "systems": _systems(evaluation),
               "prompt_and_labels_from": evaluation.get("prompt_and_labels_from"),
               "system_prompt": evaluation.get("system_prompt"), "primary": "further_tasks" in evaluation}
    if section["kind"] != "classification":
        return {**section, "generative": _generative_context(evaluation), "errors": None}
    return {**section, "generative": None,
            "metrics": _metrics_rows(evaluation),
            "differences": list(evaluation["bootstrap"]["differences"].items()),
            "per_class": _per_class_rows(evaluation),
            "confusion_figure": _confusion_figure(evaluation),
            "reliability_figure": _reliability_figure(evaluation),
            "slices": evaluation["slices"],
            "errors": _errors(evaluation["errors"]) if "errors" in evaluation else None}


def write_report(path: Path, evaluation: dict, explanations: dict | None = None, version: dict | None = None,
                 learning_curve: list[dict] | None = None) -> Path:
    """Render one model version's evaluation (and explanations) as a self-contained HTML page: a
    section per task (one for a single-task run)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    page = render(
        "model_report.html",
        title=f"lakeforge model report: {evaluation['models'].get('fine_tuned', 'evaluation')}",
        version=version or None, gate=evaluation.get("gate"), level=evaluation["bootstrap"]["level"],
        tasks=[_task_section(task) for task in task_reports(evaluation)],
        learning_curve=_learning_curve(learning_curve, evaluation) if learning_curve else None,
        explanations=_explanations(explanations) if explanations is not None else None)
    path.write_text(page)
    return path


def _highlight(words: list[str], values: list[float]) -> list[dict]:
    """Each word with a green (towards) / red (against) background scaled to the strongest |value|;
    the template writes the words (escaped) in spans of that colour."""
    scale = max((abs(value) for value in values), default=0.0) or 1.0
    return [{"word": word, "value": value,
             "colour": f"rgba({'0, 150, 0' if value >= 0 else '210, 0, 0'}, {0.7 * abs(value) / scale:.2f})"}
            for word, value in zip(words, values)]


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


def _explanations(explanations: dict) -> dict:
    """The explanations section's context: highlighted words per example, importance and dependence figures."""
    examples = []
    for example in explanations["examples"]:
        ig = example["integrated_gradients"]
        examples.append({
            "label": example["label"], "predicted": example["predicted"],
            "probabilities": list(example["probabilities"].items()),
            "ig": {"target": ig["target"], "words": _highlight(ig["words"], ig["attributions"]), "sum": ig["sum"],
                   "difference": ig["difference"], "convergence_delta": ig["convergence_delta"]},
            "shap": [(label, _highlight(example["shap"]["tokens"], values))
                     for label, values in zip(explanations["labels"], example["shap"]["values"])],
        })
    importance = [png_tag(_importance_figure(explanations["importance"][method], title, explanations["min_word_count"]), title)
                  for method, title in (("shap", "mean SHAP value per word and label"),
                                        ("integrated_gradients", "mean IG attribution per word, by predicted label"))]
    dependence = [png_tag(_dependence_figure(curve), f"dependence on {curve['feature']}") for curve in explanations["dependence"]]
    return {"examples": examples, "importance_figures": importance, "dependence_figures": dependence,
            "faithfulness": explanations["faithfulness"]}


def explanations_html(explanations: dict) -> str:
    """The report page's explanations section: highlighted examples, importance, dependence, faithfulness."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    return render("explanations.html", explanations=_explanations(explanations))
