"""Encryption at rest, the foundation: key providers, per-scope data keys, encrypted files and Parquet.

Envelope encryption. A *data key* (32 random bytes, AES-256-GCM) encrypts what one scope owns (a
run, a source). It is stored only *wrapped* (encrypted) by a *key-encryption key* (KEK) that a
`KeyProvider` holds: `LocalKeyProvider` (a 0600 key file, for laptops) or `AwsKmsKeyProvider` (AWS
KMS, for clusters). `DataKeyStore` keeps one small JSON file per scope beside the data it protects:
the KEK's id, the wrapped key (base64) and when it was made; the plaintext key lives in memory only.

- Rotation (`DataKeyStore.rotate`) re-wraps every data key under a new KEK; the data is untouched.
- Shredding (`DataKeyStore.shred`) overwrites and deletes a scope's wrapped key and leaves a
  tombstone, so everything encrypted under that scope is unreadable and says why (`KeyShredded`).
- Files (`encrypt_file`, `decrypt_file`, `read_encrypted`): AES-GCM over fixed-size chunks, so a
  checkpoint of many GB streams through memory; each chunk's nonce and associated data carry its
  index and whether it is the last, so altered, reordered, dropped or appended chunks are refused.
- Parquet (`parquet_encryption`): pyarrow's modular encryption, with the scope's data key as the
  master key its per-file keys are wrapped with, so rotation and shredding cover shards too.

Wired into the data job (`security.encryption` of the run config, jobs/data/shard_encryption.py): its
Parquet shards; checkpoints, exported models and the rest are not encrypted yet (docs/security.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import struct
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import Field, field_validator, model_validator

from cluster.config import StrictModel
from cluster.keys import KEY_BYTES, LocalFileKey, refuse_uri

if TYPE_CHECKING:
    import pyarrow.parquet.encryption as pqe

logger = logging.getLogger(__name__)

NONCE_BYTES = 12
TAG_BYTES = 16
WRAP_CONTEXT = b"lakeforge data key v1"  # associated data of a locally wrapped data key
KMS_CONTEXT = {"purpose": "lakeforge data key"}  # KMS encryption context: a blob made for another use does not decrypt
SCOPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# Encrypted file: header = magic, version, chunk size, data key fingerprint, nonce prefix; then chunks,
# each ciphertext + tag, all chunk_size long before encryption except the last (possibly empty).
MAGIC = b"LFENC"
VERSION = 1
HEADER = struct.Struct(">5sBI8s8s")  # magic, version, chunk size, key fingerprint, nonce prefix
DEFAULT_CHUNK_BYTES = 1 << 20


class EncryptionSettings(StrictModel):
    """Whether artifacts are encrypted at rest, and which key-encryption key wraps their data keys."""

    enabled: bool = Field(default=False, description="Encrypt artifacts at rest with per-scope data keys (envelope encryption).")
    provider: Literal["local_file", "aws_kms"] = Field(
        default="local_file",
        description="Who holds the key-encryption key: `local_file` (32 random bytes in an owner-only file, "
                    "for a laptop) or `aws_kms` (an AWS KMS key; the endpoint and credentials come from the environment).")
    key_file: str | None = Field(
        default=None,
        description="`local_file`: the key-encryption key's file, created (mode 0600) when missing; a file "
                    "readable by group or others is refused. Keep it away from the data it protects.")
    kms_key_id: str | None = Field(
        default=None, description="`aws_kms`: the KMS key's id, ARN or alias (`alias/...`).")

    @field_validator("key_file")
    @classmethod
    def _a_local_file(cls, value: str | None) -> str | None:
        return refuse_uri(value, "encryption.key_file needs a local file path, not a URI (the key must not sit in an object store)")

    @model_validator(mode="after")
    def _the_providers_setting(self) -> "EncryptionSettings":
        if self.provider == "aws_kms" and self.key_file is not None:
            raise ValueError("encryption.key_file is for provider local_file; aws_kms takes kms_key_id")
        if self.provider == "local_file" and self.kms_key_id is not None:
            raise ValueError("encryption.kms_key_id is for provider aws_kms; local_file takes key_file")
        if self.enabled and self.provider == "aws_kms" and not self.kms_key_id:
            raise ValueError("encryption.provider aws_kms needs encryption.kms_key_id (a KMS key id, ARN or alias)")
        if self.enabled and self.provider == "local_file" and not self.key_file:
            raise ValueError("encryption.provider local_file needs encryption.key_file (the key-encryption key's file)")
        return self


class EncryptionError(RuntimeError):
    """Something encrypted cannot be read or written; the message says what and why."""


class WrongKey(EncryptionError):
    """A wrapped data key (or a file) was made under another key than the one given."""


class KeyShredded(EncryptionError):
    """The scope's data key was deleted on purpose: what it encrypted is unreadable for good."""


class DataKeyMissing(EncryptionError):
    """No data key was ever made for the scope in this store."""


class TamperedCiphertext(EncryptionError):
    """Encrypted bytes fail authentication: altered, truncated, reordered or extended."""


class KeyProvider(Protocol):
    """Holds a key-encryption key: wraps and unwraps data keys, never handing out the KEK itself."""

    @property
    def key_id(self) -> str:
        """A public name of the KEK (recorded beside each wrapped key; reveals nothing of it)."""

    def wrap(self, data_key: bytes) -> bytes:
        """The data key encrypted under the KEK."""

    def unwrap(self, wrapped: bytes) -> bytes:
        """The data key; WrongKey when `wrapped` was not made by this KEK (or was altered)."""


class LocalKeyFile(LocalFileKey):
    """The key-encryption key's owner-only file: errors are EncryptionErrors naming it."""

    what = "key-encryption key file"
    error = EncryptionError


class LocalKeyProvider:
    """A KEK of 32 random bytes in an owner-only file; wraps with AES-256-GCM.

    `create`: make the file (0600) when it is missing, for the first run on a laptop. Unwrapping
    never creates one: a new KEK could not unwrap what the lost one wrapped."""

    def __init__(self, key_file: str | Path, create: bool = True):
        self.key_file = Path(key_file).expanduser()
        self.create = create

    @property
    def key_id(self) -> str:
        return "local:" + hmac.new(self._kek(create=self.create), b"lakeforge key-encryption key id",
                                   hashlib.sha256).hexdigest()[:16]

    def _kek(self, create: bool) -> bytes:
        return LocalKeyFile(self.key_file, create=create).key()

    def wrap(self, data_key: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + AESGCM(self._kek(create=self.create)).encrypt(nonce, data_key, WRAP_CONTEXT)

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            return AESGCM(self._kek(create=False)).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], WRAP_CONTEXT)
        except InvalidTag:
            raise WrongKey(f"the key-encryption key in {self.key_file} does not unwrap this data key: it was "
                           "wrapped by another key-encryption key, or the wrapped key was altered") from None


class AwsKmsKeyProvider:
    """A KEK in AWS KMS: data keys are wrapped by `kms.encrypt` and unwrapped by `kms.decrypt`, which
    must name the same KMS key (so a blob of another key is refused, not silently decrypted).
    boto3 takes the endpoint, region and credentials from the environment (`AWS_ENDPOINT_URL`, ...)."""

    def __init__(self, kms_key_id: str, client=None):
        import boto3

        self.kms_key_id = kms_key_id
        self.client = client or boto3.client("kms")
        self._arn: str | None = None

    @property
    def key_id(self) -> str:
        if self._arn is None:  # an alias or bare id resolves to the ARN, which names the key for good
            self._arn = self._call("describe_key", KeyId=self.kms_key_id)["KeyMetadata"]["Arn"]
        return f"aws_kms:{self._arn}"

    def _call(self, operation: str, **arguments) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(**arguments)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if operation == "decrypt" and code in ("IncorrectKeyException", "InvalidCiphertextException",
                                                   "AccessDeniedException"):
                raise WrongKey(f"KMS key {self.kms_key_id} does not unwrap this data key ({code}): it was wrapped "
                               "by another KMS key, or the wrapped key was altered") from None
            raise EncryptionError(f"KMS {operation} with key {self.kms_key_id} failed: {error}") from None
        except BotoCoreError as error:
            raise EncryptionError(f"KMS {operation} with key {self.kms_key_id} failed: {error}") from None

    def wrap(self, data_key: bytes) -> bytes:
        return self._call("encrypt", KeyId=self.kms_key_id, Plaintext=data_key,
                          EncryptionContext=KMS_CONTEXT)["CiphertextBlob"]

    def unwrap(self, wrapped: bytes) -> bytes:
        return self._call("decrypt", KeyId=self.kms_key_id, CiphertextBlob=wrapped,
                          EncryptionContext=KMS_CONTEXT)["Plaintext"]


def key_provider(settings: EncryptionSettings, create_key_file: bool = True) -> KeyProvider:
    """The provider `settings` name. `create_key_file=False` where a missing local key file must be an
    error, not a new key: in readers, and in tasks on nodes that may not see the one the driver made."""
    if settings.provider == "aws_kms":
        if not settings.kms_key_id:
            raise EncryptionError("encryption.provider aws_kms needs encryption.kms_key_id")
        return AwsKmsKeyProvider(settings.kms_key_id)
    if not settings.key_file:
        raise EncryptionError("encryption.provider local_file needs encryption.key_file")
    return LocalKeyProvider(settings.key_file, create=create_key_file)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _write_whole(path: Path, data: bytes, replace: bool) -> None:
    """Write `path` (mode 0600) whole or not at all; without `replace`, FileExistsError if it exists."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if another process made the file first
    finally:
        temporary.unlink(missing_ok=True)


class DataKeyStore:
    """One data key per scope, stored wrapped by `provider`'s KEK in `<folder>/<scope>.key.json`.

    A shredded scope leaves `<scope>.shredded.json` (when, and which KEK had wrapped it; no key
    material), so reading it says it was shredded rather than never made, and it is not re-keyed."""

    def __init__(self, folder: str | Path, provider: KeyProvider):
        self.folder = Path(folder).expanduser()
        self.provider = provider

    def _path(self, scope: str, kind: str = "key") -> Path:
        if not SCOPE_NAME.fullmatch(scope):
            raise ValueError(f"scope {scope!r} is not a valid name (letters, digits, '.', '_', '-'; at most 128)")
        return self.folder / f"{scope}.{kind}.json"

    def scopes(self) -> list[str]:
        """The scopes with a (not shredded) data key."""
        return sorted(path.name.removesuffix(".key.json") for path in self.folder.glob("*.key.json"))

    def data_key(self, scope: str, create: bool = False) -> bytes:
        """The scope's plaintext data key (in memory only); with `create`, made when the scope has none."""
        path = self._path(scope)
        tombstone = self._path(scope, "shredded")
        if tombstone.exists():
            shredded = json.loads(tombstone.read_text())
            raise KeyShredded(f"the data key of scope {scope!r} was shredded at {shredded['shredded']}: what it "
                              "encrypted is unreadable for good, and the scope is not re-keyed (use a new scope name)")
        if not path.exists():
            if not create:
                raise DataKeyMissing(f"scope {scope!r} has no data key in {self.folder}")
            data_key = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
            record = {"scope": scope, "key_id": self.provider.key_id,
                      "wrapped_key": base64.b64encode(self.provider.wrap(data_key)).decode(), "created": _now()}
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                _write_whole(path, json.dumps(record, indent=2).encode(), replace=False)
                logger.info("made the data key of scope %s, wrapped by %s", scope, record["key_id"])
                return data_key
            except FileExistsError:
                pass  # another process made it first: use theirs, or the two would encrypt under different keys
        return self._unwrap(scope, json.loads(path.read_text()), self.provider)

    @staticmethod
    def _unwrap(scope: str, record: dict, provider: KeyProvider) -> bytes:
        if record["key_id"] != provider.key_id:
            raise WrongKey(f"the data key of scope {scope!r} is wrapped by key-encryption key {record['key_id']}; "
                           f"the key given is {provider.key_id} (rotated since? use the key it names)")
        return provider.unwrap(base64.b64decode(record["wrapped_key"]))

    def rotate(self, new_provider: KeyProvider) -> int:
        """Re-wrap every data key under `new_provider`'s KEK (the data stays as it is); return how many.

        Each file is replaced atomically, and keys already under the new KEK are skipped, so an
        interrupted rotation is finished by running it again."""
        new_key_id = new_provider.key_id
        rotated = 0
        for scope in self.scopes():
            path = self._path(scope)
            record = json.loads(path.read_text())
            if record["key_id"] == new_key_id:
                continue
            data_key = self._unwrap(scope, record, self.provider)
            record.update(key_id=new_key_id, wrapped_key=base64.b64encode(new_provider.wrap(data_key)).decode(),
                          rotated=_now())
            _write_whole(path, json.dumps(record, indent=2).encode(), replace=True)
            rotated += 1
        logger.info("re-wrapped %d data key(s) in %s under %s", rotated, self.folder, new_key_id)
        self.provider = new_provider
        return rotated

    def shred(self, scope: str) -> None:
        """Make everything encrypted under `scope` unreadable: its wrapped key is overwritten, then deleted."""
        path = self._path(scope)
        if not path.exists():
            self.data_key(scope)  # raises KeyShredded or DataKeyMissing, naming the scope
        record = json.loads(path.read_text())
        # The tombstone first: a crash after it leaves a scope that reads as shredded, never a half-deleted key.
        _write_whole(self._path(scope, "shredded"), json.dumps(
            {"scope": scope, "key_id": record["key_id"], "created": record["created"], "shredded": _now()},
            indent=2).encode(), replace=True)
        # Overwritten in place before the unlink, so the wrapped key is not left in freed blocks (on
        # filesystems that write in place; copy-on-write and SSD wear levelling may keep old copies,
        # which is why the KEK must also be kept from whoever can read the disk).
        size = path.stat().st_size
        with open(path, "r+b") as stream:
            stream.write(os.urandom(size))
            stream.flush()
            os.fsync(stream.fileno())
        path.unlink()
        logger.info("shredded the data key of scope %s", scope)


def key_fingerprint(data_key: bytes) -> bytes:
    """8 bytes that tell data keys apart (an HMAC under the key: reveals nothing of it)."""
    return hmac.new(data_key, b"lakeforge data key fingerprint", hashlib.sha256).digest()[:8]


def _chunk_nonce_and_context(header: bytes, nonce_prefix: bytes, index: int, final: bool) -> tuple[bytes, bytes]:
    # The index and the final flag sit in the nonce and, with the whole header, in the associated
    # data: a chunk moved, dropped, or taken for the last one fails its tag.
    nonce = nonce_prefix + struct.pack(">I", index)
    return nonce, header + struct.pack(">Q?", index, final)


def encrypt_file(src: str | Path, dst: str | Path, data_key: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Encrypt `src` into `dst` chunk by chunk (memory: two chunks); `dst` appears whole or not at all."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"encrypt_file needs a destination other than its source ({src})")
    if not 0 < chunk_bytes < 1 << 31:
        raise ValueError(f"chunk_bytes {chunk_bytes} out of range")
    nonce_prefix = os.urandom(8)  # random per file: with 2^32 chunk indices, 12-byte nonces never repeat in practice
    header = HEADER.pack(MAGIC, VERSION, chunk_bytes, key_fingerprint(data_key), nonce_prefix)
    cipher = AESGCM(data_key)
    temporary = dst.with_name(f".{dst.name}.{os.getpid()}-{uuid.uuid4().hex}")
    try:
        with open(src, "rb") as reader, open(temporary, "wb") as writer:
            writer.write(header)
            chunk, index = reader.read(chunk_bytes), 0
            while True:
                following = reader.read(chunk_bytes)  # read ahead: the last chunk is the one with nothing after it
                if index >= 1 << 32:
                    raise ValueError(f"{src} has more than 2^32 chunks of {chunk_bytes} bytes: use larger chunks")
                nonce, context = _chunk_nonce_and_context(header, nonce_prefix, index, not following)
                writer.write(cipher.encrypt(nonce, chunk, context))
                if not following:
                    break
                chunk, index = following, index + 1
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(temporary, dst)
    finally:
        temporary.unlink(missing_ok=True)


def read_encrypted(src: str | Path, data_key: bytes) -> Iterator[bytes]:
    """The plaintext of a file `encrypt_file` wrote, chunk by chunk, each authenticated before it is
    yielded; TamperedCiphertext (naming the chunk) when the file was altered, truncated or reordered,
    WrongKey when it was encrypted under another data key."""
    src = Path(src)
    with open(src, "rb") as reader:
        header = reader.read(HEADER.size)
        if len(header) < HEADER.size or not header.startswith(MAGIC):
            raise EncryptionError(f"{src} is not a lakeforge encrypted file (no {MAGIC.decode()} header)")
        _, version, chunk_bytes, fingerprint, nonce_prefix = HEADER.unpack(header)
        if version != VERSION:
            raise EncryptionError(f"{src} is encrypted in format version {version}; this code reads version {VERSION}")
        if not hmac.compare_digest(fingerprint, key_fingerprint(data_key)):
            raise WrongKey(f"{src} was encrypted under data key {fingerprint.hex()}, not under the key given "
                           f"({key_fingerprint(data_key).hex()}), or its header was altered")
        cipher = AESGCM(data_key)
        sealed_bytes = chunk_bytes + TAG_BYTES
        sealed, index = reader.read(sealed_bytes), 0
        if not sealed:
            raise TamperedCiphertext(f"{src} is truncated: it has a header but no chunks")
        while sealed:
            following = reader.read(sealed_bytes)
            final = not following
            nonce, context = _chunk_nonce_and_context(header, nonce_prefix, index, final)
            try:
                yield cipher.decrypt(nonce, sealed, context)
            except InvalidTag:
                raise TamperedCiphertext(f"{src}: {_why_chunk_fails(cipher, header, nonce_prefix, index, final, sealed)}") from None
            sealed, index = following, index + 1


def _why_chunk_fails(cipher: AESGCM, header: bytes, nonce_prefix: bytes, index: int, final: bool, sealed: bytes) -> str:
    """Tell truncation and appended data from an altered chunk: does the chunk authenticate with the other final flag?"""
    nonce, context = _chunk_nonce_and_context(header, nonce_prefix, index, not final)
    try:
        cipher.decrypt(nonce, sealed, context)
    except InvalidTag:
        return (f"chunk {index} fails authentication: the file was altered (a changed byte, or chunks "
                "reordered or swapped)")
    if final:
        return f"truncated: it ends after chunk {index}, which is not its last chunk"
    return f"data follows its last chunk ({index}): something was appended"


def decrypt_file(src: str | Path, dst: str | Path, data_key: bytes) -> None:
    """Decrypt `src` into `dst` (mode 0600); on any error no `dst` is left, not even a partial one."""
    dst = Path(dst)
    temporary = dst.with_name(f".{dst.name}.{os.getpid()}-{uuid.uuid4().hex}")
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as writer:
            for chunk in read_encrypted(src, data_key):
                writer.write(chunk)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(temporary, dst)
    finally:
        temporary.unlink(missing_ok=True)


class ParquetEncryption(NamedTuple):
    """What `pyarrow.parquet.write_table(encryption_properties=...)` and `read_table(decryption_properties=...)` take."""

    encryption_properties: "pqe.FileEncryptionProperties"
    decryption_properties: "pqe.FileDecryptionProperties"


def parquet_encryption(data_key_store: DataKeyStore, scope: str) -> ParquetEncryption:
    """Parquet modular encryption under `scope`'s data key (which must exist: `data_key(scope, create=True)`).

    pyarrow makes random keys per file and wraps them with the "master key" through a KmsClient;
    here the master key is the scope's data key, so rotating the KEK and shredding the scope cover
    the shards as they cover files. Columns and footer are encrypted (the footer's statistics would
    show values). The data key is fetched now, so a shredded scope fails here, naming it."""
    import pyarrow.parquet.encryption as pqe

    data_key = data_key_store.data_key(scope)
    cipher = AESGCM(data_key)
    context = f"lakeforge parquet key of {scope}".encode()

    class ScopeKmsClient(pqe.KmsClient):
        def __init__(self, _config):
            pqe.KmsClient.__init__(self)

        def wrap_key(self, key_bytes, master_key_identifier):
            nonce = os.urandom(NONCE_BYTES)
            return base64.b64encode(nonce + cipher.encrypt(nonce, key_bytes, context)).decode()

        def unwrap_key(self, wrapped_key, master_key_identifier):
            if master_key_identifier != scope:
                raise WrongKey(f"this Parquet file is encrypted under scope {master_key_identifier!r}, not {scope!r}")
            wrapped = base64.b64decode(wrapped_key)
            try:
                return cipher.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], context)
            except InvalidTag:
                raise WrongKey(f"this Parquet file's keys were not made under the data key of scope {scope!r}") from None

    factory = pqe.CryptoFactory(ScopeKmsClient)
    connection = pqe.KmsConnectionConfig()
    encryption = factory.file_encryption_properties(connection, pqe.EncryptionConfiguration(
        footer_key=scope, uniform_encryption=True, plaintext_footer=False, double_wrapping=False))
    decryption = factory.file_decryption_properties(connection, pqe.DecryptionConfiguration())
    return ParquetEncryption(encryption, decryption)
