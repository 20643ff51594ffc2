"""One preprocessing from training to serving: a model folder records what its training text went
through (cleaning, PII rules) and `cluster.text.Preprocessor` applies exactly that at serving."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cluster.config import load_config
from cluster.contracts import ModelArtifact, TextPreprocessing
from cluster.pii import PiiSettings
from cluster.text import HASH_SALT_ENV, Preprocessor
from jobs.config import RunConfig
from jobs.data.cleaning import clean_batch
from tests.conftest import SHIPPED_CONFIG

# Broken encoding as it arrives in a request (mojibake, an HTML entity, stray spaces) and PII.
RAW = ["@united call me at (415) 555-0132 &amp; fix this â€” donâ€™t  ignore me",
       "my card 4111 1111 1111 1111 was charged twice, email jane.doe@example.com",
       "@JaneDoe99 says hi   from  https://t.co/abc123 \x07"]


def data_job_texts(cfg, texts: list[str]) -> list[str]:
    """What the data job writes as the example text of each raw classification row."""
    staged = pd.DataFrame({"record": [json.dumps({"text": text, "label": "negative"}) for text in texts],
                           "status": ["ok"] * len(texts), "raw": texts})
    return clean_batch(staged, cfg).text.tolist()


def test_serving_preprocessing_is_the_data_jobs():
    data = load_config(RunConfig, SHIPPED_CONFIG).data
    preprocess = Preprocessor(TextPreprocessing(clean=True, pii=data.pii))
    served = [preprocess(text) for text in RAW]
    assert served == data_job_texts(data, RAW)
    assert served[0] == "@united call me at <PHONE> & fix this — don't ignore me"  # brand handle kept
    assert "4111" not in served[1] and "<EMAIL>" in served[1] and "<HANDLE>" in served[2]


def test_a_model_folder_without_recorded_preprocessing_takes_text_as_is():
    assert Preprocessor(TextPreprocessing())(RAW[0]) == RAW[0]


def test_the_hash_salt_never_lands_in_the_model_folder_and_must_match_at_serving(tmp_path, monkeypatch):
    salt = "s3cret-salt-of-the-run"
    pii = PiiSettings(actions={"phone": "hash"}, hash_salt=salt)
    ModelArtifact(name="m", base_model="b", labels=["a", "b"],
                  preprocessing=TextPreprocessing(clean=True, pii=pii)).write(tmp_path)
    assert salt not in (tmp_path / "lakeforge_model.json").read_text()
    recorded = ModelArtifact.read(tmp_path).preprocessing

    monkeypatch.delenv(HASH_SALT_ENV, raising=False)
    with pytest.raises(ValueError, match=f"hash \\['phone'\\]: set {HASH_SALT_ENV}"):
        Preprocessor(recorded)
    monkeypatch.setenv(HASH_SALT_ENV, "another-salt-entirely")
    with pytest.raises(ValueError, match="not the PII hash salt this model was trained with"):
        Preprocessor(recorded)
    monkeypatch.setenv(HASH_SALT_ENV, salt)
    # The same hashed token as the data job's redaction with the run's own settings.
    assert Preprocessor(recorded)(RAW[0]) == Preprocessor(TextPreprocessing(clean=True, pii=pii))(RAW[0])
    assert "<PHONE_" in Preprocessor(recorded)(RAW[0])
