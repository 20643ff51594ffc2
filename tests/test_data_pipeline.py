"""The data job end to end on real files of every kind (local, SQL, S3), with broken rows planted:
every row read is accounted for, the quarantine says where and why, near-duplicates are found."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.data.dedup import DUPLICATE_STATUSES
from jobs.data.prepare import DUPLICATES, QUARANTINE, REPORT_HTML, REPORT_JSON, prepare
from jobs.data.split import SPLITS
from jobs.config import DataSection

pytestmark = pytest.mark.integration

_ORIGINAL = "@united my flight to Denver was delayed three hours and nobody at the gate told us anything"


@pytest.fixture(scope="module")
def tweets(small_csv) -> pd.DataFrame:
    """The small tweet sample as clean text (what the other formats are written from)."""
    frame = pd.read_csv(small_csv, encoding="utf-8", encoding_errors="replace", dtype=str, keep_default_na=False)
    frame["text"] = frame["text"].str.replace("\r", " ")  # a bare CR would end a record in the CSV/TSV copies
    return frame[frame["text"] != ""].reset_index(drop=True)


def _quarantine(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / QUARANTINE).sort_values(["source", "source_row"]).reset_index(drop=True)


def _shards(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(out / name) for name in SPLITS], ignore_index=True)


def test_every_source_kind_is_read_tagged_and_accounted(s3_server, ray_cluster, tmp_path, tiny_model_dir, tweets):
    import boto3
    import duckdb
    import pyarrow.fs as pafs

    chunks = [tweets.iloc[i * 25:(i + 1) * 25] for i in range(8)]
    files = tmp_path / "in"
    files.mkdir()
    pq.write_table(pa.Table.from_pandas(chunks[0], preserve_index=False), files / "a.parquet")
    jsonl = [json.dumps(row) for row in chunks[1].to_dict("records")]
    jsonl[3:3] = ['{"text": "broken', '{"text": 17, "sentiment": "positive"}', '  ']  # lines 4, 5 and a blank 6
    (files / "b.jsonl").write_text("\n".join(jsonl) + "\n")
    chunks[2].to_csv(files / "c.csv", index=False)
    chunks[3].rename(columns={"text": "body"}).to_csv(files / "d.tsv", sep="\t", index=False)
    with sqlite3.connect(files / "e.sqlite") as connection:
        chunks[4].to_sql("tweets", connection, index=False)
    with duckdb.connect(str(files / "f.duckdb")) as connection:
        connection.register("frame", chunks[5])
        connection.execute("CREATE TABLE tweets AS SELECT * FROM frame")
    boto3.client("s3").create_bucket(Bucket="lake")
    filesystem, _ = pafs.FileSystem.from_uri("s3://lake/")
    pq.write_table(pa.Table.from_pandas(chunks[6], preserve_index=False), "lake/g/part-0.parquet", filesystem=filesystem)
    with filesystem.open_output_stream("lake/h.jsonl") as stream:
        stream.write(("\n".join(json.dumps(row) for row in chunks[7].to_dict("records")) + "\nnot json\n").encode())

    cfg = DataSection(near_dedup={"enabled": False}, sources=[
        {"name": "parquet", "path": str(files / "a.parquet")},
        {"name": "jsonl", "path": str(files / "b.jsonl")},
        {"name": "csv", "path": str(files / "c.csv")},
        {"name": "tsv", "path": str(files / "d.tsv"), "columns": {"text": "body"}},
        {"name": "sqlite", "path": str(files / "e.sqlite"), "table": "tweets"},
        {"name": "duckdb", "path": str(files / "f.duckdb"), "query": "SELECT text, sentiment FROM tweets"},
        {"name": "s3_parquet", "path": "s3://lake/g", "kind": "parquet"},
        {"name": "s3_jsonl", "path": "s3://lake/h.jsonl"},
    ])
    out = tmp_path / "out"
    manifest = prepare(cfg, tiny_model_dir, out)

    per_source = manifest["per_source"]
    expected_read = {name: 25 for name in per_source} | {"jsonl": 28, "s3_jsonl": 26}
    assert {name: entry["rows_read"] for name, entry in per_source.items()} == expected_read
    # Every physical record (line, Parquet row, query row) is a row read: none skipped uncounted.
    assert {name: entry["physical_records"] for name, entry in per_source.items()} == expected_read
    assert per_source["jsonl"]["quarantined"] == {"bad_json": 1, "wrong_type": 1, "blank_line": 1}
    assert per_source["s3_jsonl"]["quarantined"] == {"bad_json": 1}
    quarantine = _quarantine(out)
    assert quarantine[["source", "source_row", "status"]].values.tolist() == [
        ["jsonl", 4, "bad_json"], ["jsonl", 5, "wrong_type"], ["jsonl", 6, "blank_line"], ["s3_jsonl", 26, "bad_json"]]
    assert quarantine["raw"].iloc[0] == '{"text": "broken'
    shards = _shards(out)
    assert shards.groupby("source").size().to_dict() == {name: entry["kept"] for name, entry in per_source.items()}
    assert set(shards["source"]) == set(expected_read)
    # Each kept row points back at its source row: the sqlite row number is the table's row order.
    sqlite_rows = shards[shards["source"] == "sqlite"].set_index("source_row")["label"]
    assert all(chunks[4]["sentiment"].iloc[row - 1] == label for row, label in sqlite_rows.items())
    # Fingerprints: local files by content hash, objects by ETag.
    identity = manifest["identity"]["sources"]
    assert len(next(iter(identity["parquet"].values()))["sha256"]) == 64
    assert next(iter(identity["s3_parquet"].values()))["etag"]


def _corrupted_tweets(small_csv: Path, path: Path) -> dict[int, str]:
    """A copy of the sample with broken records; returns {record number: expected reason}."""
    lines = small_csv.read_bytes().rstrip(b"\n").split(b"\n")
    header, rows = lines[0], lines[1:]
    planted = {
        3: (b"negative,0.9", "malformed_row"),  # truncated: the text field is gone
        10: (b"positive,0.7,a,b,c,extra", "malformed_row"),
        20: (b"neutral,0.8,   ", "empty_text"),
        30: (b"excited,0.8,what a day", "unknown_label"),
        40: (b"negative,0.8,&nbsp;\x07", "empty_text"),
        50: (b"positive,1.0,bad bytes \xd5\xd5 and \xff more", None),  # repaired, kept
    }
    for number, (line, _) in planted.items():
        rows[number - 1] = line
    rows += [f"negative,0.9,{_ORIGINAL}".encode(), f"negative,0.9,{_ORIGINAL.replace('three', 'four')}!".encode()]
    # A stray quote at the end: the parser merges the records after it into one.
    rows += [b'neutral,0.5,"a stray quote', b"positive,0.9,swallowed one", b"negative,0.9,swallowed two"]
    path.write_bytes(b"\n".join([header, *rows]) + b"\n")
    return {number: reason for number, (_, reason) in planted.items() if reason}


def test_a_corrupted_tweet_file_loses_no_row_and_reports_it(ray_cluster, tmp_path, tiny_model_dir, small_csv):
    corrupted = tmp_path / "corrupted.csv"
    planted = _corrupted_tweets(small_csv, corrupted)
    records = len(corrupted.read_bytes().rstrip(b"\n").split(b"\n")) - 1
    out = tmp_path / "out"
    manifest = prepare(DataSection(source=str(corrupted)), tiny_model_dir, out)

    counts = manifest["counts"]
    # Three physical lines became one record: reported, never silently merged.
    assert counts["rows_read"] == records - 2 and manifest["per_source"]["corrupted"]["physical_records"] == records
    warnings = json.loads((out / REPORT_JSON).read_text())["warnings"]
    assert len(warnings) == 1 and f"{records} lines after the header parsed into {records - 2} records" in warnings[0]
    assert counts["rows_read"] == (counts["kept"] + sum(counts["quarantined"].values()) + sum(counts["filtered"].values())
                                   + counts["exact_duplicates"] + counts["near_duplicates"])
    quarantine = _quarantine(out)
    planted_rows = quarantine[quarantine["source_row"].isin(planted)]
    assert dict(zip(planted_rows["source_row"], planted_rows["status"])) == planted
    assert len(quarantine) == sum(counts["quarantined"].values()) + sum(counts["filtered"].values())
    assert counts["encoding_repaired"] >= 1
    assert len(_shards(out)) == counts["kept"]

    # The planted near-duplicate (one word and the punctuation changed) is removed in favour of the
    # original, and near-dedup removes few of the real, distinct tweets.
    duplicates = pd.read_parquet(out / DUPLICATES)
    near = duplicates[duplicates["status"] == "near_duplicate"]
    texts = set(near["text"])
    original = _ORIGINAL.replace("@united", "<HANDLE>")  # rows are written redacted, duplicates too
    assert (original in texts) != (original.replace("three", "four") + "!" in texts)
    assert len(near) == counts["near_duplicates"] and counts["near_duplicates"] <= 0.03 * records
    assert set(duplicates["status"]) <= set(DUPLICATE_STATUSES)

    report = json.loads((out / REPORT_JSON).read_text())
    assert report["per_source"] == manifest["per_source"]
    assert set(report["quarantine_examples"]) == {*counts["quarantined"], *counts["filtered"]}
    assert report["near_duplicate_clusters"]["rows_removed"] == counts["near_duplicates"]
    assert sum(report["token_length_histogram"]["bins"].values()) == counts["kept"]
    assert report["imbalance_ratio"] > 1
    # A rebuild that fails midway (an empty validation split, found after train is written)
    # leaves the previous shards and manifest in place.
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(ValueError, match="the validation split is empty"):
        prepare(DataSection(source=str(corrupted), validation_fraction=1e-6), tiny_model_dir, out)
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    assert len(_shards(out)) == counts["kept"]

    page = (out / REPORT_HTML).read_text()
    for section in ("Warnings", "Counts at every stage", "Per source", "Quarantine and filters", "Duplicates",
                    "Token lengths", "Labels", "<img"):
        assert section in page


def test_instruction_and_chat_tasks_template_every_answer(ray_cluster, tmp_path, tiny_model_dir):
    instruction = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(30)]
    rows += [{"question": "no answer"}, {"question": "typed", "answer": 4}]
    instruction.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    # Each row's split is a hash draw: with a few dozen rows, wide fractions keep every split non-empty.
    fractions = {"validation_fraction": 0.3, "test_fraction": 0.3}
    cfg = DataSection(task="instruction", system_prompt="", near_dedup={"enabled": False}, **fractions, sources=[
        {"name": "qa", "path": str(instruction), "columns": {"prompt": "question", "response": "answer"}}])
    manifest = prepare(cfg, tiny_model_dir, tmp_path / "instruction")
    assert manifest["per_source"]["qa"]["quarantined"] == {"missing_field": 1, "wrong_type": 1}
    shards = _shards(tmp_path / "instruction")
    assert len(shards) == 30 and (shards["label_id"] == -1).all()
    for mask, prompt_len in zip(shards["loss_mask"], shards["prompt_len"]):
        assert mask[:prompt_len].sum() == 0 and len(mask) > prompt_len and mask[prompt_len:].all()

    chats = tmp_path / "chats.parquet"
    conversations = [[{"role": "user", "content": f"Hi, I am traveler {i}"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": f"Is flight {100 + i} on time?"},
                      {"role": "assistant", "content": f"Flight {100 + i} is on time."}] for i in range(20)]
    conversations += [[{"role": "user", "content": "no answer yet"}], [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]]
    pq.write_table(pa.table({"conversation": conversations}), chats)
    cfg = DataSection(task="chat", near_dedup={"enabled": False}, **fractions,
                      sources=[{"name": "chats", "path": str(chats), "columns": {"messages": "conversation"}}])
    manifest = prepare(cfg, tiny_model_dir, tmp_path / "chat")
    assert manifest["per_source"]["chats"]["quarantined"] == {"bad_messages": 1, "empty_text": 1}
    shards = _shards(tmp_path / "chat")
    assert len(shards) == 20
    assert all(label.startswith("Flight") for label in shards["label"])
    # Loss on both assistant turns: two separate runs of masked tokens per example.
    assert all(((mask[1:] == 1) & (mask[:-1] == 0)).sum() + int(mask[0]) == 2 for mask in shards["loss_mask"])


def test_an_empty_sql_source_is_a_clear_error(ray_cluster, tmp_path, tiny_model_dir):
    database = tmp_path / "empty.sqlite"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE tweets (text TEXT, sentiment TEXT)")
    cfg = DataSection(sources=[{"name": "warehouse", "path": str(database), "table": "tweets"}])
    with pytest.raises(ValueError, match="'warehouse'.*has no rows"):
        prepare(cfg, tiny_model_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="'warehouse'.*no such table"):
        prepare(DataSection(sources=[{"name": "warehouse", "path": str(database), "table": "missing"}]),
                     tiny_model_dir, tmp_path / "out")


def test_rebalancing_oversamples_the_train_split_only_with_augmented_copies(ray_cluster, tmp_path, tiny_model_dir, small_csv):
    # Two tokenizer actors in both templating passes (staging and the copies): the pool, not one actor.
    cfg = DataSection(source=str(small_csv), balance={"strategy": "oversample", "seed": 5}, tokenizer_actors=2)
    manifest = prepare(cfg, tiny_model_dir, tmp_path / "balanced")  # raises if the accounting does not add up
    splits = manifest["splits"]
    train_labels = splits["train"]["labels"]
    assert set(train_labels) == set(cfg.labels) and len(set(train_labels.values())) == 1  # every class at the majority's size
    assert splits["validation"]["augmented_copies"] == splits["test"]["augmented_copies"] == 0  # they measure the real mix
    originals = sum(part["rows"] - part["augmented_copies"] for part in splits.values())
    assert originals == manifest["counts"]["kept"]  # oversampling drops no real row

    train = pd.read_parquet(tmp_path / "balanced" / "train")
    copies = train[train["augmented"]]
    assert len(copies) == splits["train"]["augmented_copies"] > 0
    assert (copies["num_tokens"] > 0).all() and (copies["prompt_len"] < copies["num_tokens"]).all()  # templated like the rest
    real = set(train.loc[~train["augmented"], "text"])
    assert copies["text"].map(lambda text: text not in real).mean() > 0.5  # perturbed, mostly not verbatim repeats
    real_counts = train.loc[~train["augmented"], "label"].value_counts()
    majority = real_counts.idxmax()
    assert train_labels[majority] == real_counts[majority] and majority not in set(copies["label"])  # copies of minorities only


def _plain_rows(dataset) -> list[dict]:
    """A dataset's rows with arrays as lists, so two reads compare with ==."""
    return [{key: value.tolist() if hasattr(value, "tolist") else value for key, value in row.items()}
            for row in dataset.take_all()]


def test_encryption_at_rest_leaves_no_canary_under_storage_root(ray_cluster, tmp_path, tiny_model_dir, small_csv):
    """The canary sits in a kept row, in its exact duplicate and in a row quarantined for its label: the
    plain run shows it in a split, the duplicates, the quarantine and the quality report; the encrypted
    run nowhere under storage_root, while its shards read back equal to the plain ones."""
    from cluster.encryption import DataKeyStore, EncryptionError, EncryptionSettings, KeyShredded, LocalKeyProvider, WrongKey
    from jobs.config import MonitorReference
    from jobs.data.prepare import KEY_STORE, prepare_run_inputs
    from jobs.data.shard_encryption import read_table
    from jobs.data.split import split_dataset
    from jobs.monitoring.run import load_reference
    from tests.conftest import tiny_run_config

    canary = "ZQXCANARY4711"  # capitals and digits: case folding (dedup, the label check) keeps it as it is
    source = tmp_path / "tweets.csv"
    planted = [f"negative,0.9,my bag {canary} never reached Denver", f"negative,0.9,my bag {canary} never reached Denver",
               f"furious,0.9,{canary} under a label that is not ours"]
    source.write_bytes(small_csv.read_bytes() + "\n".join(planted).encode() + b"\n")
    kek = tmp_path / "kek.key"  # outside storage_root, as the docs ask
    encryption = EncryptionSettings(enabled=True, key_file=str(kek))
    plain_cfg, sealed_cfg = (
        tiny_run_config(tmp_path / name, tiny_model_dir, source, "data.near_dedup.enabled=false", *overrides)
        for name, overrides in (("plain", ()), ("sealed", ("security.encryption.enabled=true", f"security.encryption.key_file={kek}"))))
    _, plain_dir, _ = prepare_run_inputs(plain_cfg)
    _, sealed_dir, manifest = prepare_run_inputs(sealed_cfg)

    def holding_canary(root: Path) -> set[str]:
        return {str(path.relative_to(root)).split("/")[0] for path in root.rglob("*")
                if path.is_file() and canary.encode() in path.read_bytes()}

    assert {QUARANTINE, DUPLICATES, REPORT_JSON, REPORT_HTML} <= holding_canary(plain_dir)
    assert holding_canary(plain_dir) & set(SPLITS)  # the test can fail: each of these would leak
    assert holding_canary(tmp_path / "sealed") == set()
    assert manifest["encryption"]["scope"] == "data" and (sealed_cfg.run_dir / KEY_STORE / "data.key.json").exists()
    assert json.loads((sealed_dir / REPORT_JSON).read_text())["examples_left_out"]

    # Every reader decrypts: Ray Data's (training, evaluation; prepare counted each split through it
    # too), pyarrow's (the monitor's reference) for every folder, rows equal to the plain run's.
    assert _plain_rows(split_dataset(sealed_dir, "test", encryption)) == _plain_rows(split_dataset(plain_dir, "test"))
    for folder in (*SPLITS, QUARANTINE, DUPLICATES):
        assert read_table(sealed_dir / folder, encryption).to_pylist() == read_table(plain_dir / folder, None).to_pylist()
    reference = load_reference(MonitorReference(train=str(sealed_dir / "train"), test=str(sealed_dir / "test"),
                                                encryption=encryption))
    assert len(reference["text_chars"]) == manifest["splits"]["train"]["rows"]

    # Clear errors: no settings, a missing or another key-encryption key, a shredded scope.
    with pytest.raises(EncryptionError, match=r"test is encrypted \(scope 'data'.*needs security.encryption"):
        split_dataset(sealed_dir, "test")
    with pytest.raises(EncryptionError, match="key-encryption key file .*missing.key does not exist"):
        split_dataset(sealed_dir, "test", EncryptionSettings(enabled=True, key_file=str(tmp_path / "missing.key")))
    other = tmp_path / "other.key"
    LocalKeyProvider(other).wrap(bytes(32))  # makes the key file: another key-encryption key
    with pytest.raises(WrongKey, match="wrapped by key-encryption key"):
        split_dataset(sealed_dir, "test", EncryptionSettings(enabled=True, key_file=str(other)))
    DataKeyStore(sealed_cfg.run_dir / KEY_STORE, LocalKeyProvider(kek)).shred("data")
    with pytest.raises(KeyShredded, match="scope 'data' was shredded"):
        split_dataset(sealed_dir, "train", encryption)
    with pytest.raises(KeyShredded, match="scope 'data' was shredded"):
        prepare_run_inputs(sealed_cfg)
