"""Per-key rate limits as token buckets, kept in the process or in Redis for every gateway replica.

A key (an API key id, or a JWT subject) has up to two buckets: one of requests and one of LLM
tokens (prompt + completion). Each holds at most its per-minute limit and refills at limit/60 per
second, so a key that has been idle for a minute has its whole minute to spend, and over any long
stretch it gets its limit per minute and no more. A bucket that has never been touched is full.

What a request costs:
- one request token, when the gateway admits it;
- the LLM tokens it could use at most (max_tokens x n x prompts), reserved before the engine sees
  it, so concurrent requests cannot together overshoot the budget; when the response ends the
  reservation is settled against the usage the engine reported (the unused part refunded, a
  prompt's tokens charged). A reservation larger than the whole bucket is capped at the bucket: such
  a request waits for a full bucket rather than never passing, and what it used beyond that leaves
  the bucket below zero, so the key waits until it has refilled;
- a bucket below zero refuses everything until it has refilled, even requests that reserve nothing.
A refusal says how long until the bucket holds the cost (the 429's Retry-After).

`MemoryRateLimiter` keeps buckets in the process (each gateway replica its own: with N replicas a key
gets up to N times its limit); at most `max_keys` keys, the least recently used forgotten first
(a forgotten key starts again with full buckets). `RedisRateLimiter` keeps them in Redis, shared by
every replica: one Lua script reads, refills and takes all of a key's buckets atomically, on the
Redis server's clock (TIME), so replicas whose clocks disagree still agree on every bucket; a key's
hash expires when its buckets would be full again, so Redis holds only keys in use.
When Redis cannot be reached, `on_unavailable` decides: `refuse` (503 with Retry-After) or `admit`
(the request passes unlimited). Either way `lakeforge_rate_limit_store_unavailable` counts it, the
cause is logged, and Redis is not tried again for `retry_s` (requests do not each wait `timeout_s`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.config import StrictModel, hide_url_password, password_from_env, refuse_password_in_url

MINUTE_S = 60.0
# Serve writes this logger to the replica's log file (the gateway's logger).
logger = logging.getLogger("ray.serve")


class RateLimit(StrictModel):
    """Per-key limits per minute (token buckets refilled over a minute); None means unlimited."""

    requests_per_minute: int | None = Field(default=None, ge=1, description="Requests per key per minute (None: unlimited).")
    tokens_per_minute: int | None = Field(default=None, ge=1, description="Prompt + completion tokens per key per minute "
                                                                          "(None: unlimited); a request reserves max_tokens x n x "
                                                                          "prompts up front, settled from its actual usage.")


class RateLimitStoreSettings(StrictModel):
    """Where the rate limits' buckets live: in each gateway replica, or in Redis shared by all."""

    backend: Literal["memory", "redis"] = Field(
        default="memory", description="memory: each replica keeps its own buckets (N replicas let a key reach N times its "
                                      "limit); redis: one budget per key for every replica.")
    redis_url: str | None = Field(
        default=None, description="redis backend: the server (redis://, rediss:// or unix://), without a password "
                                  "(settings travel in Serve's config and Ray's metadata; use password_env).")
    password_env: str | None = Field(
        default=None, description="redis backend: name of the environment variable holding the Redis password, read in "
                                  "each gateway replica's process (None: no password).")
    key_prefix: str = Field(default="lakeforge:rate-limit:", min_length=1,
                            description="Prefix of the Redis keys (one hash per API key id or JWT subject); endpoints "
                                        "sharing a prefix share their keys' budgets.")
    timeout_s: float = Field(default=0.25, gt=0, le=10,
                             description="Timeout of one Redis call (connect and reply), in seconds.")
    retry_s: float = Field(default=5.0, gt=0, le=300,
                           description="After Redis failed, how long requests are handled per on_unavailable without "
                                       "trying it, in seconds; also the 503's Retry-After and the interval of the log line.")
    on_unavailable: Literal["refuse", "admit"] = Field(
        default="refuse", description="While Redis cannot be reached: refuse (503 with Retry-After) or admit (unlimited).")
    max_keys: int = Field(default=100_000, ge=1, le=10_000_000,
                          description="memory backend: keys tracked at once; beyond it the least recently used is "
                                      "forgotten (it starts again with full buckets).")

    @model_validator(mode="before")
    @classmethod
    def _password_never_repeated(cls, data):
        return hide_url_password(data, "redis_url")

    @field_validator("redis_url")
    @classmethod
    def _no_password_in_url(cls, url: str | None) -> str | None:
        return url if url is None else refuse_password_in_url(url, "redis_url", "password_env")

    @model_validator(mode="after")
    def _redis_settings_go_with_redis(self) -> "RateLimitStoreSettings":
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("rate_limit_store: backend redis needs redis_url")
        if self.backend == "memory" and (self.redis_url or self.password_env):
            raise ValueError("rate_limit_store: redis_url and password_env are for backend redis (backend is memory)")
        return self


class RateLimitStoreUnavailable(Exception):
    """Redis cannot be reached and `on_unavailable` is refuse: answer 503 with Retry-After."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"the rate-limit store cannot be reached; retry in {retry_after_s:g}s")
        self.retry_after_s = retry_after_s


Bucket = tuple[str, int, int]  # name, capacity (the per-minute limit), cost


class RateLimiter:
    """Token buckets per key (see the module doc); subclasses keep them. Thread-safe."""

    def acquire(self, key: str, limit: RateLimit, requests: int = 0, tokens: int = 0) -> float | None:
        """Take `requests` and `tokens` from the key's buckets, all or nothing: None when taken, else
        the seconds until the buckets would hold them (nothing is taken). A bucket below zero refuses
        even a cost of 0; a cost above a bucket's capacity is capped at the capacity."""
        buckets = [(name, capacity, min(cost, capacity)) for name, capacity, cost in (
            ("requests", limit.requests_per_minute, requests), ("tokens", limit.tokens_per_minute, tokens))
            if capacity is not None]
        return self._take(key, buckets) if buckets else None

    def settle(self, key: str, limit: RateLimit, reserved: int, used: int) -> None:
        """Settle a reservation of `reserved` tokens (as asked of `acquire`) that used `used`: the
        difference goes back to the token bucket (up to full), or, when more was used, is taken from
        it (below zero if need be)."""
        capacity = limit.tokens_per_minute
        if capacity is not None and used != min(reserved, capacity):
            self._adjust(key, ("tokens", capacity, used - min(reserved, capacity)))  # acquire took at most the bucket

    def _take(self, key: str, buckets: list[Bucket]) -> float | None:
        raise NotImplementedError

    def _adjust(self, key: str, bucket: Bucket) -> None:
        raise NotImplementedError


def _refilled(saved: tuple[float, float] | None, capacity: int, now: float) -> float:
    """A bucket's level at `now`, from its (level, time) when last set; an unknown bucket is full."""
    if saved is None:
        return float(capacity)
    level, stamp = saved
    return min(float(capacity), level + max(0.0, now - stamp) * capacity / MINUTE_S)


class MemoryRateLimiter(RateLimiter):
    """Buckets in this process, for at most `max_keys` keys (least recently used forgotten first)."""

    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.max_keys = max_keys
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, dict[str, tuple[float, float]]] = OrderedDict()  # key -> bucket -> (level, time)

    def __len__(self) -> int:
        return len(self._buckets)

    def _saved(self, key: str) -> dict[str, tuple[float, float]]:
        saved = self._buckets.setdefault(key, {})
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return saved

    def _take(self, key: str, buckets: list[Bucket]) -> float | None:
        with self._lock:
            now = self.clock()
            saved = self._saved(key)
            levels = {name: _refilled(saved.get(name), capacity, now) for name, capacity, _ in buckets}
            wait = max(((cost - levels[name]) * MINUTE_S / capacity for name, capacity, cost in buckets
                        if cost > levels[name]), default=None)
            if wait is not None:
                return max(wait, 0.001)
            for name, _, cost in buckets:
                saved[name] = (levels[name] - cost, now)
            return None

    def _adjust(self, key: str, bucket: Bucket) -> None:
        name, capacity, cost = bucket
        with self._lock:
            now = self.clock()
            saved = self._saved(key)
            saved[name] = (min(float(capacity), _refilled(saved.get(name), capacity, now) - cost), now)


# KEYS[1]: the key's hash: <bucket> = its level, <bucket>:t = when that was set (server seconds).
# ARGV[1]: 'take' (all or nothing: returns the wait in seconds, '0' when taken) or 'adjust'
# (always applied); then (bucket, capacity, cost) triples. Levels are capped at the capacity and
# refill at capacity/60 per second on the server's clock. The hash expires when every bucket in it
# would be full again (a missing hash means full buckets), never sooner than it was to expire.
BUCKETS_LUA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local take = ARGV[1] == 'take'
local levels, wait = {}, 0
for i = 2, #ARGV, 3 do
  local name, capacity, cost = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local saved = redis.call('HMGET', KEYS[1], name, name .. ':t')
  local level = capacity
  if saved[1] and saved[2] then
    level = math.min(capacity, tonumber(saved[1]) + math.max(0, now - tonumber(saved[2])) * capacity / 60)
  end
  if take and cost > level then
    wait = math.max(wait, (cost - level) * 60 / capacity)
  end
  levels[i] = math.min(capacity, level - cost)
end
if wait > 0 then
  return tostring(math.max(wait, 0.001))
end
local ttl = math.max(1, redis.call('TTL', KEYS[1]))
for i = 2, #ARGV, 3 do
  local name, capacity = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[1], name, tostring(levels[i]), name .. ':t', tostring(now))
  ttl = math.max(ttl, math.ceil((capacity - levels[i]) * 60 / capacity))
end
redis.call('EXPIRE', KEYS[1], ttl)
return '0'
"""


class RedisRateLimiter(RateLimiter):
    """Buckets in Redis, shared by every replica that names the same server and key prefix."""

    def __init__(self, settings: RateLimitStoreSettings, clock: Callable[[], float] = time.monotonic):
        import redis
        from ray.util import metrics

        self.settings = settings
        self.clock = clock
        # The password is read here, in the replica's process: it is never a setting.
        self.client = redis.Redis.from_url(settings.redis_url, password=password_from_env(settings.password_env),
                                           socket_timeout=settings.timeout_s, socket_connect_timeout=settings.timeout_s)
        self._script = self.client.register_script(BUCKETS_LUA)
        self._errors = redis.RedisError
        self._lock = threading.Lock()
        self._down_until: float | None = None  # while Redis is taken as down (clock time), it is not tried
        self.unavailable = metrics.Counter(
            "lakeforge_rate_limit_store_unavailable",
            "Rate-limit checks and settlements made without the rate-limit store (Redis unreachable).",
            tag_keys=("on_unavailable",))

    def _run(self, key: str, mode: str, buckets: list[Bucket]) -> float | None:
        """The script's answer (the wait, 0 when taken), or None when Redis cannot be reached."""
        with self._lock:
            down = self._down_until is not None and self.clock() < self._down_until
        if not down:
            try:
                answer = float(self._script(keys=[self.settings.key_prefix + key],
                                            args=[mode, *(part for bucket in buckets for part in bucket)]))
            except self._errors as error:
                with self._lock:
                    self._down_until = self.clock() + self.settings.retry_s
                # Logged once per retry_s at most: Redis is not tried again before then.
                logger.error("rate-limit store %s cannot be reached (%s); requests are %s for %gs before it is "
                             "tried again", self.settings.redis_url, error,
                             "refused (503)" if self.settings.on_unavailable == "refuse" else "admitted unlimited",
                             self.settings.retry_s)
            else:
                with self._lock:
                    recovered, self._down_until = self._down_until is not None, None
                if recovered:
                    logger.warning("rate-limit store can be reached again; rate limits apply")
                return answer
        self.unavailable.inc(tags={"on_unavailable": self.settings.on_unavailable})
        return None

    def _take(self, key: str, buckets: list[Bucket]) -> float | None:
        wait = self._run(key, "take", buckets)
        if wait is None:
            if self.settings.on_unavailable == "refuse":
                raise RateLimitStoreUnavailable(self.settings.retry_s)
            return None
        return wait or None

    def _adjust(self, key: str, bucket: Bucket) -> None:
        self._run(key, "adjust", [bucket])  # when Redis is down the settlement is lost (counted, logged)
