"""The :class:`Meter` facade: record events, query buckets."""

from __future__ import annotations

import atexit
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
from types import MappingProxyType
from typing import Any, cast

import attrs
import pluggy

from meterkit import assets as assets_module
from meterkit import corrections as corrections_module
from meterkit import costs as costs_module
from meterkit import engine, integrals, pricing, rollups, summaries
from meterkit import lateness as lateness_module
from meterkit import retention as retention_module
from meterkit import spend as spend_module
from meterkit.catalog import builtin_meters
from meterkit.config import load_config
from meterkit.convert import openai_page
from meterkit.costs import CostsPage, UnpricedUsage
from meterkit.countlog import CountLog
from meterkit.engine import rollup, timeweighted
from meterkit.errors import (
    EventConflict,
    LateEventError,
    NotFound,
    StateConflict,
    StoreConflict,
    StoreUnavailable,
    ValidationError,
)
from meterkit.idempotency import classify
from meterkit.ids import new_id
from meterkit.leases import DEFAULT_FLUSH_INTERVAL, check_timing
from meterkit.leases import DEFAULT_TTL as DEFAULT_LEASE_TTL
from meterkit.metrics import Metric, check_metric
from meterkit.models import (
    NAME_RE,
    AppendResult,
    DimValue,
    Event,
    Measure,
    MeterSpec,
    Number,
    UsagePage,
    UsageQuery,
)
from meterkit.notify import AlertNotice, Notifier, Outbox
from meterkit.periods import Period
from meterkit.plans import Grant, OrgPlan, Plan
from meterkit.plugins import get_plugin_manager, make_plugin_manager
from meterkit.pricing import Price, PriceBook
from meterkit.quotas import Decision, Policy, Quotas, Reservation
from meterkit.recovery import rebuild_counters
from meterkit.stores.base import Capabilities, CounterStore, RollupStore, Store
from meterkit.validate import check_event, check_id, check_time, check_usage_query
from meterkit.writer import GroupWriter

__all__ = ["DEFAULT_URL", "Meter", "open_counters", "open_store"]

DEFAULT_URL = "sqlite:///meterkit.db"
DEFAULT_FUTURE_SKEW = 300
MAX_QUEUED = 100_000
Clock = Callable[[], float]
logger = logging.getLogger("meterkit")
_open_meters: weakref.WeakSet[Meter] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    # Leased units go back and queued debit events are written before the interpreter ends.
    for meter in list(_open_meters):
        try:
            meter.close()
        except Exception:  # pragma: no cover - reported, the other meters still close
            logger.exception("meterkit: closing %s at exit failed", meter.url)


def _forget_queue_after_fork() -> None:
    # The queue and the flusher thread belong to the parent, which writes what it queued.
    for meter in list(_open_meters):
        meter._queued = []
        meter._queued_uncounted = []
        meter._deferred = []
        meter._flusher = None
        meter._flush_lock = threading.Lock()
        meter._queue_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_queue_after_fork)


def open_store(url: str, pm: pluggy.PluginManager | None = None) -> Store:
    """Open the store for ``url`` through whichever plugin answers to its scheme."""
    if not isinstance(url, str) or "://" not in url:
        raise ValidationError("url", f"{url!r} is not a store URL such as {DEFAULT_URL!r}")
    pm = pm or get_plugin_manager()
    scheme = url.split("://", 1)[0].lower()
    store: Store | None = pm.hook.meterkit_open_store(url=url, scheme=scheme)
    if store is None:
        known = sorted({s for group in pm.hook.meterkit_store_schemes() for s in group})
        raise ValidationError("url", f"no store for scheme {scheme!r}; installed: {known}")
    return store


class StoreClock:
    """The store's clock (``store.db_now``), or the local one while the store cannot answer.

    Falling back keeps a fail-open quota policy working during an outage.
    """

    def __init__(self, db_now: Clock) -> None:
        self.db_now = db_now

    def __call__(self) -> float:
        try:
            return self.db_now()
        except StoreUnavailable:
            return _time.time()


def open_counters(url: str, pm: pluggy.PluginManager | None = None) -> CounterStore:
    """Open a quota counters backend for ``url``; any event store URL works too."""
    if not isinstance(url, str) or "://" not in url:
        raise ValidationError("counters", f"{url!r} is not a counters URL such as 'redis://...'")
    pm = pm or get_plugin_manager()
    scheme = url.split("://", 1)[0].lower()
    found: CounterStore | None = pm.hook.meterkit_open_counters(url=url, scheme=scheme)
    return found if found is not None else open_store(url, pm)


class Meter:
    """Records usage events and answers bucket queries over them.

    ``Meter("sqlite:///usage.db")`` (the default is ``sqlite:///meterkit.db``), or
    ``Meter("memory://")``. ``plugins`` are registered on a plugin manager of this meter's
    own; ``clock`` returns Unix seconds and is used wherever "now" is needed (default: the
    store's ``db_now`` where it has one, such as PostgreSQL's, else ``time.time``).
    ``max_future_skew`` is how many seconds ahead of that clock an event's time may be
    (default 300; ``None`` accepts any time): usage cannot happen in the future, and an event
    stamped far ahead would otherwise count in a period that has not begun.
    ``retention`` maps meter names to how many days of raw events they keep (see
    :meth:`set_retention`). ``notifiers`` deliver spend alerts (:mod:`meterkit.notify`).
    ``lateness`` (seconds, ``"12h"``, ``"7d"``) is how late an event may arrive
    (:mod:`meterkit.lateness`; default: any time).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        meters: Iterable[MeterSpec] = (),
        plugins: Iterable[object] = (),
        clock: Clock | None = None,
        store: Store | None = None,
        counters: str | CounterStore | None = None,
        policy: Policy = "closed",
        thresholds: Sequence[float] = (0.8, 1.0),
        default_plan: str | None = None,
        record_debits: bool = True,
        max_future_skew: int | None = DEFAULT_FUTURE_SKEW,
        metrics: Iterable[Metric] = (),
        leases: bool = True,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        retention: Mapping[str, Any] | None = None,
        notifiers: Sequence[Notifier] = (),
        lateness: Any = None,
    ) -> None:
        if max_future_skew is not None and (
            isinstance(max_future_skew, bool)
            or not isinstance(max_future_skew, int)
            or max_future_skew < 0
        ):
            raise ValidationError("max_future_skew", "must be a non-negative whole number or None")
        self.max_future_skew = max_future_skew
        self.lateness: int | None = lateness_module.parse_lateness(lateness)
        """Seconds an event may lie before the clock (``None``: any): :mod:`meterkit.lateness`."""
        self._closes: tuple[float, dict[str, int]] | None = None
        if retention is not None and not isinstance(retention, Mapping):
            raise ValidationError("retention", "must map meter names to days")
        wanted_retention = {
            name: retention_module.parse_retention(days, f"retention.{name}")
            for name, days in (retention or {}).items()
        }
        lease_ttl, self.flush_interval = check_timing(lease_ttl, flush_interval)
        plugins = tuple(plugins)
        self.pm = make_plugin_manager(plugins) if plugins else get_plugin_manager()
        self.store: Store = store if store is not None else open_store(url, self.pm)
        self.url = self.store.url
        self.capabilities = Capabilities.of(self.store)
        # A store that can tell the time (PostgreSQL) decides windows and periods by one clock
        # for every process and host; otherwise the local clock.
        db_now = self.capabilities.db_now
        self.clock: Clock = clock or (StoreClock(db_now) if db_now else _time.time)
        self.counters: CounterStore = (
            self.store
            if counters is None
            else open_counters(counters, self.pm)
            if isinstance(counters, str)
            else counters
        )
        self._lock = threading.Lock()
        self._tx = threading.local()
        # Concurrent record() / record_many() calls share one store transaction each time.
        self._writer = GroupWriter(
            self._append_and_count,
            lambda meter, org, ids: self.store.get_events(meter, org, ids),
        )
        self._metrics: dict[str, Metric] = {}
        self._specs = builtin_meters()
        # Live read-only views of both, for what composes this meter (no copy per read).
        self.specs: Mapping[str, MeterSpec] = MappingProxyType(self._specs)
        self.metric_definitions: Mapping[str, Metric] = MappingProxyType(self._metrics)
        self._ready: set[str] = set()
        for group in self.pm.hook.meterkit_register_meters():
            for spec in group or ():
                self.register(spec)
        for spec in meters:
            self.register(spec)
        # Decisions' debit events (counted already) and events still to count wait here for
        # the next flush (see flush()).
        self._queued: list[Event] = []
        self._queued_uncounted: list[Event] = []
        self._deferred: list[Callable[[], object]] = []
        self._queue_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._flushing = 0  # the thread flushing now (while _flush_lock is held)
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self.outbox = Outbox(
            notifiers, store=self.store, counters=self.counters, clock=lambda: self.now()
        )
        """Spend alert notices on their way to ``notifiers`` (see :mod:`meterkit.notify`)."""
        self.quotas = Quotas(
            self,
            policy=policy,
            thresholds=thresholds,
            default_plan=default_plan,
            record_debits=record_debits,
            leases=leases and getattr(self.counters, "shared", True),
            lease_ttl=lease_ttl,
        )
        for metric in metrics:
            self.define_metric(metric)
        self.outbox.start()  # notices a process left undelivered are swept up here too
        for name in wanted_retention:
            if store is None and name not in self._specs:
                self.store.close()
            self.spec(name, f"retention.{name}")
        # Read from the store when first needed: opening a Meter sends nothing to it.
        self._wanted_retention = wanted_retention
        self._retention_known: dict[str, int] | None = None
        _open_meters.add(self)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], **overrides: Any) -> Meter:
        """Open the store a TOML file names and load its meters, prices, plans and orgs.

        Keyword arguments override the file (``url=...`` replaces ``store``).
        """
        config = load_config(path)
        kwargs = config.meter_kwargs()
        metrics = kwargs.pop("metrics", ())
        override = overrides.pop("url", None)
        url = override or config.store
        kwargs.update(overrides)
        try:
            meter = cls(url, **kwargs)
        except ValidationError as exc:
            if exc.field == "url" and not override:
                raise ValidationError("store", exc.message) from None  # the file's own key
            raise
        try:
            for metric in metrics:
                try:
                    meter.set_metric(metric)
                except ValidationError as exc:  # named after the file's [metrics.NAME] table
                    tail = exc.field.removeprefix("metric.").removeprefix("metric")
                    raise ValidationError(
                        f"metrics.{metric.name}{'.' + tail if tail else ''}", exc.message
                    ) from None
            config.apply(meter)
        except BaseException:
            meter.close()
            raise
        return meter

    # -- meters -------------------------------------------------------------------------------

    def register(self, spec: MeterSpec) -> MeterSpec:
        """Add an application meter. Re-registering the same spec is a no-op."""
        if not isinstance(spec, MeterSpec):
            raise ValidationError("spec", "must be a MeterSpec")
        with self._lock:
            known = self._specs.get(spec.name)
            if known is not None and known != spec and spec.name in self._ready:
                # A store may already hold this meter's events: it can grow, not change shape.
                missing = set(known.measure_names) - set(spec.measure_names)
                missing |= set(known.dimension_names) - set(spec.dimension_names)
                if missing:
                    raise ValidationError(
                        "spec", f"cannot drop {sorted(missing)} from {spec.name!r}"
                    )
                self._ready.discard(spec.name)
            self._specs[spec.name] = spec
        quotas: Quotas | None = getattr(self, "quotas", None)
        if quotas is not None:
            quotas.forget()  # compiled limits know which metrics are gauges
        return spec

    def define_metric(self, metric: Metric) -> Metric:
        """Define what a plan metric counts (see :mod:`meterkit.metrics`): its own meter's
        events plus ``metric.sources``. A metric without a meter of its name gets one (a
        plain counter), where decisions record what they admit.

        The definition is stored with this meter's first use of the store (as for
        ``Meter(metrics=[...])``), so every :class:`Meter` on the store counts it within
        ``cache_seconds``; :meth:`set_metric` stores it at once."""
        self._define_metric(metric)
        self.quotas.publish_metric(metric)
        return metric

    def set_metric(self, metric: Metric) -> Metric:
        """Define a plan metric and store it now (``meterkit metrics set``). Every
        :class:`Meter` on the store counts it within ``cache_seconds``, as for a plan change.
        A new or changed definition also rebuilds the metric's counters of the current period
        from the events, for every organization assigned a plan, so a quota counts the usage
        the period already holds."""
        self._define_metric(metric)
        if self.quotas.store_metric(metric):
            rebuild_counters(self, metrics=[metric.name])
        return metric

    def _define_metric(self, metric: Metric) -> Metric:
        if not isinstance(metric, Metric):
            raise ValidationError("metric", "must be a meterkit.Metric")
        if not isinstance(metric.name, str) or not NAME_RE.match(metric.name):
            raise ValidationError("metric.name", f"must match {NAME_RE.pattern}")
        if metric.name not in self._specs:
            self.register(MeterSpec(metric.name, (Measure(metric.name),)))
        check_metric(metric, self._specs)
        self._metrics[metric.name] = metric
        self.quotas.forget()
        return metric

    def defined_metrics(self) -> list[Metric]:
        """Every plan metric defined here or stored by any process, by name."""
        self.quotas.read_metrics()
        return [self._metrics[name] for name in sorted(self._metrics)]

    @property
    def meters(self) -> Mapping[str, MeterSpec]:
        return dict(self._specs)

    def spec(self, name: object, field: str = "meter") -> MeterSpec:
        spec = self._specs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise ValidationError(field, f"unknown meter {name!r}")
        return spec

    def _ensure(self, spec: MeterSpec) -> None:
        # Every time: the store remembers what it created, and forgets it if the transaction
        # that created it rolled back.
        self.store.ensure_meter(spec)
        self._ready.add(spec.name)

    def __repr__(self) -> str:
        builtin = set(builtin_meters())
        own = sorted(n for n in self._specs if n not in builtin)
        parts = [repr(self.url), f"meters={len(self._specs)}"]
        if own:
            parts.append(f"own meters={own}")
        if self.counters is not self.store:
            parts.append(f"counters={self.counters.url!r}")
        if self.lateness is not None:
            parts.append(f"lateness={self.lateness}")
        return f"<Meter {' '.join(parts)}{' closed' if self._closed else ''}>"

    def now(self) -> int:
        return int(self.clock())

    def _end_now(self, start_time: Any) -> int:
        """The default ``end_time``: the end of the current second, so what was recorded just
        now is counted; once ``start_time`` is known to lie before it (a start in the future is
        the start's fault, not that of an end nobody gave)."""
        end = self.now() + 1
        if check_time("start_time", start_time) >= end:
            raise ValidationError(
                "start_time", f"must not be after now ({end - 1}) when no end_time is given"
            )
        return end

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
        """Record one event. ``True`` if it is new, ``False`` if it was already recorded.

        The same ``id`` for the same organization and meter with *other* data (time, values or
        dimensions) raises :class:`~meterkit.errors.EventConflict`; the stored event is kept.
        """
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
        """Record a batch in one transaction: all of it, or (on any invalid event) none.

        Ids already recorded with the same data are counted as ``duplicates``; ids recorded
        with other data are listed in ``conflicts`` (they change nothing and the rest of the
        batch is stored). ``statuses`` gives each event's outcome in order.
        """
        if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Iterable):
            raise ValidationError("events", "must be a list of Event")
        return self._append(list(events), single=False)

    def record_later(self, events: Iterable[Event], *, wait: bool = True) -> None:
        """Validate ``events`` now and queue them for the next flush, without waiting.

        For usage that must not hold up a request (the metering middleware's request events):
        a bad event raises here and nothing is queued; a good one is written within
        ``flush_interval`` seconds, by :meth:`flush` or :meth:`close`. Until then a crash can
        lose it, unlike :meth:`record`, which returns once the event is durable. Ids stay
        idempotent: queuing an event already stored changes nothing. ``wait=False`` never
        writes on this thread, even when the queue is full (an event loop's thread).
        """
        if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Iterable):
            raise ValidationError("events", "must be a list of Event")
        checked = self._checked(list(events), single=False)
        if checked:
            self._queue(checked, wait=wait, counted=False)

    def _append(self, events: Sequence[Event], *, single: bool) -> AppendResult:
        checked = self._checked(events, single=single)
        if not checked:
            return AppendResult(0, 0)
        return self._stored(checked)

    def invalid_events(self, events: Sequence[Event]) -> list[tuple[int, ValidationError]]:
        """Each event ``record_many`` would refuse, by its index, with its error (the field
        named ``events[i]...``); nothing is stored. For a caller that reports every bad event
        of a batch, not only the first."""
        found = []
        for i, event in enumerate(events):
            try:
                self._checked([event], single=False)
            except ValidationError as exc:
                field = exc.field.replace("events[0]", f"events[{i}]", 1)
                found.append((i, ValidationError(field, exc.message)))
        return found

    def _checked(self, events: Sequence[Event], *, single: bool) -> list[Event]:
        """Every event validated against its meter and the clock, or a ValidationError."""
        checked = []
        now = self.now() if events else 0
        latest = None if self.max_future_skew is None else now + self.max_future_skew
        kept = self._retention if events else {}
        closed = self._closed_periods() if events else {}
        earliest = None if self.lateness is None else now - self.lateness
        for i, event in enumerate(events):
            field = "event" if single else f"events[{i}]"
            if not isinstance(event, Event):
                raise ValidationError(field, "must be a meterkit.Event")
            spec = self.spec(event.meter, f"{field}.meter")
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

    def close_period(self, organization_id: str | None, before: Any) -> int:
        """Make usage before ``before`` final for the organization (``None``: every one):
        later events stamped before it are refused with :class:`~meterkit.PeriodClosed`.
        A close only moves forward; returns the time now closed before."""
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

    def closed_before(self, organization_id: str) -> int:
        """The time before which the organization's usage is closed (0: none is)."""
        self._closes = None
        return lateness_module.closed_before(
            self._closed_periods(), check_id("organization_id", organization_id)
        )

    def _closed_periods(self) -> dict[str, int]:
        """The store's closes, read again at most every second (another process may close)."""
        hit = self._closes
        now = _time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        found = lateness_module.closed_map(self.store.list_records(lateness_module.RECORD))
        self._closes = (now + self.quotas.cache_seconds, found)
        return found

    def _record_counted(self, events: Sequence[Event]) -> None:
        """Record a decision's debit events: their units are counted already."""
        self._stored(self._checked(events, single=False), counted=True)

    def _atomic_writes(self) -> Callable[[], contextlib.AbstractContextManager[None]] | None:
        """How to make events and the counter changes they cause commit together: the store's
        transaction (SQLite, memory; PostgreSQL's atomic_writes), with the counters in it or,
        where they are apart (Redis), with their changes logged in it and applied after it
        commits (:mod:`meterkit.countlog`)."""
        return self._logged(self.capabilities.transaction or self.capabilities.atomic_writes)

    def _logged(self, begin: Any) -> Callable[[], contextlib.AbstractContextManager[None]] | None:
        """``begin`` (a store's transaction, or ``None``), with the counter changes made in it
        logged and applied after it commits where the counters are apart from the events."""
        log = self.quotas.countlog
        if begin is not None and log is not None:
            begin = functools.partial(log.around, begin)
        return cast("Callable[[], contextlib.AbstractContextManager[None]] | None", begin)

    @contextlib.contextmanager
    def _writes(self) -> Iterator[None]:
        """A :meth:`transaction` in which events and their counter changes commit together."""
        begin = self._atomic_writes()
        with self.transaction(), begin() if begin is not None else contextlib.nullcontext():
            yield

    def _append_and_count(self, events: Sequence[Event]) -> list[Event]:
        """The group writer's write: the new events, and their usage counted, in one store
        transaction where the store has them (run again, whole, when the store aborted it as
        a deadlock victim)."""
        begin = self._atomic_writes()
        if self.quotas.countlog is not None:
            # What a killed writer left, before this process counts anew.
            self.quotas.countlog.replay_if_due()
        for attempt in itertools.count():
            try:
                with (
                    self.quotas.absorbing(),
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
        """Count newly stored events in the quota counters.

        Inside :meth:`_atomic_writes` the changes commit with the events (logged there, where
        the counters are apart). Outside one (a store without transactions), the events are
        durable once appended, whatever happens to counting them: a failure of the counters
        is logged, not raised, so the events stay acknowledged and are never stored "again"
        as duplicates; :func:`~meterkit.recovery.rebuild_counters` counts them.
        """
        if not new:
            return
        if self._atomic_writes() is not None:
            # In the store's transaction: a failure undoes the append.
            self.quotas.feed(new)
            return
        try:
            self.quotas.feed(new)
        except StoreUnavailable:
            logger.warning(
                "meterkit: %d events stored but not counted in the quota counters "
                "(unavailable); recovery.rebuild_counters counts them",
                len(new),
            )

    def _stored(self, checked: list[Event], *, counted: bool = False) -> AppendResult:
        """Store validated events (grouped with other callers') and tell the observers."""
        self._ensure_meters_of(checked)
        if getattr(self._tx, "depth", 0) or counted:
            # Inside a transaction the events commit with the rest of it, not in a group (a
            # decision's debits are written in the decision's own transaction).
            new = self.store.append(checked)
            if not counted:
                self._count(new)
            result = classify(checked, new, self.store.get_events)
        else:
            result, new = self._writer.append(checked)
        self._tell_recorded(new)
        return result

    def _ensure_meters_of(self, events: Sequence[Event]) -> None:
        for name in {e.meter for e in events}:
            self._ensure(self._specs[name])

    def _tell_recorded(self, new: Sequence[Event]) -> None:
        """The ``meterkit_events_recorded`` hook, after the current transaction commits."""
        if new:
            recorded = tuple(new)
            self.notify(lambda: self.pm.hook.meterkit_events_recorded(meter=self, events=recorded))

    # -- transactions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Make the writes inside one store transaction, where the store can (SQLite, memory).

        Recording, quota debits and settles inside either all happen or (on an exception)
        none do, with one commit instead of one each. Observers — the recorded-events and
        threshold hooks — are told after the outermost transaction commits. Stores without
        transactions across calls (PostgreSQL, whose calls are each atomic) run the writes one
        by one.
        """
        state = self._tx
        depth: int = getattr(state, "depth", 0)
        if depth == 0:
            state.pending = []
        state.depth = depth + 1
        committed = False
        try:
            begin = self._logged(self.capabilities.transaction)
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

    def notify(self, call: Callable[[], object]) -> None:
        """Run an observer call now, or after the current transaction commits."""
        if getattr(self._tx, "depth", 0):
            self._tx.pending.append(call)
        else:
            call()

    # -- queries ------------------------------------------------------------------------------

    def usage(
        self,
        meter: str,
        *,
        organization_id: str,
        start_time: Any,
        end_time: Any = None,
        bucket_width: str = "1d",
        group_by: Iterable[str] | None = None,
        filters: Mapping[str, Iterable[DimValue]] | None = None,
        limit: int | None = None,
        page: str | None = None,
    ) -> UsagePage:
        """One page of buckets: OpenAI usage semantics (see docs/python-api.md)."""
        spec, query, secret = self._usage_query(
            meter,
            organization_id,
            start_time,
            end_time,
            bucket_width,
            group_by,
            filters,
            limit,
            page,
        )
        return engine.build_page(spec, query, self._rows(spec, query), secret)

    def usage_dict(
        self,
        meter: str,
        *,
        organization_id: str,
        start_time: Any,
        end_time: Any = None,
        bucket_width: str = "1d",
        group_by: Iterable[str] | None = None,
        filters: Mapping[str, Iterable[DimValue]] | None = None,
        limit: int | None = None,
        page: str | None = None,
    ) -> dict[str, object]:
        """:meth:`usage` as its OpenAI JSON page (``usage(...).to_dict()``), built straight
        from the store's rows: no object per row. What the HTTP API serves."""
        spec, query, secret = self._usage_query(
            meter,
            organization_id,
            start_time,
            end_time,
            bucket_width,
            group_by,
            filters,
            limit,
            page,
        )
        rows = self._rows(spec, query)
        kind, width = spec.result_object, query.width
        cursor = engine.next_cursor(query, secret)
        return openai_page(
            (
                (start, start + width, ((kind, group, values) for group, values in found))
                for start, found in engine.page_rows(spec, query, rows)
            ),
            cursor is not None,
            cursor,
        )

    def _usage_query(
        self,
        meter: str,
        organization_id: str,
        start_time: Any,
        end_time: Any,
        bucket_width: str,
        group_by: Iterable[str] | None,
        filters: Mapping[str, Iterable[DimValue]] | None,
        limit: int | None,
        page: str | None,
    ) -> tuple[MeterSpec, UsageQuery, bytes]:
        spec = self.spec(meter)
        query = check_usage_query(
            spec,
            organization_id=organization_id,
            start_time=start_time,
            end_time=end_time if end_time is not None else self._end_now(start_time),
            bucket_width=bucket_width,
            group_by=group_by,
            filters=filters,
            limit=limit,
        )
        secret = self.store.secret()
        if page is not None:
            query = attrs.evolve(query, page_start=engine.decode_cursor(secret, query, page))
        return spec, query, secret

    def _rows(self, spec: MeterSpec, query: UsageQuery) -> engine.Rows:
        """The store's native answer, or the engine's over a scan when it has none."""
        self.sync()
        self._ensure(spec)
        days = self._retention.get(spec.name)
        if days is not None:
            retention_module.check_query(
                spec.name,
                days,
                self.now(),
                query.scan_start,
                query.page_end,
                query.width,
                rolled=isinstance(self.store, RollupStore) and rollup.rollable(spec),
            )
        if timeweighted.names(spec):
            retention_module.check_scan("start_time", spec.name, days, self.now(), query.scan_start)
            return integrals.time_weighted_rows(self.store, spec, query)
        rows = self.store.aggregate(spec, query)
        if rows is None:
            # Whatever the store says it keeps, a scan must not start where events are gone.
            retention_module.check_scan("start_time", spec.name, days, self.now(), query.scan_start)
            events = self.store.scan(
                spec.name, query.organization_id, query.scan_start, query.page_end
            )
            rows = engine.aggregate(spec, query, events)
        return rows

    def totals(
        self,
        meter: str,
        *,
        organization_id: str,
        start_time: int,
        end_time: int,
        bucket_width: str = "1d",
    ) -> list[tuple[int, dict[str, Number | None]]]:
        """Per-bucket totals (no grouping) over any span, as ``(bucket_start, values)``.

        Unlike :meth:`usage` there is no page limit: summaries over a month or a year use it.
        """
        spec = self.spec(meter)
        query = check_usage_query(
            spec,
            organization_id=organization_id,
            start_time=start_time,
            end_time=end_time,
            bucket_width=bucket_width,
            group_by=(),
            filters=None,
            limit=None,
        )
        count = -(-(query.end_time - query.page_start) // query.width)
        query = attrs.evolve(query, limit=max(count, 1))
        rows = self._rows(spec, query)
        return sorted((start, values) for (start, _group), values in rows.items())

    def total(
        self, meter: str, measure: str, *, organization_id: str, start_time: int, end_time: int
    ) -> Number:
        """The sum of a counter measure over ``[start_time, end_time)``."""
        spec = self.spec(meter)
        if spec.measure(measure) is None:
            raise ValidationError("measure", f"meter {meter!r} has no measure {measure!r}")
        rows = self.totals(
            meter, organization_id=organization_id, start_time=start_time, end_time=end_time
        )
        return sum((v.get(measure) or 0) for _, v in rows)

    # -- prices and costs (see meterkit.pricing, meterkit.costs) -------------------------------

    def set_price(self, price: Price | Mapping[str, Any]) -> Price:
        """Add or replace a price version (kept by the store)."""
        if isinstance(price, Mapping):
            price = pricing.price_from_dict(price, self._specs)
        self.flush()  # what was recorded at the old prices is in the events
        before = self._book()  # as stored now, not as cached
        saved = pricing.save_price(self.store, price, specs=self._specs)
        self.quotas.forget()  # spend is counted at the new prices from now on
        # and this month's events so far are repriced, so spend keeps equal to the costs.
        self.quotas.reprice(before, saved.meter)
        return saved

    def prices(self) -> PriceBook:
        """The price book as stored now (without the built-in ``charges`` line that bills
        spend given in dollars; see :data:`meterkit.pricing.CHARGES`)."""
        return pricing.load_book(self.store, self._specs)

    def _book(self) -> PriceBook:
        """The price book costs are billed by: the stored prices and the built-in lines."""
        return pricing.load_book(self.store, self._specs, builtin=True)

    def costs(
        self,
        *,
        organization_id: str,
        start_time: Any,
        end_time: Any = None,
        bucket_width: str = "1d",
        group_by: Iterable[str] | None = None,
        filters: Mapping[str, Iterable[str]] | None = None,
        limit: int | None = None,
        page: str | None = None,
    ) -> CostsPage:
        """One page of daily costs: OpenAI costs semantics, exact Decimal amounts."""
        self.sync()
        return costs_module.costs_page(
            self._retained_store(),
            self._specs,
            self._book(),
            organization_id=organization_id,
            start_time=start_time,
            end_time=end_time if end_time is not None else self._end_now(start_time),
            bucket_width=bucket_width,
            group_by=group_by,
            filters=filters,
            limit=limit,
            page=page,
            period_of=self._period_of(organization_id),
            rows=self._rows,
        )

    def unpriced(
        self,
        *,
        organization_id: str,
        start_time: Any,
        end_time: Any = None,
        meters: Iterable[str] | None = None,
    ) -> list[UnpricedUsage]:
        """Usage no price matched: listed, never silently costed at zero."""
        self.sync()
        return costs_module.unpriced(
            self._retained_store(),
            self._specs,
            self._book(),
            organization_id=organization_id,
            start_time=start_time,
            end_time=end_time if end_time is not None else self.now(),
            meters=meters,
        )

    def _period_of(self, organization_id: object) -> Callable[[int], Period] | None:
        if not isinstance(organization_id, str) or not organization_id:
            return None  # the costs query reports the bad organization_id itself
        return lambda t: self.quotas.period(organization_id, t)

    # -- quotas (see meterkit.quotas) ---------------------------------------------------------

    def set_plan(self, plan: Plan) -> Plan:
        """Create or replace a plan (kept by the store)."""
        return self.quotas.set_plan(plan)

    def get_plan(self, plan_id: str) -> Plan | None:
        """A stored plan, or ``None``."""
        return self.quotas.get_plan(check_id("plan_id", plan_id))

    def assign_plan(self, organization_id: str, plan: str, *, seats: int = 1) -> OrgPlan:
        """Put an organization on a plan."""
        return self.quotas.assign(organization_id, plan, seats=seats)

    def grant_credits(
        self,
        organization_id: str,
        credits: int,
        *,
        expires_at: int | None = None,
        id: str | None = None,
    ) -> Grant:
        """Add purchased credits on top of the plan allowance. A grant given again with the
        same ``id`` replaces it, so a retried grant is never added twice."""
        return self.quotas.grant(organization_id, credits, expires_at=expires_at, id=id)

    def plan_of(self, organization_id: str) -> tuple[OrgPlan | None, Plan | None]:
        """The organization's assignment and its plan (``None`` where there is none)."""
        return self.quotas.plan_of(check_id("organization_id", organization_id))

    def check(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        *,
        debit: bool = True,
        requests: int = 1,
        dimensions: Mapping[str, Any] | None = None,
        cost: Any = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Decision:
        """Atomically admit and debit ``amounts`` against every limit, or refuse and debit none.

        ``cost`` (dollars) or ``price`` (``{meter: {measure: amount}}``) is the request's
        estimated spend, held to the spend limit with the other limits (:mod:`meterkit.spend`).
        """
        return self.quotas.check(
            organization_id,
            amounts,
            debit=debit,
            requests=requests,
            dimensions=dimensions,
            cost=cost,
            price=price,
        )

    def reserve(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        *,
        ttl: int = 300,
        requests: int = 1,
        dimensions: Mapping[str, Any] | None = None,
        cost: Any = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Reservation:
        """Hold ``amounts`` (and an estimated ``cost`` / ``price``) until
        ``commit(actual, cost=...)`` or ``release()``; raises QuotaExceeded."""
        return self.quotas.reserve(
            organization_id,
            amounts,
            ttl=ttl,
            requests=requests,
            dimensions=dimensions,
            cost=cost,
            price=price,
        )

    def debit(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        *,
        dimensions: Mapping[str, Any] | None = None,
        cost: Any = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Decision:
        """Count usage (and its ``cost`` as spend) that already happened, without a check."""
        return self.quotas.debit(
            organization_id, amounts, dimensions=dimensions, cost=cost, price=price
        )

    # -- spend limits and alerts (see meterkit.spend) ------------------------------------------

    def set_spend_limit(
        self,
        organization_id: str,
        threshold_amount: int,
        *,
        currency: str = "USD",
        interval: str = "month",
    ) -> spend_module.SpendState:
        """Create or replace the organization's own hard spend limit, in cents per UTC month
        (what its admin key sets over HTTP): at or under the operator's cap
        (:meth:`set_spend_cap`), where one is set."""
        limit = spend_module.SpendLimit.build(
            organization_id,
            {"threshold_amount": threshold_amount, "currency": currency, "interval": interval},
            self.now(),
        )
        cap = spend_module.read_cap(self.store, limit.organization_id)
        if cap is not None and limit.threshold_amount > cap.threshold_amount:
            raise StateConflict(
                "threshold_amount",
                f"must be at most {cap.threshold_amount} cents, the cap the operator set "
                "on this organization's spend limit",
            )
        self.store.put_record(spend_module.LIMIT_RECORD, limit.organization_id, limit.to_record())
        self.quotas.forget()
        return self.spend(organization_id)

    def delete_spend_limit(self, organization_id: str) -> bool:
        """Remove the organization's own spend limit; ``True`` if it had one. The operator's
        cap, if any, stays in force."""
        org = check_id("organization_id", organization_id)
        found = self.store.delete_record(spend_module.LIMIT_RECORD, org)
        self.quotas.forget()
        return found

    def set_spend_cap(self, organization_id: str, threshold_amount: int) -> spend_module.SpendState:
        """The operator's cap on the organization's spend, in cents per UTC month: enforced
        whatever the organization sets itself, which may be lower, never higher, and cannot be
        removed but by the operator (:meth:`delete_spend_cap`)."""
        cap = spend_module.SpendLimit.build(
            organization_id,
            {"threshold_amount": threshold_amount, "currency": "USD", "interval": "month"},
            self.now(),
        )
        self.store.put_record(spend_module.CAP_RECORD, cap.organization_id, cap.to_record())
        self.quotas.forget()
        return self.spend(organization_id)

    def spend_cap(self, organization_id: str) -> int | None:
        """The operator's cap in cents, or ``None``."""
        cap = spend_module.read_cap(self.store, check_id("organization_id", organization_id))
        return None if cap is None else cap.threshold_amount

    def delete_spend_cap(self, organization_id: str) -> bool:
        """Remove the operator's cap; ``True`` if there was one."""
        org = check_id("organization_id", organization_id)
        found = self.store.delete_record(spend_module.CAP_RECORD, org)
        self.quotas.forget()
        return found

    def spend(self, organization_id: str, at: int | None = None) -> spend_module.SpendState:
        """Month-to-date counted spend (open reservations' estimates included) and the limit."""
        org = check_id("organization_id", organization_id)
        now = self.now() if at is None else check_time("at", at)
        self.flush()  # decisions made here and not reported yet count
        month = pricing.default_period_of(now)
        nano = self.quotas.spent(org, now)
        limit = spend_module.read_limit(self.store, org)
        return spend_module.SpendState(
            org, month.start, month.end, spend_module.nano_to_usd(nano), limit
        )

    def create_spend_alert(
        self,
        organization_id: str,
        threshold_amount: int,
        recipients: Sequence[str],
        *,
        subject_prefix: str | None = None,
        currency: str = "USD",
        interval: str = "month",
        id: str | None = None,
    ) -> spend_module.SpendAlert:
        """An alert at ``threshold_amount`` cents of month-to-date spend, emailed to
        ``recipients`` (and sent to every notifier) once per month."""
        return self.put_spend_alert(
            organization_id,
            id or new_id("spalert"),
            {
                "threshold_amount": threshold_amount,
                "currency": currency,
                "interval": interval,
                "notification_channel": {
                    "type": "email",
                    "recipients": list(recipients)
                    if not isinstance(recipients, (str, bytes))
                    else recipients,
                    "subject_prefix": subject_prefix,
                },
            },
        )

    def put_spend_alert(
        self, organization_id: str, alert_id: str, data: Mapping[str, Any]
    ) -> spend_module.SpendAlert:
        """Create or replace an alert from the SDK's fields (``threshold_amount``,
        ``currency``, ``interval``, ``notification_channel``); creation time is kept."""
        org = check_id("organization_id", organization_id)
        alert = spend_module.SpendAlert.build(alert_id, org, data, self.now())
        old = spend_module.get_alert(self.store, org, alert.id)
        if old is not None:
            alert = attrs.evolve(alert, created_at=old.created_at)
        elif len(self.store.list_records(spend_module.alert_kind(org))) >= spend_module.MAX_ALERTS:
            raise StateConflict(
                "threshold_amount",
                f"an organization has at most {spend_module.MAX_ALERTS} spend alerts; "
                "update or delete one",
            )
        self.store.put_record(spend_module.alert_kind(org), alert.id, alert.to_record())
        self.quotas.forget()
        return alert

    def spend_alert(self, organization_id: str, alert_id: str) -> spend_module.SpendAlert | None:
        return spend_module.get_alert(
            self.store, check_id("organization_id", organization_id), check_id("id", alert_id)
        )

    def spend_alerts(self, organization_id: str) -> list[spend_module.SpendAlert]:
        """The organization's spend alerts, oldest first."""
        return spend_module.list_alerts(self.store, check_id("organization_id", organization_id))

    def delete_spend_alert(self, organization_id: str, alert_id: str) -> bool:
        org = check_id("organization_id", organization_id)
        found = self.store.delete_record(spend_module.alert_kind(org), check_id("id", alert_id))
        self.quotas.forget()
        return found

    def _spend_alert(self, alert: spend_module.SpendAlert, used: int, period_start: int) -> None:
        """An alert fired: the threshold hook now, the notifiers from the outbox."""
        self.pm.hook.meterkit_quota_threshold(
            meter=self,
            organization_id=alert.organization_id,
            metric=spend_module.SPEND,
            threshold=1.0,
            used=used,
            limit=alert.threshold_nano,
            period_start=period_start,
            alert=alert,
        )
        self.outbox.submit(AlertNotice(alert, used, period_start, self.now()))

    # -- retention (see meterkit.retention) ---------------------------------------------------

    @property
    def retention(self) -> Mapping[str, int]:
        """Days of raw events kept, per meter that has a retention."""
        return dict(self._retention)

    @property
    def _retention(self) -> dict[str, int]:
        known = self._retention_known
        if known is None:
            with self._lock:
                known = self._retention_known
                if known is None:
                    known = retention_module.from_records(
                        self.store.list_records(retention_module.RECORD)
                    )
                    for name, days in self._wanted_retention.items():
                        self._keep(known, name, days)
                    self._retention_known = known
        return known

    def _keep(self, known: dict[str, int], name: str, days: int | None) -> None:
        """Store ``name``'s retention where it differs from ``known``, and note it there."""
        if known.get(name) == days:
            return
        if days is None:
            self.store.delete_record(retention_module.RECORD, name)
            known.pop(name, None)
        else:
            self.store.put_record(retention_module.RECORD, name, {"days": days})
            known[name] = days

    def set_retention(self, meter: str, days: Any) -> int | None:
        """Keep ``meter``'s raw events for ``days`` whole days (``90``, ``"90d"``); ``None``
        keeps them all. Kept by the store, so every process opened after this knows it."""
        spec = self.spec(meter, f"retention.{meter}" if isinstance(meter, str) else "meter")
        parsed = retention_module.parse_retention(days, f"retention.{spec.name}")
        known = self._retention
        with self._lock:
            self._keep(known, spec.name, parsed)
        return parsed

    def prune(self, meters: Iterable[str] | str | None = None) -> dict[str, int]:
        """Drop the raw events (and minute rollups) that ``meters`` (default: every meter with
        a retention) no longer keep; the events dropped per meter. Hour and day rollups stay.
        """
        return rollups.prune(self, meters, sorted(self._retention), self._retention)

    def _retained_store(self) -> Store:
        """The store, its scans refused where they would need dropped raw events."""
        if not self._retention:
            return self.store
        return cast(Store, _RetainedStore(self.store, self._retention, self.now()))

    # -- rollups (see meterkit.rollups) -------------------------------------------------------

    def rebuild_rollups(
        self, meters: Iterable[str] | str | None = None, *, progress: rollups.Progress | None = None
    ) -> dict[str, int]:
        """Fold the rollups of ``meters`` (default: every meter) anew from their events, each
        meter atomically; ``progress(meter, events_read)`` as it goes. Events read per meter;
        ``{}`` when the store keeps no rollups."""
        return rollups.rebuild(self, meters, sorted(self._specs), progress)

    def verify_rollups(self, meters: Iterable[str] | str | None = None) -> list[str]:
        """Every difference between the stored rollups of ``meters`` (default: every meter)
        and what their events give, one line each: ``[]`` when they agree. Changes nothing."""
        return rollups.verify(self, meters, sorted(self._specs))

    # -- summaries (see meterkit.summaries) ---------------------------------------------------

    def plan_usage(
        self, organization_id: str, start_date: Any = None, end_date: Any = None
    ) -> dict[str, Any]:
        """Usage over a date range against the plan's limits (``GET /api/v1/usage``)."""
        return summaries.plan_usage(self, organization_id, start_date, end_date)

    def quota_status(self, organization_id: str) -> dict[str, Any]:
        """Every limit of an organization now: quotas, gauges, rate limits, the spend limit
        (``GET /v1/organization/quota``; see :func:`meterkit.summaries.quota_status`)."""
        return summaries.quota_status(self, organization_id)

    def account_usage(self, organization_id: str, role: str = "member") -> dict[str, Any]:
        """Storage, credits and plan, with admin-only fields for admins (``GET /v1/usage``)."""
        return summaries.account_usage(self, organization_id, role)

    def current_usage(self, organization_id: str) -> dict[str, Any]:
        """This billing period's storage, tiles, credits and jobs (operation ``usage.current``)."""
        return summaries.current_usage(self, organization_id)

    def usage_history(self, organization_id: str, months: int = 6) -> list[dict[str, Any]]:
        """Tile requests and peak storage per billing period, oldest first (``usage.history``)."""
        return summaries.usage_history(self, organization_id, months)

    def recalculate_storage(self, organization_id: str) -> dict[str, Any]:
        """Recount storage from the organization's real assets: what a
        ``meterkit_stored_assets`` plugin reports, else the asset registry."""
        return summaries.recalculate_storage(self, organization_id)

    # -- the asset registry (see meterkit.assets) ----------------------------------------------

    def put_asset(self, organization_id: str, resource: str, size: int) -> assets_module.Asset:
        """Register (or resize) one stored asset of the organization, ``size`` in bytes."""
        return assets_module.put_asset(self.store, organization_id, resource, size, self.now())

    def delete_asset(self, organization_id: str, resource: str) -> bool:
        """Forget a stored asset; ``True`` if it was registered."""
        return assets_module.delete_asset(self.store, organization_id, resource)

    def assets(self, organization_id: str) -> list[assets_module.Asset]:
        """The organization's registered assets, by name."""
        return assets_module.list_assets(self.store, organization_id)

    # -- corrections (see meterkit.corrections) ------------------------------------------------

    def void(
        self, meter: str, organization_id: str, event_id: str, *, reason: str, actor: str
    ) -> corrections_module.Correction:
        """Void a stored event: it counts for nothing any more (its id stays taken)."""
        return self._correct(meter, organization_id, event_id, "void", None, None, reason, actor)

    def amend(
        self,
        meter: str,
        organization_id: str,
        event_id: str,
        *,
        values: Mapping[str, Number] | None = None,
        dimensions: Mapping[str, DimValue] | None = None,
        reason: str,
        actor: str,
    ) -> corrections_module.Correction:
        """Give a stored event new ``values`` and/or ``dimensions`` (each replaced whole;
        its time stays)."""
        if values is None and dimensions is None:
            raise ValidationError("values", "give values or dimensions to amend")
        return self._correct(
            meter, organization_id, event_id, "amend", values, dimensions, reason, actor
        )

    def corrections(
        self, organization_id: str, *, meter: str | None = None, event_id: str | None = None
    ) -> list[corrections_module.Correction]:
        """The organization's corrections, oldest first, optionally of one meter or event."""
        org = check_id("organization_id", organization_id)
        found = [
            corrections_module.Correction.from_record(key, org, data)
            for key, data in self.store.list_records(corrections_module.kind(org))
        ]
        found = [
            c
            for c in found
            if (meter is None or c.meter == meter) and (event_id is None or c.event_id == event_id)
        ]
        return sorted(found, key=lambda c: (c.at, c.id))

    def _correct(
        self,
        meter: str,
        organization_id: str,
        event_id: str,
        action: corrections_module.Action,
        values: Mapping[str, Number] | None,
        dimensions: Mapping[str, DimValue] | None,
        reason: str,
        actor: str,
    ) -> corrections_module.Correction:
        spec = self.spec(meter)
        org = check_id("organization_id", organization_id)
        eid = check_id("event_id", event_id)
        why = corrections_module.check_reason(reason)
        who = corrections_module.check_actor(actor)
        replace = self.capabilities.replace_event
        if replace is None:
            raise ValidationError("meter", f"the store {self.url} cannot correct events")
        self._ensure(spec)
        self.flush()  # events queued here are in the store first
        found = self.store.get_events(spec.name, org, [eid])
        if not found:
            raise NotFound("event_id", f"no event {eid!r} of meter {spec.name!r} for {org}")
        old = found[0]
        if action == "void":
            if not old.values:
                raise StateConflict("event_id", f"{eid!r} is void already")
            new = Event(old.id, spec.name, org, old.time, {}, dict(old.dimensions))
        else:
            draft = Event(
                old.id,
                spec.name,
                org,
                old.time,
                dict(old.values) if values is None else values,
                dict(old.dimensions) if dimensions is None else dimensions,
            )
            try:
                new = check_event(spec, draft, "event")
            except ValidationError as exc:
                raise ValidationError(exc.field.removeprefix("event."), exc.message) from None
            if new.values == old.values and new.dimensions == old.dimensions:
                raise StateConflict("values", "the amendment changes nothing")
        now = self.now()
        self._closes = None  # a close made elsewhere a moment ago counts
        lateness_module.check_open("event_id", self._closed_periods(), org, old.time, f"{eid!r} is")
        retention_module.check_kept(
            "event_id", spec.name, self._retention.get(spec.name), now, old.time, f"{eid!r} is"
        )
        correction = corrections_module.Correction(
            new_id("corr"),
            org,
            spec.name,
            eid,
            action,
            why,
            who,
            now,
            corrections_module.event_dict(old),
            corrections_module.event_dict(new),
        )
        with self._writes():
            replaced = replace(spec, new)
            if replaced is None:
                raise ValidationError("event_id", f"no event {eid!r} of meter {spec.name!r}")
            self.quotas.recount([replaced], [new])
            self.store.put_record(
                corrections_module.kind(org), correction.id, correction.to_record()
            )
        return correction

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Give back leased quota, write queued debit events, then release the store."""
        if self._closed:
            return
        self._closed = True
        _open_meters.discard(self)
        self._wake.set()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=max(5.0, 10 * self.flush_interval))
        try:
            self.flush(release_leases=True)
        except StoreUnavailable as exc:
            logger.warning("meterkit: the last flush of %s failed: %s", self.url, exc)
        except Exception:
            logger.exception("meterkit: the last flush of %s failed", self.url)
        finally:
            self.outbox.close()
            if self.counters is not self.store:
                self.counters.close()
            self.store.close()

    # -- the flush: debit events and lease reports ------------------------------------------

    def flush(self, *, release_leases: bool = False) -> None:
        """Write queued debit events and report leased quota now.

        Decisions admitted from a lease queue their debit events and count their units in the
        lease; a background thread does this every ``flush_interval`` seconds. Call it where
        the next step must see every decision made so far (queries do, for this meter).
        ``release_leases`` also gives back every unused lease (held reservations stay).
        """
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
            log = self.quotas.countlog
            if log is not None:
                log.replay_if_due()
            leases = self.quotas.leases
            if log is not None and log.behind and leases is not None and leases.pending():
                # A lease report must not run before the changes logged ahead of it.
                raise StoreUnavailable("counters unavailable: logged changes wait to be applied")
            reporting = leases is not None and (
                leases.pending() or (release_leases and leases.holding())
            )
            # The report in the events' transaction where the counters are in the store.
            begin = self._atomic_writes() if self.counters is self.store else None
            if reporting and begin is not None:
                assert leases is not None
                self._report_and_write(leases, begin, release_leases)
                return
            if reporting and log is not None:
                assert leases is not None
                self._write_then_report(leases, log, release_leases)
                return
            if reporting:
                assert leases is not None
                leases.report(self.now(), closing=release_leases)
            counted, uncounted = self._take_queue()
            if counted or uncounted:
                try:
                    self._write_queued(counted, uncounted)
                except BaseException:
                    self._requeue(counted, uncounted)
                    raise

    def _take_queue(self) -> tuple[list[Event], list[Event]]:
        """The queued events (decisions' counted debits, and events still to count)."""
        with self._queue_lock:
            counted, self._queued = self._queued, []
            uncounted, self._queued_uncounted = self._queued_uncounted, []
        return counted, uncounted

    def _requeue(self, counted: list[Event], uncounted: list[Event]) -> None:
        """Put events a failed flush took back in front, in order, for the next one."""
        with self._queue_lock:
            self._queued[:0] = counted
            self._queued_uncounted[:0] = uncounted

    def _report_and_write(
        self,
        leases: Any,
        begin: Callable[[], contextlib.AbstractContextManager[None]],
        closing: bool,
    ) -> None:
        """The lease report and the queued events in one store transaction: a ``kill -9``
        leaves both or neither. The report reads the leases and takes the queue in one
        instant, and a leased decision queues its events with its consumption, so the report
        counts exactly the units of the events written."""
        taken: list[tuple[list[Event], list[Event]]] = []
        with leases.reporting() as report:
            try:
                with self.transaction(), begin():
                    report(self.now(), closing, lambda: taken.append(self._take_queue()))
                    counted, uncounted = taken[0]
                    if counted or uncounted:
                        self._write_queued(counted, uncounted)
            except BaseException:
                if taken:
                    self._requeue(*taken[0])
                raise

    def _write_then_report(self, leases: Any, log: CountLog, closing: bool) -> None:
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
                with self._writes():
                    pending = log.collecting()
                    assert pending is not None  # inside the write: its changes are collected
                    for org, key, units in absorbed:
                        pending.append((org, [(key, units)], {}))
                    if counted or uncounted:
                        self._write_queued(counted, uncounted)
            except BaseException:
                self._requeue(counted, uncounted)
                raise
            return log.last_applied()

        with leases.reporting() as report:
            report(self.now(), closing, lambda: taken.append(self._take_queue()), write)

    def _write_queued(self, counted: list[Event], uncounted: list[Event]) -> None:
        """Write queued events in one store transaction (where the store has them), count the
        new ones not counted yet, and tell the observers after it commits."""
        events = counted + uncounted
        self._ensure_meters_of(events)
        with self._writes():
            new = self.store.append(events)
            waiting = {id(e) for e in uncounted}
            self._count([e for e in new if id(e) in waiting])
            self._tell_recorded(new)

    def sync(self) -> None:
        """Flush when this meter holds anything a query should see (queued events, leased
        usage not yet reported); within a transaction, nothing: its own writes are seen."""
        if getattr(self._tx, "depth", 0):
            return
        leases = self.quotas.leases
        queued = self._queued or self._queued_uncounted or self._deferred
        # A flush in another thread (the background one) may be writing what this thread
        # queued: waiting for its lock waits for that write to commit.
        elsewhere = self._flush_lock.locked() and self._flushing != threading.get_ident()
        if queued or elsewhere or (leases is not None and leases.unreported()):
            self.flush()

    def _queue(self, events: Sequence[Event], *, wait: bool = True, counted: bool = True) -> None:
        """Queue validated events for the next flush, without waiting for it (unless the
        backlog is too long and ``wait`` allows it: then the store sets the pace).
        ``counted``: a decision's debits, already in the counters; else counted when written."""
        with self._queue_lock:
            (self._queued if counted else self._queued_uncounted).extend(events)
            backlog = len(self._queued) + len(self._queued_uncounted)
        self._start_flusher()
        if wait and backlog > MAX_QUEUED:
            self.flush()  # the store is slower than the decisions: they wait for it now

    def _defer(self, call: Callable[[], object]) -> None:
        """Run ``call`` at the next flush, in the flushing thread (store I/O off a loop)."""
        with self._queue_lock:
            self._deferred.append(call)
        self._start_flusher()

    def _start_flusher(self) -> None:
        if self._flusher is not None or self._closed:
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

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _RetainedStore:
    """A store whose scans fail with RetentionError before a meter's retained window."""

    def __init__(self, store: Store, days: Mapping[str, int], now: int) -> None:
        self._store = store
        self._days = days
        self._now = now

    def scan(self, meter: str, organization_id: str, start: int, end: int) -> Iterator[Event]:
        retention_module.check_scan("start_time", meter, self._days.get(meter), self._now, start)
        return self._store.scan(meter, organization_id, start, end)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _flush_loop(ref: weakref.ref[Meter], wake: threading.Event, interval: float) -> None:
    """Flush every ``interval`` seconds until the meter closes or is collected.

    While the store fails, the wait doubles up to 5 s and only the first failure is logged;
    what was not written stays queued, and decisions go on against their leases meanwhile.
    """
    wait = interval
    while not wake.wait(wait):
        meter = ref()
        if meter is None or meter._closed:
            return
        try:
            meter.flush()
        except Exception:
            if wait == interval:
                logger.warning("meterkit: flush failed; retrying", exc_info=True)
            wait = min(5.0, wait * 2)
        else:
            wait = interval
        del meter
