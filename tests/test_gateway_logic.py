"""The gateway's HTTP behaviour without a cluster: the real `Gateway` and FastAPI app (guard, error
answers, audit, routes), with the engine replaced by a stub that records what would reach it."""

import json
import logging

import pytest
from fastapi.testclient import TestClient
from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard, OpenAIHTTPException
from starlette.responses import JSONResponse

from cluster.security import new_api_key
from serving.gateway import AUDIT_DOWN, ENDPOINTS, Gateway, gateway_app

MODELS = {"tiny": {"tenant": "*", "classification": "internal"},
          "tiny:acme-a": {"tenant": "acme", "classification": "internal"},
          "tiny:acme-b": {"tenant": "acme", "classification": "internal"},
          "tiny:beta-a": {"tenant": "beta", "classification": "internal"}}


class EngineHandle:
    """Stands in for the engine deployment's handle; only its health check is called."""

    def __init__(self, error: Exception | None = None):
        self.error = error
        self.check_health = self

    def options(self, **_):
        return self

    async def remote(self):
        if self.error is not None:
            raise self.error


@pytest.fixture
def endpoint(tiny_model_dir, tmp_path):
    """make(engine_error=None) -> (gateway, client, keys); `gateway.engine_bodies` holds what reached the engine."""
    adapters = tmp_path / "adapters"
    for name in ("acme-a", "acme-b", "beta-a"):
        (adapters / name).mkdir(parents=True)
        (adapters / name / "adapter_config.json").write_text("{}")
    keys, records = {}, []
    for role in ("admin", "app"):
        keys[role], record = new_api_key(role, [role], "acme", key_id=role)
        records.append(record.model_dump())

    def make(engine_error: Exception | None = None, health_error: Exception | None = None):
        settings = {"model_id": "tiny", "model_dir": str(tiny_model_dir), "lora": {"adapters_dir": str(adapters)},
                    "limits": {"max_tokens": 512},
                    "security": {"open_routes": ["/health"], "api_keys": records, "models": MODELS,
                                 "param_limits": {"app": {"max_tokens": 32}}, "audit": {"path": str(tmp_path / "audit.jsonl")}}}
        card = ModelCard(id="tiny", object="model", owned_by="lakeforge", permission=[], metadata={})
        gateway = Gateway({"tiny": EngineHandle(health_error)}, {"tiny": card}, lora_paths={"tiny": str(adapters)},
                          settings=settings)
        gateway.engine_bodies = []

        async def engine(body, call_method, raw_request=None):
            gateway.engine_bodies.append(body)
            if engine_error is not None:
                raise engine_error
            return JSONResponse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

        gateway._process_llm_request = engine
        app = gateway_app()
        for name, route in ENDPOINTS.items():
            route(app)(getattr(gateway, name))
        return gateway, TestClient(app, raise_server_exceptions=False), keys
    return make


def post(client, keys, role, route, body):
    return client.post(route, json=body, headers={"authorization": f"Bearer {keys[role]}"})


def chat(model="tiny", **extra):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def audit_entries(gateway) -> list[dict]:
    return [json.loads(line) for line in gateway.audit.path.read_text().splitlines()]


def test_an_omitted_max_tokens_defaults_to_the_roles_cap(endpoint):
    gateway, client, keys = endpoint()
    assert post(client, keys, "app", "/v1/chat/completions", chat()).status_code == 200
    assert gateway.engine_bodies[-1].max_tokens == 32  # the app role's cap, not the endpoint's 512
    assert post(client, keys, "admin", "/v1/chat/completions", chat()).status_code == 200
    assert gateway.engine_bodies[-1].max_tokens == 512  # no cap: the endpoint's limit
    named = post(client, keys, "app", "/v1/chat/completions", chat(max_tokens=33))
    assert named.status_code == 403 and "max_tokens=33 exceeds the limit 32" in named.json()["error"]["message"]
    assert post(client, keys, "app", "/v1/completions", {"model": "tiny", "prompt": "hi"}).status_code == 200
    assert gateway.engine_bodies[-1].max_tokens == 16  # the completions default, already below the cap


@pytest.mark.parametrize("route, body, named", [
    ("/v1/completions", {"model": "tiny", "prompt": ["hi"] * 200}, "prompt holds 200 prompts; the limit is 16"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "best_of": 50}, "best_of must be between 1 and 4 (got 50)"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": -1}, "logprobs must be between 0 and 5 (got -1)"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=20), "top_logprobs must be between 0 and 5 (got 20)"),
    ("/v1/chat/completions", chat(stop="x" * 65), "a stop sequence is 65 characters; the limit is 64"),
    ("/v1/chat/completions", chat(max_tokens=8, min_tokens=9), "min_tokens must be between 0 and 8 (got 9)"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]},
     "messages[0].role must be one of system, developer, user, assistant, tool, function (got 'robot')"),
])
def test_amplifying_and_invalid_parameters_get_a_400_before_the_engine(endpoint, route, body, named):
    gateway, client, keys = endpoint()
    answer = post(client, keys, "admin", route, body)
    assert (answer.status_code, answer.json()["error"]["message"]) == (400, named)
    assert gateway.engine_bodies == []


def test_error_messages_name_the_problem_not_internal_classes(endpoint):
    gateway, client, keys = endpoint()
    too_many = post(client, keys, "admin", "/v1/chat/completions", chat(n=5))
    assert (too_many.status_code, too_many.json()["error"]["message"]) == (400, "n must be between 1 and 4 (got 5)")
    denied = post(client, keys, "app", "/v1/chat/completions", chat("tiny:beta-a"))
    assert denied.json()["error"]["message"] == "access denied: model 'tiny:beta-a' is not available to you"
    # An engine's error arrives worded by ray.serve.llm: only its message reaches the client.
    wording = ("Message: This model's maximum context length is 256 tokens. (Request ID: r1), Internal exception: "
               "vllm.exceptions.VLLMValidationError: This model's ..., original exception: ...")
    gateway, client, keys = endpoint(engine_error=OpenAIHTTPException(400, wording, type="VLLMValidationError"))
    engine_400 = post(client, keys, "admin", "/v1/chat/completions", chat())
    assert engine_400.json()["error"]["message"] == "This model's maximum context length is 256 tokens."
    gateway, client, keys = endpoint(engine_error=RuntimeError("/srv/secret/path exploded"))
    crashed = post(client, keys, "admin", "/v1/chat/completions", chat())
    assert crashed.status_code == 500 and crashed.json()["error"]["message"].startswith("internal server error (request id ")
    for answer in (too_many, denied, engine_400, crashed):
        assert "ray.llm" not in answer.text and "Internal exception" not in answer.text and "secret" not in answer.text


@pytest.mark.parametrize("model, status, named", [
    ("tiny:../../etc", 400, "the adapter name after ':' must be a plain folder name"),
    ("tiny:acme-a/../../x", 400, "plain folder name"),
    ("tiny:", 400, "plain folder name"),
    ("tiny:missing", 404, "model 'tiny:missing' does not exist"),
])
def test_model_ids_that_are_paths_or_missing_adapters_never_reach_the_engine(endpoint, model, status, named):
    gateway, client, keys = endpoint()
    answer = post(client, keys, "admin", "/v1/chat/completions", chat(model))
    assert answer.status_code == status and named in answer.json()["error"]["message"]
    assert gateway.engine_bodies == []
    if status == 404:  # a caller who may not use unregistered models cannot tell missing from forbidden
        assert post(client, keys, "app", "/v1/chat/completions", chat(model)).status_code == 403


def test_model_listing_writes_one_audit_entry(endpoint):
    gateway, client, keys = endpoint()
    listed = client.get("/v1/models", headers={"authorization": f"Bearer {keys['app']}"})
    assert [card["id"] for card in listed.json()["data"]] == ["tiny", "tiny:acme-a", "tiny:acme-b"]
    decisions = [entry for entry in audit_entries(gateway) if entry["event"] == "decision"]
    assert len(decisions) == 1 and decisions[0]["reason"] == "listed 3 of 4 models"


def test_an_audit_log_that_cannot_be_written_fails_closed_with_503(endpoint, caplog):
    gateway, client, keys = endpoint()
    gateway.audit.path.write_text('{"seq": 1, "hash": "trunc')  # a half-written last line
    with caplog.at_level(logging.ERROR):
        answers = [post(client, keys, "admin", "/v1/chat/completions", chat()),
                   client.post("/v1/chat/completions", json=chat())]  # no key: the 401 cannot be audited either
    assert [(answer.status_code, answer.json()["error"]["message"]) for answer in answers] == [(503, AUDIT_DOWN)] * 2
    assert gateway.engine_bodies == []
    assert "incomplete line" in caplog.text


def test_open_health_keeps_the_engine_error_out_of_the_answer(endpoint, caplog):
    _, client, _ = endpoint(health_error=RuntimeError("engine core died at /srv/secret/path"))
    with caplog.at_level(logging.WARNING):
        answer = client.get("/health")
    assert (answer.status_code, answer.json()["error"]["message"]) == (503, "engine of 'tiny' is unhealthy")
    assert "/srv/secret/path" in caplog.text  # the cause is in the gateway's log, not in the answer
