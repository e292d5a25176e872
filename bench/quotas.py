"""Quota check-and-debit per second: ``Meter.check`` vs the ``limits`` library's ``hit``.

Every meterkit check decides three limits in one atomic, all-or-nothing step — the
``tokens`` quota of the billing period (100 tokens a check), ``rate_limit_rpm`` and
``rate_limit_per_day`` (sliding window counters) — and debits all three; by default
(``record_debits=True``) an admitted check is also recorded as a ``tokens`` event, which is
what ``Meter.check`` does out of the box. Limits are set so high that every check is admitted:
this measures the cost of saying yes.

The baseline is the ``limits`` library on the same machine in the same run: a fixed-window
``hit`` on ``MemoryStorage`` (one limit, one counter); for context also three fixed-window hits
in a row (one per limit, as an application would check three limits with ``limits``: not
atomic, an earlier hit stays counted when a later one refuses), its sliding-window counter
(the algorithm meterkit's rate limits use) and its moving window (one entry per hit: a hit
costs more the more hits the window holds, so each timed slice starts a fresh key).

Every contender runs for ``seconds`` per round, from 1 thread and from ``threads`` threads
(all on one organization, the contended case); rounds rotate the order so other load on the
machine falls on every contender alike; the median of the rounds is reported. Ratios are
meterkit checks/s over ``limits`` fixed-window hits/s: ``1.00x`` is as many decisions per
second, ``0.10x`` a tenth. Correctness guards (not speed assertions): nothing is refused, and
each meter's ``tokens`` counter equals 100 times the checks it admitted.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from limits import (
    RateLimitItem,
    RateLimitItemPerDay,
    RateLimitItemPerMinute,
    RateLimitItemPerMonth,
    storage,
    strategies,
)
from report import fmt_rate, fmt_ratio, median, table

import meterkit
from meterkit import Plan
from meterkit.spend import to_nano
from meterkit.stores.base import CounterStore

__all__ = [
    "AMOUNTS",
    "Contender",
    "LimitsContender",
    "MeterContender",
    "Op",
    "measure",
    "report",
    "run",
    "run_for",
]

Op = Callable[[], bool]
"""One decision; ``True`` when admitted."""

TOKENS = 100
AMOUNTS = {"tokens": TOKENS}
# The spend variants: a limit no run reaches, and each check's estimated cost.
SPEND_LIMIT_CENTS = 900_000_000
COST = Decimal("0.000123")
PLAN = Plan(
    "bench",
    "Bench",
    limits={"tokens": 10**15},
    rate_limit_rpm=10**9,
    rate_limit_per_day=10**12,
)
ONE_LIMIT = Plan("bench1", "Bench, one limit", limits={"tokens": 10**15})
# The same three limits for the `limits` library (its tokens quota: a calendar-ish month).
PER_MINUTE = RateLimitItemPerMinute(10**9)
PER_DAY = RateLimitItemPerDay(10**12)
PER_MONTH = RateLimitItemPerMonth(10**15)
BURST = 4  # calls between two looks at the clock


@dataclass
class Slice:
    calls: int
    refused: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


def _loop(op: Op, deadline: float) -> tuple[int, int, float]:
    calls = refused = 0
    while True:
        for _ in range(BURST):
            if not op():
                refused += 1
        calls += BURST
        now = time.perf_counter()
        if now >= deadline:
            return calls, refused, now


def run_for(op: Op, threads: int, seconds: float) -> Slice:
    """Call ``op`` from ``threads`` threads for about ``seconds``; what got done and how fast."""
    if threads == 1:
        t0 = time.perf_counter()
        calls, refused, end = _loop(op, t0 + seconds)
        return Slice(calls, refused, end - t0)
    start: list[float] = []
    results: list[tuple[int, int, float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads, action=lambda: start.append(time.perf_counter()))

    def worker() -> None:
        barrier.wait()
        out = _loop(op, start[0] + seconds)
        with lock:
            results.append(out)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len(results) == threads, "a worker thread failed"
    return Slice(
        sum(r[0] for r in results),
        sum(r[1] for r in results),
        max(r[2] for r in results) - start[0],
    )


class Contender:
    """Something that answers "may this request go ahead?"; ``op()`` gives a fresh slice's op."""

    name: str
    baseline = False
    calls = 0

    def op(self) -> Op:
        raise NotImplementedError

    def verify(self) -> None:
        """A correctness guard after the runs."""

    def close(self) -> None:
        """Release what the contender holds."""


class MeterContender(Contender):
    """``Meter.check(org, {"tokens": 100})`` against the bench plan: three limits at once."""

    def __init__(
        self,
        name: str,
        url: str,
        organization_id: str,
        *,
        counters: str | CounterStore | None = None,
        record_debits: bool = True,
        plan: Plan = PLAN,
        leases: bool = True,
        cost: Decimal | None = None,
    ) -> None:
        self.name = name
        self.org = organization_id
        self.cost = cost
        self.meter = meterkit.Meter(
            url, counters=counters, record_debits=record_debits, leases=leases
        )
        try:
            self.meter.set_plan(plan)
            self.meter.assign_plan(organization_id, plan.id)
            if cost is not None:
                self.meter.set_spend_limit(organization_id, SPEND_LIMIT_CENTS)
            self.period = self.meter.quotas.period(organization_id).start
            self.base = self.meter.quotas.used(organization_id, "tokens")
            self.spent = self.meter.quotas.spent(organization_id)
            # warm-up, untimed
            decision = self.meter.check(organization_id, AMOUNTS, cost=cost)
            metrics = sorted(s.metric for s in decision.limits)
            assert decision.allowed, decision
            expected = (
                ["tokens"]
                if plan is ONE_LIMIT
                else ["rate_limit_per_day", "rate_limit_rpm", "tokens"]
            )
            if cost is not None:
                expected = sorted([*expected, "spend"])
            assert metrics == expected, metrics
        except BaseException:
            self.meter.close()
            raise
        self.calls = 1

    def op(self) -> Op:
        check, org, cost = self.meter.check, self.org, self.cost
        if cost is not None:
            return lambda: check(org, AMOUNTS, cost=cost).allowed
        return lambda: check(org, AMOUNTS).allowed

    def verify(self) -> None:
        if self.meter.quotas.period(self.org).start != self.period:
            return  # the billing period rolled over during the run: nothing to compare
        used = self.meter.quotas.used(self.org, "tokens") - self.base
        assert used == TOKENS * self.calls, (self.name, used, TOKENS * self.calls)
        if self.cost is not None:
            spent = self.meter.quotas.spent(self.org) - self.spent
            want = to_nano(self.cost) * self.calls
            assert spent == want, (self.name, spent, want)

    def close(self) -> None:
        self.meter.close()


class LimitsContender(Contender):
    """The ``limits`` library: ``hit`` of one item, or of each of several (not atomic)."""

    def __init__(
        self,
        name: str,
        limiter: strategies.RateLimiter,
        items: Sequence[tuple[RateLimitItem, int]],
        identifier: str,
        *,
        baseline: bool = False,
    ) -> None:
        self.name = name
        self.limiter = limiter
        self.items = list(items)
        self.identifier = identifier
        self.baseline = baseline
        self.slices = 0
        assert self.op()()  # warm-up, untimed
        self.calls = 1

    def op(self) -> Op:
        # A fresh key per slice: the moving window keeps one entry per hit, and its cost per
        # hit grows with them; the counters of the other strategies do not care.
        self.slices += 1
        key = f"{self.identifier}-{self.slices}"
        hit = self.limiter.hit
        if len(self.items) == 1:
            item, cost = self.items[0]
            if cost == 1:
                return lambda: hit(item, key)
            return lambda: hit(item, key, cost=cost)
        (a, ca), (b, cb), (c, cc) = self.items
        return lambda: hit(a, key, cost=ca) and hit(b, key, cost=cb) and hit(c, key, cost=cc)


def limits_contenders(
    make_storage: Callable[[], storage.Storage], where: str, identifier: str, *, moving: bool
) -> list[Contender]:
    """The ``limits`` baselines on one kind of storage."""
    fixed = strategies.FixedWindowRateLimiter
    out: list[Contender] = [
        LimitsContender(
            f"limits fixed window hit ({where})",
            fixed(make_storage()),
            [(PER_MINUTE, 1)],
            identifier,
            baseline=True,
        ),
        LimitsContender(
            f"limits fixed window, 3 hits ({where})",
            fixed(make_storage()),
            [(PER_MONTH, TOKENS), (PER_MINUTE, 1), (PER_DAY, 1)],
            identifier,
        ),
        LimitsContender(
            f"limits sliding window counter hit ({where})",
            strategies.SlidingWindowCounterRateLimiter(make_storage()),
            [(PER_MINUTE, 1)],
            identifier,
        ),
    ]
    if moving:
        out.append(
            LimitsContender(
                f"limits moving window hit ({where})",
                strategies.MovingWindowRateLimiter(make_storage()),
                [(PER_MINUTE, 1)],
                identifier,
            )
        )
    return out


def measure(
    contenders: Sequence[Contender], thread_counts: Sequence[int], rounds: int, seconds: float
) -> dict[str, dict[int, list[float]]]:
    """Calls per second of each contender, per thread count, one figure per round.

    Rounds rotate the order of the contenders; a thread count's rounds all run before the
    next thread count's.
    """
    rates: dict[str, dict[int, list[float]]] = {c.name: {} for c in contenders}
    for threads in thread_counts:
        for r in range(rounds):
            k = r % len(contenders)
            for c in [*contenders[k:], *contenders[:k]]:
                s = run_for(c.op(), threads, seconds)
                assert s.refused == 0, f"{c.name}: {s.refused} of {s.calls} refused"
                c.calls += s.calls
                rates[c.name].setdefault(threads, []).append(s.rate)
    return rates


def report(
    title: str,
    contenders: Sequence[Contender],
    rates: dict[str, dict[int, list[float]]],
    thread_counts: Sequence[int],
    unit: str = "checks/s",
) -> dict[str, Any]:
    """Print one table per thread count; the JSON-ready figures and ratios."""
    base = next(c for c in contenders if c.baseline)
    # Three limits against three: meterkit decides 3 limits per check, so the like-for-like
    # twin is one hit per limit (the goal is stated against it).
    three = next((c for c in contenders if "3 hits" in c.name), None)
    out: dict[str, Any] = {"baseline": base.name, "by_threads": {}}
    for threads in thread_counts:
        base_rate = median(rates[base.name][threads])
        three_rate = median(rates[three.name][threads]) if three is not None else None
        head = ["", f"{unit} (median)", "µs each", "min", "max", f"vs {base.name.split(' (')[0]}"]
        if three is not None:
            head.append("vs 3 hits")
        rows: list[tuple[str, ...]] = [tuple(head)]
        figures: dict[str, Any] = {}
        for c in contenders:
            runs = rates[c.name][threads]
            m = median(runs)
            ratio = m / base_rate
            row = [c.name, fmt_rate(m), f"{1e6 / m:,.1f}", fmt_rate(min(runs)), fmt_rate(max(runs))]
            row.append(fmt_ratio(ratio))
            figures[c.name] = {
                "per_s_median": round(m),
                "per_s_runs": [round(x) for x in runs],
                "us_each": round(1e6 / m, 2),
                "ratio_over_baseline": round(ratio, 4),
            }
            if three_rate is not None:
                row.append(fmt_ratio(m / three_rate))
                figures[c.name]["ratio_over_three_hits"] = round(m / three_rate, 4)
            rows.append(tuple(row))
        label = "1 thread" if threads == 1 else f"{threads} threads"
        print(table(f"\n{title}, {label}; median of {len(runs)} rounds", rows), flush=True)
        out["by_threads"][str(threads)] = figures
    return out


def _process_worker(url: str, org: str, threads: int, seconds: float, start: Any, out: Any) -> None:
    """One of the processes sharing the SQLite file: ``threads`` threads checking for
    ``seconds``; puts the checks admitted (or the error)."""
    try:
        meter = meterkit.Meter(url)
        check = meter.check
        meter.check(org, AMOUNTS)  # warm-up, untimed: the plan read, the first lease
        counts = [0] * threads

        def work(i: int) -> None:
            start.wait(60)
            deadline = time.perf_counter() + seconds
            n = 0
            while time.perf_counter() < deadline:
                for _ in range(50):
                    n += check(org, AMOUNTS).allowed
            counts[i] = n

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        meter.close()
        out.put(sum(counts) + 1)
    except BaseException as exc:  # reported to the parent
        out.put(f"{type(exc).__name__}: {exc}")


def processes_figure(
    url: str, processes: int, threads: int, rounds: int, seconds: float
) -> list[float]:
    """Checks/s of ``processes`` x ``threads`` on one file, each round; the counter must equal
    100 tokens per admitted check afterwards."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    org = "org_qp"
    with meterkit.Meter(url) as meter:
        meter.set_plan(PLAN)
        meter.assign_plan(org, PLAN.id)
        base = meter.quotas.used(org, "tokens")
    rates: list[float] = []
    total = 0
    for _ in range(rounds):
        start = ctx.Barrier(processes * threads)
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_process_worker, args=(url, org, threads, seconds, start, out))
            for _ in range(processes)
        ]
        for p in procs:
            p.start()
        got = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
        errors = [g for g in got if isinstance(g, str)]
        assert not errors, errors
        counts = [int(g) for g in got]
        total += sum(counts)
        rates.append((sum(counts) - processes) / seconds)
    with meterkit.Meter(url) as meter:
        used = meter.quotas.used(org, "tokens") - base
    assert used == TOKENS * total, ("processes", used, TOKENS * total)
    return rates


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """memory:// and SQLite (FULL, NORMAL) against ``limits`` on ``MemoryStorage``."""
    threads = sorted({1, args.threads})
    print(
        f"quotas: check-and-debit of 3 limits; {args.rounds} rounds x {args.seconds:g} s per "
        f"contender, {' and '.join(map(str, threads))} thread(s) ...",
        flush=True,
    )
    sqlite_full = work / "quotas-full.db"
    sqlite_normal = work / "quotas-normal.db"
    sqlite_nodebit = work / "quotas-full-nodebit.db"
    sqlite_spend = work / "quotas-full-spend.db"
    contenders: list[Contender] = []
    try:
        contenders += [
            MeterContender("meterkit memory://", "memory://", "org_q0"),
            MeterContender(
                "meterkit memory://, record_debits=False",
                "memory://",
                "org_q1",
                record_debits=False,
            ),
            MeterContender(
                "meterkit memory://, 1 limit (vs 1 hit)", "memory://", "org_q5", plan=ONE_LIMIT
            ),
            MeterContender(
                "meterkit memory://, + spend limit (cost=)", "memory://", "org_q6", cost=COST
            ),
            MeterContender("meterkit SQLite (FULL)", f"sqlite:///{sqlite_full}", "org_q2"),
            MeterContender(
                "meterkit SQLite (FULL), + spend limit (cost=)",
                f"sqlite:///{sqlite_spend}",
                "org_q7",
                cost=COST,
            ),
            MeterContender(
                "meterkit SQLite (FULL), record_debits=False",
                f"sqlite:///{sqlite_nodebit}",
                "org_q3",
                record_debits=False,
            ),
            MeterContender(
                "meterkit SQLite (synchronous=normal)",
                f"sqlite:///{sqlite_normal}?synchronous=normal",
                "org_q4",
            ),
        ]
        contenders += limits_contenders(storage.MemoryStorage, "memory", "org_q", moving=True)
        rates = measure(contenders, threads, args.rounds, args.seconds)
        for c in contenders:
            c.verify()
        result = report("Quota check-and-debit, 3 limits", contenders, rates, threads)
        three = next(c.name for c in contenders if "3 hits" in c.name)
        three_rate = median(rates[three][1])
    finally:
        for c in contenders:
            c.close()
    procs, per = 4, 4
    print(f"quotas: {procs} processes x {per} threads on one SQLite file (FULL) ...", flush=True)
    shared = work / "quotas-processes.db"
    runs = processes_figure(f"sqlite:///{shared}", procs, per, args.rounds, args.seconds * 2)
    m = median(runs)
    rows = [
        ("", "checks/s (median)", "µs each, amortized", "min", "max", "vs 3 hits"),
        (
            f"meterkit SQLite (FULL), {procs} processes x {per} threads",
            fmt_rate(m),
            f"{1e6 / m:,.1f}",
            fmt_rate(min(runs)),
            fmt_rate(max(runs)),
            fmt_ratio(m / three_rate),
        ),
        (three + ", 1 thread", fmt_rate(three_rate), f"{1e6 / three_rate:,.1f}", "", "", "1.00x"),
    ]
    print(table("\nQuota check-and-debit, 3 limits, processes sharing one file", rows), flush=True)
    result["processes"] = {
        "processes": procs,
        "threads_each": per,
        "per_s_median": round(m),
        "per_s_runs": [round(x) for x in runs],
        "us_each_amortized": round(1e6 / m, 2),
        "ratio_over_three_hits": round(m / three_rate, 4),
    }
    result.update(
        {
            "limits": {"tokens": 10**15, "rate_limit_rpm": 10**9, "rate_limit_per_day": 10**12},
            "amounts": AMOUNTS,
            "rounds": args.rounds,
            "seconds_per_round": args.seconds,
        }
    )
    return result
