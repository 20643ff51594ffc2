"""`lakeforge`: one command for the jobs, the local cluster, API keys, the audit log and model lineage.

    lakeforge run CONFIG [key=value ...]         # the pipeline (python -m jobs.pipeline --config CONFIG ...)
    lakeforge finetune|evaluate|explain CONFIG [key=value ...]
    lakeforge batch CONFIG [key=value ...]       # python -m jobs.batch_infer
    lakeforge deploy CONFIG [key=value ...]      # python -m jobs.deploy
    lakeforge monitor CONFIG [key=value ...]     # python -m jobs.monitor
    lakeforge retrain CONFIG [key=value ...]     # python -m jobs.retrain
    lakeforge cluster up|down|status             # the local head node (python -m cluster.ray_cluster)
    lakeforge keys new|record ...                # python -m cluster.security
    lakeforge audit verify FILE                  # python -m cluster.audit
    lakeforge lineage NAME VERSION               # python -m jobs.lineage

A job command calls its entry module's `main` with `--config CONFIG` and the overrides, in this
process: the same job, config checks and exit codes as `python -m jobs.<name>`, so
`ray job submit --working-dir . -- lakeforge run CONFIG` runs what `... -- python -m jobs.pipeline
--config CONFIG` runs. The entry modules are imported only when their command runs (they bring Ray,
torch and vLLM), so `--help` is quick; a job's `--help` lists its config's fields, read from the
same pydantic models that validate the config.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from dataclasses import dataclass
from functools import partial

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from cluster import audit, security
from cluster.config import StrictModel, describe_field
from jobs import lineage
from jobs.config import BatchInferConfig, DeployConfig, MonitorConfig, RunConfig

REFERENCE = "docs/configuration.md"
# A sentence ends at a full stop before a capital, not inside "e.g. US" or "i.e. The".
FIRST_SENTENCE = re.compile(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z])")


@dataclass(frozen=True)
class JobCommand:
    module: str                  # jobs.<module>.main(argv) runs it
    config: type[StrictModel]    # the config it reads, whose fields its --help lists
    summary: str


JOBS = {
    "run": JobCommand("pipeline", RunConfig, "the whole pipeline: data, fine-tuning, evaluation, explanations, "
                      "model registry and serving"),
    "finetune": JobCommand("finetune", RunConfig, "prepare the data and fine-tune (Ray Train + DeepSpeed), export the best checkpoint"),
    "evaluate": JobCommand("evaluate", RunConfig, "evaluate the run's model on the held-out test split against the current "
                           "version, the base model and the TF-IDF baseline; write report.html"),
    "explain": JobCommand("explain", RunConfig, "explain the run's model on its test predictions (integrated gradients, SHAP)"),
    "batch": JobCommand("batch_infer", BatchInferConfig, "batch inference: a table in, predictions out (vLLM on Ray Data)"),
    "deploy": JobCommand("deploy", DeployConfig, "serve a registered model version (the current one, or version=vNNNN)"),
    "monitor": JobCommand("monitor", MonitorConfig, "online quality and drift of served models from the prediction and "
                          "feedback logs; write monitor.json, monitor.html and Prometheus gauges"),
    "retrain": JobCommand("retrain", RunConfig, "continue from the current version on new labelled rows (feedback, new "
                          "sources) and a replayed sample of the training split; evaluate, gate and register"),
}
CLUSTER_ACTIONS = {
    "up": "start (or reuse) the local head node and print its dashboard address",
    "down": "stop the local head node and every process it started",
    "status": "say whether the local head node is running",
}


def override_lines(model: type[StrictModel], prefix: str = "", defaults: BaseModel | None = None) -> list[str]:
    """One line per `key=value` a config takes: dotted keys through its sections; a list or mapping
    of sections is one line (its items are written in the YAML file, see the reference).

    `defaults` is the section as a config without it would hold: the defaults are shown as the job
    sees them, after the factories and validators that set some (serve.endpoint.max_model_len)."""
    lines = []
    for name, field in model.model_fields.items():
        value = getattr(defaults, name) if defaults is not None else PydanticUndefined
        if value is PydanticUndefined and not field.is_required():
            value = field.get_default(call_default_factory=True)
        described = describe_field(field, value)
        section = len(described.models) == 1 and "[" not in described.type
        if not section or not isinstance(value, BaseModel):  # a value, or an optional section left unset
            allowed = f"; {described.allowed}" if described.allowed else ""
            summary = FIRST_SENTENCE.split(described.description, maxsplit=1)[0].rstrip(".")  # the reference has it all
            lines.append(f"  {prefix}{name} ({described.type}{allowed}; default {described.default}): {summary}")
        if section:
            lines += override_lines(described.models[0], f"{prefix}{name}.", value if isinstance(value, BaseModel) else None)
    return lines


def run_job(command: str, args: argparse.Namespace) -> object:
    entry = importlib.import_module(f"jobs.{JOBS[command].module}").main
    return entry(["--config", args.config, *args.overrides])


def run_cluster(args: argparse.Namespace) -> object:
    return importlib.import_module("cluster.ray_cluster").main([args.action])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lakeforge", description="Fine-tune an LLM on your own data on a Ray cluster and serve it.",
        epilog=f"Each command has --help. Config fields in full: {REFERENCE}.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, job in JOBS.items():
        try:
            defaults = job.config()  # what an empty file gives: the defaults as the job sees them
        except ValidationError:  # a config with required fields (deploy's name, batch's paths)
            defaults = None
        sub = commands.add_parser(
            command, help=job.summary, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"{job.summary}.\nSame as: python -m jobs.{job.module} --config CONFIG [key=value ...]",
            epilog=f"{job.config.__name__} fields (key=value overrides; the full reference is {REFERENCE}):\n"
                   + "\n".join(override_lines(job.config, defaults=defaults)))
        sub.add_argument("config", metavar="CONFIG", help="YAML config file")
        sub.add_argument("overrides", nargs="*", metavar="key=value",
                         help="dotted overrides of the file, values parsed as YAML")
        sub.set_defaults(handler=partial(run_job, command))
    cluster = commands.add_parser(
        "cluster", help="the local Ray head node: up, down, status", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The local Ray head node (token authentication on, dashboard on 127.0.0.1:8265).\n"
                    "A cloud cluster is started from cluster.yaml with `ray up cluster.yaml` (docs/operations.md).",
        epilog="\n".join(f"  {action:<7} {text}" for action, text in CLUSTER_ACTIONS.items()))
    cluster.add_argument("action", choices=list(CLUSTER_ACTIONS))
    cluster.set_defaults(handler=run_cluster)
    security.add_commands(commands.add_parser(
        "keys", help="API keys for the endpoint: new, record", description="API keys for the endpoint (only their "
        "digests go into configs; docs/security.md)."))
    audit.add_commands(commands.add_parser(
        "audit", help="the hash-chained audit log: verify", description="The gateway's hash-chained audit log."))
    lineage.add_arguments(commands.add_parser(
        "lineage", help="a model version's lineage: sources, data, code, training, evaluation, files, deployments",
        description="Where a registered model version came from and where it was deployed (python -m jobs.lineage)."))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = args.handler(args)
    # Jobs return None (or the deploy's URL); the key and audit commands an exit status.
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
