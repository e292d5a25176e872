"""The price book: versioned, dimension-matched, optionally tiered unit prices, in ``Decimal``.

Prices
------
A :class:`Price` charges ``unit_price`` per ``per`` units of one summed measure of one meter,
for events whose dimensions include every ``where`` pair (``where`` absent = any event).
``(meter, measure, where)`` is a *version line*; its versions differ in ``effective_from``. At
time ``t`` the version in effect is the one with the greatest ``effective_from <= t``: a later
version supersedes an earlier one from its start, to the second.

Matching (:meth:`PriceBook.match`): among the lines whose ``where`` is a subset of the event's
dimensions and that have a version in effect at the event's time, the most specific (largest
``where``) wins. Equally specific lines are ordered by their ``where`` as canonical JSON (sorted
``[name, value]`` pairs), and the first wins: ``{"model": "x"}`` beats ``{"project_id": "p"}``
because ``"model" < "project_id"``. The rule depends only on the prices, never on the order they
were added in.

Gauges
------
A gauge is priced over time: a summed gauge (``vector_stores.usage_bytes``) or a
``time_weighted`` measure is charged for its integral, value x seconds (see
:mod:`meterkit.engine.timeweighted`), so its ``per`` counts byte-seconds, say:
``per=GIBIBYTE_HOUR * 24`` prices gibibyte-days. Costs report a line's quantity as units
divided by ``quantity_per`` (``GIBIBYTE_HOUR`` for ``gibibyte_hours``). Such a price has no
tiers, and spend counters (which count each event as it is recorded) leave it out.

Amounts
-------
``n`` units at ``unit_price`` per ``per`` units cost ``Decimal(n) * unit_price / per``. Prices are
``Decimal`` from end to end: strings and ints are accepted, floats are refused (they are
inexact). Products and sums are exact (a context of 200 digits that raises rather than rounds);
the division by ``per`` is kept apart (:class:`Charge` carries ``numerator`` and ``per``) and done
once per total (:class:`Tally`). It is exact whenever ``per`` has no prime factor but 2 and 5
(1, 1000, 1_000_000, ...); otherwise that one division rounds at 50 significant digits. Float
measure values (seconds, say) enter as the ``Decimal`` of their shortest repr (``1.1`` is 1.1).

Tiers
-----
A tiered price has ``tiers`` (each ``up_to`` units, the last open-ended) and a ``tier_mode``, and
no ``unit_price`` of its own. Tiers count raw measure units (before ``per``) cumulatively per
organization, per version line, per billing period (``period_of(t)``, by default the calendar
month, UTC). Units enter in event order, ``(time, id)``; a tier covers units
``(previous up_to, up_to]``.

* ``graduated`` — each unit is priced at the tier it falls in; an event that crosses a boundary is
  split. A tier's ``flat_fee`` is charged once per period, with the event whose units include
  the tier's first unit, on that event's day.
* ``volume`` — every unit of the period is priced at the tier the period's total falls in (the
  total of every stored event of the line in that period, including ones after the window asked
  about). The reached tier's ``flat_fee`` is charged once per period, with the event whose units
  first enter that tier.

Each unit is priced with the tiers of the version in effect at its event's time; counting runs
across versions of a line.

Persistence
-----------
:func:`save_price` keeps a price as a store record of kind ``"price"`` under its id (decimals as
strings); :func:`load_book` reads them all back. A price's default id derives from its line and
``effective_from``, so saving a price for the same line and start again replaces it.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Any, Literal

import attrs
import cattrs

from meterkit.convert import native_converter
from meterkit.errors import ValidationError
from meterkit.models import DimValue, Event, MeterSpec, Number
from meterkit.money import EXACT_CONTEXT, Tally, amount, divide, to_decimal, to_units
from meterkit.periods import BillingCycle, Period
from meterkit.stores.base import Store
from meterkit.validate import check_dim_value, check_id, check_string, check_time

__all__ = [
    "CHARGES",
    "EXACT_CONTEXT",
    "GIBIBYTE_HOUR",
    "PRICE_KIND",
    "Charge",
    "Price",
    "PriceBook",
    "Tally",
    "Tier",
    "TierMode",
    "amount",
    "check_price",
    "default_period_of",
    "delete_price",
    "load_book",
    "over_time",
    "price_from_dict",
    "price_to_dict",
    "priceable",
    "rate",
    "register_price_hooks",
    "save_price",
    "tier_bounds",
    "to_units",
]

PRICE_KIND = "price"
TierMode = Literal["graduated", "volume"]
TIER_MODES: tuple[str, ...] = ("graduated", "volume")
PeriodOf = Callable[[int], Period]

GIBIBYTE_HOUR = 2**30 * 3600
"""Byte-seconds in a gibibyte-hour: the ``per`` and ``quantity_per`` of a gauge of bytes
priced and reported in ``gibibyte_hours``."""
_ZERO = Decimal(0)
_CACHE_SIZE = 65536


# -- prices ----------------------------------------------------------------------------------


# attrs converters must be plain named functions for mypy's plugin, hence one per field.
def _unit_price(value: object) -> Decimal:
    return to_decimal("unit_price", value)


def _flat_fee(value: object) -> Decimal:
    return to_decimal("flat_fee", value)


def _meter(value: object) -> str:
    return check_string("meter", value)


def _measure(value: object) -> str:
    return check_string("measure", value)


def _line_item(value: object) -> str:
    return check_string("line_item", value)


def _quantity_unit(value: object) -> str:
    return check_string("quantity_unit", value)


def _effective_from(value: object) -> int:
    return check_time("effective_from", value)


def _check_up_to(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("up_to", "must be a whole number of units, or None for the last tier")
    if value < 1:
        raise ValidationError("up_to", "must be at least 1")
    return value


@attrs.frozen
class Tier:
    """Units up to ``up_to`` (cumulative, raw units; ``None`` = no end) at ``unit_price`` per
    the price's ``per`` units, plus ``flat_fee`` once per period when the tier is entered."""

    up_to: int | None = attrs.field(converter=_check_up_to)
    unit_price: Decimal = attrs.field(converter=_unit_price)
    flat_fee: Decimal = attrs.field(default=_ZERO, converter=_flat_fee)


def _tier(index: int, value: object) -> Tier:
    if isinstance(value, Tier):
        return value
    if not isinstance(value, Mapping):
        raise ValidationError(f"tiers[{index}]", "must be a Tier or a mapping")
    extra = set(value) - {"up_to", "unit_price", "flat_fee"}
    if extra:
        raise ValidationError(f"tiers[{index}].{sorted(extra)[0]}", "is not a tier field")
    if "unit_price" not in value:
        raise ValidationError(f"tiers[{index}].unit_price", "is required")
    try:
        return Tier(
            up_to=value.get("up_to"),
            unit_price=value["unit_price"],
            flat_fee=value.get("flat_fee", _ZERO),
        )
    except ValidationError as err:
        raise ValidationError(f"tiers[{index}].{err.field}", err.message) from None


def _tiers(value: object) -> tuple[Tier, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValidationError("tiers", "must be a list of tiers")
    return tuple(_tier(i, t) for i, t in enumerate(value))


def _where(value: object) -> dict[str, DimValue]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError("where", "must be a mapping of dimension to value")
    out: dict[str, DimValue] = {}
    for name in sorted(value, key=str):
        item = value[name]
        if not isinstance(name, str):
            raise ValidationError("where", "dimension names must be strings")
        if item is not None and not isinstance(item, (str, bool)):
            raise ValidationError(
                f"where.{name}", f"must be a string or a bool, not {type(item).__name__}"
            )
        out[name] = item
    return out


def _per(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("per", "must be a whole number of units")
    if value < 1:
        raise ValidationError("per", "must be at least 1")
    return value


def _quantity_per(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError("quantity_per", "must be a whole number of units, at least 1")
    return value


def _currency(value: object) -> str:
    if not isinstance(value, str) or len(value) != 3 or not value.isascii() or not value.isalpha():
        raise ValidationError("currency", "must be a three-letter currency code such as 'usd'")
    return value.lower()


def _optional_unit_price(value: object) -> Decimal | None:
    return None if value is None else to_decimal("unit_price", value)


def _line_key(where: Mapping[str, DimValue]) -> str:
    return json.dumps([[k, where[k]] for k in sorted(where)], separators=(",", ":"))


def _derived_id(meter: str, measure: str, where: Mapping[str, DimValue], start: int) -> str:
    raw = json.dumps([meter, measure, _line_key(where), start], separators=(",", ":"))
    return "price_" + hashlib.sha256(raw.encode()).hexdigest()[:24]


@attrs.frozen
class Price:
    """One version of one price line; see the module docstring for every rule."""

    meter: str = attrs.field(converter=_meter)
    measure: str = attrs.field(converter=_measure)
    unit_price: Decimal | None = attrs.field(default=None, converter=_optional_unit_price)
    per: int = attrs.field(default=1, kw_only=True, converter=_per)
    quantity_per: int = attrs.field(default=1, kw_only=True, converter=_quantity_per)
    currency: str = attrs.field(default="usd", kw_only=True, converter=_currency)
    line_item: str = attrs.field(kw_only=True, converter=_line_item)
    quantity_unit: str = attrs.field(kw_only=True, converter=_quantity_unit)
    where: Mapping[str, DimValue] = attrs.field(factory=dict, kw_only=True, converter=_where)
    effective_from: int = attrs.field(default=0, kw_only=True, converter=_effective_from)
    tiers: tuple[Tier, ...] = attrs.field(default=(), kw_only=True, converter=_tiers)
    tier_mode: TierMode | None = attrs.field(default=None, kw_only=True)
    id: str = attrs.field(default="", kw_only=True)
    # Computed once: costs look the line up for every event.
    _line: tuple[str, str, str] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if self.tier_mode is not None and self.tier_mode not in TIER_MODES:
            raise ValidationError("tier_mode", f"must be one of {list(TIER_MODES)} or None")
        if self.tiers:
            if self.tier_mode is None:
                raise ValidationError("tier_mode", "tiered prices need 'graduated' or 'volume'")
            if self.unit_price is not None:
                raise ValidationError(
                    "unit_price", "a tiered price takes its unit prices from its tiers"
                )
            bounds = [t.up_to for t in self.tiers]
            if bounds[-1] is not None:
                raise ValidationError("tiers", "the last tier must be open (up_to None)")
            for i, (low, high) in enumerate(itertools.pairwise(bounds)):
                if low is None:
                    raise ValidationError(f"tiers[{i}].up_to", "only the last tier may be open")
                if high is not None and high <= low:
                    raise ValidationError(
                        f"tiers[{i + 1}].up_to", "tiers must be in strictly ascending order"
                    )
        else:
            if self.tier_mode is not None:
                raise ValidationError("tier_mode", f"{self.tier_mode!r} needs tiers")
            if self.unit_price is None:
                raise ValidationError("unit_price", "is required (or give tiers)")
        object.__setattr__(self, "_line", (self.meter, self.measure, _line_key(self.where)))
        if self.id:
            check_id("id", self.id)
        else:
            derived = _derived_id(self.meter, self.measure, self.where, self.effective_from)
            object.__setattr__(self, "id", derived)

    # ``where`` is a dict, so the generated hash would fail; equal prices have equal ids.
    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def line(self) -> tuple[str, str, str]:
        """The version line: ``(meter, measure, where as canonical JSON)``."""
        return self._line


def priceable(spec: MeterSpec, measure: str) -> bool:
    """Whether a measure can carry a price: summed over events, or a gauge priced over time."""
    m = spec.measure(measure)
    return m is not None and (m.aggregation == "sum" or over_time(spec, measure))


def over_time(spec: MeterSpec, measure: str) -> bool:
    """Whether a price of ``measure`` charges its integral over time (value x seconds): a
    summed gauge (``vector_stores.usage_bytes``) or a ``time_weighted`` measure."""
    m = spec.measure(measure)
    return m is not None and m.gauge and m.aggregation in ("sum", "time_weighted")


def check_price(price: Price, specs: Mapping[str, MeterSpec]) -> Price:
    """Check ``price`` against the registered meters; returns it unchanged."""
    if not isinstance(price, Price):
        raise ValidationError("price", "must be a meterkit.pricing.Price")
    spec = specs.get(price.meter)
    if spec is None:
        raise ValidationError("meter", f"unknown meter {price.meter!r}")
    if spec.measure(price.measure) is None:
        raise ValidationError("measure", f"meter {spec.name!r} has no measure {price.measure!r}")
    if not priceable(spec, price.measure):
        # max/min/latest values are not quantities consumed.
        raise ValidationError(
            "measure",
            f"{spec.name}.{price.measure} is neither summed nor a summed gauge: not priceable",
        )
    if price.tiers and over_time(spec, price.measure):
        raise ValidationError(
            "tiers", f"{spec.name}.{price.measure} is priced over time and cannot be tiered"
        )
    for name, value in price.where.items():
        check_dim_value(spec, name, value, f"where.{name}")
    return price


# -- the book --------------------------------------------------------------------------------


class _Line:
    __slots__ = ("key", "starts", "versions", "where")

    def __init__(self, where: Mapping[str, DimValue], key: str) -> None:
        self.where = tuple(where.items())
        self.key = key
        self.starts: list[int] = []
        self.versions: list[Price] = []

    def at(self, time: int) -> Price | None:
        i = bisect.bisect_right(self.starts, time)
        return self.versions[i - 1] if i else None


def _dims_key(dimensions: Mapping[str, DimValue]) -> frozenset[tuple[str, DimValue]]:
    return frozenset(dimensions.items())


class PriceBook:
    """Prices, indexed for :meth:`match`. Immutable; :meth:`with_price` returns a new book.

    With ``specs``, every price is checked against its meter (:func:`check_price`). Two
    versions of one line with the same ``effective_from`` are a ``ValidationError``.
    """

    def __init__(
        self, prices: Iterable[Price] = (), specs: Mapping[str, MeterSpec] | None = None
    ) -> None:
        by_id: dict[str, Price] = {}
        starts: dict[tuple[tuple[str, str, str], int], str] = {}
        for price in prices:
            if specs is not None:
                check_price(price, specs)
            elif not isinstance(price, Price):
                raise ValidationError("price", "must be a meterkit.pricing.Price")
            known = by_id.get(price.id)
            if known is not None and known != price:
                raise ValidationError("id", f"two different prices have the id {price.id!r}")
            other = starts.setdefault((price.line, price.effective_from), price.id)
            if other != price.id:
                raise ValidationError(
                    "effective_from",
                    f"prices {other!r} and {price.id!r} are versions of one line with one start",
                )
            by_id[price.id] = price
        self._prices = tuple(sorted(by_id.values(), key=lambda p: (p.line, p.effective_from)))
        # Gauges priced over time: no single event costs anything, so no ceiling counts them.
        self._over_time = frozenset(
            (p.meter, p.measure)
            for p in self._prices
            if specs is not None and p.meter in specs and over_time(specs[p.meter], p.measure)
        )
        lines: dict[tuple[str, str, str], _Line] = {}
        for price in self._prices:
            line = lines.get(price.line)
            if line is None:
                line = lines[price.line] = _Line(price.where, price.line[2])
            line.starts.append(price.effective_from)
            line.versions.append(price)
        self._lines: dict[tuple[str, str], list[_Line]] = {}
        for (meter, measure, _), line in lines.items():
            self._lines.setdefault((meter, measure), []).append(line)
        for group in self._lines.values():
            # Most specific first, then canonical ``where`` JSON: the documented tie-break.
            group.sort(key=lambda ln: (-len(ln.where), ln.key))
        self._by_id = by_id
        self._priced_meters = frozenset(meter for meter, _ in self._lines)
        self._candidates: dict[tuple[str, str, frozenset[tuple[str, DimValue]]], list[_Line]] = {}

    @property
    def prices(self) -> tuple[Price, ...]:
        """Every price, by line and then ``effective_from``."""
        return self._prices

    def __iter__(self) -> Iterator[Price]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def get(self, price_id: str) -> Price | None:
        return self._by_id.get(price_id)

    @property
    def meters(self) -> tuple[str, ...]:
        """The meters that have at least one price, sorted."""
        return tuple(sorted({meter for meter, _ in self._lines}))

    def tier_modes(self, meter: str) -> frozenset[str]:
        """The tier modes ``meter``'s prices use: tiered costs need whole periods of events."""
        return frozenset(p.tier_mode for p in self._prices if p.meter == meter and p.tier_mode)

    def priced(self, meter: str, measure: str) -> bool:
        """Whether any price names this measure of this meter."""
        return (meter, measure) in self._lines

    def version_starts(self, meter: str) -> tuple[int, ...]:
        """Every ``effective_from`` of ``meter``'s prices, sorted: where a price may change."""
        return tuple(sorted({p.effective_from for p in self._prices if p.meter == meter}))

    def matched_dimensions(self, meter: str) -> frozenset[str]:
        """The dimensions any of ``meter``'s prices matches on (its ``where`` keys)."""
        return frozenset(name for p in self._prices if p.meter == meter for name in p.where)

    def with_price(self, price: Price, specs: Mapping[str, MeterSpec] | None = None) -> PriceBook:
        """A new book with ``price`` added, replacing any price with its id or its line+start."""
        keep = [
            p
            for p in self._prices
            if p.id != price.id and (p.line, p.effective_from) != (price.line, price.effective_from)
        ]
        return PriceBook([*keep, price], specs)

    def match(
        self, meter: str, measure: str, dimensions: Mapping[str, DimValue], time: int
    ) -> Price | None:
        """The price of ``measure`` for an event with ``dimensions`` at ``time``, or ``None``."""
        lines = self._lines.get((meter, measure))
        if not lines:
            return None
        key = (meter, measure, _dims_key(dimensions))
        candidates = self._candidates.get(key)
        if candidates is None:
            get = dimensions.get
            candidates = [
                ln
                for ln in lines
                # An absent dimension reads as None, so ``where {k: None}`` matches it.
                if all(_same(get(name), value) for name, value in ln.where)
            ]
            if len(self._candidates) >= _CACHE_SIZE:
                self._candidates.clear()  # bounded: dimension combinations are unbounded
            self._candidates[key] = candidates
        for line in candidates:
            price = line.at(time)
            if price is not None:
                return price
        return None

    def prices_meter(self, meter: str) -> bool:
        """Whether any price names ``meter``."""
        return meter in self._priced_meters

    def ceiling(
        self,
        meter: str,
        values: Mapping[str, Number],
        dimensions: Mapping[str, DimValue],
        time: int,
    ) -> Decimal:
        """An upper bound of what ``values`` of one event cost: each priced measure at the
        dearest unit price its line can charge (its own, or its dearest tier), flat tier fees
        left out. Exact for untiered prices; what spend counters count (:mod:`meterkit.spend`).
        """
        total = Tally()
        self.add_ceiling(total, meter, values, dimensions, time)
        return total.value()

    def add_ceiling(
        self,
        tally: Tally,
        meter: str,
        values: Mapping[str, Number],
        dimensions: Mapping[str, DimValue],
        time: int,
    ) -> None:
        """Add :meth:`ceiling` of one event to ``tally`` (exact: rounded by nobody)."""
        if meter not in self._priced_meters:
            return
        for measure, value in values.items():
            if not value or (meter, measure) not in self._lines:
                continue
            if (meter, measure) in self._over_time:
                continue
            price = self.match(meter, measure, dimensions, time)
            if price is None:
                continue
            unit = price.unit_price
            if unit is None:
                unit = max(t.unit_price for t in price.tiers)
            tally.add(EXACT_CONTEXT.multiply(to_units(value), unit), price.per)


def _same(a: DimValue, b: DimValue) -> bool:
    # Values are validated str/bool/None; comparing types too keeps a stray 1 from equalling True.
    return type(a) is type(b) and a == b


# -- rating events ---------------------------------------------------------------------------


@attrs.frozen
class Charge:
    """One priced piece of an event: some units of a measure at one rate, or a flat fee.

    The amount is ``numerator / per``; the two are kept apart so totals stay exact
    (:class:`Tally`). ``tier`` is the tier index (``None`` for an untiered price); a flat
    fee has ``units == 0`` and ``flat_fee`` true.
    """

    event: Event
    measure: str
    price: Price
    units: Decimal
    numerator: Decimal
    per: int
    tier: int | None = None
    flat_fee: bool = False

    @property
    def amount(self) -> Decimal:
        return divide(self.numerator, self.per)


def default_period_of(t: int) -> Period:
    """Calendar months, UTC: the default billing period for tier counting."""
    return _MONTHLY.period_at(t)


_MONTHLY = BillingCycle("monthly")


def _tier_index(tiers: tuple[Tier, ...], total: Decimal) -> int:
    for i, tier in enumerate(tiers):
        if tier.up_to is None or total <= tier.up_to:
            return i
    return len(tiers) - 1  # unreachable: the last tier is open


def _entered(tiers: tuple[Tier, ...], counted: Decimal) -> int:
    """The tier of the unit after ``counted`` units."""
    for i, tier in enumerate(tiers):
        if tier.up_to is None or counted < tier.up_to:
            return i
    return len(tiers) - 1  # unreachable: the last tier is open


def _lower(tiers: tuple[Tier, ...], index: int) -> int:
    bound = tiers[index - 1].up_to if index else 0
    assert bound is not None
    return bound


def tier_bounds(price: Price, total: Decimal) -> list[int]:
    """The counts at which pricing ``price``'s units stops being linear, for a period whose
    line counts ``total`` units: a tier's first unit where it starts a new rate or carries a
    flat fee (graduated), or the period's tier's first unit when it carries one (volume).
    Between two bounds, ``n`` units cost ``n`` times one rate, in any order."""
    tiers = price.tiers
    if price.tier_mode == "graduated":
        return [_lower(tiers, i) for i in range(len(tiers)) if i or tiers[0].flat_fee]
    if price.tier_mode == "volume":
        i = _tier_index(tiers, total)
        return [_lower(tiers, i)] if tiers[i].flat_fee else []
    return []


_Entry = tuple[Event, str, Decimal, Price, tuple[str, tuple[str, str, str], int]]


def rate(
    book: PriceBook, events: Iterable[Event], period_of: PeriodOf | None = None
) -> list[Charge]:
    """Price ``events`` (any meters and organizations) with ``book``.

    Tiered prices need every event of each period they touch, from the period's start (and,
    for volume tiers, to its end): the caller scans accordingly. Units no price matches are
    left out; :func:`meterkit.costs.unpriced` lists them. Charges come in event order.
    """
    period_of = period_of or default_period_of
    entries: list[_Entry] = []
    totals: dict[tuple[str, tuple[str, str, str], int], Decimal] = {}
    last: Period | None = None
    ordered = sorted(events, key=lambda e: (e.time, e.meter, e.id))
    for event in ordered:
        # Each measure is its own line, so the order of measures within an event is immaterial.
        for measure, value in event.values.items():
            if not value:
                continue
            price = book.match(event.meter, measure, event.dimensions, event.time)
            if price is None:
                continue
            units = to_units(value)
            if price.tiers:
                if last is None or not last.contains(event.time):
                    last = period_of(event.time)
                key = (event.organization_id, price.line, last.start)
                totals[key] = EXACT_CONTEXT.add(totals.get(key, _ZERO), units)
            else:
                key = (event.organization_id, price.line, -1)
            entries.append((event, measure, units, price, key))

    charges: list[Charge] = []
    counted: dict[tuple[str, tuple[str, str, str], int], Decimal] = {}
    fee_paid: set[tuple[str, tuple[str, str, str], int]] = set()
    for event, measure, units, price, key in entries:
        if not price.tiers:
            assert price.unit_price is not None
            numerator = EXACT_CONTEXT.multiply(units, price.unit_price)
            charges.append(Charge(event, measure, price, units, numerator, price.per))
            continue
        before = counted.get(key, _ZERO)
        after = EXACT_CONTEXT.add(before, units)
        counted[key] = after
        tiers = price.tiers
        if price.tier_mode == "graduated":
            # From the tier the event's first unit falls in, through the one its last unit does.
            i = _entered(tiers, before)
            while True:
                tier = tiers[i]
                low, up = _lower(tiers, i), tier.up_to
                high = after if up is None or after <= up else Decimal(up)
                inside = EXACT_CONTEXT.subtract(high, before if before > low else Decimal(low))
                if before <= low and tier.flat_fee:  # this event holds the tier's first unit
                    charges.append(
                        Charge(event, measure, price, _ZERO, tier.flat_fee, 1, i, flat_fee=True)
                    )
                numerator = EXACT_CONTEXT.multiply(inside, tier.unit_price)
                charges.append(Charge(event, measure, price, inside, numerator, price.per, i))
                if up is None or after <= up:
                    break
                i += 1
        else:
            i = _tier_index(tiers, totals[key])
            tier = tiers[i]
            low = _lower(tiers, i)
            if key not in fee_paid and before <= low < after:
                fee_paid.add(key)
                if tier.flat_fee:
                    charges.append(
                        Charge(event, measure, price, _ZERO, tier.flat_fee, 1, i, flat_fee=True)
                    )
            numerator = EXACT_CONTEXT.multiply(units, tier.unit_price)
            charges.append(Charge(event, measure, price, units, numerator, price.per, i))
    return charges


# -- wire format and persistence -------------------------------------------------------------

_PRICE_FIELDS = tuple(a.name for a in attrs.fields(Price))
_REQUIRED = ("meter", "measure", "line_item", "quantity_unit")


def _price_to_dict(price: Price) -> dict[str, Any]:
    return {
        "id": price.id,
        "meter": price.meter,
        "measure": price.measure,
        "unit_price": None if price.unit_price is None else str(price.unit_price),
        "per": price.per,
        "quantity_per": price.quantity_per,
        "currency": price.currency,
        "line_item": price.line_item,
        "quantity_unit": price.quantity_unit,
        "where": dict(price.where),
        "effective_from": price.effective_from,
        "tiers": [
            {"up_to": t.up_to, "unit_price": str(t.unit_price), "flat_fee": str(t.flat_fee)}
            for t in price.tiers
        ],
        "tier_mode": price.tier_mode,
    }


def _price_from_dict(data: Any, _cls: type = Price) -> Price:
    if not isinstance(data, Mapping):
        raise ValidationError("price", "must be a mapping")
    for name in data:
        if name not in _PRICE_FIELDS:
            raise ValidationError(str(name), "is not a price field")
    for name in _REQUIRED:
        if name not in data:
            raise ValidationError(name, "is required")
    args = {k: v for k, v in data.items() if v is not None or k == "unit_price"}
    return Price(**args)


def register_price_hooks(conv: cattrs.Converter) -> None:
    """Teach a native converter :class:`Price`: decimals as strings, times as Unix seconds."""
    conv.register_unstructure_hook(Price, _price_to_dict)
    conv.register_structure_hook(Price, _price_from_dict)


register_price_hooks(native_converter)


def price_to_dict(price: Price) -> dict[str, Any]:
    """The JSON-ready form of a price (native format)."""
    out: dict[str, Any] = native_converter.unstructure(price, Price)
    return out


def price_from_dict(data: Mapping[str, Any], specs: Mapping[str, MeterSpec] | None = None) -> Price:
    """A price from its native form, or from a configuration table (``effective_from`` may be
    an aware datetime, ``unit_price`` a string); checked against ``specs`` when given.
    Unknown keys are a ``ValidationError``."""
    price: Price = native_converter.structure(data, Price)
    return price if specs is None else check_price(price, specs)


def save_price(
    store: Store, price: Price, *, specs: Mapping[str, MeterSpec] | None = None
) -> Price:
    """Keep ``price`` in ``store`` (checked against ``specs`` when given) and return it.

    A stored price with another id but the same line and ``effective_from`` is removed: the
    new one replaces that version.
    """
    if specs is not None:
        check_price(price, specs)
    elif not isinstance(price, Price):
        raise ValidationError("price", "must be a meterkit.pricing.Price")
    for key, data in store.list_records(PRICE_KIND):
        if key == price.id:
            continue
        other = price_from_dict(data)
        if (other.line, other.effective_from) == (price.line, price.effective_from):
            store.delete_record(PRICE_KIND, key)
    store.put_record(PRICE_KIND, price.id, price_to_dict(price))
    return price


def delete_price(store: Store, price_id: str) -> bool:
    """Remove a stored price by id; ``True`` if it existed."""
    return store.delete_record(PRICE_KIND, price_id)


CHARGES = Price(
    "charges",
    "nano_usd",
    Decimal(1),
    per=1_000_000_000,
    line_item="charges",
    quantity_unit="nano_usd",
    id="charges",
)
"""Spend given in dollars (``cost=``) is recorded as an event of the built-in ``charges`` meter
in nano-dollars, billed by this line at exactly that: one ledger for costs and spend."""


def load_book(
    store: Store, specs: Mapping[str, MeterSpec] | None = None, *, builtin: bool = False
) -> PriceBook:
    """Every stored price, as a :class:`PriceBook` (checked against ``specs`` when given),
    with (``builtin``) the built-in :data:`CHARGES` line unless a stored price prices that
    meter."""
    records = store.list_records(PRICE_KIND)
    prices = [price_from_dict(data) for _key, data in records]
    if builtin and not any(p.meter == CHARGES.meter for p in prices):
        prices.append(CHARGES)
    return PriceBook(prices, specs)
