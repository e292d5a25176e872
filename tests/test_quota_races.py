"""Concurrent callers racing one quota: exactly the limit is admitted, never more.

Threads race on the memory store and on SQLite (one shared meter, and one meter per thread
on the same file); processes race on one SQLite file. The clock is frozen, so every
admission lands in the same billing period and the same rate-limit window.
"""

from __future__ import annotations

import multiprocessing
import random
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clock import Clock
from meterkit import Meter, Plan, QuotaExceeded

T0 = 1710072000  # 2024-03-10 12:00:00 UTC: the start of a minute
ORG = "org_race"
THREADS = 8
ROUNDS = 5


def tokens_recorded(meter: Meter, org: str = ORG) -> int:
    day = T0 - T0 % 86400
    page = meter.usage("tokens", organization_id=org, start_time=day, end_time=day + 86400)
    return sum(int(r.values["tokens"] or 0) for b in page.data for r in b.results)


def run_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` in ``count`` threads released together; re-raise the first error."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a racing thread did not finish"
    if errors:
        raise errors[0]
    return results


@pytest.fixture(autouse=True)
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads far more often than the default 5 ms, so the races interleave finely."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


class Meters:
    """``meters()`` gives the meter a racing thread should use, all on one store;
    ``meters.checker()`` one that sees what every one of them decided (they flushed)."""

    def __init__(self, make: Callable[[], Meter], opened: list[Meter]) -> None:
        self.make = make
        self.opened = opened

    def __call__(self) -> Meter:
        return self.make()

    def checker(self) -> Meter:
        for meter in self.opened:
            meter.flush(release_leases=True)
        return self.make()


@pytest.fixture(params=["memory", "sqlite-shared", "sqlite-per-thread"])
def meters(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Meters]:
    """The meters of one race (see :class:`Meters`)."""
    clock = Clock(T0)
    opened: list[Meter] = []

    def open_one(url: str) -> Meter:
        meter = Meter(url, clock=clock)
        opened.append(meter)
        return meter

    if request.param == "memory":
        shared = open_one("memory://")
        yield Meters(lambda: shared, opened)
    elif request.param == "sqlite-shared":
        shared = open_one(f"sqlite:///{tmp_path / 'race.db'}")
        yield Meters(lambda: shared, opened)
    else:
        url = f"sqlite:///{tmp_path / 'race.db'}"
        open_one(url)
        lock = threading.Lock()

        def per_thread() -> Meter:
            with lock:
                return open_one(url)

        yield Meters(per_thread, opened)
    for meter in opened:
        meter.close()


def setup_plan(meter: Meter, org: str, **plan: Any) -> None:
    meter.set_plan(Plan("race", **plan))
    meter.assign_plan(org, "race")


def race_to_refusal(meter: Meter, org: str, limit: int, rng: random.Random, top: int) -> int:
    """Ask for 1..top tokens until a request for 1 is refused; the tokens admitted."""
    admitted = 0
    while True:
        amount = rng.randint(1, top)
        decision = meter.check(org, {"tokens": amount})
        state = decision.state("tokens")
        assert state is not None
        assert state.used <= limit
        if decision.allowed:
            admitted += amount
        elif amount == 1:
            # Counters only grow here, so a refused 1 means the limit was reached.
            return admitted


@pytest.mark.slow
@pytest.mark.parametrize("top", [1, 3])
def test_threads_admit_exactly_the_limit(meters: Meters, top: int) -> None:
    limit = 100
    setup_plan(meters(), ORG, limits={"tokens": limit})
    for round_ in range(ROUNDS):
        org = f"{ORG}_{round_}"
        meters().assign_plan(org, "race")

        def work(i: int, org: str = org, round_: int = round_) -> int:
            meter = meters()
            return race_to_refusal(meter, org, limit, random.Random(round_ * 100 + i), top)

        admitted = run_threads(THREADS, work)
        assert sum(admitted) == limit, f"round {round_}: {admitted}"
        checker = meters.checker()
        assert checker.quotas.used(org, "tokens") == limit
        assert tokens_recorded(checker, org) == limit


def test_threads_admit_exactly_the_rate_per_minute(meters: Meters) -> None:
    rpm = 40
    for round_ in range(3):
        org = f"{ORG}_rpm_{round_}"
        setup_plan(meters(), org, rate_limit_rpm=rpm)

        def work(_: int, org: str = org) -> int:
            meter = meters()
            admitted = 0
            for _attempt in range(rpm):
                decision = meter.check(org, {})
                if decision.allowed:
                    admitted += 1
                else:
                    assert decision.refused_by == "rate_limit_rpm"
                    assert decision.retry_after is not None and decision.retry_after >= 1
            return admitted

        # 8 threads x 40 attempts = 320 requests in one frozen minute.
        assert sum(run_threads(THREADS, work)) == rpm


@pytest.mark.slow
def test_reservations_racing_commits_and_releases(meters: Meters) -> None:
    limit = 400
    setup_plan(meters(), ORG, limits={"tokens": limit})

    def work(i: int) -> tuple[int, int]:
        meter = meters()
        rng = random.Random(7000 + i)
        committed = refused = 0
        for _ in range(40):
            held = rng.randint(1, 20)
            try:
                reservation = meter.reserve(ORG, {"tokens": held})
            except QuotaExceeded as exc:
                assert exc.decision.refused_by == "tokens"
                refused += 1
                continue
            how = rng.choice(["less", "exact", "release", "context", "context-error"])
            if how == "less":
                actual = rng.randint(0, held)
                reservation.commit({"tokens": actual})
                committed += actual
            elif how == "exact":
                reservation.commit()
                committed += held
            elif how == "release":
                reservation.release()
            elif how == "context":
                with reservation:
                    pass
                committed += held
            else:
                try:
                    with reservation:
                        raise LookupError("the request failed")
                except LookupError:
                    pass
        return committed, refused

    results = run_threads(THREADS, work)
    committed = sum(c for c, _ in results)
    checker = meters.checker()
    assert checker.quotas.used(ORG, "tokens") == committed
    assert tokens_recorded(checker) == committed
    assert committed <= limit
    # Nothing is held any more: the rest of the limit is free.
    assert checker.check(ORG, {"tokens": limit - committed}, debit=False).allowed
    assert not checker.check(ORG, {"tokens": limit - committed + 1}, debit=False).allowed


# -- processes -----------------------------------------------------------------------------


def process_worker(url: str, limit: int, threads: int, seed: int, start: Any, out: Any) -> None:
    """One process: ``threads`` threads, each on its own meter, race the quota to refusal.

    Every thread of every process opens its meter first, then waits at ``start`` so that
    all of them begin together.
    """
    clock = Clock(T0)
    try:

        def work(i: int) -> int:
            with Meter(url, clock=clock) as meter:
                start.wait(timeout=60)
                return race_to_refusal(meter, ORG, limit, random.Random(seed + i), 1)

        out.put(("ok", run_threads(threads, work)))
    except BaseException as exc:
        out.put(("error", repr(exc)))


@pytest.mark.slow
def test_processes_admit_exactly_the_limit(tmp_path: Path) -> None:
    limit = 150
    processes, threads = 4, 2
    ctx = multiprocessing.get_context("spawn")
    for round_ in range(2):
        url = f"sqlite:///{tmp_path / f'race_{round_}.db'}"
        with Meter(url, clock=Clock(T0)) as meter:
            setup_plan(meter, ORG, limits={"tokens": limit})
        start = ctx.Barrier(processes * threads)
        out = ctx.Queue()
        workers = [
            ctx.Process(target=process_worker, args=(url, limit, threads, 1000 * p, start, out))
            for p in range(processes)
        ]
        for worker in workers:
            worker.start()
        results = [out.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        errors = [r[1] for r in results if r[0] != "ok"]
        assert not errors, errors
        admitted = [n for _, counts in results for n in counts]
        assert len(admitted) == processes * threads
        assert sum(admitted) == limit, f"round {round_}: {admitted}"
        with Meter(url, clock=Clock(T0)) as meter:
            assert meter.quotas.used(ORG, "tokens") == limit
            assert tokens_recorded(meter) == limit
