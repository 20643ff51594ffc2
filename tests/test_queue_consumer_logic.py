"""serving.queue_consumer without a Redis server: how entries are decoded and answered, with a fake
client recording what would be written (tests/test_queue_consumer.py runs the same against redis-server)."""

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


def consumer_answering(text: str, status: int = 200) -> tuple[QueueConsumer, FakeRedis]:
    client = FakeRedis()
    consumer = QueueConsumer(ConsumerSettings(api_key="k", model="tiny"), name="c", client=client)
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
