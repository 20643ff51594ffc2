"""Typed run configs: YAML + `key=value` overrides, validated by pydantic at load.

Every job and Serve app reads its config through `load_config`, so a typo in a key or a bad value
stops the run before any cluster work starts, with one line per problem naming the key.
`describe_field` says what a field takes (type, default, allowed values) in words, for the generated
configuration reference (scripts/config_reference.py) and the `lakeforge` command's help.
"""

from __future__ import annotations

import json
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python


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


def refuse_password_in_url(url: str, field: str, password_field: str) -> str:
    """`url` unchanged, or a ValueError when it holds a password (`scheme://user:password@host` or
    `?password=`): settings travel in config files, Serve's config and Ray's metadata, so a password
    is named by an environment variable instead (the setting `password_field`), read where the
    client runs."""
    parts = urlsplit(url)
    if parts.password or "password" in parse_qs(parts.query):
        raise ValueError(f"{field} holds a password: remove it from the URL, put it in an environment variable "
                         f"on the nodes, and name that variable in {password_field}")
    return url


def hide_url_password(data, field: str):
    """Model input `data` with any password in its URL `field` replaced by '***', for a model's
    before-validator: `refuse_password_in_url` then refuses the URL, and neither the error (pydantic
    repeats the input) nor the log line it ends up in holds the password."""
    url = data.get(field) if isinstance(data, dict) else None
    if not isinstance(url, str):
        return data
    parts = urlsplit(url)
    if not parts.password and "password" not in parse_qs(parts.query):
        return data
    user, colon, password = parts.netloc.rpartition("@")[0].partition(":")
    netloc = f"{user}:***@{parts.netloc.rpartition('@')[2]}" if colon and password else parts.netloc
    query = urlencode([(name, "***" if name == "password" else value)
                       for name, value in parse_qsl(parts.query, keep_blank_values=True)])
    return {**data, field: urlunsplit(parts._replace(netloc=netloc, query=query))}


def password_from_env(name: str | None) -> str | None:
    """The Redis password in the environment variable `name` (None when no variable is named); a
    named variable that is unset or empty is a ConfigError naming it."""
    if name is None:
        return None
    password = os.environ.get(name)
    if not password:
        raise ConfigError(f"the environment variable {name} (the Redis password) is not set in this process")
    return password


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


def nested_models(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field annotation holds at any depth: `Model`, `Model | None`,
    `list[Model]`, `dict[str, Model]`, `Annotated[Union[A, B], ...]`, ..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for argument in typing.get_args(annotation):  # Literal values and Annotated metadata hold no models
        found += [model for model in nested_models(argument) if model not in found]
    return found


@dataclass(frozen=True)
class FieldDescription:
    """One config field in words, as YAML writes values (`null`, `true`, lists in brackets)."""

    type: str          # e.g. "int | null", "list[SourceSection]"
    default: str       # a YAML/JSON value, or "required"
    allowed: str       # the values or bounds the model accepts; "" when any value of the type is
    description: str
    models: list[type[BaseModel]]  # the config models the field holds (sections to describe further)


def _type_text(annotation) -> str:
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(dict.fromkeys(type(value).__name__ for value in arguments))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys(_type_text(argument) for argument in arguments))
    if origin is typing.Annotated:
        return _type_text(arguments[0])
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_text(argument) for argument in arguments)}]"
    if annotation is SecretStr:
        return "str (secret)"
    return getattr(annotation, "__name__", str(annotation))


def _literal_values(annotation) -> list:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [value for argument in typing.get_args(annotation) for value in _literal_values(argument)]
    return []


_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "<="),
           (annotated_types.Lt, "lt", "<"), (annotated_types.MinLen, "min_length", "length >="),
           (annotated_types.MaxLen, "max_length", "length <="))


def _allowed_text(field: FieldInfo) -> str:
    values = _literal_values(field.annotation)
    if values:
        return ", ".join(json.dumps(value) for value in values)
    rules = []
    for constraint in field.metadata:
        for kind, attribute, symbol in _BOUNDS:
            if isinstance(constraint, kind):
                rules.append(f"{symbol} {getattr(constraint, attribute)}")
        if getattr(constraint, "pattern", None):
            rules.append(f"matches {constraint.pattern}")
    return ", ".join(rules)


def _default_text(field: FieldInfo, value) -> str:
    if value is PydanticUndefined:
        if field.is_required():
            return "required"
        value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        # A section's default is its own fields' defaults, plus whatever the factory sets otherwise.
        value = value.model_dump(mode="json", exclude_defaults=True)
    elif isinstance(value, SecretStr):
        value = value.get_secret_value() and "(set)"  # never the secret itself
    return json.dumps(to_jsonable_python(value))


def describe_field(field: FieldInfo, value=PydanticUndefined) -> FieldDescription:
    """`field` in words; `value`, when given, is its default where it sits (a parent's factory or
    validator may set it otherwise than the field's own default)."""
    return FieldDescription(type=_type_text(field.annotation), default=_default_text(field, value),
                            allowed=_allowed_text(field), description=field.description or "",
                            models=nested_models(field.annotation))


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
