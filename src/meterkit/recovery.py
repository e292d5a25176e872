"""Rebuild quota counters from the durable event store (after Redis lost them, say).

Counters are a fast copy of what the event store already knows: every admitted ``check``,
every committed reservation and every ``debit`` records an event in the meter named after the
metric (``tokens``, ``credits``, …; see ``Meter(record_debits=True)``, the default). So when a
counters backend comes back empty — Redis restarted without persistence, or counters moved to a
new backend — :func:`rebuild_counters` recomputes:

- each **period counter** of the *current* billing period: the sum of that metric's events
  from the period's start until now;
- each **gauge** (``storage_bytes``, ``spaces``): the latest recorded value of each series
  (one combination of dimensions, e.g. one ``resource``), combined as the meter says (summed).

What it cannot rebuild, because no event records it:

- **reservations held** when the counters were lost: their amounts are not counted again, and
  their ``commit`` counts the actual amount (an expired or unknown hold is treated so);
- **rate-limit windows** (requests per minute / per day): they start empty;
- **gauge changes made without an event** (``Meter.debit`` of a gauge, ``set_gauge``): only
  recorded gauge events count — run ``Meter.recalculate_storage`` for ``storage_bytes`` when a
  ``meterkit_stored_assets`` plugin reports the real sizes;
- **threshold notifications** already sent: the markers are gone, so the 80 % / 100 % hooks may
  fire once more in this period;
A metric counts its own meter's events — what decisions recorded and what the application
recorded there itself — and those of the sources it is defined over (:mod:`meterkit.planmetrics`),
exactly as they were counted when recorded.

A lease whose holder stopped reporting (``kill -9``) expires by counting every unit it still
held as consumed — its holder may have used them — and adds them to the counter's
:data:`~meterkit.quotas.leases.STRANDED` twin, which the events do not show: a rebuild keeps
them (the counter is the events plus the stranded units) until the period ends. Recorded usage
a lease absorbed is in the events before its report counts it: its
:data:`~meterkit.quotas.leases.ABSORBED` twin, written with those events, is taken off until
then — for a holder killed before that report as well, whose stranded units include it.

Requests admitted while a rebuild runs are counted twice or not at all for the metrics being
rebuilt at that moment; run it before sending traffic to the new counters, or accept that drift.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from meterkit.counters import clamp
from meterkit.models import MeterSpec, Number
from meterkit.periods import Period
from meterkit.planmetrics import contributions
from meterkit.pricing import default_period_of
from meterkit.quotas import Quotas
from meterkit.quotas.leases import ABSORBED, STRANDED
from meterkit.spend import SPEND
from meterkit.stores.base import Capabilities


class Events(Protocol):
    """The public members of a :class:`~meterkit.Meter` that reading a metric's events uses
    (the facade imports this module, so it names them instead of importing it)."""

    store: Any
    quotas: Quotas

    def spec(self, name: object, field: str = ...) -> MeterSpec: ...


class Meter(Events, Protocol):
    """... and those a rebuild uses."""

    counters: Any
    capabilities: Capabilities

    @property
    def meters(self) -> Mapping[str, MeterSpec]: ...

    def now(self) -> int: ...

    def flush(self, *, release_leases: bool = ...) -> None: ...


__all__ = [
    "counted_organizations",
    "counter_differences",
    "metric_total",
    "quota_metrics",
    "rebuild_counters",
]


def quota_metrics(meter: Meter) -> list[MeterSpec]:
    """The meters of every quota metric: a meter with a measure of its own name (defined
    metrics get one, stored ones included)."""
    names = meter.quotas.metrics()
    specs = meter.meters
    return [specs[name] for name in names if name in specs]


def metric_total(meter: Events, metric: str, org: str, start: int, end: int) -> int:
    """What the metric counts over ``[start, end)``: its own meter's events (decisions record
    there) and those of its sources, by the same rule that counts them as they are recorded."""
    found = next((m for m in meter.quotas.metric_sources() if m.name == metric), None)
    if found is None:
        return 0
    total = 0
    for meter_name in dict.fromkeys(s.meter for s in found.sources):
        meter.store.ensure_meter(meter.spec(meter_name))
        events = meter.store.scan(meter_name, org, start, end)
        for items in contributions([found], events).values():
            total += sum(amount for _, amount in items)
    return total


def _gauge_value(meter: Meter, spec: MeterSpec, org: str, now: int) -> Number | None:
    """The latest value of every series of a gauge, combined; ``None`` without any event."""
    measure = spec.measure(spec.name)
    assert measure is not None
    meter.store.ensure_meter(spec)
    latest: dict[tuple[object, ...], tuple[int, str, Number]] = {}
    for event in meter.store.scan(spec.name, org, 0, now + 1):
        value = event.values.get(spec.name)
        if value is None:
            continue
        series = tuple(event.dimensions.get(d) for d in spec.dimension_names)
        seen = latest.get(series)
        if seen is None or (event.time, event.id) > seen[:2]:
            latest[series] = (event.time, event.id, value)
    if not latest:
        return None
    values = [v for _t, _i, v in latest.values()]
    if measure.aggregation == "max":
        return max(values)
    if measure.aggregation == "min":
        return min(values)
    total: Number = sum(values)
    return total


def _from_events(meter: Meter, spec: MeterSpec, org: str, period: Period, now: int) -> int | None:
    """What a quota metric's counter should hold by the events: a gauge's current value
    (``None`` without any event), else the period's total so far, plus the units leases that
    expired unreported stranded, less the recorded usage leases absorbed and did not report
    yet (clamped: a sum of many events may pass the counters' bound)."""
    measure = spec.measure(spec.name)
    assert measure is not None
    if measure.gauge:
        gauge = _gauge_value(meter, spec, org, now)
        return None if gauge is None else clamp(int(gauge))
    key = Quotas.period_key(org, spec.name, period)
    stranded, absorbed = meter.counters.counters_read([key + STRANDED, key + ABSORBED], now=now)
    total = int(metric_total(meter, spec.name, org, period.start, now + 1))
    return clamp(total + stranded - absorbed)


def _spend_from_events(meter: Meter, org: str, now: int) -> tuple[str, int, int] | None:
    """The spend counter of the month by the events — its key, its value (the priced events'
    cost rounded up once, plus stranded, less absorbed units, as for a metric) and how many
    priced events there are — or ``None`` where nothing is priced."""
    book = meter.quotas.price_book()
    if not len(book):
        return None
    month = default_period_of(now)
    events: list[Any] = []
    for name, spec in meter.meters.items():
        if book.prices_meter(name):
            meter.store.ensure_meter(spec)
            events.extend(meter.store.scan(name, org, month.start, now + 1))
    found, priced = meter.quotas.spend_from(events)
    key = meter.quotas.spend_key(org, now)
    stranded, absorbed = meter.counters.counters_read([key + STRANDED, key + ABSORBED], now=now)
    return key, clamp(found.get(key, 0) + stranded - absorbed), priced


def rebuild_counters(
    meter: Meter, organization_id: str | None = None, *, metrics: Iterable[str] | None = None
) -> dict[str, dict[str, int]]:
    """Recompute ``meter``'s period counters and gauges from its event store.

    Rebuilds one organization, or (``None``) every organization assigned a plan or given a
    spend limit or cap (and, with ``metrics``, every one with events that feed them); every
    quota metric and the month's spend (listed as ``"spend"``, in nano-dollars), or only
    ``metrics``. Returns ``{organization: {metric: value set}}``; a gauge with no recorded
    event is left alone and not listed. Every value is *set*, not added, so running it twice is
    harmless.
    """
    # Leases taken afterwards start from the rebuilt counters.
    _caught_up(meter)
    now = meter.now()
    if organization_id is not None:
        orgs = [organization_id]
    else:
        orgs = counted_organizations(meter)
        if metrics is not None:
            orgs = sorted(set(orgs) | _with_usage(meter, set(metrics)))
    counters = meter.counters
    only = None if metrics is None else set(metrics)
    report: dict[str, dict[str, int]] = {}
    for org in orgs:
        period = meter.quotas.period(org, now)
        values: dict[str, int] = {}
        for spec in quota_metrics(meter):
            metric = spec.name
            if only is not None and metric not in only:
                continue
            found = _from_events(meter, spec, org, period, now)
            if found is None:
                continue
            values[metric] = found
            if meter.quotas.is_gauge(metric):
                counters.counters_set(Quotas.gauge_key(org, metric), found, now=now)
            else:
                counters.counters_set(
                    Quotas.period_key(org, metric, period), found, now=now, expires_at=period.end
                )
        spend = None if only is not None else _spend_from_events(meter, org, now)
        if spend is not None:
            key, value, _priced = spend
            counters.counters_set(key, value, now=now, expires_at=default_period_of(now).end)
            values[SPEND] = value
        report[org] = values
    return report


def _caught_up(meter: Meter) -> None:
    """Before counters are compared with the events: this process's leases and queued debits
    reach the store, so the events hold all this meter decided, and changes a killed writer
    logged with its events are applied."""
    meter.flush(release_leases=True)
    if meter.quotas.countlog is not None:
        meter.quotas.countlog.replay()


def counted_organizations(meter: Events) -> list[str]:
    """The organizations whose counters a rebuild or ``doctor`` goes over by default: every one
    assigned a plan or given a spend limit or cap."""
    return meter.quotas.book.organizations()


def _with_usage(meter: Meter, metrics: set[str]) -> set[str]:
    """Organizations with events on a meter that feeds one of ``metrics`` (a default plan's
    organizations have no assignment to list them by)."""
    lister = meter.capabilities.organizations
    if lister is None:
        return set()
    found: set[str] = set()
    for metric in meter.quotas.metric_sources():
        if metric.name in metrics:
            for name in {s.meter for s in metric.sources}:
                meter.store.ensure_meter(meter.spec(name))
                found.update(lister(name))
    return found


def counter_differences(meter: Meter, organization_id: str) -> dict[str, tuple[int, int]]:
    """The quota counters of ``organization_id`` that differ from what its events give, as
    ``{metric: (from the events, counted)}``: what :func:`rebuild_counters` would fix. Changes
    no counter (this process's leases and queued debits are flushed first, as there). Spend
    (``"spend"``, nano-dollars) differs when below the month's costs, or above them by more
    than the rounding up of each recorded batch (a nano-dollar per priced event)."""
    _caught_up(meter)
    now = meter.now()
    period = meter.quotas.period(organization_id, now)
    out: dict[str, tuple[int, int]] = {}
    for spec in quota_metrics(meter):
        metric = spec.name
        want = _from_events(meter, spec, organization_id, period, now)
        if want is None:
            continue
        got = meter.quotas.used(organization_id, metric, at=now)
        if want != got:
            out[metric] = (want, got)
    spend = _spend_from_events(meter, organization_id, now)
    if spend is not None:
        _key, want, priced = spend
        got = meter.quotas.spent(organization_id, now)
        # Each recorded batch was rounded up on its own: up to a nano-dollar per priced event.
        if not want <= got <= want + priced:
            out[SPEND] = (want, got)
    return out
