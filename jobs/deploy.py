"""Deploy a registered model version as the OpenAI-compatible endpoint.

    python -m jobs.deploy --config configs/deploy.yaml [version=v0003] [force=true] [key=value ...]

Without `version` the registry's current version (the newest one the promotion gate passed) is
deployed; a named version the gate rejected is refused unless `force=true`. A version whose folder
no longer holds the files registered for it (same names, same SHA-256) is refused, `force=true` or
not: what the gate judged is what gets served. The deployment is recorded in the version's registry
entry (its lineage ends there). The Serve app is deployed by import path (`import_path`), so jobs
never import serving.
"""

from __future__ import annotations

import sys

from cluster.config import load_config_or_exit
from cluster.endpoints import deploy
from cluster.ray_cluster import connect
from cluster.registry import ModelFilesChanged, ModelRegistry
from jobs.config import DeployConfig


class DeployError(ValueError):
    """A version that cannot or may not be deployed; the message says why and what to pass."""


def resolve_version(cfg: DeployConfig) -> dict:
    """The registry entry to deploy, its files checked against their registered hashes, or a
    DeployError naming the problem."""
    registry = ModelRegistry(cfg.storage_root, cfg.name)
    if cfg.version is None:
        entry = registry.current()
        if entry is None:
            known = ", ".join(v["version"] for v in registry.versions()) or "none"
            raise DeployError(f"model {cfg.name!r} has no deployable version in {registry.root} (versions: {known}); "
                              "name one with version=vNNNN")
    else:
        try:
            entry = registry.get(cfg.version)
        except KeyError as error:
            raise DeployError(error.args[0]) from None
        if not entry["deployable"] and not cfg.force:
            raise DeployError(f"{cfg.name} {cfg.version} is not deployable (promotion gate: "
                              f"{entry['gate'].get('reason', 'rejected')}); pass force=true to deploy it anyway")
    # force=true overrides the gate's judgement, never this: files changed since then were not judged.
    try:
        return registry.check_files(entry["version"])
    except ModelFilesChanged as error:
        raise DeployError(str(error)) from None


def run_deploy(cfg: DeployConfig) -> str:
    entry = resolve_version(cfg)
    monitoring = cfg.endpoint.monitoring
    if not monitoring.version:  # predictions are logged under the registry's version, not the folder's name
        monitoring = monitoring.model_copy(update={"version": entry["version"]})
    endpoint = cfg.endpoint.model_copy(update={"model_dir": entry["path"], "monitoring": monitoring})
    base_url = deploy(cfg.import_path, endpoint)
    ModelRegistry(cfg.storage_root, cfg.name).record_deployment(
        entry["version"], url=f"{base_url}/v1", model_id=endpoint.model_id, app_name=endpoint.app_name,
        forced=not entry["deployable"], by="jobs.deploy")
    print(f"[deploy] {cfg.name} {entry['version']} serving as model {endpoint.model_id!r} at {base_url}/v1")
    return base_url


def main(argv: list[str] | None = None) -> str:
    cfg = load_config_or_exit(DeployConfig, argv)
    try:
        resolve_version(cfg)  # before starting or joining a cluster
    except DeployError as error:
        print(f"deploy error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    connect()
    return run_deploy(cfg)


if __name__ == "__main__":
    main()
