"""The leases one meter holds, as both its decisions and its reports see them.

See :mod:`meterkit.quotas.leases` for how leased units are counted.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from meterkit.models import CounterLine, CounterResult, Hold

__all__ = [
    "ABSORBED",
    "LEASED",
    "STEP",
    "STRANDED",
    "Lease",
    "LeaseCounters",
    "LeaseState",
    "OrgHold",
    "lease_hold",
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


FIRST_BLOCK = 16
"""Units a lease first takes per unit asked (then twice what was consumed)."""


class LeaseCounters(Protocol):
    """What leases need of a counters store."""

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


@attrs.define(eq=False)
class Lease:
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
    block: int = FIRST_BLOCK
    recent: int = 0  # consumed since the last report: sizes the next block
    fresh: bool = True  # taken since the last report
    closing: bool = False  # being given back: decisions no longer use it

    def usable(self, counter: CounterLine, now: int) -> bool:
        return not self.closing and self.limit == counter.limit and now < self.usable_until

    def room_for(self, counter: CounterLine, now: int) -> bool:
        return self.unused >= counter.amount and self.usable(counter, now)


@attrs.define(eq=False)
class OrgHold:
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


_live: weakref.WeakSet[LeaseState] = weakref.WeakSet()


def _forget_after_fork() -> None:
    # Leases belong to the process that took them: a forked child starts with none, and never
    # gives back (or reports) its parent's units.
    for state in list(_live):
        state.reset()


os.register_at_fork(after_in_child=_forget_after_fork)


class LeaseState:
    """Every lease and hold of one meter, under one lock, and what both decisions and reports
    do to them."""

    def __init__(self, counters: LeaseCounters, ttl: int) -> None:
        self.counters = counters
        self.ttl = ttl
        self.reset()
        _live.add(self)

    def reset(self) -> None:
        """Hold nothing (a new process)."""
        self.lock = threading.Lock()
        self.leases: dict[str, Lease] = {}
        self.orgs: dict[str, OrgHold] = {}
        # Open reservations: id -> (expires_at, [(lease, units held)]).
        self.reservations: dict[str, tuple[int, list[tuple[Lease, int]]]] = {}
        # The largest usage recorded at once against each counter key: how far from the limit
        # a lease must stop holding spare units.
        self.recorded: dict[str, int] = {}
        # What this process added to each key's STEP counter.
        self.published: dict[str, int] = {}

    def expire_reservations(self, now: int) -> None:
        """Reservations nobody settled give their units back at their expiry. Under the lock."""
        for rid, (expires_at, held) in list(self.reservations.items()):
            if expires_at <= now:
                del self.reservations[rid]
                for lease, amount in held:
                    lease.reserved -= amount
                    lease.unused += amount

    def held(self, org: str) -> dict[str, int]:
        """What the organization's hold records now: each quota lease's taken units."""
        amounts: dict[str, int] = {}
        for lease in self.leases.values():
            if lease.org == org and not lease.rate and lease.taken:
                key = lease.key + LEASED
                amounts[key] = amounts.get(key, 0) + lease.taken
        return amounts

    def held_anew(self, state: OrgHold, now: int) -> None:
        """The hold was just written: every quota lease of its organization is good for half a
        ttl."""
        state.expires_at = now + self.ttl
        until = now + self.ttl // 2
        for lease in self.leases.values():
            if lease.org == state.org and not lease.rate and not lease.closing:
                lease.usable_until = min(until, lease.ends)

    def lapse_if_expired(self, state: OrgHold, now: int) -> list[tuple[Lease, int, int, int]]:
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
        for lease in self.leases.values():
            if lease.org == state.org and not lease.rate:
                if lease.taken or lease.consumed or lease.reserved:
                    consumed = lease.consumed - lease.pending  # a write under way: later
                    lapsed.append((lease, consumed, lease.taken, lease.absorbed))
                lease.taken = lease.unused = 0
                lease.closing = True
        return lapsed

    def recover_lapse(self, state: OrgHold, now: int) -> None:
        """When the organization's hold expired in the store, count what its leases consumed
        and hold again what open reservations hold. Under the organization's lock."""
        with self.lock:
            lapsed = self.lapse_if_expired(state, now)
        if lapsed:
            self.count_lapsed(state, lapsed, now)

    def count_lapsed(
        self, state: OrgHold, lapsed: list[tuple[Lease, int, int, int]], now: int
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
            hold = Hold(state.hold_id, state.org, lease_hold(held), now + self.ttl)
        self.counters.counters_apply(lines, now=now, hold=hold)
        with self.lock:
            for lease, c, _taken, absorbed in lapsed:
                lease.consumed -= c
                lease.absorbed -= absorbed
                lease.taken = lease.reserved
            if hold is not None:
                state.expires_at = now + self.ttl
                state.seq = 1

    def org(self, org: str) -> OrgHold:
        with self.lock:
            state = self.orgs.get(org)
            if state is None:
                state = self.orgs[org] = OrgHold(org, f"lse_{uuid.uuid4().hex}")
            return state


def lease_hold(leased: dict[str, int]) -> tuple[tuple[str, int], ...]:
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
