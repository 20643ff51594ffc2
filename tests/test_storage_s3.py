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
