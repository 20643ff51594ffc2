"""jobs.batch_infer on the shared Ray cluster: real tweets, the tiny model through vLLM on Ray Data."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pandas as pd
import pytest
import torch

from cluster.config import ConfigError, load_config
from cluster.contracts import ModelArtifact
from jobs.config import BatchInferConfig
from tests.conftest import EAGER

pytestmark = pytest.mark.integration
LABELS = ["negative", "neutral", "positive"]
SYSTEM_PROMPT = "Classify the sentiment of the customer's message. Answer with one word: negative, neutral or positive."


@pytest.fixture(scope="module")
def tweets(small_csv) -> pd.DataFrame:
    frame = pd.read_csv(small_csv, encoding_errors="replace").dropna().head(20).reset_index(drop=True)
    return frame.assign(tweet_id=np.arange(1000, 1000 + len(frame)))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier") / "model"
    shutil.copytree(tiny_model_dir, folder)
    ModelArtifact(name="tiny", base_model=str(tiny_model_dir), labels=LABELS, system_prompt=SYSTEM_PROMPT).write(folder)
    return folder


def config(model_dir, output, **input_section) -> BatchInferConfig:
    return BatchInferConfig.model_validate({
        "model_dir": str(model_dir), "output": str(output), "input": input_section, "part_rows": 4,
        "engine": {"max_model_len": 256, "batch_size": 8, "engine_overrides": EAGER}})


def test_config_rejects_ambiguous_or_missing_sources(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of input.parquet and input.sql"):
        load_config(BatchInferConfig, None, ["model_dir=m", "output=o", "input.parquet=a", "input.sql=select 1"])
    with pytest.raises(ConfigError, match="needs input.database"):
        load_config(BatchInferConfig, None, ["model_dir=m", "output=o", "input.sql=select 1"])
    with pytest.raises(ConfigError, match="input.txt_column: unknown key"):
        load_config(BatchInferConfig, None, ["model_dir=m", "output=o", "input.parquet=a", "input.txt_column=t"])


def test_bad_inputs_are_named(ray_cluster, tmp_path, tweets, model_dir):
    from jobs.inference.run import run_batch_inference

    tweets.to_parquet(tmp_path / "in.parquet")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        run_batch_inference(config(tmp_path / "nope", tmp_path / "out", parquet=str(tmp_path / "in.parquet")))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        run_batch_inference(config(model_dir, tmp_path / "out", parquet=str(tmp_path / "missing.parquet")))
    with pytest.raises(ValueError, match="lacks the text column 'body'"):
        run_batch_inference(config(model_dir, tmp_path / "out", parquet=str(tmp_path / "in.parquet"), text_column="body"))
    tweets.assign(prediction="x").to_parquet(tmp_path / "clash.parquet")
    with pytest.raises(ValueError, match=r"input columns \['prediction'\] clash"):
        run_batch_inference(config(model_dir, tmp_path / "out", parquet=str(tmp_path / "clash.parquet")))
    tweets.head(0).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="input table is empty"):
        run_batch_inference(config(model_dir, tmp_path / "out", parquet=str(tmp_path / "empty.parquet")))


def test_sql_source_reads_the_same_rows_with_the_same_ids(ray_cluster, tmp_path, tweets):
    from jobs.inference.tables import ROW_ID, read_table

    database = tmp_path / "crm.sqlite"
    with sqlite3.connect(database) as connection:
        tweets.to_sql("tickets", connection, index=False)
    cfg = config("m", "o", sql="SELECT tweet_id, text, sentiment FROM tickets ORDER BY tweet_id", database=str(database))
    from_sql = read_table(cfg.input).to_pandas()
    assert from_sql[ROW_ID].tolist() == list(range(len(tweets)))
    pd.testing.assert_frame_equal(from_sql[["tweet_id", "text", "sentiment"]], tweets[["tweet_id", "text", "sentiment"]],
                                  check_dtype=False)
    with pytest.raises(FileNotFoundError, match="input.database"):
        read_table(config("m", "o", sql="SELECT 1", database=str(tmp_path / "nope.sqlite")).input)


def test_every_row_is_labelled_once_as_the_evaluation_scores_it_and_a_rerun_resumes(ray_cluster, tmp_path, tweets, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.inference.run import run_batch_inference
    from jobs.inference.tables import ROW_ID
    from jobs.data.templating import Templater
    from jobs.evaluation.scoring import score_labels

    tweets.to_parquet(tmp_path / "in.parquet")
    cfg = config(model_dir, tmp_path / "out", parquet=str(tmp_path / "in.parquet"))
    first = run_batch_inference(cfg)
    assert first == {**first, "rows_total": len(tweets), "rows_done_before": 0, "rows_written": len(tweets)}
    result = pd.read_parquet(tmp_path / "out").sort_values(ROW_ID).reset_index(drop=True)
    assert result[ROW_ID].tolist() == list(range(len(tweets)))
    assert set(result.columns) == {"tweet_id", "sentiment", "confidence", "text", ROW_ID, "prediction", "prediction_confidence",
                                   *(f"prob_{label}" for label in LABELS)}
    pd.testing.assert_series_equal(result["text"], tweets["text"])  # input columns travel with their row
    probs = result[[f"prob_{label}" for label in LABELS]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    assert result["prediction"].tolist() == [LABELS[i] for i in probs.argmax(axis=1)]

    # The same prompt and label scoring as training/evaluation: transformers on the same folder agrees.
    templater = Templater(str(model_dir), SYSTEM_PROMPT, LABELS)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [ids[:prompt_len] for ids, prompt_len in (templater.encode(text, LABELS[0]) for text in tweets["text"])]
    label_ids = [tokenizer(label, add_special_tokens=False).input_ids for label in LABELS]
    expected = torch.softmax(score_labels(model, prompts, label_ids, tokenizer.eos_token_id), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=2e-3)

    # A crash mid-run leaves some parts written and maybe a half-written one: drop two parts and
    # plant a stale temporary file. The rerun computes exactly the missing rows.
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert len(parts) >= 3
    lost = parts[:2]
    lost_rows = sum(len(pd.read_parquet(part)) for part in lost)
    kept = {part.name: part.stat().st_mtime_ns for part in parts[2:]}
    for part in lost:
        part.unlink()
    (tmp_path / "out" / f".{lost[0].name}.tmp").write_bytes(b"half a part")
    second = run_batch_inference(cfg)
    assert second["rows_done_before"] == len(tweets) - lost_rows and second["rows_written"] == lost_rows
    assert {part.name: part.stat().st_mtime_ns for part in parts[2:]} == kept  # done parts untouched
    resumed = pd.read_parquet(tmp_path / "out").sort_values(ROW_ID).reset_index(drop=True)
    assert resumed[ROW_ID].tolist() == list(range(len(tweets)))  # every row exactly once
    np.testing.assert_allclose(resumed[[f"prob_{label}" for label in LABELS]].to_numpy(), probs, atol=1e-5)

    # Resuming another job into the same folder is refused.
    with pytest.raises(ValueError, match="different job"):
        run_batch_inference(config(model_dir, tmp_path / "out", parquet=str(tmp_path / "in.parquet"), text_column="sentiment"))
