"""The costs query: OpenAI's ``GET /v1/organization/costs`` over stored events and a price book.

Every event is priced with :func:`meterkit.pricing.rate` at the version in effect at its own
time, then its charges are summed per day bucket and group, exactly, in ``Decimal``.
:class:`CostResult` keeps the exact ``amount``; :meth:`CostsPage.to_dict` is the JSON edge, where
amounts (and quantities) become JSON numbers (``float`` of the ``Decimal``, correctly rounded;
whole quantities stay integers).

Filters select charges *after* pricing: tiers always count all of an organization's usage of a
line, whichever projects or keys a query asks about.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import attrs
import cattrs

from meterkit import integrals
from meterkit.catalog import API_SOURCES
from meterkit.convert import openai_converter
from meterkit.engine import timeweighted
from meterkit.engine.aggregate import Rows
from meterkit.engine.cursor import decode_cursor, encode_cursor
from meterkit.engine.page import bucket_starts
from meterkit.errors import ValidationError
from meterkit.models import Dimension, DimValue, Event, Measure, MeterSpec, UsageQuery
from meterkit.periods import Period
from meterkit.pricing import (
    EXACT_CONTEXT,
    PriceBook,
    Tally,
    default_period_of,
    over_time,
    priceable,
    rate,
    tier_bounds,
    to_units,
)
from meterkit.query import UsageReader
from meterkit.stores.base import Store
from meterkit.validate import check_id, check_time, check_usage_query

__all__ = [
    "COSTS_GROUPS",
    "COSTS_METER",
    "COSTS_OBJECT",
    "CostBucket",
    "CostResult",
    "CostsPage",
    "UnpricedUsage",
    "check_costs_query",
    "costs_page",
    "register_costs_hooks",
    "unpriced",
]

COSTS_METER = "costs"  # the name costs queries carry in their cursors
COSTS_OBJECT = "organization.costs.result"
COSTS_GROUPS: tuple[str, ...] = ("project_id", "user_id", "line_item", "api_key_id", "api_source")
# The shape a costs query is checked against: its groups are the dimensions it may use.
COSTS_SPEC = MeterSpec(
    COSTS_METER,
    [Measure("amount")],
    [
        Dimension(name, allowed=API_SOURCES, default="unlabeled")
        if name == "api_source"
        else Dimension(name)
        for name in COSTS_GROUPS
    ],
)
COSTS_DEFAULT_LIMIT = 7
COSTS_MAX_LIMIT = 180
DAY = 86400

if TYPE_CHECKING:
    from typing_extensions import Required, TypedDict, Unpack

    class CostsKeywords(TypedDict, total=False):
        """The keywords of a costs query (:func:`costs_page`), for type checkers."""

        organization_id: Required[str]
        start_time: Required[Any]
        end_time: Any
        bucket_width: str
        group_by: Iterable[str] | None
        filters: Mapping[str, Iterable[str]] | None
        limit: int | None
        page: str | None

    class UnpricedKeywords(TypedDict, total=False):
        """The keywords of :meth:`CostsReader.unpriced`, for type checkers."""

        organization_id: Required[str]
        start_time: Required[Any]
        end_time: Any
        meters: Iterable[str] | None


PeriodOf = Callable[[int], Period]
RowsOf = Callable[[MeterSpec, UsageQuery], Rows]
"""``rows(spec, query)``: the rows of a usage query (native, or the engine's over a scan)."""
_ZERO = Decimal(0)


@attrs.frozen
class CostResult:
    """One group's cost in one day bucket and one currency.

    ``quantity`` (measure units over the price's ``quantity_per``: raw units unless a price
    says otherwise, gibibyte-hours for vector stores) and ``quantity_unit`` are set only when
    the query groups by ``line_item``; grouping fields not grouped by are ``None``. Grouped
    by ``api_source``, usage without one reads ``"unlabeled"``.
    """

    amount: Decimal
    currency: str
    line_item: str | None = None
    project_id: DimValue = None
    api_key_id: DimValue = None
    quantity: Decimal | None = None
    quantity_unit: str | None = None
    object: str = COSTS_OBJECT
    user_id: DimValue = None
    api_source: DimValue = None


@attrs.frozen
class CostBucket:
    start_time: int
    end_time: int
    results: tuple[CostResult, ...]


@attrs.frozen
class CostsPage:
    """A page of day buckets; ``next_page`` is an opaque cursor, or ``None`` on the last page."""

    data: tuple[CostBucket, ...]
    has_more: bool
    next_page: str | None

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI costs envelope, amounts as JSON numbers."""
        out: dict[str, Any] = openai_converter.unstructure(self, CostsPage)
        return out

    def totals(self) -> dict[str, Decimal]:
        """The exact total of this page per currency."""
        sums: dict[str, Decimal] = {}
        for bucket in self.data:
            for result in bucket.results:
                total = sums.get(result.currency, _ZERO)
                sums[result.currency] = EXACT_CONTEXT.add(total, result.amount)
        return sums


@attrs.frozen(hash=False)
class UnpricedUsage:
    """Usage no price matched: one meter, measure and dimension combination (``None``-valued
    dimensions left out), its total quantity and the times of its first and last events."""

    meter: str
    measure: str
    dimensions: Mapping[str, DimValue]
    quantity: Decimal
    first_time: int
    last_time: int


# -- wire format -----------------------------------------------------------------------------


def _number(value: Decimal) -> int | float:
    # Whole quantities stay exact integers; everything else is the nearest float.
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def _result_to_dict(result: CostResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "object": result.object,
        "amount": {"value": float(result.amount), "currency": result.currency},
        "line_item": result.line_item,
        "project_id": result.project_id,
        "user_id": result.user_id,
        "api_key_id": result.api_key_id,
        "api_source": result.api_source,
        # Not grouped by line item, the units of different lines are not added up: null.
        "quantity": None if result.quantity is None else _number(result.quantity),
        "quantity_unit": result.quantity_unit,
    }
    return out


def register_costs_hooks(conv: cattrs.Converter) -> None:
    """Teach an OpenAI-format converter the costs page, results and buckets."""
    conv.register_unstructure_hook(CostResult, _result_to_dict)
    conv.register_unstructure_hook(
        CostBucket,
        lambda b: {
            "object": "bucket",
            "start_time": b.start_time,
            "end_time": b.end_time,
            "results": [_result_to_dict(r) for r in b.results],
        },
    )
    conv.register_unstructure_hook(
        CostsPage,
        lambda p: {
            "object": "page",
            "data": [conv.unstructure(b, CostBucket) for b in p.data],
            "has_more": p.has_more,
            "next_page": p.next_page,
        },
    )


register_costs_hooks(openai_converter)


# -- validation ------------------------------------------------------------------------------


def check_costs_query(
    *,
    organization_id: object,
    start_time: object,
    end_time: object,
    bucket_width: object = "1d",
    group_by: object = None,
    filters: object = None,
    limit: object = None,
) -> UsageQuery:
    """Validate a costs query; the result is a :class:`UsageQuery` on the meter ``"costs"``.

    ``filters`` maps ``project_id``, ``api_key_id`` or ``line_item`` (or ``user_id``) to the
    allowed values.
    """
    return check_usage_query(
        COSTS_SPEC,
        organization_id=organization_id,
        start_time=start_time,
        end_time=end_time,
        bucket_width=bucket_width,
        group_by=group_by,
        filters=filters,
        limit=limit,
        widths={"1d": (DAY, COSTS_DEFAULT_LIMIT, COSTS_MAX_LIMIT)},
    )


# -- the query -------------------------------------------------------------------------------


def _order(value: DimValue) -> tuple[int, str]:
    return (0, "") if value is None else (1, str(value))


def costs_page(
    store: Store,
    specs: Mapping[str, MeterSpec],
    book: PriceBook,
    *,
    organization_id: str,
    start_time: Any,
    end_time: Any,
    bucket_width: str = "1d",
    group_by: Iterable[str] | None = None,
    filters: Mapping[str, Iterable[str]] | None = None,
    limit: int | None = None,
    page: str | None = None,
    secret: bytes | None = None,
    period_of: PeriodOf | None = None,
    reader: UsageReader | None = None,
) -> CostsPage:
    """One page of daily costs, OpenAI semantics (see docs/costs.md).

    ``secret`` signs cursors (default: the store's); ``period_of`` gives the billing period
    tiers count in (default: calendar months, UTC). With a ``reader`` (the usage queries of a
    :class:`meterkit.Meter`, answered from rollups) usage is priced in aggregate, exactly as
    per event (see :func:`_aggregated`); without, every event is priced.
    """
    query = check_costs_query(
        organization_id=organization_id,
        start_time=start_time,
        end_time=end_time,
        bucket_width=bucket_width,
        group_by=group_by,
        filters=filters,
        limit=limit,
    )
    secret = secret if secret is not None else store.secret()
    if page is not None:
        query = attrs.evolve(query, page_start=decode_cursor(secret, query, page))
    period_of = period_of or default_period_of
    starts, next_start = bucket_starts(query)
    low, high = query.scan_start, query.page_end

    events: list[Event] = []
    wanted = {*query.group_by, *(name for name, _ in query.filters)}
    for meter in book.meters:
        spec = specs.get(meter)
        if spec is None:
            # Skipping it would report its usage as free.
            raise ValidationError("meter", f"meter {meter!r} has prices but is not registered")
        modes = book.tier_modes(meter)
        # Tier counts start at the period's start; volume tiers need the period's total.
        scan_low = min(period_of(low).start if modes else low, low)
        scan_high = max(period_of(high - 1).end if "volume" in modes else high, high)
        store.ensure_meter(spec)
        org = query.organization_id
        gauges = tuple(
            m.name for m in spec.measures if over_time(spec, m.name) and book.priced(meter, m.name)
        )
        if gauges:
            events.extend(_integrated(spec, gauges, book, org, (low, high), wanted, store))
            if all(m.name in gauges for m in spec.measures if book.priced(meter, m.name)):
                continue
        if reader is None or any(
            m.fractional
            for m in spec.measures
            if priceable(spec, m.name) and book.priced(meter, m.name)
        ):
            # Floats are priced as given, each exactly: their sum in a row would round.
            scanned = store.scan(meter, org, scan_low, scan_high)
            events.extend(_without(gauges, scanned) if gauges else scanned)
            continue
        found = _aggregated(
            spec, book, org, scan_low, scan_high, (low, high), wanted, period_of, reader.rows, store
        )
        events.extend(_without(gauges, found) if gauges else found)

    by_line = "line_item" in query.group_by
    # Each charge's fields are the tuple (project_id, api_key_id, line_item, user_id,
    # api_source); these are the positions grouped and filtered on.
    position = {"project_id": 0, "api_key_id": 1, "line_item": 2, "user_id": 3, "api_source": 4}
    group_at = [position[name] for name in query.group_by]
    # Usage without an api_source is "unlabeled" usage, whatever its meter (as OpenAI counts
    # records without source attribution), in groups and filters alike.
    filter_at = [
        (
            position[name],
            frozenset("unlabeled" if v is None and name == "api_source" else v for v in allowed),
        )
        for name, allowed in query.filters
    ]
    sums: dict[tuple[int, tuple[DimValue, ...], str, str | None], tuple[Tally, Tally]]
    sums = {}
    for charge in rate(book, events, period_of):
        event, price = charge.event, charge.price
        time = event.time
        if time < low or time >= high:
            continue
        dims = event.dimensions
        fields = (
            dims.get("project_id"),
            dims.get("api_key_id"),
            price.line_item,
            dims.get("user_id"),
            dims.get("api_source") or "unlabeled",
        )
        if filter_at and any(fields[at] not in allowed for at, allowed in filter_at):
            continue
        key = (
            time - time % DAY,
            tuple([fields[at] for at in group_at]),
            price.currency,
            # One line item might be named by prices with different units: never add them up.
            price.quantity_unit if by_line else None,
        )
        slot = sums.get(key)
        if slot is None:
            slot = sums[key] = (Tally(), Tally())
        slot[0].add(charge.numerator, charge.per)
        slot[1].add(charge.units, price.quantity_per)

    per_bucket: dict[int, list[CostResult]] = {}
    for (start, group, currency, unit), (tally, quantity) in sorted(
        sums.items(),
        key=lambda item: (
            item[0][0],
            [_order(v) for v in item[0][1]],
            item[0][2],
            item[0][3] or "",
        ),
    ):
        values = dict(zip(query.group_by, group, strict=True))
        line_item = values.get("line_item")
        per_bucket.setdefault(start, []).append(
            CostResult(
                amount=tally.value(),
                currency=currency,
                line_item=line_item if isinstance(line_item, str) else None,
                project_id=values.get("project_id"),
                api_key_id=values.get("api_key_id"),
                user_id=values.get("user_id"),
                api_source=values.get("api_source"),
                quantity=quantity.value() if by_line else None,
                quantity_unit=unit,
            )
        )
    buckets = tuple(
        CostBucket(start, start + DAY, tuple(per_bucket.get(start, ()))) for start in starts
    )
    cursor = encode_cursor(secret, query, next_start) if next_start is not None else None
    return CostsPage(buckets, next_start is not None, cursor)


def _cuts(
    meter: str, book: PriceBook, start: int, end: int, edges: tuple[int, int], period_of: PeriodOf
) -> list[int]:
    """Where aggregated usage must be split: a price version of ``meter`` starting, a billing
    period ending (tiers count per period) and the query's own edges."""
    cuts = {start, end, *edges}
    cuts.update(t for t in book.version_starts(meter) if start < t < end)
    if book.tier_modes(meter):
        period = period_of(start)
        while period.end < end:
            cuts.add(period.end)
            period = period_of(period.end)
    return sorted(t for t in cuts if start <= t <= end)


def _aggregated(
    spec: MeterSpec,
    book: PriceBook,
    org: str,
    start: int,
    end: int,
    edges: tuple[int, int],
    wanted: set[str],
    period_of: PeriodOf,
    rows: RowsOf,
    store: Store,
) -> list[Event]:
    """``spec``'s usage in ``[start, end)`` as few events as price exactly like the real ones.

    One event per day, slice and group, where a slice runs between :func:`_cuts` (so one price
    version applies to all of it) and a group holds the dimensions the costs query groups or
    filters on and those the meter's prices match on (so one price line applies). Pricing is
    linear in units except where a tiered line passes a tier's first unit; a day in which that
    happens (for any tiered line of the meter) keeps its real events, priced one by one in
    order as always.
    """
    group_by = tuple(
        d for d in spec.dimension_names if d in wanted or d in book.matched_dimensions(spec.name)
    )
    cuts = _cuts(spec.name, book, start, end, edges, period_of)
    synthetic: list[Event] = []
    for a, b in itertools.pairwise(cuts):
        if a >= b:
            continue
        query = UsageQuery(
            spec.name,
            org,
            a,
            b,
            "1d",
            DAY,
            group_by,
            (),
            -(-(b - (a - a % DAY)) // DAY),
            a - a % DAY,
        )
        found = rows(spec, query)
        for i, ((day, group), values) in enumerate(found.items()):
            numbers = {k: v for k, v in values.items() if v}
            if numbers:
                synthetic.append(
                    Event(
                        f"\x1f{a}:{i}",
                        spec.name,
                        org,
                        max(day, a),
                        numbers,  # type: ignore[arg-type]
                        dict(zip(group_by, group)),
                    )
                )
    crossing = _crossing_days(book, synthetic, period_of)
    if not crossing:
        return synthetic
    kept = [e for e in synthetic if e.time - e.time % DAY not in crossing]
    for day in sorted(crossing):
        kept.extend(store.scan(spec.name, org, max(day, start), min(day + DAY, end)))
    return kept


def _integrated(
    spec: MeterSpec,
    gauges: tuple[str, ...],
    book: PriceBook,
    org: str,
    edges: tuple[int, int],
    wanted: set[str],
    store: Store,
) -> list[Event]:
    """The gauges' integrals over ``edges`` (value x seconds, carried in from before) as
    aggregated events that price like usage: one per day, slice and group (:func:`_aggregated`;
    their prices have no tiers, so no day needs its real events)."""
    weighted = timeweighted.reading(spec, gauges)
    only = attrs.evolve(
        weighted, measures=[m for m in weighted.measures if m.name in gauges], sums=()
    )

    def integral_rows(_spec: MeterSpec, query: UsageQuery) -> Rows:
        return integrals.time_weighted_rows(store, spec, query, only)

    low, high = edges
    return _aggregated(
        only, book, org, low, high, edges, wanted, default_period_of, integral_rows, store
    )


def _without(measures: tuple[str, ...], events: Iterable[Event]) -> list[Event]:
    """``events`` without the values of gauges priced over time (:func:`_integrated`)."""
    out = []
    for event in events:
        values = {k: v for k, v in event.values.items() if k not in measures}
        if values:
            out.append(
                attrs.evolve(event, values=values) if len(values) < len(event.values) else event
            )
    return out


def _crossing_days(book: PriceBook, events: list[Event], period_of: PeriodOf) -> set[int]:
    """The days in which a tiered line of these (aggregated) events passes the first unit of
    a tier while more than one of them shares the moment it happens at: a day whose count
    runs from ``before`` to ``after`` passes every tier bound ``L`` with
    ``before <= L < after``. Elsewhere every unit of a day is priced at one rate, or the
    bound falls inside one aggregated event, which is priced across it as the real ones
    would be in any order."""
    per_day: dict[tuple[Any, int], Decimal] = {}
    prices: dict[Any, set[Any]] = {}
    at: dict[tuple[Any, int], dict[int, int]] = {}  # events of a line and day, per time
    for event in events:
        for measure, value in event.values.items():
            price = book.match(event.meter, measure, event.dimensions, event.time)
            if price is None or not price.tiers:
                continue
            period = period_of(event.time).start
            key = (price.line, period)
            prices.setdefault(key, set()).add(price)  # each version's tiers count
            slot = (key, event.time - event.time % DAY)
            per_day[slot] = EXACT_CONTEXT.add(per_day.get(slot, _ZERO), to_units(value))
            times = at.setdefault(slot, {})
            times[event.time] = times.get(event.time, 0) + 1
    if not per_day:
        return set()
    totals: dict[Any, Decimal] = {}
    for (key, _day), units in per_day.items():
        totals[key] = EXACT_CONTEXT.add(totals.get(key, _ZERO), units)
    counted: dict[Any, Decimal] = {}
    out: set[int] = set()
    for (key, day), units in sorted(per_day.items(), key=lambda item: item[0][1]):
        before = counted.get(key, _ZERO)
        after = counted[key] = EXACT_CONTEXT.add(before, units)
        bounds = [b for price in prices[key] for b in tier_bounds(price, totals[key])]
        if any(before <= bound < after for bound in bounds) and max(at[(key, day)].values()) > 1:
            out.add(day)
    return out


def unpriced(
    store: Store,
    specs: Mapping[str, MeterSpec],
    book: PriceBook,
    *,
    organization_id: str,
    start_time: Any,
    end_time: Any,
    meters: Iterable[str] | None = None,
) -> list[UnpricedUsage]:
    """Usage in ``[start_time, end_time)`` that no price matched, so costs leave it out.

    Looks at every summed measure of ``meters`` (default: every meter in ``specs``), not at
    gauges, which are priced over time; zero values are not usage. Sorted by meter, measure
    and dimensions.
    """
    org = check_id("organization_id", organization_id)
    start = check_time("start_time", start_time)
    end = check_time("end_time", end_time)
    if end <= start:
        raise ValidationError("end_time", "must be greater than start_time")
    if meters is None:
        names = sorted(specs)
    else:
        if isinstance(meters, (str, bytes)) or not isinstance(meters, Iterable):
            raise ValidationError("meters", "must be a list of meter names")
        names = sorted(set(meters))
        for name in names:
            if name not in specs:
                raise ValidationError("meters", f"unknown meter {name!r}")
    found: dict[tuple[str, str, tuple[tuple[str, str], ...]], UnpricedUsage] = {}
    for name in names:
        spec = specs[name]
        measures = [
            m.name for m in spec.measures if priceable(spec, m.name) and not over_time(spec, m.name)
        ]
        if not measures:
            continue
        store.ensure_meter(spec)
        for event in store.scan(name, org, start, end):
            for measure in measures:
                value = event.values.get(measure)
                if not value or book.match(name, measure, event.dimensions, event.time):
                    continue
                dims = {k: v for k, v in sorted(event.dimensions.items()) if v is not None}
                key = (name, measure, tuple((k, json.dumps(v)) for k, v in dims.items()))
                seen = found.get(key)
                units = to_units(value)
                if seen is None:
                    found[key] = UnpricedUsage(name, measure, dims, units, event.time, event.time)
                else:
                    found[key] = attrs.evolve(
                        seen,
                        quantity=EXACT_CONTEXT.add(seen.quantity, units),
                        first_time=min(seen.first_time, event.time),
                        last_time=max(seen.last_time, event.time),
                    )
    return [found[key] for key in sorted(found)]


class CostsReader:
    """Costs pages and unpriced usage of one meter's store, priced from its usage queries
    (``reader``) at the price book ``book()`` gives, in each organization's billing periods
    (``period(organization_id, t)``)."""

    def __init__(
        self,
        reader: UsageReader,
        book: Callable[[], PriceBook],
        period: Callable[[str, int], Period],
    ) -> None:
        self.reader = reader
        self.book = book
        self.period = period

    def page(self, **query: Unpack[CostsKeywords]) -> CostsPage:
        """One page of costs (:func:`costs_page`); ``end_time`` defaults to now."""
        reader = self.reader
        reader.sync()
        org = query.get("organization_id")
        if query.get("end_time") is None:
            query["end_time"] = reader.end_now(query.get("start_time"))
        return costs_page(
            reader.retained_store(),
            reader.registry.specs,
            self.book(),
            **query,
            period_of=self._period_of(org),
            reader=reader,
        )

    def unpriced(
        self,
        *,
        organization_id: str,
        start_time: Any,
        end_time: Any = None,
        meters: Iterable[str] | None = None,
    ) -> list[UnpricedUsage]:
        """Usage no price matched (:func:`unpriced`); ``end_time`` defaults to now."""
        reader = self.reader
        reader.sync()
        return unpriced(
            reader.retained_store(),
            reader.registry.specs,
            self.book(),
            organization_id=organization_id,
            start_time=start_time,
            end_time=end_time if end_time is not None else reader.now(),
            meters=meters,
        )

    def _period_of(self, organization_id: object) -> PeriodOf | None:
        if not isinstance(organization_id, str) or not organization_id:
            return None  # the costs query reports the bad organization_id itself
        return lambda t: self.period(organization_id, t)
