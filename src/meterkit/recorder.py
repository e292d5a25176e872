"""The write path: validation, the group-commit writer, the queue and its flush, transactions.

A :class:`Recorder` stores events. It knows nothing of quotas: what counts the events it
stores (the quota counters) listens as its :class:`Counting`, told of every write (inside
the write's transaction, so both commit together) and of every flush.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import random
import threading
import time as _time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from meterkit import lateness as lateness_module
from meterkit import retention as retention_module
from meterkit.errors import (
    EventConflict,
    LateEventError,
    StoreConflict,
    StoreUnavailable,
    ValidationError,
)
from meterkit.idempotency import classify
from meterkit.models import AppendResult, DimValue, Event, Number
from meterkit.registry import Registry
from meterkit.retention import Retention
from meterkit.stores.base import Capabilities, Store
from meterkit.validate import check_event, check_id, check_time
from meterkit.writer import GroupWriter

__all__ = ["MAX_QUEUED", "Begin", "Counting", "Recorder", "check_future_skew"]

MAX_QUEUED = 100_000
logger = logging.getLogger("meterkit")

Begin = Callable[[], contextlib.AbstractContextManager[None]]
"""Opens a store transaction (or a write-ahead record around one)."""

if TYPE_CHECKING:
    from typing_extensions import Required, TypedDict

    class EventKeywords(TypedDict, total=False):
        """The keywords of :meth:`Recorder.record`, for type checkers."""

        organization_id: Required[str]
        time: Any
        id: str | None
        dimensions: Mapping[str, DimValue] | None


_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()


def _forget_queue_after_fork() -> None:
    # The queue and the flusher thread belong to the parent, which writes what it queued.
    for recorder in list(_recorders):
        recorder.forget_queue()


os.register_at_fork(after_in_child=_forget_queue_after_fork)


def check_future_skew(value: object) -> int | None:
    """``max_future_skew``: seconds (a whole number >= 0) an event may lie ahead of the clock,
    or ``None`` for any time."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValidationError("max_future_skew", "must be a non-negative whole number or None")
    return value


class Counting(Protocol):
    """What counts the events a :class:`Recorder` stores (the quota counters)."""

    def atomic(self, begin: Begin | None) -> Begin | None:
        """``begin`` made to commit the counter changes made inside it with the events (where
        the counters live apart from the store, through a write-ahead record)."""

    def absorbing(self) -> contextlib.AbstractContextManager[None]:
        """Around a write whose events may be charged to quota held in this process."""

    def before_write(self) -> None:
        """Before a write: finish what a killed writer left of the counter changes."""

    def feed(self, events: Sequence[Event]) -> None:
        """Count newly stored events (inside the write's transaction where there is one)."""

    def flush(self, recorder: Recorder, closing: bool) -> bool:
        """At every flush, before the queue is written: report what decisions consumed.
        ``True`` when it wrote the queue itself (in the same transaction as its report)."""

    def unreported(self) -> bool:
        """Whether something decided here is not in the store yet (a query must flush)."""


class NothingCounted:
    """The :class:`Counting` of a recorder nothing counts."""

    def atomic(self, begin: Begin | None) -> Begin | None:
        return begin

    def absorbing(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def before_write(self) -> None:
        return None

    def feed(self, events: Sequence[Event]) -> None:
        return None

    def flush(self, recorder: Recorder, closing: bool) -> bool:
        return False

    def unreported(self) -> bool:
        return False


class Recorder:
    """Validates events and writes them, grouped with other threads' writes into one store
    transaction, or queued for the next flush (every ``flush_interval`` seconds)."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        retention: Retention,
        *,
        clock: Callable[[], float],
        capabilities: Capabilities | None = None,
        max_future_skew: int | None = None,
        lateness: int | None = None,
        flush_interval: float = 0.1,
        cache_seconds: float = 1.0,
        recorded: Callable[[tuple[Event, ...]], object] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.retention = retention
        self.clock = clock
        self.capabilities = capabilities or Capabilities.of(store)
        self.max_future_skew = max_future_skew
        self.lateness = lateness
        self.flush_interval = flush_interval
        self.cache_seconds = cache_seconds
        self.counting: Counting = NothingCounted()
        """What counts the stored events; set once by what composes this recorder."""
        self._recorded = recorded
        self._closes: tuple[float, dict[str, int]] | None = None
        self._tx = threading.local()
        # Concurrent record() / record_many() calls share one store transaction each time.
        self.writer = GroupWriter(
            self._append_and_count,
            lambda meter, org, ids: self.store.get_events(meter, org, ids),
        )
        self._wake = threading.Event()
        self.closed = False
        self.forget_queue()
        _recorders.add(self)

    def forget_queue(self) -> None:
        """Start with nothing queued and no flusher (and, after a fork, the parent's locks
        forgotten)."""
        # Decisions' debit events (counted already) and events still to count wait here for
        # the next flush.
        self._queued: list[Event] = []
        self._queued_uncounted: list[Event] = []
        self._deferred: list[Callable[[], object]] = []
        self._queue_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._flushing = 0  # the thread flushing now (while _flush_lock is held)
        self._flusher: threading.Thread | None = None

    def now(self) -> int:
        return int(self.clock())

    # -- recording ----------------------------------------------------------------------------

    def record(
        self,
        meter: str,
        values: Mapping[str, Number],
        *,
        organization_id: str,
        time: Any = None,
        id: str | None = None,
        dimensions: Mapping[str, DimValue] | None = None,
    ) -> bool:
        """Record one event (see :meth:`meterkit.Meter.record`)."""
        event = Event(
            id=id if id is not None else f"evt_{uuid.uuid4().hex}",
            meter=meter,
            organization_id=organization_id,
            time=time if time is not None else self.now(),
            values=values,
            dimensions=dimensions if dimensions is not None else {},
        )
        result = self._append([event], single=True)
        if result.conflicts:
            raise EventConflict("id", result.conflicts)
        return result.accepted == 1

    def record_many(self, events: Iterable[Event]) -> AppendResult:
        """Record a batch in one transaction (see :meth:`meterkit.Meter.record_many`)."""
        if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Iterable):
            raise ValidationError("events", "must be a list of Event")
        return self._append(list(events), single=False)

    def record_later(self, events: Iterable[Event], *, wait: bool = True) -> None:
        """Validate now, write at the next flush (see :meth:`meterkit.Meter.record_later`)."""
        if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Iterable):
            raise ValidationError("events", "must be a list of Event")
        checked = self.checked(list(events), single=False)
        if checked:
            self.queue(checked, wait=wait, counted=False)

    def record_counted(self, events: Sequence[Event]) -> None:
        """Record a decision's debit events: their units are counted already."""
        self._stored(self.checked(events, single=False), counted=True)

    def _append(self, events: Sequence[Event], *, single: bool) -> AppendResult:
        checked = self.checked(events, single=single)
        if not checked:
            return AppendResult(0, 0)
        return self._stored(checked)

    def invalid_events(self, events: Sequence[Event]) -> list[tuple[int, ValidationError]]:
        """Each event ``record_many`` would refuse, by index, with its error."""
        found = []
        for i, event in enumerate(events):
            try:
                self.checked([event], single=False)
            except ValidationError as exc:
                field = exc.field.replace("events[0]", f"events[{i}]", 1)
                found.append((i, ValidationError(field, exc.message)))
        return found

    def checked(self, events: Sequence[Event], *, single: bool) -> list[Event]:
        """Every event validated against its meter and the clock, or a ValidationError."""
        checked = []
        now = self.now() if events else 0
        latest = None if self.max_future_skew is None else now + self.max_future_skew
        kept = self.retention.days if events else {}
        closed = self.closed_periods() if events else {}
        earliest = None if self.lateness is None else now - self.lateness
        for i, event in enumerate(events):
            field = "event" if single else f"events[{i}]"
            if not isinstance(event, Event):
                raise ValidationError(field, "must be a meterkit.Event")
            spec = self.registry.spec(event.meter, f"{field}.meter")
            if event.time is None:
                event = attrs.evolve(event, time=now)
            event = check_event(spec, event, field)
            if kept:
                retention_module.check_kept(
                    f"{field}.time",
                    spec.name,
                    kept.get(spec.name),
                    now,
                    event.time,
                    "is",
                    "; an older event could repeat one already dropped and be counted twice",
                )
            if latest is not None and event.time > latest:
                raise ValidationError(
                    f"{field}.time",
                    f"is {event.time - now} s ahead of the clock; at most "
                    f"{self.max_future_skew} s is accepted (max_future_skew)",
                )
            if earliest is not None and event.time < earliest:
                assert self.lateness is not None
                raise LateEventError(
                    f"{field}.time",
                    f"is {now - event.time} s late; at most {self.lateness} s is accepted "
                    "(lateness)",
                    lateness=self.lateness,
                    accepted_from=earliest,
                )
            if closed:
                lateness_module.check_open(
                    f"{field}.time", closed, event.organization_id, event.time, "falls"
                )
            checked.append(event)
        return checked

    # -- closed periods (see meterkit.lateness) -------------------------------------------------

    def close_period(self, organization_id: str | None, before: object) -> int:
        """Make usage before ``before`` final (see :meth:`meterkit.Meter.close_period`)."""
        key = (
            lateness_module.ALL
            if organization_id is None
            else check_id("organization_id", organization_id)
        )
        when = check_time("before", before)
        if when > self.now():
            raise ValidationError("before", "must not be in the future: usage there is not final")
        known = self.store.get_record(lateness_module.RECORD, key)
        if known is not None and int(known["before"]) >= when:
            return int(known["before"])
        self.store.put_record(lateness_module.RECORD, key, {"before": when})
        self._closes = None
        return when

    def closed_periods(self, *, fresh: bool = False) -> dict[str, int]:
        """The store's closes, read again at most every ``cache_seconds`` (another process
        may close), or now when ``fresh``."""
        hit = None if fresh else self._closes
        now = _time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        found = lateness_module.closed_map(self.store.list_records(lateness_module.RECORD))
        self._closes = (now + self.cache_seconds, found)
        return found

    # -- writing ------------------------------------------------------------------------------

    def atomic_writes(self) -> Begin | None:
        """How to make events and the counter changes they cause commit together: the store's
        transaction (SQLite, memory; PostgreSQL's atomic_writes), with the counters' changes
        in it (or logged in it, where the counters live apart)."""
        return self.counting.atomic(
            self.capabilities.transaction or self.capabilities.atomic_writes
        )

    @contextlib.contextmanager
    def writes(self) -> Iterator[None]:
        """A :meth:`transaction` in which events and their counter changes commit together."""
        begin = self.atomic_writes()
        with self.transaction(), begin() if begin is not None else contextlib.nullcontext():
            yield

    def _append_and_count(self, events: Sequence[Event]) -> list[Event]:
        """The group writer's write: the new events, and their usage counted, in one store
        transaction where the store has them (run again, whole, when the store aborted it as
        a deadlock victim)."""
        begin = self.atomic_writes()
        self.counting.before_write()
        for attempt in itertools.count():
            try:
                with (
                    self.counting.absorbing(),
                    begin() if begin is not None else contextlib.nullcontext(),
                ):
                    new = self.store.append(events)
                    self._count(new)
                return new
            except StoreConflict:
                if attempt >= 5:
                    raise
                _time.sleep(random.uniform(0, 0.01 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _count(self, new: Sequence[Event]) -> None:
        """Count newly stored events.

        Inside :meth:`atomic_writes` the changes commit with the events. Outside one (a
        store without transactions), the events are durable once appended, whatever happens
        to counting them: a failure of the counters is logged, not raised, so the events stay
        acknowledged and are never stored "again" as duplicates;
        :func:`~meterkit.recovery.rebuild_counters` counts them.
        """
        if not new:
            return
        if self.atomic_writes() is not None:
            self.counting.feed(new)  # in the store's transaction: a failure undoes the append
            return
        try:
            self.counting.feed(new)
        except StoreUnavailable:
            logger.warning(
                "meterkit: %d events stored but not counted in the quota counters "
                "(unavailable); recovery.rebuild_counters counts them",
                len(new),
            )

    def _stored(self, checked: list[Event], *, counted: bool = False) -> AppendResult:
        """Store validated events (grouped with other callers') and tell the observers."""
        self.registry.ensure_of(checked)
        if self.in_transaction() or counted:
            # Inside a transaction the events commit with the rest of it, not in a group (a
            # decision's debits are written in the decision's own transaction).
            new = self.store.append(checked)
            if not counted:
                self._count(new)
            result = classify(checked, new, self.store.get_events)
        else:
            result, new = self.writer.append(checked)
        self._tell_recorded(new)
        return result

    def _tell_recorded(self, new: Sequence[Event]) -> None:
        """Tell ``recorded`` of new events, after the current transaction commits."""
        if new and self._recorded is not None:
            self.notify(functools.partial(self._recorded, tuple(new)))

    # -- transactions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One store transaction for the writes inside (see :meth:`meterkit.Meter.transaction`)."""
        state = self._tx
        depth: int = getattr(state, "depth", 0)
        if depth == 0:
            state.pending = []
        state.depth = depth + 1
        committed = False
        try:
            begin = self.counting.atomic(self.capabilities.transaction)
            with begin() if begin is not None else contextlib.nullcontext():
                yield
            committed = True
        finally:
            state.depth = depth
            pending: list[Callable[[], object]] = state.pending if depth == 0 else []
            if depth == 0:
                state.pending = []
        if committed:
            for call in pending:
                call()

    def in_transaction(self) -> bool:
        """Whether this thread is inside :meth:`transaction`."""
        return bool(getattr(self._tx, "depth", 0))

    def notify(self, call: Callable[[], object]) -> None:
        """Run an observer call now, or after the current transaction commits."""
        if getattr(self._tx, "depth", 0):
            self._tx.pending.append(call)
        else:
            call()

    # -- the queue and its flush ----------------------------------------------------------------

    def flush(self, *, closing: bool = False) -> None:
        """Run deferred calls, let the counting report, and write queued events now."""
        with self._flush_lock:
            self._flushing = threading.get_ident()
            with self._queue_lock:
                deferred, self._deferred = self._deferred, []
            for i, call in enumerate(deferred):
                try:
                    call()
                except StoreUnavailable:
                    with self._queue_lock:  # kept, in order, for the next flush
                        self._deferred[:0] = deferred[i:]
                    raise
                except Exception:
                    logger.exception("meterkit: deferred store call failed")
            if self.counting.flush(self, closing):
                return
            counted, uncounted = self.take_queue()
            if counted or uncounted:
                try:
                    self.write_queued(counted, uncounted)
                except BaseException:
                    self.requeue(counted, uncounted)
                    raise

    def take_queue(self) -> tuple[list[Event], list[Event]]:
        """The queued events (decisions' counted debits, and events still to count)."""
        with self._queue_lock:
            counted, self._queued = self._queued, []
            uncounted, self._queued_uncounted = self._queued_uncounted, []
        return counted, uncounted

    def requeue(self, counted: list[Event], uncounted: list[Event]) -> None:
        """Put events a failed flush took back in front, in order, for the next one."""
        with self._queue_lock:
            self._queued[:0] = counted
            self._queued_uncounted[:0] = uncounted

    def queued(self) -> int:
        """How many events wait for the next flush."""
        return len(self._queued) + len(self._queued_uncounted)

    def write_queued(self, counted: list[Event], uncounted: list[Event]) -> None:
        """Write queued events in one store transaction (where the store has them), count the
        new ones not counted yet, and tell the observers after it commits."""
        events = counted + uncounted
        self.registry.ensure_of(events)
        with self.writes():
            new = self.store.append(events)
            waiting = {id(e) for e in uncounted}
            self._count([e for e in new if id(e) in waiting])
            self._tell_recorded(new)

    def sync(self) -> None:
        """Flush when anything here should be seen by a query (queued events, usage decided
        and not reported yet); within a transaction, nothing: its own writes are seen."""
        if getattr(self._tx, "depth", 0):
            return
        queued = self._queued or self._queued_uncounted or self._deferred
        # A flush in another thread (the background one) may be writing what this thread
        # queued: waiting for its lock waits for that write to commit.
        elsewhere = self._flush_lock.locked() and self._flushing != threading.get_ident()
        if queued or elsewhere or self.counting.unreported():
            self.flush()

    def queue(self, events: Sequence[Event], *, wait: bool = True, counted: bool = True) -> None:
        """Queue validated events for the next flush, without waiting for it (unless the
        backlog is too long and ``wait`` allows it: then the store sets the pace).
        ``counted``: a decision's debits, already in the counters; else counted when written."""
        with self._queue_lock:
            (self._queued if counted else self._queued_uncounted).extend(events)
            backlog = len(self._queued) + len(self._queued_uncounted)
        self.start_flusher()
        if wait and backlog > MAX_QUEUED:
            self.flush()  # the store is slower than the decisions: they wait for it now

    def defer(self, call: Callable[[], object]) -> None:
        """Run ``call`` at the next flush, in the flushing thread (store I/O off a loop)."""
        with self._queue_lock:
            self._deferred.append(call)
        self.start_flusher()

    def start_flusher(self) -> None:
        """Start the background flush thread, once."""
        if self._flusher is not None or self.closed:
            return
        with self._queue_lock:
            if self._flusher is not None:
                return
            thread = threading.Thread(
                target=_flush_loop,
                args=(weakref.ref(self), self._wake, self.flush_interval),
                name="meterkit-flush",
                daemon=True,
            )
            self._flusher = thread
        thread.start()

    def close(self) -> None:
        """Stop the flush thread, then flush a last time with ``closing`` (leases given back);
        a failure of that flush is logged: what it could not write is lost with the process."""
        self.closed = True
        _recorders.discard(self)
        self._wake.set()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=max(5.0, 10 * self.flush_interval))
        try:
            self.flush(closing=True)
        except StoreUnavailable as exc:
            logger.warning("meterkit: the last flush of %s failed: %s", self.store.url, exc)
        except Exception:
            logger.exception("meterkit: the last flush of %s failed", self.store.url)


def _flush_loop(ref: weakref.ref[Recorder], wake: threading.Event, interval: float) -> None:
    """Flush every ``interval`` seconds until the recorder closes or is collected.

    While the store fails, the wait doubles up to 5 s and only the first failure is logged;
    what was not written stays queued, and decisions go on against their leases meanwhile.
    """
    wait = interval
    while not wake.wait(wait):
        recorder = ref()
        if recorder is None or recorder.closed:
            return
        try:
            recorder.flush()
        except Exception:
            if wait == interval:
                logger.warning("meterkit: flush failed; retrying", exc_info=True)
            wait = min(5.0, wait * 2)
        else:
            wait = interval
        del recorder
