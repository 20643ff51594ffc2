"""The S3 test server itself: what the s3:// tests of data and checkpoints stand on."""

from __future__ import annotations


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


def test_checkpoint_filesystem_reaches_s3_from_a_process_without_the_settings(s3_server, tmp_path):
    """Ray Train's controller and workers are other processes (other nodes): the filesystem built
    on the driver must carry the endpoint and credentials the driver was given."""
    import pickle
    import subprocess
    import sys

    import boto3

    from cluster.storage import filesystem_for, uri_of

    boto3.client("s3").create_bucket(Bucket="lakeforge-fs-check")
    filesystem, path = filesystem_for("s3://lakeforge-fs-check/ckpt")
    assert path == "lakeforge-fs-check/ckpt" and uri_of(filesystem, path) == "s3://lakeforge-fs-check/ckpt"
    (tmp_path / "fs.pkl").write_bytes(pickle.dumps(filesystem))
    writer = ("import pickle, sys, pyarrow.fs; fs = pickle.load(open(sys.argv[1], 'rb'))\n"
              "with fs.open_output_stream('lakeforge-fs-check/ckpt/shard.pt') as out: out.write(b'weights')\n"
              "del fs; pyarrow.fs.finalize_s3()")  # without finalize, the AWS SDK can crash at exit
    clean_env = {key: value for key, value in __import__("os").environ.items() if not key.startswith("AWS_")}
    subprocess.run([sys.executable, "-c", writer, str(tmp_path / "fs.pkl")], env=clean_env, check=True, timeout=120)
    body = boto3.client("s3").get_object(Bucket="lakeforge-fs-check", Key="ckpt/shard.pt")["Body"].read()
    assert body == b"weights"

    local, local_path = filesystem_for(str(tmp_path / "x"))
    assert local.type_name == "local" and uri_of(local, local_path) == str(tmp_path / "x")

