"""Write the configuration reference, docs/configuration.md, from the pydantic config models.

    python scripts/config_reference.py --write    # after changing a config model or a description
    python scripts/config_reference.py            # print it

The models are the one source: a field's type, default, allowed values and description here are
what validation uses. tests/test_docs.py fails when docs/configuration.md is not what this writes.
"""

from __future__ import annotations

import argparse
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

from cluster.config import StrictModel, describe_field, nested_models
from cluster.contracts import EndpointSettings
from jobs.config import BatchInferConfig, DeployConfig, MonitorConfig, RunConfig
from serving.queue_consumer import ConsumerSettings

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


@dataclass(frozen=True)
class Root:
    """A config file's top level."""

    model: type[StrictModel]
    title: str
    used: str       # by which command, or where in other configs
    examples: str


ROOTS = (
    Root(RunConfig, "Run config", "Read by `lakeforge run|finetune|evaluate|explain CONFIG` "
         "(`python -m jobs.pipeline|finetune|evaluate|explain --config CONFIG`)",
         "`configs/airline_sentiment.yaml`, `configs/airline_sentiment_gpu.yaml`"),
    Root(EndpointSettings, "Endpoint settings", "Set as `serve.endpoint` of a run config, `endpoint` of a deploy "
         "config, and `args` of a Serve config naming `serving.app:build_app` (`serve deploy`)", "`configs/serve.yaml`"),
    Root(DeployConfig, "Deploy config", "Read by `lakeforge deploy CONFIG` (`python -m jobs.deploy --config CONFIG`)",
         "`configs/deploy.yaml`"),
    Root(BatchInferConfig, "Batch inference config",
         "Read by `lakeforge batch CONFIG` (`python -m jobs.batch_infer --config CONFIG`)",
         "`configs/batch_infer/tweets.yaml`"),
    Root(MonitorConfig, "Monitor config", "Read by `python -m jobs.monitor --config CONFIG`",
         "`configs/monitoring/monitor.yaml`"),
    Root(ConsumerSettings, "Queue consumer settings", "Read by `python -m serving.queue_consumer --config CONFIG`; "
         "also `args` of a Serve config naming `serving.queue_consumer:build_consumer_app`",
         "`configs/queue_consumer/consumer.yaml`"),
)
ROOT_MODELS = {root.model for root in ROOTS}


def places(roots: tuple[Root, ...]) -> dict[type, list[str]]:
    """Where each model sits in the files, e.g. DataSection: `data` and `tasks[].data` of RunConfig.
    Paths stop at another root's model: its fields are listed under it, from its own top."""
    found: dict[type, list[str]] = {}

    def walk(model: type[StrictModel], root: type[StrictModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            described = describe_field(field)
            path = prefix + name + ("[]" if described.type.startswith("list[") else
                                    ".<key>" if described.type.startswith("dict[") else "")
            for nested in described.models:
                found.setdefault(nested, []).append(f"`{path}` ({root.__name__})")
                if nested not in ROOT_MODELS:
                    walk(nested, root, path + ".")

    for root in roots:
        walk(root.model, root.model, "")
    return found


def sections(root: type[StrictModel], documented: set[type]) -> list[type[StrictModel]]:
    """The root and the models reached from it (not through another root), breadth first, each once."""
    order, pending = [], [root]
    while pending:
        model = pending.pop(0)
        if model in documented or model in order:
            continue
        order.append(model)
        for field in model.model_fields.values():
            pending += [nested for nested in nested_models(field.annotation) if nested not in ROOT_MODELS]
    return order


def markdown_text(text: str) -> str:
    """A table cell's prose: pipes escaped; outside `code`, '<name>' and '*' kept from reading as HTML
    or emphasis."""
    parts = text.replace("|", "\\|").split("`")
    for index in range(0, len(parts), 2):
        parts[index] = parts[index].replace("<", "&lt;").replace("*", "\\*")
    return "`".join(parts)


def linked_type(type_text: str, models: list[type]) -> str:
    text = type_text.replace("|", "\\|")
    for model in models:
        text = re.sub(rf"\b{model.__name__}\b", f"[{model.__name__}](#{model.__name__.lower()})", text)
    return text


def model_section(model: type[StrictModel], where: list[str]) -> list[str]:
    lines = [f"### `{model.__name__}`", ""]
    doc = model.__dict__.get("__doc__")  # its own docstring, not StrictModel's
    if doc:
        lines += [markdown_text(" ".join(inspect.cleandoc(doc).split("\n\n")[0].split())), ""]
    if where:
        lines += [f"Set at: {', '.join(where)}.", ""]
    lines += ["| Field | Type | Default | Allowed | Description |", "| --- | --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        described = describe_field(field)
        allowed = f"`{described.allowed}`" if described.allowed else ""
        default = "required" if described.default == "required" else f"`{described.default}`"
        lines.append(f"| `{name}` | {linked_type(described.type, described.models)} | {default} | {allowed} "
                     f"| {markdown_text(described.description)} |")
    return lines + [""]


def render() -> str:
    where = places(ROOTS)
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the pydantic config models by `python scripts/config_reference.py --write`: edit the",
        "     models (their fields' descriptions), not this file. tests/test_docs.py fails when it is stale. -->",
        "",
        "Every lakeforge config is a YAML file checked against these models when it is loaded: an unknown key",
        "or a bad value stops the job before any work with one line naming the key (exit code 2). `key=value`",
        "arguments after the file override it, values parsed as YAML (`train.max_steps=100`,",
        "`data.labels=[a, b]`); `lakeforge <command> --help` lists the keys. `null` is YAML's empty value;",
        "*required* fields have no default; a section's default `{}` means each of its own fields' defaults.",
        "A run config's defaults are the measured recipe ([runs.md](runs.md)).",
        "",
        "| Config | Used | Examples |",
        "| --- | --- | --- |",
        *(f"| [{root.title}](#{root.model.__name__.lower()}) | {markdown_text(root.used)} | {root.examples} |"
          for root in ROOTS),
        "",
    ]
    documented: set[type] = set()
    for root in ROOTS:
        lines += [f"## {root.title}", "", f"{root.used}. Examples: {root.examples}.", ""]
        for model in sections(root.model, documented):
            lines += model_section(model, [] if model is root.model else where.get(model, []))
            documented.add(model)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {REFERENCE} instead of printing it")
    text = render()
    if parser.parse_args().write:
        REFERENCE.write_text(text)
        print(f"wrote {REFERENCE}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
