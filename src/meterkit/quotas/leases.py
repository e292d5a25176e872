"""Leased quota: decisions in memory against blocks of units taken from the shared counters.

A process that decides often against a shared store (SQLite, PostgreSQL, Redis) takes room in
blocks: one atomic :meth:`~meterkit.stores.base.CounterStore.counters_apply` moves a block of
units for every line that needs one into this process's lease, all-or-nothing; decisions then
consume the lease in memory, without a store call.

How the units are counted, for a quota counter ``K``:

- ``K`` holds the units *consumed* (admitted), and ``K`` + :data:`LEASED` the units leased
  out and not consumed yet, by every process. A line fits when ``K + leased + amount`` is
  within the limit, whoever asks: a lease and a direct decision see the same room.
- Each organization's leases in this process are one :class:`~meterkit.models.Hold` on the
  leased counters, rewritten by every take and report in the same atomic call that changes
  the counters. A report (every flush, a few times a second) moves the consumed units from
  the leased counter to ``K`` and gives back leases that went idle.
- A holder killed with ``kill -9`` stops reporting: its hold expires ``ttl`` seconds after its
  last report and counts every unit it still held as consumed (and as :data:`STRANDED`),
  since the holder may have used them: nothing it held is handed to another process, so a
  crash under-admits (by its unused units) and never over-admits (docs/quotas.md).
- Rate-limit windows lease per window: the block is counted in the window at once, and what
  is left unused is given back when the window ends, the lease goes idle or the meter closes.

Blocks adapt to traffic (twice what was consumed in the last interval) and never exceed an
eighth of the room the store reported, so they shrink to **exactly what is asked** as the limit
nears: a race still admits exactly the limit.

Usage *recorded* for a leased line (events whose measures feed a plan metric or spend) is
charged to this process's lease first (:meth:`Leases.absorb`); only what the lease cannot
absorb goes to the shared counter, at once. A process therefore never admits from room its own
recorded usage already spent: in one process, check-then-record admits exactly what deciding in
the store does. Each line remembers the largest usage recorded at once against it; within
:data:`NEAR_REQUESTS` such requests of the limit every block is exactly what is asked, so every
decision there sees the store's count, other processes' recorded usage included.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from meterkit.counters import MAX_COUNTER
from meterkit.errors import ValidationError
from meterkit.models import CounterLine, CounterResult, Hold
from meterkit.quotas.leasestate import (
    ABSORBED,
    FIRST_BLOCK,
    LEASED,
    STEP,
    STRANDED,
    Lease,
    LeaseCounters,
    LeaseState,
    OrgHold,
    lease_hold,
)
from meterkit.quotas.reports import LeaseReports

__all__ = [
    "ABSORBED",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_TTL",
    "LEASED",
    "NEAR_REQUESTS",
    "STEP",
    "STRANDED",
    "Contended",
    "LeaseLine",
    "Leases",
    "check_timing",
]

logger = logging.getLogger("meterkit")

DEFAULT_TTL = 30
"""Seconds a lease is held without a report; a holder stops using it after half of that."""

DEFAULT_FLUSH_INTERVAL = 0.05
"""Seconds between background flushes of queued debit events and lease reports."""


def check_timing(lease_ttl: object, flush_interval: object) -> tuple[int, float]:
    """``(lease_ttl, flush_interval)``, or a ValidationError naming the one that is wrong: a
    lease must be reported several times within its ttl."""
    if isinstance(lease_ttl, bool) or not isinstance(lease_ttl, int) or lease_ttl < 2:
        raise ValidationError("lease_ttl", "must be a whole number of seconds, at least 2")
    if (
        isinstance(flush_interval, bool)
        or not isinstance(flush_interval, (int, float))
        or not 0 < flush_interval <= lease_ttl / 4
    ):
        raise ValidationError(
            "flush_interval", "must be a number of seconds above 0 and at most lease_ttl / 4"
        )
    return lease_ttl, float(flush_interval)


NEAR_REQUESTS = 64
"""Within this many requests of the limit (a request being what it asks plus the largest usage
recorded at once against the line) a lease takes exactly what is asked: no unused units."""
_Ask = tuple[int, int, int, int]  # (need, block, have, line index)


class LeaseLine(Protocol):
    """What a lease needs of one line of a decision."""

    @property
    def counter(self) -> CounterLine: ...

    @property
    def window(self) -> int: ...

    @property
    def reset_at(self) -> int | None: ...


class Contended(Exception):
    """Other threads kept using up the room this decision took: decide in the store."""


class Leases:
    """Every lease one meter holds: decisions against them, and (``reports``) the reports
    that keep the store in step with them."""

    def __init__(self, counters: LeaseCounters, *, ttl: int = DEFAULT_TTL) -> None:
        self.counters = counters
        self.ttl = ttl
        self.takes = 0  # store calls made to take room, for tests and benchmarks
        self.state = LeaseState(counters, ttl)
        self.reports = LeaseReports(self.state)

    def decide(
        self,
        org: str,
        lines: Sequence[LeaseLine],
        now: int,
        reservation: tuple[str, int] | None = None,
        queue: Callable[[], None] | None = None,
    ) -> CounterResult:
        """Admit every line from the leases (taking room where short) or refuse them all.

        With ``reservation`` (its id and expiry), quota units are held for it until
        :meth:`settle`, or until the expiry, when the next report gives them back.
        ``queue`` runs with the consumption (see :meth:`_consume`).
        """
        admitted = self.decide_local(lines, now, reservation, queue)
        if admitted is not None:
            return admitted
        state = self.state.org(org)
        with state.lock:  # one take at a time per organization; decisions go on meanwhile
            if self.state.orgs.get(org) is not state:
                # A report gave everything back and forgot this state while this thread
                # waited: its hold is done with. Take under the organization's current one.
                return self.decide(org, lines, now, reservation, queue)
            for _attempt in range(3):
                with self.state.lock:
                    self.state.expire_reservations(now)
                self.reports.resolve(state, now)
                self.state.recover_lapse(state, now)
                with self.state.lock:
                    admitted = self._consume(lines, now, reservation, queue)
                    if admitted is not None:
                        return admitted
                    stale = False
                    for ln in lines:
                        lease = self.state.leases.get(ln.counter.key)
                        if lease is not None and not lease.usable(ln.counter, now):
                            lease.closing = stale = True
                if stale:
                    # Taken under another limit or too long ago: give it back first, so this
                    # process's own old units do not stand in its way.
                    self.reports.report_locked(state, now, closing=False)
                self._read_steps(lines, now)
                with self.state.lock:
                    leases = [self.state.leases.get(ln.counter.key) for ln in lines]
                    asks = [
                        (*self._ask(ln, lease, now), i)
                        for i, (ln, lease) in enumerate(zip(lines, leases))
                        if lease is None or not lease.room_for(ln.counter, now)
                    ]
                result = self._take(state, lines, asks, now)
                if not result.admitted and any(b > n for n, b, _, _ in asks):
                    if not self._could_fit(lines, asks, result):
                        return self._refusal(lines, leases, asks, result)
                    asks = [(need, need, have, i) for need, _, have, i in asks]
                    result = self._take(state, lines, asks, now)
                if not result.admitted:
                    return self._refusal(lines, leases, asks, result)
        raise Contended()

    def decide_local(
        self,
        lines: Sequence[LeaseLine],
        now: int,
        reservation: tuple[str, int] | None = None,
        queue: Callable[[], None] | None = None,
    ) -> CounterResult | None:
        """Admit from the leases as they are, or ``None`` (nothing consumed) when one is short:
        never a store call, so it may run on an event loop."""
        with self.state.lock:
            return self._consume(lines, now, reservation, queue)

    def _consume(
        self,
        lines: Sequence[LeaseLine],
        now: int,
        reservation: tuple[str, int] | None,
        queue: Callable[[], None] | None = None,
    ) -> CounterResult | None:
        """Every line's amount from its lease, or (when one is short) nothing. Under the lock.
        ``queue`` (the decision's events onto the write queue) runs with the consumption, so
        a report never counts units whose events are not queued, nor the reverse."""
        leases = []
        for ln in lines:
            lease = self.state.leases.get(ln.counter.key)
            if lease is None or not lease.room_for(ln.counter, now):
                return None
            leases.append(lease)
        used = []
        held: list[tuple[Lease, int]] = []
        for ln, lease in zip(lines, leases):
            amount = ln.counter.amount
            lease.unused -= amount
            lease.recent += amount
            if lease.rate:
                pass  # a request counts in its window for good
            elif reservation is not None:
                lease.reserved += amount
                held.append((lease, amount))
            else:
                lease.consumed += amount
            used.append(lease.seen - lease.unused)
        if reservation is not None:
            self.state.reservations[reservation[0]] = (reservation[1], held)
        if queue is not None:
            queue()
        return CounterResult(True, tuple(used), (0,) * len(lines))

    def settle(
        self,
        reservation_id: str,
        actual: dict[str, int] | None,
        queue: Callable[[], None] | None = None,
    ) -> list[tuple[str, int]] | None:
        """Settle a reservation made from leases: ``actual`` units by counter key are consumed
        (``None``: released), the rest goes back to the lease.

        Returns what the leases could not cover (usage over the hold, to be added to the
        counters directly), or ``None`` when the reservation is unknown: settled already, or
        expired and given back.
        """
        with self.state.lock:
            found = self.state.reservations.pop(reservation_id, None)
            if found is None:
                return None
            extra: list[tuple[str, int]] = []
            for lease, amount in found[1]:
                lease.reserved -= amount
                use = 0 if actual is None else actual.pop(lease.key, 0)
                if use <= amount:
                    lease.consumed += use
                    lease.unused += amount - use
                    continue
                lease.consumed += amount
                more = use - amount
                if not lease.closing and lease.unused >= more:
                    lease.unused -= more
                    lease.consumed += more
                else:
                    extra.append((lease.key, more))
            if queue is not None:
                queue()
            return extra

    def absorb(
        self, deltas: Sequence[tuple[str, int]], now: int, *, stored: bool = False
    ) -> tuple[list[tuple[str, int]], list[tuple[Lease, int, int]]]:
        """Charge recorded usage to this process's quota leases first.

        ``deltas`` are ``(counter key, units)`` about to be added to the shared counters.
        Returns what the leases could not absorb (to add to the counters now) and what they
        did absorb, for :meth:`unabsorb` should the write that recorded it roll back.
        ``stored``: the usage's events commit with what is returned (a write's transaction),
        which then counts the absorbed units in :data:`ABSORBED` too; they wait, unreported,
        until :meth:`settle_absorbed` says the write is done.
        """
        rest: list[tuple[str, int]] = []
        taken: list[tuple[Lease, int, int]] = []
        with self.state.lock:
            for key, delta in deltas:
                lease = self.state.leases.get(key)
                if delta < 0 and lease is not None and not lease.rate:
                    # Taken back (a probe, a correction): first from what this process
                    # consumed and has not reported; the store cannot hold it yet.
                    # Not made usable again here: room this process's decisions reuse without
                    # asking would hide what others count meanwhile. The report frees it.
                    back = min(-delta, lease.consumed - lease.pending)
                    lease.consumed -= back
                    lease.returned += back
                    taken.append((lease, -back, 0))
                    delta += back
                elif delta > 0 and (lease is None or not lease.rate):
                    if delta > self.state.recorded.get(key, 0):
                        if len(self.state.recorded) >= 100_000:
                            self.state.recorded.clear()
                            self.state.published.clear()
                        self.state.recorded[key] = delta
                        published = self.state.published.get(key, 0)
                        if delta > published:
                            step = 1 << (delta - 1).bit_length()
                            self.state.published[key] = step
                            rest.append((key + STEP, step - published))
                    if lease is None:
                        pass
                    elif not lease.closing and now < lease.usable_until and lease.unused:
                        use = min(lease.unused, delta)
                        lease.unused -= use
                        lease.consumed += use
                        lease.recent += use
                        if stored and use:
                            lease.pending += use
                            rest.append((key + ABSORBED, use))
                        taken.append((lease, use, use if stored else 0))
                        delta -= use
                if delta:
                    rest.append((key, delta))
        return rest, taken

    def unabsorb(self, taken: Sequence[tuple[Lease, int, int]]) -> None:
        """Give back what :meth:`absorb` charged, for usage that was not stored after all."""
        with self.state.lock:
            for lease, use, pending in taken:
                lease.pending -= pending
                if use > 0:
                    back = min(use, lease.consumed)
                    lease.consumed -= back
                    lease.unused += back
                else:
                    back = min(-use, lease.returned)
                    lease.returned -= back
                    lease.consumed += back

    def settle_absorbed(self, taken: Sequence[tuple[Lease, int, int]]) -> None:
        """The write that stored what :meth:`absorb` charged is done (committed, and its
        counter changes applied): its units are in :data:`ABSORBED` now, for a report to
        count and take back."""
        with self.state.lock:
            for lease, _use, pending in taken:
                if pending:
                    lease.pending -= pending
                    lease.absorbed += pending

    def _read_steps(self, lines: Sequence[LeaseLine], now: int) -> None:
        """Learn the largest usage other processes recorded at once against the quota lines
        about to take a block, unless what this process knows already makes the take exact
        (one read, only for takes that would hold spare units)."""
        keys = []
        with self.state.lock:
            for ln in lines:
                c = ln.counter
                if ln.window or c.limit is None:
                    continue
                if c.limit < NEAR_REQUESTS * (c.amount + self.state.recorded.get(c.key, 0)):
                    continue  # exact already: the store's count decides
                keys.append(c.key)
        if not keys:
            return
        values = self.counters.counters_read([k + STEP for k in keys], now=now)
        with self.state.lock:
            for key, value in zip(keys, values):
                if value > self.state.recorded.get(key, 0):
                    self.state.recorded[key] = value

    def _ask(self, line: LeaseLine, lease: Lease | None, now: int) -> tuple[int, int, int]:
        """``(need, block, have)`` for a short line: the units needed on top of the lease's
        usable ones, and the block to ask for (at least ``need``, an eighth of the room at
        most, exactly ``need`` near the limit)."""
        counter = line.counter
        amount = counter.amount
        if lease is not None and lease.usable(counter, now):
            have = lease.unused
            size = lease.block
            if lease.limit is not None:
                room = lease.limit - lease.seen
                size = min(size, room // 8)
                step = amount + self.state.recorded.get(counter.key, 0)
                if not line.window and room < NEAR_REQUESTS * step:
                    size = 0  # near the limit: exactly what is asked
        else:
            have = 0
            size = min(FIRST_BLOCK * max(amount, 1), MAX_COUNTER // 2)
            if counter.limit is not None:
                size = min(size, counter.limit // 8)
                step = amount + self.state.recorded.get(counter.key, 0)
                if not line.window and counter.limit < NEAR_REQUESTS * step:
                    size = 0  # the whole limit is near
        need = amount - have
        return need, max(need, size), have

    @staticmethod
    def _could_fit(
        lines: Sequence[LeaseLine], asks: Sequence[_Ask], refused: CounterResult
    ) -> bool:
        """Whether exactly what is needed fits where the blocks did not, by the refusal."""
        for j, (need, _, _, i) in enumerate(asks):
            limit = lines[i].counter.limit
            limit = MAX_COUNTER if limit is None else limit
            counted = refused.used[j] + math.floor(refused.previous[j] * _weight(lines[i]))
            if counted + need > limit:
                return False
        return True

    def _take(
        self, state: OrgHold, lines: Sequence[LeaseLine], asks: Sequence[_Ask], now: int
    ) -> CounterResult:
        """One atomic store call taking a block for every short line, all or none."""
        org = state.org
        store_lines = []
        grow: dict[str, int] = {}
        for _need, block, _have, i in asks:
            c = lines[i].counter
            if lines[i].window:
                store_lines.append(attrs.evolve(c, amount=block))
            else:
                # Without a limit the counter's ceiling still bounds consumed + leased.
                limit = MAX_COUNTER if c.limit is None else c.limit
                store_lines.append(CounterLine(c.key + LEASED, block, limit, None, c.key, 1.0))
                grow[c.key] = grow.get(c.key, 0) + block
        hold = None
        starting = False
        if grow:
            with self.state.lock:
                amounts = self.state.held(org)
            for key, block in grow.items():
                amounts[key + LEASED] = amounts.get(key + LEASED, 0) + block
            # The report counter outlives the hold it numbers, and the hold's expiry resets
            # it to 0; a new hold starts it at 1, so an expiry is always seen by a report.
            until = now + 4 * self.ttl
            starting = state.seq == 0
            amounts[state.seq_key] = 1 if starting else state.seq
            hold = Hold(state.hold_id, org, lease_hold(amounts), now + self.ttl)
            store_lines.append(
                CounterLine(state.seq_key, int(starting), 1 if starting else None, until)
            )
        self.takes += 1
        result = self.counters.counters_apply(store_lines, now=now, hold=hold)
        if not result.admitted:
            if starting and result.used[-1] >= 1:
                # A take whose answer was lost started the count already: go on from it.
                state.seq = result.used[-1]
                return self._take(state, lines, asks, now)
            return result
        with self.state.lock:
            if starting:
                state.seq = 1
            for j, (_need, block, _have, i) in enumerate(asks):
                line = lines[i]
                c = line.counter
                lease = self.state.leases.get(c.key)
                ends = line.reset_at if line.reset_at is not None else now + self.ttl
                if lease is None or not lease.usable(c, now):
                    if lease is not None:
                        # Another limit, or lapsed: its units go back at the next report.
                        lease.closing = True
                        self.state.leases[f"{c.key}\x1f{uuid.uuid4().hex}"] = lease
                    lease = Lease(c.key, org, c.limit, bool(line.window), ends, ends)
                    self.state.leases[c.key] = lease
                lease.unused += block
                # Used up before a report: the traffic outgrew the block, so the next doubles.
                lease.block = min(max(lease.block, block) * 2, MAX_COUNTER // 2)
                if not lease.rate:
                    lease.taken += block
                lease.seen = result.used[j] + math.floor(result.previous[j] * _weight(line))
                lease.fresh = True
            if hold is not None:
                self.state.held_anew(state, now)
        return result

    def _refusal(
        self,
        lines: Sequence[LeaseLine],
        leases: Sequence[Lease | None],
        asks: Sequence[_Ask],
        refused: CounterResult,
    ) -> CounterResult:
        """The refusal as the decision's own lines describe it: what is counted for each line,
        apart from this process's unused units that could have served it."""
        used: list[int] = []
        previous: list[int] = []
        by_line = {i: (j, have) for j, (_need, _block, have, i) in enumerate(asks)}
        for i, line in enumerate(lines):
            found = by_line.get(i)
            if found is None:
                lease = leases[i]
                used.append(lease.seen - lease.unused if lease is not None else 0)
                previous.append(0)
            elif line.window:
                j, have = found
                used.append(max(0, refused.used[j] - have))
                previous.append(refused.previous[j])
            else:  # the store line was (leased, consumed); the decision line is (consumed, leased)
                j, have = found
                used.append(refused.previous[j])
                previous.append(max(0, refused.used[j] - have))
        return CounterResult(False, tuple(used), tuple(previous))

    def pending(self) -> bool:
        """Whether this process holds any lease (a report would change the store)."""
        return bool(self.state.leases)

    def holding(self) -> bool:
        """Whether this process holds a lease or a hold in the store (closing gives it back)."""
        with self.state.lock:
            return bool(self.state.leases or self.state.orgs)

    def steady(self, org: str) -> threading.Lock:
        """Held, no take or report of ``org`` runs: the store's counters and this process's
        leases can be read together."""
        return self.state.org(org).lock

    def recover(self, org: str, now: int) -> None:
        """When ``org``'s hold expired unreported, count what its leases did consume instead
        of everything it held. The caller holds :meth:`steady`."""
        self.state.recover_lapse(self.state.org(org), now)

    def unreported(self) -> bool:
        """Whether units were consumed that the store does not count yet."""
        with self.state.lock:
            return any(lease.consumed for lease in self.state.leases.values())

    def consumed(self, key: str, now: int) -> int:
        """Units of ``key`` consumed here and not reported yet, and held by open reservations."""
        with self.state.lock:
            self.state.expire_reservations(now)
            return sum(
                ls.consumed + ls.reserved for ls in self.state.leases.values() if ls.key == key
            )

    def unused(self, key: str, now: int) -> int:
        """Units of ``key`` leased here and free to use (counted as leased in the store)."""
        with self.state.lock:
            self.state.expire_reservations(now)
            return sum(ls.unused for ls in self.state.leases.values() if ls.key == key)

    def report(self, now: int, *, closing: bool = False) -> None:
        """Count consumed units, give back idle leases (every lease when ``closing``); see
        :meth:`LeaseReports.report`."""
        self.reports.report(now, closing=closing)

    def reporting(self) -> contextlib.AbstractContextManager[Callable[..., None]]:
        """A report inside a store transaction the caller opens; see
        :meth:`LeaseReports.reporting`."""
        return self.reports.reporting()


def _weight(line: LeaseLine) -> float:
    return line.counter.prev_weight if line.window else 1.0
