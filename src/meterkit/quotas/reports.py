"""Lease reports: counting what leases consumed, giving back what went idle.

One atomic store call per organization changes the counters and rewrites its hold together,
numbered so that a report sent again after a lost answer is never counted twice (see
:mod:`meterkit.quotas.leases`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from meterkit.errors import StoreUnavailable
from meterkit.models import CounterLine, Hold
from meterkit.quotas.leasestate import (
    ABSORBED,
    LEASED,
    Lease,
    LeaseCounters,
    LeaseState,
    OrgHold,
    lease_hold,
)

__all__ = ["LeaseReports"]

logger = logging.getLogger("meterkit")


class LeaseReports:
    """The reports of one meter's leases (``state``)."""

    def __init__(self, state: LeaseState) -> None:
        self.state = state
        self.counters: LeaseCounters = state.counters
        self.ttl = state.ttl

    def report(self, now: int, *, closing: bool = False) -> None:
        """Count consumed units, give back idle leases (every lease when ``closing``).

        One atomic store call per organization: the counters change and the hold is
        rewritten together, so nothing is ever counted twice or lost by a failure part way.
        """
        with self.state.lock:
            self.state.expire_reservations(now)
            orgs = list({lease.org for lease in self.state.leases.values()})
        for org in orgs:
            state = self.state.org(org)
            with state.lock:
                self.report_locked(state, now, closing)

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
        with self.state.lock:
            orgs = sorted({lease.org for lease in self.state.leases.values()})
        states = [self.state.org(org) for org in orgs]
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
                    self.resolve(state, now)
                    self.state.recover_lapse(state, now)
                durable = write is not None
                with self.state.lock:
                    # One instant for the caller's queue and every lease: a decision queues
                    # its events with its consumption (_consume), so the report counts
                    # exactly the units of the events taken.
                    self.state.expire_reservations(now)
                    snapshot()
                    planned = [
                        self.plan_report(state, now, closing, durable=durable) for state in states
                    ]
                if write is not None:
                    decided = [item for plan in planned for item in plan[3]]
                    applied = write([(lease.org, lease.key + ABSORBED, c) for lease, c in decided])
                    with self.state.lock:  # stored: ABSORBED holds them (or its record will)
                        for lease, c in decided:
                            lease.absorbed += c
                    if not applied:
                        # The report would take from ABSORBED what the record has not added
                        # yet: it waits for the record to be applied (the next flush).
                        raise StoreUnavailable("counters unavailable: the lease report waits")
                for state, plan in zip(states, planned):
                    self.send_report(state, plan, now, done)

            yield report
            for call in done:
                call()

    def report_locked(
        self,
        state: OrgHold,
        now: int,
        closing: bool,
        after: list[Callable[[], None]] | None = None,
    ) -> None:
        """The report of one organization; the caller holds its lock. With ``after``, what
        the report changes in memory waits there, to run once the store's transaction that
        holds the report commits."""
        self.resolve(state, now)
        self.state.recover_lapse(state, now)
        with self.state.lock:
            planned = self.plan_report(state, now, closing)
        self.send_report(state, planned, now, after)

    def resolve(self, state: OrgHold, now: int) -> None:
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

    def plan_report(
        self, state: OrgHold, now: int, closing: bool, *, durable: bool = False
    ) -> tuple[Any, ...]:
        """What a report of one organization counts, gives back and keeps held, read from its
        leases at once. ``durable``: every unit consumed is to be in :data:`ABSORBED` before
        the report (see :meth:`reporting`); the plan then lists what must be added there.
        Under the lock."""
        org = state.org
        plan = []
        decided: list[tuple[Lease, int]] = []  # consumed by decisions, not in ABSORBED yet
        deltas: dict[str, int] = {}
        amounts: dict[str, int] = {}  # what the hold keeps: taken units not freed
        for name, lease in self.state.leases.items():
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

    def send_report(
        self,
        state: OrgHold,
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
            with self.state.lock:
                if holding:
                    state.seq += 1
                for name, lease, consumed, given_back, freed, drop, returned, absorbed in plan:
                    lease.consumed -= consumed
                    lease.absorbed -= absorbed
                    lease.returned -= returned
                    lease.taken -= freed
                    lease.unused -= given_back
                    if drop and not lease.reserved and self.state.leases.get(name) is lease:
                        del self.state.leases[name]  # one with open reservations stays till settled
                if amounts:
                    self.state.held_anew(state, now)
                elif not any(ls.org == org for ls in self.state.leases.values()):
                    # Its hold holds only the report count now, and expires unused.
                    self.state.orgs.pop(org, None)
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
            hold = Hold(state.hold_id, org, lease_hold(held), now + self.ttl)
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
                    self.state.recover_lapse(state, now)
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
