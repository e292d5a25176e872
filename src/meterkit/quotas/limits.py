"""Compiling an organization's limits into counter lines, once per period and refresh.

A decision needs, per metric, the counter key, the cap (plan limit times seats, plus valid
credits), when it resets, and for rate limits the sliding window's two keys and weight. They
are computed once per organization (:class:`Compiled`) and kept until the period ends, a grant
starts or ends, or ``cache_seconds`` pass (another process may change the plan).
"""

from __future__ import annotations

import threading
import time as _time
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from meterkit.models import CounterLine
from meterkit.periods import Period
from meterkit.plans import UNLIMITED, Plan
from meterkit.pricing import default_period_of
from meterkit.quotas.book import DEFAULT_CYCLE, Book
from meterkit.quotas.decision import RATE_WINDOWS
from meterkit.quotas.leases import LEASED
from meterkit.spend import SPEND, SpendAlert
from meterkit.validate import MAX_VALUE

__all__ = ["Compiled", "Limits", "Line"]


@attrs.define
class Compiled:
    """An organization's limits as decisions need them, computed once.

    Valid while ``period.start <= now < valid_until`` (the period's end, or the next moment a
    grant starts or ends) and until ``refresh_at`` (monotonic): then the plan, assignment and
    grants are read again, so a change made by another process is seen within the refresh
    bound. ``quota`` memoizes each metric's ``(counter key, cap, reset_at, period)``.
    """

    refresh_at: float
    valid_until: int
    period: Period
    plan: Plan | None
    seats: int
    credits: int  # purchased credits valid over the whole of [period.start, valid_until)
    rates: tuple[tuple[str, int, int], ...]  # (metric, window seconds, requests allowed)
    month: Period  # the UTC calendar month spend is counted in
    spend_cap: int | None  # the spend limit in nano-dollars
    alerts: tuple[SpendAlert, ...]
    quota: dict[str, tuple[str, int | None, int | None, Period | None]] = attrs.field(factory=dict)
    # The lines of recent decisions at ``lines_at`` (a second), by (amounts, requests).
    lines: dict[tuple[tuple[tuple[str, int], ...], int], list[Line]] = attrs.field(factory=dict)
    lines_at: int = -1


@attrs.define
class Line:
    """A counter line and what the decision needs to describe it."""

    metric: str
    counter: CounterLine
    reset_at: int | None
    period: Period | None
    window: int = 0


class Limits:
    """Every organization's compiled limits, and the counter lines of a decision."""

    def __init__(self, book: Book, *, shared: bool) -> None:
        self.book = book
        # Counters other processes share: quota lines count their leased units too.
        self._shared = shared
        self._compiled: dict[str, Compiled] = {}
        self._lock = threading.Lock()
        book.on_forget(self.forget)

    def forget(self) -> None:
        """Drop every compiled organization (the book changed)."""
        with self._lock:
            self._compiled.clear()

    def cached(self, org: str) -> Compiled | None:
        """The organization's compiled limits if any are kept, fresh or not."""
        return self._compiled.get(org)

    def fresh(self, org: str, now: int) -> tuple[Compiled | None, int]:
        """The organization's compiled limits if still good at ``now``, and the generation
        they were looked up at."""
        with self._lock:
            hit = self._compiled.get(org)
        generation = self.book.generation
        if (
            hit is not None
            and _time.monotonic() < hit.refresh_at
            and hit.period.start <= now < hit.valid_until
        ):
            return hit, generation
        return None, generation

    def compile(self, org: str, now: int) -> Compiled:
        """The organization's compiled limits at ``now`` (see :class:`Compiled`)."""
        self.book.metrics_fresh()  # a decision on a stored metric records on the metric's meter
        hit, generation = self.fresh(org, now)
        if hit is not None:
            return hit
        mono = _time.monotonic()
        assignment, plan, grants = self.book.lookup(org)
        cycle = plan.billing_cycle if plan else DEFAULT_CYCLE
        period = cycle.period_at(now)
        month = default_period_of(now)
        limit, alerts = self.book.spending(org)
        valid_until = min(period.end, month.end)
        for g in grants:
            for edge in (g.granted_at, g.expires_at):
                if edge is not None and now < edge < valid_until:
                    valid_until = edge
        credits = sum(g.credits for g in grants if g.valid_at(now))
        rates = tuple(
            (metric, window, getattr(plan, metric))
            for metric, window in RATE_WINDOWS.items()
            if plan is not None and getattr(plan, metric) != UNLIMITED
        )
        compiled = Compiled(
            refresh_at=mono + self.book.cache_seconds,
            valid_until=valid_until,
            period=period,
            plan=plan,
            seats=assignment.seats if assignment else 1,
            credits=credits,
            rates=rates,
            month=month,
            spend_cap=None if limit is None else limit.threshold_nano,
            alerts=tuple(sorted(alerts, key=lambda a: (a.threshold_amount, a.id))),
        )
        with self._lock:
            if self.book.generation == generation:
                self._compiled[org] = compiled
        return compiled

    def limit_for(self, organization_id: str, metric: str, at: int | None = None) -> int:
        """The limit in force for ``metric`` (``-1`` unlimited), purchased credits included."""
        at = self.book.recorder.now() if at is None else at
        _, cap, _, _ = self.quota_line(organization_id, metric, self.compile(organization_id, at))
        return UNLIMITED if cap is None else cap

    def quota_line(
        self, org: str, metric: str, c: Compiled
    ) -> tuple[str, int | None, int | None, Period | None]:
        """One metric's (counter key, cap, reset_at, period), memoized in ``c``."""
        found = c.quota.get(metric)
        if found is None and metric == SPEND:
            found = (self.period_key(org, SPEND, c.month), c.spend_cap, c.month.end, c.month)
            c.quota[metric] = found
        elif found is None:
            limit = UNLIMITED if c.plan is None else c.plan.limit(metric, c.seats)
            if metric == "credits" and limit != UNLIMITED:
                limit += c.credits
            cap = None if limit == UNLIMITED else min(limit, MAX_VALUE)
            if self.book.is_gauge(metric):
                found = (self.gauge_key(org, metric), cap, None, None)
            else:
                found = (self.period_key(org, metric, c.period), cap, c.period.end, c.period)
            c.quota[metric] = found
        return found

    def lines(
        self,
        org: str,
        amounts: dict[str, int],
        requests: int,
        now: int,
        c: Compiled | None = None,
    ) -> list[Line]:
        """The lines of a decision; ``c``: the organization's compiled limits at ``now``, when
        the caller has them already."""
        if c is None:
            c = self.compile(org, now)
        if c.lines_at != now:
            c.lines_at, c.lines = now, {}
        shape = (tuple(amounts.items()), requests)
        found = c.lines.get(shape)
        if found is None:
            found = self.build_lines(org, c, amounts, requests, now)
            if len(c.lines) < 64:
                c.lines[shape] = found
        return found

    def build_lines(
        self, org: str, c: Compiled, amounts: dict[str, int], requests: int, now: int
    ) -> list[Line]:
        lines: list[Line] = []
        shared = self._shared
        for metric, amount in amounts.items():
            key, cap, reset_at, period = self.quota_line(org, metric, c)
            counter = (
                CounterLine(key, amount, cap, None, key + LEASED, 1.0)
                if shared and period is not None
                else CounterLine(key, amount, cap)
            )
            lines.append(Line(metric, counter, reset_at, period))
        if requests:
            for metric, window, rate in c.rates:
                start = now - now % window
                weight = (window - (now - start)) / window
                counter = CounterLine(
                    f"r\x1f{org}\x1f{window}\x1f{start}",
                    requests,
                    rate,
                    expires_at=start + 2 * window,
                    prev_key=f"r\x1f{org}\x1f{window}\x1f{start - window}",
                    prev_weight=weight,
                )
                lines.append(Line(metric, counter, start + window, None, window))
        return lines

    def compiled(self, organization_id: str, now: int) -> Period | None:
        """The billing period of an organization whose limits are compiled and fresh at
        ``now`` (no store read needed to decide), else ``None``."""
        hit, _ = self.fresh(organization_id, now)
        return hit.period if hit is not None else None

    @staticmethod
    def period_key(org: str, metric: str, period: Period) -> str:
        return f"q\x1f{org}\x1f{metric}\x1f{period.start}"

    @staticmethod
    def gauge_key(org: str, metric: str) -> str:
        return f"g\x1f{org}\x1f{metric}"

    def spend_key(self, org: str, at: int) -> str:
        return self.period_key(org, SPEND, default_period_of(at))

    @staticmethod
    def with_spend(c: Compiled, amounts: dict[str, int], spend: int | None) -> dict[str, int]:
        """``amounts`` with the spend line a decision needs. Under a spend limit it is at least
        one nano-dollar, so that a decision without an estimate is refused once the limit is
        reached (an estimate of nothing would always fit)."""
        if c.spend_cap is not None:
            return {**amounts, SPEND: max(spend or 0, 1)}
        return amounts if spend is None else {**amounts, SPEND: spend}

    @staticmethod
    def spend_mode(c: Compiled | None, spend: int | None, price: object) -> str | None:
        """How a decision's spend line is counted: ``"probe"`` (no estimate under a limit: one
        nano-dollar checked, never kept), ``"price"`` (an estimate its priced events replace),
        ``"cost"`` (dollars, kept as given) or ``None`` (no spend line)."""
        if c is not None and c.spend_cap is not None and not spend:
            return "probe"
        if not spend:
            return None
        return "price" if price is not None else "cost"

    @staticmethod
    def charged(
        mode: str | None, spend: int | None, price: Mapping[str, Mapping[str, Any]] | None
    ) -> tuple[str | None, Mapping[str, Mapping[str, Any]] | None]:
        """A spend given in dollars is counted as a charge: priced usage of the built-in
        ``charges`` meter (meterkit.pricing.CHARGES), recorded like any priced estimate, so
        costs bill it too."""
        if mode == "cost" and spend:
            return "price", {"charges": {"nano_usd": spend}}
        return mode, price

    @staticmethod
    def counted(
        lines: Iterable[Line], amounts: Mapping[str, int], mode: str | None
    ) -> dict[str, int]:
        """What a decision counted on its events' behalf, by counter key (see
        :meth:`_count_decided`)."""
        counted: dict[str, int] = {}
        for ln in lines:
            if ln.window or ln.period is None or ln.metric not in amounts:
                continue
            amount = amounts[ln.metric]
            if ln.metric != SPEND:
                counted[ln.counter.key] = amount
            elif mode == "probe":
                counted[ln.counter.key] = -amount
            elif mode == "price":
                counted[ln.counter.key] = amount
        return counted
