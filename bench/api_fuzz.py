"""Fuzzing the endpoint against its own OpenAPI schema with schemathesis (`make bench`).

Deploys the gateway and vLLM on the tiny random model (embedded Ray cluster), loads `/openapi.json`
with an admin key and checks what `schemathesis.toml` names (no 5xx, every answer as the schema
documents it, a request the schema forbids refused with a documented 4xx) on:
1. schemathesis' coverage cases of every operation (each documented bound just inside and just
   outside, missing and wrongly typed fields), with the admin key;
2. `--examples` generated requests, valid and invalid, each sent with every credential: an admin
   key, a key of a restricted role (`analyst`: lists models and classifies, nothing else), none.

    python -m bench.api_fuzz [--examples 300] [--no-coverage]   # writes bench/results/api_fuzz.json

The tests run the same `fuzz` with few examples: in-process against the gateway with a stand-in
engine (tests/test_gateway_logic.py) and against the tests' live endpoint (tests/test_serving.py).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.errors import FailureGroup

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CONFIG = REPO / "schemathesis.toml"


def load_schema(url_or_app, headers: dict) -> schemathesis.BaseSchema:
    """The endpoint's schema, from a URL or an ASGI app, checked as `schemathesis.toml` says."""
    config = schemathesis.Config.from_path(CONFIG)
    if isinstance(url_or_app, str):
        return schemathesis.openapi.from_url(f"{url_or_app}/openapi.json", config=config, headers=headers, timeout=60)
    return schemathesis.openapi.from_asgi("/openapi.json", url_or_app, config=config, headers=headers)


def fuzz(schema: schemathesis.BaseSchema, credentials: dict[str, dict], examples: int, coverage: bool = True,
         base_url: str | None = None, derandomize: bool = False) -> dict:
    """Send the coverage cases (with the first credentials) and `examples` generated requests (with
    each credentials); returns what was answered (`statuses` by operation, credentials and status)
    and every distinct failure with schemathesis' report (a curl line reproduces it)."""
    statuses: dict = defaultdict(lambda: defaultdict(Counter))
    failures: dict[tuple, dict] = {}
    # A hung engine must not hang the run, and a slow answer on a loaded 2-core machine must not be
    # cut at schemathesis' default of 10 s (in-process too: it reads streams against that deadline).
    transport = {"base_url": base_url, "timeout": 120} if base_url else {"timeout": 120}

    def send(case, name: str) -> None:
        headers = credentials[name]
        response = case.call(headers=headers, **transport)
        statuses[case.operation.label][name][str(response.status_code)] += 1
        try:
            case.validate_response(response, headers=headers)
        except FailureGroup as found:
            for failure in found.exceptions:
                seen = failures.setdefault((case.operation.label, name, failure.title), {
                    "operation": case.operation.label, "credentials": name, "failure": failure.title,
                    "count": 0, "report": found.message[:4000]})
                seen["count"] += 1

    started = time.perf_counter()
    coverage_cases = 0
    if coverage:
        for result in schema.get_all_operations():
            operation = result.ok()
            for case in schema.iter_coverage_cases(
                    operation, generation_modes=list(GenerationMode),
                    generation_config=schema.config.generation_for(operation=operation, phase="coverage")):
                send(case, next(iter(credentials)))
                coverage_cases += 1

    @given(case=st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    def generated(case):
        for name in credentials:
            send(case, name)

    if examples:
        generated()
    answered = {operation: {name: dict(counts) for name, counts in by_name.items()} for operation, by_name in statuses.items()}
    return {"requests": sum(sum(counts.values()) for by_name in statuses.values() for counts in by_name.values()),
            "coverage_cases": coverage_cases, "examples": examples, "credentials": list(credentials),
            "seconds": round(time.perf_counter() - started, 1),
            "server_errors": sum(count for by_name in answered.values() for counts in by_name.values()
                                 for status, count in counts.items() if status.startswith("5")),
            "statuses": answered, "failures": list(failures.values())}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="generated requests (each sent with every credential)")
    parser.add_argument("--no-coverage", dest="coverage", action="store_false", help="skip the coverage cases")
    parser.add_argument("--model-cache", default=str(REPO / "models"), help="where the tiny model is materialized")
    parser.add_argument("--port", type=int, default=8152, help="Serve HTTP port of the fuzzed endpoint")
    parser.add_argument("--output", default=str(RESULTS / "api_fuzz.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from ray import serve

    from cluster.contracts import EndpointSettings
    from cluster.endpoints import deploy
    from cluster.ray_cluster import connect
    from cluster.security import new_api_key
    from jobs.base_models import TINY, materialize

    keys, records = {}, []
    for role in ("admin", "analyst"):
        keys[role], record = new_api_key(role, [role], "bench", key_id=role)
        records.append(record.model_dump())
    work = Path(tempfile.mkdtemp(prefix="api_fuzz_"))
    settings = EndpointSettings.model_validate({
        "model_id": "tiny", "model_dir": str(materialize(TINY, args.model_cache)), "max_model_len": 256,
        "engine_overrides": {"enforce_eager": True}, "port": args.port, "app_name": "api-fuzz",
        # Small bounds keep each generated request short on 2 cores; the schema states them all the same.
        "limits": {"max_tokens": 64, "max_n": 2},
        "security": {"open_routes": ["/health"], "api_keys": records, "audit": {"path": str(work / "audit.jsonl")},
                     "models": {"tiny": {"tenant": "*", "classification": "internal"}},
                     # The no-key requests stay 401s (the per-address limit is tested in test_gateway_logic).
                     "failed_auth": {"max_failures": 10_000}},
    })
    os.environ.pop("RAY_ADDRESS", None)  # an embedded cluster, never someone else's
    connect()
    base_url = deploy("serving.app:build_app", settings)
    credentials = {"admin": {"authorization": f"Bearer {keys['admin']}"},
                   "analyst": {"authorization": f"Bearer {keys['analyst']}"}, "none": {}}
    try:
        report = fuzz(load_schema(base_url, credentials["admin"]), credentials, args.examples, args.coverage,
                      base_url=base_url)
    finally:
        serve.delete(settings.app_name)
        serve.shutdown()
        import ray

        ray.shutdown()
    result = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "schemathesis": schemathesis.__version__,
              "limits": settings.limits.model_dump(), **report}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"[bench] {report['requests']} requests in {report['seconds']}s ({report['coverage_cases']} coverage cases, "
          f"{args.examples} generated x {len(credentials)} credentials): {report['server_errors']} answers 5xx, "
          f"{len(report['failures'])} distinct failures")
    for failure in report["failures"]:
        print(f"[bench] {failure['operation']} ({failure['credentials']}): {failure['failure']} x{failure['count']}")
    print(f"[bench] results: {args.output}")


if __name__ == "__main__":
    main()
