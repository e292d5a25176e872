"""kill -9 at random moments while 8 threads record batches: the quota counters never leave
the events. After every kill, what ``meterkit doctor`` checks holds — each counter equals a
rebuild from the events — and every acknowledged event is stored.

``MK_KILL_RUNS`` kills per store (default 3; the fault campaign runs 20).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import services
from meterkit import Event, Meter, Plan
from meterkit.countlog import KIND
from meterkit.recovery import counter_differences

T0 = 1_730_419_200
RUNS = int(os.environ.get("MK_KILL_RUNS", "3"))

CHILD = textwrap.dedent(
    """
    import random, sys, threading
    from meterkit import Event, Meter

    T0 = 1_730_419_200
    url, seed, counters = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
    meter = Meter(url, clock=lambda: T0 + 3600, counters=counters)
    lock = threading.Lock()

    def worker(k):
        rng = random.Random(seed * 100 + k)
        for b in range(10_000):
            batch = [
                Event(f"t{k}-{b}-{i}", "tokens", "org", T0 + 60, {"tokens": rng.randint(1, 50)})
                for i in range(rng.randint(1, 20))
            ]
            meter.record_many(batch)
            with lock:  # acknowledged: durable from here on
                sys.stdout.write(" ".join(e.id for e in batch) + "\\n")
                sys.stdout.flush()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    """
)


@attrs.frozen
class Stores:
    """Where the events live, and the counters when apart from them (Redis)."""

    url: str
    counters: str | None = None

    def open(self, at: int = T0 + 3600) -> Meter:
        return Meter(self.url, clock=lambda: at, counters=self.counters)


@pytest.fixture(params=["sqlite", "postgres", "sqlite+redis", "postgres+redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    yield from _stores(request.param, tmp_path)


@pytest.fixture(params=["sqlite+redis", "postgres+redis"])
def apart(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    """Events and counters in two stores, which share no transaction."""
    yield from _stores(request.param, tmp_path)


def _stores(kind: str, tmp_path: Path) -> Iterator[Stores]:
    counters = None
    if kind.endswith("+redis"):
        prefix = f"mkk{uuid.uuid4().hex[:10]}:"
        counters = services.with_params(services.redis_url(), prefix=prefix)
    if kind.startswith("sqlite"):
        yield Stores(f"sqlite:///{tmp_path / 'kill.db'}", counters)
    else:
        base = services.postgres_url()
        schema = f"mk_k{uuid.uuid4().hex[:10]}"
        yield Stores(services.with_params(base, schema=schema), counters)
        services.drop_schemas(base, schema)
    if counters is not None:
        services.clear_redis(services.redis_url(), prefix)


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_counters_equal_to_the_events(stores: Stores) -> None:
    rng = random.Random(20261207)
    with stores.open() as meter:
        meter.set_plan(Plan("p", limits={"tokens": 10**12}))
        meter.assign_plan("org", "p")
    for run in range(RUNS):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, stores.url, str(run), stores.counters or ""],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert child.stdout is not None
        acknowledged: list[str] = []
        kill_after = rng.randint(1, 400)  # batches: the other threads are mid-write anywhere
        for line in child.stdout:
            acknowledged += line.split()
            kill_after -= 1
            if kill_after <= 0:
                child.send_signal(signal.SIGKILL)
                break
        acknowledged += [i for line in child.stdout for i in line.split()]
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL, "the child finished before it was killed"
        with stores.open() as meter:
            meter.store.ensure_meter(meter.spec("tokens"))
            stored = {e.id for e in meter.store.scan("tokens", "org", 0, T0 + 3600)}
            assert set(acknowledged) <= stored, sorted(set(acknowledged) - stored)[:5]
            assert counter_differences(meter, "org") == {}, f"run {run}"


def test_a_failure_between_the_events_and_their_count_stores_neither(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deterministic form of a kill between the two: the process dies counting."""
    events = [Event(f"e{i}", "tokens", "org", T0 + 60, {"tokens": 1000}) for i in range(5)]
    with stores.open() as meter:
        meter.set_plan(Plan("p", limits={"tokens": 6000}))
        meter.assign_plan("org", "p")

        def dies(_events: object) -> None:
            raise RuntimeError("the process dies here")

        monkeypatch.setattr(meter.quotas.counting, "feed", dies)
        with pytest.raises(RuntimeError):
            meter.record_many(events)
        monkeypatch.undo()
        meter.store.ensure_meter(meter.spec("tokens"))
        assert list(meter.store.scan("tokens", "org", 0, T0 + 3600)) == []
        sent_again = meter.record_many(events)
        assert sent_again.accepted == 5
        assert meter.quotas.used("org", "tokens") == 5000
        assert counter_differences(meter, "org") == {}
        assert not meter.check("org", {"tokens": 1001}).allowed


def _on_plan(meter: Meter, tokens: int) -> None:
    """``org`` on a plan of ``tokens`` tokens."""
    meter.set_plan(Plan("p", limits={"tokens": tokens}))
    meter.assign_plan("org", "p")


def _plan(meter: Meter) -> list[Event]:
    _on_plan(meter, 6000)
    return [Event(f"e{i}", "tokens", "org", T0 + 60, {"tokens": 1000}) for i in range(5)]


class Killed(BaseException):
    """The process dies here: nothing after it runs (not even an ``except Exception``)."""


def test_a_kill_after_the_events_commit_before_the_redis_counters_is_replayed(
    apart: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events committed, their counter changes never reached Redis: the next meter on the
    store applies them from the record written with the events."""
    with apart.open() as meter:
        events = _plan(meter)

        def killed(*_args: object, **_kw: object) -> None:
            raise Killed

        monkeypatch.setattr(meter.counters, "counters_apply", killed)
        monkeypatch.setattr(meter.counters, "counters_add", killed)
        with pytest.raises(Killed):
            meter.record_many(events)
        monkeypatch.undo()
        meter.store.ensure_meter(meter.spec("tokens"))
        assert len(list(meter.store.scan("tokens", "org", 0, T0 + 3600))) == 5
        assert len(meter.store.list_records(KIND)) == 1
        meter.recorder.closed = True  # a dead process gives nothing back
    with apart.open() as meter:
        assert meter.quotas.used("org", "tokens") == 0  # nothing applied before a write or flush
        assert counter_differences(meter, "org") == {}
        assert meter.quotas.used("org", "tokens") == 5000
        assert meter.store.list_records(KIND) == []
        assert not meter.check("org", {"tokens": 1001}).allowed


def test_changes_applied_but_not_cleared_before_a_kill_count_once(
    apart: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Applied to Redis, killed before the record was deleted: replaying it (in any number of
    processes) counts nothing twice."""
    with apart.open() as meter:
        events = _plan(meter)
        delete = meter.store.delete_record

        def killed(kind: str, key: str) -> bool:
            if kind == KIND:
                raise Killed
            return bool(delete(kind, key))

        monkeypatch.setattr(meter.store, "delete_record", killed)
        with pytest.raises(Killed):
            meter.record_many(events)
        monkeypatch.undo()
        assert meter.quotas.used("org", "tokens") == 5000
        assert len(meter.store.list_records(KIND)) == 1
        meter.recorder.closed = True  # a dead process gives nothing back
    with apart.open() as one, apart.open() as two:
        assert one.quotas.countlog is not None and two.quotas.countlog is not None
        ((key, data),) = one.store.list_records(KIND)
        assert one.quotas.countlog.replay() == 1
        two.store.put_record(KIND, key, data)  # a second process read it before the delete
        assert two.quotas.countlog.replay() == 1
        assert one.quotas.used("org", "tokens") == 5000
        assert counter_differences(one, "org") == {}


def test_a_kill_between_decisions_events_and_their_lease_report_leaves_the_rule_true(
    apart: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counters apart: a flush stores the leased decisions' events (and counts their units as
    absorbed, in the write-ahead record), then dies before the lease report. Once the hold
    expires, the counter holds every unit it had as used and ``doctor`` is clean."""
    with apart.open() as meter:
        _on_plan(meter, 5000)
        for _ in range(10):
            assert meter.check("org", {"tokens": 7}).allowed
        leases = meter.quotas.leases
        assert leases is not None

        def killed(*_args: object, **_kw: object) -> None:
            raise Killed

        monkeypatch.setattr(leases.reports, "send_report", killed)
        with pytest.raises(Killed):
            meter.flush()
        monkeypatch.undo()
        meter.recorder.closed = True  # a dead process gives nothing back
    with apart.open(at=T0 + 3600 + 3600) as meter:  # the hold expired meanwhile
        meter.store.ensure_meter(meter.spec("tokens"))
        assert len(list(meter.store.scan("tokens", "org", 0, T0 + 7200))) == 10
        assert counter_differences(meter, "org") == {}
        admitted = 0
        while meter.check("org", {"tokens": 1}).allowed:
            admitted += 1
        assert 70 + admitted <= 5000, "nothing handed on"


def test_one_write_of_several_changes_for_one_organization_counts_them_all(
    apart: Stores,
) -> None:
    """A flush that stores a guarded request's events logs two changes of one organization
    (the decision's absorbed units, the request event's count): applied under one marker,
    both count (the second was once refused as already applied)."""
    from meterkit.auth import create_key
    from meterkit.http.metering import Metering, Ticket

    with apart.open() as meter:
        _on_plan(meter, 50)
        token, _ = create_key(meter, "org", "admin", ["usage:read", "usage:write"])
        guard: Metering[str] = Metering(
            meter, authorization=lambda t: f"Bearer {t}", cost={"tokens": 1}
        )
        ticket = guard.begin(token, method="GET", path="/work")
        assert isinstance(ticket, Ticket)
        guard.finish(ticket, status=200, method="GET", route="/work")
        meter.flush()
        assert meter.quotas.used("org", "requests") == 1
        assert counter_differences(meter, "org") == {}


def test_a_report_while_a_write_is_applied_waits_for_its_absorbed_units(
    apart: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded usage charged to a lease: the write committed, its changes not applied yet,
    when the lease is reported (another thread's flush). The report leaves those units for
    the next one, instead of taking them from the absorbed twin before the write adds them
    (which left the twin above the events for good)."""
    from meterkit.countlog import CountLog
    from meterkit.quotas.leases import ABSORBED

    with apart.open() as meter:
        _on_plan(meter, 5000)
        assert meter.check("org", {"tokens": 1}).allowed  # takes a lease with spare units
        leases = meter.quotas.leases
        assert leases is not None
        real = CountLog._apply

        def report_first(self: CountLog, key: str, log: Any, until: int) -> bool:
            leases.report(meter.now())  # a flush in another thread, at the worst moment
            return bool(real(self, key, log, until))

        monkeypatch.setattr(CountLog, "_apply", report_first)
        meter.record("tokens", {"tokens": 5}, organization_id="org", id="r1")
        monkeypatch.undo()
        meter.flush()
        period = meter.quotas.period("org", meter.now())
        key = meter.quotas.period_key("org", "tokens", period)
        assert meter.counters.counters_read([key + ABSORBED], now=meter.now()) == [0]
        assert counter_differences(meter, "org") == {}
        assert meter.quotas.used("org", "tokens") == 6


def test_a_lease_report_waits_for_the_changes_logged_ahead_of_it(
    apart: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counters fail while a flush applies what it logged with the decisions' events: the
    report does not run (it would take from the absorbed twin what was not added yet); the
    next flush applies the record, then reports, and counts once."""
    from meterkit import StoreUnavailable
    from meterkit.quotas.leases import ABSORBED

    with apart.open() as meter:
        _on_plan(meter, 5000)
        for _ in range(4):
            assert meter.check("org", {"tokens": 3}).allowed
        real = meter.counters.counters_apply

        def down(lines: Any, *, now: int, hold: Any = None) -> Any:
            if lines and lines[0].key.startswith("w\x1f"):  # a logged record's marker
                raise StoreUnavailable("Redis down")
            return real(lines, now=now, hold=hold)

        monkeypatch.setattr(meter.counters, "counters_apply", down)
        with pytest.raises(StoreUnavailable):
            meter.flush()
        with pytest.raises(StoreUnavailable):
            meter.flush()  # still down: the report keeps waiting
        monkeypatch.undo()
        meter.flush()
        period = meter.quotas.period("org", meter.now())
        key = meter.quotas.period_key("org", "tokens", period)
        assert meter.counters.counters_read([key + ABSORBED], now=meter.now()) == [0]
        assert meter.quotas.used("org", "tokens") == 12
        assert counter_differences(meter, "org") == {}


@pytest.mark.slow
def test_kill_9_of_the_serving_guard_under_load_leaves_counters_equal_to_the_events(
    tmp_path: Path,
) -> None:
    """``meterkit serve --demo-model`` killed mid-load: its lease reports and the events its
    decisions queued are written together, so no kill leaves one without the other."""
    import threading

    import httpx

    from meterkit.auth import create_key
    from test_server import start_with_retry

    now = T0 + 3600
    db = f"sqlite:///{tmp_path / 'serve.db'}"
    with Meter(db, clock=lambda: now) as meter:
        meter.set_plan(Plan("p", limits={"requests": 10**9, "tokens": 10**12}))
        meter.assign_plan("org", "p")
        token, _ = create_key(meter, "org", "admin", ["usage:read", "usage:write"])
    rng = random.Random(7)
    for run in range(RUNS):
        server = start_with_retry(
            ["serve", "--db", db, "--demo-model", "--now", str(now), "--freeze-clock"],
            tmp_path / f"serve-{run}.log",
            tmp_path,
        )
        answered = threading.Semaphore(0)
        stopping = threading.Event()

        def load(
            server_base: str = server.base,
            stopping: threading.Event = stopping,
            answered: threading.Semaphore = answered,
        ) -> None:
            with httpx.Client(base_url=server_base, timeout=5.0) as client:
                while not stopping.is_set():
                    try:
                        client.post(
                            "/v1/chat/completions",
                            headers={"authorization": f"Bearer {token}"},
                            json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
                        )
                    except httpx.TransportError:
                        return
                    answered.release()

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in range(rng.randint(20, 400)):
            assert answered.acquire(timeout=30), server.logs()
        server.process.kill()
        server.process.wait(timeout=30)
        stopping.set()
        for t in threads:
            t.join(timeout=30)
        with Meter(db, clock=lambda: now) as meter:
            assert counter_differences(meter, "org") == {}, f"run {run}"
