"""Quota counters: one conformance suite for every backend, then Redis behind a Meter.

The suite runs on the memory, SQLite, PostgreSQL and Redis counters: the same operations must
give the same answers (all-or-nothing, sliding windows, expiry, holds, claims). Redis uses the
database in ``MK_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``) with a key prefix of its
own per test, whose keys are deleted afterwards (not FLUSHDB, so test runs sharing the server
cannot wipe each other's keys); PostgreSQL a schema of its own per test. An unreachable server
skips its tests, except under ``CI=true``, where it fails them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import meterkit
import services
from clock import Clock
from meterkit import Meter, Plan, QuotaExceeded, StoreUnavailable
from meterkit.meter import open_counters, open_store
from meterkit.models import CounterLine
from meterkit.recovery import rebuild_counters
from meterkit.stores.base import CounterStore
from meterkit.stores.redis import RedisCounters
from meterkit.testing import CounterConformance

RUN = uuid.uuid4().hex[:8]
T0 = 1_730_419_200  # 2024-11-01T00:00:00Z
DAY = 86400


@pytest.fixture(scope="session")
def redis_url() -> str:
    return services.redis_url()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = services.postgres_url()
    yield url
    services.drop_schemas(url, f"mk_r{RUN}\\_")


class RedisSpace:
    """A key prefix nobody else uses on the test Redis, and a client to look inside."""

    def __init__(self, base: str) -> None:
        import redis

        self.base = base
        self.prefix = f"mkt{RUN}:{uuid.uuid4().hex[:8]}:"
        self.client = redis.Redis.from_url(base)

    def url(self, suffix: str = "") -> str:
        """The counters URL for this space (``suffix`` makes a sub-space)."""
        return services.with_params(self.base, prefix=self.prefix + suffix)

    def keys(self) -> list[bytes]:
        return sorted(self.client.scan_iter(match=self.prefix + "*"))

    def wipe(self) -> None:
        """Delete every key of this space: what a restart of Redis does to it."""
        keys = self.keys()
        if keys:
            self.client.delete(*keys)


class ClusterSpace(RedisSpace):
    """A key prefix of its own on the test Redis Cluster (keys spread over its nodes)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.prefix = f"mkt{RUN}:{uuid.uuid4().hex[:8]}:"
        self.client = services.cluster_client(base)


@pytest.fixture
def fresh_cluster() -> Iterator[RedisSpace]:
    space = ClusterSpace(services.redis_cluster_url())
    yield space
    space.wipe()
    space.client.close()


@pytest.fixture
def fresh_redis(redis_url: str) -> Iterator[RedisSpace]:
    space = RedisSpace(redis_url)
    yield space
    space.wipe()
    space.client.close()


def postgres_schema_url(base: str) -> str:
    schema = f"mk_r{RUN}_{uuid.uuid4().hex[:10]}"
    return f"{base}{'&' if '?' in base else '?'}schema={schema}"


NOW = T0 + 100


# -- the counter conformance suite, on Redis and on a Redis Cluster ----------------------------
# (memory, SQLite and PostgreSQL run it as part of StoreConformance)


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_backend(request: pytest.FixtureRequest) -> Iterator[CounterStore]:
    """A fresh Redis counters backend, on one server or on the cluster."""
    space = "fresh_redis" if request.param == "redis" else "fresh_cluster"
    opened = open_counters(request.getfixturevalue(space).url())
    assert isinstance(opened, RedisCounters) and opened.cluster == (request.param != "redis")
    yield opened
    opened.close()


class TestRedisCounters(CounterConformance):
    @pytest.fixture
    def counters(self, redis_backend: CounterStore) -> CounterStore:
        return redis_backend


# -- Redis specifics --------------------------------------------------------------------------


def test_redis_state_is_one_hash_per_counter_with_an_expiry(fresh_redis: RedisSpace) -> None:
    counters = RedisCounters(fresh_redis.url())
    key = (fresh_redis.prefix + "c:k").encode()
    try:
        # Redis frees keys by its own clock (TIME), so that is the clock this test speaks.
        now = int(fresh_redis.client.time()[0])
        counters.counters_apply([CounterLine("k", 3, 10, expires_at=now + 100)], now=now)
        assert fresh_redis.keys() == [key]
        assert fresh_redis.client.hgetall(key) == {b"v": b"3", b"e": str(now + 100).encode()}
        ttl = fresh_redis.client.pttl(key)
        assert 100_000 < ttl <= (100 + 300) * 1000, "Redis frees it a little after it expires"
        counters.counters_set("k", 4, now=now)
        assert fresh_redis.client.pttl(key) == -1, "no expiry any more"
    finally:
        counters.close()


def test_redis_prefixes_keep_applications_apart(fresh_redis: RedisSpace) -> None:
    one, two = RedisCounters(fresh_redis.url("one:")), RedisCounters(fresh_redis.url("two:"))
    default = RedisCounters(fresh_redis.base)
    try:
        one.counters_add([("k", 1)], now=NOW)
        assert two.counters_read(["k"], now=NOW) == [0]
        assert default.prefix == "mk:"
    finally:
        for counters in (one, two, default):
            counters.close()


def test_redis_scripts_survive_a_script_flush(fresh_redis: RedisSpace) -> None:
    counters = RedisCounters(fresh_redis.url())
    try:
        counters.counters_add([("k", 1)], now=NOW)
        fresh_redis.client.script_flush()  # what a restart does to the script cache
        assert counters.counters_apply([CounterLine("k", 1, 5)], now=NOW).used == (2,)
    finally:
        counters.close()


def test_unreachable_redis_is_store_unavailable() -> None:
    counters = open_counters("redis://127.0.0.1:1/0?socket_connect_timeout=0.5")
    try:
        with pytest.raises(StoreUnavailable, match="Redis counters unavailable"):
            counters.counters_read(["k"], now=NOW)
        with pytest.raises(StoreUnavailable):
            counters.counters_apply([CounterLine("k", 1, 5)], now=NOW)
    finally:
        counters.close()


# -- quotas through Meter(..., counters="redis://...") ----------------------------------------


class Thresholds:
    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []

    @meterkit.hookimpl
    def meterkit_quota_threshold(self, metric: str, threshold: float) -> None:
        self.seen.append((metric, threshold))


@pytest.fixture(params=["memory+redis", "postgres+redis"])
def open_meter(
    request: pytest.FixtureRequest, fresh_redis: RedisSpace
) -> Iterator[Callable[..., Meter]]:
    """Meters on one event store (memory or PostgreSQL) with their counters in Redis."""
    store_url = "memory://"
    if request.param == "postgres+redis":
        store_url = postgres_schema_url(request.getfixturevalue("postgres_url"))
    shared = open_store(store_url)
    opened: list[Meter] = []

    def make(**kwargs: Any) -> Meter:
        kwargs.setdefault("clock", Clock(T0 + 30))
        meter = Meter(store=shared, counters=fresh_redis.url(), **kwargs)
        opened.append(meter)
        return meter

    yield make
    for meter in opened:
        meter.counters.close()
    shared.close()


def on_plan(m: Meter, org: str = "org", **plan: Any) -> None:
    m.set_plan(Plan("pro", **plan))
    m.assign_plan(org, "pro")


def test_meter_uses_redis_for_counters(open_meter: Callable[..., Meter]) -> None:
    m = open_meter()
    assert isinstance(m.counters, RedisCounters)
    on_plan(m, limits={"tokens": 100, "queries": 2})
    assert m.check("org", {"tokens": 60, "queries": 1}).allowed
    refused = m.check("org", {"tokens": 50, "queries": 1})
    assert (refused.allowed, refused.refused_by) == (False, "tokens")
    assert m.quotas.used("org", "queries") == 1, "a refused request debits nothing"
    assert m.check("org", {"tokens": 40, "queries": 1}).allowed
    assert m.check("org", {"tokens": 0, "queries": 1}).refused_by == "queries"
    # The events recorded for the admitted requests are in the event store, not in Redis.
    assert (
        m.total("tokens", "tokens", organization_id="org", start_time=T0, end_time=T0 + DAY) == 100
    )


def test_meters_sharing_redis_share_counters(open_meter: Callable[..., Meter]) -> None:
    a, b = open_meter(), open_meter()
    on_plan(a, limits={"tokens": 10})
    assert a.check("org", {"tokens": 6}).allowed
    assert not b.check("org", {"tokens": 6}).allowed
    assert b.check("org", {"tokens": 4}).allowed
    a.flush(), b.flush()  # each reports what it decided within a flush interval
    assert a.quotas.used("org", "tokens") == b.quotas.used("org", "tokens") == 10


def test_reservations_and_rate_limits_on_redis(open_meter: Callable[..., Meter]) -> None:
    clock = Clock(T0 + 30)
    m = open_meter(clock=clock)
    on_plan(m, limits={"tokens": 100}, rate_limit_rpm=2)
    with m.reserve("org", {"tokens": 80}, ttl=60) as held:
        assert m.quotas.used("org", "tokens") == 80
        with pytest.raises(QuotaExceeded):
            m.reserve("org", {"tokens": 30})
        held.commit({"tokens": 25})
    assert m.quotas.used("org", "tokens") == 25
    abandoned = m.reserve("org", {"tokens": 70}, ttl=10)
    assert m.quotas.used("org", "tokens") == 95
    refused = m.check("org", {"tokens": 1})
    assert refused.refused_by == "rate_limit_rpm" and refused.retry_after is not None
    clock.t += 60  # the abandoned hold expired; the previous minute weighs half
    assert m.check("org", {"tokens": 70}).allowed
    assert m.quotas.used("org", "tokens") == 95
    abandoned.release()  # expired already: gives nothing back twice
    assert m.quotas.used("org", "tokens") == 95


def test_threshold_hooks_fire_once_across_meters(open_meter: Callable[..., Meter]) -> None:
    seen = Thresholds()
    a, b = open_meter(plugins=[seen]), open_meter(plugins=[seen])
    on_plan(a, limits={"tokens": 10})
    a.check("org", {"tokens": 8})
    b.check("org", {"tokens": 1})
    b.check("org", {"tokens": 1})
    assert seen.seen == [("tokens", 0.8), ("tokens", 1.0)]


def test_redis_down_follows_the_failure_policy() -> None:
    down = "redis://127.0.0.1:1/0?socket_connect_timeout=0.5"
    with (
        Meter("memory://", counters=down, policy="closed") as closed,
        pytest.raises(StoreUnavailable),
    ):
        closed.check("org", {"tokens": 1})
    with Meter("memory://", counters=down, policy="open") as opened:
        decision = opened.check("org", {"tokens": 1})
        assert decision.allowed and decision.degraded


def test_rebuild_after_redis_lost_everything(
    open_meter: Callable[..., Meter], fresh_redis: RedisSpace
) -> None:

    clock = Clock(T0 + 5 * DAY)
    m = open_meter(clock=clock)
    on_plan(m, limits={"tokens": 1000, "credits": 50}, rate_limit_rpm=100)
    m.assign_plan("other", "pro")
    m.check("org", {"tokens": 300, "credits": 5})
    m.debit("org", {"tokens": 45})
    with m.reserve("org", {"tokens": 100}) as held:
        held.commit({"tokens": 55})
    m.check("other", {"tokens": 7})
    m.record(
        "storage_bytes",
        {"storage_bytes": 700},
        organization_id="org",
        dimensions={"resource": "r1"},
        time=T0 + DAY,
    )
    m.record(
        "storage_bytes",
        {"storage_bytes": 900},
        organization_id="org",
        dimensions={"resource": "r1"},
        time=T0 + 2 * DAY,
    )
    m.record(
        "storage_bytes",
        {"storage_bytes": 100},
        organization_id="org",
        dimensions={"resource": "r2"},
        time=T0 + DAY,
    )
    pending = m.reserve("org", {"tokens": 200})
    assert m.quotas.used("org", "tokens") == 400 + 200

    m.flush()  # Redis was told everything ...
    fresh_redis.wipe()  # ... and restarts, keeping nothing
    # What is left is what this process holds: the open reservation, in its lease.
    assert m.quotas.used("org", "tokens") == 200

    report = rebuild_counters(m)
    assert report["org"]["tokens"] == 400 and report["other"]["tokens"] == 7
    assert m.quotas.used("org", "tokens") == 400 + 200, "the reservation is still held here"
    assert m.quotas.used("org", "credits") == 5
    assert m.quotas.used("org", "storage_bytes") == 900 + 100
    assert m.quotas.used("other", "tokens") == 7
    pending.commit({"tokens": 150})
    # A reservation the lease no longer knows (its hold lapsed with Redis, and a background
    # report may have noticed first) is settled by adding the usage at the next flush.
    m.flush()
    assert m.quotas.used("org", "tokens") == 550
    assert rebuild_counters(m, "org")["org"]["tokens"] == 550, "idempotent"
