"""Where a registered model version came from and where it went: its lineage, from the source
files to the endpoints it was deployed to.

    python -m jobs.lineage NAME VERSION [--storage-root outputs] [--json] [--check-files] [--record-files]

Reads what the registry recorded (`cluster/registry.py`): the sources' fingerprints, the data
manifest, the code version and run config, the parent version, the training run, the evaluation
and gate, the SHA-256 of every file of the version's folder, and the deployments. `--check-files`
also hashes the folder again and compares (exit 1 if a file changed, is missing or was added).
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster.registry import ModelFilesChanged, ModelRegistry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments, under `python -m jobs.lineage` and `lakeforge lineage`; sets `handler`."""
    parser.add_argument("name", help="registered model name (the run name)")
    parser.add_argument("version", help="version, e.g. v0003")
    parser.add_argument("--storage-root", default="outputs", help="storage root holding registry/<name>/ (default: outputs)")
    parser.add_argument("--json", action="store_true", help="print the version's lineage record as JSON")
    parser.add_argument("--check-files", action="store_true",
                        help="hash the version's files again and compare them with the registered hashes")
    parser.add_argument("--record-files", action="store_true",
                        help="for a version registered before files were hashed: hash its folder as it is now and record "
                             "the hashes, so it can be deployed again (check the folder first)")
    parser.set_defaults(handler=show_lineage)


def show_lineage(args: argparse.Namespace) -> int:
    try:
        registry = ModelRegistry(args.storage_root, args.name)
        registry.folder(args.version)  # a version of '..' is refused before anything is read
        entry = registry.record_files(args.version) if args.record_files else registry.get(args.version)
    except (ValueError, KeyError) as error:
        print(f"lineage error: {error.args[0]}", file=sys.stderr)
        return 2
    files_check = None
    if args.check_files:
        try:
            registry.check_files(args.version)
            files_check = {"ok": True, "message": f"{len(entry.get('files', {}))} files match their registered SHA-256"}
        except ModelFilesChanged as error:
            files_check = {"ok": False, "message": str(error), "changed": error.changed, "missing": error.missing,
                           "not_registered": error.extra}
    if args.json:
        record = {key: entry.get(key) for key in (
            "name", "version", "path", "created", "run", "deployable", "gate", "metrics", "lineage", "files", "deployments")}
        if files_check is not None:
            record["files_check"] = files_check
        print(json.dumps(record, indent=2))
    else:
        print("\n".join(describe(entry, files_check)))
    return 0 if files_check is None or files_check["ok"] else 1


def describe(entry: dict, files_check: dict | None) -> list[str]:
    """The lineage as lines of text, in the order things happened: sources to endpoints."""
    lineage = entry.get("lineage") or {}
    lines = [f"{entry['name']} {entry['version']} (registered {entry['created']}, run {entry['run']!r})"]
    if not lineage:
        lines.append("  no lineage recorded (registered before lineage was kept)")
    for source, fingerprints in (lineage.get("sources") or {}).items():
        lines.append(f"  source {source}:")
        lines += [f"    {path}: {fingerprint}" for path, fingerprint in fingerprints.items()]
    if "data_manifest" in lineage:
        manifest = lineage["data_manifest"]
        lines.append(f"  data manifest: {manifest['path']} (sha256 {manifest['sha256']})")
        lines.append(f"    rows: {json.dumps(manifest.get('counts'))}")
    if "code_version" in lineage:
        code = lineage["code_version"]
        named = (f"git {code['git_commit']}{' (uncommitted changes)' if code.get('git_dirty') else ''}" if "git_commit" in code
                 else f"package {code.get('package_version', 'unknown')}")
        lines.append(f"  code: {named}, source sha256 {code.get('source_sha256')}")
    if "run_config" in lineage:
        lines.append(f"  run config: recorded ({len(lineage['run_config'])} sections; --json shows it)")
    if "parent_version" in lineage:
        lines.append(f"  parent version: {lineage['parent_version'] or 'none (the first version)'}")
    if "training" in lineage:
        training = lineage["training"]
        tracking = training.get("tracking") or {}
        lines.append(f"  training: MLflow run {tracking.get('run_id')} at {tracking.get('uri')}; best step "
                     f"{training.get('best_step')}, validation loss {training.get('best_val_loss')}")
        lines.append(f"    exported from {training.get('model_dir')} (checkpoint {training.get('checkpoint_uri')})")
    if "evaluation" in lineage:
        evaluation = lineage["evaluation"]
        lines.append(f"  evaluation on {evaluation['test_examples']} held-out examples:")
        lines += [f"    {system}: accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}"
                  for system, scores in evaluation["systems"].items()]
    gate = entry["gate"]
    lines.append(f"  promotion gate: {'deployable' if entry['deployable'] else 'not deployable'} ({gate.get('reason', '')})")
    files = entry.get("files") or {}
    lines.append(f"  model version: {entry['path']} ({len(files)} files hashed at registration)")
    if files_check is not None:
        lines.append(f"    files check: {'OK: ' if files_check['ok'] else 'CHANGED: '}{files_check['message']}")
    if "report.html" in files:
        lines.append(f"  report: {entry['path']}/report.html")
    deployments = entry.get("deployments") or []
    lines.append(f"  deployments: {len(deployments) or 'none recorded'}")
    lines += [f"    {d['time']}: {d['url']} as model {d['model_id']!r} (app {d['app_name']}, by {d['by']}"
              f"{', past the gate with force' if d['forced'] else ''})" for d in deployments]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.lineage", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
