"""Secret keys kept in owner-only local files: the audit log's HMAC key and encryption's key-encryption key.

`LocalFileKey` keeps KEY_BYTES random bytes in a file of mode 0600, created atomically when missing
(if asked). A file readable by group or others is refused, not fixed: someone may have read it already.
Subclasses name the file in their errors (`what`) and raise their module's error class (`error`).
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

KEY_BYTES = 32


class KeyFileError(RuntimeError):
    """A key file is missing, unsafe (readable by others, not a regular file) or not a key made here."""


class LocalFileKey:
    """A key of KEY_BYTES random bytes in an owner-only file, created (0600) when missing if `create`."""

    what = "key file"  # how errors name the file
    error: type[Exception] = KeyFileError

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path).expanduser()
        self.create = create

    def key(self) -> bytes:
        if self.create and not self.path.exists():
            self._create()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise self.error(f"{self.what} {self.path} does not exist") from None
        except OSError as error:
            raise self.error(f"{self.what} {self.path} cannot be read: {error}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise self.error(f"{self.what} {self.path} is not a regular file")
            if info.st_mode & 0o044:
                # Others may have read it already: tightening the mode now would not make it secret again.
                raise self.error(f"{self.what} {self.path} is readable by group or others (mode "
                                 f"{stat.S_IMODE(info.st_mode):04o}); make a new key, or chmod 600 it if no one "
                                 "else can have read it")
            if stat.S_IMODE(info.st_mode) != 0o600:
                try:
                    os.fchmod(fd, 0o600)
                except PermissionError:
                    raise self.error(f"{self.what} {self.path} has mode {stat.S_IMODE(info.st_mode):04o} and "
                                     "cannot be made 0600 by this user (not its owner)") from None
            key = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(key) != KEY_BYTES:
            raise self.error(f"{self.what} {self.path} holds {len(key)} bytes, not {KEY_BYTES}: not a key made here")
        return key

    def _create(self) -> None:
        # Written under a private name and linked into place, so another process never reads a half-written key;
        # a link that loses the race (the file exists) leaves the winner's key.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, self.path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink()


def refuse_uri(path: str | None, message: str) -> str | None:
    """A key file's configured path, refused with `message` when it is a URI: a key must stay on local disk."""
    if path is not None and "://" in path:
        raise ValueError(message)
    return path
