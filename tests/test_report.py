import numpy as np
import pandas as pd

from jobs.evaluation.analysis import error_analysis, slice_metrics
from jobs.evaluation.gate import promotion_gate
from jobs.evaluation.metrics import bootstrap_intervals, classification_metrics
from jobs.evaluation.report import write_report


def test_report_shows_every_system_the_gate_and_escaped_examples(tmp_path):
    labels = ["negative", "neutral", "positive"]
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, size=120)
    texts = [f"<script>alert({i})</script> flight delay" if i % 4 == 0 else f"message {i} thank you" for i in range(120)]
    predictions = {}
    for system, accuracy in (("fine_tuned", 0.9), ("base_zero_shot", 0.4), ("baseline_tfidf_logreg", 0.7)):
        predicted = np.where(rng.random(120) < accuracy, y, (y + 1) % 3)
        predictions[system] = pd.DataFrame({"text": texts, "label_id": y, "pred_id": predicted,
                                            "confidence": rng.uniform(0.4, 1.0, 120)})
    report = {"test_examples": 120, "labels": labels, "models": {"fine_tuned": "/models/candidate"}}
    for system, frame in predictions.items():
        report[system] = classification_metrics(frame["label_id"], frame["pred_id"], labels, frame["confidence"])
    report["bootstrap"] = bootstrap_intervals(y, {k: f["pred_id"].to_numpy() for k, f in predictions.items()}, labels, resamples=50)
    report["slices"] = slice_metrics(predictions, labels, ["delay"])
    report["errors"] = error_analysis(predictions["fine_tuned"], labels, worst=5)
    report["gate"] = promotion_gate(report["bootstrap"], "macro_f1", 0.0)

    curve = [{"step": 20, "examples_seen": 640, "train_tokens": 40000.0, "val_loss": 0.31, "val_macro_f1": 0.52},
             {"step": 40, "examples_seen": 1280, "train_tokens": 80000.0, "val_loss": 0.25, "val_macro_f1": 0.61}]
    page = write_report(tmp_path / "report.html", report,
                        version={"name": "sentiment", "version": "v0003", "created": "2026-11-25T12:00:00"},
                        learning_curve=curve).read_text()

    assert "Promotion gate: Deployable" in page and "v0003" in page
    for system in predictions:
        assert system in page
    assert page.count("<img") == 3  # confusion matrices + reliability diagram + learning curve
    assert "<h2>Learning curve</h2>" in page and "<td>1,280</td>" in page and "<td>0.610</td>" in page
    assert 'contains &quot;delay&quot;' in page and "Most confident mistakes" in page
    assert "<script>" not in page and "&lt;script&gt;alert(" in page
