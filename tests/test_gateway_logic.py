"""The gateway's HTTP behaviour without a cluster: the real `Gateway` and FastAPI app (guard, error
answers, audit, routes, the OpenAPI schema), with the engine replaced by a stand-in that records what
reaches it and answers in ray.serve.llm's shapes (so schemathesis can check every answer)."""

import asyncio
import errno
import json
import logging
import math
import os
import re
import threading
import time

import httpx
import jwt
import pytest
from fastapi.testclient import TestClient
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionResponse, CompletionResponse, ModelCard, OpenAIHTTPException,
)
from starlette.responses import JSONResponse, StreamingResponse

import cluster.audit
from bench.api_fuzz import fuzz, load_schema
from cluster.contracts import ModelArtifact
from cluster.monitoring import FEEDBACK, FEEDBACK_SCHEMA, PREDICTION_SCHEMA, PREDICTIONS
from jobs.monitoring.run import read_log
from cluster.security import new_api_key
from serving.gateway import AUDIT_DOWN, AUDIT_RETRY_S, ENDPOINTS, Gateway, gateway_app

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
    """make(engine_error=None, security={}, monitoring={}) -> (gateway, client, keys); `gateway.engine_bodies`
    holds what reached the engine; `security` adds security settings, `monitoring` the monitoring section. Gateways are closed (audit flushed) at teardown."""
    adapters = tmp_path / "adapters"
    for name in ("acme-a", "acme-b", "beta-a"):
        (adapters / name).mkdir(parents=True)
        (adapters / name / "adapter_config.json").write_text("{}")
    keys, records = {}, []
    for role in ("admin", "app"):
        keys[role], record = new_api_key(role, [role], "acme", key_id=role)
        records.append(record.model_dump())

    gateways = []

    def make(engine_error: Exception | None = None, health_error: Exception | None = None, security: dict | None = None,
             monitoring: dict | None = None):
        settings = {"model_id": "tiny", "model_dir": str(tiny_model_dir), "lora": {"adapters_dir": str(adapters)},
                    "limits": {"max_tokens": 512}, "monitoring": monitoring or {},
                    "security": {"open_routes": ["/health"], "api_keys": records, "models": MODELS,
                                 "param_limits": {"app": {"max_tokens": 32}}, "audit": {"path": str(tmp_path / "audit.jsonl")},
                                 **(security or {})}}
        card = ModelCard(id="tiny", object="model", owned_by="lakeforge", permission=[], metadata={})
        gateway = Gateway({"tiny": EngineHandle(health_error)}, {"tiny": card}, lora_paths={"tiny": str(adapters)},
                          settings=settings)
        gateway.engine_bodies = []
        gateways.append(gateway)

        async def engine(body, call_method, raw_request=None):
            """Answers as ray.serve.llm's router does, with one "ok" per completion asked for: a JSON body,
            or (streaming) the whole answer as one server-sent event and `[DONE]`."""
            gateway.engine_bodies.append(body)
            if engine_error is not None:
                raise engine_error
            usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            choices = range(body.n or 1)
            if call_method == "chat":
                answer = ChatCompletionResponse.model_validate({"model": body.model or "tiny", "usage": usage, "choices": [
                    {"index": index, "message": {"role": "assistant", "content": "ok"}} for index in choices]})
            else:
                answer = CompletionResponse.model_validate({"model": body.model or "tiny", "usage": usage, "choices": [
                    {"index": index, "text": "ok"} for index in choices]})
            if body.stream:
                return StreamingResponse(iter([f"data: {answer.model_dump_json()}\n\n", "data: [DONE]\n\n"]),
                                         media_type="text/event-stream")
            return JSONResponse(answer.model_dump())

        gateway._process_llm_request = engine
        app = gateway_app(gateway.settings)
        for name, route in ENDPOINTS.items():
            route(app)(getattr(gateway, name))
        return gateway, TestClient(app, raise_server_exceptions=False), keys
    yield make
    for gateway in gateways:
        gateway.close()


def post(client, keys, role, route, body):
    return client.post(route, json=body, headers={"authorization": f"Bearer {keys[role]}"})


def chat(model="tiny", **extra):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def audit_entries(gateway) -> list[dict]:
    assert gateway.flush(timeout=60)  # summaries are queued without a request waiting for them
    return [json.loads(line) for line in gateway.audit.path.read_text().splitlines()]


def from_address(client, address: str) -> TestClient:
    """A client of the same app whose requests come from `address`."""
    return TestClient(client.app, raise_server_exceptions=False, client=(address, 40000))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


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


def test_failed_authentication_is_limited_per_address_before_any_audit_write(endpoint):
    gateway, client, keys = endpoint(security={"failed_auth": {"max_failures": 3, "window_seconds": 60}})
    clock = gateway.failed_auth.clock = FakeClock()
    attacker, neighbour = from_address(client, "203.0.113.7"), from_address(client, "198.51.100.2")
    wrong = {"authorization": "Bearer lf_admin_not-the-secret"}
    answers = [attacker.post("/v1/chat/completions", json=chat(), headers=wrong) for _ in range(20)]
    assert [answer.status_code for answer in answers] == [401] * 3 + [429] * 17
    assert {answer.headers["retry-after"] for answer in answers[3:]} == {"60"}
    assert "too many failed authentications" in answers[-1].json()["error"]["message"]
    attackers = [entry for entry in audit_entries(gateway) if entry.get("client") == "203.0.113.7"]
    assert [entry["status"] for entry in attackers] == [401] * 3  # the 429s are not audited one by one
    # Another address is unaffected.
    assert neighbour.post("/v1/chat/completions", json=chat(), headers=wrong).status_code == 401
    assert post(neighbour, keys, "app", "/v1/chat/completions", chat()).status_code == 200
    # Valid credentials from the blocked address are served (clients behind the same NAT keep
    # working), and they do not wipe its failures: the next wrong key is still refused.
    clock.now += 30
    assert post(attacker, keys, "app", "/v1/chat/completions", chat()).status_code == 200
    refused = attacker.post("/v1/chat/completions", json=chat(), headers=wrong)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
    # Once the window has closed, one summary entry counts the 18 refusals, and the address gets
    # its failures again.
    clock.now += 30
    assert attacker.post("/v1/chat/completions", json=chat(), headers=wrong).status_code == 401
    attackers = [entry for entry in audit_entries(gateway) if entry.get("client") == "203.0.113.7"]
    failed = [entry for entry in attackers if entry["event"] == "failed_auth_limited" or entry.get("status") == 401]
    assert [(entry["event"], entry.get("status"), entry.get("refused")) for entry in failed] == (
        [("request", 401, None)] * 3 + [("failed_auth_limited", None, 18), ("request", 401, None)])
    assert cluster.audit.verify(gateway.audit.path, gateway.audit.key_provider.key()).ok


def test_open_windows_are_summarised_at_shutdown(endpoint):
    gateway, client, _ = endpoint(security={"failed_auth": {"max_failures": 1}})
    for _ in range(4):
        client.get("/v1/models")
    gateway.close()
    entries = [json.loads(line) for line in gateway.audit.path.read_text().splitlines()]
    assert [(entry["event"], entry.get("refused")) for entry in entries] == [("request", None), ("failed_auth_limited", 3)]


def test_forwarded_for_is_believed_only_from_trusted_proxies(endpoint):
    gateway, client, _ = endpoint(security={"failed_auth": {"max_failures": 1}, "trusted_proxies": ["10.0.0.0/8"]})
    spoofed = {"x-forwarded-for": "192.0.2.1"}
    direct = from_address(client, "198.51.100.9")  # not a proxy: its header is ignored
    assert [direct.get("/v1/models", headers=spoofed).status_code for _ in range(2)] == [401, 429]
    proxy = from_address(client, "10.1.2.3")  # a trusted proxy: the client is the address it appends
    assert [proxy.get("/v1/models", headers={"x-forwarded-for": f"192.0.2.{n}, 203.0.113.{n}"}).status_code
            for n in (1, 1, 2)] == [401, 429, 401]
    assert [entry["client"] for entry in audit_entries(gateway)] == ["198.51.100.9", "203.0.113.1", "203.0.113.2"]


def test_audit_writes_run_off_the_event_loop(endpoint, monkeypatch):
    """While the disk hangs in fsync, the event loop still answers other requests; the request whose
    entry is being written waits for it (nothing is answered before its entry is on disk)."""
    gateway, client, keys = endpoint()
    entered, release, fsync_threads = threading.Event(), threading.Event(), []
    real_fsync = os.fsync

    def hanging_fsync(fd):
        fsync_threads.append(threading.current_thread())
        entered.set()
        release.wait(120)
        real_fsync(fd)

    async def scenario():
        loop_thread = threading.current_thread()
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            blocked = asyncio.ensure_future(http.post("/v1/chat/completions", json=chat(),
                                                      headers={"authorization": f"Bearer {keys['admin']}"}))
            # (Were the fsync on this loop's thread, neither this wait nor /health could finish until
            # the safety timer below released the disk.)
            await asyncio.to_thread(entered.wait, 60)
            health = await http.get("/health")
            disk_still_hanging, request_still_waiting = not release.is_set(), not blocked.done()
            release.set()
            return loop_thread, health, disk_still_hanging, request_still_waiting, await blocked

    monkeypatch.setattr(os, "fsync", hanging_fsync)
    safety = threading.Timer(60, release.set)  # only the old, blocking writes ever need it
    safety.start()
    try:
        loop_thread, health, disk_still_hanging, request_still_waiting, answer = asyncio.run(scenario())
    finally:
        release.set()
        safety.cancel()
    assert health.status_code == 200 and disk_still_hanging and request_still_waiting
    assert answer.status_code == 200
    assert fsync_threads and all(thread is not loop_thread for thread in fsync_threads)
    assert [entry["event"] for entry in audit_entries(gateway)] == ["decision", "request"]


def test_an_audit_store_failing_in_the_writer_refuses_requests_until_it_works_again(endpoint, monkeypatch, caplog):
    gateway, client, keys = endpoint()
    assert post(client, keys, "admin", "/v1/chat/completions", chat()).status_code == 200
    clock = gateway.audit_writer.clock = FakeClock()
    real_fsync, fsyncs = os.fsync, []

    def full_disk(fd):
        fsyncs.append(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with caplog.at_level(logging.WARNING):
        failing = post(client, keys, "admin", "/v1/chat/completions", chat())
        tries = len(fsyncs)
        refused = [post(client, keys, "admin", "/v1/chat/completions", chat()),
                   client.post("/v1/chat/completions", json=chat())]  # no key: 503, not 401
        assert len(fsyncs) == tries  # refused at once: the broken store is not tried per request
        monkeypatch.setattr(os, "fsync", real_fsync)
        clock.now += AUDIT_RETRY_S  # the next request tries the store again, and it works
        recovered = post(client, keys, "admin", "/v1/chat/completions", chat())
    assert [(answer.status_code, answer.json()["error"]["message"]) for answer in (failing, *refused)] == [(503, AUDIT_DOWN)] * 3
    assert recovered.status_code == 200 and len(gateway.engine_bodies) == 2  # the first and the recovered one
    assert "No space left on device" in caplog.text and "can be written again" in caplog.text


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_the_schema_documents_every_status_and_the_limits_of_this_deployment(endpoint):
    """What a client generated from /openapi.json needs: each route's statuses (the guard's 401/429
    only outside the open routes), one error body, the guard's headers, and the bounds the gateway
    enforces, from this deployment's limits (max_tokens 512 here, the other limits' defaults)."""
    _, client, keys = endpoint()
    assert client.get("/openapi.json").status_code == 401  # a route like the others
    schema = client.get("/openapi.json", headers=bearer(keys["app"])).json()
    generating = {"200", "400", "401", "403", "404", "408", "413", "415", "429", "500", "503"}
    assert {(method, path): set(operation["responses"]) for path, operations in schema["paths"].items()
            for method, operation in operations.items()} == {
        ("get", "/v1/models"): {"200", "401", "429", "500", "503"},
        ("get", "/v1/models/{model}"): {"200", "401", "403", "404", "429", "500", "503"},
        ("post", "/v1/completions"): generating,
        ("post", "/v1/chat/completions"): generating,
        ("post", "/v1/classify"): generating - {"408"},
        ("post", "/v1/feedback"): {"202", "400", "401", "403", "404", "415", "429", "500", "503"},
        ("get", "/health"): {"200", "500", "503"},  # open: no credentials, so no 401 or 429
    }
    for path, operations in schema["paths"].items():
        for status, answer in next(iter(operations.values()))["responses"].items():
            if status >= "400":
                assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearer": []}] and "security" not in schema["paths"]["/health"]["get"]
    assert chat["responses"]["429"]["headers"]["Retry-After"]["required"]
    assert chat["responses"]["401"]["headers"]["WWW-Authenticate"]["required"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    models = schema["components"]["schemas"]
    assert "HTTPValidationError" not in models  # FastAPI's 422, never answered

    def bound(model: str, field: str) -> dict:
        """A field's schema without null, which vLLM accepts for most fields."""
        options = [option for option in models[model]["properties"][field].get("anyOf", [models[model]["properties"][field]])
                   if option != {"type": "null"}]
        return options[0] if len(options) == 1 else {"anyOf": options}

    chat_body, completion_body = "ChatCompletionBody", "CompletionBody"
    assert bound(chat_body, "max_tokens") == bound(chat_body, "max_completion_tokens") == {
        "type": "integer", "minimum": 1, "maximum": 512}
    assert bound(chat_body, "n") == bound(completion_body, "best_of") == {"type": "integer", "minimum": 1, "maximum": 4}
    assert bound(chat_body, "top_logprobs") == bound(completion_body, "logprobs") == {
        "type": "integer", "minimum": 0, "maximum": 5}
    assert bound(chat_body, "temperature") == {"type": "number", "minimum": 0, "maximum": 2}
    assert bound(chat_body, "stop") == {"anyOf": [{"type": "string", "maxLength": 64},
                                                  {"type": "array", "items": {"type": "string", "maxLength": 64}, "maxItems": 4}]}
    assert bound(completion_body, "stop_token_ids")["maxItems"] == 4
    assert [option.get("maxItems") for option in bound(completion_body, "prompt")["anyOf"]] == [None, None, 16, 16]
    assert bound(chat_body, "model")["pattern"] == "^[^:]*(:[A-Za-z0-9][A-Za-z0-9_.-]{0,127})?$"
    assert models["CustomChatCompletionMessageParam"]["properties"]["role"]["enum"] == [
        "system", "developer", "user", "assistant", "tool", "function"]
    assert bound("ClassifyRequest", "texts") == {"type": "array", "items": {"type": "string", "maxLength": 32000},
                                                 "minItems": 1, "maxItems": 64}


@pytest.mark.parametrize("route, body, content_type, status, named", [
    # Each of these was a 500.
    ("/v1/classify", "hello", "text/plain", 415, "send the body as JSON (Content-Type: application/json), not 'text/plain'"),
    ("/v1/chat/completions", {"messages": None}, None, 400, "body.messages: Input should be a valid list"),
    ("/v1/chat/completions", {"messages": [None]}, None, 400, "body.messages.0: Input should be a valid dictionary"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": []}, None, 400, "body.structured_outputs: Input should be"),
    # These were answered as if they were the integers the schema asks for.
    ("/v1/chat/completions", chat(n="2"), None, 400, "body.n: Input should be a valid integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, None, 400, "body.max_tokens: Input should be a valid integer"),
    # This was FastAPI's {"detail": ...}, not the error body.
    ("/v1/chat/completions", chat("airline-sentiment:../../etc"), None, 404,
     'Could not find base model with ID "airline-sentiment"'),
], ids=["classify-text-plain", "messages-null", "message-null", "structured_outputs-list", "n-string", "max_tokens-true",
        "unknown-base-model"])
def test_malformed_requests_get_a_4xx_in_the_error_body_naming_the_problem(endpoint, route, body, content_type, status, named):
    gateway, client, keys = endpoint()
    if content_type is None:
        answer = post(client, keys, "admin", route, body)
    else:
        answer = client.post(route, content=body, headers={**bearer(keys["admin"]), "content-type": content_type})
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error"} and answer.json()["error"]["code"] == status
    assert named in answer.json()["error"]["message"]
    assert "ray.llm" not in answer.text and "function-wrap" not in answer.text and "MessageParam" not in answer.text
    assert gateway.engine_bodies == []


def test_metric_tags_are_never_client_text(endpoint, monkeypatch):
    """Each new tag value is a new Prometheus series, and Ray's metrics fail on non-ASCII (a 500 after
    the answer was decided): the route's template, a model that exists, the key id escaped."""
    monkeypatch.setenv("GATEWAY_TEST_JWT_SECRET", "s" * 32)
    gateway, client, keys = endpoint(security={"jwt": {"secret_env": "GATEWAY_TEST_JWT_SECRET", "issuer": "idp",
                                                       "audience": "lakeforge"}})
    tagged = []
    count = gateway.metrics.requests.inc
    monkeypatch.setattr(gateway.metrics.requests, "inc",
                        lambda value=1.0, tags=None: (tagged.append(tags), count(value, tags=tags)))
    token = jwt.encode({"sub": "jos\u00e9", "iss": "idp", "aud": "lakeforge", "exp": time.time() + 60, "roles": ["app"],
                        "tenant": "acme"}, "s" * 32, algorithm="HS256")
    answers = [client.get("/v1/models/caf\u00e9"),  # no key
               post(client, keys, "admin", "/v1/chat/completions", chat("tiny:caf\u00e9")),
               post(client, keys, "admin", "/v1/chat/completions", chat("tiny:no-such-adapter")),
               post(client, keys, "admin", "/v1/chat/completions", chat("tiny:acme-a")),
               client.get("/v1/models", headers=bearer(token))]
    assert [answer.status_code for answer in answers] == [401, 400, 404, 200, 200]
    assert [(tags["route"], tags["model"], tags["key_id"]) for tags in tagged] == [
        ("/v1/models/{model:path}", "-", "-"), ("/v1/chat/completions", "tiny", "admin"),
        ("/v1/chat/completions", "tiny", "admin"), ("/v1/chat/completions", "tiny:acme-a", "admin"),
        ("/v1/models", "-", "jos\\xe9")]
    assert [entry["model"] for entry in audit_entries(gateway) if entry["event"] == "request"][1:3] == [
        "tiny:caf\u00e9", "tiny:no-such-adapter"]  # the audit keeps what was asked for


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(endpoint):
    """schemathesis over the gateway's own /openapi.json, checking what schemathesis.toml names: its
    coverage cases (each documented bound just inside and just outside) with an admin key, then
    generated requests, valid and invalid, each with an admin key, a restricted role's key (the app
    role: a max_tokens cap, its own tenant's adapters) and none. `make bench` runs more (bench.api_fuzz)."""
    _, client, keys = endpoint()
    credentials = {"admin": bearer(keys["admin"]), "app": bearer(keys["app"]), "none": {}}
    report = fuzz(load_schema(client.app, credentials["admin"]), credentials, examples=60, derandomize=True)
    assert report["failures"] == [] and report["server_errors"] == 0
    answered = {status for by_name in report["statuses"].values() for counts in by_name.values() for status in counts}
    assert {"200", "400", "401", "403", "404", "415"} <= answered  # the run reached every kind of answer


# ----- the prediction and feedback logs -----

SENTIMENTS = ["negative", "neutral", "positive"]


@pytest.fixture
def classifier(endpoint, tmp_path, monkeypatch):
    """make(**monitoring) -> (gateway, client, keys): adapter tiny:acme-a is a sentiment classifier whose
    engine scores are fixed (negative 0.7, neutral 0.2, positive 0.1) and monitoring has these settings."""
    ModelArtifact(name="tiny:acme-a", base_model="tiny", labels=SENTIMENTS).write(tmp_path / "adapters" / "acme-a")

    def make(**monitoring):
        gateway, client, keys = endpoint(monitoring=monitoring)

        async def fixed_scores(model_id, prompt, labels):
            return [math.log(0.7), math.log(0.2), math.log(0.1)]

        monkeypatch.setattr(gateway, "_label_logprobs", fixed_scores)
        return gateway, client, keys
    return make


def test_predictions_and_feedback_are_logged_and_feedback_is_checked(classifier, tmp_path):
    root = tmp_path / "monitoring"
    gateway, client, keys = classifier(enabled=True, root=str(root), version="ignored-for-adapters")
    classified = post(client, keys, "app", "/v1/classify", {"model": "tiny:acme-a", "texts": ["late again", "ok flight"]})
    assert classified.status_code == 200, classified.text
    request_id = classified.json()["id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id) and classified.json()["results"][0]["label"] == "negative"

    def feedback(role="app", **body):
        return post(client, keys, role, "/v1/feedback", {"model": "tiny:acme-a", "request_id": request_id, **body})

    accepted = feedback(index=1, label="neutral")
    assert accepted.status_code == 202 and accepted.json() == {"object": "feedback", "request_id": request_id,
                                                               "index": 1, "label": "neutral"}
    refused = {"unknown label": feedback(label="angry"), "malformed id": feedback(label="neutral", request_id="r-1"),
               "missing id": post(client, keys, "app", "/v1/feedback", {"model": "tiny:acme-a", "label": "neutral"}),
               "other tenant": feedback(label="neutral", model="tiny:beta-a")}
    assert {name: answer.status_code for name, answer in refused.items()} == {
        "unknown label": 400, "malformed id": 400, "missing id": 400, "other tenant": 403}
    assert refused["unknown label"].json()["error"]["message"] == (
        "label 'angry' is not a label of model 'tiny:acme-a' (its labels: negative, neutral, positive)")
    assert refused["malformed id"].json()["error"]["message"].startswith("body.request_id: String should match pattern")
    assert refused["missing id"].json()["error"]["message"] == "body.request_id: Field required"
    assert not list(root.rglob("part-*.parquet"))  # written in the background, by size or interval, not per request
    gateway.close()
    predictions = read_log(str(root), PREDICTIONS, PREDICTION_SCHEMA).sort_values("index")
    assert predictions[["request_id", "index", "model", "version", "label", "text_chars", "text_words"]].values.tolist() == [
        [request_id, 0, "tiny:acme-a", "acme-a", "negative", 10, 2], [request_id, 1, "tiny:acme-a", "acme-a", "negative", 9, 2]]
    assert predictions["text"].isna().all() and (predictions["text_tokens"] > 2).all()  # the text only with log_text
    assert dict(predictions["probabilities"].iloc[0])["negative"] == pytest.approx(0.7)
    assert read_log(str(root), FEEDBACK, FEEDBACK_SCHEMA)[["request_id", "index", "label", "subject"]].values.tolist() == [
        [request_id, 1, "neutral", "app"]]
    classify_entry = next(entry for entry in audit_entries(gateway)
                          if entry["event"] == "request" and entry["route"] == "/v1/classify")
    assert classify_entry["request_id"] == request_id  # the audit entry and the prediction log meet on the id


def test_a_prediction_log_that_cannot_be_written_never_fails_a_request(classifier, tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the log's folder should be")
    gateway, client, keys = classifier(enabled=True, root=str(blocked), log_text=True)
    lost = []
    monkeypatch.setattr(gateway.metrics.log_failures, "inc", lambda value=1.0, tags=None: lost.append((value, tags)))
    assert post(client, keys, "admin", "/v1/classify", {"model": "tiny:acme-a", "text": "late again"}).status_code == 200
    with caplog.at_level(logging.ERROR):
        gateway.prediction_log.flush()
    assert lost == [(1, {"log": "predictions"})] and "1 records not written" in caplog.text


def test_feedback_to_an_endpoint_without_monitoring_is_a_404(classifier):
    _, client, keys = classifier()
    answer = post(client, keys, "app", "/v1/feedback", {"model": "tiny:acme-a", "request_id": "a" * 32, "label": "neutral"})
    assert (answer.status_code, answer.json()["error"]["message"]) == (
        404, "this endpoint does not collect feedback (monitoring.enabled is false)")


# ---------------------------------------------------------------- rate limits

def test_requests_past_the_roles_limit_get_429_with_the_buckets_retry_after(endpoint):
    gateway, client, keys = endpoint(security={"rate_limits": {"app": {"requests_per_minute": 2}}})
    gateway.limiter.clock = FakeClock()
    answers = [post(client, keys, "app", "/v1/chat/completions", chat()) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert answers[2].headers["retry-after"] == "30"  # one request refills in 60/2 s
    assert answers[2].json()["error"]["message"] == "rate limit of role(s) app reached; retry in 30s"
    assert post(client, keys, "admin", "/v1/chat/completions", chat()).status_code == 200  # admin: no limit
    assert [entry["status"] for entry in audit_entries(gateway) if entry["event"] == "request"] == [200, 200, 429, 200]


def test_llm_tokens_are_reserved_before_the_engine_and_settled_from_the_usage(endpoint):
    """The stand-in engine reports 2 tokens per request (1 prompt + 1 completion): each request holds
    max_tokens x n x prompts while it runs and gets the unused part back when it ends."""
    gateway, client, keys = endpoint(security={"rate_limits": {"app": {"tokens_per_minute": 100}}})
    gateway.limiter.clock = FakeClock()
    assert post(client, keys, "app", "/v1/chat/completions", chat(max_tokens=32, n=3)).status_code == 200  # holds 96
    # Had the 96 not come back (2 used), this one (32) would not fit.
    assert post(client, keys, "app", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 16}).status_code == 200
    streamed = post(client, keys, "app", "/v1/chat/completions", chat(max_tokens=32, stream=True))
    assert streamed.status_code == 200 and "[DONE]" in streamed.text  # settled from the stream's usage chunk
    refused = post(client, keys, "app", "/v1/chat/completions", chat(max_tokens=32, n=4))  # 128, capped at the bucket
    assert refused.status_code == 429 and refused.headers["retry-after"] == "4"  # 94 left: 6 more take 3.6 s
    assert "this request reserves 128 tokens (max_tokens x n x prompts)" in refused.json()["error"]["message"]
    assert len(gateway.engine_bodies) == 3  # the refused one never reached the engine


def test_limits_kept_in_redis_are_shared_with_the_other_replicas(endpoint, redis_server):
    from cluster.rate_limits import RateLimit, RateLimitStoreSettings, RedisRateLimiter

    store = {"backend": "redis", "redis_url": redis_server, "key_prefix": "gateway-shared:"}
    gateway, client, keys = endpoint(security={"rate_limits": {"app": {"requests_per_minute": 3}}, "rate_limit_store": store})
    other_replica = RedisRateLimiter(RateLimitStoreSettings(**store))
    assert post(client, keys, "app", "/v1/chat/completions", chat()).status_code == 200
    assert other_replica.acquire("app", RateLimit(requests_per_minute=3), requests=2) is None  # the key's id is "app"
    refused = post(client, keys, "app", "/v1/chat/completions", chat())
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 20


@pytest.mark.parametrize("on_unavailable, status", [("refuse", 503), ("admit", 200)])
def test_an_unreachable_rate_limit_store_refuses_with_503_or_admits(endpoint, on_unavailable, status):
    from serving.gateway import RATE_LIMITS_DOWN
    from tests.conftest import free_port

    store = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0", "retry_s": 7,
             "on_unavailable": on_unavailable}
    gateway, client, keys = endpoint(security={"rate_limits": {"app": {"requests_per_minute": 100, "tokens_per_minute": 1000}},
                                               "rate_limit_store": store})
    answers = [post(client, keys, "app", "/v1/chat/completions", chat()) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [status] * 2
    if status == 503:
        assert answers[0].headers["retry-after"] == "7" and answers[0].json()["error"]["message"] == RATE_LIMITS_DOWN
        assert gateway.engine_bodies == []
    assert post(client, keys, "admin", "/v1/chat/completions", chat()).status_code == 200  # unlimited: Redis not asked
