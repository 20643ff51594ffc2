"""Model versions: every evaluated model is kept, immutable, with the numbers that judged it.

    <storage_root>/registry/<model name>/index.json
    <storage_root>/registry/<model name>/v0001/   (the HF model folder + evaluation.json, report.html, ...)

A version is *deployable* only if the promotion gate passed; the newest deployable version is the
*current* one, which evaluation compares the next candidate against and serving deploys. Jobs
write versions, serving reads them: the registry sits in `cluster/` because both meet here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from filelock import FileLock

from cluster.storage import path_inside

INDEX = "index.json"
# fcntl locks: local disks and NFSv4 mounts (EFS) alike. A registration holds it for milliseconds.
LOCK = ".index.lock"
LOCK_TIMEOUT_SECONDS = 120


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
        for entry in self.versions():
            if entry["version"] == version:
                return entry
        known = ", ".join(v["version"] for v in self.versions()) or "none"
        raise KeyError(f"model {self.name!r} has no version {version!r} (versions: {known})")

    def register(self, model_dir: str | Path, gate: dict, metrics: dict, run: str,
                 attachments: list[str | Path] = ()) -> dict:
        """Copy `model_dir` (and report files) into a new version; promote it if the gate passed.

        A copy, not a link: the run folder is rewritten by the next training run, a version never is.
        Runs registering at once (other processes, other nodes on the shared storage) take turns on
        the registry's lock file: each reads the index, numbers its version and writes the index
        back before the next one reads it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{os.getpid()}-{uuid.uuid4().hex}"  # a crash mid-copy leaves no half version
        shutil.copytree(model_dir, staging)
        for path in attachments:
            if Path(path).is_file():
                shutil.copy2(path, staging / Path(path).name)
        with FileLock(self.root / LOCK, timeout=LOCK_TIMEOUT_SECONDS):
            index = self._index()
            version = f"v{len(index['versions']) + 1:04d}"
            target = self.root / version
            staging.rename(target)  # fails, rather than overwrites, should a version folder exist unindexed
            entry = {
                "name": self.name, "version": version, "path": str(target), "run": run, "source_model_dir": str(model_dir),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "deployable": bool(gate["deployable"]),
                "gate": gate, "metrics": metrics,
            }
            index["versions"].append(entry)
            if entry["deployable"]:
                index["current"] = version
            self._write(index)
        return entry

    def _write(self, index: dict) -> None:
        """Called under the registry's lock, after `register` made the folder."""
        temporary = self.root / f".{INDEX}.tmp"
        temporary.write_text(json.dumps(index, indent=2))
        os.replace(temporary, self.root / INDEX)  # readers see the old index or the new, never half
