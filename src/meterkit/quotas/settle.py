"""Settling: a decision's events, and reservations committed or released.

A decision records what it admitted as debit events (one per metric, dimensions kept), counted
already by the decision; a reservation holds its amounts until :meth:`Reservation.commit`
settles them to the real ones, or :meth:`Reservation.release` gives them back. A settle sent
again after its answer was lost is known as done (a settle marker), never counted twice.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from meterkit.errors import StoreUnavailable, ValidationError
from meterkit.models import Event
from meterkit.quotas.book import Book
from meterkit.quotas.counting import Counting
from meterkit.quotas.decision import Decision, Policy, check_amounts
from meterkit.quotas.leases import Leases
from meterkit.quotas.limits import Limits, Line
from meterkit.quotas.thresholds import Thresholds
from meterkit.spend import SPEND
from meterkit.validate import check_event

if TYPE_CHECKING:
    from meterkit.recorder import Recorder
    from meterkit.stores.base import CounterStore

__all__ = ["MARKER_GRACE", "Reservation", "Settler", "queuer", "settle_marker"]

logger = logging.getLogger("meterkit")


class Reservation:
    """Amounts held against quotas until :meth:`commit` (the real amounts) or :meth:`release`.

    A reservation nobody settles expires after its ``ttl`` and gives its amounts back. As a
    context manager it releases on an exception and otherwise commits what it holds, unless
    settled inside the block.
    """

    def __init__(
        self,
        settler: Settler,
        decision: Decision,
        held: dict[str, int],
        keys: dict[str, Line],
        expires_at: int,
        dimensions: Mapping[str, Any] | None,
    ) -> None:
        self.settler = settler
        self.decision = decision
        self.id = decision.id
        self.organization_id = decision.organization_id
        self.held = held
        self.expires_at = expires_at
        self.lines = keys
        """The counter line of each metric held."""
        self.dimensions = dimensions
        self._lock = threading.Lock()
        self.settled = False
        self.leased = False  # held in this process's leases, not in the store
        # How its spend line counts and the priced estimate it holds (Limits.spend_mode).
        self.spent: tuple[str | None, Mapping[str, Mapping[str, Any]] | None] = (None, None)

    def commit(
        self,
        actual: Mapping[str, int] | None = None,
        *,
        cost: object = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Settle to the real amounts (default: what was held) and the real spend (default:
        the estimate held): ``cost`` in dollars, or ``price``, the usage it priced
        (``{meter: {measure: amount}}``), recorded as priced events. Over the hold is debited
        too."""
        amounts = dict(self.held) if actual is None else check_amounts(actual, "actual")
        amounts.pop(SPEND, None)
        unknown = set(amounts) - set(self.held)
        if unknown:
            raise ValidationError("actual", f"not held by this reservation: {sorted(unknown)}")
        settler = self.settler
        spent = settler.book.spend_nano(cost, price, self.dimensions, settler.recorder.now())
        if spent is not None and SPEND not in self.held:
            field = "cost" if cost is not None else "price"
            raise ValidationError(
                field, "this reservation holds no spend (reserve with cost= or price=)"
            )
        full = {m: amounts.get(m, 0) for m in self.held}
        if SPEND in self.held:
            full[SPEND] = self.held[SPEND] if spent is None else spent
        if cost is not None and spent:
            # The real cost in dollars replaces the estimate, charged as priced usage.
            self.spent = ("price", {"charges": {"nano_usd": spent}})
        elif price is not None:
            self.spent = ("price", dict(price))  # the real usage replaces the estimate
        self._settle(full)

    def release(self) -> None:
        """Give everything back: the request did not happen."""
        self._settle(None)

    def _settle(self, actual: dict[str, int] | None) -> None:
        with self._lock:
            if self.settled:
                raise ValidationError("reservation", f"{self.id} is already settled")
            self.settled = True
        self.settler.settle(self, actual)

    def reopen(self) -> None:
        """The store did not settle (and changed nothing): allow another attempt."""
        with self._lock:
            self.settled = False

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.settled:
            return
        if exc_type is None:
            self.commit()
        else:
            self.release()


SETTLED = 2
MARKER_GRACE = 3600  # seconds a settle marker outlives its hold: a retry comes sooner


def settle_marker(org: str, hold_id: str) -> str:
    """The counter that tells a reservation settled from one whose hold expired."""
    return f"r\x1f{org}\x1f{hold_id}"


def queuer(recorder: Recorder, events: list[Event]) -> Callable[[], None] | None:
    """What queues a leased decision's events, run by the leases with its consumption
    (never waiting: it runs under their lock)."""
    if not events:
        return None
    return functools.partial(recorder.queue, events, wait=False)


class Settler:
    """Records decisions' events and settles reservations."""

    def __init__(
        self,
        recorder: Recorder,
        book: Book,
        limits: Limits,
        counting: Counting,
        thresholds: Thresholds,
        *,
        policy: Policy = "closed",
        record_debits: bool = True,
    ) -> None:
        self.recorder = recorder
        self.registry = book.registry
        self.book = book
        self.limits = limits
        self.counting = counting
        self.thresholds = thresholds
        self.counters: CounterStore = counting.counters
        self.leases: Leases | None = counting.leases
        self.policy = policy
        self.record_debits = record_debits
        self._in_memory = not recorder.capabilities.shared
        # Debit dimensions already validated, by (metric, items): most requests repeat them.
        self._good_dims: dict[tuple[str, tuple[tuple[str, Any], ...]], dict[str, Any]] = {}
        # Set while settling on an event loop: what needs the store is deferred to the flush.
        self._no_io = threading.local()
        book.on_forget(self._good_dims.clear)  # a meter re-registered may keep other dimensions

    def after_debit(
        self,
        decision: Decision,
        lines: Sequence[Line],
        amounts: Mapping[str, int],
        dimensions: Mapping[str, Any] | None,
        now: int,
        price: Mapping[str, Mapping[str, Any]] | None = None,
        mode: str | None = None,
    ) -> None:
        result_used = {s.metric: s.used for s in decision.limits}
        self.thresholds.reached(decision.organization_id, lines, result_used)
        counted = self.limits.counted(lines, amounts, mode)
        self.record(decision.id, decision.organization_id, amounts, dimensions, now, price, counted)

    def record(
        self,
        event_id: str,
        org: str,
        amounts: Mapping[str, int],
        dimensions: Mapping[str, Any] | None,
        now: int,
        price: Mapping[str, Mapping[str, Any]] | None,
        counted: Mapping[str, int],
    ) -> None:
        """Record a decision's events, and count what they feed beyond what it counted."""
        events = self.debit_events(event_id, org, amounts, dimensions, now, price)
        if events:
            if self._in_memory and not self.recorder.in_transaction():
                # Nothing survives the process anyway: written by the next flush (or query).
                self.recorder.queue(events)
            else:
                self.recorder.record_counted(events)  # counted below, net of the decision
        self.counting.count_decided(org, events, counted, leased=False, priced=price is not None)

    def debit_events(
        self,
        event_id: str,
        org: str,
        amounts: Mapping[str, int],
        dimensions: Mapping[str, Any] | None,
        now: int,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> list[Event]:
        """The validated events recording a debit (none when ``record_debits`` is off): one
        per metric of the meter of its name, and one per meter of the ``price`` it counted
        (``<id>:price:<meter>``), so that costs bill what spend counted."""
        if not self.record_debits:
            return []
        events = self.price_events(event_id, org, price, dimensions, now) if price else []
        specs = self.registry.specs
        for metric, amount in amounts.items():
            spec = specs.get(metric) if metric != SPEND else None
            measure = spec.measure(metric) if spec is not None and amount else None
            if spec is None or measure is None or measure.gauge:
                continue
            if not dimensions:  # every part is checked already: the org, the amount, our id
                events.append(Event(f"{event_id}:{metric}", metric, org, now, {metric: amount}))
                continue
            shape = (metric, tuple(dimensions.items()))
            try:
                dims = self._good_dims.get(shape)
            except TypeError:  # an unhashable value: the full check says what is wrong
                dims = None
            if dims is None:
                known = spec.dimension_names
                picked = {k: v for k, v in dimensions.items() if k in known}
                event = Event(f"{event_id}:{metric}", metric, org, now, {metric: amount}, picked)
                checked = check_event(spec, event, "debit")
                events.append(checked)
                if len(self._good_dims) >= 10_000:
                    self._good_dims.clear()
                self._good_dims[shape] = dict(checked.dimensions)
                continue
            # The same dimensions passed the same meter's check before: only the id is new.
            events.append(
                Event(f"{event_id}:{metric}", metric, org, now, {metric: amount}, dict(dims))
            )
        return events

    def price_events(
        self,
        event_id: str,
        org: str,
        price: Mapping[str, Mapping[str, Any]],
        dimensions: Mapping[str, Any] | None,
        now: int,
    ) -> list[Event]:
        """The events of a priced estimate (checked already by :meth:`estimate`)."""
        events = []
        for meter, values in price.items():
            spec = self.registry.specs[meter]
            known = spec.dimension_names
            picked = {k: v for k, v in (dimensions or {}).items() if k in known}
            kept = {m: v for m, v in values.items() if v}
            if not kept:
                continue
            event = Event(f"{event_id}:price:{meter}", meter, org, now, kept, picked)
            events.append(check_event(spec, event, f"price.{meter}"))
        return events

    def settle(self, reservation: Reservation, actual: dict[str, int] | None) -> None:
        now = self.recorder.now()
        lines = reservation.lines
        if reservation.leased and self.leases is not None:
            self.settle_leased(reservation, actual, now)
            return
        deltas = []
        for metric, held in reservation.held.items():
            line = lines.get(metric)
            if line is None:
                continue
            target = 0 if actual is None else actual[metric]
            deltas.append((line.counter.key, target - held))
        marker = settle_marker(reservation.organization_id, reservation.id)
        deltas.append((marker, 1))
        settle_done = False
        try:
            with self.counting.one_transaction():
                settled = self.counters.counters_settle(reservation.id, deltas, now=now)
                if not settled:
                    # Gone: expired, or settled by an attempt whose answer was lost.
                    (mark,) = self.counters.counters_read([marker], now=now)
                    settled = mark >= SETTLED
                settle_done = True
                if actual is not None:
                    self.settled(reservation, actual, settled, now)
        except StoreUnavailable:
            if self.policy == "open":
                # Fail open, as the decision did: the request is not failed for it. The hold
                # (if any) expires after its ttl and gives its amounts back.
                logger.warning(
                    "meterkit: store unavailable; reservation %s not settled", reservation.id
                )
                return
            if not settle_done or self.counters is self.recorder.store:
                reservation.reopen()
            raise
        except Exception:
            # Nothing changed if the settle itself failed, or if it shared a transaction that
            # rolled back: the reservation may be settled again.
            if not settle_done or self.counters is self.recorder.store:
                reservation.reopen()
            raise

    def settle_leased(
        self, reservation: Reservation, actual: dict[str, int] | None, now: int
    ) -> None:
        local = self.in_no_io
        assert self.leases is not None
        lines = reservation.lines
        by_key = (
            None
            if actual is None
            else {lines[m].counter.key: a for m, a in actual.items() if m in lines}
        )
        mode, price = reservation.spent
        org = reservation.organization_id
        events = (
            []
            if actual is None
            else self.debit_events(reservation.id, org, actual, reservation.dimensions, now, price)
        )
        extra = self.leases.settle(
            reservation.id,
            dict(by_key) if by_key is not None else None,
            queuer(self.recorder, events),
        )
        queued = extra is not None
        if extra is None and by_key:
            extra = list(by_key.items())  # expired and given back: the usage still happened
        if actual is None:
            return
        if extra and local:
            adds = [(k, a) for k, a in extra if a]
            self.recorder.defer(lambda: self.counters.counters_add(adds, now=now))
        elif extra:
            try:
                self.counters.counters_add([(k, a) for k, a in extra if a], now=now)
            except StoreUnavailable:
                if self.policy != "open":
                    raise
                logger.warning(
                    "meterkit: store unavailable; usage of %s not counted", reservation.id
                )
        used = {m: s.used for m, s in ((m, reservation.decision.state(m)) for m in lines) if s}
        for metric in actual:
            if metric in used:
                used[metric] += max(0, actual[metric] - reservation.held.get(metric, 0))
        self.thresholds.soon(org, list(lines.values()), used, local)
        if events and not queued:
            self.recorder.queue(events, wait=not local)
        elif events and not local:
            self.recorder.queue([])  # queued with the consumption; the store may set the pace
        counted = self.limits.counted(lines.values(), actual, mode)
        self.counting.count_decided(
            org, events, counted, leased=True, local=local, priced=price is not None
        )

    def settled(
        self, reservation: Reservation, actual: dict[str, int], settled: bool, now: int
    ) -> None:
        lines = reservation.lines
        if not settled:
            # The hold expired and gave its amounts back; the usage still happened.
            self.counters.counters_add(
                [(lines[m].counter.key, a) for m, a in actual.items() if m in lines], now=now
            )
        values = self.counters.counters_read([ln.counter.key for ln in lines.values()], now=now)
        self.thresholds.reached(
            reservation.organization_id, list(lines.values()), dict(zip(lines, values))
        )
        mode, price = reservation.spent
        self.record(
            reservation.id,
            reservation.organization_id,
            actual,
            reservation.dimensions,
            now,
            price,
            self.limits.counted(lines.values(), actual, mode),
        )

    @property
    def in_no_io(self) -> bool:
        """Whether this thread is inside :meth:`no_io`."""
        return bool(getattr(self._no_io, "on", False))

    @contextlib.contextmanager
    def no_io(self) -> Iterator[None]:
        """Within: settling a leased reservation defers what needs the store to the flush."""
        self._no_io.on = True
        try:
            yield
        finally:
            self._no_io.on = False
