"""Quota decisions: plan limits and rate limits, checked and debited atomically before a request.

Every decision is one call to :meth:`Store.counters_apply`, all-or-nothing across the lines
that apply: the period quota of each metric asked for, the gauge limits (``spaces``,
``storage_bytes``), and the per-minute and per-day rate limits. A refused request debits
nothing. Rate limits use a *sliding window counter* (O(1) state per key: this window's count
and the previous one's, weighted by how much of it still overlaps the last 60 s / 24 h).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time as _time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, Protocol

import attrs

from meterkit import spend as spend_module
from meterkit.catalog import CHARGES_METER
from meterkit.counters import fits
from meterkit.countlog import Changes, CountLog
from meterkit.errors import NotFound, QuotaExceeded, StoreUnavailable, ValidationError
from meterkit.ids import new_id
from meterkit.leases import DEFAULT_TTL, LEASED, Contended, Leases
from meterkit.metrics import RECORD_KIND as METRIC_RECORDS
from meterkit.metrics import Metric, contributions
from meterkit.models import CounterLine, CounterResult, Event, Hold
from meterkit.periods import BillingCycle, Period
from meterkit.plans import UNLIMITED, Grant, OrgPlan, Plan
from meterkit.pricing import CHARGES, PriceBook, Tally, default_period_of, load_book
from meterkit.spend import NANO, SPEND, SpendAlert, SpendLimit, check_cost, to_nano
from meterkit.validate import (
    MAX_VALUE,
    check_event,
    check_id,
    check_number,
    check_string,
    check_time,
)

if TYPE_CHECKING:
    from meterkit.recorder import Begin, Recorder
    from meterkit.registry import Registry
    from meterkit.stores.base import CounterStore


__all__ = ["Decision", "LimitState", "Quotas", "Reservation"]

RATE_WINDOWS = {"rate_limit_rpm": 60, "rate_limit_per_day": 86400}
logger = logging.getLogger("meterkit")
DEFAULT_CYCLE = BillingCycle()
Policy = Literal["closed", "open"]


class ThresholdReached(Protocol):
    """Told once when usage reaches a threshold of a limit (the threshold hook)."""

    def __call__(
        self,
        *,
        organization_id: str,
        metric: str,
        threshold: float,
        used: int,
        limit: int,
        period_start: int | None,
        alert: SpendAlert | None,
    ) -> object: ...


SpendAlertFired = Callable[[SpendAlert, int, int], object]
"""Told once when a spend alert fires: ``(alert, used nano-dollars, month start)``."""


def _no_threshold(**_: object) -> None:
    return None


def _no_alert(alert: SpendAlert, used: int, period_start: int) -> None:
    return None


@attrs.frozen
class LimitState:
    """One limit as a decision saw it. ``limit`` and ``remaining`` are ``-1`` when unlimited."""

    metric: str
    requested: int
    used: int
    limit: int
    remaining: int
    reset_at: int | None


@attrs.frozen
class Decision:
    """The answer to "may this request go ahead?".

    ``limit`` / ``used`` / ``remaining`` / ``reset_at`` describe the deciding limit: the one
    that refused, or (when admitted) the one with the least room left. ``retry_after`` is in
    whole seconds (at least 1) when refused and a wait can help. ``degraded`` is true when
    the store could not answer and the fail-open policy admitted the request.
    """

    allowed: bool
    organization_id: str
    limits: tuple[LimitState, ...] = ()
    refused_by: str | None = None
    retry_after: int | None = None
    degraded: bool = False
    id: str = ""

    def deciding(self) -> LimitState | None:
        """The limit this decision is told by: the one that refused it, else the limited one
        with the least share remaining (what ``limit``, ``remaining`` and ``reset_at`` are)."""
        if self.refused_by is not None:
            return next((s for s in self.limits if s.metric == self.refused_by), None)
        limited = [s for s in self.limits if s.limit != UNLIMITED]
        return min(limited, key=lambda s: (s.remaining / max(s.limit, 1), s.metric), default=None)

    @property
    def limit(self) -> int:
        state = self.deciding()
        return state.limit if state else UNLIMITED

    @property
    def used(self) -> int:
        state = self.deciding()
        return state.used if state else 0

    @property
    def remaining(self) -> int:
        state = self.deciding()
        return state.remaining if state else UNLIMITED

    @property
    def reset_at(self) -> int | None:
        state = self.deciding()
        return state.reset_at if state else None

    def state(self, metric: str) -> LimitState | None:
        return next((s for s in self.limits if s.metric == metric), None)


@attrs.define
class _Compiled:
    """An organization's limits as decisions need them, computed once.

    Valid while ``period.start <= now < valid_until`` (the period's end, or the next moment a
    grant starts or ends) and until ``refresh_at`` (monotonic): then the plan, assignment and
    grants are read again, so a change made by another process is seen within the refresh
    bound. ``quota`` memoizes each metric's ``(counter key, cap, reset_at, period)``.
    """

    refresh_at: float
    valid_until: int
    period: Period
    plan: Plan | None
    seats: int
    credits: int  # purchased credits valid over the whole of [period.start, valid_until)
    rates: tuple[tuple[str, int, int], ...]  # (metric, window seconds, requests allowed)
    month: Period  # the UTC calendar month spend is counted in
    spend_cap: int | None  # the spend limit in nano-dollars
    alerts: tuple[SpendAlert, ...]
    quota: dict[str, tuple[str, int | None, int | None, Period | None]] = attrs.field(factory=dict)
    # The lines of recent decisions at ``lines_at`` (a second), by (amounts, requests).
    lines: dict[tuple[tuple[tuple[str, int], ...], int], list[_Line]] = attrs.field(factory=dict)
    lines_at: int = -1


@attrs.define
class _Line:
    """A counter line and what the decision needs to describe it."""

    metric: str
    counter: CounterLine
    reset_at: int | None
    period: Period | None
    window: int = 0


MAX_TTL = 366 * 86400


def check_count(field: str, value: object, *, minimum: int = 0) -> int:
    """A whole number from ``minimum`` to :data:`MAX_VALUE` (what every counter holds exactly)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValidationError(field, f"must be a {what} integer")
    if value > MAX_VALUE:
        raise ValidationError(field, f"must not exceed {MAX_VALUE}")
    return value


def check_ttl(ttl: object) -> int:
    """A reservation's ``ttl``: whole seconds from 1 to :data:`MAX_TTL`."""
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL:
        raise ValidationError("ttl", f"must be a whole number of seconds from 1 to {MAX_TTL}")
    return ttl


def check_amounts(amounts: object, field: str = "amounts") -> dict[str, int]:
    """``{metric: whole amount >= 0}``, or a ValidationError naming ``field.metric``.

    Every amount is checked before any counter is touched, so a refused call changes nothing.
    """
    if not isinstance(amounts, Mapping):
        raise ValidationError(field, "must be a mapping of metric to a whole amount")
    out: dict[str, int] = {}
    for metric, amount in amounts.items():
        if type(metric) is not str or metric not in _GOOD_NAMES:
            check_string(field, metric)
            if metric in RATE_WINDOWS:
                raise ValidationError(f"{field}.{metric}", "rate limits are counted per request")
            if metric == SPEND:
                raise ValidationError(
                    f"{field}.{metric}", "spend is decided in dollars: pass cost= or price="
                )
            _remember(_GOOD_NAMES, metric)
        if type(amount) is int and 0 <= amount <= MAX_VALUE:
            out[metric] = amount  # the common case of check_count, without a field name
        else:
            out[metric] = check_count(f"{field}.{metric}", amount)
    return out


# Names and ids already found valid (exact ``str`` only): checked once, not on every decision.
_GOOD_NAMES: set[str] = set()
_GOOD_IDS: set[str] = set()


def _remember(seen: set[str], value: str) -> None:
    if type(value) is str:
        if len(seen) >= 100_000:
            seen.clear()
        seen.add(value)


def check_org(value: object) -> str:
    """:func:`~meterkit.validate.check_id` of an ``organization_id``, remembered once valid."""
    if type(value) is str and value in _GOOD_IDS:
        return value
    org = check_id("organization_id", value)
    _remember(_GOOD_IDS, org)
    return org


class Reservation:
    """Amounts held against quotas until :meth:`commit` (the real amounts) or :meth:`release`.

    A reservation nobody settles expires after its ``ttl`` and gives its amounts back. As a
    context manager it releases on an exception and otherwise commits what it holds, unless
    settled inside the block.
    """

    def __init__(
        self,
        quotas: Quotas,
        decision: Decision,
        held: dict[str, int],
        keys: dict[str, _Line],
        expires_at: int,
        dimensions: Mapping[str, Any] | None,
    ) -> None:
        self._quotas = quotas
        self.decision = decision
        self.id = decision.id
        self.organization_id = decision.organization_id
        self.held = held
        self.expires_at = expires_at
        self._lines = keys
        self._dimensions = dimensions
        self._lock = threading.Lock()
        self.settled = False
        self.leased = False  # held in this process's leases, not in the store
        # How its spend line counts and the priced estimate it holds (Quotas._spend_mode).
        self._spent: tuple[str | None, Mapping[str, Mapping[str, Any]] | None] = (None, None)

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
        quotas = self._quotas
        spent = quotas.spend_nano(cost, price, self._dimensions, quotas.recorder.now())
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
            self._spent = ("price", {"charges": {"nano_usd": spent}})
        elif price is not None:
            self._spent = ("price", dict(price))  # the real usage replaces the estimate
        self._settle(full)

    def release(self) -> None:
        """Give everything back: the request did not happen."""
        self._settle(None)

    def _settle(self, actual: dict[str, int] | None) -> None:
        with self._lock:
            if self.settled:
                raise ValidationError("reservation", f"{self.id} is already settled")
            self.settled = True
        self._quotas._settle(self, actual)

    def _reopen(self) -> None:
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


_SETTLED = 2
_MARKER_GRACE = 3600  # seconds a settle marker outlives its hold: a retry comes sooner


def _settle_marker(org: str, hold_id: str) -> str:
    """The counter that tells a reservation settled from one whose hold expired."""
    return f"r\x1f{org}\x1f{hold_id}"


class Quotas:
    """Plans, assignments, grants and decisions for one :class:`~meterkit.Meter`."""

    def __init__(
        self,
        recorder: Recorder,
        registry: Registry,
        counters: CounterStore,
        *,
        threshold_reached: ThresholdReached = _no_threshold,
        spend_alert_fired: SpendAlertFired = _no_alert,
        policy: Policy = "closed",
        thresholds: Sequence[float] = (0.8, 1.0),
        cache_seconds: float = 1.0,
        record_debits: bool = True,
        default_plan: str | None = None,
        leases: bool = False,
        lease_ttl: int = DEFAULT_TTL,
    ) -> None:
        if policy not in ("closed", "open"):
            raise ValidationError("policy", "must be 'closed' or 'open'")
        self.recorder = recorder
        self.registry = registry
        self._counters = counters
        self.threshold_reached = threshold_reached
        self.spend_alert_fired = spend_alert_fired
        self.policy: Policy = policy
        self.thresholds = tuple(sorted(thresholds))
        self.cache_seconds = cache_seconds
        self.record_debits = record_debits
        self.default_plan = default_plan
        self._cache: dict[str, tuple[float, tuple[OrgPlan | None, Plan | None, list[Grant]]]] = {}
        self._compiled: dict[str, _Compiled] = {}
        # Bumped by every change: an entry read before a change is never kept after it.
        self._generation = 0
        self._cache_lock = threading.Lock()
        # Threshold markers this process has claimed (or seen claimed): asked of the store once.
        self._claimed: set[str] = set()
        # (generation, metric_sources(), meters some metric other than their own counts)
        self._sources_cache: tuple[int, list[Metric], frozenset[str]] | None = None
        # Metrics stored by any process, read again at most every cache_seconds; those this
        # process named wait in _unpublished for the first read (opening sends nothing).
        self._metrics_due = 0.0
        self._stored_metrics: dict[str, Any] = {}
        self._unpublished: dict[str, Metric] = {}
        self._spend_cache: dict[str, tuple[float, tuple[SpendLimit | None, list[SpendAlert]]]] = {}
        self._book: tuple[float, PriceBook] | None = None
        self._charges_exact: tuple[PriceBook, bool] | None = None
        self._nanos: dict[tuple[type, object], int] = {}
        # Debit dimensions already validated, by (metric, items): most requests repeat them.
        self._good_dims: dict[tuple[str, tuple[tuple[str, Any], ...]], dict[str, Any]] = {}
        # Set while settling on an event loop: what needs the store is deferred to the flush.
        self._no_io = threading.local()
        # Set while a write that may charge recorded usage to leases is under way (absorbing).
        self._absorbed = threading.local()
        # Counters other processes share: quota lines count their leased units too.
        self._shared = bool(getattr(self.counters, "shared", True))
        self._in_memory = not self.recorder.capabilities.shared
        self.all_in_memory = self._in_memory and not self._shared
        """Plans, counters and events all live in this process (``memory://``): deciding and
        settling never wait on I/O."""
        self.leases: Leases | None = Leases(self.counters, ttl=lease_ttl) if leases else None
        # Counters apart from the events: their changes go through a write-ahead record.
        self.countlog: CountLog | None = (
            CountLog(self.store, self.counters, self.recorder.now, self._applied)
            if self.counters is not self.store
            else None
        )
        recorder.counting = QuotaCounting(self)
        registry.on_change(self.forget)  # compiled limits know which metrics are gauges

    @property
    def store(self) -> Any:
        return self.recorder.store

    @property
    def counters(self) -> Any:
        """Where quota counters live: the store itself, or ``Meter(counters=...)``."""
        return self._counters

    # -- plans, assignments, grants ---------------------------------------------------------

    def metrics(self) -> list[str]:
        """The metrics a plan may limit: every meter whose main measure has its own name
        (``tokens``, ``queries``, ``storage_bytes``, …, and the application's own), and every
        metric defined with :meth:`~meterkit.Meter.define_metric`."""
        self._metrics_fresh()
        own = {name for name, spec in self.registry.specs.items() if spec.measure(name)}
        return sorted(own | set(self.registry.metrics))

    def metric_sources(self) -> list[Metric]:
        """Every counted (not gauge) metric with the sources that feed it, own meter first."""
        self._metrics_fresh()
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

    def _metrics_fresh(self) -> None:
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

    def _feeds_beyond_own(self, meter: str) -> bool:
        """Whether an event of ``meter`` can feed a counter other than its own metric's: spend
        (a price names the meter) or a plan metric defined over it."""
        self.metric_sources()
        assert self._sources_cache is not None
        return meter in self._sources_cache[2] or self.price_book().prices_meter(meter)

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
        by_org, months = self._deltas(removed, added)
        journal = getattr(self._absorbed, "taken", None)
        # Inside a write (absorbing): these events commit with what the leases absorb.
        self._add(by_org, months, absorb=journal, stored=True)

    def _deltas(
        self, removed: Sequence[Event], added: Sequence[Event]
    ) -> tuple[dict[str, dict[str, int]], dict[str, Period]]:
        """What events contribute to every counter they feed, by organization and key, and
        the month of each spend key."""
        by_org: dict[str, dict[str, int]] = {}
        months = self._feed_spend(added, by_org)
        if removed:
            self._feed_spend(removed, by_org, sign=-1)
        for sign, events in ((1, added), (-1, removed)):
            found = contributions(self.metric_sources(), events) if events else {}
            for (org, metric), items in found.items():
                cycle = self.cycle(org)
                deltas = by_org.setdefault(org, {})
                period: Period | None = None
                for t, amount in items:
                    if period is None or not period.start <= t < period.end:
                        period = cycle.period_at(t)
                    key = self.period_key(org, metric, period)
                    deltas[key] = deltas.get(key, 0) + sign * amount
        return by_org, months

    def _add(
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
            changes = self._charge(
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
            self._applied((org, changes, months), values)

    def _applied(self, changes: Changes, values: Sequence[int]) -> None:
        """Counter changes made, with the values after: fire the spend alerts they reach."""
        org, deltas, months = changes
        for (key, _), value in zip(deltas, values):
            month = months.get(key)
            if month is not None:
                self._alert(org, self.spending(org)[1], value, month)

    def _charge(
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

    def _count_decided(
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
        if priced and events and self._charged_exactly(events):
            # A charge (cost= in dollars) contributes to spend exactly what the decision
            # counted, at the built-in line: nothing to work out.
            events = [e for e in events if e.meter != CHARGES_METER.name]
            priced = False
        if not any(a < 0 for a in counted.values()) and not (
            priced or any(self._feeds_beyond_own(e.meter) for e in events)
        ):
            # Only debit events, each the one contribution to its own metric's counter, which
            # the decision counted already: nothing to add (the common case, kept cheap).
            return
        by_org, months = self._deltas((), events)
        deltas = by_org.setdefault(org, {})
        for key, amount in counted.items():
            if amount < 0:
                deltas[key] = deltas.get(key, 0) + amount
            elif key in deltas:
                deltas[key] -= amount
        if any(d for changes in by_org.values() for d in changes.values()):
            self._add(by_org, months, absorb=[] if leased else None, local=local)

    def _charged_exactly(self, events: Sequence[Event]) -> bool:
        """Whether ``events`` hold a charge billed by the built-in charges line (no stored
        price replaces it)."""
        if not any(e.meter == CHARGES_METER.name for e in events):
            return False
        book = self.price_book()
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
        return [g for g in self._read_grants(organization_id) if g.valid_at(at)]

    def _read_grants(self, org: str) -> list[Grant]:
        return [
            Grant(key, org, d["credits"], d["granted_at"], d["expires_at"])
            for key, d in self.store.list_records(f"grant:{org}")
        ]

    def plan_of(self, organization_id: str) -> tuple[OrgPlan | None, Plan | None]:
        assignment, plan, _ = self._lookup(organization_id)
        return assignment, plan

    def _lookup(self, org: str) -> tuple[OrgPlan | None, Plan | None, list[Grant]]:
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
        value = (assignment, plan, self._read_grants(org))
        with self._cache_lock:
            if self._generation == generation:
                self._cache[org] = (now + self.cache_seconds, value)
        return value

    def forget(self) -> None:
        """Drop what is cached of plans, limits, spend and prices: after any of them changed."""
        self._good_dims.clear()  # a meter re-registered may keep other dimensions
        with self._cache_lock:
            self._generation += 1
            self._cache.clear()
            self._compiled.clear()
            self._spend_cache.clear()
            self._book = None

    # -- spend (see meterkit.spend) -----------------------------------------------------------

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

    def price_book(self) -> PriceBook:
        """The stored price book, read again at most every ``cache_seconds`` (and after any
        change made through this meter)."""
        now = _time.monotonic()
        hit = self._book
        if hit is not None and hit[0] > now:
            return hit[1]
        book = load_book(self.store, self.registry.specs, builtin=True)
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

    @staticmethod
    def _spend_mode(c: _Compiled | None, spend: int | None, price: object) -> str | None:
        """How a decision's spend line is counted: ``"probe"`` (no estimate under a limit: one
        nano-dollar checked, never kept), ``"price"`` (an estimate its priced events replace),
        ``"cost"`` (dollars, kept as given) or ``None`` (no spend line)."""
        if c is not None and c.spend_cap is not None and not spend:
            return "probe"
        if not spend:
            return None
        return "price" if price is not None else "cost"

    @staticmethod
    def _charged(
        mode: str | None, spend: int | None, price: Mapping[str, Mapping[str, Any]] | None
    ) -> tuple[str | None, Mapping[str, Mapping[str, Any]] | None]:
        """A spend given in dollars is counted as a charge: priced usage of the built-in
        ``charges`` meter (meterkit.pricing.CHARGES), recorded like any priced estimate, so
        costs bill it too."""
        if mode == "cost" and spend:
            return "price", {"charges": {"nano_usd": spend}}
        return mode, price

    @staticmethod
    def _counted(
        lines: Iterable[_Line], amounts: Mapping[str, int], mode: str | None
    ) -> dict[str, int]:
        """What a decision counted on its events' behalf, by counter key (see
        :meth:`_count_decided`)."""
        counted: dict[str, int] = {}
        for ln in lines:
            if ln.window or ln.period is None or ln.metric not in amounts:
                continue
            amount = amounts[ln.metric]
            if ln.metric != SPEND:
                counted[ln.counter.key] = amount
            elif mode == "probe":
                counted[ln.counter.key] = -amount
            elif mode == "price":
                counted[ln.counter.key] = amount
        return counted

    @staticmethod
    def _with_spend(c: _Compiled, amounts: dict[str, int], spend: int | None) -> dict[str, int]:
        """``amounts`` with the spend line a decision needs. Under a spend limit it is at least
        one nano-dollar, so that a decision without an estimate is refused once the limit is
        reached (an estimate of nothing would always fit)."""
        if c.spend_cap is not None:
            return {**amounts, SPEND: max(spend or 0, 1)}
        return amounts if spend is None else {**amounts, SPEND: spend}

    def spend_key(self, org: str, at: int) -> str:
        return self.period_key(org, SPEND, default_period_of(at))

    def spent(self, organization_id: str, at: int | None = None) -> int:
        """Counted month-to-date spend in nano-dollars (open reservations included)."""
        now = self.recorder.now() if at is None else at
        return self._read_counted(organization_id, self.spend_key(organization_id, now), now)

    def spend_from(
        self, events: Iterable[Event], book: PriceBook | None = None
    ) -> tuple[dict[str, int], int]:
        """What ``events`` contribute to spend as one batch, at ``book`` (default: the prices
        now): nano-dollars per spend key (each month summed exactly and rounded up once), and
        how many of them are priced — each batch is rounded up on its own as recorded, so a
        counter may exceed this by less than a nano-dollar per priced event."""
        book = self.price_book() if book is None else book
        priced = [e for e in events if book.prices_meter(e.meter)]
        by_org: dict[str, dict[str, int]] = {}
        self._feed_spend(priced, by_org, book=book)
        return {k: v for changes in by_org.values() for k, v in changes.items()}, len(priced)

    def reprice(self, before: PriceBook, meter: str) -> None:
        """After a price change for ``meter``: move each organization's spend counter of this
        month by what the change does to the month's costs of the events recorded so far, so
        spend keeps equal to the costs (a version effective in the past reprices them)."""
        after = self.price_book()
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
            key = self.spend_key(org, now)
            old = self.spend_from(events, before)[0].get(key, 0)
            new = self.spend_from(events, after)[0].get(key, 0)
            if new != old:
                self.counters.counters_add([(key, new - old)], now=now)

    def _feed_spend(
        self,
        events: Sequence[Event],
        by_org: dict[str, dict[str, int]],
        sign: int = 1,
        book: PriceBook | None = None,
    ) -> dict[str, Period]:
        """Add the priced events' spend to ``by_org``; the month of each spend key added.

        Each organization's month is summed exactly and rounded up once per batch."""
        book = self.price_book() if book is None else book
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
            key = self.period_key(event.organization_id, SPEND, month)
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

    def _alert(self, org: str, alerts: Sequence[SpendAlert], used: int, month: Period) -> None:
        """Fire each alert reached by ``used`` nano-dollars, once per alert and month."""
        for alert in alerts:
            if used < alert.threshold_nano:
                break
            # An alert whose threshold is changed may fire again at the new one.
            marker = f"sa\x1f{org}\x1f{alert.id}\x1f{alert.threshold_amount}\x1f{month.start}"
            if marker in self._claimed:
                continue
            claimed = self.counters.claim_once(marker, now=self.recorder.now(), expires_at=None)
            if not claimed:
                self._remember_claim(marker)  # another process's: never ours to fire
                continue
            # Remembered once the claim commits: a rolled-back claim may be made again.
            self.recorder.notify(functools.partial(self._remember_claim, marker))
            self.recorder.notify(
                functools.partial(self.spend_alert_fired, alert, used, month.start)
            )

    def _remember_claim(self, marker: str) -> None:
        if len(self._claimed) > 100_000:
            self._claimed.clear()
        self._claimed.add(marker)

    def _fresh(self, org: str, now: int) -> tuple[_Compiled | None, int]:
        """The organization's compiled limits if still good at ``now``, and the generation
        they were looked up at."""
        with self._cache_lock:
            hit = self._compiled.get(org)
            generation = self._generation
        if (
            hit is not None
            and _time.monotonic() < hit.refresh_at
            and hit.period.start <= now < hit.valid_until
        ):
            return hit, generation
        return None, generation

    def _compile(self, org: str, now: int) -> _Compiled:
        """The organization's compiled limits at ``now`` (see :class:`_Compiled`)."""
        self._metrics_fresh()  # a decision on a stored metric records on the metric's meter
        hit, generation = self._fresh(org, now)
        if hit is not None:
            return hit
        mono = _time.monotonic()
        assignment, plan, grants = self._lookup(org)
        cycle = plan.billing_cycle if plan else DEFAULT_CYCLE
        period = cycle.period_at(now)
        month = default_period_of(now)
        limit, alerts = self.spending(org)
        valid_until = min(period.end, month.end)
        for g in grants:
            for edge in (g.granted_at, g.expires_at):
                if edge is not None and now < edge < valid_until:
                    valid_until = edge
        credits = sum(g.credits for g in grants if g.valid_at(now))
        rates = tuple(
            (metric, window, getattr(plan, metric))
            for metric, window in RATE_WINDOWS.items()
            if plan is not None and getattr(plan, metric) != UNLIMITED
        )
        compiled = _Compiled(
            refresh_at=mono + self.cache_seconds,
            valid_until=valid_until,
            period=period,
            plan=plan,
            seats=assignment.seats if assignment else 1,
            credits=credits,
            rates=rates,
            month=month,
            spend_cap=None if limit is None else limit.threshold_nano,
            alerts=tuple(sorted(alerts, key=lambda a: (a.threshold_amount, a.id))),
        )
        with self._cache_lock:
            if self._generation == generation:
                self._compiled[org] = compiled
        return compiled

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

    # -- keys ---------------------------------------------------------------------------------

    @staticmethod
    def period_key(org: str, metric: str, period: Period) -> str:
        return f"q\x1f{org}\x1f{metric}\x1f{period.start}"

    @staticmethod
    def gauge_key(org: str, metric: str) -> str:
        return f"g\x1f{org}\x1f{metric}"

    def limit_for(self, organization_id: str, metric: str, at: int | None = None) -> int:
        """The limit in force for ``metric`` (``-1`` unlimited), purchased credits included."""
        at = self.recorder.now() if at is None else at
        _, cap, _, _ = self._quota_line(organization_id, metric, self._compile(organization_id, at))
        return UNLIMITED if cap is None else cap

    def _quota_line(
        self, org: str, metric: str, c: _Compiled
    ) -> tuple[str, int | None, int | None, Period | None]:
        """One metric's (counter key, cap, reset_at, period), memoized in ``c``."""
        found = c.quota.get(metric)
        if found is None and metric == SPEND:
            found = (self.period_key(org, SPEND, c.month), c.spend_cap, c.month.end, c.month)
            c.quota[metric] = found
        elif found is None:
            limit = UNLIMITED if c.plan is None else c.plan.limit(metric, c.seats)
            if metric == "credits" and limit != UNLIMITED:
                limit += c.credits
            cap = None if limit == UNLIMITED else min(limit, MAX_VALUE)
            if self.is_gauge(metric):
                found = (self.gauge_key(org, metric), cap, None, None)
            else:
                found = (self.period_key(org, metric, c.period), cap, c.period.end, c.period)
            c.quota[metric] = found
        return found

    def _lines(
        self,
        org: str,
        amounts: dict[str, int],
        requests: int,
        now: int,
        c: _Compiled | None = None,
    ) -> list[_Line]:
        """The lines of a decision; ``c``: the organization's compiled limits at ``now``, when
        the caller has them already."""
        if c is None:
            c = self._compile(org, now)
        if c.lines_at != now:
            c.lines_at, c.lines = now, {}
        shape = (tuple(amounts.items()), requests)
        found = c.lines.get(shape)
        if found is None:
            found = self._build_lines(org, c, amounts, requests, now)
            if len(c.lines) < 64:
                c.lines[shape] = found
        return found

    def _build_lines(
        self, org: str, c: _Compiled, amounts: dict[str, int], requests: int, now: int
    ) -> list[_Line]:
        lines: list[_Line] = []
        shared = self._shared
        for metric, amount in amounts.items():
            key, cap, reset_at, period = self._quota_line(org, metric, c)
            counter = (
                CounterLine(key, amount, cap, None, key + LEASED, 1.0)
                if shared and period is not None
                else CounterLine(key, amount, cap)
            )
            lines.append(_Line(metric, counter, reset_at, period))
        if requests:
            for metric, window, rate in c.rates:
                start = now - now % window
                weight = (window - (now - start)) / window
                counter = CounterLine(
                    f"r\x1f{org}\x1f{window}\x1f{start}",
                    requests,
                    rate,
                    expires_at=start + 2 * window,
                    prev_key=f"r\x1f{org}\x1f{window}\x1f{start - window}",
                    prev_weight=weight,
                )
                lines.append(_Line(metric, counter, start + window, None, window))
        return lines

    # -- decisions ----------------------------------------------------------------------------

    def check(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        *,
        debit: bool = True,
        requests: int = 1,
        dimensions: Mapping[str, Any] | None = None,
        cost: object = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Decision:
        """Admit (and debit) ``amounts`` plus ``requests`` against every limit, or refuse all.

        ``debit=False`` only looks: nothing is counted and a later call may decide otherwise.
        ``cost`` (dollars) or ``price`` (``{meter: {measure: amount}}``, priced now) is the
        request's spend, held to the organization's spend limit with the other limits.
        """
        decision, _ = self._decide(
            organization_id,
            amounts,
            requests,
            debit=debit,
            hold_ttl=None,
            dimensions=dimensions,
            cost=cost,
            price=price,
        )
        return decision

    def reserve(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        *,
        ttl: int = 300,
        requests: int = 1,
        dimensions: Mapping[str, Any] | None = None,
        cost: object = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Reservation:
        """Hold ``amounts`` (and the estimated ``cost`` / ``price``) now; raises
        :class:`QuotaExceeded` if any limit refuses."""
        check_ttl(ttl)
        decision, reservation = self._decide(
            organization_id,
            amounts,
            requests,
            debit=True,
            hold_ttl=ttl,
            dimensions=dimensions,
            cost=cost,
            price=price,
        )
        if reservation is None:
            raise QuotaExceeded(decision)
        return reservation

    def debit(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        *,
        dimensions: Mapping[str, Any] | None = None,
        cost: object = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Decision:
        """Count usage (and its ``cost`` / ``price`` as spend) that already happened, whatever
        the limits say (it is never refused)."""
        org = check_org(organization_id)
        clean = check_amounts(amounts)
        now = self.recorder.now()
        spend = self.spend_nano(cost, price, dimensions, now)
        if spend is not None:
            clean[SPEND] = spend
        decision_id = new_id("dbt")

        mode, price = self._charged(self._spend_mode(None, spend, price), spend, price)

        def add() -> Decision:
            lines = self._lines(org, clean, 0, now)  # the plan lookup follows the policy too
            # Usage that happened: charged to this process's leases first, as recorded usage
            # is, so they admit nothing its debit already spent.
            with self.absorbing(), self._atomic():
                changes = self._charge(
                    [(ln.counter.key, ln.counter.amount) for ln in lines],
                    now,
                    getattr(self._absorbed, "taken", None),
                )
                added = dict(
                    zip((k for k, _ in changes), self.counters.counters_add(changes, now=now))
                )
                values = [
                    added[ln.counter.key]
                    if ln.counter.key in added
                    else self._read_counted(org, ln.counter.key, now)
                    for ln in lines
                ]
                result = CounterResult(True, tuple(values), tuple(0 for _ in lines))
                decision = self._describe(org, lines, result, now, decision_id)
                self._after_debit(decision, lines, clean, dimensions, now, price, mode)
                return decision

        decision: Decision | None = self._guard(add)
        return decision if decision is not None else Decision(True, org, degraded=True)

    def set_gauge(self, organization_id: str, metric: str, value: int) -> None:
        """Set a gauge metric's current value (e.g. storage recalculated from real assets)."""
        org = check_org(organization_id)
        if not self.is_gauge(metric):
            raise ValidationError("metric", f"{metric!r} is not a gauge meter")
        check_count("value", value)
        self.counters.counters_set(self.gauge_key(org, metric), value, now=self.recorder.now())

    def used(self, organization_id: str, metric: str, at: int | None = None) -> int:
        """Counted usage of ``metric``: this period's for counters, the current value for gauges."""
        now = self.recorder.now() if at is None else at
        if metric == SPEND:
            return self.spent(organization_id, now)
        if self.is_gauge(metric):
            key = self.gauge_key(organization_id, metric)
        else:
            key = self.period_key(organization_id, metric, self.period(organization_id, now))
        return self._read_counted(organization_id, key, now)

    def _read_counted(self, org: str, key: str, now: int) -> int:
        if self.leases is None:
            value: int = self.counters.counters_read([key], now=now)[0]
            return value
        # No report of this organization may move units between the two reads.
        with self.leases.steady(org):
            self.leases.recover(org, now)
            value = self.counters.counters_read([key], now=now)[0]
            return value + self.leases.consumed(key, now)  # decided here, not reported yet

    def _atomic(self) -> contextlib.AbstractContextManager[None]:
        """One transaction for counters and events, when both live in the same store (in
        memory, each counter call is atomic and debit events are queued: none is needed)."""
        if self.counters is self.recorder.store and not self._in_memory:
            return self.recorder.transaction()
        return contextlib.nullcontext()

    def _guard(self, call: Any) -> Any:
        try:
            return call()
        except StoreUnavailable:
            if self.policy == "open":
                return None
            raise

    def decide_local(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        *,
        ttl: int | None = None,
        dimensions: Mapping[str, Any] | None = None,
        cost: object = None,
    ) -> tuple[Decision, Reservation | None] | None:
        """An admitted decision (a reservation with ``ttl``) made without any store I/O, or
        ``None`` when it needs the store: limits not compiled, a lease short of room, a
        refusal to describe. For an event loop: ``None`` means "ask :meth:`check` or
        :meth:`reserve` in a thread". Nothing is consumed when it answers ``None``.
        """
        if self.leases is None:
            return None
        org = check_org(organization_id)
        clean = check_amounts(amounts)
        if ttl is not None:
            check_ttl(ttl)
        now = self.recorder.now()
        if self.compiled(org, now) is None:
            return None
        c = self._compile(org, now)
        spend = self.spend_nano(cost, None, None, now)
        clean = self._with_spend(c, clean, spend)
        mode, price = self._charged(self._spend_mode(c, spend, None), spend, None)
        lines = self._lines(org, clean, 1, now, c)
        if not all(ln.window or ln.period is not None for ln in lines):
            return None
        decision_id = new_id("rsv" if ttl else "dec")
        events = [] if ttl else self._debit_events(decision_id, org, clean, dimensions, now, price)
        result = self.leases.decide_local(
            lines, now, (decision_id, now + ttl) if ttl else None, self._queuer(events)
        )
        if result is None:
            return None
        return self._from_lease(
            org,
            lines,
            clean,
            result,
            now,
            decision_id,
            dimensions,
            ttl,
            events,
            local=True,
            price=price,
            mode=mode,
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

    def compiled(self, organization_id: str, now: int) -> Period | None:
        """The billing period of an organization whose limits are compiled and fresh at
        ``now`` (no store read needed to decide), else ``None``."""
        hit, _ = self._fresh(organization_id, now)
        return hit.period if hit is not None else None

    def _decide(
        self,
        organization_id: str,
        amounts: Mapping[str, int],
        requests: int,
        *,
        debit: bool,
        hold_ttl: int | None,
        dimensions: Mapping[str, Any] | None,
        cost: object = None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> tuple[Decision, Reservation | None]:
        org = check_org(organization_id)
        clean = check_amounts(amounts)
        check_count("requests", requests)
        now = self.recorder.now()
        spend = self.spend_nano(cost, price, dimensions, now)
        decision_id = new_id("rsv" if hold_ttl else "dec")
        try:
            c = self._compile(org, now)
            clean = self._with_spend(c, clean, spend)
            lines = self._lines(org, clean, requests, now, c)
        except StoreUnavailable:
            if self.policy == "open":
                return self._degraded(org, decision_id, clean, [], hold_ttl, now, dimensions)
            raise
        mode, price = self._charged(self._spend_mode(c, spend, price), spend, price)
        if (
            debit
            and self.leases is not None
            # Inside Meter.transaction() a decision commits (or rolls back) with the rest.
            and not self.recorder.in_transaction()
            and all(ln.window or ln.period is not None for ln in lines)
        ):
            leased = self._leased(
                org, lines, clean, now, decision_id, dimensions, hold_ttl, price, mode
            )
            if leased is not None:
                return leased
        counters = [ln.counter for ln in lines]
        hold = None
        if hold_ttl is not None:
            # The settle marker: 1 while held, 0 once the hold expired, 2 once settled, so a
            # settle sent again after its answer was lost is known as done, not as expired.
            marker = _settle_marker(org, decision_id)
            hold = Hold(
                decision_id,
                org,
                (
                    *(
                        (ln.counter.key, ln.counter.amount)
                        for ln in lines
                        if ln.window == 0 and ln.counter.amount
                    ),
                    (marker, 1),
                ),
                now + hold_ttl,
            )
            counters.append(CounterLine(marker, 1, None, now + hold_ttl + _MARKER_GRACE))

        described: list[Decision] = []

        def apply() -> CounterResult:
            # The debit and the event that records it commit together where the store can.
            with self._atomic():
                result: CounterResult = self.counters.counters_apply(counters, now=now, hold=hold)
                if hold is not None:  # without the settle marker's line
                    result = CounterResult(result.admitted, result.used[:-1], result.previous[:-1])
                if result.admitted and hold_ttl is None:
                    described.append(self._describe(org, lines, result, now, decision_id))
                    self._after_debit(described[0], lines, clean, dimensions, now, price, mode)
                return result

        result = self._guard(apply if debit else lambda: self._peek(counters, now))
        if result is None:
            return self._degraded(org, decision_id, clean, lines, hold_ttl, now, dimensions)
        decision = (
            described[0] if described else self._describe(org, lines, result, now, decision_id)
        )
        if not (decision.allowed and debit) or hold_ttl is None:
            return decision, None
        self._thresholds(org, lines, result)
        keyed = {ln.metric: ln for ln in lines if ln.window == 0}
        reservation = Reservation(self, decision, clean, keyed, now + hold_ttl, dimensions)
        reservation._spent = (mode, price)
        return decision, reservation

    def _leased(
        self,
        org: str,
        lines: list[_Line],
        amounts: dict[str, int],
        now: int,
        decision_id: str,
        dimensions: Mapping[str, Any] | None,
        hold_ttl: int | None,
        price: Mapping[str, Mapping[str, Any]] | None = None,
        mode: str | None = None,
    ) -> tuple[Decision, Reservation | None] | None:
        """Decide from this process's leases (``None``: contended, decide in the store).

        A reservation holds its quota units in the leases until it is settled; its debit
        events are queued when it commits.
        """
        assert self.leases is not None
        events = (
            []
            if hold_ttl
            else self._debit_events(decision_id, org, amounts, dimensions, now, price)
        )
        held = (decision_id, now + hold_ttl) if hold_ttl else None
        try:
            result = self.leases.decide(org, lines, now, held, self._queuer(events))
        except Contended:
            return None
        except StoreUnavailable:
            if self.policy == "open":
                return self._degraded(org, decision_id, amounts, lines, hold_ttl, now, dimensions)
            raise
        self.recorder.start_flusher()
        return self._from_lease(
            org,
            lines,
            amounts,
            result,
            now,
            decision_id,
            dimensions,
            hold_ttl,
            events,
            price=price,
            mode=mode,
        )

    def _queuer(self, events: list[Event]) -> Callable[[], None] | None:
        """What queues a leased decision's events, run by the leases with its consumption
        (never waiting: it runs under their lock)."""
        if not events:
            return None
        return functools.partial(self.recorder.queue, events, wait=False)

    def _from_lease(
        self,
        org: str,
        lines: list[_Line],
        amounts: dict[str, int],
        result: CounterResult,
        now: int,
        decision_id: str,
        dimensions: Mapping[str, Any] | None,
        hold_ttl: int | None,
        events: list[Event],
        *,
        local: bool = False,
        price: Mapping[str, Mapping[str, Any]] | None = None,
        mode: str | None = None,
    ) -> tuple[Decision, Reservation | None]:
        """The decision a lease made, its thresholds, its queued debit events, and (with
        ``hold_ttl``) its reservation. ``local``: on an event loop, nothing waits on I/O."""
        decision = self._describe(org, lines, result, now, decision_id)
        if not result.admitted:
            return decision, None
        self._thresholds_soon(org, lines, {s.metric: s.used for s in decision.limits}, local)
        if events and not local:
            self.recorder.queue([])  # queued with the consumption; the store may set the pace
        if hold_ttl is None:
            counted = self._counted(lines, amounts, mode)
            self._count_decided(
                org, events, counted, leased=True, local=local, priced=price is not None
            )
            return decision, None
        keyed = {ln.metric: ln for ln in lines if ln.window == 0}
        reservation = Reservation(self, decision, amounts, keyed, now + hold_ttl, dimensions)
        reservation.leased = True
        reservation._spent = (mode, price)
        return decision, reservation

    def _degraded(
        self,
        org: str,
        decision_id: str,
        amounts: dict[str, int],
        lines: Sequence[_Line],
        hold_ttl: int | None,
        now: int,
        dimensions: Mapping[str, Any] | None,
    ) -> tuple[Decision, Reservation | None]:
        """Fail open: admit without counting. A reservation holds nothing, but committing it
        counts the actual amounts (its hold is unknown to the store, as if it had expired)."""
        decision = Decision(True, org, degraded=True, id=decision_id)
        if hold_ttl is None:
            return decision, None
        keyed = {ln.metric: ln for ln in lines if ln.window == 0}
        return decision, Reservation(self, decision, amounts, keyed, now + hold_ttl, dimensions)

    def _peek(self, counters: Sequence[CounterLine], now: int) -> CounterResult:
        current = self.counters.counters_read([c.key for c in counters], now=now)
        prev_keys = [c.prev_key or "" for c in counters]
        previous = [
            v if c.prev_key else 0
            for c, v in zip(counters, self.counters.counters_read(prev_keys, now=now))
        ]
        if self.leases is not None:
            # Units leased here are this process's room: only others' leases stand in the way.
            for i, c in enumerate(counters):
                if c.prev_key and c.prev_key.endswith(LEASED):
                    mine = self.leases.consumed(c.key, now)
                    current[i] += mine
                    previous[i] = max(0, previous[i] - self.leases.unused(c.key, now))
                    previous[i] -= min(previous[i], mine)
        admitted = all(fits(c, u, p) for c, u, p in zip(counters, current, previous))
        used = [u + c.amount for c, u in zip(counters, current)] if admitted else current
        return CounterResult(admitted, tuple(used), tuple(previous))

    def _describe(
        self, org: str, lines: Sequence[_Line], result: CounterResult, now: int, decision_id: str
    ) -> Decision:
        states = []
        refused_by = None
        retry_after = None
        for line, used, prev in zip(lines, result.used, result.previous):
            counter = line.counter
            estimate = used + math.floor(prev * counter.prev_weight)
            limit = UNLIMITED if counter.limit is None else counter.limit
            remaining = UNLIMITED if counter.limit is None else max(0, counter.limit - estimate)
            states.append(
                LimitState(line.metric, counter.amount, estimate, limit, remaining, line.reset_at)
            )
            if not result.admitted and refused_by is None and not fits(counter, used, prev):
                refused_by = line.metric
                retry_after = self._retry_after(line, used, prev, now)
        return Decision(
            result.admitted, org, tuple(states), refused_by, retry_after, id=decision_id
        )

    @staticmethod
    def _retry_after(line: _Line, current: int, previous: int, now: int) -> int | None:
        counter = line.counter
        if counter.limit is None or counter.amount > counter.limit:
            return None
        if line.window:
            # Step through the next two windows until the sliding estimate has room.
            window = line.window
            start = now - now % window
            for wait in range(1, 2 * window + 1):
                t = now + wait
                if t < start + window:
                    cur, prev = current, previous
                    weight = (window - (t - start)) / window
                else:
                    cur, prev = 0, (current if t < start + 2 * window else 0)
                    weight = (window - (t - start - window)) / window
                if math.floor(prev * weight) + cur + counter.amount <= counter.limit:
                    return wait
            return 2 * window
        if line.reset_at is None:
            return None  # a gauge frees up only when something is removed
        return max(1, line.reset_at - now)

    def _after_debit(
        self,
        decision: Decision,
        lines: Sequence[_Line],
        amounts: Mapping[str, int],
        dimensions: Mapping[str, Any] | None,
        now: int,
        price: Mapping[str, Mapping[str, Any]] | None = None,
        mode: str | None = None,
    ) -> None:
        result_used = {s.metric: s.used for s in decision.limits}
        self._thresholds_from(decision.organization_id, lines, result_used)
        counted = self._counted(lines, amounts, mode)
        self._record(
            decision.id, decision.organization_id, amounts, dimensions, now, price, counted
        )

    def _thresholds_soon(
        self, org: str, lines: Sequence[_Line], used: Mapping[str, int], local: bool
    ) -> None:
        """Thresholds now, or (``local``, on an event loop) at the next flush, and only when
        one can be reached: claiming a threshold asks the store."""
        if not local:
            self._thresholds_from(org, lines, used)
        elif self._near_threshold(org, lines, used):
            self.recorder.defer(lambda: self._thresholds_from(org, lines, used))

    def _near_threshold(self, org: str, lines: Sequence[_Line], used: Mapping[str, int]) -> bool:
        """Whether any limited line reached the lowest threshold (only then can one fire)."""
        compiled = self._compiled.get(org)
        alerts = compiled.alerts if compiled is not None else ()
        if alerts and used.get(SPEND, -1) >= alerts[0].threshold_nano:
            return True
        if not self.thresholds:
            return False
        lowest = self.thresholds[0]
        for line in lines:
            limit = line.counter.limit
            if not line.window and limit and used.get(line.metric, 0) >= lowest * limit:
                return True
        return False

    def _thresholds(self, org: str, lines: Sequence[_Line], result: CounterResult) -> None:
        self._thresholds_from(org, lines, {ln.metric: u for ln, u in zip(lines, result.used)})

    def _thresholds_from(self, org: str, lines: Sequence[_Line], used: Mapping[str, int]) -> None:
        for line in lines:
            if line.metric == SPEND and line.period is not None:
                compiled = self._compiled.get(org)
                alerts = compiled.alerts if compiled is not None else self.spending(org)[1]
                spent = used.get(SPEND, 0)
                if alerts and spent >= alerts[0].threshold_nano:
                    self._alert(org, alerts, spent, line.period)
            limit = line.counter.limit
            if line.window or limit is None or limit <= 0:
                continue
            value = used.get(line.metric, 0)
            for threshold in self.thresholds:
                if value < threshold * limit:
                    break
                scope = line.period.start if line.period else "gauge"
                marker = f"t\x1f{org}\x1f{line.metric}\x1f{scope}\x1f{threshold}"
                if line.period is not None and marker in self._claimed:
                    continue  # a period's marker is claimed once for ever; a gauge's may expire
                claimed = self.counters.claim_once(
                    marker,
                    now=self.recorder.now(),
                    expires_at=line.period.end if line.period else None,
                )
                if line.period is not None:
                    # Ours once the claim commits (a rolled-back one may be made again);
                    # another process's at once.
                    if claimed:
                        self.recorder.notify(functools.partial(self._remember_claim, marker))
                    else:
                        self._remember_claim(marker)
                if claimed:
                    self.recorder.notify(
                        functools.partial(
                            self.threshold_reached,
                            organization_id=org,
                            metric=line.metric,
                            threshold=threshold,
                            used=value,
                            limit=limit,
                            period_start=line.period.start if line.period else None,
                            alert=None,
                        )
                    )

    def _record(
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
        events = self._debit_events(event_id, org, amounts, dimensions, now, price)
        if events:
            if self._in_memory and not self.recorder.in_transaction():
                # Nothing survives the process anyway: written by the next flush (or query).
                self.recorder.queue(events)
            else:
                self.recorder.record_counted(events)  # counted below, net of the decision
        self._count_decided(org, events, counted, leased=False, priced=price is not None)

    def _debit_events(
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
        events = self._price_events(event_id, org, price, dimensions, now) if price else []
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

    def _price_events(
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

    def _settle(self, reservation: Reservation, actual: dict[str, int] | None) -> None:
        now = self.recorder.now()
        lines = reservation._lines
        if reservation.leased and self.leases is not None:
            self._settle_leased(reservation, actual, now)
            return
        deltas = []
        for metric, held in reservation.held.items():
            line = lines.get(metric)
            if line is None:
                continue
            target = 0 if actual is None else actual[metric]
            deltas.append((line.counter.key, target - held))
        marker = _settle_marker(reservation.organization_id, reservation.id)
        deltas.append((marker, 1))
        settle_done = False
        try:
            with self._atomic():
                settled = self.counters.counters_settle(reservation.id, deltas, now=now)
                if not settled:
                    # Gone: expired, or settled by an attempt whose answer was lost.
                    (mark,) = self.counters.counters_read([marker], now=now)
                    settled = mark >= _SETTLED
                settle_done = True
                if actual is not None:
                    self._settled(reservation, actual, settled, now)
        except StoreUnavailable:
            if self.policy == "open":
                # Fail open, as the decision did: the request is not failed for it. The hold
                # (if any) expires after its ttl and gives its amounts back.
                logger.warning(
                    "meterkit: store unavailable; reservation %s not settled", reservation.id
                )
                return
            if not settle_done or self.counters is self.recorder.store:
                reservation._reopen()
            raise
        except Exception:
            # Nothing changed if the settle itself failed, or if it shared a transaction that
            # rolled back: the reservation may be settled again.
            if not settle_done or self.counters is self.recorder.store:
                reservation._reopen()
            raise

    def _settle_leased(
        self, reservation: Reservation, actual: dict[str, int] | None, now: int
    ) -> None:
        local = self.in_no_io
        assert self.leases is not None
        lines = reservation._lines
        by_key = (
            None
            if actual is None
            else {lines[m].counter.key: a for m, a in actual.items() if m in lines}
        )
        mode, price = reservation._spent
        org = reservation.organization_id
        events = (
            []
            if actual is None
            else self._debit_events(
                reservation.id, org, actual, reservation._dimensions, now, price
            )
        )
        extra = self.leases.settle(
            reservation.id, dict(by_key) if by_key is not None else None, self._queuer(events)
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
        self._thresholds_soon(org, list(lines.values()), used, local)
        if events and not queued:
            self.recorder.queue(events, wait=not local)
        elif events and not local:
            self.recorder.queue([])  # queued with the consumption; the store may set the pace
        counted = self._counted(lines.values(), actual, mode)
        self._count_decided(
            org, events, counted, leased=True, local=local, priced=price is not None
        )

    def _settled(
        self, reservation: Reservation, actual: dict[str, int], settled: bool, now: int
    ) -> None:
        lines = reservation._lines
        if not settled:
            # The hold expired and gave its amounts back; the usage still happened.
            self.counters.counters_add(
                [(lines[m].counter.key, a) for m, a in actual.items() if m in lines], now=now
            )
        values = self.counters.counters_read([ln.counter.key for ln in lines.values()], now=now)
        self._thresholds_from(
            reservation.organization_id, list(lines.values()), dict(zip(lines, values))
        )
        mode, price = reservation._spent
        self._record(
            reservation.id,
            reservation.organization_id,
            actual,
            reservation._dimensions,
            now,
            price,
            self._counted(lines.values(), actual, mode),
        )


class QuotaCounting:
    """The quota counters as the recorder's :class:`~meterkit.recorder.Counting`: they count
    what it stores, in its transactions, and report leased decisions at its flushes."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas

    def atomic(self, begin: Begin | None) -> Begin | None:
        log = self.quotas.countlog
        if begin is not None and log is not None:
            begin = functools.partial(log.around, begin)
        return begin

    def absorbing(self) -> contextlib.AbstractContextManager[None]:
        return self.quotas.absorbing()

    def before_write(self) -> None:
        if self.quotas.countlog is not None:
            # What a killed writer left, before this process counts anew.
            self.quotas.countlog.replay_if_due()

    def feed(self, events: Sequence[Event]) -> None:
        self.quotas.feed(events)

    def unreported(self) -> bool:
        leases = self.quotas.leases
        return leases is not None and leases.unreported()

    def flush(self, recorder: Recorder, closing: bool) -> bool:
        log = self.quotas.countlog
        if log is not None:
            log.replay_if_due()
        leases = self.quotas.leases
        if log is not None and log.behind and leases is not None and leases.pending():
            # A lease report must not run before the changes logged ahead of it.
            raise StoreUnavailable("counters unavailable: logged changes wait to be applied")
        if leases is None or not (leases.pending() or (closing and leases.holding())):
            return False
        # The report in the events' transaction where the counters are in the store.
        begin = recorder.atomic_writes() if self.quotas.counters is self.quotas.store else None
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
