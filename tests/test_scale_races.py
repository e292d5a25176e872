"""Many processes on one PostgreSQL (and Redis): races that must come out exact.

- 4 processes x 8 threads race one quota, with the counters in PostgreSQL and in Redis: exactly
  the limit is admitted, and exactly the admitted usage is recorded.
- 4 processes open the same empty schema at once: it is created and migrated exactly once.
- A connection killed in the middle of a large append: nothing acknowledged is lost, and
  appending the same batch again stores exactly the missing events.

Needs ``MK_POSTGRES_URL`` / ``MK_REDIS_URL`` like tests/test_postgres.py and tests/test_redis.py:
skipped when unreachable, failed under ``CI=true``.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import processes
import services
from meterkit import Event, Meter, Plan, StoreUnavailable
from meterkit.meter import open_store
from meterkit.stores.base import Store
from meterkit.stores.postgres import MIGRATIONS
from meterkit.validate import MAX_TIME

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RUN = uuid.uuid4().hex[:8]
T0 = 1_730_419_200 + 3600  # 2024-11-01T01:00:00Z: one billing period, one rate window
ORG = "org_race"
PROCESSES, THREADS = 4, 8


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    url = services.postgres_url()
    yield url
    services.drop_schemas(url, f"mk_s{RUN}\\_")


@pytest.fixture
def schema_url(postgres_url: str) -> str:
    """A URL on a schema nobody has created yet."""
    schema = f"mk_s{RUN}_{uuid.uuid4().hex[:10]}"
    return services.with_params(postgres_url, schema=schema)


@pytest.fixture
def fresh_redis(request: pytest.FixtureRequest) -> Iterator[str]:
    """A counters URL with a key prefix of its own on the test Redis (or the three-node
    Redis Cluster); its keys go afterwards."""
    import redis

    prefix = f"mkt{RUN}:{uuid.uuid4().hex[:8]}:"
    if request.node.callspec.params.get("counters") == "redis":
        url = services.redis_url()
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
    else:
        url = services.redis_cluster_url()
        client = services.cluster_client(url)
    yield services.with_params(url, prefix=prefix)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def admin(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True)


def spawn(target: Any, args_for: Any) -> list[Any]:
    return processes.spawn(target, args_for, PROCESSES)


# -- 4 processes x 8 threads racing one quota -------------------------------------------------


class FrozenClock:
    def __call__(self) -> float:
        return float(T0 + 30)


def _race_quota(url: str, counters: str | None, barrier: Any, results: Any) -> None:
    try:
        with Meter(url, counters=counters, clock=FrozenClock()) as m:
            admitted: list[int] = []
            lock = threading.Lock()
            threads_ready = threading.Barrier(THREADS)

            def work() -> None:
                threads_ready.wait()
                mine = 0
                for _ in range(6):
                    if m.check(ORG, {"tokens": 1}).allowed:
                        mine += 1
                with lock:
                    admitted.append(mine)

            workers = [threading.Thread(target=work) for _ in range(THREADS)]
            barrier.wait(60)  # every process connected and ready: now race
            for w in workers:
                w.start()
            for w in workers:
                w.join(120)
            results.put(sum(admitted))
    except BaseException as exc:  # reported to the parent, which fails the test
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("counters", ["postgres", "redis", "redis-cluster"])
def test_processes_and_threads_racing_one_quota_admit_exactly_the_limit(
    request: pytest.FixtureRequest, schema_url: str, counters: str
) -> None:
    limit = 61
    counters_url = request.getfixturevalue("fresh_redis") if counters != "postgres" else None
    with Meter(schema_url, counters=counters_url, clock=FrozenClock()) as m:
        m.set_plan(Plan("race", limits={"tokens": limit}))
        m.assign_plan(ORG, "race")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    admitted = spawn(_race_quota, lambda i: (schema_url, counters_url, barrier))
    assert sum(admitted) == limit, f"admitted per process: {admitted}"
    with Meter(schema_url, counters=counters_url, clock=FrozenClock()) as m:
        assert m.quotas.used(ORG, "tokens") == limit
        # Every admitted request was recorded once as an event in PostgreSQL, none twice.
        recorded = m.total("tokens", "tokens", organization_id=ORG, start_time=T0, end_time=T0 + 60)
        assert recorded == limit


# -- concurrent first-time schema creation ----------------------------------------------------


def _open_fresh(url: str, k: int, barrier: Any, results: Any) -> None:
    try:
        store = open_store(url)
        barrier.wait(60)
        spec = Meter("memory://").spec("completions")
        store.ensure_meter(spec)  # the first call: migrations, then the meter's table
        new = store.append(
            [Event(f"e{k}", "completions", "org", T0, {"input_tokens": k}, {"model": "m"})]
        )
        results.put(len(new))
        store.close()
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_creating_one_schema_at_once(schema_url: str, postgres_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    assert spawn(_open_fresh, lambda k: (schema_url, k, barrier)) == [1] * PROCESSES
    schema = schema_url.rsplit("schema=", 1)[1]
    with admin(postgres_url) as conn:
        versions = conn.execute(
            f'SELECT version FROM "{schema}".mk_schema_migrations ORDER BY version'
        ).fetchall()
        assert versions == [(v,) for v, _, _ in MIGRATIONS]
        secrets = conn.execute(
            f"SELECT count(*) FROM \"{schema}\".mk_meta WHERE key = 'cursor_secret'"
        ).fetchone()
        assert secrets == (1,), "one cursor secret, shared by every process"
    store = open_store(schema_url)
    try:
        store.ensure_meter(Meter("memory://").spec("completions"))
        events = list(store.scan("completions", "org", 0, MAX_TIME + 1))
        assert sorted(e.id for e in events) == [f"e{k}" for k in range(PROCESSES)]
    finally:
        store.close()


# -- a killed connection in the middle of a batch ---------------------------------------------


def stored_ids(store: Store, meter: str) -> set[str]:
    return {e.id for e in store.scan(meter, "org", 0, MAX_TIME + 1)}


def test_killed_connection_mid_batch_loses_nothing_and_duplicates_nothing(
    schema_url: str, postgres_url: str
) -> None:
    app = f"mk_midbatch_{uuid.uuid4().hex[:8]}"
    store = open_store(f"{schema_url}&application_name={app}")
    spec = Meter("memory://").spec("tokens")
    try:
        store.ensure_meter(spec)

        def batch(ids: range) -> list[Event]:
            return [Event(f"t{i}", "tokens", "org", T0 + i % 3600, {"tokens": i}) for i in ids]

        acknowledged = batch(range(0, 2000))
        assert len(store.append(acknowledged)) == 2000
        # The retried batch repeats the acknowledged events and adds many new ones: large
        # enough that its INSERTs are still running when the connection is killed.
        retried = batch(range(0, 120_000))
        killed: list[int] = []
        outcome: list[BaseException | int] = []

        def append() -> None:
            try:
                outcome.append(len(store.append(retried)))
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=append)
        with admin(postgres_url) as conn:
            worker.start()
            # Kill every connection of ours that is inserting: the first attempt, and the
            # one retry the store makes on a fresh connection, so the failure reaches us.
            deadline = time.monotonic() + 60
            while worker.is_alive() and time.monotonic() < deadline:
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                    "AND state = 'active' AND (query LIKE 'INSERT%%' OR query LIKE 'WITH%%')",
                    (app,),
                ).fetchall()
                for (pid,) in rows:
                    if pid not in killed:
                        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                        killed.append(pid)
                time.sleep(0.005)
            worker.join(60)
        assert len(killed) >= 1
        (result,) = outcome
        assert isinstance(result, StoreUnavailable), f"the append was not interrupted: {result}"
        assert "terminating connection" in str(result) or "server closed" in str(result)

        # Nothing acknowledged is lost; of the failed batch, all or nothing was stored.
        after_kill = stored_ids(store, "tokens")
        assert {e.id for e in acknowledged} <= after_kill
        assert after_kill in ({e.id for e in acknowledged}, {e.id for e in retried})

        # The application retries the same batch: exactly the missing events are accepted.
        new = store.append(retried)
        assert len(new) == len(retried) - len(after_kill)
        assert {e.id for e in new} == {e.id for e in retried} - after_kill
        assert stored_ids(store, "tokens") == {e.id for e in retried}
        assert store.append(retried) == [], "and a third time, nothing at all"
        with admin(postgres_url) as conn:
            schema = schema_url.rsplit("schema=", 1)[1]
            count, total = conn.execute(
                f'SELECT count(*), sum(v_tokens) FROM "{schema}".events_tokens'
            ).fetchone()
        assert (count, int(total)) == (len(retried), sum(range(120_000)))
        # The rollups went with the events: none of the killed attempt, all of the retry.
        with Meter(schema_url) as meter:
            assert meter.verify_rollups("tokens") == []
            assert meter.total(
                "tokens", "tokens", organization_id="org", start_time=T0, end_time=T0 + 3600
            ) == sum(range(120_000))
    finally:
        store.close()
