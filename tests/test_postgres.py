"""The PostgreSQL store: the conformance suite (hypothesis properties included), the Meter on
top of it, migrations, numbers, clocks and failures.

Needs the server at ``MK_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
Every store opened here lives in a schema of its own, named after this run, and the schemas
are dropped at the end. Unreachable server: skipped, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import itertools
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import services
from clock import Clock
from meterkit import (
    AppendResult,
    Event,
    Meter,
    MeterkitError,
    Plan,
    StoreUnavailable,
    ValidationError,
)
from meterkit.meter import StoreClock, open_store
from meterkit.models import CounterLine, Dimension, Hold, Measure, MeterSpec
from meterkit.stores.base import Store
from meterkit.stores.postgres import MIGRATIONS
from meterkit.testing import T0, StoreConformance, make_query, store_rows
from meterkit.validate import MAX_TIME

pytestmark = pytest.mark.postgres

RUN = uuid.uuid4().hex[:8]
DAY = 86400


class Schemas:
    """Hands out schema-scoped URLs on one server and drops every schema it named."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._n = itertools.count()
        self._by_location: dict[str, str] = {}

    def new(self, **params: str) -> str:
        """A URL whose tables live in a schema nobody has used (created on first use)."""
        return services.with_params(self.url, schema=f"mk_t{RUN}_{next(self._n)}", **params)

    def for_location(self, location: str) -> str:
        """The same schema again for the same location: reopening sees the same data."""
        if location not in self._by_location:
            self._by_location[location] = self.new()
        return self._by_location[location]

    def admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.url, autocommit=True)

    def drop_all(self) -> None:
        services.drop_schemas(self.url, f"mk_t{RUN}\\_")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return services.postgres_url()


@pytest.fixture(scope="module")
def schemas(postgres_url: str) -> Iterator[Schemas]:
    found = Schemas(postgres_url)
    yield found
    found.drop_all()


# -- the conformance suite --------------------------------------------------------------------


class TestPostgresStore(StoreConformance):
    @pytest.fixture(autouse=True)
    def _schemas(self, schemas: Schemas) -> None:
        self.schemas = schemas

    def make_store(self, location: Path) -> Store:
        return open_store(self.schemas.for_location(str(location)))


class TestPostgresStoreCopying(TestPostgresStore):
    """The same suite with every batch copied in through a staging table, as bulk ingest is."""

    def make_store(self, location: Path) -> Store:
        store = open_store(self.schemas.for_location(str(location)))
        store.copy_from = 1  # type: ignore[attr-defined]
        return store


# -- the Meter on PostgreSQL ------------------------------------------------------------------


@pytest.fixture
def url(schemas: Schemas) -> str:
    return schemas.new()


def completion(id: str, tokens: int = 10, *, time: int = T0, org: str = "org_1") -> Event:
    return Event(id, "completions", org, time, {"input_tokens": tokens}, {"batch": False})


def total_tokens(m: Meter, org: str = "org_1") -> int:
    page = m.usage(
        "completions", organization_id=org, start_time=T0, end_time=T0 + 3 * DAY, bucket_width="1d"
    )
    return sum(int(r.values["input_tokens"] or 0) for b in page.data for r in b.results)


def test_two_meters_share_one_database(url: str) -> None:
    with Meter(url) as m1, Meter(url) as m2:
        assert m1.record_many([completion("a"), completion("b", 5)]) == AppendResult(2, 0)
        assert m2.record_many([completion("b", 5), completion("c", 7)]) == AppendResult(1, 1)
        assert total_tokens(m1) == total_tokens(m2) == 10 + 5 + 7
        # A cursor signed by one process is accepted by another: the secret is in the database.
        page = m1.usage(
            "completions",
            organization_id="org_1",
            start_time=T0 - DAY,
            end_time=T0 + 2 * DAY,
            bucket_width="1d",
            limit=1,
        )
        assert page.next_page is not None
        m2.usage(
            "completions",
            organization_id="org_1",
            start_time=T0 - DAY,
            end_time=T0 + 2 * DAY,
            bucket_width="1d",
            limit=1,
            page=page.next_page,
        )


def test_invalid_event_rejects_the_whole_batch(url: str) -> None:
    with Meter(url) as m:
        with pytest.raises(ValidationError):
            m.record_many([completion("g1"), completion("bad", tokens=-1)])
        assert m.record_many([completion("g1")]) == AppendResult(1, 0)


def test_threads_racing_one_store_keep_each_id_once(url: str) -> None:
    results: list[AppendResult] = []
    lock = threading.Lock()
    with Meter(url) as m:
        barrier = threading.Barrier(6)

        def work(k: int) -> None:
            barrier.wait()
            total = AppendResult(0, 0)
            for i in range(0, 120, 15):
                ids = range(k * 40 + i, k * 40 + i + 15)
                total += m.record_many([completion(f"t{n}", n) for n in ids])
            with lock:
                results.append(total)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        distinct = set(range(5 * 40 + 120))
        assert sum(r.accepted for r in results) == len(distinct)
        assert sum(r.duplicates for r in results) == 6 * 120 - len(distinct)
        assert total_tokens(m) == sum(distinct)


def test_quotas_on_postgres_counters(url: str) -> None:
    clock = Clock(T0 + 30)
    with Meter(url, clock=clock) as m:
        m.set_plan(Plan("pro", limits={"tokens": 100, "queries": 3}, rate_limit_rpm=2))
        m.assign_plan("org_q", "pro")
        assert m.check("org_q", {"tokens": 60, "queries": 1}).allowed
        refused = m.check("org_q", {"tokens": 50, "queries": 1})
        assert not refused.allowed and refused.refused_by == "tokens"
        assert m.quotas.used("org_q", "queries") == 1, "a refused request debits nothing"
        assert m.check("org_q", {"tokens": 1}).allowed
        assert m.check("org_q", {"tokens": 1}).refused_by == "rate_limit_rpm"
        clock.t += 60  # next minute: the previous one still weighs half
        with m.reserve("org_q", {"tokens": 30}) as held:
            assert m.quotas.used("org_q", "tokens") == 61 + 30
            held.commit({"tokens": 10})
        assert m.quotas.used("org_q", "tokens") == 71
        assert total_tokens_recorded(m, "org_q") == 71


def total_tokens_recorded(m: Meter, org: str) -> int:
    return int(
        m.total("tokens", "tokens", organization_id=org, start_time=T0 - DAY, end_time=T0 + DAY)
    )


# -- values and names -------------------------------------------------------------------------


ODD = MeterSpec("odd_numbers", (Measure("x"), Measure("top", "max"), Measure("u", "unique_count")))


def test_numbers_round_trip_exactly_and_aggregate_exactly(url: str) -> None:
    store = open_store(url)
    try:
        store.ensure_meter(ODD)
        values = [5e-324, 1e-300, 0.1, 2.0, 1e15 + 0.5, 2**53 - 1, 9007199254740992.0, 0, 3]
        events = [
            Event(f"n{i}", ODD.name, "o", T0 + i, {"x": v, "top": v, "u": v})
            for i, v in enumerate(values)
        ]
        store.append(events)
        got = {e.id: e.values["x"] for e in store.scan(ODD.name, "o", 0, MAX_TIME + 1)}
        for e in events:
            assert type(got[e.id]) is type(e.values["x"]) and got[e.id] == e.values["x"]
        query = make_query(ODD, org="o", start=T0, end=T0 + 60, width="1m")
        (row,) = store_rows(store, ODD, query).values()
        assert row["x"] == pytest.approx(sum(values), rel=1e-12)
        assert type(row["x"]) is float
        assert row["top"] == 9007199254740992.0
        # 2**53 - 1 (int) and 2**53 (float) differ; 2.0 and 2 would not, but 2 is absent.
        assert row["u"] == len(set(values))
    finally:
        store.close()


def test_long_names_are_shortened_without_colliding(url: str) -> None:
    stem = "m" + "x" * 55
    a = MeterSpec(stem + "_aaaaaa", (Measure("v" * 63),), (Dimension("d" * 63),))
    b = MeterSpec(stem + "_bbbbbb", (Measure("v" * 63),), (Dimension("d" * 62 + "e"),))
    store = open_store(url)
    try:
        for spec in (a, b):
            store.ensure_meter(spec)
            dim = spec.dimensions[0].name
            store.append([Event("e", spec.name, "o", T0, {"v" * 63: 1}, {dim: spec.name[-1]})])
        for spec in (a, b):
            (event,) = store.scan(spec.name, "o", 0, MAX_TIME + 1)
            assert event.dimensions == {spec.dimensions[0].name: spec.name[-1]}
    finally:
        store.close()


# -- schema and migrations --------------------------------------------------------------------


def test_migrations_are_recorded_once(schemas: Schemas, url: str) -> None:
    for _ in range(2):
        store = open_store(url)
        store.secret()
        store.close()
    schema = url.split("schema=")[1]
    with schemas.admin() as conn:
        rows = conn.execute(f'SELECT version FROM "{schema}".mk_schema_migrations').fetchall()
    assert rows == [(v,) for v, _, _ in MIGRATIONS]


def test_a_newer_schema_is_refused(schemas: Schemas, url: str) -> None:
    store = open_store(url)
    store.secret()
    store.close()
    schema = url.split("schema=")[1]
    with schemas.admin() as conn:
        conn.execute(
            f'INSERT INTO "{schema}".mk_schema_migrations (version, description) '
            "VALUES (999, 'from the future')"
        )
    store = open_store(url)
    try:
        with pytest.raises(MeterkitError, match="newer than this meterkit"):
            store.get_record("plan", "x")
    finally:
        store.close()


def test_bad_schema_option_is_refused(postgres_url: str) -> None:
    with pytest.raises(MeterkitError, match="schema"):
        open_store(services.with_params(postgres_url, schema="x;drop"))


def test_database_clock(schemas: Schemas, url: str) -> None:
    def server_now() -> float:
        with schemas.admin() as admin:
            row = admin.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        assert row is not None
        return float(row[0])

    store = open_store(url)
    try:
        assert abs(store.db_now() - server_now()) < 5  # type: ignore[attr-defined]
        with Meter(store=store, clock=store.db_now) as m:  # type: ignore[attr-defined]
            assert m.record("completions", {"input_tokens": 1}, organization_id="o")
            (event,) = m.store.scan("completions", "o", 0, MAX_TIME + 1)
            assert abs(event.time - server_now()) < 5
    finally:
        store.close()


def test_database_clock_is_the_default(url: str) -> None:
    with Meter(url) as m:
        # Without a clock of its own, a meter on PostgreSQL decides windows by the database's.
        assert isinstance(m.clock, StoreClock) and m.clock.db_now == m.store.db_now  # type: ignore[attr-defined]
        assert abs(m.now() - m.store.db_now()) < 2  # type: ignore[attr-defined]
    with Meter(url, clock=lambda: 1_730_419_200) as m:
        assert m.now() == 1_730_419_200


# -- failures ---------------------------------------------------------------------------------


def test_unreachable_server_is_store_unavailable_fast(postgres_url: str) -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    dead = "postgresql://postgres@127.0.0.1:1/test?pool_timeout=1&connect_timeout=1"
    store = open_store(dead)  # opening sends nothing yet
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="PostgreSQL store unavailable"):
            store.get_record("plan", "x")
        assert time.monotonic() - started < 5
    finally:
        store.close()
    with Meter(dead, policy="closed") as m, pytest.raises(StoreUnavailable):
        m.check("org", {"tokens": 1})
    with Meter(dead, policy="open") as m:
        decision = m.check("org", {"tokens": 1})
        assert decision.allowed and decision.degraded


def test_an_unreachable_server_costs_no_pool_wait_and_names_its_cause(postgres_url: str) -> None:
    base = postgres_url.rsplit("/", 1)[0]
    cases = {
        "postgresql://postgres@127.0.0.1:1/test": "Connection refused",
        f"{base}/mk_no_such_database": 'database "mk_no_such_database" does not exist',
        base.replace("postgres@", "mk_no_such_role@") + "/test": 'role "mk_no_such_role"',
    }
    for dead, cause in cases.items():
        with Meter(f"{dead}?pool_timeout=1&connect_timeout=1", policy="closed") as m:
            waits: list[float] = []
            pool = m.store.db.pool  # type: ignore[attr-defined]
            connection = pool.connection

            def counted(
                *args: Any, waits: list[float] = waits, connection: Any = connection, **kwargs: Any
            ) -> Any:
                waits.append(1.0)
                return connection(*args, **kwargs)

            pool.connection = counted
            with pytest.raises(StoreUnavailable) as caught:
                m.check("org", {"tokens": 1})  # the clock, then the decision
            # No wait for a pooled connection at all: one direct attempt finds the server
            # unreachable, and the decision after the clock fails at once on that finding.
            assert waits == [], dead
            message = str(caught.value)
            assert cause in message and "\n" not in message, message


def test_statement_timeout_is_store_unavailable(url: str) -> None:
    setup = open_store(url)
    setup.ensure_meter(ODD)
    setup.close()
    schema = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["schema"][0]
    store = open_store(services.with_params(url, options="-cstatement_timeout%3D200"))
    blocker = psycopg.connect(url.split("?", 1)[0])
    try:
        store.ensure_meter(ODD)  # the tables exist: a quick look at the catalog
        # Another transaction holds the table, so the append must wait past the timeout.
        blocker.execute(f'LOCK TABLE "{schema}".events_odd_numbers IN ACCESS EXCLUSIVE MODE')
        events = [Event(f"t{i}", ODD.name, "o", T0, {"x": i}) for i in range(10)]
        with pytest.raises(StoreUnavailable, match="statement timeout"):
            store.append(events)
        blocker.rollback()
        assert list(store.scan(ODD.name, "o", 0, MAX_TIME + 1)) == [], "rolled back entirely"
        assert len(store.append(events)) == 10  # and the store recovers at once
    finally:
        blocker.close()
        store.close()


def test_terminated_connections_are_replaced(schemas: Schemas, url: str) -> None:
    app = f"mk_kill_{uuid.uuid4().hex[:8]}"
    store = open_store(services.with_params(url, application_name=app, pool_min_size="2"))
    try:
        store.put_record("plan", "a", {"n": 1})
        with schemas.admin() as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app,),
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        # No restart, no error: the pool notices the dead connections and opens new ones.
        assert store.get_record("plan", "a") == {"n": 1}
        store.put_record("plan", "b", {"n": 2})
        assert [k for k, _ in store.list_records("plan")] == ["a", "b"]
    finally:
        store.close()


def test_a_decision_in_the_store_is_one_statement(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(url)
    try:
        store.counters_apply([CounterLine("warm", 1)], now=T0)  # the schema exists now
        sent: list[str] = []
        real = psycopg.Cursor.execute

        def counted(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            sent.append(str(query))
            return real(self, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, "execute", counted)
        lines = [
            CounterLine("q\x1fo\x1ftokens", 5, 10, None, "q\x1fo\x1ftokens\x1fleased", 1.0),
            CounterLine("r\x1fo\x1f60\x1f0", 1, 3, T0 + 120, "r\x1fo\x1f60\x1f-60", 0.5),
        ]
        hold = Hold("h1", "o", (("q\x1fo\x1ftokens", 5),), T0 + 30)
        result = store.counters_apply(lines, now=T0, hold=hold)
        assert (result.admitted, result.used, result.previous) == (True, (5, 1), (0, 0))
        assert len(sent) == 1, sent  # one round trip, in autocommit: its own transaction
        assert not store.counters_apply([CounterLine("q\x1fo\x1ftokens", 6, 10)], now=T0).admitted
    finally:
        store.close()
