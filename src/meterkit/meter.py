"""The :class:`Meter` facade: record events, query buckets."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time as _time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from meterkit import assets as assets_module
from meterkit import corrections as corrections_module
from meterkit import lateness as lateness_module
from meterkit import maintenance, pricing, summaries
from meterkit import retention as retention_module
from meterkit import spend as spend_module
from meterkit.catalog import builtin_meters
from meterkit.config import load_config
from meterkit.costs import CostsPage, CostsReader, UnpricedUsage
from meterkit.errors import (
    StoreUnavailable,
    ValidationError,
)
from meterkit.models import (
    AppendResult,
    Event,
    MeterSpec,
    Number,
    UsagePage,
)
from meterkit.notify import AlertNotice, Notifier, Outbox
from meterkit.planmetrics import Metric
from meterkit.plans import Grant, OrgPlan, Plan
from meterkit.plugins import get_plugin_manager, make_plugin_manager
from meterkit.pricing import Price, PriceBook
from meterkit.query import UsageReader

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from meterkit.corrections import AmendKeywords
    from meterkit.costs import CostsKeywords, UnpricedKeywords
    from meterkit.query import SpanKeywords, TotalsKeywords, UsageKeywords
    from meterkit.quotas.book import AlertKeywords, GrantKeywords
    from meterkit.quotas.decision import CheckKeywords, DebitKeywords, ReserveKeywords
    from meterkit.recorder import EventKeywords
from meterkit.quotas import Decision, Policy, Quotas, Reservation
from meterkit.quotas.leases import DEFAULT_FLUSH_INTERVAL, check_timing
from meterkit.quotas.leases import DEFAULT_TTL as DEFAULT_LEASE_TTL
from meterkit.recorder import Recorder, check_future_skew
from meterkit.recovery import rebuild_counters
from meterkit.registry import Registry
from meterkit.retention import Retention
from meterkit.stores.base import Capabilities, CounterStore, Store
from meterkit.validate import check_id

__all__ = ["DEFAULT_URL", "Meter", "open_counters", "open_store"]

DEFAULT_URL = "sqlite:///meterkit.db"
DEFAULT_FUTURE_SKEW = 300
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
        self.max_future_skew = check_future_skew(max_future_skew)
        self.lateness: int | None = lateness_module.parse_lateness(lateness)
        """Seconds an event may lie before the clock (``None``: any): :mod:`meterkit.lateness`."""
        wanted_retention = retention_module.parse_retentions(retention)
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
            open_counters(counters, self.pm)
            if isinstance(counters, str)
            else counters or self.store
        )
        self.registry = Registry(self.store)
        """The meters and plan metrics this meter knows."""
        # Live read-only views of both, for what composes this meter (no copy per read).
        self.specs: Mapping[str, MeterSpec] = self.registry.specs
        self.metric_definitions: Mapping[str, Metric] = self.registry.metrics
        self.retention_days = Retention(self.store, wanted_retention)
        """Days of raw events kept per meter, as stored (read when first needed)."""
        self.recorder = Recorder(
            self.store,
            self.registry,
            self.retention_days,
            clock=self.clock,
            capabilities=self.capabilities,
            max_future_skew=self.max_future_skew,
            lateness=self.lateness,
            flush_interval=self.flush_interval,
            recorded=self._recorded,
        )
        """The write path: validation, group commit, the queue and its flush."""
        self.reader = UsageReader(
            self.store,
            self.registry,
            self.retention_days,
            clock=self.clock,
            sync=self.recorder.sync,
        )
        """The read path: usage queries over rollups or events."""
        for group in self.pm.hook.meterkit_register_meters():
            for spec in group or ():
                self.register(spec)
        for spec in meters:
            self.register(spec)
        self.outbox = Outbox(
            notifiers, store=self.store, counters=self.counters, clock=self.recorder.now
        )
        """Spend alert notices on their way to ``notifiers`` (see :mod:`meterkit.notify`)."""
        self.quotas = Quotas(
            self.recorder,
            self.registry,
            self.counters,
            threshold_reached=self._threshold_reached,
            spend_alert_fired=self._spend_alert,
            policy=policy,
            thresholds=thresholds,
            default_plan=default_plan,
            record_debits=record_debits,
            leases=leases and getattr(self.counters, "shared", True),
            lease_ttl=lease_ttl,
        )
        self.costs_reader = CostsReader(
            self.reader, self.quotas.book.stored_book, self.quotas.period
        )
        """Costs pages priced from the read path, in each organization's billing periods."""
        for metric in metrics:
            self.define_metric(metric)
        self.outbox.start()  # notices a process left undelivered are swept up here too
        for name in wanted_retention:
            if store is None and name not in self.specs:
                self.store.close()
            self.spec(name, f"retention.{name}")
        _open_meters.add(self)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], **overrides: Any) -> Meter:
        """Open the store a TOML file names and load its meters, prices, plans and orgs.

        Keyword arguments override the file (``url=...`` replaces ``store``).
        """
        return load_config(path).open(cls, **overrides)

    # -- meters -------------------------------------------------------------------------------

    def register(self, spec: MeterSpec) -> MeterSpec:
        """Add an application meter. Re-registering the same spec is a no-op."""
        return self.registry.register(spec)

    def define_metric(self, metric: Metric) -> Metric:
        """Define what a plan metric counts (see :mod:`meterkit.planmetrics`): its own meter's
        events plus ``metric.sources``. A metric without a meter of its name gets one (a
        plain counter), where decisions record what they admit.

        The definition is stored with this meter's first use of the store (as for
        ``Meter(metrics=[...])``), so every :class:`Meter` on the store counts it within
        ``cache_seconds``; :meth:`set_metric` stores it at once."""
        self.registry.define_metric(metric)
        self.quotas.publish_metric(metric)
        return metric

    def set_metric(self, metric: Metric) -> Metric:
        """Define a plan metric and store it now (``meterkit metrics set``). Every
        :class:`Meter` on the store counts it within ``cache_seconds``, as for a plan change.
        A new or changed definition also rebuilds the metric's counters of the current period
        from the events, for every organization assigned a plan, so a quota counts the usage
        the period already holds."""
        self.registry.define_metric(metric)
        if self.quotas.store_metric(metric):
            rebuild_counters(self, metrics=[metric.name])
        return metric

    def defined_metrics(self) -> list[Metric]:
        """Every plan metric defined here or stored by any process, by name."""
        self.quotas.read_metrics()
        metrics = self.registry.metrics
        return [metrics[name] for name in sorted(metrics)]

    @property
    def meters(self) -> Mapping[str, MeterSpec]:
        return dict(self.registry.specs)

    def spec(self, name: object, field: str = "meter") -> MeterSpec:
        return self.registry.spec(name, field)

    def __repr__(self) -> str:
        builtin = set(builtin_meters())
        own = sorted(n for n in self.specs if n not in builtin)
        parts = [repr(self.url), f"meters={len(self.specs)}"]
        if own:
            parts.append(f"own meters={own}")
        if self.counters is not self.store:
            parts.append(f"counters={self.counters.url!r}")
        if self.lateness is not None:
            parts.append(f"lateness={self.lateness}")
        return f"<Meter {' '.join(parts)}{' closed' if self.recorder.closed else ''}>"

    def now(self) -> int:
        return int(self.clock())

    # -- recording ----------------------------------------------------------------------------

    def record(
        self, meter: str, values: Mapping[str, Number], **event: Unpack[EventKeywords]
    ) -> bool:
        """Record one event (``organization_id=``, and ``time``, ``id``, ``dimensions``).
        ``True`` if it is new, ``False`` if it was already recorded.

        The same ``id`` for the same organization and meter with *other* data (time, values or
        dimensions) raises :class:`~meterkit.errors.EventConflict`; the stored event is kept.
        """
        return self.recorder.record(meter, values, **event)

    def record_many(self, events: Iterable[Event]) -> AppendResult:
        """Record a batch in one transaction: all of it, or (on any invalid event) none.

        Ids already recorded with the same data are counted as ``duplicates``; ids recorded
        with other data are listed in ``conflicts`` (they change nothing and the rest of the
        batch is stored). ``statuses`` gives each event's outcome in order.
        """
        return self.recorder.record_many(events)

    def record_later(self, events: Iterable[Event], *, wait: bool = True) -> None:
        """Validate ``events`` now and queue them for the next flush, without waiting.

        For usage that must not hold up a request (the metering middleware's request events):
        a bad event raises here and nothing is queued; a good one is written within
        ``flush_interval`` seconds, by :meth:`flush` or :meth:`close`. Until then a crash can
        lose it, unlike :meth:`record`, which returns once the event is durable. Ids stay
        idempotent: queuing an event already stored changes nothing. ``wait=False`` never
        writes on this thread, even when the queue is full (an event loop's thread).
        """
        self.recorder.record_later(events, wait=wait)

    def invalid_events(self, events: Sequence[Event]) -> list[tuple[int, ValidationError]]:
        """Each event ``record_many`` would refuse, by its index, with its error (the field
        named ``events[i]...``); nothing is stored. For a caller that reports every bad event
        of a batch, not only the first."""
        return self.recorder.invalid_events(events)

    # -- closed periods (see meterkit.lateness) -------------------------------------------------

    def close_period(self, organization_id: str | None, before: Any) -> int:
        """Make usage before ``before`` final for the organization (``None``: every one):
        later events stamped before it are refused with :class:`~meterkit.PeriodClosed`.
        A close only moves forward; returns the time now closed before."""
        return self.recorder.close_period(organization_id, before)

    def closed_before(self, organization_id: str) -> int:
        """The time before which the organization's usage is closed (0: none is)."""
        return lateness_module.closed_before(
            self.recorder.closed_periods(fresh=True), check_id("organization_id", organization_id)
        )

    # -- transactions -------------------------------------------------------------------------

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Make the writes inside one store transaction, where the store can (SQLite, memory).

        Recording, quota debits and settles inside either all happen or (on an exception)
        none do, with one commit instead of one each. Observers — the recorded-events and
        threshold hooks — are told after the outermost transaction commits. Stores without
        transactions across calls (PostgreSQL, whose calls are each atomic) run the writes one
        by one.
        """
        return self.recorder.transaction()

    def notify(self, call: Callable[[], object]) -> None:
        """Run an observer call now, or after the current transaction commits."""
        self.recorder.notify(call)

    # -- queries ------------------------------------------------------------------------------

    def usage(self, meter: str, **query: Unpack[UsageKeywords]) -> UsagePage:
        """One page of buckets: OpenAI usage semantics (see docs/python-api.md)."""
        return self.reader.page(*self.reader.query(meter, **query))

    def usage_dict(self, meter: str, **query: Unpack[UsageKeywords]) -> dict[str, object]:
        """:meth:`usage` as its OpenAI JSON page (``usage(...).to_dict()``), built straight
        from the store's rows: no object per row. What the HTTP API serves."""
        return self.reader.page_dict(*self.reader.query(meter, **query))

    def totals(
        self, meter: str, **query: Unpack[TotalsKeywords]
    ) -> list[tuple[int, dict[str, Number | None]]]:
        """Per-bucket totals (no grouping) over any span, as ``(bucket_start, values)``.

        Unlike :meth:`usage` there is no page limit: summaries over a month or a year use it.
        """
        return self.reader.totals(meter, **query)

    def total(self, meter: str, measure: str, **span: Unpack[SpanKeywords]) -> Number:
        """The sum of a counter measure over ``[start_time, end_time)``."""
        return self.reader.total(meter, measure, **span)

    # -- prices and costs (see meterkit.pricing, meterkit.costs) -------------------------------

    def set_price(self, price: Price | Mapping[str, Any]) -> Price:
        """Add or replace a price version (kept by the store)."""
        return self.quotas.set_price(price)

    def prices(self) -> PriceBook:
        """The price book as stored now (without the built-in ``charges`` line that bills
        spend given in dollars; see :data:`meterkit.pricing.CHARGES`)."""
        return pricing.load_book(self.store, self.specs)

    def costs(self, **query: Unpack[CostsKeywords]) -> CostsPage:
        """One page of daily costs: OpenAI costs semantics, exact Decimal amounts."""
        return self.costs_reader.page(**query)

    def unpriced(self, **query: Unpack[UnpricedKeywords]) -> list[UnpricedUsage]:
        """Usage no price matched: listed, never silently costed at zero."""
        return self.costs_reader.unpriced(**query)

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
        self, organization_id: str, credits: int, **grant: Unpack[GrantKeywords]
    ) -> Grant:
        """Add purchased credits on top of the plan allowance (``expires_at``, ``id``). A grant
        given again with the same ``id`` replaces it, so a retried grant is never added twice."""
        return self.quotas.grant(organization_id, credits, **grant)

    def plan_of(self, organization_id: str) -> tuple[OrgPlan | None, Plan | None]:
        """The organization's assignment and its plan (``None`` where there is none)."""
        return self.quotas.plan_of(check_id("organization_id", organization_id))

    def check(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        **options: Unpack[CheckKeywords],
    ) -> Decision:
        """Atomically admit and debit ``amounts`` against every limit, or refuse and debit none.

        ``cost`` (dollars) or ``price`` (``{meter: {measure: amount}}``) is the request's
        estimated spend, held to the spend limit with the other limits (:mod:`meterkit.spend`).
        """
        return self.quotas.check(organization_id, amounts, **options)

    def reserve(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        **options: Unpack[ReserveKeywords],
    ) -> Reservation:
        """Hold ``amounts`` (and an estimated ``cost`` / ``price``) until
        ``commit(actual, cost=...)`` or ``release()``; raises QuotaExceeded."""
        return self.quotas.reserve(organization_id, amounts, **options)

    def debit(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        **options: Unpack[DebitKeywords],
    ) -> Decision:
        """Count usage (and its ``cost`` as spend) that already happened, without a check."""
        return self.quotas.debit(organization_id, amounts, **options)

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
        self.quotas.book.set_spend_limit(
            organization_id, threshold_amount, currency=currency, interval=interval
        )
        return self.spend(organization_id)

    def delete_spend_limit(self, organization_id: str) -> bool:
        """Remove the organization's own spend limit; ``True`` if it had one. The operator's
        cap, if any, stays in force."""
        return self.quotas.book.delete_spend_limit(organization_id)

    def set_spend_cap(self, organization_id: str, threshold_amount: int) -> spend_module.SpendState:
        """The operator's cap on the organization's spend, in cents per UTC month: enforced
        whatever the organization sets itself, which may be lower, never higher, and cannot be
        removed but by the operator (:meth:`delete_spend_cap`)."""
        self.quotas.book.set_spend_cap(organization_id, threshold_amount)
        return self.spend(organization_id)

    def spend_cap(self, organization_id: str) -> int | None:
        """The operator's cap in cents, or ``None``."""
        return self.quotas.book.spend_cap(organization_id)

    def delete_spend_cap(self, organization_id: str) -> bool:
        """Remove the operator's cap; ``True`` if there was one."""
        return self.quotas.book.delete_spend_cap(organization_id)

    def spend(self, organization_id: str, at: int | None = None) -> spend_module.SpendState:
        """Month-to-date counted spend (open reservations' estimates included) and the limit."""
        return self.quotas.spend_state(organization_id, at)

    def create_spend_alert(
        self,
        organization_id: str,
        threshold_amount: int,
        recipients: Sequence[str],
        **alert: Unpack[AlertKeywords],
    ) -> spend_module.SpendAlert:
        """An alert at ``threshold_amount`` cents of month-to-date spend, emailed to
        ``recipients`` (and sent to every notifier) once per month; ``subject_prefix``,
        ``currency``, ``interval`` and ``id`` as the SDK's fields."""
        return self.quotas.book.create_spend_alert(
            organization_id, threshold_amount, recipients, **alert
        )

    def put_spend_alert(
        self, organization_id: str, alert_id: str, data: Mapping[str, Any]
    ) -> spend_module.SpendAlert:
        """Create or replace an alert from the SDK's fields (``threshold_amount``,
        ``currency``, ``interval``, ``notification_channel``); creation time is kept."""
        return self.quotas.book.put_spend_alert(organization_id, alert_id, data)

    def spend_alert(self, organization_id: str, alert_id: str) -> spend_module.SpendAlert | None:
        return self.quotas.book.spend_alert(organization_id, alert_id)

    def spend_alerts(self, organization_id: str) -> list[spend_module.SpendAlert]:
        """The organization's spend alerts, oldest first."""
        return self.quotas.book.spend_alerts(organization_id)

    def delete_spend_alert(self, organization_id: str, alert_id: str) -> bool:
        return self.quotas.book.delete_spend_alert(organization_id, alert_id)

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
        return dict(self.retention_days.days)

    def set_retention(self, meter: str, days: Any) -> int | None:
        """Keep ``meter``'s raw events for ``days`` whole days (``90``, ``"90d"``); ``None``
        keeps them all. Kept by the store, so every process opened after this knows it."""
        spec = self.spec(meter, f"retention.{meter}" if isinstance(meter, str) else "meter")
        parsed = retention_module.parse_retention(days, f"retention.{spec.name}")
        self.retention_days.set(spec.name, parsed)
        return parsed

    def prune(self, meters: Iterable[str] | str | None = None) -> dict[str, int]:
        """Drop the raw events (and minute rollups) that ``meters`` (default: every meter with
        a retention) no longer keep; the events dropped per meter. Hour and day rollups stay.
        """
        days = self.retention_days.days
        return maintenance.prune(self, meters, sorted(days), days)

    # -- rollups (see meterkit.maintenance) -------------------------------------------------------

    def rebuild_rollups(
        self,
        meters: Iterable[str] | str | None = None,
        *,
        progress: maintenance.Progress | None = None,
    ) -> dict[str, int]:
        """Fold the rollups of ``meters`` (default: every meter) anew from their events, each
        meter atomically; ``progress(meter, events_read)`` as it goes. Events read per meter;
        ``{}`` when the store keeps no rollups."""
        return maintenance.rebuild(self, meters, sorted(self.specs), progress)

    def verify_rollups(self, meters: Iterable[str] | str | None = None) -> list[str]:
        """Every difference between the stored rollups of ``meters`` (default: every meter)
        and what their events give, one line each: ``[]`` when they agree. Changes nothing."""
        return maintenance.verify(self, meters, sorted(self.specs))

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
        request = corrections_module.Request(
            meter, organization_id, event_id, "void", None, None, reason, actor
        )
        return corrections_module.correct(self.recorder, self.quotas.recount, request)

    def amend(
        self, meter: str, organization_id: str, event_id: str, **change: Unpack[AmendKeywords]
    ) -> corrections_module.Correction:
        """Give a stored event new ``values`` and/or ``dimensions`` (each replaced whole;
        its time stays), with the ``reason`` and ``actor`` of the correction."""
        request = corrections_module.Request.amend(meter, organization_id, event_id, **change)
        return corrections_module.correct(self.recorder, self.quotas.recount, request)

    def corrections(
        self, organization_id: str, *, meter: str | None = None, event_id: str | None = None
    ) -> list[corrections_module.Correction]:
        """The organization's corrections, oldest first, optionally of one meter or event."""
        return corrections_module.list_corrections(
            self.store, organization_id, meter=meter, event_id=event_id
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Give back leased quota, write queued debit events, then release the store."""
        if self.recorder.closed:
            return
        _open_meters.discard(self)
        try:
            self.recorder.close()
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
        self.recorder.flush(closing=release_leases)

    def sync(self) -> None:
        """Flush when this meter holds anything a query should see (queued events, leased
        usage not yet reported); within a transaction, nothing: its own writes are seen."""
        self.recorder.sync()

    def _threshold_reached(self, **reached: Any) -> None:
        """The ``meterkit_quota_threshold`` hook (after the decision commits)."""
        self.pm.hook.meterkit_quota_threshold(meter=self, **reached)

    def _recorded(self, events: tuple[Event, ...]) -> None:
        """The ``meterkit_events_recorded`` hook (after the write commits)."""
        self.pm.hook.meterkit_events_recorded(meter=self, events=events)

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
