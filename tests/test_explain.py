"""The explanations (jobs.explain, jobs/evaluation/explanations.py) on a model that provably learned a separable toy task: each text is filler words plus
one signal word ("great" -> positive, "awful" -> negative), so a faithful explanation must single out
the signal word, and deleting it must hurt the prediction more than deleting a random word."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.config import EvalSection, ExplainSection, RunConfig

LABELS = ["negative", "positive"]
SIGNAL = {"awful": "negative", "great": "positive"}
FILLER = "the my a flight seat bag gate crew time food today plane ticket was and very so our this late on".split()
SYSTEM_PROMPT = "Classify the message: negative or positive."
SETTINGS = ExplainSection(examples=6, dependence_examples=16, ig_steps=32, shap_max_evals=64, tasks=2, seed=3)


def toy_texts(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        signal = rng.choice(sorted(SIGNAL))
        words.insert(rng.randint(0, len(words)), signal)
        examples.append((" ".join(words), SIGNAL[signal]))
    return examples


def signal_word(words: list[str]) -> int:
    return next(i for i, word in enumerate(words) if word in SIGNAL)


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny random model trained (about 7 s) to answer the toy task's label, saved as a lakeforge model folder."""
    from transformers import AutoModelForCausalLM

    from cluster.contracts import ModelArtifact
    from jobs.data.templating import Templater
    from jobs.base_models import TINY

    torch.manual_seed(0)
    torch.set_num_threads(2)
    templater = Templater(str(tiny_model_dir), SYSTEM_PROMPT, LABELS)
    assert all(len(templater.tokenizer(label, add_special_tokens=False).input_ids) == 1 for label in LABELS)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    examples = toy_texts(16 * 80, seed=0)
    for first in range(0, len(examples), 16):
        encoded = [templater.encode(text, label) for text, label in examples[first:first + 16]]
        width = max(prompt_len for _, prompt_len in encoded)
        input_ids = torch.full((len(encoded), width), templater.tokenizer.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for row, (ids, prompt_len) in enumerate(encoded):
            input_ids[row, :prompt_len] = torch.tensor(ids[:prompt_len])
            attention_mask[row, :prompt_len] = 1
        # Loss on the answer's (single) label token only, with the LM head applied only where it is predicted.
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        ends = torch.tensor([prompt_len - 1 for _, prompt_len in encoded])
        answers = torch.tensor([ids[prompt_len] for ids, prompt_len in encoded])
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[torch.arange(len(encoded)), ends]), answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("toy") / "model"
    model.save_pretrained(folder)
    templater.tokenizer.save_pretrained(folder)
    ModelArtifact(name="toy", base_model=TINY, labels=LABELS, system_prompt=SYSTEM_PROMPT).write(folder)
    return folder


@pytest.fixture(scope="module")
def toy_model(toy_model_dir):
    from jobs.evaluation.explanations import LabelModel

    return LabelModel(toy_model_dir, threads=2)


@pytest.fixture(scope="module")
def explanations(ray_cluster, toy_model, toy_model_dir, tmp_path_factory) -> dict:
    """The job run as the pipeline runs it: a run folder with the model and its predictions."""
    from jobs.evaluation.explanations import explain

    cfg = RunConfig(name="toy", storage_root=str(tmp_path_factory.mktemp("runs")), explain=SETTINGS,
                    eval=EvalSection(terms=["great", "seat"]))
    shutil.copytree(toy_model_dir, cfg.run_dir / "model")
    rows = pd.DataFrame(toy_texts(40, seed=1), columns=["text", "label"])
    rows.loc[:2, "label"] = rows.loc[:2, "label"].map({"negative": "positive", "positive": "negative"})  # label noise: mistakes
    probabilities = toy_model.probabilities(rows["text"].tolist())
    predictions = rows.assign(label_id=rows["label"].map(LABELS.index), pred_id=probabilities.argmax(axis=1),
                              confidence=probabilities.max(axis=1))
    (cfg.run_dir / "predictions").mkdir()
    predictions.to_parquet(cfg.run_dir / "predictions" / "fine_tuned.parquet")
    result = explain(cfg)
    assert json.loads((cfg.run_dir / "explanations.json").read_text()) == result
    return result


def test_toy_model_learned_the_task(toy_model):
    held_out = toy_texts(100, seed=2)
    predicted = toy_model.probabilities([text for text, _ in held_out]).argmax(axis=1)
    assert np.mean([LABELS[p] == label for p, (_, label) in zip(predicted, held_out)]) > 0.9


def test_differentiable_label_probabilities_match_score_labels(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.evaluation.scoring import score_labels
    from jobs.evaluation.explanations import embedding_label_probabilities

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    label_ids = [tokenizer(label, add_special_tokens=False).input_ids for label in ("negative", "very mixed feelings")]
    assert len(label_ids[1]) > 1
    prompt = tokenizer("how was the flight", add_special_tokens=False).input_ids
    expected = torch.softmax(score_labels(model, [prompt], label_ids, pad_id=2), dim=1)
    with torch.no_grad():
        got = embedding_label_probabilities(model, model.get_input_embeddings()(torch.tensor([prompt])), label_ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_integrated_gradients_are_complete_and_single_out_the_signal_word(toy_model):
    found = 0
    for text, _ in toy_texts(8, seed=4):
        target = int(toy_model.probabilities([text])[0].argmax())
        ig = toy_model.integrated_gradients(text, target, steps=32)
        assert ig["sum"] == pytest.approx(ig["difference"], abs=max(0.02, 0.05 * abs(ig["difference"])))
        assert ig["convergence_delta"] == pytest.approx(ig["sum"] - ig["difference"], abs=1e-5)
        # Template tokens are the same in input and baseline: all of the attribution is on the text's words.
        assert sum(ig["attributions"]) == pytest.approx(ig["sum"], abs=1e-5)
        found += int(np.argmax(np.abs(ig["attributions"])) == signal_word(ig["words"]))
    assert found >= 7


def test_rows_are_stratified_by_prediction_include_mistakes_and_are_deterministic():
    from jobs.evaluation.explanations import pick_rows

    predictions = pd.DataFrame({"text": [f"text {i}" for i in range(30)], "label": "x",
                                "label_id": [0] * 27 + [1] * 3, "pred_id": [0] * 25 + [1] * 5})
    settings = ExplainSection(examples=6, dependence_examples=10)
    rows = pick_rows(predictions, settings)
    token_level = [row["row"] for row in rows if row["token_level"]]
    assert len(token_level) == 6 and {predictions.pred_id[i] for i in token_level} == {0, 1}
    assert any(predictions.pred_id[i] != predictions.label_id[i] for i in token_level)
    assert sum(row["dependence"] for row in rows) == 10
    assert pick_rows(predictions, settings) == rows


@pytest.mark.integration
def test_explanations_have_every_section_and_find_the_signal_word(explanations):
    assert explanations["labels"] == LABELS
    examples = explanations["examples"]
    assert len(examples) == SETTINGS.examples
    assert any(e["label"] != e["predicted"] for e in examples)  # the noisy labels are picked as mistakes
    top_shap = 0
    for example in examples:
        shap_values, tokens = np.array(example["shap"]["values"]), example["shap"]["tokens"]
        assert shap_values.shape == (len(LABELS), len(tokens)) and tokens == example["text"].split()
        predicted = LABELS.index(example["predicted"])
        top_shap += int(np.argmax(shap_values[predicted]) == signal_word(tokens))
        ig = example["integrated_gradients"]
        assert ig["target"] == example["predicted"] and len(ig["attributions"]) == len(ig["words"])
    assert top_shap >= len(examples) - 1
    assert explanations["completeness"]["max_abs_error"] < 0.05
    for label, signal in (("negative", "awful"), ("positive", "great")):
        assert explanations["importance"]["shap"][label][0]["word"] == signal
        assert explanations["importance"]["integrated_gradients"][label][0]["word"] == signal


@pytest.mark.integration
def test_deleting_top_attributed_words_hurts_more_than_random_words(explanations):
    faithfulness = explanations["faithfulness"]
    assert faithfulness["examples"] == SETTINGS.dependence_examples == len(faithfulness["per_example"])
    assert faithfulness["gap"] > 0.1 and faithfulness["share_top_greater"] > 0.5
    assert faithfulness["gap"] == pytest.approx(faithfulness["mean_drop_top"] - faithfulness["mean_drop_random"])


@pytest.mark.integration
def test_dependence_curves_have_a_probability_per_grid_point_and_label(explanations):
    curves = {curve["feature"]: curve for curve in explanations["dependence"]}
    assert set(curves) == {"words kept", "term: great", "term: seat", "leading handle"}
    for curve in curves.values():
        assert set(curve["mean_probability"]) == set(LABELS)
        for means in curve["mean_probability"].values():
            assert len(means) == len(curve["grid"]) and all(0 <= p <= 1 for p in means)
    great = curves["term: great"]["mean_probability"]["positive"]
    assert great[1] > great[0] + 0.2  # appending the positive signal word moves texts towards positive


@pytest.mark.integration
def test_html_highlights_words_and_escapes_text(explanations):
    from jobs.evaluation.report import explanations_html

    tampered = copy.deepcopy(explanations)
    tampered["examples"][0]["integrated_gradients"]["words"][0] = '<b>"fly" & co</b>'
    page = explanations_html(tampered)
    assert page.startswith("<section>") and page.endswith("</section>")
    assert "&lt;b&gt;&#34;fly&#34; &amp; co&lt;/b&gt;" in page and '<b>"fly"' not in page
    assert ">great</span>" in page or ">awful</span>" in page
    assert all(label in page for label in LABELS) and page.count("<img") == 2 + len(explanations["dependence"])


def test_main_names_the_missing_input_and_the_job_to_run(tmp_path):
    from jobs.explain import main

    with pytest.raises(SystemExit) as stopped:
        main([f"storage_root={tmp_path}", "name=absent"])
    message = str(stopped.value.code)
    assert message.startswith("explain: ") and str(tmp_path / "absent" / "model") in message and "jobs.finetune" in message
