"""serving.queue_consumer without Ray: how entries are decoded and answered, with a fake client
recording what would be written (tests/test_queue_consumer.py runs the same against redis-server),
and how the consumer authenticates to a real redis-server."""

import json

import pytest

from serving.queue_consumer import ConsumerSettings, PoisonMessage, QueueConsumer, completion_content, not_utf8, redis_client


class FakeRedis:
    """The calls `QueueConsumer.handle` makes: a group to join and MULTI/EXEC of XADD + XACK."""

    def __init__(self):
        self.streams: dict[str, list[dict]] = {}
        self.acked: list[str] = []

    def xgroup_create(self, *args, **kwargs):
        pass

    def pipeline(self, transaction=True):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def xadd(self, stream, fields):
        self.streams.setdefault(stream, []).append(fields)

    def xack(self, stream, group, entry_id):
        self.acked.append(entry_id)

    def execute(self):
        pass


class Reply:
    def __init__(self, status_code: int, text: str):
        self.status_code, self.text = status_code, text

    def json(self):
        return json.loads(self.text)

    def raise_for_status(self):
        pass


@pytest.fixture(autouse=True)
def consumer_key(monkeypatch):
    monkeypatch.setenv("LAKEFORGE_API_KEY", "k")


def consumer_answering(text: str, status: int = 200) -> tuple[QueueConsumer, FakeRedis]:
    client = FakeRedis()
    consumer = QueueConsumer(ConsumerSettings(model="tiny"), name="c", client=client)
    consumer.http.post = lambda *args, **kwargs: Reply(status, text)
    return consumer, client


def read_as_the_consumer_does(raw: dict[bytes, bytes]) -> dict[str, str]:
    encoder = redis_client("redis://127.0.0.1:1/0").get_encoder()  # no connection is made
    return {encoder.decode(name): encoder.decode(value) for name, value in raw.items()}


def test_an_entry_that_is_not_utf8_is_read_and_dead_lettered_with_its_bytes():
    body = json.dumps({"messages": [{"role": "user", "content": "caf"}]}).encode().replace(b"caf", b"caf\xe9")
    fields = read_as_the_consumer_does({b"request_id": b"r1", b"body": body})  # a strict decoder raised here: no entry was read
    assert not_utf8(fields) == ["body"] and not_utf8({"body": "{}", "id": "r"}) == []
    consumer, client = consumer_answering("{}")
    consumer.handle("1-0", fields, deliveries=1)
    [dead] = client.streams["lakeforge:dead-letter"]
    assert dead["reason"] == "malformed request: field(s) ['body'] are not UTF-8" and client.acked == ["1-0"]
    encoder = redis_client("redis://127.0.0.1:1/0").get_encoder()
    assert encoder.encode(dead["body"]) == body  # written back byte for byte


@pytest.mark.parametrize("text, reason", [
    ("<html>proxy error</html>", "endpoint answered 200 with a body that is not JSON"),
    ('{"object": "error"}', "endpoint answered 200 without choices[0].message.content"),
    ('{"choices": []}', "without choices[0].message.content"),
    ('{"choices": [{"message": {"content": ["not", "text"]}}]}', "a content that is not text"),
])
def test_a_200_with_an_unexpected_body_is_dead_lettered_not_a_crash(text, reason):
    consumer, client = consumer_answering(text)
    consumer.handle("1-0", {"body": json.dumps({"messages": [{"role": "user", "content": "hi"}]})}, deliveries=1)
    [dead] = client.streams["lakeforge:dead-letter"]
    assert reason in dead["reason"] and client.acked == ["1-0"] and consumer.counts["dead_lettered"] == 1


def test_a_chat_completion_is_answered():
    completion = {"choices": [{"message": {"role": "assistant", "content": "negative"}}]}
    assert completion_content(completion) == "negative"
    assert completion_content({"choices": [{"message": {"content": None}}]}) == ""  # e.g. a tool call only
    with pytest.raises(PoisonMessage):
        completion_content([completion])
    consumer, client = consumer_answering(json.dumps(completion))
    consumer.handle("1-0", {"request_id": "r1", "body": json.dumps({"messages": [{"role": "user", "content": "hi"}]})}, 1)
    [result] = client.streams["lakeforge:results"]
    assert (result["status"], result["content"], result["request_id"]) == ("ok", "negative", "r1")


def test_the_api_key_is_no_setting_so_never_a_deployment_argument(monkeypatch):
    """Settings travel as the Serve deployment's arguments (Ray's metadata, pickled replica args) and in
    config files: a key given there is refused, by name, before anything is deployed."""
    from pydantic import ValidationError

    from cluster.config import ConfigError, load_config
    from serving.queue_consumer import build_consumer_app

    with pytest.raises(ValidationError, match="api_key: the API key is not a setting"):
        ConsumerSettings.model_validate({"api_key": "lf_x_secret"})
    with pytest.raises(ValidationError, match="api_key_env"):  # the error says where the key goes instead
        build_consumer_app({"api_key": "lf_x_secret", "model": "tiny"})
    with pytest.raises(ConfigError, match="api_key: the API key is not a setting"):
        load_config(ConsumerSettings, None, ["api_key=lf_x_secret"])
    # With the key in the replica's environment, nothing of it is in what the deployment is bound with.
    monkeypatch.setenv("LAKEFORGE_API_KEY", "lf_x_from-the-node")
    app = build_consumer_app({"model": "tiny"})
    bound = app._bound_deployment
    assert "lf_x_from-the-node" not in repr((bound.init_args, bound.init_kwargs))


def test_the_key_is_read_where_the_consumer_runs_from_env_or_an_owner_only_file(tmp_path, monkeypatch):
    monkeypatch.delenv("LAKEFORGE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="no API key: set the environment variable LAKEFORGE_API_KEY .* or api_key_file"):
        ConsumerSettings().key()
    with pytest.raises(ValueError, match="no API key"):  # a consumer without a key does not start
        QueueConsumer(ConsumerSettings(), name="c", client=FakeRedis())
    monkeypatch.setenv("MY_KEY", "lf_a_from-env")
    assert ConsumerSettings(api_key_env="MY_KEY").key() == "lf_a_from-env"

    key_file = tmp_path / "key"
    key_file.write_text("lf_a_from-file\n")
    key_file.chmod(0o644)
    settings = ConsumerSettings(api_key_file=str(key_file), api_key_env="MY_KEY")
    with pytest.raises(ValueError, match="readable by others \\(mode 644\\): chmod 600"):
        settings.key()
    key_file.chmod(0o600)
    assert settings.key() == "lf_a_from-file"  # the file wins over the environment
    assert QueueConsumer(settings, name="c", client=FakeRedis()).api_key == "lf_a_from-file"
    key_file.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        settings.key()
    with pytest.raises(ValueError, match="cannot be read"):
        ConsumerSettings(api_key_file=str(tmp_path / "missing")).key()


@pytest.mark.parametrize("url", ["redis://:hunter2@cache:6379/0", "rediss://consumer:hunter2@cache:6380/0",
                                 "redis://cache:6379/0?password=hunter2"])
def test_a_redis_url_holding_a_password_is_refused_without_repeating_it(url):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="name that variable in redis_password_env") as refused:
        ConsumerSettings(redis_url=url)
    assert "hunter2" not in str(refused.value)


def test_the_redis_password_is_read_from_the_variable_named_where_the_consumer_runs(redis_server, monkeypatch):
    import redis

    from cluster.config import ConfigError

    redis.Redis.from_url(redis_server).acl_setuser("consumer", enabled=True, passwords=["+from-the-node"],
                                                   keys=["*"], commands=["+@all"])
    url = redis_server.replace("redis://", "redis://consumer@")
    settings = ConsumerSettings(redis_url=url, redis_password_env="LAKEFORGE_TEST_REDIS_PASSWORD", request_stream="pw:requests")
    with pytest.raises(ConfigError, match="LAKEFORGE_TEST_REDIS_PASSWORD"):
        QueueConsumer(settings, name="c")
    monkeypatch.setenv("LAKEFORGE_TEST_REDIS_PASSWORD", "from-the-node")
    consumer = QueueConsumer(settings, name="c")  # joins its group: it authenticated
    assert consumer.redis.xinfo_groups("pw:requests")[0]["name"] == "lakeforge"
    assert "from-the-node" not in repr(settings.model_dump())


def test_an_https_endpoint_is_verified_with_the_ca_file(tmp_path):
    """The consumer checks an https:// endpoint's certificate against `ca_file` (here a local HTTPS
    server with a certificate of a CA the test makes), and refuses it without."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import requests

    from tests.conftest import write_test_pki

    pki = write_test_pki(tmp_path / "pki")

    class ChatEndpoint(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            body = json.dumps({"choices": [{"message": {"content": "positive"}}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatEndpoint)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["cert"], pki["key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base_url = f"https://127.0.0.1:{server.server_address[1]}"
        entry = {"body": json.dumps({"messages": [{"role": "user", "content": "hi"}]})}
        trusting = QueueConsumer(ConsumerSettings(base_url=base_url, ca_file=str(pki["ca"])), name="c", client=FakeRedis())
        assert trusting.answer(entry)["choices"][0]["message"]["content"] == "positive"
        untrusting = QueueConsumer(ConsumerSettings(base_url=base_url), name="c", client=FakeRedis())
        with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusting.answer(entry)
    finally:
        server.shutdown()
        server.server_close()
