"""The S3 test server itself: what the s3:// tests of data and checkpoints stand on."""

from __future__ import annotations

import pytest


def test_s3_server_round_trips_parquet_through_uri_filesystems(s3_server):
    import boto3
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    boto3.client("s3").create_bucket(Bucket="lakeforge-s3-check")
    filesystem, path = pafs.FileSystem.from_uri("s3://lakeforge-s3-check/table.parquet")
    pq.write_table(pa.table({"a": [1, 2, 3]}), path, filesystem=filesystem)
    assert pq.read_table(path, filesystem=filesystem).column("a").to_pylist() == [1, 2, 3]
    listed = boto3.client("s3").list_objects_v2(Bucket="lakeforge-s3-check")["Contents"]
    assert [item["Key"] for item in listed] == ["table.parquet"]


CANARY = "lakeforge-canary-secret-7f3a"  # an AWS secret key that must never leave this process


def test_checkpoint_filesystems_travel_without_credentials_and_use_the_nodes_own(s3_server, tmp_path, monkeypatch):
    """Ray Train's controller and workers are other processes (other nodes): the filesystem built on
    the driver carries the endpoint, never the keys; the process it lands in uses its node's."""
    import os
    import pickle
    import subprocess
    import sys

    import boto3
    import ray.cloudpickle
    from ray.train import Checkpoint

    from cluster.storage import filesystem_for, uri_of

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)  # moto takes any key
    boto3.client("s3").create_bucket(Bucket="lakeforge-fs-check")
    filesystem, path = filesystem_for("s3://lakeforge-fs-check/ckpt")
    assert path == "lakeforge-fs-check/ckpt" and uri_of(filesystem, path) == "s3://lakeforge-fs-check/ckpt"
    # What Ray Train pickles for its controller and workers: the storage filesystem and a resume checkpoint.
    for shipped in (filesystem, Checkpoint(path, filesystem=filesystem)):
        for dumps in (pickle.dumps, ray.cloudpickle.dumps):
            assert CANARY.encode() not in dumps(shipped) and os.environ["AWS_ACCESS_KEY_ID"].encode() not in dumps(shipped)
    (tmp_path / "fs.pkl").write_bytes(pickle.dumps(filesystem))
    writer = ("import pickle, sys, pyarrow.fs; fs = pickle.load(open(sys.argv[1], 'rb'))\n"
              "with fs.open_output_stream('lakeforge-fs-check/ckpt/shard.pt') as out: out.write(b'weights')\n"
              "del fs; pyarrow.fs.finalize_s3()")  # without finalize, the AWS SDK can crash at exit
    # The other process has its node's own credentials (here the same test server's), not the driver's.
    node_env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "the-nodes-own"}
    subprocess.run([sys.executable, "-c", writer, str(tmp_path / "fs.pkl")], env=node_env, check=True, timeout=120)
    body = boto3.client("s3").get_object(Bucket="lakeforge-fs-check", Key="ckpt/shard.pt")["Body"].read()
    assert body == b"weights"

    local, local_path = filesystem_for(str(tmp_path / "x"))
    assert local.type_name == "local" and uri_of(local, local_path) == str(tmp_path / "x")


@pytest.mark.parametrize("uri", ["s3://AKIAEXAMPLE:lakeforge-canary-secret-7f3a@bucket/ckpt",
                                 "s3://lakeforge-canary-secret-7f3a@bucket/data.csv"])
def test_a_storage_uri_holding_credentials_is_refused_without_repeating_them(uri):
    from cluster.storage import filesystem_for
    from jobs.config import SourceSection
    from jobs.data.sources import source_files

    for reach in (lambda: filesystem_for(uri), lambda: source_files(SourceSection(name="s", path=uri, kind="csv"))):
        with pytest.raises(ValueError, match="credentials in a storage URI are refused") as refused:
            reach()
        assert CANARY not in str(refused.value) and "s3://...@bucket/" in str(refused.value)


def test_data_tasks_get_the_location_not_a_filesystem_with_keys(s3_server, monkeypatch):
    """What `read_source` hands Ray Data (the UDF and its arguments, pickled to every task) holds no
    secret; the task builds its filesystem from the location with its own node's credentials."""
    import boto3
    import pandas as pd
    import ray.cloudpickle

    import jobs.data.sources as sources
    from jobs.config import DataSection

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    boto3.client("s3").create_bucket(Bucket="lakeforge-src-check")
    boto3.client("s3").put_object(Bucket="lakeforge-src-check", Key="in/a.jsonl",
                                  Body=b'{"text": "fine", "sentiment": "positive"}\n')
    shipped = []

    class Dataset:  # stands in for Ray Data (no cluster): records what each task would be sent
        def map_batches(self, fn, **options):
            shipped.append(ray.cloudpickle.dumps((fn, options)))
            self.fn, self.options = fn, options
            return self

    dataset = Dataset()
    monkeypatch.setattr(sources.ray.data, "from_items", lambda items, **_: dataset)
    cfg = DataSection(sources=[{"name": "lake", "path": "s3://lakeforge-src-check/in", "kind": "jsonl"}])
    sources.read_source(cfg.resolved_sources()[0], cfg)
    assert shipped and all(CANARY.encode() not in pickled for pickled in shipped)
    assert dataset.options["fn_kwargs"]["location"] == "s3://lakeforge-src-check/in"
    rows = pd.concat(dataset.fn(pd.DataFrame({"path": ["lakeforge-src-check/in/a.jsonl"]}), **dataset.options["fn_kwargs"]))
    assert rows["status"].tolist() == ["ok"] and rows["source"].tolist() == ["lake"]
