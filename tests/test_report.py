from html.parser import HTMLParser

import jinja2
import numpy as np
import pandas as pd
import pytest

from jobs.data import quality_report
from jobs.data.quality_report import write_quality_report
from jobs.evaluation import report as model_report
from jobs.evaluation.analysis import error_analysis, slice_metrics
from jobs.evaluation.gate import promotion_gate
from jobs.evaluation.metrics import bootstrap_intervals, classification_metrics
from jobs.evaluation.report import write_report
from jobs.html import render

LABELS = ["negative", "neutral", "positive"]
HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
# HOSTILE as autoescaping writes it (markupsafe: " as &#34;).
HOSTILE_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;&lt;img src=x onerror=alert(2)&gt;"
SHORT = "<u>x</u>"  # a cell of 20 characters or fewer (the quality report's tables align those right)


def evaluation(texts: list[str], labels: list[str] = LABELS, sources: list[str] | None = None) -> dict:
    """An evaluation.json as the evaluation stage writes it, for three systems on synthetic predictions."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, size=len(texts))
    predictions = {}
    for system, accuracy in (("fine_tuned", 0.9), ("base_zero_shot", 0.4), ("baseline_tfidf_logreg", 0.7)):
        predicted = np.where(rng.random(len(texts)) < accuracy, y, (y + 1) % 3)
        predictions[system] = pd.DataFrame({"text": texts, "label_id": y, "pred_id": predicted,
                                            "confidence": rng.uniform(0.4, 1.0, len(texts))})
        if sources:
            predictions[system]["source"] = sources
    report = {"test_examples": len(texts), "labels": labels, "models": {"fine_tuned": "/models/candidate"}}
    for system, frame in predictions.items():
        report[system] = classification_metrics(frame["label_id"], frame["pred_id"], labels, frame["confidence"])
    report["bootstrap"] = bootstrap_intervals(y, {k: f["pred_id"].to_numpy() for k, f in predictions.items()}, labels, resamples=50)
    report["slices"] = slice_metrics(predictions, labels, ["delay"])
    report["errors"] = error_analysis(predictions["fine_tuned"], labels, worst=5)
    report["gate"] = promotion_gate(report["bootstrap"], "macro_f1", 0.0)
    return report


CURVE = [{"step": 20, "examples_seen": 640, "train_tokens": 40000.0, "val_loss": 0.31, "val_macro_f1": 0.52},
         {"step": 40, "examples_seen": 1280, "train_tokens": 80000.0, "val_loss": 0.25, "val_macro_f1": 0.61}]
VERSION = {"name": "sentiment", "version": "v0003", "created": "2026-11-25T12:00:00"}


def explanations(words: list[str], labels: list[str] = LABELS) -> dict:
    """An explanations.json of one example, shaped as jobs.evaluation.explanations writes it."""
    return {
        "labels": labels, "min_word_count": 3,
        "examples": [{"label": labels[0], "predicted": labels[2], "probabilities": dict(zip(labels, (0.1, 0.2, 0.7))),
                      "integrated_gradients": {"target": labels[2], "words": words, "attributions": [0.5, -0.25, 0.0][:len(words)],
                                               "sum": 0.25, "difference": 0.26, "convergence_delta": 1.5e-3},
                      "shap": {"tokens": words, "values": [[0.1, -0.2, 0.0][:len(words)] for _ in labels]}}],
        "importance": {method: {label: [{"word": "great", "score": 0.4}] for label in labels}
                       for method in ("shap", "integrated_gradients")},
        "dependence": [{"feature": "words kept", "examples": 8, "grid": [0.25, 0.5, 1.0],
                        "mean_probability": {label: [0.2, 0.3, 0.4] for label in labels}}],
        "faithfulness": {"deletion_fraction": 0.2, "examples": 8, "mean_drop_top": 0.3, "mean_drop_random": 0.1,
                         "gap": 0.2, "share_top_greater": 0.75},
    }


def quality_input(name: str) -> dict:
    """The dict jobs.data.prepare.quality_report() returns (plus wall_s), with `name` wherever data shows."""
    source = {"physical_records": 10, "rows_read": 10, "kept": 6, "quarantined": {"bad_json": 1}, "filtered": {"too_short": 1},
              "exact_duplicates": 1, "near_duplicates": 1}
    return {
        "counts": {"rows_read": 20, "kept": 12, "quarantined": {"bad_json": 2}, "filtered": {"too_short": 1, name: 1},
                   "exact_duplicates": 2, "near_duplicates": 2, "duplicates_removed": 4,
                   "duplicate_groups_with_label_conflict": 1, "encoding_repaired": 3, "pii": {"email": 2}},
        "per_source": {"tweets.csv": source, name: source, SHORT: source},
        "stages": {"read": 20, "valid": 16, "after_filters": 16, "after_exact_dedup": 14, "after_near_dedup": 12, "kept": 12},
        "quarantine_examples": {"bad_json": [{"source": name, "source_file": name, "source_row": 7, "raw": "{" + name}],
                                name: [{"source": "tweets.csv", "source_file": "tweets.csv", "source_row": 3, "raw": name}]},
        "duplicate_rate": 0.2, "pii_rate": 0.125,
        "pii_examples": [{"source": name, "source_row": 4, "text": "mail <EMAIL> " + name}],
        "exact_duplicate_examples": [{"text": "great flight " + name, "label": name, "group_size": 2, "label_conflict": True}],
        "near_duplicate_clusters": {"clusters": 1, "rows_removed": 2,
                                    "examples": [{"size": 3, "kept": "kept " + name, "removed": ["late again", name]}]},
        "token_length_histogram": {"bin_width": 8, "bins": {8: 3, 16: 9}},
        "labels": {"train": {"negative": 5, name: 2, SHORT: 1}, "validation": {"negative": 1}, "test": {name: 1}},
        "imbalance_ratio": 2.5,
        "warnings": [f"source {name} is small"],
        "wall_s": 4.2,
    }


class Elements(HTMLParser):
    """The elements a browser would build from a page (tag, attributes)."""

    def __init__(self, page: str):
        super().__init__()
        self.elements = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


def assert_no_markup_from_data(page: str, figures: int):
    elements = Elements(page).elements
    assert not [tag for tag, _ in elements if tag == "script"]
    images = [attrs for tag, attrs in elements if tag == "img"]
    assert len(images) == figures and all(attrs["src"].startswith("data:image/png;base64,") for attrs in images)
    assert not [attrs for _, attrs in elements if any(name.startswith("on") for name in attrs)]
    assert "<script>" not in page and "<img src=x" not in page and HOSTILE_ESCAPED in page


def test_report_shows_every_system_the_gate_and_escaped_examples(tmp_path):
    texts = [f"<script>alert({i})</script> flight delay" if i % 4 == 0 else f"message {i} thank you" for i in range(120)]
    report = evaluation(texts)
    page = write_report(tmp_path / "report.html", report, version=VERSION, learning_curve=CURVE).read_text()

    assert "Promotion gate: Deployable" in page and "v0003" in page
    for system in ("fine_tuned", "base_zero_shot", "baseline_tfidf_logreg"):
        assert system in page
    assert page.count("<img") == 3  # confusion matrices + reliability diagram + learning curve
    assert "<h2>Learning curve</h2>" in page and "<td>1,280</td>" in page and "<td>0.610</td>" in page
    assert "contains &#34;delay&#34;" in page and "Most confident mistakes" in page
    assert "<script>" not in page and "&lt;script&gt;alert(" in page


LINEAGE = {
    "sources": {"tweets": {"/data/<b>tweets</b>.csv": {"sha256": "ab" * 32}}},
    "data_manifest": {"path": "/runs/r/data/manifest.json", "sha256": "cd" * 32, "counts": {"kept": 100}},
    "run_config": {"name": "r"}, "code_version": {"source_sha256": "ef" * 32, "package_version": "0.1.0"},
    "parent_version": "v0002", "training": {"tracking": {"uri": "sqlite:///m.db", "run_id": "run-7"}, "best_step": 40},
    "evaluation": {},
}


def test_report_shows_the_versions_lineage(tmp_path):
    report = evaluation([f"message {i} thank you" for i in range(40)])
    version = {**VERSION, "lineage": LINEAGE, "files": {"model.safetensors": "00" * 32, "config.json": "11" * 32}}
    page = write_report(tmp_path / "report.html", report, version=version).read_text()
    assert "<h2>Lineage</h2>" in page and "/data/&lt;b&gt;tweets&lt;/b&gt;.csv" in page
    assert "package 0.1.0" in page and "v0002" in page and "run-7" in page and "2 files, SHA-256" in page
    assert "python -m jobs.lineage sentiment v0003" in page


def test_hostile_data_is_escaped_in_the_model_report_and_the_quality_report(tmp_path):
    # A tweet text, a label, a source name (a slice), the gate's reason and explained words, all hostile.
    texts = [f"{HOSTILE} flight delay" if i % 4 == 0 else f"message {i} thank you" for i in range(120)]
    labels = ["negative", HOSTILE, "positive"]
    report = evaluation(texts, labels, sources=[HOSTILE if i % 2 else "tweets.csv" for i in range(120)])
    report["models"]["fine_tuned"] = HOSTILE
    report["gate"]["reason"] += " " + HOSTILE
    page = write_report(tmp_path / "report.html", report, explanations(["great", HOSTILE, "flight"], labels),
                        VERSION, CURVE).read_text()
    assert_no_markup_from_data(page, figures=3 + 3)  # + importance (SHAP, IG) and one dependence curve
    assert f"<td>source: {HOSTILE_ESCAPED}</td>" in page  # the slice of the hostile source
    assert f"<h4>true label: {HOSTILE_ESCAPED}</h4>" in page
    assert f"<title>lakeforge model report: {HOSTILE_ESCAPED}</title>" in page
    assert f'title="-0.2500">{HOSTILE_ESCAPED}</span>' in page  # a highlighted word, escaped inside its span

    page = write_quality_report(quality_input(HOSTILE), tmp_path / "quality_report.html").read_text()
    assert_no_markup_from_data(page, figures=5)  # stages, per source, reasons, token lengths, labels
    assert f"<li>source {HOSTILE_ESCAPED} is small</li>" in page
    assert f'<td class="text">{HOSTILE_ESCAPED}</td>' in page  # source name, label, reason
    assert "<u>" not in page and "<td>&lt;u&gt;x&lt;/u&gt;</td>" in page and "<th>&lt;u&gt;x&lt;/u&gt;</th>" in page


def test_a_value_missing_from_a_templates_context_raises_instead_of_rendering_blank(tmp_path, monkeypatch):
    with pytest.raises(jinja2.UndefinedError, match="title"):
        render("base.html")

    # Every value write_report / write_quality_report hands its template is one the page shows:
    # leaving any one out raises.
    for module, write in ((model_report, lambda path: write_report(path, evaluation([f"text {i} delay" for i in range(40)]),
                                                                   explanations(["great", "seat"]), VERSION, CURVE)),
                          (quality_report, lambda path: write_quality_report(quality_input("tweets.csv"), path))):
        seen = {}
        monkeypatch.setattr(module, "render", lambda name, **context: seen.update(name=name, context=context) or "page")
        write(tmp_path / "page.html")
        monkeypatch.undo()
        render(seen["name"], **seen["context"])  # complete: renders
        for key in seen["context"]:
            with pytest.raises(jinja2.UndefinedError):
                render(seen["name"], **{k: v for k, v in seen["context"].items() if k != key})

    # A key missing inside a value too: a gate without its reason.
    report = evaluation([f"text {i}" for i in range(40)])
    del report["gate"]["reason"]
    with pytest.raises(jinja2.UndefinedError, match="reason"):
        write_report(tmp_path / "report.html", report)
