"""Encryption at rest (cluster.encryption): key providers, data keys that rotate and shred, encrypted
files and Parquet shards. Fast: no Ray; KMS is the loopback moto server of `s3_server`."""

import base64
import json
import logging
import os
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from cluster.encryption import (
    HEADER,
    AwsKmsKeyProvider,
    DataKeyMissing,
    DataKeyStore,
    EncryptionError,
    EncryptionSettings,
    KeyShredded,
    LocalKeyProvider,
    TamperedCiphertext,
    WrongKey,
    decrypt_file,
    encrypt_file,
    key_provider,
    parquet_encryption,
    read_encrypted,
)

CANARY = b"CANARY-7f3a-do-not-leak"
CHUNK = 64  # small chunks, so a few hundred bytes make several


def plaintext(size=300):
    """`size` bytes with the canary in the middle and no two chunks alike."""
    body = bytes((i * 7 + i // 251) % 256 for i in range(size))
    middle = size // 2
    return body[:middle] + CANARY + body[middle + len(CANARY):]


@pytest.fixture
def store(tmp_path):
    return DataKeyStore(tmp_path / "keys", LocalKeyProvider(tmp_path / "kek-a.key"))


def encrypted(tmp_path, data_key, data=None, chunk_bytes=CHUNK):
    source, target = tmp_path / "plain.bin", tmp_path / "sealed.bin"
    source.write_bytes(plaintext() if data is None else data)
    encrypt_file(source, target, data_key, chunk_bytes=chunk_bytes)
    return target


def chunk_span(index, chunk_bytes=CHUNK):
    """Byte range of the index-th sealed chunk in an encrypted file."""
    start = HEADER.size + index * (chunk_bytes + 16)
    return start, start + chunk_bytes + 16


# --- settings


def test_settings_default_off_and_every_field_described():
    settings = EncryptionSettings()
    assert settings.enabled is False
    assert all(field.description for field in EncryptionSettings.model_fields.values())


def test_settings_reject_unknown_keys_missing_keys_and_uris():
    with pytest.raises(ValidationError, match="extra"):
        EncryptionSettings(enabled=True, key_file="/k", kms_key="x")
    with pytest.raises(ValidationError, match="needs encryption.kms_key_id"):
        EncryptionSettings(enabled=True, provider="aws_kms")
    with pytest.raises(ValidationError, match="needs encryption.key_file"):
        EncryptionSettings(enabled=True, provider="local_file")
    with pytest.raises(ValidationError, match="not a URI"):
        EncryptionSettings(enabled=True, key_file="s3://bucket/kek.key")
    with pytest.raises(ValidationError, match="kms_key_id is for provider aws_kms"):
        EncryptionSettings(provider="local_file", key_file="/k", kms_key_id="alias/x")
    assert EncryptionSettings(enabled=True, provider="aws_kms", kms_key_id="alias/lakeforge").kms_key_id == "alias/lakeforge"


def test_settings_make_their_provider(tmp_path):
    provider = key_provider(EncryptionSettings(enabled=True, key_file=str(tmp_path / "kek.key")))
    assert isinstance(provider, LocalKeyProvider) and provider.key_file == tmp_path / "kek.key"
    # Readers and Ray tasks never make a key file: a new KEK could not unwrap what the lost one wrapped.
    reader = key_provider(EncryptionSettings(enabled=True, key_file=str(tmp_path / "gone.key")), create_key_file=False)
    with pytest.raises(EncryptionError, match=r"key-encryption key file .*gone.key does not exist"):
        reader.key_id
    assert not (tmp_path / "gone.key").exists()


def test_the_run_config_switch_is_off_by_default_and_strict(tmp_path):
    from jobs.config import MonitorReference, RunConfig

    assert RunConfig().security.encryption.enabled is False
    on = RunConfig(security={"encryption": {"enabled": True, "key_file": str(tmp_path / "kek.key")}})
    assert on.security.encryption == EncryptionSettings(enabled=True, key_file=str(tmp_path / "kek.key"))
    with pytest.raises(ValidationError, match="extra"):
        RunConfig(security={"encryption": {"enabled": True}, "audit": {}})
    with pytest.raises(ValidationError, match="needs encryption.key_file"):
        RunConfig(security={"encryption": {"enabled": True}})
    assert MonitorReference(train="t", test="t").encryption.enabled is False


# --- the local key-encryption key


def test_local_key_file_is_made_owner_only(tmp_path):
    provider = LocalKeyProvider(tmp_path / "sub" / "kek.key")
    data_key = os.urandom(32)
    assert provider.unwrap(provider.wrap(data_key)) == data_key
    info = os.stat(tmp_path / "sub" / "kek.key")
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == 32


def test_group_readable_or_missing_key_file_is_refused(tmp_path):
    provider = LocalKeyProvider(tmp_path / "kek.key")
    wrapped = provider.wrap(os.urandom(32))
    os.chmod(tmp_path / "kek.key", 0o640)
    with pytest.raises(EncryptionError, match=r"key-encryption key file .*kek.key is readable by group or others \(mode 0640\)"):
        provider.unwrap(wrapped)
    (tmp_path / "kek.key").unlink()
    # unwrapping never makes a new KEK: it could not unwrap what the lost one wrapped
    with pytest.raises(EncryptionError, match=r"key-encryption key file .*kek.key does not exist"):
        provider.unwrap(wrapped)
    assert not (tmp_path / "kek.key").exists()


def test_wrong_kek_does_not_unwrap(tmp_path, store):
    data_key = store.data_key("run-1", create=True)
    other = LocalKeyProvider(tmp_path / "kek-b.key")
    with pytest.raises(WrongKey, match="is wrapped by key-encryption key local:.*the key given is local:"):
        DataKeyStore(store.folder, other).data_key("run-1")
    record = json.loads((store.folder / "run-1.key.json").read_text())
    with pytest.raises(WrongKey, match="kek-b.key does not unwrap this data key"):
        other.unwrap(base64.b64decode(record["wrapped_key"]))
    assert store.data_key("run-1") == data_key


# --- data keys


def test_data_key_is_stored_only_wrapped_and_never_logged(store, caplog):
    caplog.set_level(logging.DEBUG)
    data_key = store.data_key("run-1", create=True)
    assert len(data_key) == 32 and store.data_key("run-1") == data_key
    assert store.data_key("run-1", create=True) == data_key  # an existing key is kept, not replaced
    record = json.loads((store.folder / "run-1.key.json").read_text())
    assert set(record) == {"scope", "key_id", "wrapped_key", "created"}
    assert record["key_id"] == store.provider.key_id
    forms = [data_key, base64.b64encode(data_key), data_key.hex().encode()]
    for path in store.folder.parent.rglob("*"):
        if path.is_file():
            assert not any(form in path.read_bytes() for form in forms), path
    assert not any(form.decode("latin-1") in caplog.text for form in forms)
    assert "run-1" in caplog.text  # the log did record the event, just not the key
    assert store.data_key("run-2", create=True) != data_key
    with pytest.raises(DataKeyMissing, match="scope 'run-3' has no data key"):
        store.data_key("run-3")
    with pytest.raises(ValueError, match="not a valid name"):
        store.data_key("../escape", create=True)


def test_rotation_rewraps_keys_and_leaves_data_as_it_is(tmp_path, store):
    keys = {scope: store.data_key(scope, create=True) for scope in ("run-1", "source-a")}
    sealed = encrypted(tmp_path, keys["run-1"])
    sealed_bytes = sealed.read_bytes()
    old, new = store.provider, LocalKeyProvider(tmp_path / "kek-b.key")
    assert store.rotate(new) == 2
    assert store.rotate(new) == 0  # nothing left under the old KEK: a rerun after an interruption is harmless
    assert sealed.read_bytes() == sealed_bytes
    reopened = DataKeyStore(store.folder, new)
    assert {scope: reopened.data_key(scope) for scope in keys} == keys
    assert b"".join(read_encrypted(sealed, reopened.data_key("run-1"))) == plaintext()
    record = json.loads((store.folder / "run-1.key.json").read_text())
    assert record["key_id"] == new.key_id != old.key_id and "rotated" in record
    with pytest.raises(WrongKey, match="is wrapped by key-encryption key"):
        DataKeyStore(store.folder, old).data_key("run-1")
    with pytest.raises(WrongKey, match="does not unwrap this data key"):
        old.unwrap(base64.b64decode(record["wrapped_key"]))


def test_shredding_makes_a_file_unreadable_and_leaves_other_scopes(tmp_path, store):
    data_key = store.data_key("run-1", create=True)
    kept = store.data_key("run-2", create=True)
    sealed = encrypted(tmp_path, data_key)
    del data_key
    wrapped = json.loads((store.folder / "run-1.key.json").read_text())["wrapped_key"]
    os.link(store.folder / "run-1.key.json", tmp_path / "second-link.json")  # sees the blocks the unlink frees
    store.shred("run-1")
    assert not (store.folder / "run-1.key.json").exists()
    assert wrapped.encode() not in (tmp_path / "second-link.json").read_bytes()  # overwritten before the unlink
    assert store.scopes() == ["run-2"]
    with pytest.raises(KeyShredded, match="data key of scope 'run-1' was shredded"):
        store.data_key("run-1")
    with pytest.raises(KeyShredded, match="'run-1'"):
        store.data_key("run-1", create=True)  # a shredded scope is not silently re-keyed
    with pytest.raises(KeyShredded):
        DataKeyStore(store.folder, store.provider).data_key("run-1")  # another process reads the tombstone too
    with pytest.raises(KeyShredded):  # the file is whole, yet its key is gone
        decrypt_file(sealed, tmp_path / "back.bin", store.data_key("run-1"))
    assert sealed.exists() and not (tmp_path / "back.bin").exists()
    assert store.data_key("run-2") == kept


# --- files


@pytest.mark.parametrize("size", [0, 1, CHUNK, 5 * CHUNK, 300])
def test_file_round_trip(tmp_path, size):
    data_key = os.urandom(32)
    data = plaintext(size) if size >= 200 else os.urandom(size)
    sealed = encrypted(tmp_path, data_key, data)
    decrypt_file(sealed, tmp_path / "back.bin", data_key)
    assert (tmp_path / "back.bin").read_bytes() == data
    assert stat.S_IMODE(os.stat(tmp_path / "back.bin").st_mode) == 0o600
    chunks = list(read_encrypted(sealed, data_key))
    assert b"".join(chunks) == data and all(len(chunk) <= CHUNK for chunk in chunks)
    assert len(chunks) == max(1, -(-size // CHUNK))  # an exact multiple of the chunk size adds no empty chunk


def test_canary_is_in_the_plaintext_and_not_in_the_ciphertext(tmp_path):
    sealed = encrypted(tmp_path, os.urandom(32), chunk_bytes=1 << 20)
    assert CANARY in (tmp_path / "plain.bin").read_bytes()
    assert CANARY not in sealed.read_bytes()


def tampered(tmp_path, change):
    data_key = os.urandom(32)
    sealed = encrypted(tmp_path, data_key)
    data = bytearray(sealed.read_bytes())
    assert len(data) == HEADER.size + 4 * (CHUNK + 16) + (300 - 4 * CHUNK) + 16  # 5 chunks, the last short
    sealed.write_bytes(change(data))
    return sealed, data_key


def flip(data, position):
    data[position] ^= 1
    return bytes(data)


def swap_chunks(data, first, second):
    (a, b), (c, d) = chunk_span(first), chunk_span(second)
    return bytes(data[:a] + data[c:d] + data[b:c] + data[a:b] + data[d:])


@pytest.mark.parametrize("change, error", [
    (lambda data: flip(data, chunk_span(2)[0] + 5), "chunk 2 fails authentication"),
    (lambda data: flip(data, len(data) - 1), "chunk 4 fails authentication"),  # the last chunk's tag
    (lambda data: flip(data, HEADER.size - 1), "chunk 0 fails authentication"),  # the nonce prefix, in the header
    (lambda data: swap_chunks(data, 1, 2), "chunk 1 fails authentication"),
    (lambda data: bytes(data[:chunk_span(3)[1]]), "truncated: it ends after chunk 3, which is not its last"),
    (lambda data: bytes(data[:chunk_span(3)[1] - 1]), "chunk 3 fails authentication"),
    (lambda data: bytes(data[:HEADER.size]), "truncated: it has a header but no chunks"),
    (lambda data: bytes(data[:chunk_span(3)[1]] + data[chunk_span(4)[0]:] + data[chunk_span(0)[0]:chunk_span(0)[1]]),
     "chunk 4 fails authentication"),
])
def test_tampering_is_detected_and_named(tmp_path, change, error):
    sealed, data_key = tampered(tmp_path, change)
    with pytest.raises(TamperedCiphertext, match=error):
        b"".join(read_encrypted(sealed, data_key))
    with pytest.raises(TamperedCiphertext):
        decrypt_file(sealed, tmp_path / "back.bin", data_key)
    assert [path.name for path in tmp_path.iterdir()] and not (tmp_path / "back.bin").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".back.bin")]  # no partial plaintext


def test_appended_data_and_wrong_data_key_are_named(tmp_path):
    data_key = os.urandom(32)
    sealed = encrypted(tmp_path, data_key, plaintext(5 * CHUNK))  # the last chunk full: what follows is read on its own
    with pytest.raises(WrongKey, match="was encrypted under data key [0-9a-f]{16}, not under the key given"):
        b"".join(read_encrypted(sealed, os.urandom(32)))
    sealed.write_bytes(sealed.read_bytes() + sealed.read_bytes()[slice(*chunk_span(0))])  # chunk 0 again at the end
    with pytest.raises(TamperedCiphertext, match=r"data follows its last chunk \(4\)"):
        b"".join(read_encrypted(sealed, data_key))
    (tmp_path / "plain.bin").write_bytes(b"PAR1 not encrypted")
    with pytest.raises(EncryptionError, match="not a lakeforge encrypted file"):
        b"".join(read_encrypted(tmp_path / "plain.bin", data_key))


# --- Parquet


def canary_table():
    return pa.table({"text": [f"row {i}" for i in range(50)] + [CANARY.decode()], "label": list(range(51))})


def test_parquet_round_trip_hides_the_canary(tmp_path, store):
    store.data_key("run-1", create=True)
    table = canary_table()
    pq.write_table(table, tmp_path / "plain.parquet")
    assert CANARY in (tmp_path / "plain.parquet").read_bytes()
    pq.write_table(table, tmp_path / "shard.parquet", encryption_properties=parquet_encryption(store, "run-1").encryption_properties)
    sealed = (tmp_path / "shard.parquet").read_bytes()
    assert CANARY not in sealed and b"text" not in sealed  # values, statistics and the schema's names
    back = pq.read_table(tmp_path / "shard.parquet", decryption_properties=parquet_encryption(store, "run-1").decryption_properties)
    assert back.equals(table)
    with pytest.raises(OSError, match="no decryption found"):
        pq.read_table(tmp_path / "shard.parquet")
    store.data_key("run-2", create=True)
    with pytest.raises(WrongKey, match="encrypted under scope 'run-1', not 'run-2'"):
        pq.read_table(tmp_path / "shard.parquet", decryption_properties=parquet_encryption(store, "run-2").decryption_properties)


def test_parquet_survives_rotation_and_not_shredding(tmp_path, store):
    store.data_key("run-1", create=True)
    pq.write_table(canary_table(), tmp_path / "shard.parquet",
                   encryption_properties=parquet_encryption(store, "run-1").encryption_properties)
    store.rotate(LocalKeyProvider(tmp_path / "kek-b.key"))
    assert pq.read_table(tmp_path / "shard.parquet",
                         decryption_properties=parquet_encryption(store, "run-1").decryption_properties).equals(canary_table())
    store.shred("run-1")
    with pytest.raises(KeyShredded, match="data key of scope 'run-1' was shredded"):
        pq.read_table(tmp_path / "shard.parquet", decryption_properties=parquet_encryption(store, "run-1").decryption_properties)


# --- AWS KMS (moto's server, which implements KMS)


def test_aws_kms_provider_wraps_rotates_and_refuses_another_key(tmp_path, s3_server):
    import boto3

    kms = boto3.client("kms")
    first = kms.create_key(Description="lakeforge test KEK 1")["KeyMetadata"]
    second = kms.create_key(Description="lakeforge test KEK 2")["KeyMetadata"]
    kms.create_alias(AliasName="alias/lakeforge-test", TargetKeyId=first["KeyId"])
    provider = key_provider(EncryptionSettings(enabled=True, provider="aws_kms", kms_key_id="alias/lakeforge-test"))
    assert isinstance(provider, AwsKmsKeyProvider)
    assert provider.key_id == f"aws_kms:{first['Arn']}"  # the alias resolved to the key it names today

    store = DataKeyStore(tmp_path / "keys", provider)
    data_key = store.data_key("run-1", create=True)
    sealed = encrypted(tmp_path, data_key)
    record = json.loads((store.folder / "run-1.key.json").read_text())
    assert record["key_id"] == f"aws_kms:{first['Arn']}" and base64.b64decode(record["wrapped_key"]) != data_key

    other = AwsKmsKeyProvider(second["KeyId"])
    with pytest.raises(WrongKey, match=f"KMS key {second['KeyId']} does not unwrap this data key"):
        other.unwrap(base64.b64decode(record["wrapped_key"]))

    assert store.rotate(other) == 1
    assert b"".join(read_encrypted(sealed, DataKeyStore(store.folder, other).data_key("run-1"))) == plaintext()
    rewrapped = base64.b64decode(json.loads((store.folder / "run-1.key.json").read_text())["wrapped_key"])
    with pytest.raises(WrongKey, match="does not unwrap this data key"):
        provider.unwrap(rewrapped)
    with pytest.raises(WrongKey, match="is wrapped by key-encryption key aws_kms:"):
        DataKeyStore(store.folder, provider).data_key("run-1")

    # from KMS to a local file and back: one protocol
    local = LocalKeyProvider(tmp_path / "kek.key")
    assert store.rotate(local) == 1 and DataKeyStore(store.folder, local).data_key("run-1") == data_key
