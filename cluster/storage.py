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

URI_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(location: str) -> bool:
    return bool(URI_SCHEME.match(location))


def filesystem_for(location: str):
    """(pyarrow filesystem, path inside it) for a local folder or an object-store URI.

    The filesystem object travels to the Ray Train controller and workers, which are other
    processes, possibly on other nodes. S3 credentials given to this process in its environment
    (AWS_ACCESS_KEY_ID, ...) travel with it; without them each process uses its node's own
    credential chain (instance role, profile). AWS_ENDPOINT_URL (an S3-compatible store) travels too.
    """
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    filesystem, path = pafs.FileSystem.from_uri(location)
    if filesystem.type_name == "s3" and os.environ.get("AWS_ACCESS_KEY_ID"):
        filesystem = pafs.S3FileSystem(
            access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            session_token=os.environ.get("AWS_SESSION_TOKEN"), region=filesystem.region,
            endpoint_override=os.environ.get("AWS_ENDPOINT_URL"))
    return filesystem, path


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
