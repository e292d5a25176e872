"""Deciding: check, reserve and debit, all-or-nothing across every limit that applies.

Every decision is one atomic counters call (:meth:`CounterStore.counters_apply`) over the
period quota of each metric asked for, the gauge limits, the spend limit and the per-minute and
per-day rate limits, or one decision against this process's leases when they cover it
(:mod:`meterkit.quotas.leases`). A refused request debits nothing. Rate limits use a sliding
window counter (O(1) state per key: this window's count and the previous one's, weighted by
how much of it still overlaps the last 60 s / 24 h).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from meterkit.counters import fits
from meterkit.errors import QuotaExceeded, StoreUnavailable, ValidationError
from meterkit.ids import new_id
from meterkit.models import CounterLine, CounterResult, Event, Hold
from meterkit.plans import UNLIMITED
from meterkit.quotas.book import Book
from meterkit.quotas.counting import Counting
from meterkit.quotas.decision import (
    Decision,
    LimitState,
    Policy,
    check_amounts,
    check_count,
    check_org,
    check_ttl,
)
from meterkit.quotas.leases import LEASED, Contended
from meterkit.quotas.limits import Limits, Line
from meterkit.quotas.settle import MARKER_GRACE, Reservation, Settler, queuer, settle_marker
from meterkit.quotas.thresholds import Thresholds
from meterkit.spend import SPEND

if TYPE_CHECKING:
    from meterkit.recorder import Recorder

__all__ = ["Decider"]


class Decider:
    """Check, reserve, debit (see the module)."""

    def __init__(
        self,
        recorder: Recorder,
        book: Book,
        limits: Limits,
        counting: Counting,
        thresholds: Thresholds,
        settler: Settler,
        *,
        policy: Policy = "closed",
    ) -> None:
        self.recorder = recorder
        self.book = book
        self.limits = limits
        self.counting = counting
        self.thresholds = thresholds
        self.settler = settler
        self.counters = counting.counters
        self.leases = counting.leases
        self.policy = policy

    def check(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        *,
        debit: bool = True,
        requests: int = 1,
        dimensions: Mapping[str, Any] | None = None,
        cost: object = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Decision:
        """Admit (and debit) ``amounts`` plus ``requests`` against every limit, or refuse all.

        ``debit=False`` only looks: nothing is counted and a later call may decide otherwise.
        ``cost`` (dollars) or ``price`` (``{meter: {measure: amount}}``, priced now) is the
        request's spend, held to the organization's spend limit with the other limits.
        """
        decision, _ = self.decide(
            organization_id,
            amounts,
            requests,
            debit=debit,
            hold_ttl=None,
            dimensions=dimensions,
            cost=cost,
            price=price,
        )
        return decision

    def reserve(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        *,
        ttl: int = 300,
        requests: int = 1,
        dimensions: Mapping[str, Any] | None = None,
        cost: object = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Reservation:
        """Hold ``amounts`` (and the estimated ``cost`` / ``price``) now; raises
        :class:`QuotaExceeded` if any limit refuses."""
        check_ttl(ttl)
        decision, reservation = self.decide(
            organization_id,
            amounts,
            requests,
            debit=True,
            hold_ttl=ttl,
            dimensions=dimensions,
            cost=cost,
            price=price,
        )
        if reservation is None:
            raise QuotaExceeded(decision)
        return reservation

    def debit(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        *,
        dimensions: Mapping[str, Any] | None = None,
        cost: object = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Decision:
        """Count usage (and its ``cost`` / ``price`` as spend) that already happened, whatever
        the limits say (it is never refused)."""
        org = check_org(organization_id)
        clean = check_amounts(amounts)
        now = self.recorder.now()
        spend = self.book.spend_nano(cost, price, dimensions, now)
        if spend is not None:
            clean[SPEND] = spend
        decision_id = new_id("dbt")

        mode, price = self.limits.charged(self.limits.spend_mode(None, spend, price), spend, price)

        def add() -> Decision:
            lines = self.limits.lines(org, clean, 0, now)  # the plan lookup follows the policy too
            # Usage that happened: charged to this process's leases first, as recorded usage
            # is, so they admit nothing its debit already spent.
            with self.counting.absorbing(), self.counting.one_transaction():
                changes = self.counting.charge(
                    [(ln.counter.key, ln.counter.amount) for ln in lines],
                    now,
                    self.counting.absorbed_journal(),
                )
                added = dict(
                    zip((k for k, _ in changes), self.counters.counters_add(changes, now=now))
                )
                values = [
                    added[ln.counter.key]
                    if ln.counter.key in added
                    else self.counting.read_counted(org, ln.counter.key, now)
                    for ln in lines
                ]
                result = CounterResult(True, tuple(values), tuple(0 for _ in lines))
                decision = self.describe(org, lines, result, now, decision_id)
                self.settler.after_debit(decision, lines, clean, dimensions, now, price, mode)
                return decision

        decision: Decision | None = self.guard(add)
        return decision if decision is not None else Decision(True, org, degraded=True)

    def set_gauge(self, organization_id: str, metric: str, value: int) -> None:
        """Set a gauge metric's current value (e.g. storage recalculated from real assets)."""
        org = check_org(organization_id)
        if not self.book.is_gauge(metric):
            raise ValidationError("metric", f"{metric!r} is not a gauge meter")
        check_count("value", value)
        self.counters.counters_set(
            self.limits.gauge_key(org, metric), value, now=self.recorder.now()
        )

    def used(self, organization_id: str, metric: str, at: int | None = None) -> int:
        """Counted usage of ``metric``: this period's for counters, the current value for gauges."""
        now = self.recorder.now() if at is None else at
        if metric == SPEND:
            return self.counting.spent(organization_id, now)
        if self.book.is_gauge(metric):
            key = self.limits.gauge_key(organization_id, metric)
        else:
            key = self.limits.period_key(
                organization_id, metric, self.book.period(organization_id, now)
            )
        return self.counting.read_counted(organization_id, key, now)

    def guard(self, call: Any) -> Any:
        try:
            return call()
        except StoreUnavailable:
            if self.policy == "open":
                return None
            raise

    def decide_local(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        *,
        ttl: int | None = None,
        dimensions: Mapping[str, Any] | None = None,
        cost: object = None,
    ) -> tuple[Decision, Reservation | None] | None:
        """An admitted decision (a reservation with ``ttl``) made without any store I/O, or
        ``None`` when it needs the store: limits not compiled, a lease short of room, a
        refusal to describe. For an event loop: ``None`` means "ask :meth:`check` or
        :meth:`reserve` in a thread". Nothing is consumed when it answers ``None``.
        """
        if self.leases is None:
            return None
        org = check_org(organization_id)
        clean = check_amounts(amounts)
        if ttl is not None:
            check_ttl(ttl)
        now = self.recorder.now()
        if self.limits.compiled(org, now) is None:
            return None
        c = self.limits.compile(org, now)
        spend = self.book.spend_nano(cost, None, None, now)
        clean = self.limits.with_spend(c, clean, spend)
        mode, price = self.limits.charged(self.limits.spend_mode(c, spend, None), spend, None)
        lines = self.limits.lines(org, clean, 1, now, c)
        if not all(ln.window or ln.period is not None for ln in lines):
            return None
        decision_id = new_id("rsv" if ttl else "dec")
        events = (
            []
            if ttl
            else self.settler.debit_events(decision_id, org, clean, dimensions, now, price)
        )
        result = self.leases.decide_local(
            lines, now, (decision_id, now + ttl) if ttl else None, queuer(self.recorder, events)
        )
        if result is None:
            return None
        return self.from_lease(
            org,
            lines,
            clean,
            result,
            now,
            decision_id,
            dimensions,
            ttl,
            events,
            local=True,
            price=price,
            mode=mode,
        )

    def decide(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        requests: int,
        *,
        debit: bool,
        hold_ttl: int | None,
        dimensions: Mapping[str, Any] | None,
        cost: object = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> tuple[Decision, Reservation | None]:
        org = check_org(organization_id)
        clean = check_amounts(amounts)
        check_count("requests", requests)
        now = self.recorder.now()
        spend = self.book.spend_nano(cost, price, dimensions, now)
        decision_id = new_id("rsv" if hold_ttl else "dec")
        try:
            c = self.limits.compile(org, now)
            clean = self.limits.with_spend(c, clean, spend)
            lines = self.limits.lines(org, clean, requests, now, c)
        except StoreUnavailable:
            if self.policy == "open":
                return self.degraded(org, decision_id, clean, [], hold_ttl, now, dimensions)
            raise
        mode, price = self.limits.charged(self.limits.spend_mode(c, spend, price), spend, price)
        if (
            debit
            and self.leases is not None
            # Inside Meter.transaction() a decision commits (or rolls back) with the rest.
            and not self.recorder.in_transaction()
            and all(ln.window or ln.period is not None for ln in lines)
        ):
            leased = self.leased(
                org, lines, clean, now, decision_id, dimensions, hold_ttl, price, mode
            )
            if leased is not None:
                return leased
        counters = [ln.counter for ln in lines]
        hold = None
        if hold_ttl is not None:
            # The settle marker: 1 while held, 0 once the hold expired, 2 once settled, so a
            # settle sent again after its answer was lost is known as done, not as expired.
            marker = settle_marker(org, decision_id)
            hold = Hold(
                decision_id,
                org,
                (
                    *(
                        (ln.counter.key, ln.counter.amount)
                        for ln in lines
                        if ln.window == 0 and ln.counter.amount
                    ),
                    (marker, 1),
                ),
                now + hold_ttl,
            )
            counters.append(CounterLine(marker, 1, None, now + hold_ttl + MARKER_GRACE))

        described: list[Decision] = []

        def apply() -> CounterResult:
            # The debit and the event that records it commit together where the store can.
            with self.counting.one_transaction():
                result: CounterResult = self.counters.counters_apply(counters, now=now, hold=hold)
                if hold is not None:  # without the settle marker's line
                    result = CounterResult(result.admitted, result.used[:-1], result.previous[:-1])
                if result.admitted and hold_ttl is None:
                    described.append(self.describe(org, lines, result, now, decision_id))
                    self.settler.after_debit(
                        described[0], lines, clean, dimensions, now, price, mode
                    )
                return result

        result = self.guard(apply if debit else lambda: self.peek(counters, now))
        if result is None:
            return self.degraded(org, decision_id, clean, lines, hold_ttl, now, dimensions)
        decision = (
            described[0] if described else self.describe(org, lines, result, now, decision_id)
        )
        if not (decision.allowed and debit) or hold_ttl is None:
            return decision, None
        self.thresholds.from_result(org, lines, result)
        keyed = {ln.metric: ln for ln in lines if ln.window == 0}
        reservation = Reservation(self.settler, decision, clean, keyed, now + hold_ttl, dimensions)
        reservation.spent = (mode, price)
        return decision, reservation

    def leased(
        self,
        org: str,
        lines: list[Line],
        amounts: dict[str, int],
        now: int,
        decision_id: str,
        dimensions: Mapping[str, Any] | None,
        hold_ttl: int | None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
        mode: str | None = None,
    ) -> tuple[Decision, Reservation | None] | None:
        """Decide from this process's leases (``None``: contended, decide in the store).

        A reservation holds its quota units in the leases until it is settled; its debit
        events are queued when it commits.
        """
        assert self.leases is not None
        events = (
            []
            if hold_ttl
            else self.settler.debit_events(decision_id, org, amounts, dimensions, now, price)
        )
        held = (decision_id, now + hold_ttl) if hold_ttl else None
        try:
            result = self.leases.decide(org, lines, now, held, queuer(self.recorder, events))
        except Contended:
            return None
        except StoreUnavailable:
            if self.policy == "open":
                return self.degraded(org, decision_id, amounts, lines, hold_ttl, now, dimensions)
            raise
        self.recorder.start_flusher()
        return self.from_lease(
            org,
            lines,
            amounts,
            result,
            now,
            decision_id,
            dimensions,
            hold_ttl,
            events,
            price=price,
            mode=mode,
        )

    def from_lease(
        self,
        org: str,
        lines: list[Line],
        amounts: dict[str, int],
        result: CounterResult,
        now: int,
        decision_id: str,
        dimensions: Mapping[str, Any] | None,
        hold_ttl: int | None,
        events: list[Event],
        *,
        local: bool = False,
        price: Mapping[str, Mapping[str, Any]] | None = None,
        mode: str | None = None,
    ) -> tuple[Decision, Reservation | None]:
        """The decision a lease made, its thresholds, its queued debit events, and (with
        ``hold_ttl``) its reservation. ``local``: on an event loop, nothing waits on I/O."""
        decision = self.describe(org, lines, result, now, decision_id)
        if not result.admitted:
            return decision, None
        self.thresholds.soon(org, lines, {s.metric: s.used for s in decision.limits}, local)
        if events and not local:
            self.recorder.queue([])  # queued with the consumption; the store may set the pace
        if hold_ttl is None:
            counted = self.limits.counted(lines, amounts, mode)
            self.counting.count_decided(
                org, events, counted, leased=True, local=local, priced=price is not None
            )
            return decision, None
        keyed = {ln.metric: ln for ln in lines if ln.window == 0}
        reservation = Reservation(
            self.settler, decision, amounts, keyed, now + hold_ttl, dimensions
        )
        reservation.leased = True
        reservation.spent = (mode, price)
        return decision, reservation

    def degraded(
        self,
        org: str,
        decision_id: str,
        amounts: dict[str, int],
        lines: Sequence[Line],
        hold_ttl: int | None,
        now: int,
        dimensions: Mapping[str, Any] | None,
    ) -> tuple[Decision, Reservation | None]:
        """Fail open: admit without counting. A reservation holds nothing, but committing it
        counts the actual amounts (its hold is unknown to the store, as if it had expired)."""
        decision = Decision(True, org, degraded=True, id=decision_id)
        if hold_ttl is None:
            return decision, None
        keyed = {ln.metric: ln for ln in lines if ln.window == 0}
        return decision, Reservation(
            self.settler, decision, amounts, keyed, now + hold_ttl, dimensions
        )

    def peek(self, counters: Sequence[CounterLine], now: int) -> CounterResult:
        current = self.counters.counters_read([c.key for c in counters], now=now)
        prev_keys = [c.prev_key or "" for c in counters]
        previous = [
            v if c.prev_key else 0
            for c, v in zip(counters, self.counters.counters_read(prev_keys, now=now))
        ]
        if self.leases is not None:
            # Units leased here are this process's room: only others' leases stand in the way.
            for i, c in enumerate(counters):
                if c.prev_key and c.prev_key.endswith(LEASED):
                    mine = self.leases.consumed(c.key, now)
                    current[i] += mine
                    previous[i] = max(0, previous[i] - self.leases.unused(c.key, now))
                    previous[i] -= min(previous[i], mine)
        admitted = all(fits(c, u, p) for c, u, p in zip(counters, current, previous))
        used = [u + c.amount for c, u in zip(counters, current)] if admitted else current
        return CounterResult(admitted, tuple(used), tuple(previous))

    def describe(
        self, org: str, lines: Sequence[Line], result: CounterResult, now: int, decision_id: str
    ) -> Decision:
        states = []
        refused_by = None
        retry_after = None
        for line, used, prev in zip(lines, result.used, result.previous):
            counter = line.counter
            estimate = used + math.floor(prev * counter.prev_weight)
            limit = UNLIMITED if counter.limit is None else counter.limit
            remaining = UNLIMITED if counter.limit is None else max(0, counter.limit - estimate)
            states.append(
                LimitState(line.metric, counter.amount, estimate, limit, remaining, line.reset_at)
            )
            if not result.admitted and refused_by is None and not fits(counter, used, prev):
                refused_by = line.metric
                retry_after = self.retry_after(line, used, prev, now)
        return Decision(
            result.admitted, org, tuple(states), refused_by, retry_after, id=decision_id
        )

    @staticmethod
    def retry_after(line: Line, current: int, previous: int, now: int) -> int | None:
        counter = line.counter
        if counter.limit is None or counter.amount > counter.limit:
            return None
        if line.window:
            # Step through the next two windows until the sliding estimate has room.
            window = line.window
            start = now - now % window
            for wait in range(1, 2 * window + 1):
                t = now + wait
                if t < start + window:
                    cur, prev = current, previous
                    weight = (window - (t - start)) / window
                else:
                    cur, prev = 0, (current if t < start + 2 * window else 0)
                    weight = (window - (t - start - window)) / window
                if math.floor(prev * weight) + cur + counter.amount <= counter.limit:
                    return wait
            return 2 * window
        if line.reset_at is None:
            return None  # a gauge frees up only when something is removed
        return max(1, line.reset_at - now)
