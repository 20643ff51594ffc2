"""Model versions: every evaluated model is kept, immutable, with the numbers that judged it.

    <storage_root>/registry/<model name>/index.json
    <storage_root>/registry/<model name>/v0001/   (the HF model folder + evaluation.json, report.html, ...)

A version is *deployable* only if the promotion gate passed; the newest deployable version is the
*current* one, which evaluation compares the next candidate against and serving deploys. Jobs
write versions, serving reads them: the registry sits in `cluster/` because both meet here.

Each version's index entry also holds its lineage (what the registering job says it came from:
sources' fingerprints, data manifest, run config, code version, parent version, training run,
evaluation summary), the SHA-256 of every file in its folder (`files`, checked by `check_files`
before a deployment, so weights changed after registration are never served unnoticed), and the
deployments made of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from cluster.storage import path_inside

INDEX = "index.json"
# fcntl locks: local disks and NFSv4 mounts (EFS) alike. A registration holds it for milliseconds;
# the kernel ends a lock with its process, so a crashed run never leaves the registry locked.
LOCK = ".index.lock"
LOCK_TIMEOUT_SECONDS = 120


class RegistryLockTimeout(TimeoutError):
    """Another process held the registry's lock longer than LOCK_TIMEOUT_SECONDS."""


class ModelFilesChanged(RuntimeError):
    """A version's folder no longer holds the files registered for it; the message names them."""

    def __init__(self, name: str, version: str, changed: list[str], missing: list[str], extra: list[str]):
        self.changed, self.missing, self.extra = changed, missing, extra
        problems = [f"{what}: {', '.join(files)}" for what, files in
                    (("changed", changed), ("missing", missing), ("not registered", extra)) if files]
        remedy = ("deploy another version, or register the model again" if changed or missing else
                  f"it was registered before files were hashed: after checking its folder, record them with "
                  f"`lakeforge lineage {name} {version} --record-files`")
        super().__init__(f"model {name!r} {version}: its files differ from those registered ({'; '.join(problems)}); {remedy}")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def folder_sha256(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by its path relative to it (with forward slashes)."""
    return {path.relative_to(folder).as_posix(): file_sha256(path) for path in sorted(folder.rglob("*")) if path.is_file()}


class ModelRegistry:
    def __init__(self, storage_root: str | Path, name: str):
        self.name = name
        self.root = path_inside(Path(storage_root) / "registry", name)

    def _index(self) -> dict:
        path = self.root / INDEX
        if not path.is_file():
            return {"name": self.name, "current": None, "versions": []}
        return json.loads(path.read_text())

    def versions(self) -> list[dict]:
        return self._index()["versions"]

    def current(self) -> dict | None:
        """The version serving should run and the next candidate must beat; None before the first promotion."""
        index = self._index()
        return next((v for v in index["versions"] if v["version"] == index["current"]), None)

    def get(self, version: str) -> dict:
        return self._entry(self._index(), version)

    def _entry(self, index: dict, version: str) -> dict:
        """The version's entry in `index` (read once by the caller), or a KeyError naming the known ones."""
        for entry in index["versions"]:
            if entry["version"] == version:
                return entry
        known = ", ".join(v["version"] for v in index["versions"]) or "none"
        raise KeyError(f"model {self.name!r} has no version {version!r} (versions: {known})")

    def folder(self, version: str) -> Path:
        """The version's folder; a ValueError for a version that would lead outside the registry ('..')."""
        return path_inside(self.root, version)

    def register(self, model_dir: str | Path, gate: dict, metrics: dict, run: str,
                 attachments: list[str | Path] = (), lineage: dict | None = None) -> dict:
        """Copy `model_dir` (and report files) into a new version; promote it if the gate passed.

        `lineage` is recorded as given; the files' hashes are taken from the copy, what the version holds.

        A copy, not a link: the run folder is rewritten by the next training run, a version never is.
        Runs registering at once (other processes, other nodes on the shared storage) take turns on
        the registry's lock file: each reads the index, numbers its version and writes the index
        back before the next one reads it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{os.getpid()}-{uuid.uuid4().hex}"  # a crash mid-copy leaves no half version
        try:
            shutil.copytree(model_dir, staging)
            for path in attachments:
                if Path(path).is_file():
                    shutil.copy2(path, staging / Path(path).name)
            files = folder_sha256(staging)
            with self._locked():
                index = self._index()
                version = f"v{len(index['versions']) + 1:04d}"
                target = self.root / version
                staging.rename(target)  # fails, rather than overwrites, should a version folder with files exist unindexed
                entry = {
                    "name": self.name, "version": version, "path": str(target), "run": run, "source_model_dir": str(model_dir),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "deployable": bool(gate["deployable"]),
                    "gate": gate, "metrics": metrics, "lineage": lineage or {}, "files": files, "deployments": [],
                }
                index["versions"].append(entry)
                if entry["deployable"]:
                    index["current"] = version
                self._write(index)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed into its version
            raise
        return entry

    def attach(self, version: str, path: str | Path) -> dict:
        """Record a file written into the version's folder after registration (its report), with its
        hash, so `check_files` accepts it; returns the updated entry."""
        relative = Path(path).resolve().relative_to(self.folder(version).resolve()).as_posix()
        digest = file_sha256(Path(path))
        return self._update(version, lambda entry: entry["files"].update({relative: digest}))

    def record_deployment(self, version: str, *, url: str, model_id: str, app_name: str, forced: bool, by: str) -> dict:
        """Add a deployment (where, as which model, whether past the gate, by which job) to the version's
        entry, stamped with the time; returns the entry."""
        deployment = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "url": url, "model_id": model_id,
                      "app_name": app_name, "forced": forced, "by": by}
        return self._update(version, lambda entry: entry.setdefault("deployments", []).append(deployment))

    def record_files(self, version: str) -> dict:
        """Hash the folder of a version registered before files were hashed and record the hashes, so
        it can be deployed (a rollback to it) again; trusts the folder as it is now, so an operator
        checks it first. Refused for a version that already has hashes: those are not rewritten."""
        present = folder_sha256(self.folder(version))

        def record(entry: dict) -> None:
            if entry.get("files"):
                raise ValueError(f"model {self.name!r} {version} already has its files' hashes; they are not rewritten")
            entry["files"] = present
        return self._update(version, record)

    def check_files(self, version: str) -> dict:
        """The version's entry if its folder holds exactly the files registered, with the same
        SHA-256; else ModelFilesChanged naming the changed, missing and unregistered files. A version
        registered before files were hashed has none registered: all its files count as unregistered."""
        folder = self.folder(version)
        entry = self.get(version)
        registered, present = entry.get("files", {}), folder_sha256(folder)
        changed = sorted(name for name in registered.keys() & present.keys() if registered[name] != present[name])
        missing, extra = sorted(registered.keys() - present.keys()), sorted(present.keys() - registered.keys())
        if changed or missing or extra:
            raise ModelFilesChanged(self.name, version, changed, missing, extra)
        return entry

    def _update(self, version: str, change: Callable[[dict], None]) -> dict:
        self.folder(version)
        with self._locked():
            index = self._index()
            entry = self._entry(index, version)
            change(entry)
            self._write(index)
        return entry

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Held around every read-modify-write of the index, so runs registering or recording at once
        take turns and none overwrites another's change."""
        lock = FileLock(self.root / LOCK, timeout=LOCK_TIMEOUT_SECONDS)
        try:
            lock.acquire()
        except Timeout:
            raise RegistryLockTimeout(
                f"model {self.name!r}: the registry's lock {self.root / LOCK} was held by another process for over "
                f"{LOCK_TIMEOUT_SECONDS} s (a registration holds it for milliseconds). A lock ends with its process, so "
                f"a live one holds it, on this node (`fuser -v {self.root / LOCK}`) or another sharing the storage") from None
        try:
            yield
        finally:
            lock.release()

    def _write(self, index: dict) -> None:
        """Called under the registry's lock, after `register` made the folder."""
        temporary = self.root / f".{INDEX}.tmp"
        temporary.write_text(json.dumps(index, indent=2))
        os.replace(temporary, self.root / INDEX)  # readers see the old index or the new, never half
