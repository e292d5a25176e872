"""Quota counters: one conformance suite for every backend, then Redis behind a Meter.

The suite runs on the memory, SQLite, PostgreSQL and Redis counters: the same operations must
give the same answers (all-or-nothing, sliding windows, expiry, holds, claims). Redis uses the
database in ``MK_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``) with a key prefix of its
own per test, whose keys are deleted afterwards (not FLUSHDB, so test runs sharing the server
cannot wipe each other's keys); PostgreSQL a schema of its own per test. An unreachable server
skips its tests, except under ``CI=true``, where it fails them.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import meterkit
import services
from clock import Clock
from meterkit import Meter, Plan, QuotaExceeded, StoreUnavailable
from meterkit.counters import MAX_COUNTER
from meterkit.meter import open_counters, open_store
from meterkit.models import CounterLine, Hold
from meterkit.recovery import rebuild_counters
from meterkit.stores.base import CounterStore
from meterkit.stores.memory import MemoryStore
from meterkit.stores.redis import RedisCounters
from meterkit.stores.sqlite import SQLiteStore

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


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis", "redis-cluster"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CounterStore]:
    """A fresh counters backend of each kind."""
    kind = request.param
    opened: CounterStore
    if kind == "memory":
        opened = MemoryStore()
    elif kind == "sqlite":
        opened = SQLiteStore(f"sqlite:///{tmp_path / 'c.db'}")
    elif kind == "postgres":
        opened = open_store(postgres_schema_url(request.getfixturevalue("postgres_url")))
    else:
        space = "fresh_redis" if kind == "redis" else "fresh_cluster"
        opened = open_counters(request.getfixturevalue(space).url())
        assert isinstance(opened, RedisCounters) and opened.cluster == (kind != "redis")
    assert isinstance(opened, CounterStore)
    yield opened
    opened.close()


NOW = T0 + 100


# -- the counter conformance suite ------------------------------------------------------------


def test_admits_and_adds_within_the_limit(backend: CounterStore) -> None:
    result = backend.counters_apply([CounterLine("a", 4, 10)], now=NOW)
    assert (result.admitted, result.used, result.previous) == (True, (4,), (0,))
    result = backend.counters_apply([CounterLine("a", 6, 10)], now=NOW)
    assert (result.admitted, result.used) == (True, (10,)), "exactly the limit fits"
    result = backend.counters_apply([CounterLine("a", 1, 10)], now=NOW)
    assert (result.admitted, result.used) == (False, (10,)), "refused: the state before"
    assert backend.counters_read(["a"], now=NOW) == [10]


def test_all_or_nothing_across_lines(backend: CounterStore) -> None:
    backend.counters_add([("tight", 9)], now=NOW)
    lines = [CounterLine("loose", 5, 100), CounterLine("free", 5), CounterLine("tight", 2, 10)]
    result = backend.counters_apply(lines, now=NOW)
    assert not result.admitted
    assert result.used == (0, 0, 9)
    assert backend.counters_read(["loose", "free", "tight"], now=NOW) == [0, 0, 9]
    lines[2] = CounterLine("tight", 1, 10)
    assert backend.counters_apply(lines, now=NOW).used == (5, 5, 10)


def test_no_limit_always_fits_and_a_zero_limit_refuses(backend: CounterStore) -> None:
    assert backend.counters_apply([CounterLine("n", 10**12)], now=NOW).admitted
    assert backend.counters_read(["n"], now=NOW) == [10**12]
    assert not backend.counters_apply([CounterLine("z", 1, 0)], now=NOW).admitted
    assert backend.counters_apply([CounterLine("z", 0, 0)], now=NOW).admitted


def test_large_values_stay_exact(backend: CounterStore) -> None:
    big = 2**53 - 1
    assert backend.counters_add([("big", big - 1)], now=NOW) == [big - 1]
    assert backend.counters_apply([CounterLine("big", 1, big)], now=NOW).used == (big,)
    assert not backend.counters_apply([CounterLine("big", 1, big)], now=NOW).admitted
    assert backend.counters_read(["big"], now=NOW) == [big]


@pytest.mark.parametrize(
    ("previous", "weight", "current", "amount", "limit", "admitted"),
    [
        (10, 0.5, 0, 5, 10, True),  # floor(5) + 0 + 5 = 10
        (10, 0.5, 0, 6, 10, False),
        (3, 0.5, 8, 1, 10, True),  # floor(1.5) = 1: 1 + 8 + 1 = 10
        (3, 0.5, 9, 1, 10, False),
        (7, 0.999, 3, 1, 10, True),  # floor(6.993) = 6
        (60, 1 / 60, 9, 1, 10, False),  # floor(60 * (1/60)) = 1 (the double rounds up to 1.0)
        (59, 1 / 60, 9, 1, 10, True),  # floor(0.98...) = 0
        (5, 0.0, 10, 0, 10, True),
    ],
)
def test_sliding_window_estimate(
    backend: CounterStore,
    previous: int,
    weight: float,
    current: int,
    amount: int,
    limit: int,
    admitted: bool,
) -> None:
    backend.counters_add([("prev", previous), ("cur", current)], now=NOW)
    line = CounterLine("cur", amount, limit, prev_key="prev", prev_weight=weight)
    result = backend.counters_apply([line], now=NOW)
    assert result.admitted is admitted
    assert result.previous == (previous,)
    assert result.used == ((current + amount,) if admitted else (current,))
    assert backend.counters_read(["prev"], now=NOW) == [previous], "the previous window is read"


def test_previous_is_reported_only_for_lines_with_a_previous_key(backend: CounterStore) -> None:
    backend.counters_add([("p", 5)], now=NOW)
    lines = [CounterLine("x", 1, 3), CounterLine("y", 1, 3, prev_key="p", prev_weight=0.0)]
    assert backend.counters_apply(lines, now=NOW).previous == (0, 5)


def test_counters_expire_at_their_time(backend: CounterStore) -> None:
    backend.counters_apply([CounterLine("w", 3, 10, expires_at=NOW + 60)], now=NOW)
    assert backend.counters_read(["w"], now=NOW + 59) == [3]
    assert backend.counters_read(["w"], now=NOW + 60) == [0]
    result = backend.counters_apply([CounterLine("w", 10, 10, expires_at=NOW + 120)], now=NOW + 60)
    assert (result.admitted, result.used) == (True, (10,)), "an expired counter starts over"
    assert backend.counters_read(["w"], now=NOW + 119) == [10]
    assert backend.counters_read(["w"], now=NOW + 120) == [0]


def test_adding_without_an_expiry_keeps_the_one_there(backend: CounterStore) -> None:
    backend.counters_add([("k", 2)], now=NOW, expires_at=NOW + 10)
    backend.counters_add([("k", 3)], now=NOW)
    assert backend.counters_read(["k"], now=NOW + 9) == [5]
    assert backend.counters_read(["k"], now=NOW + 10) == [0]
    # Expired, then added to without an expiry: a fresh counter that never expires.
    assert backend.counters_add([("k", 1)], now=NOW + 10) == [1]
    assert backend.counters_read(["k"], now=NOW + 10**6) == [1]


def test_refused_apply_leaves_nothing_behind(backend: CounterStore) -> None:
    line = CounterLine("never", 5, 4, expires_at=NOW + 60)
    assert not backend.counters_apply([line], now=NOW).admitted
    # Nothing counts, and no expiry was set: an unconditional add later never expires.
    assert backend.counters_read(["never"], now=NOW) == [0]
    backend.counters_add([("never", 2)], now=NOW)
    assert backend.counters_read(["never"], now=NOW + 10**6) == [2]


def test_counters_never_pass_the_bound(backend: CounterStore) -> None:
    # 2**53 - 1: what a Redis Lua double still holds exactly; no backend goes past it.
    assert backend.counters_apply([CounterLine("big", MAX_COUNTER)], now=NOW).admitted
    refused = backend.counters_apply([CounterLine("small", 1, 10), CounterLine("big", 1)], now=NOW)
    assert not refused.admitted  # no limit on "big", but no room either: all or nothing
    assert backend.counters_read(["big", "small"], now=NOW) == [MAX_COUNTER, 0]
    assert backend.counters_add([("big", MAX_COUNTER)], now=NOW) == [MAX_COUNTER]  # saturates
    assert backend.counters_add([("big", -2 * MAX_COUNTER)], now=NOW) == [0]


def test_counters_never_go_below_zero(backend: CounterStore) -> None:
    backend.counters_add([("f", 3)], now=NOW)
    assert backend.counters_add([("f", -10), ("g", -1)], now=NOW) == [0, 0]
    assert backend.counters_add([("f", 4)], now=NOW) == [4]


def test_add_is_unconditional_and_returns_the_values(backend: CounterStore) -> None:
    backend.counters_apply([CounterLine("lim", 10, 10)], now=NOW)
    assert backend.counters_add([("lim", 5), ("other", 1)], now=NOW) == [15, 1]
    assert backend.counters_add([], now=NOW) == []


def test_set_replaces_value_and_expiry(backend: CounterStore) -> None:
    backend.counters_add([("s", 50)], now=NOW, expires_at=NOW + 5)
    backend.counters_set("s", 7, now=NOW)
    assert backend.counters_read(["s"], now=NOW + 100) == [7], "set without expiry: none"
    backend.counters_set("s", 9, now=NOW, expires_at=NOW + 3)
    assert backend.counters_read(["s"], now=NOW + 2) == [9]
    assert backend.counters_read(["s"], now=NOW + 3) == [0]


def test_read_of_absent_keys_is_zero(backend: CounterStore) -> None:
    assert backend.counters_read(["nope", "nada"], now=NOW) == [0, 0]
    assert backend.counters_read([], now=NOW) == []


def test_keys_may_hold_any_text(backend: CounterStore) -> None:
    keys = ["q\x1forg\x1ftokens\x1f1730419200", "with space", "ünïcødé ✓", "a:b:c", "#hash"]
    if getattr(backend, "cluster", False):
        # On a cluster one operation's keys belong to one organization (one hash slot).
        keys = [keys[0], *(f"q\x1forg\x1f{k}" for k in keys[1:])]
    backend.counters_add([(k, i + 1) for i, k in enumerate(keys)], now=NOW)
    hold = Hold("h", "org", ((keys[0], 1), (keys[4], 1)), NOW + 5)
    assert backend.counters_apply([CounterLine(keys[2], 1, 10)], now=NOW, hold=hold).admitted
    assert backend.counters_read(keys, now=NOW) == [1, 2, 4, 4, 5]
    assert backend.counters_settle("h", [(keys[0], -1)], now=NOW)
    assert backend.counters_read(keys[:1], now=NOW) == [0]


# -- holds ------------------------------------------------------------------------------------


def hold_of(id: str, expires_at: int, **amounts: int) -> Hold:
    return Hold(id, "org", tuple(amounts.items()), expires_at)


def test_settle_forgets_the_hold_and_adds_the_deltas(backend: CounterStore) -> None:
    held = backend.counters_apply(
        [CounterLine("t", 30, 100)], now=NOW, hold=hold_of("r1", NOW + 300, t=30)
    )
    assert held.used == (30,)
    assert backend.counters_settle("r1", [("t", -20)], now=NOW + 1)
    assert backend.counters_read(["t"], now=NOW + 1) == [10]
    assert not backend.counters_settle("r1", [("t", -10)], now=NOW + 1), "settled once only"
    assert backend.counters_read(["t"], now=NOW + 1) == [10]


def test_settle_of_an_unknown_hold_changes_nothing(backend: CounterStore) -> None:
    backend.counters_add([("t", 5)], now=NOW)
    assert not backend.counters_settle("nobody", [("t", -5)], now=NOW)
    assert backend.counters_read(["t"], now=NOW) == [5]


def test_refused_apply_keeps_no_hold(backend: CounterStore) -> None:
    result = backend.counters_apply(
        [CounterLine("t", 30, 10)], now=NOW, hold=hold_of("r", NOW + 300, t=30)
    )
    assert not result.admitted
    assert not backend.counters_settle("r", [], now=NOW)


def test_expired_holds_are_released_by_the_next_apply(backend: CounterStore) -> None:
    backend.counters_apply([CounterLine("t", 8, 10)], now=NOW, hold=hold_of("r", NOW + 60, t=8))
    # One second before expiry the hold still counts: 8 + 5 > 10.
    assert not backend.counters_apply([CounterLine("t", 5, 10)], now=NOW + 59).admitted
    # At its expiry it is given back first, inside the same atomic operation: 0 + 5 fits.
    result = backend.counters_apply([CounterLine("t", 5, 10)], now=NOW + 60)
    assert (result.admitted, result.used) == (True, (5,))
    assert not backend.counters_settle("r", [("t", -8)], now=NOW + 61), "it expired"
    assert backend.counters_read(["t"], now=NOW + 61) == [5]


def test_settle_releases_expired_holds_first(backend: CounterStore) -> None:
    backend.counters_apply(
        [CounterLine("a", 4), CounterLine("b", 2)],
        now=NOW,
        hold=hold_of("old", NOW + 10, a=4, b=2),
    )
    backend.counters_apply([CounterLine("c", 1)], now=NOW, hold=hold_of("new", NOW + 99, c=1))
    assert backend.counters_settle("new", [("c", 5)], now=NOW + 10)
    assert backend.counters_read(["a", "b", "c"], now=NOW + 10) == [0, 0, 6]


def test_releasing_an_expired_hold_never_goes_below_zero(backend: CounterStore) -> None:
    backend.counters_apply([CounterLine("t", 5)], now=NOW, hold=hold_of("r", NOW + 1, t=5))
    backend.counters_set("t", 2, now=NOW)  # recalculated meanwhile
    backend.counters_apply([], now=NOW + 1)
    assert backend.counters_read(["t"], now=NOW + 1) == [0]


def test_a_hold_without_amounts_can_be_settled(backend: CounterStore) -> None:
    assert backend.counters_apply([], now=NOW, hold=hold_of("empty", NOW + 5)).admitted
    assert backend.counters_settle("empty", [], now=NOW)
    assert not backend.counters_settle("empty", [], now=NOW)


def test_holds_release_only_their_own_amounts(backend: CounterStore) -> None:
    backend.counters_add([("t", 100)], now=NOW)
    backend.counters_apply([CounterLine("t", 7)], now=NOW, hold=hold_of("x", NOW + 5, t=7))
    backend.counters_apply([CounterLine("t", 3)], now=NOW, hold=hold_of("y", NOW + 50, t=3))
    backend.counters_apply([], now=NOW + 5)
    assert backend.counters_read(["t"], now=NOW + 5) == [103]
    assert backend.counters_settle("y", [("t", -3)], now=NOW + 6)
    assert backend.counters_read(["t"], now=NOW + 6) == [100]


def test_a_hold_of_a_known_id_is_replaced_with_its_expiry(backend: CounterStore) -> None:
    # Leases rewrite one hold per organization with every take and report.
    backend.counters_apply([CounterLine("t", 7)], now=NOW, hold=hold_of("l", NOW + 5, t=7))
    lines = [CounterLine("t", -3), CounterLine("u", 2)]
    assert backend.counters_apply(
        lines, now=NOW + 1, hold=hold_of("l", NOW + 50, t=4, u=2)
    ).admitted
    backend.counters_apply([], now=NOW + 5)  # the first expiry is gone with the first hold
    assert backend.counters_read(["t", "u"], now=NOW + 5) == [4, 2]
    backend.counters_apply([], now=NOW + 50)
    assert backend.counters_read(["t", "u"], now=NOW + 50) == [0, 0]


def test_negative_amounts_without_a_limit_give_back(backend: CounterStore) -> None:
    backend.counters_add([("t", 5)], now=NOW)
    result = backend.counters_apply([CounterLine("t", -2), CounterLine("v", -1)], now=NOW)
    assert (result.admitted, result.used) == (True, (3, 0))


# -- claims -----------------------------------------------------------------------------------


def test_claim_once(backend: CounterStore) -> None:
    assert backend.claim_once("forever", now=NOW)
    assert not backend.claim_once("forever", now=NOW + 10**6)
    assert backend.claim_once("period", now=NOW, expires_at=NOW + 30)
    assert not backend.claim_once("period", now=NOW + 29, expires_at=NOW + 30)
    assert backend.claim_once("period", now=NOW + 30, expires_at=NOW + 60), "expired: again"
    assert not backend.claim_once("period", now=NOW + 31)


# -- concurrency ------------------------------------------------------------------------------


def test_threads_racing_one_counter_admit_exactly_the_limit(backend: CounterStore) -> None:
    limit, threads, tries = 37, 8, 10
    admitted: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        mine = 0
        for _ in range(tries):
            lines = [CounterLine("race", 1, limit), CounterLine("race_total", 1)]
            if backend.counters_apply(lines, now=NOW).admitted:
                mine += 1
        with lock:
            admitted.append(mine)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert sum(admitted) == limit
    assert backend.counters_read(["race", "race_total"], now=NOW) == [limit, limit]


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
