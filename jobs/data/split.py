"""The train/validation/test split, a pure function of each row's dedup key, the seed and the
fractions (never of file order or block layout), and the readers of the written splits, including
the pinned test rows the demo is scored on."""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray

from cluster.encryption import EncryptionSettings
from jobs.data.shard_encryption import ShardKey, folder_key

SPLITS = ("train", "validation", "test")


def split_position(key: str, seed: int | str) -> float:
    """A uniform number in [0, 1) fixed by the row's content and the seed (not by file order)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(positions: np.ndarray, validation_fraction: float, test_fraction: float) -> np.ndarray:
    """Each row's split from its own position alone: [0, test) is test, then validation, the rest
    train. A pure function of the row's key, the seed and the fractions: adding, removing or
    re-partitioning other rows never moves a row to another split, so a test set can be pinned."""
    positions = np.asarray(positions, dtype=float)
    return np.where(positions < test_fraction, "test",
                    np.where(positions < test_fraction + validation_fraction, "validation", "train")).astype(object)


def assign_split(batch: pd.DataFrame, seed: int, validation_fraction: float, test_fraction: float) -> pd.DataFrame:
    batch = batch.copy()
    batch["position"] = [split_position(key, seed) for key in batch["key"]]
    batch["split"] = assign_splits(batch["position"].to_numpy(), validation_fraction, test_fraction)
    return batch


def split_dataset(data_dir: str | Path, split: str, encryption: EncryptionSettings | None = None) -> ray.data.Dataset:
    """One split's shards, read in order: without preserve_order, limit() keeps whichever blocks
    finish first (a uniform sample still, shards being in hash order, but a different one each
    run), and workers would see batches in a different order. Same config, same rows, same order.
    Encrypted shards are decrypted with the run's `security.encryption` (an error without it)."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return read_shards(Path(data_dir) / split, encryption)


def read_shards(folder: str | Path, encryption: EncryptionSettings | None) -> ray.data.Dataset:
    """A Parquet folder as a Ray dataset, decrypted when the data job encrypted it
    (jobs/data/shard_encryption.py); plain folders read exactly as before."""
    shard_key = folder_key(folder, encryption)
    if shard_key is None:
        return ray.data.read_parquet(str(folder))
    files = sorted(str(path) for path in Path(folder).glob("*.parquet"))  # the order read_parquet lists them in
    return ray.data.read_datasource(EncryptedParquetDatasource(files, shard_key))


def _read_decrypted(files: list[str], shard_key: ShardKey):
    decryption = shard_key.parquet().decryption_properties
    for file in files:
        parquet = pq.ParquetFile(file, decryption_properties=decryption)
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group)


class EncryptedParquetDatasource(ray.data.Datasource):
    """Encrypted Parquet files in order, contiguous runs of them per read task. Ray Data's own
    read_parquet cannot decrypt in its read tasks (pyarrow's scan options lose their decryption
    properties when pickled); here each task unwraps the data key where it runs, so none travels."""

    def __init__(self, files: list[str], shard_key: ShardKey):
        super().__init__()
        self.files, self.shard_key = files, shard_key
        self.sizes = [os.path.getsize(file) for file in files]

    def estimate_inmemory_data_size(self) -> int:
        return sum(self.sizes)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        tasks = max(1, min(parallelism, len(self.files)))
        bounds = [round(i * len(self.files) / tasks) for i in range(tasks + 1)]
        return [ReadTask(partial(_read_decrypted, self.files[start:end], self.shard_key),
                         BlockMetadata(num_rows=None, size_bytes=sum(self.sizes[start:end]),
                                       input_files=self.files[start:end], exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for start, end in zip(bounds, bounds[1:]) if end > start]


def read_test_keys(path: str | Path) -> list[str]:
    """The pinned test rows' keys: one 32-hex-digit dedup key per line, no repeats."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"eval.test_keys={str(path)!r}: cannot read the key file: {error}") from error
    bad = [line for line in lines if len(line) != 32 or any(c not in "0123456789abcdef" for c in line)]
    if bad or not lines or len(set(lines)) != len(lines):
        problem = f"{len(bad)} malformed line(s), e.g. {bad[0][:40]!r}" if bad else "no keys" if not lines else "repeated keys"
        raise ValueError(f"eval.test_keys={str(path)!r}: {problem} (expected one 32-hex-digit row key per line)")
    return lines


def pinned_test_rows(data_dir: str | Path, keys: list[str], encryption: EncryptionSettings | None = None) -> ray.data.Dataset:
    """Exactly the pinned rows of the test split, in shard order; fails if the data no longer holds
    them where they belong (a changed source, split or dedup would silently change the yardstick)."""
    wanted = set(keys)
    test = split_dataset(data_dir, "test", encryption).filter(lambda row: row["key"] in wanted).materialize()
    missing = wanted - set(test.unique("key")) if test.count() else wanted
    if missing:
        raise ValueError(f"{len(missing)} of {len(wanted)} pinned test keys are not in the test split (e.g. {sorted(missing)[0]}): "
                         "the source, the cleaning or the split changed; re-pin with scripts/pin_test_keys.py only on purpose")
    for split in ("train", "validation"):
        leaked = split_dataset(data_dir, split, encryption).filter(lambda row: row["key"] in wanted).count()
        if leaked:
            raise ValueError(f"{leaked} pinned test rows are in the {split} split")
    return test
