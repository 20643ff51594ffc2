"""Message-queue integration: requests from a Redis Stream answered by the model, at least once.

    python -m serving.queue_consumer --config consumer.yaml [key=value ...]   # a plain consumer loop
    import_path: serving.queue_consumer:build_consumer_app                    # the same loop, on Ray Serve

A request is a stream entry with a `body` field (an OpenAI chat-completions request as JSON; `model`
defaults to the configured one) and optional `request_id` and `correlation_id` fields. The consumer
reads entries with XREADGROUP in a consumer group, calls the OpenAI-compatible endpoint over HTTP
with its API key, and writes the result to the output stream; the XADD and the XACK go in one
MULTI/EXEC transaction, so an entry is acknowledged exactly when its result exists.

At-least-once: an entry read but not acknowledged (the consumer died, the endpoint was down) stays
pending in the group, and after `claim_idle_ms` any live consumer takes it over with XAUTOCLAIM and
answers it. A poison entry (malformed or not UTF-8, rejected by the endpoint with a 4xx, answered
with a 200 whose body is not a chat completion, or delivered more than `max_deliveries` times) goes
to the dead-letter stream with the reason, is acknowledged, and is never retried forever. An endpoint that refuses the consumer's own API key (401, or 403 on the
consumer's own model) stops the consumer instead: no request is at fault, so none is dead-lettered,
and every entry stays pending for a consumer with a working key. A 403 for a model a request names
itself is that request's fault: it is dead-lettered.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import redis
import requests
from pydantic import Field, field_validator, model_validator
from ray import serve

from cluster.config import StrictModel, hide_url_password, password_from_env, refuse_password_in_url


class ConsumerSettings(StrictModel):
    """A Redis Streams consumer that answers requests through the OpenAI-compatible endpoint."""

    redis_url: str = Field(default="redis://127.0.0.1:6379/0",
                           description="Redis server holding the streams (redis:// or rediss://), without a password "
                                       "(settings travel as deployment arguments; use redis_password_env).")
    redis_password_env: str | None = Field(
        default=None, description="Name of the environment variable holding the Redis password, read in the consumer's "
                                  "own process (None: no password).")
    request_stream: str = Field(default="lakeforge:requests", description="Stream the requests are read from.")
    result_stream: str = Field(default="lakeforge:results", description="Stream each result is written to.")
    dead_letter_stream: str = Field(default="lakeforge:dead-letter", description="Stream poison requests go to, with the reason.")
    group: str = Field(default="lakeforge", description="Consumer group; consumers in one group share the requests.")
    consumer: str | None = Field(
        default=None, description="This consumer's name in the group (None: host name and process id; Serve replicas use their id).")
    base_url: str = Field(default="http://127.0.0.1:8000", description="Base URL of the OpenAI-compatible endpoint (without /v1): https:// when it serves TLS (the endpoint's tls).")
    ca_file: str | None = Field(
        default=None, description="CA certificate(s) an https:// base_url's certificate is checked against, on the node "
                                  "the consumer runs on (None: the system's trusted CAs).")
    # No `api_key` setting: settings travel as a Serve deployment's arguments (Ray's metadata, the
    # pickled replica arguments) and in config files; the key is read where the consumer runs.
    api_key_env: str = Field(
        default="LAKEFORGE_API_KEY",
        description="Environment variable holding the API key (sent as a Bearer token), read in the consumer's own "
        "process (a Serve replica: the environment of its node's `ray start`); used when api_key_file is unset.")
    api_key_file: str | None = Field(
        default=None,
        description="File holding the API key, on the node the consumer runs on (first line; it must not be readable "
        "by group or others, like the Ray token file: chmod 600). Takes precedence over api_key_env.")
    model: str = Field(default="lakeforge-model", description="Model id used when a request names none.")
    read_count: int = Field(default=8, ge=1, description="Entries read per XREADGROUP / XAUTOCLAIM call.")
    block_ms: int = Field(default=1000, ge=1, description="How long one read waits for new entries, in ms.")
    claim_idle_ms: int = Field(
        default=60000, ge=1,
        description="Entries pending (read, not acknowledged) longer than this are taken over from their consumer, "
        "presumed dead; keep it above the slowest answer, or a live consumer's entry is answered twice.")
    max_deliveries: int = Field(default=5, ge=1, description="Deliveries of one entry before it is dead-lettered instead of retried.")
    request_timeout_s: float = Field(default=120.0, gt=0, description="Timeout of one HTTP call to the endpoint, in seconds.")
    replicas: int = Field(default=1, ge=1, description="Serve deployment only: consumer replicas.")

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_settings(cls, data):
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError("api_key: the API key is not a setting (settings travel as deployment arguments and "
                             "config files); put it in the environment variable named by api_key_env, or in "
                             "api_key_file on the consumer's node")
        return hide_url_password(data, "redis_url")

    @field_validator("redis_url")
    @classmethod
    def _no_password_in_url(cls, url: str) -> str:
        return refuse_password_in_url(url, "redis_url", "redis_password_env")

    def key(self) -> str:
        """The API key, read now from api_key_file (checked: owner-only) or else $api_key_env."""
        if self.api_key_file is not None:
            path = Path(self.api_key_file).expanduser()
            try:
                mode = path.stat().st_mode
                text = path.read_text()
            except OSError as error:
                raise ValueError(f"api_key_file {path} cannot be read: {error.strerror or error}") from None
            if mode & 0o077:
                raise ValueError(f"api_key_file {path} is readable by others (mode {stat.S_IMODE(mode):o}): "
                                 f"chmod 600 it; whoever reads the key can call the endpoint")
            key = text.strip().splitlines()[0].strip() if text.strip() else ""
            if not key:
                raise ValueError(f"api_key_file {path} is empty")
            return key
        if os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        raise ValueError(f"no API key: set the environment variable {self.api_key_env} (api_key_env) or api_key_file "
                         f"where the consumer runs")


class PoisonMessage(Exception):
    """An entry that can never be answered: dead-letter it."""


def redis_client(url: str, password: str | None = None) -> redis.Redis:
    """A client that reads any bytes: bytes that are not UTF-8 become lone surrogates instead of a
    decoding error that would fail the whole read (every entry in it, again on every retry), and
    are written back unchanged, so a dead letter holds the entry's original bytes."""
    return redis.Redis.from_url(url, password=password, decode_responses=True, encoding_errors="surrogateescape")


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def not_utf8(fields: dict) -> list[str]:
    """Names of the entry's fields whose name or value was not UTF-8 (read by `redis_client`)."""
    def bad(text) -> bool:
        return isinstance(text, str) and any("\udc80" <= char <= "\udcff" for char in text)
    return [_printable(name) for name, value in fields.items() if bad(name) or bad(value)]


def completion_content(completion) -> str:
    """The answer text of a chat completion body, or PoisonMessage saying what the body lacks."""
    try:
        content = completion["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise PoisonMessage(f"endpoint answered 200 without choices[0].message.content: {json.dumps(completion)[:300]}") from None
    if content is not None and not isinstance(content, str):
        raise PoisonMessage(f"endpoint answered 200 with a content that is not text: {json.dumps(content)[:300]}")
    return content or ""


class CredentialsRefused(Exception):
    """The endpoint refused this consumer's API key: no entry can be answered until the key is fixed.
    Not a RuntimeError, so `handle` lets it through: the entry stays pending and the consumer stops."""


class QueueConsumer:
    def __init__(self, settings: ConsumerSettings, name: str | None = None, client: redis.Redis | None = None):
        self.settings = settings
        self.name = name or settings.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.api_key = settings.key()
        self.redis = client or redis_client(settings.redis_url, password_from_env(settings.redis_password_env))
        self.http = requests.Session()
        self.last_error: dict[str, str] = {}  # entry id -> why its last delivery failed (for the dead letter)
        self.counts = {"answered": 0, "dead_lettered": 0, "failed_attempts": 0}
        try:
            self.redis.xgroup_create(settings.request_stream, settings.group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):  # the group exists already: join it
                raise

    def answer(self, fields: dict) -> dict:
        try:
            body = json.loads(fields["body"])
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise PoisonMessage(f"malformed request: body is not JSON ({error!r})") from None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise PoisonMessage("malformed request: body must be a JSON object with a 'messages' list")
        requested_model = body.setdefault("model", self.settings.model)
        body["stream"] = False
        reply = self.http.post(f"{self.settings.base_url}/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {self.api_key}"}, timeout=self.settings.request_timeout_s,
                               # per call: a session's own `verify` loses to $REQUESTS_CA_BUNDLE
                               verify=self.settings.ca_file or True)
        if reply.status_code == 401 or (reply.status_code == 403 and requested_model == self.settings.model):
            raise CredentialsRefused(f"endpoint {self.settings.base_url} refused the consumer's API key: "
                                     f"{reply.status_code} {reply.text[:200]}")
        if 400 <= reply.status_code < 500 and reply.status_code not in (408, 429):
            raise PoisonMessage(f"endpoint rejected the request: {reply.status_code} {reply.text[:500]}")
        reply.raise_for_status()  # 5xx, 408, 429: transient, the entry stays pending and is retried
        try:
            return reply.json()
        except ValueError:
            raise PoisonMessage(f"endpoint answered {reply.status_code} with a body that is not JSON: {reply.text[:300]!r}") from None

    def handle(self, entry_id: str, fields: dict, deliveries: int) -> None:
        settings = self.settings
        request_id = fields.get("request_id", entry_id)
        envelope = {"request_id": request_id, "entry_id": entry_id, "correlation_id": fields.get("correlation_id", ""),
                    "consumer": self.name}
        try:
            if deliveries > settings.max_deliveries:
                last = self.last_error.get(entry_id, "unknown (failed in another consumer)")
                raise PoisonMessage(f"delivered {deliveries} times (max_deliveries={settings.max_deliveries}); last error: {last}")
            undecodable = not_utf8(fields)
            if undecodable:
                raise PoisonMessage(f"malformed request: field(s) {undecodable} are not UTF-8")
            completion = self.answer(fields)
            content = completion_content(completion)
        except PoisonMessage as poison:
            self._write_and_ack(settings.dead_letter_stream, entry_id,
                                {**fields, **envelope, "reason": str(poison), "deliveries": deliveries})
            self.counts["dead_lettered"] += 1
            return
        except (requests.RequestException, RuntimeError, ValueError) as error:
            # Not acknowledged: the entry stays pending and comes back through XAUTOCLAIM.
            self.last_error[entry_id] = repr(error)[:500]
            self.counts["failed_attempts"] += 1
            return
        self._write_and_ack(settings.result_stream, entry_id,
                            {**envelope, "status": "ok", "content": content, "response": json.dumps(completion)})
        self.counts["answered"] += 1

    def _write_and_ack(self, stream: str, entry_id: str, fields: dict) -> None:
        # One transaction: the result exists if and only if the request is acknowledged.
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {key: str(value) for key, value in fields.items()})
            pipe.xack(self.settings.request_stream, self.settings.group, entry_id)
            pipe.execute()
        self.last_error.pop(entry_id, None)

    def step(self) -> int:
        """Take over stale entries, then read new ones; handle each. Returns the entries handled."""
        settings = self.settings
        claimed = self.redis.xautoclaim(settings.request_stream, settings.group, self.name,
                                        min_idle_time=settings.claim_idle_ms, start_id="0-0", count=settings.read_count)[1]
        entries = [(entry_id, fields) for entry_id, fields in claimed if fields is not None]
        deliveries = {}
        if entries:
            for pending in self.redis.xpending_range(settings.request_stream, settings.group, min=entries[0][0],
                                                     max=entries[-1][0], count=len(entries) * 4 + 16, consumername=self.name):
                deliveries[pending["message_id"]] = pending["times_delivered"]
        else:
            read = self.redis.xreadgroup(settings.group, self.name, {settings.request_stream: ">"},
                                         count=settings.read_count, block=settings.block_ms)
            entries = [entry for _, stream_entries in read for entry in stream_entries]
        for entry_id, fields in entries:
            self.handle(entry_id, fields, deliveries.get(entry_id, 1))
        return len(entries)

    def run(self, stop: threading.Event | None = None) -> None:
        """Handle entries until `stop` is set; raises CredentialsRefused if the endpoint refuses the key."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.step()
            except redis.ConnectionError as error:  # Redis restarting: wait, the entries are safe there
                print(f"[queue_consumer] {self.name}: redis unavailable ({error}); retrying")
                time.sleep(1)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, health_check_period_s=5)
class QueueConsumerDeployment:
    """The consumer loop in a Serve replica (a thread): Serve restarts a replica that dies, and
    XAUTOCLAIM hands the dead replica's pending entries to the live ones."""

    def __init__(self, args: dict):
        replica = serve.get_replica_context().replica_id.unique_id
        self.consumer = QueueConsumer(ConsumerSettings.model_validate(args), name=f"serve-{replica}")
        self.stop = threading.Event()
        self.stopped_by: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.consumer.run(self.stop)
        except Exception as error:  # kept for the health check, which Serve logs and acts on
            self.stopped_by = error
            raise

    def check_health(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError(f"the consumer loop has stopped: {self.stopped_by!r}")

    def stats(self) -> dict:
        return {"consumer": self.consumer.name, **self.consumer.counts}

    def __del__(self):
        self.stop.set()


def build_consumer_app(args: dict) -> serve.Application:
    """Serve app builder: `args` are `ConsumerSettings` fields (validated; unknown keys rejected, an
    `api_key` refused). The key is not read here: each replica reads it on its own node (from
    api_key_env or api_key_file), so it is never in the deployment's arguments; a replica without
    one fails to start with that error, which Serve reports as the app's deploy failure."""
    settings = ConsumerSettings.model_validate(args)
    return QueueConsumerDeployment.options(num_replicas=settings.replicas).bind(settings.model_dump())


def main(argv: list[str] | None = None) -> None:
    from cluster.config import load_config_or_exit

    consumer = QueueConsumer(load_config_or_exit(ConsumerSettings, argv))
    print(f"[queue_consumer] {consumer.name} reading {consumer.settings.request_stream}", flush=True)
    try:
        consumer.run()
    except CredentialsRefused as error:
        raise SystemExit(f"[queue_consumer] stopped: {error}; unanswered requests stay pending in "
                         f"{consumer.settings.request_stream}") from None


if __name__ == "__main__":
    main()
