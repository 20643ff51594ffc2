"""Token-bucket rate limits: the bucket math on an injected clock, reservations settled from usage,
and the Redis store shared by replicas, against a real redis-server (the `redis_server` fixture)."""

import logging
import threading
import time

import pytest
import redis
from pydantic import ValidationError

from cluster.config import ConfigError, format_validation_error
from cluster.rate_limits import (
    MemoryRateLimiter, RateLimit, RateLimitStoreSettings, RateLimitStoreUnavailable, RedisRateLimiter,
)
from cluster.security import SecuritySettings
from tests.conftest import free_port


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def redis_store(url: str, prefix: str, **settings) -> RateLimitStoreSettings:
    return RateLimitStoreSettings(backend="redis", redis_url=url, key_prefix=prefix, **settings)


# ---------------------------------------------------------------- the buckets (memory)

def test_a_request_bucket_holds_a_minute_and_refills_at_its_limit_per_minute():
    clock = FakeClock()
    limiter, limit = MemoryRateLimiter(clock=clock), RateLimit(requests_per_minute=3)
    assert [limiter.acquire("k", limit, requests=1) for _ in range(3)] == [None] * 3  # a fresh key: a full minute
    assert limiter.acquire("k", limit, requests=1) == pytest.approx(20.0)  # one request refills in 60/3 s
    assert limiter.acquire("other-key", limit, requests=1) is None  # keys are independent
    clock.now += 5
    assert limiter.acquire("k", limit, requests=1) == pytest.approx(15.0)  # a refusal takes nothing
    clock.now += 15
    assert limiter.acquire("k", limit, requests=1) is None
    assert limiter.acquire("k", limit, requests=1) == pytest.approx(20.0)
    clock.now += 3600  # idle for an hour: full again, never more than full
    assert [limiter.acquire("k", limit, requests=1) for _ in range(4)][-1] == pytest.approx(20.0)


def test_a_token_reservation_is_settled_from_the_usage_and_the_unused_part_refunded():
    clock = FakeClock()
    limiter, limit = MemoryRateLimiter(clock=clock), RateLimit(tokens_per_minute=100)
    assert limiter.acquire("k", limit, tokens=80) is None  # max_tokens x n x prompts, held while it runs
    assert limiter.acquire("k", limit, tokens=30) == pytest.approx(6.0)  # 20 left: 10 more take 6 s
    limiter.settle("k", limit, reserved=80, used=10)  # it used 10: 70 back
    assert limiter.acquire("k", limit, tokens=30) is None  # 90 - 30 = 60 left
    limiter.settle("k", limit, reserved=30, used=130)  # used more than reserved (the prompt's tokens): charged
    assert limiter.acquire("k", limit) == pytest.approx(24.0)  # 40 below zero: even a request reserving nothing waits
    clock.now += 24
    assert limiter.acquire("k", limit) is None
    limiter.settle("k", limit, reserved=100, used=0)  # a refund never fills past the bucket
    assert limiter.acquire("k", limit, tokens=100) is None and limiter.acquire("k", limit, tokens=1) == pytest.approx(0.6)


def test_a_reservation_larger_than_the_bucket_waits_for_a_full_bucket_instead_of_never_passing():
    clock = FakeClock()
    limiter, limit = MemoryRateLimiter(clock=clock), RateLimit(tokens_per_minute=100)
    assert limiter.acquire("k", limit, tokens=5000) is None  # capped at the bucket: it takes all 100
    assert limiter.acquire("k", limit, tokens=5000) == pytest.approx(60.0)
    limiter.settle("k", limit, reserved=5000, used=250)  # and pays for what it used beyond them
    assert limiter.acquire("k", limit) == pytest.approx(90.0)


def test_requests_and_tokens_are_taken_together_or_not_at_all():
    limiter, limit = MemoryRateLimiter(clock=FakeClock()), RateLimit(requests_per_minute=10, tokens_per_minute=100)
    assert limiter.acquire("k", limit, requests=1, tokens=100) is None
    assert limiter.acquire("k", limit, requests=1, tokens=50) == pytest.approx(30.0)  # the token bucket refuses...
    assert [limiter.acquire("k", limit, requests=1) for _ in range(10)][-1] == pytest.approx(6.0)  # ...and took no request


def test_unlimited_keys_keep_no_state():
    limiter = MemoryRateLimiter(clock=FakeClock())
    assert all(limiter.acquire("k", RateLimit(), requests=1, tokens=10**9) is None for _ in range(1000))
    limiter.settle("k", RateLimit(), reserved=10, used=0)
    assert len(limiter) == 0


def test_memory_state_is_bounded_by_forgetting_the_least_recently_used_key():
    clock = FakeClock()
    limiter, limit = MemoryRateLimiter(max_keys=3, clock=clock), RateLimit(requests_per_minute=1)
    for key in ("a", "b", "c"):
        assert limiter.acquire(key, limit, requests=1) is None
    assert limiter.acquire("a", limit, requests=1) is not None  # "a" is now the most recently used
    for n in range(1000):
        limiter.acquire(f"k{n}", limit, requests=1)
        assert len(limiter) <= 3
    assert limiter.acquire("b", limit, requests=1) is None  # forgotten: a full bucket again


def test_concurrent_acquires_do_not_over_admit():
    limiter, limit = MemoryRateLimiter(clock=FakeClock()), RateLimit(requests_per_minute=50)
    admitted, start = [], threading.Barrier(8)

    def worker():
        start.wait()
        admitted.extend(limiter.acquire("shared", limit, requests=1) is None for _ in range(40))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 50 and len(admitted) == 320


# ---------------------------------------------------------------- shared in Redis

def test_two_replicas_share_one_budget_in_redis(redis_server):
    first, second = (RedisRateLimiter(redis_store(redis_server, "shared:")) for _ in range(2))
    limit = RateLimit(requests_per_minute=6, tokens_per_minute=100)
    admitted = [(first if n % 2 else second).acquire("k", limit, requests=1) is None for n in range(8)]
    assert admitted == [True] * 6 + [False] * 2  # 6 in all, not 6 per replica
    assert 0 < first.acquire("k", limit, requests=1) <= 10.0 and 0 < second.acquire("k", limit, requests=1) <= 10.0
    # A reservation on one replica holds the tokens for the other, until it is settled there.
    assert first.acquire("tokens", limit, tokens=80) is None
    assert second.acquire("tokens", limit, tokens=30) == pytest.approx(6.0, abs=0.5)
    first.settle("tokens", limit, reserved=80, used=10)
    assert second.acquire("tokens", limit, tokens=30) is None


def test_redis_buckets_run_on_the_servers_clock_not_the_replicas(redis_server):
    """The replicas' own clocks (here an hour apart) play no part: the Lua script reads Redis's TIME."""
    early, late = FakeClock(), FakeClock()
    late.now += 3600
    first = RedisRateLimiter(redis_store(redis_server, "clock:"), clock=early)
    second = RedisRateLimiter(redis_store(redis_server, "clock:"), clock=late)
    # One request back every second: slow enough that a loaded machine does not refill the bucket
    # between emptying it and the next call (600 a minute, 0.1 s, failed under a CI run's load).
    limit = RateLimit(requests_per_minute=60)
    while first.acquire("k", limit, requests=1) is None:  # empty it (it refills while we do)
        pass
    wait = second.acquire("k", limit, requests=1)
    assert wait is not None and 0 < wait <= 1.0
    time.sleep(wait + 0.1)
    assert second.acquire("k", limit, requests=1) is None


def test_redis_state_expires_once_the_buckets_would_be_full(redis_server):
    limiter = RedisRateLimiter(redis_store(redis_server, "ttl:"))
    client = redis.Redis.from_url(redis_server)
    assert limiter.acquire("k", RateLimit(tokens_per_minute=100), tokens=100) is None
    assert 59 <= client.ttl("ttl:k") <= 60  # empty: full again in a minute
    assert limiter.acquire("idle", RateLimit(requests_per_minute=60), requests=1) is None
    assert client.ttl("ttl:idle") == 1  # one request refills in a second
    limiter.settle("k", RateLimit(tokens_per_minute=100), reserved=100, used=0)
    assert client.ttl("ttl:k") >= 59  # a settlement never shortens another bucket's state
    time.sleep(2.2)
    assert client.exists("ttl:idle") == 0  # nothing is kept for keys no longer in use
    assert limiter.acquire("idle", RateLimit(requests_per_minute=60), requests=1) is None


def test_the_redis_password_comes_from_the_environment_variable_named(redis_server, monkeypatch):
    redis.Redis.from_url(redis_server).acl_setuser("limiter", enabled=True, passwords=["+from-the-node"],
                                                   keys=["*"], commands=["+@all"])
    settings = redis_store(redis_server.replace("redis://", "redis://limiter@"), "pw:",
                           password_env="LAKEFORGE_TEST_REDIS_PASSWORD")
    with pytest.raises(ConfigError, match="LAKEFORGE_TEST_REDIS_PASSWORD"):
        RedisRateLimiter(settings)
    monkeypatch.setenv("LAKEFORGE_TEST_REDIS_PASSWORD", "wrong")
    with pytest.raises(RateLimitStoreUnavailable):  # refused by Redis: as if it were down (logged, counted)
        RedisRateLimiter(settings).acquire("k", RateLimit(requests_per_minute=1), requests=1)
    monkeypatch.setenv("LAKEFORGE_TEST_REDIS_PASSWORD", "from-the-node")
    limiter = RedisRateLimiter(settings)
    assert [limiter.acquire("k", RateLimit(requests_per_minute=1), requests=1) is None for _ in range(2)] == [True, False]


@pytest.mark.parametrize("on_unavailable", ["refuse", "admit"])
def test_an_unreachable_redis_refuses_or_admits_counts_and_logs_once_per_interval(on_unavailable, caplog):
    clock = FakeClock()
    limiter = RedisRateLimiter(redis_store(f"redis://127.0.0.1:{free_port()}/0", "down:", retry_s=5,
                                           on_unavailable=on_unavailable), clock=clock)
    counted = []
    limiter.unavailable.inc = lambda value=1.0, tags=None: counted.append(tags)
    limit = RateLimit(requests_per_minute=1)

    def attempt():
        try:
            return limiter.acquire("k", limit, requests=1)
        except RateLimitStoreUnavailable as error:
            return error.retry_after_s

    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        answers = [attempt() for _ in range(3)]  # a limit of 1 per minute: only "admit" lets 3 through
        limiter.settle("k", RateLimit(tokens_per_minute=10), reserved=5, used=0)
        clock.now += 5  # retry_s later Redis is tried (and logged) again
        answers.append(attempt())
    assert answers == ([5.0] * 4 if on_unavailable == "refuse" else [None] * 4)
    assert counted == [{"on_unavailable": on_unavailable}] * 5
    logged = [record.getMessage() for record in caplog.records if "rate-limit store" in record.getMessage()]
    assert len(logged) == 2 and "cannot be reached" in logged[0]


# ---------------------------------------------------------------- settings

@pytest.mark.parametrize("url", ["redis://:hunter2@cache:6379/0", "rediss://limiter:hunter2@cache:6380/0",
                                 "redis://cache:6379/0?password=hunter2"])
def test_a_redis_url_holding_a_password_is_refused_without_repeating_it(url):
    with pytest.raises(ValidationError) as refused:
        RateLimitStoreSettings(backend="redis", redis_url=url)
    assert "password_env" in str(refused.value)
    assert "hunter2" not in str(refused.value) and "hunter2" not in format_validation_error(refused.value)


@pytest.mark.parametrize("settings, named", [
    ({"backend": "redis"}, "backend redis needs redis_url"),
    ({"redis_url": "redis://cache:6379/0"}, "are for backend redis"),
    ({"backend": "redis", "redis_url": "redis://cache/0", "on_unavailable": "ignore"}, "on_unavailable"),
    ({"backend": "redis", "redis_url": "redis://cache/0", "timeout_s": 0}, "timeout_s"),
    ({"backend": "memcached"}, "backend"),
    ({"backend": "redis", "redis_url": "redis://cache/0", "password": "x"}, "password"),  # unknown keys are errors
])
def test_store_settings_are_checked(settings, named):
    with pytest.raises(ValidationError, match=named):
        SecuritySettings(rate_limit_store=settings)


def test_the_default_store_is_per_replica_memory():
    store = SecuritySettings().rate_limit_store
    assert (store.backend, store.on_unavailable) == ("memory", "refuse")
    assert SecuritySettings(rate_limit_store={"backend": "redis", "redis_url": "redis://cache:6379/0",
                                              "password_env": "REDIS_PASSWORD"}).rate_limit_store.backend == "redis"
