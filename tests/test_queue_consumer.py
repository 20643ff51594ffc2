"""serving.queue_consumer against a real redis-server: at-least-once delivery, takeover of a dead
consumer's entries, dead letters; with the tiny model served by serving.app over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from cluster.config import ConfigError, load_config
from serving.queue_consumer import ConsumerSettings, CredentialsRefused, QueueConsumer
from tests.conftest import EAGER, free_port

SERVE_PORT = 8141
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings_for(redis_url: str, **overrides) -> dict:
    prefix = f"test-{uuid.uuid4().hex[:8]}"  # fresh streams per test on the shared server
    return {"redis_url": redis_url, "request_stream": f"{prefix}:requests", "result_stream": f"{prefix}:results",
            "dead_letter_stream": f"{prefix}:dead", "group": "g", "model": "tiny", "block_ms": 100, **overrides}


@pytest.fixture(autouse=True)
def consumer_key(monkeypatch):
    """The consumers made in this process read their key from the environment (never from settings)."""
    monkeypatch.setenv("LAKEFORGE_API_KEY", "test-key")


def send(client: redis.Redis, settings: dict, count: int, **body) -> list[str]:
    ids = []
    for i in range(count):
        request = {"messages": [{"role": "user", "content": f"My flight {i} was delayed again."}], "max_tokens": 4, **body}
        client.xadd(settings["request_stream"], {"request_id": f"r{i}", "correlation_id": f"crm-{i}", "body": json.dumps(request)})
        ids.append(f"r{i}")
    return ids


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


def entries(client: redis.Redis, stream: str) -> list[dict]:
    return [fields for _, fields in client.xrange(stream)]


def test_settings_are_typed_and_need_an_api_key(monkeypatch):
    with pytest.raises(ConfigError, match="redis_ur: unknown key"):
        load_config(ConsumerSettings, None, ["redis_ur=redis://x"])
    with pytest.raises(ConfigError, match="max_deliveries"):
        load_config(ConsumerSettings, None, ["max_deliveries=0"])
    monkeypatch.delenv("LAKEFORGE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="no API key"):
        ConsumerSettings().key()
    monkeypatch.setenv("LAKEFORGE_API_KEY", "from-env")
    assert ConsumerSettings().key() == "from-env"
    with pytest.raises(ConfigError, match="api_key: the API key is not a setting"):
        load_config(ConsumerSettings, None, ["api_key=secret"])


def test_malformed_requests_are_dead_lettered_not_lost(redis_server):
    settings = settings_for(redis_server)
    consumer = QueueConsumer(ConsumerSettings.model_validate(settings))
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    client.xadd(settings["request_stream"], {"request_id": "bad-json", "body": "{not json"})
    client.xadd(settings["request_stream"], {"request_id": "no-messages", "body": json.dumps({"prompt": "hi"})})
    client.xadd(settings["request_stream"], {"request_id": "no-body"})
    assert consumer.step() == 3
    dead = {entry["request_id"]: entry for entry in entries(client, settings["dead_letter_stream"])}
    assert set(dead) == {"bad-json", "no-messages", "no-body"}
    assert "body is not JSON" in dead["bad-json"]["reason"] and dead["bad-json"]["body"] == "{not json"
    assert "'messages' list" in dead["no-messages"]["reason"]
    assert client.xlen(settings["result_stream"]) == 0
    assert client.xpending(settings["request_stream"], "g")["pending"] == 0  # acknowledged: not retried forever


def test_an_entry_that_is_not_utf8_is_dead_lettered_without_failing_the_read(redis_server):
    settings = settings_for(redis_server, base_url=f"http://127.0.0.1:{free_port()}")  # nothing answers the good one
    consumer = QueueConsumer(ConsumerSettings.model_validate(settings))
    raw = redis.Redis.from_url(redis_server)  # bytes in and out
    body = json.dumps({"messages": [{"role": "user", "content": "caf"}]}).encode().replace(b"caf", b"caf\xe9")
    raw.xadd(settings["request_stream"], {"request_id": "latin-1", "body": body})
    send(raw, settings, 1)
    assert consumer.step() == 2  # a strict decoder failed this read: no entry was handled, on every retry
    [dead] = raw.xrange(settings["dead_letter_stream"])
    assert dead[1][b"body"] == body and b"not UTF-8" in dead[1][b"reason"]
    assert consumer.counts == {"answered": 0, "dead_lettered": 1, "failed_attempts": 1}  # the good one stays pending


def test_a_request_failing_every_delivery_is_dead_lettered_after_max_deliveries(redis_server):
    # Nothing listens on a fresh free port: every call to the "endpoint" fails.
    settings = settings_for(redis_server, base_url=f"http://127.0.0.1:{free_port()}", claim_idle_ms=20, max_deliveries=3)
    consumer = QueueConsumer(ConsumerSettings.model_validate(settings))
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    send(client, settings, 1)
    consumer.step()  # the first delivery fails; the entry stays pending
    assert client.xpending(settings["request_stream"], "g")["pending"] == 1
    dead = wait_for(lambda: consumer.step() is not None and entries(client, settings["dead_letter_stream"]), 30,
                    "the dead letter")
    assert consumer.counts["failed_attempts"] == 3  # retried up to max_deliveries, then given up
    assert dead[0]["request_id"] == "r0" and dead[0]["correlation_id"] == "crm-0" and dead[0]["deliveries"] == "4"
    assert "delivered 4 times (max_deliveries=3)" in dead[0]["reason"] and "ConnectionError" in dead[0]["reason"]
    assert client.xpending(settings["request_stream"], "g")["pending"] == 0 and client.xlen(settings["result_stream"]) == 0


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_api_key_stops_the_consumer_and_dead_letters_nothing(redis_server, status):
    """401, or 403 on the consumer's own model, is the consumer's fault: it stops, the requests stay
    pending. A 403 for a model one request names itself is that request's fault: dead-lettered."""
    import http.server
    import threading

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b'{"error": "refused"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = settings_for(redis_server, base_url=f"http://127.0.0.1:{server.server_port}")
        consumer = QueueConsumer(ConsumerSettings.model_validate(settings))
        client = redis.Redis.from_url(redis_server, decode_responses=True)
        other = {"model": "a-model-the-key-may-not-use", "messages": [{"role": "user", "content": "hi"}]}
        client.xadd(settings["request_stream"], {"request_id": "names-another-model", "body": json.dumps(other)})
        send(client, settings, 2)
        with pytest.raises(CredentialsRefused, match=f"refused the consumer's API key: {status}"):
            consumer.step()  # raised out of run() too (it only rides out Redis outages): the loop stops
    finally:
        server.shutdown()
    dead = [entry["request_id"] for entry in entries(client, settings["dead_letter_stream"])]
    assert dead == (["names-another-model"] if status == 403 else [])
    # Read, not acknowledged: safe for a consumer with a working key (on 401 the first entry stopped it).
    assert client.xpending(settings["request_stream"], "g")["pending"] == 3 - len(dead)
    assert client.xlen(settings["result_stream"]) == 0 and consumer.counts["failed_attempts"] == 0


@pytest.fixture(scope="module")
def endpoint(ray_cluster, tiny_model_dir, tmp_path_factory):
    """The tiny model behind the real OpenAI-compatible Serve app, once for this module: its base URL
    and the one API key it accepts (the gateway authenticates every model route)."""
    from ray import serve

    from cluster.contracts import EndpointSettings
    from cluster.endpoints import deploy
    from cluster.security import new_api_key

    key, record = new_api_key("queue-consumer-test", ["admin"], "lakeforge")
    audit_path = tmp_path_factory.mktemp("queue-audit") / "audit.jsonl"
    settings = EndpointSettings.model_validate({
        "model_id": "tiny", "model_dir": str(tiny_model_dir), "port": SERVE_PORT, "max_model_len": 256, "engine_overrides": EAGER,
        "app_name": "queue-model",
        "security": {"api_keys": [record.model_dump()], "audit": {"path": str(audit_path)}}})
    yield deploy("serving.app:build_app", settings), key
    serve.delete(settings.app_name)


@pytest.mark.integration
def test_a_consumer_killed_mid_stream_loses_no_message(redis_server, endpoint):
    base_url, key = endpoint
    settings = settings_for(redis_server, base_url=base_url, read_count=10, claim_idle_ms=1000)
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    request_ids = send(client, settings, 30)
    command = [sys.executable, "-m", "serving.queue_consumer", *(f"{key}={value}" for key, value in settings.items())]
    env = {**os.environ, "LAKEFORGE_API_KEY": key}

    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
    wait_for(lambda: client.xlen(settings["result_stream"]) >= 3, 300, "the first results")
    first.send_signal(signal.SIGKILL)  # no chance to finish or acknowledge anything
    first.wait()
    in_flight = [entry["message_id"] for entry in client.xpending_range(settings["request_stream"], "g", "-", "+", 100)]
    assert in_flight, "the consumer died with nothing read but unacknowledged: the kill proved nothing"
    answered_before = {entry["entry_id"] for entry in entries(client, settings["result_stream"])}

    second = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
    try:
        wait_for(lambda: {e["request_id"] for e in entries(client, settings["result_stream"])} >= set(request_ids),
                 300, "every request answered")
    finally:
        second.terminate()
        second.wait(timeout=30)

    results = entries(client, settings["result_stream"])
    assert {r["request_id"] for r in results} == set(request_ids)  # none lost
    assert len(results) - len(request_ids) <= len(in_flight)  # duplicates: at most the in-flight ones
    for result in results:
        assert result["correlation_id"] == f"crm-{result['request_id'][1:]}"
        assert json.loads(result["response"])["model"] == "tiny"
    # The dead consumer's in-flight entries were taken over and answered by the restarted one.
    takeover = {r["entry_id"]: r["consumer"] for r in results if r["entry_id"] in in_flight}
    assert set(takeover) == set(in_flight) and not set(in_flight) & answered_before
    assert len({r["consumer"] for r in results}) == 2
    assert client.xpending(settings["request_stream"], "g")["pending"] == 0
    assert client.xlen(settings["dead_letter_stream"]) == 0


@pytest.mark.integration
def test_the_serve_deployment_answers_and_dead_letters(redis_server, endpoint, tmp_path):
    from ray import serve

    from serving.queue_consumer import build_consumer_app

    base_url, key = endpoint
    # The replicas read the key on their node, from a file only its owner can read: not a deployment argument.
    key_file = tmp_path / "consumer-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    settings = settings_for(redis_server, base_url=base_url, api_key_file=str(key_file), replicas=2)
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    request_ids = send(client, settings, 6)
    unknown_model = {"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}
    client.xadd(settings["request_stream"], {"request_id": "unknown-model", "body": json.dumps(unknown_model)})
    serve.run(build_consumer_app(settings), name="queue-consumer", route_prefix=None)
    try:
        wait_for(lambda: client.xlen(settings["result_stream"]) >= 6 and client.xlen(settings["dead_letter_stream"]) >= 1,
                 300, "results and the dead letter")
        # Each call reaches one of the two replicas at random (either may have read every entry, or
        # none): ask until both have said what they handled. A count goes up just after its result
        # is visible in the stream, so ask again until the counts cover every entry.
        handle, stats = serve.get_app_handle("queue-consumer"), {}

        def both_replicas_counted_every_entry() -> bool:
            reply = handle.stats.remote().result()
            stats[reply["consumer"]] = reply
            return (len(stats) == 2 and sum(s["answered"] for s in stats.values()) == len(request_ids)
                    and sum(s["dead_lettered"] for s in stats.values()) == 1)

        try:
            wait_for(both_replicas_counted_every_entry, 60, "both replicas' stats")
        except TimeoutError:
            pass  # the assertions below say which count is off
    finally:
        serve.delete("queue-consumer")
    results = entries(client, settings["result_stream"])
    assert sorted(r["request_id"] for r in results) == sorted(request_ids)
    assert len(stats) == 2 and all(name.startswith("serve-") for name in stats), stats  # the two replicas
    assert {r["consumer"] for r in results} <= set(stats)  # answered by the replicas
    # Each replica's own count of what it answered is what it wrote to the result stream.
    assert {name: s["answered"] for name, s in stats.items()} == {
        name: sum(r["consumer"] == name for r in results) for name in stats}
    assert sum(s["answered"] for s in stats.values()) == len(request_ids)
    dead = entries(client, settings["dead_letter_stream"])
    assert [d["request_id"] for d in dead] == ["unknown-model"] and "endpoint rejected the request: 404" in dead[0]["reason"]
    assert {name: s["dead_lettered"] for name, s in stats.items()} == {name: int(name == dead[0]["consumer"]) for name in stats}
    assert client.xpending(settings["request_stream"], "g")["pending"] == 0
