"""Leased quota: decisions in memory against blocks taken from shared counters.

Two meters on one store stand for two processes (each meter holds its own leases); the
``kill -9`` test uses a real process. Every test runs on SQLite, PostgreSQL and Redis counters.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from clock import Clock
from meterkit import Meter, Metric, Plan
from meterkit.quotas.leases import ABSORBED, LEASED, STRANDED
from meterkit.recovery import counter_differences, rebuild_counters
from shared_store import OpenShared

T0 = 1_730_419_200 + 3600  # 2024-11-01T01:00:00Z: a month of room either side of the tests
ORG = "org"


def on_plan(meter: Meter, **plan: object) -> None:
    meter.set_plan(Plan("p", **plan))  # type: ignore[arg-type]
    meter.assign_plan(ORG, "p")


def admit_until_refused(meter: Meter, amount: int = 1, most: int = 10_000) -> int:
    admitted = 0
    for _ in range(most):
        decision = meter.check(ORG, {"tokens": amount})
        if not decision.allowed:
            assert decision.refused_by == "tokens"
            return admitted
        admitted += amount
    raise AssertionError("never refused")


def test_leased_decisions_do_not_call_the_store_each_time(open_shared: OpenShared) -> None:
    m = open_shared(Clock(T0))
    on_plan(m, limits={"tokens": 1_000_000})
    assert m.quotas.leases is not None
    for _ in range(500):
        assert m.check(ORG, {"tokens": 1}).allowed
    # Blocks start at 16 units and double with traffic at each report; without reports, 500
    # one-unit decisions take at most 500 / 16 blocks.
    assert m.quotas.leases.takes <= 500 // 16 + 1
    assert m.quotas.used(ORG, "tokens") == 500
    m.flush()
    assert m.total("tokens", "tokens", organization_id=ORG, start_time=T0, end_time=T0 + 1) == 500


def test_exactly_the_limit_across_meters_and_blocks_shrink(open_shared: OpenShared) -> None:
    clock = Clock(T0)
    a, b = open_shared(clock), open_shared(clock)
    on_plan(a, limits={"tokens": 100})
    admitted = 0
    # Interleaved, each keeping what it leased: neither may pass the limit, and together they
    # reach it exactly, because the last blocks are exactly what is asked.
    refused = set()
    while len(refused) < 2:
        for name, m in (("a", a), ("b", b)):
            if name in refused:
                continue
            decision = m.check(ORG, {"tokens": 1})
            if decision.allowed:
                admitted += 1
            else:
                refused.add(name)
            state = decision.state("tokens")
            assert state is not None and state.used <= 100
    assert admitted == 100
    a.flush(), b.flush()
    assert a.quotas.used(ORG, "tokens") == b.quotas.used(ORG, "tokens") == 100
    assert a.counters.counters_read([_period_key(a) + LEASED], now=T0) == [0]


def _period_key(m: Meter) -> str:
    return m.quotas.period_key(ORG, "tokens", m.quotas.period(ORG, T0))


def test_unused_leases_go_back_on_close_and_when_idle(open_shared: OpenShared) -> None:
    clock = Clock(T0)
    # a reports only when the test flushes it: its background flush (every 50 ms) would give
    # its idle lease back while b's store calls near the limit are still running.
    a, b = open_shared(clock, flush_interval=5), open_shared(clock)
    on_plan(a, limits={"tokens": 80})
    assert a.check(ORG, {"tokens": 1}).allowed  # a leases a block: 80 // 8 = 10 units
    assert a.counters.counters_read([_period_key(a) + LEASED], now=T0) == [10]
    # b can have everything but a's unused 9 while a holds them ...
    assert admit_until_refused(b) == 80 - 10
    # ... a gives them back once idle for a flush (its first report keeps them, as it had
    # just used the lease; the next, with nothing used since, returns them) ...
    a.flush()
    a.flush()
    assert b.check(ORG, {"tokens": 9}).allowed
    assert not b.check(ORG, {"tokens": 1}).allowed
    b.flush(), b.flush()
    assert a.counters.counters_read([_period_key(a) + LEASED], now=T0) == [0]
    # ... and on close.
    on_plan(b, limits={"tokens": 200})
    c = open_shared(clock)
    assert c.check(ORG, {"tokens": 1}).allowed
    c.close()
    b.flush()
    assert b.quotas.used(ORG, "tokens") == 81
    assert admit_until_refused(b) == 200 - 81


def test_a_lowered_limit_is_not_exceeded_from_an_old_lease(open_shared: OpenShared) -> None:
    clock = Clock(T0)
    a = open_shared(clock)
    on_plan(a, limits={"tokens": 800})
    assert a.check(ORG, {"tokens": 1}).allowed  # a block of 100 leased under the old limit
    a.set_plan(Plan("p", limits={"tokens": 5}))
    assert not a.check(ORG, {"tokens": 5}).allowed
    assert a.check(ORG, {"tokens": 4}).allowed
    assert not a.check(ORG, {"tokens": 1}).allowed
    a.flush()
    assert a.quotas.used(ORG, "tokens") == 5


def test_rate_limits_lease_per_window(open_shared: OpenShared) -> None:
    clock = Clock(T0)
    a, b = open_shared(clock), open_shared(clock)
    on_plan(a, rate_limit_rpm=24)
    got = 0
    for _ in range(30):
        got += a.check(ORG, {}).allowed + b.check(ORG, {}).allowed
    assert got == 24
    clock.t = T0 + 120  # two windows on: the old one no longer weighs
    a.flush(), b.flush()
    got = sum(a.check(ORG, {}).allowed + b.check(ORG, {}).allowed for _ in range(30))
    assert got == 24


def test_lease_reports_survive_a_failing_store(
    open_shared: OpenShared, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(T0)
    a = open_shared(clock)
    on_plan(a, limits={"tokens": 1000})
    for _ in range(7):
        assert a.check(ORG, {"tokens": 1}).allowed
    counters = a.counters

    def down(*_: object, **__: object) -> object:
        raise RuntimeError("the store went away")

    monkeypatch.setattr(counters, "counters_apply", down)
    monkeypatch.setattr(counters, "counters_settle", down)
    with pytest.raises(RuntimeError):
        a.flush()
    monkeypatch.undo()
    assert a.quotas.used(ORG, "tokens") == 7, "kept for the next report"
    a.flush()
    assert counters.counters_read([_period_key(a)], now=T0) == [7], "counted once"


def test_a_report_whose_answer_was_lost_is_never_counted_twice(
    open_shared: OpenShared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store applied the report, the answer timed out: the next flush sends it again,
    and the store refuses it as already applied (or, where the report shares the events'
    transaction, the whole flush rolled back and is made again)."""
    from meterkit import StoreUnavailable

    clock = Clock(T0)
    a = open_shared(clock)
    on_plan(a, limits={"tokens": 1000})
    for _ in range(7):
        assert a.check(ORG, {"tokens": 1}).allowed
    counters = a.counters
    real = counters.counters_apply
    lost: list[int] = []

    def answer_lost(lines: Any, *, now: int, hold: Any = None) -> Any:
        result = real(lines, now=now, hold=hold)
        if not lost and hold is not None:
            lost.append(1)
            raise StoreUnavailable("the answer timed out")
        return result

    monkeypatch.setattr(counters, "counters_apply", answer_lost)
    with pytest.raises(StoreUnavailable):
        a.flush()
    monkeypatch.undo()
    assert lost
    a.flush()
    assert counters.counters_read([_period_key(a)], now=T0) == [7], "counted once"
    assert counter_differences(a, ORG) == {}
    assert admit_until_refused(a) == 1000 - 7


def test_a_commit_retried_after_its_answer_was_lost_counts_once(
    open_shared: OpenShared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reservation decided in the store (no lease): the store settled it, the answer timed
    out, the caller commits again. The settle marker says it was settled, not expired, so the
    usage is counted once; a hold that did expire still counts its usage on commit."""
    from meterkit import StoreUnavailable

    clock = Clock(T0)
    a = open_shared(clock, leases=False)
    on_plan(a, limits={"tokens": 1000})
    counters = a.counters
    real = counters.counters_settle
    lost: list[int] = []

    def answer_lost(hold_id: str, deltas: Any, *, now: int) -> bool:
        done: bool = real(hold_id, deltas, now=now)
        if not lost:
            lost.append(1)
            raise StoreUnavailable("the answer timed out")
        return done

    reservation = a.reserve(ORG, {"tokens": 100})
    monkeypatch.setattr(counters, "counters_settle", answer_lost)
    with pytest.raises(StoreUnavailable):
        reservation.commit({"tokens": 30})
    reservation.commit({"tokens": 30})
    monkeypatch.undo()
    assert a.quotas.used(ORG, "tokens") == 30, "counted once"
    assert counter_differences(a, ORG) == {}
    expired = a.reserve(ORG, {"tokens": 100}, ttl=60)
    clock.t = T0 + 61  # the hold gave its 100 back
    assert a.quotas.used(ORG, "tokens") == 30
    expired.commit({"tokens": 20})  # the usage still happened
    assert a.quotas.used(ORG, "tokens") == 50
    assert counter_differences(a, ORG) == {}
    assert admit_until_refused(a) == 1000 - 50


def test_a_report_after_the_store_expired_its_hold_counts_nothing_twice(
    open_shared: OpenShared,
) -> None:
    """The holder's clock says its hold lives; another process's clock (an hour on) made the
    store expire it, counting its units as used. The holder's first report must see that,
    and count what it consumed instead of adding it on top."""
    a = open_shared(Clock(T0), flush_interval=5)  # reports only when the test flushes it
    on_plan(a, limits={"tokens": 1000})
    for _ in range(5):
        assert a.check(ORG, {"tokens": 1}).allowed
    b = open_shared(Clock(T0 + 3600))
    assert b.check(ORG, {"tokens": 1}).allowed  # its store call expires a's hold
    a.flush()
    b.flush()
    key = _period_key(a)
    assert a.counters.counters_read([key, key + STRANDED], now=T0 + 3600) == [6, 0]
    assert counter_differences(b, ORG) == {}


def test_a_take_that_waited_for_a_report_uses_the_organizations_current_hold(
    open_shared: OpenShared,
) -> None:
    """A decision waits for the organization's lock while a report gives every lease back
    and forgets the organization: its take must go under the organization's new hold, or the
    old one would expire later holding units nobody reports (and count them as used)."""
    import threading

    clock = Clock(T0)
    m = open_shared(clock, flush_interval=5)
    on_plan(m, limits={"tokens": 1000})
    assert m.check(ORG, {"tokens": 1}).allowed
    leases = m.quotas.leases
    assert leases is not None
    state = leases.state.org(ORG)
    admitted: list[bool] = []
    with state.lock:
        waiting = threading.Thread(
            target=lambda: admitted.append(m.check(ORG, {"tokens": 500}).allowed)
        )
        waiting.start()
        waiting.join(0.2)  # it needs a take: it waits for the lock
        leases.reports.report_locked(state, T0, closing=True)  # gives all back, forgets the org
    waiting.join(30)
    assert admitted == [True]
    m.flush()
    clock.t = T0 + 3600  # every hold written so far has expired
    m.flush(release_leases=True)
    key = _period_key(m)
    assert m.counters.counters_read([key, key + STRANDED], now=clock.t) == [501, 0]
    assert counter_differences(m, ORG) == {}


def test_a_forked_child_starts_without_its_parents_leases(open_shared: OpenShared) -> None:
    clock = Clock(T0)
    a = open_shared(clock)
    on_plan(a, limits={"tokens": 64})
    assert a.check(ORG, {"tokens": 1}).allowed
    assert a.quotas.leases is not None and a.quotas.leases.pending()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        ok = (
            a.quotas.leases is not None
            and not a.quotas.leases.pending()
            and not a.recorder.queued()
        )
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(read)


# -- a lease holder killed mid-race -----------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from meterkit import Event, Meter

    T0 = int(sys.argv[3])
    counters = sys.argv[2] or None
    # No background report during the test: what it consumed after its one report is lost.
    m = Meter(sys.argv[1], counters=counters, clock=lambda: T0, lease_ttl=3600,
              flush_interval=900)
    for i in range(40):
        assert m.check("org", {"tokens": 1}).allowed
    m.flush()
    if sys.argv[4] == "check":
        for i in range(10):
            assert m.check("org", {"tokens": 1}).allowed
    else:  # recorded usage, stored (acknowledged) and charged to the lease, not reported
        m.record_many([Event(f"r{i}", "tokens", "org", T0, {"tokens": 1}) for i in range(10)])
    print("ready", flush=True)
    sys.stdin.readline()  # killed while waiting here
    """
)


def _kill_a_holder(tmp_path: Path, url: str, counters_url: str, mode: str) -> None:
    """Run HOLDER (``check``: 10 decisions after its report; ``record``: 10 tokens recorded
    into its lease) and ``kill -9`` it once it is ready."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    child = subprocess.Popen(
        [sys.executable, str(script), url, counters_url, str(T0), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()


@pytest.mark.slow
def test_a_lease_holder_killed_mid_race_never_causes_over_admission(
    open_shared: OpenShared, tmp_path: Path
) -> None:
    """The holder admits 10 after its last report and dies: its hold's expiry counts every
    unit it held as used, so nobody admits past the limit; the cost is its unused units,
    stranded (under-admitted) for the rest of the period, and counted as such."""
    limit = 800
    clock = Clock(T0)
    survivor = open_shared(clock)
    on_plan(survivor, limits={"tokens": limit})
    url, counters = survivor.url, survivor.counters
    counters_url = "" if counters is survivor.store else counters.url
    _kill_a_holder(tmp_path, url, counters_url, "check")
    key = _period_key(survivor)
    # Reported: the holder's first 40. It still holds its lease: what it took, minus the 40.
    leased = counters.counters_read([key + LEASED], now=T0)[0]
    assert 10 <= leased <= limit // 8, "at most one block (an eighth of the room) is held"
    before = admit_until_refused(survivor, most=limit)
    assert before == limit - 40 - leased
    # Past the hold's expiry (ttl 3600 s) the held units count as used: none is handed on.
    clock.t = T0 + 3601
    survivor.flush()
    assert admit_until_refused(survivor, most=limit) == 0
    admitted = before + 40 + 10  # the survivor's, and all the holder's
    assert admitted <= limit
    assert limit - admitted == leased - 10, "under-admitted by the holder's unused units"
    assert counters.counters_read([key + LEASED, key + STRANDED], now=clock.t) == [0, leased]
    survivor.flush()
    assert survivor.quotas.used(ORG, "tokens") == limit
    # The 10 after the last report were lost with the process (their events were never
    # written): the counter is the events plus the stranded units, as a rebuild makes it.
    day = T0 - T0 % 86400
    recorded = survivor.total(
        "tokens", "tokens", organization_id=ORG, start_time=day, end_time=day + 2 * 86400
    )
    assert recorded == before + 40
    assert counter_differences(survivor, ORG) == {}
    assert rebuild_counters(survivor, ORG)[ORG]["tokens"] == limit


@pytest.mark.slow
def test_a_killed_holders_absorbed_recorded_usage_is_counted_once(
    open_shared: OpenShared, tmp_path: Path
) -> None:
    """The holder records 10 tokens its lease absorbs (stored, not reported) and dies: the
    expiry counts its held units as used, and the counter still equals the events plus the
    stranded units less what the events show already, so ``doctor`` is clean."""
    limit = 800
    clock = Clock(T0)
    survivor = open_shared(clock)
    on_plan(survivor, limits={"tokens": limit})
    counters = survivor.counters
    counters_url = "" if counters is survivor.store else counters.url
    _kill_a_holder(tmp_path, survivor.url, counters_url, "record")
    key = _period_key(survivor)
    leased, absorbed = counters.counters_read([key + LEASED, key + ABSORBED], now=T0)
    assert 0 < absorbed <= 10, "the lease's spare units took what they could"
    assert counter_differences(survivor, ORG) == {}, "while the hold lives"
    before = admit_until_refused(survivor, most=limit)
    assert before == limit - 40 - (10 - absorbed) - leased
    clock.t = T0 + 3601
    survivor.flush()
    assert admit_until_refused(survivor, most=limit) == 0
    assert before + 40 + 10 <= limit
    assert counters.counters_read([key + STRANDED], now=clock.t) == [leased]
    assert counter_differences(survivor, ORG) == {}
    assert rebuild_counters(survivor, ORG)[ORG]["tokens"] == limit


def test_leased_reservations_hold_commit_release_and_expire(open_shared: OpenShared) -> None:
    clock = Clock(T0)
    a, b = open_shared(clock), open_shared(clock)
    on_plan(a, limits={"tokens": 100})
    less = a.reserve(ORG, {"tokens": 30})
    more = a.reserve(ORG, {"tokens": 10})
    gone = a.reserve(ORG, {"tokens": 20})
    abandoned = a.reserve(ORG, {"tokens": 15}, ttl=60)
    assert a.quotas.used(ORG, "tokens") == 75, "held counts as used"
    less.commit({"tokens": 12})
    more.commit({"tokens": 25})  # over the hold: the usage happened, it is counted
    gone.release()
    assert a.quotas.used(ORG, "tokens") == 12 + 25 + 15
    clock.t = T0 + 60  # the abandoned reservation's ttl is over: its 15 go back
    assert a.quotas.used(ORG, "tokens") == 37
    abandoned.commit({"tokens": 4})  # expired: still counted, as usage that happened
    a.flush(release_leases=True)
    assert b.quotas.used(ORG, "tokens") == 41
    assert admit_until_refused(b) == 100 - 41
    b.flush()
    day = T0 - T0 % 86400
    recorded = a.total(
        "tokens", "tokens", organization_id=ORG, start_time=day, end_time=day + 86400
    )
    assert recorded == 100


def test_record_later_validates_now_and_writes_at_the_flush(open_shared: OpenShared) -> None:
    from meterkit import Event, ValidationError

    # The background flush is made rare, and the other meter opened first, so "not yet
    # written" does not race the flusher on a slow machine.
    m = open_shared(Clock(T0), flush_interval=5.0)
    other = open_shared(Clock(T0))
    good = Event("r1", "requests", ORG, T0, {"requests": 1})
    bad = Event("r2", "requests", ORG, T0, {"requests": -1})
    with pytest.raises(ValidationError) as caught:
        m.record_later([good, bad])
    assert caught.value.field == "events[1].values.requests"
    assert m.recorder.queued() == 0, "nothing of a bad batch is queued"
    m.record_later([good])
    day = T0 - T0 % 86400

    def seen(meter: Meter) -> int:
        page = meter.total(
            "requests", "requests", organization_id=ORG, start_time=day, end_time=day + 86400
        )
        return int(page)

    assert seen(other) == 0, "not written before the flush"
    assert seen(m) == 1, "a meter's own queries flush it first"
    m.record_later([good])
    m.flush()
    assert seen(other) == 1, "the same id again changes nothing"


def test_a_check_inside_a_transaction_rolls_back_with_it(tmp_path: Path) -> None:
    # SQLite: Meter.transaction() spans calls there, so a check inside one is decided in the
    # store and commits or rolls back with the rest, as documented.
    with Meter(f"sqlite:///{tmp_path / 't.db'}", clock=Clock(T0)) as m:
        on_plan(m, limits={"tokens": 100})
        with pytest.raises(LookupError), m.transaction():
            assert m.check(ORG, {"tokens": 30}).allowed
            raise LookupError("the work failed")
        m.flush()
        assert m.quotas.used(ORG, "tokens") == 0
        assert m.check(ORG, {"tokens": 100}).allowed


LLM_TOKENS = "completions.input_tokens + completions.output_tokens"


def check_then_record(meters: list[Meter], check: dict[str, int], most: int = 200) -> int:
    """Each meter in turn checks ``check``, then records 1,000 output tokens, until every one
    is refused; the number admitted."""
    admitted, refused = 0, set()
    for _ in range(most):
        for i, m in enumerate(meters):
            if i in refused:
                continue
            if not m.check(ORG, check).allowed:
                refused.add(i)
                continue
            admitted += 1
            m.record("completions", {"output_tokens": 1000}, organization_id=ORG)
        if len(refused) == len(meters):
            return admitted
    raise AssertionError("never refused")


@pytest.mark.parametrize("processes", [1, 3])
def test_recorded_usage_is_charged_to_the_lease_first(
    open_shared: OpenShared, processes: int
) -> None:
    """Check one token, record a thousand: the lease of the first check must not go on
    admitting from room the recorded usage spent (48 were admitted of 20 on SQLite)."""
    clock = Clock(T0)
    metric = Metric.parse("llm_tokens", LLM_TOKENS)
    meters = [open_shared(clock, metrics=[metric]) for _ in range(processes)]
    meters[0].set_plan(Plan("p", limits={"llm_tokens": 20_000}))
    meters[0].assign_plan(ORG, "p")
    # What deciding in the store admits: 19 x 1,001 + 1 <= 20,000 < 20 x 1,001 + 1.
    assert check_then_record(meters, {"llm_tokens": 1}) == 20
    for m in meters:
        m.flush()
    assert meters[0].quotas.used(ORG, "llm_tokens") == 20 * 1001


@pytest.mark.parametrize("processes", [1, 3])
def test_recorded_spend_is_charged_to_the_lease_first(
    open_shared: OpenShared, processes: int
) -> None:
    """A spend limit of 2 cents, output tokens at $10 per million: two requests of 1,000
    tokens spend it (16 were admitted)."""
    clock = Clock(T0)
    meters = [open_shared(clock) for _ in range(processes)]
    meters[0].set_price(
        {
            "meter": "completions",
            "measure": "output_tokens",
            "unit_price": "10",
            "per": 1_000_000,
            "line_item": "output",
            "quantity_unit": "tokens",
        }
    )
    meters[0].set_spend_limit(ORG, 2)
    assert check_then_record(meters, {}) == 2
    for m in meters:
        m.flush()
    # One ledger: the month's spend is the month's costs, to the nano-dollar.
    month = meters[0].spend(ORG)
    costs = meters[0].costs(
        organization_id=ORG, start_time=month.period_start, end_time=month.period_end
    )
    assert month.counted == costs.totals()["usd"] == Decimal("0.02")


def test_usage_recorded_in_a_rolled_back_write_goes_back_to_the_lease(
    open_shared: OpenShared,
) -> None:
    clock = Clock(T0)
    m = open_shared(clock, metrics=[Metric.parse("llm_tokens", LLM_TOKENS)])
    on_plan(m, limits={"llm_tokens": 1_000_000})
    assert m.check(ORG, {"llm_tokens": 1}).allowed  # a block of 16 leased
    leases = m.quotas.leases
    assert leases is not None
    key = m.quotas.period_key(ORG, "llm_tokens", m.quotas.period(ORG, T0))
    unused = leases.unused(key, T0)
    assert unused > 0

    def failing_append(events: object) -> list[object]:
        raise RuntimeError("disk full")

    original = m.store.append
    m.store.append = failing_append  # type: ignore[method-assign, assignment]
    try:
        with pytest.raises(RuntimeError):
            m.record("completions", {"output_tokens": 5}, organization_id=ORG)
    finally:
        m.store.append = original  # type: ignore[method-assign]
    assert leases.unused(key, T0) == unused
    m.record("completions", {"output_tokens": 5}, organization_id=ORG)
    assert leases.unused(key, T0) == unused - 5
    m.flush()
    assert m.quotas.used(ORG, "llm_tokens") == 6
