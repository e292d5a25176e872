"""The organization's book: plans, assignments, grants, plan metrics, spend limits and prices.

One home for the records a decision reads, with the caches that keep a decision from reading
them each time (read again at most every ``cache_seconds``, and dropped by :meth:`Book.forget`
after any change made here).
"""

from __future__ import annotations

import logging
import threading
import time as _time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import attrs

from meterkit import spend as spend_module
from meterkit.errors import NotFound, StateConflict, StoreUnavailable, ValidationError
from meterkit.ids import new_id
from meterkit.periods import BillingCycle, Period
from meterkit.planmetrics import RECORD_KIND as METRIC_RECORDS
from meterkit.planmetrics import Metric
from meterkit.plans import Grant, OrgPlan, Plan
from meterkit.pricing import PriceBook, load_book
from meterkit.quotas.decision import check_count
from meterkit.spend import SpendAlert, SpendLimit, check_cost, to_nano
from meterkit.validate import check_id, check_number, check_time

if TYPE_CHECKING:
    from typing_extensions import TypedDict

    from meterkit.recorder import Recorder
    from meterkit.registry import Registry

    class GrantKeywords(TypedDict, total=False):
        """The keywords of :meth:`Book.grant`, for type checkers."""

        expires_at: int | None
        id: str | None

    class AlertKeywords(TypedDict, total=False):
        """The keywords of :meth:`Book.create_spend_alert`, for type checkers."""

        subject_prefix: str | None
        currency: str
        interval: str
        id: str | None


__all__ = ["DEFAULT_CYCLE", "Book"]

DEFAULT_CYCLE = BillingCycle()
logger = logging.getLogger("meterkit")


class Book:
    """An organization's records as decisions read them, cached (see the module)."""

    def __init__(
        self,
        recorder: Recorder,
        registry: Registry,
        *,
        cache_seconds: float = 1.0,
        default_plan: str | None = None,
    ) -> None:
        self.recorder = recorder
        self.store = recorder.store
        self.registry = registry
        self.cache_seconds = cache_seconds
        self.default_plan = default_plan
        self._cache: dict[str, tuple[float, tuple[OrgPlan | None, Plan | None, list[Grant]]]] = {}
        # Bumped by every change: an entry read before a change is never kept after it.
        self._generation = 0
        self._cache_lock = threading.Lock()
        self._listeners: list[Callable[[], object]] = []
        # (generation, metric_sources(), meters some metric other than their own counts)
        self._sources_cache: tuple[int, list[Metric], frozenset[str]] | None = None
        # Metrics stored by any process, read again at most every cache_seconds; those this
        # process named wait in _unpublished for the first read (opening sends nothing).
        self._metrics_due = 0.0
        self._stored_metrics: dict[str, Any] = {}
        self._unpublished: dict[str, Metric] = {}
        self._spend_cache: dict[str, tuple[float, tuple[SpendLimit | None, list[SpendAlert]]]] = {}
        self._book: tuple[float, PriceBook] | None = None
        self._nanos: dict[tuple[type, object], int] = {}

    @property
    def generation(self) -> int:
        """Bumped by every :meth:`forget`: what was read before it is not kept after it."""
        return self._generation

    def on_forget(self, call: Callable[[], object]) -> None:
        """Call ``call()`` after every :meth:`forget` (caches built on the book drop too)."""
        self._listeners.append(call)

    def metrics(self) -> list[str]:
        """The metrics a plan may limit: every meter whose main measure has its own name
        (``tokens``, ``queries``, ``storage_bytes``, …, and the application's own), and every
        metric defined with :meth:`~meterkit.Meter.define_metric`."""
        self.metrics_fresh()
        own = {name for name, spec in self.registry.specs.items() if spec.measure(name)}
        return sorted(own | set(self.registry.metrics))

    def metric_sources(self) -> list[Metric]:
        """Every counted (not gauge) metric with the sources that feed it, own meter first."""
        self.metrics_fresh()
        specs = self.registry.specs
        found = self._sources_cache  # registering a meter or defining a metric bumps it
        if found is None or found[0] != self._generation:
            names = [n for n, spec in specs.items() if (m := spec.measure(n)) and not m.gauge]
            defined = self.registry.metrics
            metrics = [
                defined.get(name, Metric(name)).effective(specs)
                for name in sorted(set(names) | set(defined))
            ]
            shared = frozenset(
                s.meter
                for metric in metrics
                for s in metric.sources
                if not s.meter == s.measure == metric.name
            )
            found = self._sources_cache = (self._generation, metrics, shared)
        return found[1]

    def meters_counted(self, limits: Iterable[str]) -> set[str]:
        """The meters that limits on the metrics ``limits`` count: every source of a counted
        metric, and a gauge's own meter (``storage_bytes``)."""
        wanted = set(limits)
        found = {s.meter for m in self.metric_sources() if m.name in wanted for s in m.sources}
        return found | {name for name in wanted if name in self.registry.specs}

    def publish_metric(self, metric: Metric) -> None:
        """Store ``metric`` with the next read of the stored metrics (see :meth:`read_metrics`)."""
        self._unpublished[metric.name] = metric
        self._metrics_due = 0.0

    def store_metric(self, metric: Metric) -> bool:
        """Store ``metric`` now; whether the stored definition changed."""
        self._unpublished.pop(metric.name, None)
        record = metric.to_record()
        if self.store.get_record(METRIC_RECORDS, metric.name) == record:
            return False
        self.store.put_record(METRIC_RECORDS, metric.name, record)
        self._metrics_due = 0.0
        return True

    def metrics_fresh(self) -> None:
        """Read the stored metrics when ``cache_seconds`` have passed since the last read."""
        if _time.monotonic() >= self._metrics_due:
            self.read_metrics()

    def read_metrics(self) -> None:
        """Store the metrics this process named and not yet stored, and define here every
        metric another process stored (a changed definition replaces the local one). Runs at
        most every ``cache_seconds``; a store that cannot answer leaves the known ones."""
        self._metrics_due = _time.monotonic() + self.cache_seconds
        try:
            for name, metric in list(self._unpublished.items()):
                self.store_metric(metric)
                self._unpublished.pop(name, None)
            stored = dict(self.store.list_records(METRIC_RECORDS))
        except StoreUnavailable as exc:
            logger.warning("stored metrics not read, counting those known: %s", exc)
            return
        if stored == self._stored_metrics:
            return
        self._stored_metrics = stored
        for name, data in sorted(stored.items()):
            metric = Metric.from_record(name, data)
            # A source on a meter (or measure) this process does not know is one it cannot
            # record.
            specs = self.registry.specs
            known = Metric(
                name,
                [
                    s
                    for s in metric.sources
                    if s.meter in specs and specs[s.meter].measure(s.measure) is not None
                ],
            )
            if self.registry.metrics.get(name) == known:
                continue
            try:
                self.registry.define_metric(known)
            except ValidationError as exc:
                logger.warning("stored metric %r not counted here: %s", name, exc)

    def feeds_beyond_own(self, meter: str) -> bool:
        """Whether an event of ``meter`` can feed a counter other than its own metric's: spend
        (a price names the meter) or a plan metric defined over it."""
        self.metric_sources()
        assert self._sources_cache is not None
        return meter in self._sources_cache[2] or self.price_book().prices_meter(meter)

    def check_plan_metrics(self, plan: Plan) -> None:
        """Refuse a plan limiting a metric no meter counts (a typo such as ``querys``)."""
        known = self.metrics()
        for metric in plan.limits:
            if metric not in known:
                raise ValidationError(
                    f"limits.{metric}",
                    f"unknown metric {metric!r}; known: {', '.join(known)} "
                    "(register a meter of that name to limit another)",
                )

    def set_plan(self, plan: Plan) -> Plan:
        if not isinstance(plan, Plan):
            raise ValidationError("plan", "must be a meterkit.Plan")
        self.check_plan_metrics(plan)
        self.store.put_record("plan", plan.id, plan.to_record())
        self.forget()
        return plan

    def get_plan(self, plan_id: str) -> Plan | None:
        data = self.store.get_record("plan", plan_id)
        return Plan.from_record(plan_id, data) if data is not None else None

    def plans(self) -> list[Plan]:
        return [Plan.from_record(k, d) for k, d in self.store.list_records("plan")]

    def assign(self, organization_id: str, plan_id: str, *, seats: int = 1) -> OrgPlan:
        assignment = OrgPlan(organization_id, plan_id, seats)
        if self.get_plan(plan_id) is None:
            raise NotFound("plan", f"unknown plan {plan_id!r}")
        self.store.put_record("org", organization_id, {"plan": plan_id, "seats": seats})
        self.forget()
        return assignment

    def grant(
        self,
        organization_id: str,
        credits: int,
        *,
        expires_at: int | None = None,
        id: str | None = None,
    ) -> Grant:
        """Add purchased credits, by default for the rest of the current billing period."""
        check_id("organization_id", organization_id)
        check_count("credits", credits, minimum=1)
        if expires_at is not None:
            check_time("expires_at", expires_at)
        now = self.recorder.now()
        if expires_at is None:
            expires_at = self.cycle(organization_id).period_at(now).end
        grant = Grant(id or f"grant_{uuid.uuid4().hex}", organization_id, credits, now, expires_at)
        check_id("id", grant.id)
        self.store.put_record(
            f"grant:{organization_id}",
            grant.id,
            {"credits": credits, "granted_at": now, "expires_at": expires_at},
        )
        self.forget()
        return grant

    def grants(self, organization_id: str, at: int | None = None) -> list[Grant]:
        """Grants valid at ``at`` (default now)."""
        at = self.recorder.now() if at is None else at
        return [g for g in self.read_grants(organization_id) if g.valid_at(at)]

    def read_grants(self, org: str) -> list[Grant]:
        return [
            Grant(key, org, d["credits"], d["granted_at"], d["expires_at"])
            for key, d in self.store.list_records(f"grant:{org}")
        ]

    def assigned(self) -> list[str]:
        """Every organization assigned a plan, by id."""
        return [key for key, _ in self.store.list_records("org")]

    def organizations(self) -> list[str]:
        """Every organization this book holds a record of: assigned a plan, or given a spend
        limit or cap (whose counters a rebuild or ``doctor`` goes over)."""
        found = set(self.assigned())
        for kind in (spend_module.LIMIT_RECORD, spend_module.CAP_RECORD):
            found.update(key for key, _ in self.store.list_records(kind))
        return sorted(found)

    def plan_of(self, organization_id: str) -> tuple[OrgPlan | None, Plan | None]:
        assignment, plan, _ = self.lookup(organization_id)
        return assignment, plan

    def lookup(self, org: str) -> tuple[OrgPlan | None, Plan | None, list[Grant]]:
        now = _time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(org)
            if hit is not None and hit[0] > now:
                return hit[1]
            generation = self._generation
        data = self.store.get_record("org", org)
        if data is not None:
            assignment: OrgPlan | None = OrgPlan(org, data["plan"], data.get("seats", 1))
        elif self.default_plan is not None:
            assignment = OrgPlan(org, self.default_plan)
        else:
            assignment = None
        plan = self.get_plan(assignment.plan) if assignment else None
        value = (assignment, plan, self.read_grants(org))
        with self._cache_lock:
            if self._generation == generation:
                self._cache[org] = (now + self.cache_seconds, value)
        return value

    def forget(self) -> None:
        """Drop what is cached of plans, limits, spend and prices: after any of them changed."""
        with self._cache_lock:
            self._generation += 1
            self._cache.clear()
            self._spend_cache.clear()
            self._book = None
        for call in self._listeners:
            call()

    def spending(self, org: str) -> tuple[SpendLimit | None, list[SpendAlert]]:
        """The organization's spend limit and alerts, read at most every ``cache_seconds``."""
        now = _time.monotonic()
        with self._cache_lock:
            hit = self._spend_cache.get(org)
            if hit is not None and hit[0] > now:
                return hit[1]
            generation = self._generation
        found = spend_module.read_spending(self.store, org)
        with self._cache_lock:
            if self._generation == generation:
                if len(self._spend_cache) > 100_000:
                    self._spend_cache.clear()
                self._spend_cache[org] = (now + self.cache_seconds, found)
        return found

    def stored_book(self) -> PriceBook:
        """The price book as stored now, with the built-in lines (not cached): what costs are
        billed by."""
        return load_book(self.store, self.registry.specs, builtin=True)

    def price_book(self) -> PriceBook:
        """The stored price book, read again at most every ``cache_seconds`` (and after any
        change made through this meter)."""
        now = _time.monotonic()
        hit = self._book
        if hit is not None and hit[0] > now:
            return hit[1]
        book = self.stored_book()
        self._book = (now + self.cache_seconds, book)
        return book

    def estimate(
        self,
        price: Mapping[str, Mapping[str, Any]],
        dimensions: Mapping[str, Any] | None,
        now: int,
    ) -> Decimal:
        """What ``{meter: {measure: amount}}`` would cost now, at the dearest unit prices their
        lines can charge (the spend counters' own rule), with ``dimensions`` matching prices."""
        if not isinstance(price, Mapping):
            raise ValidationError("price", "must map meter names to {measure: amount}")
        book = self.price_book()
        dims = dict(dimensions or {})
        total = Decimal(0)
        for meter, values in price.items():
            spec = self.registry.specs.get(meter) if isinstance(meter, str) else None
            if spec is None:
                raise ValidationError(f"price.{meter}", f"unknown meter {meter!r}")
            if not isinstance(values, Mapping):
                raise ValidationError(f"price.{meter}", "must map measure names to amounts")
            for measure, value in values.items():
                if spec.measure(measure) is None:
                    raise ValidationError(
                        f"price.{meter}.{measure}", f"meter {meter!r} has no measure {measure!r}"
                    )
                check_number(f"price.{meter}.{measure}", value)
            total += book.ceiling(meter, values, dims, now)
        return total

    def spend_nano(
        self,
        cost: object,
        price: Mapping[str, Mapping[str, Any]] | None,
        dimensions: Mapping[str, Any] | None,
        now: int,
    ) -> int | None:
        """A decision's estimated cost in counted nano-dollars (``None``: none given)."""
        if cost is not None and price is not None:
            raise ValidationError("cost", "give cost= or price=, not both")
        if cost is not None:
            # Most requests repeat a few estimates: each is checked and converted once.
            key = (type(cost), cost) if type(cost) in (Decimal, str, int) else None
            try:
                found = self._nanos.get(key) if key is not None else None
            except TypeError:  # a signalling NaN cannot be hashed; the check says why
                key = found = None
            if found is None:
                found = to_nano(check_cost("cost", cost))
                if key is not None:
                    if len(self._nanos) >= 4096:
                        self._nanos.clear()
                    self._nanos[key] = found
            return found
        if price is not None:
            return to_nano(self.estimate(price, dimensions, now))
        return None

    def cycle(self, org: str) -> BillingCycle:
        """The organization's billing cycle (its plan's, else monthly from the 1st)."""
        _, plan = self.plan_of(org)
        return plan.billing_cycle if plan else DEFAULT_CYCLE

    def period(self, organization_id: str, at: int | None = None) -> Period:
        """The organization's billing period containing ``at`` (default now)."""
        return self.cycle(organization_id).period_at(self.recorder.now() if at is None else at)

    def is_gauge(self, metric: str) -> bool:
        spec = self.registry.specs.get(metric)
        measure = spec.measure(metric) if spec else None
        return bool(measure and measure.gauge)

    # -- spend limits, caps and alerts (see meterkit.spend) ----------------------------------

    def set_spend_limit(
        self,
        organization_id: str,
        threshold_amount: int,
        *,
        currency: str = "USD",
        interval: str = "month",
    ) -> spend_module.SpendLimit:
        """Store the organization's own spend limit (:meth:`meterkit.Meter.set_spend_limit`)."""
        limit = spend_module.SpendLimit.build(
            organization_id,
            {"threshold_amount": threshold_amount, "currency": currency, "interval": interval},
            self.recorder.now(),
        )
        cap = spend_module.read_cap(self.store, limit.organization_id)
        if cap is not None and limit.threshold_amount > cap.threshold_amount:
            raise StateConflict(
                "threshold_amount",
                f"must be at most {cap.threshold_amount} cents, the cap the operator set "
                "on this organization's spend limit",
            )
        self.store.put_record(spend_module.LIMIT_RECORD, limit.organization_id, limit.to_record())
        self.forget()
        return limit

    def delete_spend_limit(self, organization_id: str) -> bool:
        """Remove the organization's own spend limit; ``True`` if it had one."""
        org = check_id("organization_id", organization_id)
        found = self.store.delete_record(spend_module.LIMIT_RECORD, org)
        self.forget()
        return found

    def set_spend_cap(self, organization_id: str, threshold_amount: int) -> spend_module.SpendLimit:
        """Store the operator's cap (:meth:`meterkit.Meter.set_spend_cap`)."""
        cap = spend_module.SpendLimit.build(
            organization_id,
            {"threshold_amount": threshold_amount, "currency": "USD", "interval": "month"},
            self.recorder.now(),
        )
        self.store.put_record(spend_module.CAP_RECORD, cap.organization_id, cap.to_record())
        self.forget()
        return cap

    def spend_cap(self, organization_id: str) -> int | None:
        """The operator's cap in cents, or ``None``."""
        cap = spend_module.read_cap(self.store, check_id("organization_id", organization_id))
        return None if cap is None else cap.threshold_amount

    def delete_spend_cap(self, organization_id: str) -> bool:
        """Remove the operator's cap; ``True`` if there was one."""
        org = check_id("organization_id", organization_id)
        found = self.store.delete_record(spend_module.CAP_RECORD, org)
        self.forget()
        return found

    def put_spend_alert(
        self, organization_id: str, alert_id: str, data: Mapping[str, Any]
    ) -> spend_module.SpendAlert:
        """Store an alert from the SDK's fields (:meth:`meterkit.Meter.put_spend_alert`)."""
        org = check_id("organization_id", organization_id)
        alert = spend_module.SpendAlert.build(alert_id, org, data, self.recorder.now())
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
        self.forget()
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
        self.forget()
        return found

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
        """A new alert (:meth:`meterkit.Meter.create_spend_alert`)."""
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
