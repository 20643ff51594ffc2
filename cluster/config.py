"""Typed run configs: YAML + `key=value` overrides, validated by pydantic at load.

Every job and Serve app reads its config through `load_config`, so a typo in a key or a bad value
stops the run before any cluster work starts, with one line per problem naming the key.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


# A name that becomes a folder under a root (run, task, registered model, adapter): one plain path
# segment, so it can neither climb out of the root ('..') nor name the root itself ('.') nor hold a
# separator. Every such config field uses this pattern; code that joins names onto a root also
# checks the result with cluster.storage.path_inside.
PATH_SEGMENT = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
PATH_SEGMENT_RULE = "a plain folder name: letters, digits, '_', '.' and '-', starting with a letter or digit"


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config that cannot be used; the message names each offending key."""


ConfigT = TypeVar("ConfigT", bound=StrictModel)


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}': expected key=value")
    dotted, raw_value = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override '{assignment}': empty key")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{assignment}': '{key}' is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw_value) if raw_value != "" else ""


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def load_config(model: type[ConfigT], path: str | Path | None, overrides: list[str] = ()) -> ConfigT:
    """Read YAML at `path` (or start empty), apply overrides, validate into `model`."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys")
        tree = loaded or {}
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return model.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"invalid config: {format_validation_error(error)}") from None


def load_config_or_exit(model: type[ConfigT], argv: list[str] | None = None) -> ConfigT:
    """CLI entry for `python -m jobs.<name> --config file.yaml [key=value ...]`.

    A bad config prints one `config error:` line and exits 2 instead of a traceback.
    """
    import argparse

    parser = argparse.ArgumentParser(description=model.__doc__)
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    try:
        return load_config(model, args.config, args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
