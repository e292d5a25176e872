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
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import attrs

from meterkit.counters import MAX_COUNTER
from meterkit.errors import StoreUnavailable, ValidationError
from meterkit.models import CounterLine, CounterResult, Hold

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

LEASED = "\x1fleased"
"""Suffix of the counter holding a quota counter's leased, unconsumed units."""

STRANDED = "\x1fstranded"
"""Suffix of the counter holding a quota counter's units stranded by leases that expired
unreported: counted as consumed (its holder may have used them), so never handed to another
process; part of what the counter holds beside the events (see :mod:`meterkit.recovery`)."""

ABSORBED = "\x1fabsorbed"
"""Suffix of the counter holding the units of a quota counter's leases that recorded usage
consumed, stored with its events and not reported yet: the events show them, the counter does
not (it holds the lease's units as leased). Written in the events' own transaction and taken
back by the report that counts them, so ``counter = events + stranded - absorbed`` holds at
every moment, for a holder killed before its report too (see :mod:`meterkit.recovery`)."""

STEP = "\x1fstep"
"""Suffix of the counter holding the largest usage recorded at once against a quota counter,
as every process published it (each its own largest, rounded up to a power of two, summed):
how near the limit a lease must take exactly what is asked, whoever records the usage."""

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


_FIRST_BLOCK = 16

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


class _Counters(Protocol):
    def counters_apply(
        self, lines: Sequence[CounterLine], *, now: int, hold: Hold | None = None
    ) -> CounterResult: ...

    def counters_settle(
        self, hold_id: str, deltas: Sequence[tuple[str, int]], *, now: int
    ) -> bool: ...

    def counters_add(
        self, deltas: Sequence[tuple[str, int]], *, now: int, expires_at: int | None = None
    ) -> list[int]: ...

    def counters_read(self, keys: Sequence[str], *, now: int) -> list[int]: ...


class Contended(Exception):
    """Other threads kept using up the room this decision took: decide in the store."""


@attrs.define(eq=False)
class _Lease:
    """This process's lease on one counter."""

    key: str  # the counter consumption lands on
    org: str
    limit: int | None
    rate: bool  # a rate window: the block is counted in ``key`` at once
    ends: int  # the end of the period or window ``key`` counts
    usable_until: int  # meter clock: half a ttl after the hold was last written, at most ``ends``
    unused: int = 0
    consumed: int = 0  # since the last report (quota leases)
    absorbed: int = 0  # of consumed: recorded usage, counted in ABSORBED with its events
    # Of consumed: recorded usage whose write is under way; reported once it is done (the
    # report would otherwise take from ABSORBED what the write has not added yet).
    pending: int = 0
    reserved: int = 0  # held by open reservations, neither unused nor consumed yet
    returned: int = 0  # consumed, then taken back: freed from the hold at the next report
    taken: int = 0  # what the hold records for this lease (quota leases)
    seen: int = 0  # the counted total at the last take, this lease included
    block: int = _FIRST_BLOCK
    recent: int = 0  # consumed since the last report: sizes the next block
    fresh: bool = True  # taken since the last report
    closing: bool = False  # being given back: decisions no longer use it

    def usable(self, counter: CounterLine, now: int) -> bool:
        return not self.closing and self.limit == counter.limit and now < self.usable_until

    def room_for(self, counter: CounterLine, now: int) -> bool:
        return self.unused >= counter.amount and self.usable(counter, now)


@attrs.define(eq=False)
class _Org:
    """One organization's hold, and the lock that orders its store calls."""

    org: str
    hold_id: str
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    expires_at: int = 0  # of the hold as last written; 0: none in the store
    seq: int = 0  # reports the store applied for this hold (its SEQ counter)
    # A report whose answer was lost (a timeout): what it changes in memory, to run if the
    # store did apply it.
    unsure: Callable[[], None] | None = None

    @property
    def seq_key(self) -> str:
        """The counter numbering this hold's reports: a report applies only when it holds
        exactly ``seq``, so one sent again after a lost answer is never counted twice."""
        return f"s\x1f{self.org}\x1f{self.hold_id}"


_live: weakref.WeakSet[Leases] = weakref.WeakSet()


def _forget_after_fork() -> None:
    # Leases belong to the process that took them: a forked child starts with none, and never
    # gives back (or reports) its parent's units.
    for leases in list(_live):
        leases._reset()


os.register_at_fork(after_in_child=_forget_after_fork)


class Leases:
    """Every lease one meter holds, and the reports that keep the store in step with them."""

    def __init__(self, counters: _Counters, *, ttl: int = DEFAULT_TTL) -> None:
        self.counters = counters
        self.ttl = ttl
        self.takes = 0  # store calls made to take room, for tests and benchmarks
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._orgs: dict[str, _Org] = {}
        # Open reservations: id -> (expires_at, [(lease, units held)]).
        self._reservations: dict[str, tuple[int, list[tuple[_Lease, int]]]] = {}
        # The largest usage recorded at once against each counter key: how far from the limit
        # a lease must stop holding spare units.
        self._recorded: dict[str, int] = {}
        # What this process added to each key's STEP counter.
        self._published: dict[str, int] = {}

    # -- decisions ----------------------------------------------------------------------------

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
        state = self._org(org)
        with state.lock:  # one take at a time per organization; decisions go on meanwhile
            if self._orgs.get(org) is not state:
                # A report gave everything back and forgot this state while this thread
                # waited: its hold is done with. Take under the organization's current one.
                return self.decide(org, lines, now, reservation, queue)
            for _attempt in range(3):
                with self._lock:
                    self._expire_reservations(now)
                self._resolve(state, now)
                self._recover_lapse(state, now)
                with self._lock:
                    admitted = self._consume(lines, now, reservation, queue)
                    if admitted is not None:
                        return admitted
                    stale = False
                    for ln in lines:
                        lease = self._leases.get(ln.counter.key)
                        if lease is not None and not lease.usable(ln.counter, now):
                            lease.closing = stale = True
                if stale:
                    # Taken under another limit or too long ago: give it back first, so this
                    # process's own old units do not stand in its way.
                    self._report_locked(state, now, closing=False)
                self._read_steps(lines, now)
                with self._lock:
                    leases = [self._leases.get(ln.counter.key) for ln in lines]
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
        with self._lock:
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
            lease = self._leases.get(ln.counter.key)
            if lease is None or not lease.room_for(ln.counter, now):
                return None
            leases.append(lease)
        used = []
        held: list[tuple[_Lease, int]] = []
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
            self._reservations[reservation[0]] = (reservation[1], held)
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
        with self._lock:
            found = self._reservations.pop(reservation_id, None)
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
    ) -> tuple[list[tuple[str, int]], list[tuple[_Lease, int, int]]]:
        """Charge recorded usage to this process's quota leases first.

        ``deltas`` are ``(counter key, units)`` about to be added to the shared counters.
        Returns what the leases could not absorb (to add to the counters now) and what they
        did absorb, for :meth:`unabsorb` should the write that recorded it roll back.
        ``stored``: the usage's events commit with what is returned (a write's transaction),
        which then counts the absorbed units in :data:`ABSORBED` too; they wait, unreported,
        until :meth:`settle_absorbed` says the write is done.
        """
        rest: list[tuple[str, int]] = []
        taken: list[tuple[_Lease, int, int]] = []
        with self._lock:
            for key, delta in deltas:
                lease = self._leases.get(key)
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
                    if delta > self._recorded.get(key, 0):
                        if len(self._recorded) >= 100_000:
                            self._recorded.clear()
                            self._published.clear()
                        self._recorded[key] = delta
                        published = self._published.get(key, 0)
                        if delta > published:
                            step = 1 << (delta - 1).bit_length()
                            self._published[key] = step
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

    def unabsorb(self, taken: Sequence[tuple[_Lease, int, int]]) -> None:
        """Give back what :meth:`absorb` charged, for usage that was not stored after all."""
        with self._lock:
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

    def settle_absorbed(self, taken: Sequence[tuple[_Lease, int, int]]) -> None:
        """The write that stored what :meth:`absorb` charged is done (committed, and its
        counter changes applied): its units are in :data:`ABSORBED` now, for a report to
        count and take back."""
        with self._lock:
            for lease, _use, pending in taken:
                if pending:
                    lease.pending -= pending
                    lease.absorbed += pending

    def _expire_reservations(self, now: int) -> None:
        """Reservations nobody settled give their units back at their expiry. Under the lock."""
        for rid, (expires_at, held) in list(self._reservations.items()):
            if expires_at <= now:
                del self._reservations[rid]
                for lease, amount in held:
                    lease.reserved -= amount
                    lease.unused += amount

    def _read_steps(self, lines: Sequence[LeaseLine], now: int) -> None:
        """Learn the largest usage other processes recorded at once against the quota lines
        about to take a block, unless what this process knows already makes the take exact
        (one read, only for takes that would hold spare units)."""
        keys = []
        with self._lock:
            for ln in lines:
                c = ln.counter
                if ln.window or c.limit is None:
                    continue
                if c.limit < NEAR_REQUESTS * (c.amount + self._recorded.get(c.key, 0)):
                    continue  # exact already: the store's count decides
                keys.append(c.key)
        if not keys:
            return
        values = self.counters.counters_read([k + STEP for k in keys], now=now)
        with self._lock:
            for key, value in zip(keys, values):
                if value > self._recorded.get(key, 0):
                    self._recorded[key] = value

    def _ask(self, line: LeaseLine, lease: _Lease | None, now: int) -> tuple[int, int, int]:
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
                step = amount + self._recorded.get(counter.key, 0)
                if not line.window and room < NEAR_REQUESTS * step:
                    size = 0  # near the limit: exactly what is asked
        else:
            have = 0
            size = min(_FIRST_BLOCK * max(amount, 1), MAX_COUNTER // 2)
            if counter.limit is not None:
                size = min(size, counter.limit // 8)
                step = amount + self._recorded.get(counter.key, 0)
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
        self, state: _Org, lines: Sequence[LeaseLine], asks: Sequence[_Ask], now: int
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
            with self._lock:
                amounts = self._held(org)
            for key, block in grow.items():
                amounts[key + LEASED] = amounts.get(key + LEASED, 0) + block
            # The report counter outlives the hold it numbers, and the hold's expiry resets
            # it to 0; a new hold starts it at 1, so an expiry is always seen by a report.
            until = now + 4 * self.ttl
            starting = state.seq == 0
            amounts[state.seq_key] = 1 if starting else state.seq
            hold = Hold(state.hold_id, org, _lease_hold(amounts), now + self.ttl)
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
        with self._lock:
            if starting:
                state.seq = 1
            for j, (_need, block, _have, i) in enumerate(asks):
                line = lines[i]
                c = line.counter
                lease = self._leases.get(c.key)
                ends = line.reset_at if line.reset_at is not None else now + self.ttl
                if lease is None or not lease.usable(c, now):
                    if lease is not None:
                        # Another limit, or lapsed: its units go back at the next report.
                        lease.closing = True
                        self._leases[f"{c.key}\x1f{uuid.uuid4().hex}"] = lease
                    lease = _Lease(c.key, org, c.limit, bool(line.window), ends, ends)
                    self._leases[c.key] = lease
                lease.unused += block
                # Used up before a report: the traffic outgrew the block, so the next doubles.
                lease.block = min(max(lease.block, block) * 2, MAX_COUNTER // 2)
                if not lease.rate:
                    lease.taken += block
                lease.seen = result.used[j] + math.floor(result.previous[j] * _weight(line))
                lease.fresh = True
            if hold is not None:
                self._held_anew(state, now)
        return result

    def _held(self, org: str) -> dict[str, int]:
        """What the organization's hold records now: each quota lease's taken units."""
        amounts: dict[str, int] = {}
        for lease in self._leases.values():
            if lease.org == org and not lease.rate and lease.taken:
                key = lease.key + LEASED
                amounts[key] = amounts.get(key, 0) + lease.taken
        return amounts

    def _held_anew(self, state: _Org, now: int) -> None:
        """The hold was just written: every quota lease of its organization is good for half a
        ttl."""
        state.expires_at = now + self.ttl
        until = now + self.ttl // 2
        for lease in self._leases.values():
            if lease.org == state.org and not lease.rate and not lease.closing:
                lease.usable_until = min(until, lease.ends)

    def _lapse_if_expired(self, state: _Org, now: int) -> list[tuple[_Lease, int, int, int]]:
        """The store expires a hold by counting its units as consumed: they are no longer
        this process's.

        Returns the leases whose count is still to be corrected (by the caller, before its
        next take), as ``(lease, consumed, taken, absorbed)``. Under the lock.
        """
        if not state.expires_at or now < state.expires_at:
            return []
        logger.warning(
            "meterkit: a lease expired before it was reported; its units were counted as used"
        )
        state.expires_at = 0
        state.seq = 0  # the hold's expiry reset its report counter
        lapsed = []
        for lease in self._leases.values():
            if lease.org == state.org and not lease.rate:
                if lease.taken or lease.consumed or lease.reserved:
                    consumed = lease.consumed - lease.pending  # a write under way: later
                    lapsed.append((lease, consumed, lease.taken, lease.absorbed))
                lease.taken = lease.unused = 0
                lease.closing = True
        return lapsed

    def _recover_lapse(self, state: _Org, now: int) -> None:
        """When the organization's hold expired in the store, count what its leases consumed
        and hold again what open reservations hold. Under the organization's lock."""
        with self._lock:
            lapsed = self._lapse_if_expired(state, now)
        if lapsed:
            self._count_lapsed(state, lapsed, now)

    def _count_lapsed(
        self, state: _Org, lapsed: list[tuple[_Lease, int, int, int]], now: int
    ) -> None:
        """The store counted every unit the expired hold held as consumed and stranded: count
        instead what the leases did consume, and hold again what open reservations hold (it
        was admitted). Under the organization's lock."""
        deltas: dict[str, int] = {}
        held: dict[str, int] = {}
        for lease, consumed, taken, absorbed in lapsed:
            for key, delta in (
                (lease.key, consumed - taken),
                (lease.key + STRANDED, -taken),
                (lease.key + ABSORBED, -absorbed),
            ):
                deltas[key] = deltas.get(key, 0) + delta
            if lease.reserved:
                held[lease.key + LEASED] = held.get(lease.key + LEASED, 0) + lease.reserved
        lines = [CounterLine(key, delta) for key, delta in sorted(deltas.items()) if delta]
        lines += [CounterLine(key, amount) for key, amount in held.items()]
        hold = None
        if held:
            # A new hold: its report count starts at 1 (the expired one's was reset to 0).
            held[state.seq_key] = 1
            lines.append(CounterLine(state.seq_key, 1, None, now + 4 * self.ttl))
            hold = Hold(state.hold_id, state.org, _lease_hold(held), now + self.ttl)
        self.counters.counters_apply(lines, now=now, hold=hold)
        with self._lock:
            for lease, c, _taken, absorbed in lapsed:
                lease.consumed -= c
                lease.absorbed -= absorbed
                lease.taken = lease.reserved
            if hold is not None:
                state.expires_at = now + self.ttl
                state.seq = 1

    def _org(self, org: str) -> _Org:
        with self._lock:
            state = self._orgs.get(org)
            if state is None:
                state = self._orgs[org] = _Org(org, f"lse_{uuid.uuid4().hex}")
            return state

    def _refusal(
        self,
        lines: Sequence[LeaseLine],
        leases: Sequence[_Lease | None],
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

    # -- reports ------------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether this process holds any lease (a report would change the store)."""
        return bool(self._leases)

    def holding(self) -> bool:
        """Whether this process holds a lease or a hold in the store (closing gives it back)."""
        with self._lock:
            return bool(self._leases or self._orgs)

    def steady(self, org: str) -> threading.Lock:
        """Held, no take or report of ``org`` runs: the store's counters and this process's
        leases can be read together."""
        return self._org(org).lock

    def recover(self, org: str, now: int) -> None:
        """When ``org``'s hold expired unreported, count what its leases did consume instead
        of everything it held. The caller holds :meth:`steady`."""
        self._recover_lapse(self._org(org), now)

    def unreported(self) -> bool:
        """Whether units were consumed that the store does not count yet."""
        with self._lock:
            return any(lease.consumed for lease in self._leases.values())

    def consumed(self, key: str, now: int) -> int:
        """Units of ``key`` consumed here and not reported yet, and held by open reservations."""
        with self._lock:
            self._expire_reservations(now)
            return sum(ls.consumed + ls.reserved for ls in self._leases.values() if ls.key == key)

    def unused(self, key: str, now: int) -> int:
        """Units of ``key`` leased here and free to use (counted as leased in the store)."""
        with self._lock:
            self._expire_reservations(now)
            return sum(ls.unused for ls in self._leases.values() if ls.key == key)

    def report(self, now: int, *, closing: bool = False) -> None:
        """Count consumed units, give back idle leases (every lease when ``closing``).

        One atomic store call per organization: the counters change and the hold is
        rewritten together, so nothing is ever counted twice or lost by a failure part way.
        """
        with self._lock:
            self._expire_reservations(now)
            orgs = list({lease.org for lease in self._leases.values()})
        for org in orgs:
            state = self._org(org)
            with state.lock:
                self._report_locked(state, now, closing)

    @contextlib.contextmanager
    def reporting(self) -> Iterator[Callable[..., None]]:
        """For a report inside a store transaction the caller opens: every organization's
        lock is taken first (in order: a take holds one and then waits for the store, so the
        store must never be held while waiting for one), then ``report(now, closing,
        snapshot)`` reports them, calling ``snapshot`` at the instant it reads the leases; what
        it changes in memory happens only if the block completes (the transaction
        committed).

        With ``write`` (counters apart from the events), ``write(absorbed)`` runs between
        reading the leases and the report: it stores the events ``snapshot`` took and counts
        ``absorbed`` — ``(organization, counter key + ABSORBED, units)``, what their decisions
        consumed — with them (the write-ahead record), and says whether the record was applied;
        the report then takes those units back from :data:`ABSORBED` as it counts them, once
        the record is applied (else it raises StoreUnavailable and waits for the next flush).
        A kill between leaves the rule true."""
        with self._lock:
            orgs = sorted({lease.org for lease in self._leases.values()})
        states = [self._org(org) for org in orgs]
        done: list[Callable[[], None]] = []
        with contextlib.ExitStack() as stack:
            for state in states:
                stack.enter_context(state.lock)

            def report(
                now: int,
                closing: bool,
                snapshot: Callable[[], None],
                write: Callable[[list[tuple[str, str, int]]], bool] | None = None,
            ) -> None:
                for state in states:
                    self._resolve(state, now)
                    self._recover_lapse(state, now)
                durable = write is not None
                with self._lock:
                    # One instant for the caller's queue and every lease: a decision queues
                    # its events with its consumption (_consume), so the report counts
                    # exactly the units of the events taken.
                    self._expire_reservations(now)
                    snapshot()
                    planned = [
                        self._plan_report(state, now, closing, durable=durable) for state in states
                    ]
                if write is not None:
                    decided = [item for plan in planned for item in plan[3]]
                    applied = write([(lease.org, lease.key + ABSORBED, c) for lease, c in decided])
                    with self._lock:  # stored: ABSORBED holds them (or its record will)
                        for lease, c in decided:
                            lease.absorbed += c
                    if not applied:
                        # The report would take from ABSORBED what the record has not added
                        # yet: it waits for the record to be applied (the next flush).
                        raise StoreUnavailable("counters unavailable: the lease report waits")
                for state, plan in zip(states, planned):
                    self._send_report(state, plan, now, done)

            yield report
            for call in done:
                call()

    def _report_locked(
        self,
        state: _Org,
        now: int,
        closing: bool,
        after: list[Callable[[], None]] | None = None,
    ) -> None:
        """The report of one organization; the caller holds its lock. With ``after``, what
        the report changes in memory waits there, to run once the store's transaction that
        holds the report commits."""
        self._resolve(state, now)
        self._recover_lapse(state, now)
        with self._lock:
            planned = self._plan_report(state, now, closing)
        self._send_report(state, planned, now, after)

    def _resolve(self, state: _Org, now: int) -> None:
        """After a report whose answer was lost: ask the store whether it applied it (its
        report count moved on) and, if so, do what it changes in memory. Under the
        organization's lock."""
        unsure = state.unsure
        if unsure is None:
            return
        (counted,) = self.counters.counters_read([state.seq_key], now=now)
        if counted == state.seq:
            return  # not applied yet: it may still land (the next report will tell)
        state.unsure = None
        if counted == state.seq + 1:
            unsure()

    def _plan_report(
        self, state: _Org, now: int, closing: bool, *, durable: bool = False
    ) -> tuple[Any, ...]:
        """What a report of one organization counts, gives back and keeps held, read from its
        leases at once. ``durable``: every unit consumed is to be in :data:`ABSORBED` before
        the report (see :meth:`reporting`); the plan then lists what must be added there.
        Under the lock."""
        org = state.org
        plan = []
        decided: list[tuple[_Lease, int]] = []  # consumed by decisions, not in ABSORBED yet
        deltas: dict[str, int] = {}
        amounts: dict[str, int] = {}  # what the hold keeps: taken units not freed
        for name, lease in self._leases.items():
            if lease.org != org:
                continue
            drop = (
                closing
                or lease.closing
                or now >= lease.usable_until
                or not (lease.recent or lease.fresh or lease.reserved)
            )
            if drop:
                lease.closing = True
            # Units a write under way absorbed wait for it (on closing, they are counted).
            pending = 0 if lease.rate or closing else lease.pending
            if pending:
                drop = False  # given back at a report after the write is done
            given_back = lease.unused if drop else 0
            consumed = lease.consumed - pending
            returned = lease.returned
            absorbed = 0 if lease.rate else lease.absorbed
            if durable and not lease.rate and consumed > absorbed:
                decided.append((lease, consumed - absorbed))
                absorbed = consumed
            freed = 0
            if lease.rate:
                if given_back:
                    deltas[lease.key] = deltas.get(lease.key, 0) - given_back
            else:
                if consumed:
                    deltas[lease.key] = deltas.get(lease.key, 0) + consumed
                if absorbed:
                    key = lease.key + ABSORBED
                    deltas[key] = deltas.get(key, 0) - absorbed
                freed = min(lease.taken, consumed + given_back + returned)
                held = lease.key + LEASED
                if freed:
                    deltas[held] = deltas.get(held, 0) - freed
                if lease.taken > freed:
                    amounts[held] = amounts.get(held, 0) + lease.taken - freed
            plan.append((name, lease, consumed, given_back, freed, drop, returned, absorbed))
            if not drop:
                lease.block = max(1, 2 * lease.recent)
                lease.recent, lease.fresh = 0, False
        return plan, deltas, amounts, decided

    def _send_report(
        self,
        state: _Org,
        planned: tuple[Any, ...],
        now: int,
        after: list[Callable[[], None]] | None,
    ) -> None:
        """The store call of a planned report, then (or, with ``after``, once the caller's
        transaction commits) what it changes in memory. Under the organization's lock."""
        org = state.org
        plan, deltas, amounts, _decided = planned
        changes = [(key, delta) for key, delta in deltas.items() if delta]
        holding = bool(amounts or state.expires_at)

        def reported() -> None:
            with self._lock:
                if holding:
                    state.seq += 1
                for name, lease, consumed, given_back, freed, drop, returned, absorbed in plan:
                    lease.consumed -= consumed
                    lease.absorbed -= absorbed
                    lease.returned -= returned
                    lease.taken -= freed
                    lease.unused -= given_back
                    if drop and not lease.reserved and self._leases.get(name) is lease:
                        del self._leases[name]  # one with open reservations stays till settled
                if amounts:
                    self._held_anew(state, now)
                elif not any(ls.org == org for ls in self._leases.values()):
                    # Its hold holds only the report count now, and expires unused.
                    self._orgs.pop(org, None)
                else:
                    state.expires_at = now + self.ttl

        if holding:
            # One atomic call, applied only if the store has seen exactly state.seq reports
            # of this hold (SEQ <= seq and SEQ >= seq): sent again after an answer lost to a
            # timeout, it is refused, and the refusal says it was applied.
            seq_key, seq = state.seq_key, state.seq
            until = now + 4 * self.ttl
            lines = [CounterLine(key, delta) for key, delta in changes]
            lines += [
                CounterLine(seq_key, 1, seq + 1, until),
                CounterLine(seq_key + "\x1fguard", 0, -seq, until, seq_key, -1.0),
            ]
            held = {**amounts, seq_key: seq + 1}
            hold = Hold(state.hold_id, org, _lease_hold(held), now + self.ttl)
            try:
                result = self.counters.counters_apply(lines, now=now, hold=hold)
            except BaseException:
                state.unsure = reported  # applied or not: the next call asks the store
                raise
            counted = result.used[len(changes)]
            if result.admitted:
                state.unsure = None  # a lost one can never apply after this one
            elif counted == seq + 1:
                # A report whose answer was lost was applied meanwhile (a paused server runs
                # it late): its changes, not this plan's, are what the store holds.
                unsure, state.unsure = state.unsure, None
                if unsure is not None:
                    unsure()
                else:
                    logger.error("meterkit: lease report for %s applied twice?", org)
                return
            else:
                if counted < seq:
                    # The hold expired in the store, which counted all it held as used:
                    # count what the leases did consume instead (and nothing of this plan).
                    state.expires_at = min(state.expires_at or now, now)
                    self._recover_lapse(state, now)
                    return
                # Only a counter at its ceiling refuses a line without a limit.
                logger.error("meterkit: lease report for %s refused; retried later", org)
                return
        elif changes:
            self.counters.counters_add(changes, now=now)

        if after is None:
            reported()
        else:
            after.append(reported)


def _weight(line: LeaseLine) -> float:
    return line.counter.prev_weight if line.window else 1.0


def _lease_hold(leased: dict[str, int]) -> tuple[tuple[str, int], ...]:
    """A lease hold's amounts: what its expiry takes from each counter. A store gives a
    hold back at its expiry by subtracting them, so for a quota counter ``K`` the hold takes
    the units from ``K`` + :data:`LEASED` and *adds* them to ``K`` and ``K`` + :data:`STRANDED`:
    units a holder that stopped reporting may have used count as consumed, not as room for
    others."""
    pairs: dict[str, int] = {}
    for key, amount in leased.items():
        pairs[key] = pairs.get(key, 0) + amount
        if key.endswith(LEASED):
            base = key[: -len(LEASED)]
            pairs[base] = pairs.get(base, 0) - amount
            pairs[base + STRANDED] = pairs.get(base + STRANDED, 0) - amount
    return tuple(sorted(pairs.items()))
