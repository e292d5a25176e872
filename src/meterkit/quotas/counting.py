"""Counting what is recorded: the quota counters as the recorder's listener.

Every stored event adds what it contributes to the period counters of the metrics it feeds
and to its organization's monthly spend, in the transaction that stores it (or, where the
counters live apart, through the write-ahead record of :mod:`meterkit.countlog`). A decision
counts its own units when it admits them; its events add only what it did not count. One
ledger: whatever path usage takes, the counters end where the events alone would put them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from meterkit.catalog import CHARGES_METER
from meterkit.countlog import Changes, CountLog
from meterkit.errors import StoreUnavailable
from meterkit.models import Event
from meterkit.periods import Period
from meterkit.planmetrics import contributions
from meterkit.pricing import CHARGES, PriceBook, Tally, default_period_of
from meterkit.quotas.book import Book
from meterkit.quotas.leases import Leases
from meterkit.quotas.limits import Limits
from meterkit.spend import NANO, SPEND, to_nano

if TYPE_CHECKING:
    from meterkit.quotas.thresholds import Thresholds
    from meterkit.recorder import Begin, Recorder
    from meterkit.stores.base import CounterStore

__all__ = ["Counting"]


class Counting:
    """The counters: fed by what is recorded, read by decisions (see the module)."""

    def __init__(
        self,
        recorder: Recorder,
        book: Book,
        limits: Limits,
        counters: CounterStore,
        leases: Leases | None,
    ) -> None:
        self.recorder = recorder
        self.store = recorder.store
        self.registry = book.registry
        self.book = book
        self.limits = limits
        self.counters = counters
        self.leases = leases
        # Counters apart from the events: their changes go through a write-ahead record.
        self.countlog: CountLog | None = (
            CountLog(self.store, counters, recorder.now, self.applied)
            if counters is not self.store
            else None
        )
        self._in_memory = not recorder.capabilities.shared
        # Set while a write that may charge recorded usage to leases is under way (absorbing).
        self._absorbed = threading.local()
        self._charges_exact: tuple[PriceBook, bool] | None = None
        self.thresholds: Thresholds | None = None
        """Told of spend reached by what is counted; set by what composes this."""

    def absorbed_journal(self) -> list[Any] | None:
        """What this thread's write under :meth:`absorbing` charged to leases, if in one."""
        return getattr(self._absorbed, "taken", None)

    def feed(self, events: Sequence[Event]) -> None:
        """Count recorded usage in the period counters of the metrics it belongs to.

        For events that did not come from a decision (those are counted when admitted): what
        ``record`` / ``record_many``, ingest and the middleware store. An event counts in the
        organization's billing period containing its time.
        """
        self.recount((), events)

    def recount(self, removed: Sequence[Event], added: Sequence[Event]) -> None:
        """Take what ``removed`` contributed out of the counters and count ``added`` (a
        correction replaces one by the other; recording only adds). Spend taken out is
        rounded down and spend added up, so a counter never runs below the cost."""
        by_org, months = self.deltas(removed, added)
        journal = self.absorbed_journal()
        # Inside a write (absorbing): these events commit with what the leases absorb.
        self.add(by_org, months, absorb=journal, stored=True)

    def deltas(
        self, removed: Sequence[Event], added: Sequence[Event]
    ) -> tuple[dict[str, dict[str, int]], dict[str, Period]]:
        """What events contribute to every counter they feed, by organization and key, and
        the month of each spend key."""
        by_org: dict[str, dict[str, int]] = {}
        months = self.feed_spend(added, by_org)
        if removed:
            self.feed_spend(removed, by_org, sign=-1)
        for sign, events in ((1, added), (-1, removed)):
            found = contributions(self.book.metric_sources(), events) if events else {}
            for (org, metric), items in found.items():
                cycle = self.book.cycle(org)
                deltas = by_org.setdefault(org, {})
                period: Period | None = None
                for t, amount in items:
                    if period is None or not period.start <= t < period.end:
                        period = cycle.period_at(t)
                    key = self.limits.period_key(org, metric, period)
                    deltas[key] = deltas.get(key, 0) + sign * amount
        return by_org, months

    def add(
        self,
        by_org: Mapping[str, Mapping[str, int]],
        months: Mapping[str, Period],
        *,
        absorb: list[Any] | None = None,
        local: bool = False,
        stored: bool = False,
    ) -> None:
        """Add ``by_org``'s deltas to the counters, one call per organization (one hash slot
        on a cluster). With ``absorb`` (a journal of what was charged) this process's leases
        take them first (``stored``: in the transaction of the events that cause them);
        ``local``: what is left waits for the next flush (an event loop)."""
        now = self.recorder.now()
        log = self.countlog.collecting() if self.countlog is not None else None
        for org in sorted(by_org):
            changes = self.charge(
                sorted((k, d) for k, d in by_org[org].items() if d), now, absorb, stored=stored
            )
            if not changes:
                continue
            if local:
                self.recorder.defer(functools.partial(self.counters.counters_add, changes, now=now))
                continue
            if log is not None:
                # Written with the events, applied once they commit (meterkit.countlog).
                log.append((org, changes, {k: months[k] for k, _ in changes if k in months}))
                continue
            values = self.counters.counters_add(changes, now=now)
            self.applied((org, changes, months), values)

    def applied(self, changes: Changes, values: Sequence[int]) -> None:
        """Counter changes made, with the values after: fire the spend alerts they reach."""
        org, deltas, months = changes
        thresholds = self.thresholds
        for (key, _), value in zip(deltas, values):
            month = months.get(key)
            if month is not None and thresholds is not None:
                thresholds.alert(org, self.book.spending(org)[1], value, month)

    def charge(
        self,
        changes: list[tuple[str, int]],
        now: int,
        journal: list[Any] | None,
        *,
        stored: bool = False,
    ) -> list[tuple[str, int]]:
        """``changes`` charged to this process's leases first, when ``journal`` (what was
        charged, to give back on a rollback) is given: their spare units are what this usage
        spent (see meterkit.leases). Returns what is left for the shared counters (with
        ``stored``, the absorbed units too: see meterkit.leases.ABSORBED)."""
        if self.leases is None or journal is None:
            return changes
        rest, taken = self.leases.absorb(changes, now, stored=stored)
        journal.extend(taken)
        return rest

    def count_decided(
        self,
        org: str,
        events: Sequence[Event],
        counted: Mapping[str, int],
        *,
        leased: bool,
        local: bool = False,
        priced: bool = False,
    ) -> None:
        """Count what a decision's events feed beyond what the decision counted itself.

        ``counted`` maps counter keys to what the decision put there on these events' behalf:
        each is taken from what the events contribute to the same key (a key the events do
        not feed keeps the decision's count, unless it is marked with a negative amount: a
        spend limit's one-nano-dollar probe, always taken back). One ledger: whatever path
        usage takes, the counters end where the events alone would put them."""
        if priced and events and self.charged_exactly(events):
            # A charge (cost= in dollars) contributes to spend exactly what the decision
            # counted, at the built-in line: nothing to work out.
            events = [e for e in events if e.meter != CHARGES_METER.name]
            priced = False
        if not any(a < 0 for a in counted.values()) and not (
            priced or any(self.book.feeds_beyond_own(e.meter) for e in events)
        ):
            # Only debit events, each the one contribution to its own metric's counter, which
            # the decision counted already: nothing to add (the common case, kept cheap).
            return
        by_org, months = self.deltas((), events)
        deltas = by_org.setdefault(org, {})
        for key, amount in counted.items():
            if amount < 0:
                deltas[key] = deltas.get(key, 0) + amount
            elif key in deltas:
                deltas[key] -= amount
        if any(d for changes in by_org.values() for d in changes.values()):
            self.add(by_org, months, absorb=[] if leased else None, local=local)

    def charged_exactly(self, events: Sequence[Event]) -> bool:
        """Whether ``events`` hold a charge billed by the built-in charges line (no stored
        price replaces it)."""
        if not any(e.meter == CHARGES_METER.name for e in events):
            return False
        book = self.book.price_book()
        exact = self._charges_exact
        if exact is None or exact[0] is not book:
            found = book.match(CHARGES.meter, CHARGES.measure, {}, self.recorder.now())
            exact = self._charges_exact = (book, found == CHARGES)
        return exact[1]

    @contextlib.contextmanager
    def absorbing(self) -> Iterator[None]:
        """Within: recorded usage is charged to this process's leases first, and given back to
        them if the block raises (the write that stored it rolled back). Not inside
        :meth:`Meter.transaction`, which may roll back after the block: there the shared
        counters take it, in the transaction."""
        nested = getattr(self._absorbed, "taken", None) is not None
        if self.leases is None or nested or self.recorder.in_transaction():
            yield
            return
        taken: list[Any] = []
        self._absorbed.taken = taken
        try:
            yield
        except BaseException:
            self.leases.unabsorb(taken)
            raise
        else:
            # Done: committed, and (counters apart) applied — unless the counters failed,
            # when the units stay unreported rather than be taken from ABSORBED before the
            # write-ahead record adds them.
            if self.countlog is None or self.countlog.last_applied():
                self.leases.settle_absorbed(taken)
        finally:
            self._absorbed.taken = None

    def spend_from(
        self, events: Iterable[Event], book: PriceBook | None = None
    ) -> tuple[dict[str, int], int]:
        """What ``events`` contribute to spend as one batch, at ``book`` (default: the prices
        now): nano-dollars per spend key (each month summed exactly and rounded up once), and
        how many of them are priced — each batch is rounded up on its own as recorded, so a
        counter may exceed this by less than a nano-dollar per priced event."""
        book = self.book.price_book() if book is None else book
        priced = [e for e in events if book.prices_meter(e.meter)]
        by_org: dict[str, dict[str, int]] = {}
        self.feed_spend(priced, by_org, book=book)
        return {k: v for changes in by_org.values() for k, v in changes.items()}, len(priced)

    def reprice(self, before: PriceBook, meter: str) -> None:
        """After a price change for ``meter``: move each organization's spend counter of this
        month by what the change does to the month's costs of the events recorded so far, so
        spend keeps equal to the costs (a version effective in the past reprices them)."""
        after = self.book.price_book()
        if not (before.prices_meter(meter) or after.prices_meter(meter)):
            return
        lister = self.recorder.capabilities.organizations
        spec = self.registry.specs.get(meter)
        if lister is None or spec is None:
            return
        now = self.recorder.now()
        month = default_period_of(now)
        self.store.ensure_meter(spec)
        for org in lister(meter):
            events = list(self.store.scan(meter, org, month.start, now + 1))
            if not events:
                continue
            key = self.limits.spend_key(org, now)
            old = self.spend_from(events, before)[0].get(key, 0)
            new = self.spend_from(events, after)[0].get(key, 0)
            if new != old:
                self.counters.counters_add([(key, new - old)], now=now)

    def feed_spend(
        self,
        events: Sequence[Event],
        by_org: dict[str, dict[str, int]],
        sign: int = 1,
        book: PriceBook | None = None,
    ) -> dict[str, Period]:
        """Add the priced events' spend to ``by_org``; the month of each spend key added.

        Each organization's month is summed exactly and rounded up once per batch."""
        book = self.book.price_book() if book is None else book
        months: dict[str, Period] = {}
        if not len(book):
            return months
        tallies: dict[str, Tally] = {}
        month: Period | None = None
        for event in events:
            if not book.prices_meter(event.meter):
                continue
            t = event.time
            assert t is not None
            if month is None or not month.start <= t < month.end:
                month = default_period_of(t)
            key = self.limits.period_key(event.organization_id, SPEND, month)
            tally = tallies.get(key)
            if tally is None:
                tally = tallies[key] = Tally()
                months[key] = month
            book.add_ceiling(tally, event.meter, event.values, event.dimensions, t)
        for key, tally in tallies.items():
            nano = to_nano(tally.value()) if sign > 0 else -int(tally.value() * NANO)
            if nano:
                org = key.split("\x1f", 2)[1]
                deltas = by_org.setdefault(org, {})
                deltas[key] = deltas.get(key, 0) + nano
        return months

    def spent(self, organization_id: str, at: int | None = None) -> int:
        """Counted month-to-date spend in nano-dollars (open reservations included)."""
        now = self.recorder.now() if at is None else at
        return self.read_counted(organization_id, self.limits.spend_key(organization_id, now), now)

    def read_counted(self, org: str, key: str, now: int) -> int:
        if self.leases is None:
            value: int = self.counters.counters_read([key], now=now)[0]
            return value
        # No report of this organization may move units between the two reads.
        with self.leases.steady(org):
            self.leases.recover(org, now)
            value = self.counters.counters_read([key], now=now)[0]
            return value + self.leases.consumed(key, now)  # decided here, not reported yet

    def one_transaction(self) -> contextlib.AbstractContextManager[None]:
        """One transaction for counters and events, when both live in the same store (in
        memory, each counter call is atomic and debit events are queued: none is needed)."""
        if self.counters is self.recorder.store and not self._in_memory:
            return self.recorder.transaction()
        return contextlib.nullcontext()

    # -- the recorder's Counting ----------------------------------------------------------------

    def atomic(self, begin: Begin | None) -> Begin | None:
        """``begin``, with the counter changes made in it logged and applied after it commits
        where the counters live apart from the events."""
        log = self.countlog
        if begin is not None and log is not None:
            begin = functools.partial(log.around, begin)
        return begin

    def before_write(self) -> None:
        """What a killed writer left of the logged changes, applied first."""
        if self.countlog is not None:
            self.countlog.replay_if_due()

    def unreported(self) -> bool:
        """Whether this process decided from leases what it has not reported yet."""
        leases = self.leases
        return leases is not None and leases.unreported()

    def flush(self, recorder: Recorder, closing: bool) -> bool:
        """Report what leased decisions consumed (with ``closing``, give back every unused
        lease), with the queued events where both can commit together."""
        log = self.countlog
        if log is not None:
            log.replay_if_due()
        leases = self.leases
        if log is not None and log.behind and leases is not None and leases.pending():
            # A lease report must not run before the changes logged ahead of it.
            raise StoreUnavailable("counters unavailable: logged changes wait to be applied")
        if leases is None or not (leases.pending() or (closing and leases.holding())):
            return False
        # The report in the events' transaction where the counters are in the store.
        begin = recorder.atomic_writes() if self.counters is self.store else None
        if begin is not None:
            self._report_and_write(recorder, leases, begin, closing)
            return True
        if log is not None:
            self._write_then_report(recorder, leases, log, closing)
            return True
        leases.report(recorder.now(), closing=closing)
        return False

    def _report_and_write(
        self, recorder: Recorder, leases: Leases, begin: Begin, closing: bool
    ) -> None:
        """The lease report and the queued events in one store transaction: a ``kill -9``
        leaves both or neither. The report reads the leases and takes the queue in one
        instant, and a leased decision queues its events with its consumption, so the report
        counts exactly the units of the events written."""
        taken: list[tuple[list[Event], list[Event]]] = []
        with leases.reporting() as report:
            try:
                with recorder.transaction(), begin():
                    report(recorder.now(), closing, lambda: taken.append(recorder.take_queue()))
                    counted, uncounted = taken[0]
                    if counted or uncounted:
                        recorder.write_queued(counted, uncounted)
            except BaseException:
                if taken:
                    recorder.requeue(*taken[0])
                raise

    def _write_then_report(
        self, recorder: Recorder, leases: Leases, log: CountLog, closing: bool
    ) -> None:
        """Counters apart from the events: the queued events first, with the lease units their
        decisions consumed counted in the leases' absorbed twin through the write-ahead record
        (one transaction of the event store), then the lease report, which counts them and
        takes them back from it. A ``kill -9`` between leaves the counters equal to the events
        plus stranded, less absorbed units (meterkit.leases)."""
        taken: list[tuple[list[Event], list[Event]]] = []

        def write(absorbed: list[tuple[str, str, int]]) -> bool:
            counted, uncounted = taken[0]
            if not (absorbed or counted or uncounted):
                return True
            try:
                with recorder.writes():
                    pending = log.collecting()
                    assert pending is not None  # inside the write: its changes are collected
                    for org, key, units in absorbed:
                        pending.append((org, [(key, units)], {}))
                    if counted or uncounted:
                        recorder.write_queued(counted, uncounted)
            except BaseException:
                recorder.requeue(counted, uncounted)
                raise
            return log.last_applied()

        with leases.reporting() as report:
            report(recorder.now(), closing, lambda: taken.append(recorder.take_queue()), write)
