"""Encrypted shards: the data job's Parquet under Parquet modular encryption, and reading it back.

With `security.encryption` on, every Parquet folder the data job writes (the splits, the quarantine,
the duplicates) is encrypted under the data key of one scope of the run's key store (`<run>/keys`),
columns and footer alike (the footer's statistics would show values). Each such folder holds
RECORD beside its files: the scope and where the key store is (relative to the folder, so a moved
storage root still reads), never a key. A reader given only the folder therefore knows it must
decrypt, and under which scope; the key-encryption key comes from the reader's own settings.

No key travels through Ray: write and read tasks get a `ShardKey` (the settings, the key store's
path, the scope) and unwrap the data key where they run, from a key file every node sees or from KMS.
The Ray Data reader is jobs.data.split.read_shards; this module does not import Ray (the monitor
reads shards with pyarrow alone).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cluster.encryption import (DataKeyStore, EncryptionError, EncryptionSettings, ParquetEncryption, key_provider,
                                parquet_encryption)

if TYPE_CHECKING:
    import ray

RECORD = "_encryption.json"  # '_': pyarrow's dataset discovery skips it, so the folder still reads as Parquet


@dataclass(frozen=True)
class ShardKey:
    """Which data key a folder of shards is encrypted under: the key-encryption key's settings, the
    key store folder and the scope. Holds no key material, so it may be pickled into Ray tasks."""

    settings: EncryptionSettings
    key_store: Path
    scope: str

    @classmethod
    def of(cls, settings: EncryptionSettings, key_store: Path, scope: str) -> "ShardKey":
        # Absolute paths: Ray's workers do not run in the driver's working directory.
        if settings.key_file:
            settings = settings.model_copy(update={"key_file": str(Path(settings.key_file).expanduser().resolve())})
        return cls(settings, Path(key_store).resolve(), scope)

    def store(self, create_key_file: bool = False) -> DataKeyStore:
        return DataKeyStore(self.key_store, key_provider(self.settings, create_key_file=create_key_file))

    def parquet(self) -> ParquetEncryption:
        """Fetches the data key now: a shredded scope, a wrong or missing key-encryption key fail here, saying which."""
        return parquet_encryption(self.store(), self.scope)

    def write_args(self) -> dict:
        """Ray Data's `arrow_parquet_args_fn`: called in each write task, so the key is unwrapped there."""
        return {"encryption_properties": self.parquet().encryption_properties}


def write_parquet(dataset: ray.data.Dataset, folder: Path, shard_key: ShardKey | None) -> None:
    """`dataset` as a Parquet folder: plain without a key, else encrypted and with its RECORD."""
    if shard_key is None:
        dataset.write_parquet(str(folder))
        return
    dataset.write_parquet(str(folder), arrow_parquet_args_fn=shard_key.write_args)
    if folder.exists():  # an empty dataset writes no folder
        record = {"encryption": "Parquet modular encryption (AES-GCM), columns and footer", "scope": shard_key.scope,
                  "key_store": os.path.relpath(shard_key.key_store, folder)}
        (folder / RECORD).write_text(json.dumps(record, indent=2))


def folder_key(path: str | Path, settings: EncryptionSettings | None) -> ShardKey | None:
    """The key of an encrypted shard folder (or of a file in one), checked now; None for plain Parquet."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / RECORD).exists():
        return None
    record = json.loads((folder / RECORD).read_text())
    if settings is None or not settings.enabled:
        raise EncryptionError(f"{folder} is encrypted (scope {record['scope']!r}, key store "
                              f"{(folder / record['key_store']).resolve()}): reading it needs security.encryption "
                              "enabled with the key-encryption key that store's keys are wrapped by")
    shard_key = ShardKey.of(settings, folder / record["key_store"], record["scope"])
    shard_key.parquet()  # in the caller's process: a shredded or wrong key fails here, not deep in a Ray task
    return shard_key


def read_table(path: str | Path, settings: EncryptionSettings | None) -> pa.Table:
    """A Parquet file or folder in this process (no Ray), decrypted when it is encrypted."""
    shard_key = folder_key(path, settings)
    if shard_key is None:
        return pads.dataset(str(path), format="parquet").to_table()
    return pq.read_table(str(path), decryption_properties=shard_key.parquet().decryption_properties)
