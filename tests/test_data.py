import numpy as np
import pytest

from jobs.data import Templater, assign_splits, chat_messages, clean_text, dedup_key, split_position
from jobs.train_loop import collate


@pytest.mark.parametrize("raw, expected", [
    # Real corpus rows that are not valid UTF-8 (double-encoded smart quotes and dashes).
    (b"I don\xd5\xa2_\x8a\xce_\x86\xa2t want either!", "I don't want either!"),
    (b"hands #driverless cars_\xd1_.no thank you", "hands #driverless cars - .no thank you"),
    (b"MT Exactly! \xd5\xa2_\x8a\xce\x81\xd0@OssyFont: hit", "MT Exactly! '@OssyFont: hit"),
    # Valid UTF-8 with replacement characters left by an earlier lossy decode.
    ("cars_\ufffd_.no thank you".encode(), "cars .no thank you"),
    # HTML entities, control characters, runs of whitespace.
    (b"crazed &amp; drunk\x07 drivers \n\n today  ", "crazed & drunk drivers today"),
    # Text that is fine stays as it is, accents and emoji included.
    ("Caf\u00e9 was great \U0001F600".encode(), "Caf\u00e9 was great \U0001F600"),
])
def test_clean_text_repairs_encoding_entities_and_whitespace(raw, expected):
    assert clean_text(raw)[0] == expected


def test_clean_text_flags_only_invalid_utf8_as_repaired():
    assert clean_text(b"fine text")[1] is False
    assert clean_text(b"bad \xd5 byte")[1] is True
    assert clean_text(None) == ("", False)
    assert clean_text(b"   \x00  ")[0] == ""


def test_dedup_key_ignores_case_but_not_content():
    assert dedup_key("Thank you @united") == dedup_key("THANK YOU @UNITED")
    assert dedup_key("Thank you @united") != dedup_key("Thank you @delta")


def test_split_position_is_deterministic_uniform_and_seeded():
    keys = [dedup_key(f"tweet {i}") for i in range(4000)]
    positions = np.array([split_position(k, 0) for k in keys])
    assert positions.tolist() == [split_position(k, 0) for k in keys]
    assert 0.45 < positions.mean() < 0.55 and positions.min() >= 0 and positions.max() < 1
    assert positions.tolist() != [split_position(k, 1) for k in keys]


def test_assign_splits_gives_exact_shares_and_covers_every_row():
    rng = np.random.default_rng(0)
    names = assign_splits(rng.random(1000), validation_fraction=0.05, test_fraction=0.1)
    assert (names == "test").sum() == 100 and (names == "validation").sum() == 50 and (names == "train").sum() == 850
    # The lowest positions are test: a row's split depends only on its rank, never on input order.
    positions = rng.random(10)
    shuffled = rng.permutation(10)
    assert assign_splits(positions, 0.1, 0.2)[shuffled].tolist() == assign_splits(positions[shuffled], 0.1, 0.2).tolist()


def test_assign_splits_keeps_every_split_for_small_classes():
    names = assign_splits(np.array([0.3, 0.1, 0.9]), validation_fraction=0.05, test_fraction=0.1)
    assert sorted(names.tolist()) == ["test", "train", "validation"]


def test_template_masks_everything_but_the_answer(tiny_model_dir):
    templater = Templater(str(tiny_model_dir), "Classify.", ["negative", "neutral", "positive"])
    ids, prompt_len = templater.encode("@united lost my bag", "negative")
    tokenizer = templater.tokenizer
    prompt = tokenizer.apply_chat_template(chat_messages("Classify.", "@united lost my bag"), add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(ids[:prompt_len]) == prompt
    assert tokenizer.decode(ids[prompt_len:]).startswith("negative<|im_end|>")

    batch = collate({"input_ids": np.array([np.array(ids), np.array(ids[:-2])], dtype=object),
                     "prompt_len": np.array([prompt_len, prompt_len])}, pad_id=2)
    labels, mask = batch["labels"], batch["attention_mask"]
    assert (labels[0, :prompt_len] == -100).all()
    assert labels[0, prompt_len:].tolist() == ids[prompt_len:]
    assert mask[1].sum() == len(ids) - 2 and (labels[1, len(ids) - 2:] == -100).all()
