"""Storage URIs: what may live on object storage, and the filesystem that reaches it from any node;
and `path_inside`, the check that a path computed from names stays inside its root.

Ray Train checkpoints may go to an object store (`s3://bucket/prefix`) or a folder every node
sees. Everything else a run writes (data shards, exports, the model registry, MLflow's store) is
written as files and needs a shared filesystem path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

URI_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(location: str) -> bool:
    return bool(URI_SCHEME.match(location))


def filesystem_for(location: str):
    """(pyarrow filesystem, path inside it) for a local folder or an object-store URI, built from
    the location alone in the calling process.

    Object-store credentials are never part of it: each process resolves its own from its node
    (AWS_* environment variables, profile, instance role), lazily, so a filesystem pickled to
    another process (Ray Train's controller and workers) carries the endpoint and region but no
    keys, and the code Ray runs elsewhere (Ray Data tasks) is given the location and calls this
    again. A URI with credentials in it (s3://KEY:SECRET@bucket/...) is refused: it would travel in
    configs, job metadata and task arguments.
    """
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    parts = urlsplit(location)
    if "@" in parts.netloc:
        # Named without what precedes '@', so the error repeats no secret.
        raise ValueError(f"{parts.scheme}://...@{parts.netloc.rpartition('@')[2]}{parts.path}: credentials in a storage URI "
                         f"are refused; remove them, and give each node its own (AWS_* environment variables, "
                         f"a profile, an instance role)")
    return pafs.FileSystem.from_uri(location)


def uri_of(filesystem, path: str) -> str:
    """The location string `filesystem_for` maps back to (filesystem, path)."""
    return path if filesystem.type_name == "local" else f"{filesystem.type_name}://{path}"


def path_inside(root: str | Path, *segments: str) -> Path:
    """`root` (user home expanded, symlinks resolved) joined with `segments`, or a ValueError when the
    result is not strictly inside `root`: names joined onto a storage root ('..', '/etc', 'a/../..')
    must never reach a folder that is later read, replaced or deleted outside it.

    The segments are normalized lexically, not resolved: a symlink an operator placed inside the
    root (an adapter folder linked to a registry version) is followed on purpose.
    """
    base = Path(root).expanduser().resolve()
    path = Path(os.path.abspath(base.joinpath(*segments)))
    if base not in path.parents:
        raise ValueError(f"{'/'.join(segments)!r} leads outside {str(base)!r}: expected a plain folder name")
    return path
