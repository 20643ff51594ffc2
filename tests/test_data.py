import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from cluster.prompting import chat_messages
from cluster.text import clean_text, decode_text
from jobs.config import BalanceSettings
from jobs.config import DataSection, RunConfig, SourceSection, TaskSection
from jobs.data.balance import balanced_sample, rebalance_class
from jobs.data.cleaning import validate_record
from jobs.data.dedup import band_keys, dedup_key, near_duplicate_clusters
from jobs.data.prepare import _swap_in, prepare, task_data_dirs
from jobs.data.sources import _csv_rows, _jsonl_rows, _parquet_rows, fingerprint_source, physical_records, source_files
from jobs.data.split import assign_splits, pinned_test_rows, read_test_keys, split_position
from jobs.data.templating import Templater
from jobs.train.batches import collate


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


def test_assign_splits_is_a_function_of_each_rows_position_alone():
    rng = np.random.default_rng(0)
    positions = rng.random(20_000)
    names = assign_splits(positions, validation_fraction=0.05, test_fraction=0.1)
    shares = {name: (names == name).mean() for name in ("test", "validation", "train")}
    assert abs(shares["test"] - 0.10) < 0.01 and abs(shares["validation"] - 0.05) < 0.01
    assert set(names[positions < 0.1]) == {"test"} and set(names[(positions >= 0.1) & (positions < 0.15)]) == {"validation"}
    # Any subset, in any order, gives each row the split it gets in the whole: rows added to or
    # removed from a source never move another row between splits (pinned test rows stay pinned).
    subset = rng.permutation(20_000)[:500]
    assert assign_splits(positions[subset], 0.05, 0.1).tolist() == names[subset].tolist()


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


# --- sources, validation, templating and near-duplicates: pure functions, no Ray -------------------

COLUMNS = {"text": "text", "label": "sentiment"}


def test_decode_text_repairs_or_refuses_invalid_utf8():
    assert decode_text(b"caf\xc3\xa9") == ("caf\u00e9", False)
    assert decode_text(b"don\xd5t", "repair") == ("don't", True)
    assert decode_text(b"don\xd5t", "quarantine") == (None, False)


def test_csv_rows_number_every_record_and_keep_malformed_ones():
    data = b"sentiment,text\npositive,fine\nnegative\nneutral,\"a,b\",extra\nnegative,bad \xd5 byte\npositive,last\n"
    rows = list(_csv_rows(io.BytesIO(data), COLUMNS, ",", "quarantine"))
    assert [(number, status) for number, _, status, _, _ in rows] == [
        (1, "ok"), (2, "malformed_row"), (3, "malformed_row"), (4, "undecodable"), (5, "ok")]
    assert rows[0][1] == {"text": "fine", "label": "positive"} and rows[1][3] == "negative"
    repaired = list(_csv_rows(io.BytesIO(data), COLUMNS, ",", "repair"))[3]
    assert repaired[2] == "ok" and repaired[4] is True and repaired[1]["text"] == "bad ' byte"


def test_jsonl_rows_number_lines_and_never_stop_on_a_bad_one():
    lines = [b'{"text": "ok one", "sentiment": "positive"}', b"", b'{"text": "cut', b"[1, 2]",
             b'{"text": "bad \xff", "sentiment": "neutral"}', b'{"text": 5}', b'{"sentiment": "neutral", "text": null}']
    rows = list(_jsonl_rows(io.BytesIO(b"\n".join(lines) + b"\n"), COLUMNS, "quarantine"))
    assert [(number, status) for number, _, status, _, _ in rows] == [
        (1, "ok"), (2, "blank_line"), (3, "bad_json"), (4, "bad_json"), (5, "undecodable"), (6, "ok"), (7, "ok")]
    assert rows[2][3] == '{"text": "cut' and rows[4][3] == '{"text": "bad \\xff", "sentiment": "neutral"}'
    assert rows[5][1] == {"text": 5} and rows[6][1] == {"label": "neutral"}  # null: a missing field


def test_parquet_rows_turn_nulls_into_missing_fields(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", None], "sentiment": ["positive", "neutral"]}), path)
    rows = list(_parquet_rows(pa.OSFile(str(path)), COLUMNS, "repair"))
    assert [(number, fields) for number, fields, _, _, _ in rows] == [(1, {"text": "a", "label": "positive"}), (2, {"label": "neutral"})]
    with pytest.raises(ValueError, match="lacks column"):
        list(_parquet_rows(pa.OSFile(str(path)), {"text": "body"}, "repair"))


@pytest.mark.parametrize("task, record, reason", [
    ("classification", {"label": "positive"}, "missing_field"),
    ("classification", {"text": 12, "label": "positive"}, "wrong_type"),
    ("classification", {"text": "  &nbsp; \x07 ", "label": "positive"}, "empty_text"),
    ("classification", {"text": "hi", "label": "angry"}, "unknown_label"),
    ("classification", {"text": "hi", "label": 1}, "wrong_type"),
    ("instruction", {"prompt": "q"}, "missing_field"),
    ("instruction", {"prompt": "q", "response": ["a"]}, "wrong_type"),
    ("chat", {"messages": "not json"}, "bad_json"),
    ("chat", {"messages": {"role": "user"}}, "wrong_type"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "bad_messages"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "bad_messages"),  # no answer to train on
    ("chat", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]}, "wrong_type"),
])
def test_validate_record_names_the_reason(task, record, reason):
    assert validate_record(record, DataSection(task=task)) == (reason, None)


def test_validate_record_builds_the_conversation_of_each_task():
    cfg = DataSection(system_prompt="Be brief.")
    assert validate_record({"text": "I &amp; my bag ", "label": " Negative"}, cfg)[1] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "I & my bag"},
        {"role": "assistant", "content": "negative"}]
    assert validate_record({"prompt": "2+2?", "response": "4"}, DataSection(task="instruction", system_prompt=""))[1] == [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    own_system = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert validate_record({"messages": json.dumps(own_system)}, DataSection(task="chat"))[1] == own_system


def test_chat_template_masks_every_assistant_turn(tiny_model_dir):
    templater = Templater(str(tiny_model_dir), "Classify.", ["negative", "neutral", "positive"])
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "goodbye"}]
    ids, mask, prompt_len = templater.encode_messages(messages)
    decode = templater.tokenizer.decode
    assert decode(ids) == templater.tokenizer.apply_chat_template(messages, tokenize=False)
    runs, current = [], []
    for token, masked in zip(ids + [None], mask + [0]):
        if masked:
            current.append(token)
        elif current:
            runs, current = runs + [decode(current)], []
    assert runs == ["hi there<|im_end|>\n", "goodbye<|im_end|>\n"]
    assert decode(ids[prompt_len:]).startswith("goodbye") and sum(mask[:prompt_len]) > 0

    batch = collate({"input_ids": np.array([np.array(ids)], dtype=object), "prompt_len": np.array([prompt_len]),
                     "loss_mask": np.array([np.array(mask)], dtype=object)}, pad_id=2)
    assert (batch["labels"][0] != -100).tolist() == [bool(m) for m in mask]


def _bands(texts: list[str], strata: list[str] | None = None) -> pd.DataFrame:
    batch = pd.DataFrame({"text": texts, "key": [dedup_key(t) for t in texts], "stratum": strata or ["negative"] * len(texts)})
    return band_keys(batch, threshold=0.7, num_perm=128, width=5, seed=1)


def _candidate_groups(bands: pd.DataFrame) -> set[frozenset]:
    return {frozenset(group["key"]) for _, group in bands.groupby("band") if group["key"].nunique() > 1}


def test_minhash_bands_pair_near_duplicates_only():
    original = "@united my flight to Denver was delayed three hours and nobody told us anything"
    planted = [original, "@united my flight to Denver was delayed three hours and nobody told us anything!!",
               "@united my flight to Denver was delayed four hours and nobody told us anything"]
    distinct = ["@SouthwestAir thanks for the great service on my flight to Austin today",
                "@JetBlue lost my bag again, third time this year, unbelievable"]
    pairs = _candidate_groups(_bands(planted + distinct))
    keys = [dedup_key(t) for t in planted + distinct]
    assert any({keys[0], keys[1]} <= group for group in pairs) and any({keys[0], keys[2]} <= group for group in pairs)
    assert not any(group & set(keys[3:]) for group in pairs)
    # The same text in two classes is not a near-duplicate pair: bands are per class.
    assert not _candidate_groups(_bands(planted[:2], ["negative", "positive"]))


def test_near_duplicate_clusters_are_connected_components_with_a_fixed_representative():
    clusters = near_duplicate_clusters([("c", "d"), ("a", "b"), ("b", "c"), ("x", "y")])
    assert clusters == [["a", "b", "c", "d"], ["x", "y"]]
    assert near_duplicate_clusters([("b", "a"), ("c", "b")]) == [["a", "b", "c"]]


def test_sources_config_infers_kinds_and_names_bad_settings(tmp_path):
    assert SourceSection(name="a", path="s3://bucket/x.jsonl").kind == "jsonl"
    assert SourceSection(name="a", path="/data/t.duckdb", table="tweets").kind == "duckdb"
    for bad, message in [({"name": "a", "path": "/data/folder"}, "cannot infer the kind"),
                         ({"name": "a", "path": "/d/t.sqlite"}, "exactly one of table or query"),
                         ({"name": "a", "path": "/d/t.csv", "table": "x"}, "sqlite and duckdb sources only"),
                         ({"name": "a", "path": "/d/t.csv", "columns": {"body": "x"}}, "unknown task field")]:
        with pytest.raises(ValidationError, match=message):
            SourceSection(**bad)
    with pytest.raises(ValidationError, match="not both"):
        DataSection(source="a.csv", sources=[{"name": "a", "path": "a.csv"}])
    with pytest.raises(ValidationError, match="distinct"):
        DataSection(sources=[{"name": "a", "path": "a.csv"}, {"name": "a", "path": "b.csv"}])
    with pytest.raises(ValidationError, match="sources.0.pth"):
        DataSection(sources=[{"name": "a", "pth": "a.csv"}])
    cfg = DataSection(task="instruction", sources=[{"name": "a", "path": "a.jsonl", "columns": {"prompt": "question"}}])
    assert cfg.column_map(cfg.sources[0]) == {"prompt": "question", "response": "response"}


def test_missing_or_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="'gone'.*does not exist"):
        source_files(SourceSection(name="gone", path=str(tmp_path / "gone.csv")))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match="'empty'.*is empty"):
        fingerprint_source(SourceSection(name="empty", path=str(tmp_path / "empty.jsonl")))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "b.csv").write_bytes(b"text,sentiment\nx,positive\n")
    (tmp_path / "folder" / "_SUCCESS").write_bytes(b"")
    _, files = source_files(SourceSection(name="f", path=str(tmp_path / "folder"), kind="csv"))
    assert [Path(f).name for f in files] == ["b.csv"]


def test_rebalance_class_reaches_the_run_wide_target_and_rewrites_copies():
    messages = lambda text: json.dumps([{"role": "user", "content": text}, {"role": "assistant", "content": "positive"}])  # noqa: E731
    texts = [f"great flight number {i} thanks to the crew" for i in range(4)]
    group = pd.DataFrame({"text": texts, "label": "positive", "source": "s", "source_row": [7, 8, 9, 10],
                          "messages": [messages(t) for t in texts]})
    out = rebalance_class(group, BalanceSettings(strategy="oversample"), target=10)
    assert len(out) == 10 and out["augmented"].sum() == 6
    assert set(out["source_row"]) == {7, 8, 9, 10}  # copies point back at their original's source row
    for text, conversation in zip(out["text"], out["messages"]):
        assert json.loads(conversation)[0]["content"] == text
    assert len(rebalance_class(group, BalanceSettings(strategy="undersample"), target=3)) == 3


def test_the_compact_template_is_short_and_serving_renders_the_same_prompt(tiny_model_dir):
    from cluster.prompting import label_token_ids, prompt_ids

    text, labels = "@united lost my bag", ["negative", "neutral", "positive"]
    chatml = Templater(str(tiny_model_dir), "Classify.", labels)
    compact = Templater(str(tiny_model_dir), "Classify.", labels, template="compact")
    ids, prompt_len = compact.encode(text, "negative")
    tokenizer = compact.tokenizer
    assert tokenizer.decode(ids[:prompt_len]) == "Classify.\n@united lost my bag\n"
    assert ids[prompt_len:] == label_token_ids(tokenizer, ["negative"])[0] + [tokenizer.eos_token_id]
    assert ids[:prompt_len] == prompt_ids(tokenizer, "Classify.", text)  # /v1/classify, batch inference
    assert 2 * len(ids) <= len(chatml.encode(text, "negative")[0])  # half the tokens or fewer
    # No system prompt: no line for it (SmolLM2's own template inserts a default one).
    bare = Templater(str(tiny_model_dir), "", labels, template="compact")
    assert bare.tokenizer.decode(bare.encode(text, "neutral")[0]) == "@united lost my bag\nneutral<|im_end|>"


def _shards(root: Path, splits: dict[str, list[str]]) -> Path:
    for split, texts in splits.items():
        (root / split).mkdir(parents=True)
        keys = [dedup_key(text) for text in texts]
        pq.write_table(pa.table({"text": texts, "key": keys, "position": [split_position(k, 0) for k in keys]}),
                       root / split / "part-0.parquet")
    return root


def test_pinned_test_rows_are_exactly_the_keys_and_never_in_training(ray_cluster, tmp_path):
    data_dir = _shards(tmp_path / "data", {"train": ["a", "b"], "validation": ["c"], "test": ["d", "e", "f"]})
    rows = pinned_test_rows(data_dir, [dedup_key("f"), dedup_key("d")]).to_pandas()
    assert sorted(rows["text"]) == ["d", "f"]
    with pytest.raises(ValueError, match="1 of 2 pinned test keys are not in the test split"):
        pinned_test_rows(data_dir, [dedup_key("d"), dedup_key("zzz")])
    leaky = _shards(tmp_path / "leaky", {"train": ["a", "d"], "validation": ["c"], "test": ["d", "e"]})
    with pytest.raises(ValueError, match="1 pinned test rows are in the train split"):
        pinned_test_rows(leaky, [dedup_key("d")])


def test_test_key_file_is_checked(tmp_path):
    good = tmp_path / "keys.txt"
    good.write_text(f"{dedup_key('a')}\n{dedup_key('b')}\n")
    assert read_test_keys(good) == [dedup_key("a"), dedup_key("b")]
    for content, problem in [("../../etc/passwd\n", "malformed"), ("", "no keys"), (f"{dedup_key('a')}\n" * 2, "repeated")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(content)
        with pytest.raises(ValueError, match=problem):
            read_test_keys(bad)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="cannot read"):
        read_test_keys(tmp_path / "binary.txt")


def test_physical_records_count_lines_rows_and_query_results(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\n\n{"text": "b"}')  # a blank line and no final newline: 3 lines
    csv = tmp_path / "rows.csv"
    csv.write_bytes(b'text,sentiment\n"one\nline two",positive\nthree,neutral\n')  # 3 lines after the header, 2 records
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["x"] * 7}), parquet)
    assert physical_records(SourceSection(name="j", kind="jsonl", path=str(jsonl))) == 3
    assert physical_records(SourceSection(name="c", kind="csv", path=str(csv))) == 3
    assert physical_records(SourceSection(name="p", kind="parquet", path=str(parquet))) == 7


def test_shard_folder_is_replaced_only_once_the_new_one_is_complete(tmp_path):
    target = tmp_path / "data"
    (target / "train").mkdir(parents=True)
    (target / "train" / "old.parquet").write_text("old")
    built = tmp_path / "data.building"
    (built / "train").mkdir(parents=True)
    (built / "train" / "new.parquet").write_text("new")
    _swap_in(built, target)
    assert [p.name for p in (target / "train").iterdir()] == ["new.parquet"] and not built.exists()
    assert not (tmp_path / "data.previous").exists()


def test_a_task_named_dot_dot_never_reaches_the_run_folder(tmp_path):
    """prepare() swaps in and deletes whole folders: a task folder resolving to the run folder (a task
    named '..') would delete the run. Names are validated; these checks hold even if that is bypassed."""
    run = RunConfig(storage_root=str(tmp_path), name="run")
    (run.run_dir / "model").mkdir(parents=True)
    dotted = run.model_copy(update={"tasks": [TaskSection.model_construct(name="..", weight=1.0, data=DataSection())]})
    with pytest.raises(ValueError, match="leads outside"):
        task_data_dirs(dotted)
    with pytest.raises(ValueError, match="leads outside"):  # before any Ray work or deletion
        prepare(DataSection(), tmp_path, run.run_dir / "task_data" / "..")
    assert (run.run_dir / "model").is_dir()


def test_balanced_sample_cuts_every_class_to_the_smallest_and_is_deterministic(ray_cluster):
    import ray

    rows = [{"key": dedup_key(f"{label} {i}"), "label": label} for label, n in (("neg", 3000), ("neu", 2000), ("pos", 600))
            for i in range(n)]
    split = ray.data.from_items(rows)
    sample = balanced_sample(split, {"neg": 3000, "neu": 2000, "pos": 600}, seed=0).to_pandas()
    sizes = sample["label"].value_counts().to_dict()
    assert sizes["pos"] == 600 and all(abs(sizes[label] - 600) < 75 for label in ("neg", "neu"))
    again = balanced_sample(split, {"neg": 3000, "neu": 2000, "pos": 600}, seed=0).to_pandas()
    # The same rows (their order is Ray Data's block order, which a loaded machine can change).
    assert sorted(again["key"]) == sorted(sample["key"])
    other = balanced_sample(split, {"neg": 3000, "neu": 2000, "pos": 600}, seed=1).to_pandas()
    assert set(other["key"]) != set(sample["key"])
    # A floor above the smallest class: the small class keeps every row, the others are cut to the floor.
    floored = balanced_sample(split, {"neg": 3000, "neu": 2000, "pos": 600}, seed=0, min_rows=1000).to_pandas()
    sizes = floored["label"].value_counts().to_dict()
    assert sizes["pos"] == 600 and all(abs(sizes[label] - 1000) < 100 for label in ("neg", "neu"))
