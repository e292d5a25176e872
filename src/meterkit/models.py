"""The frozen attrs classes every other module speaks in."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Union

import attrs

__all__ = [
    "AGGREGATIONS",
    "AppendResult",
    "Bucket",
    "CounterLine",
    "CounterResult",
    "DimValue",
    "Dimension",
    "Event",
    "EventStatus",
    "GroupRow",
    "Hold",
    "Measure",
    "MeterSpec",
    "Number",
    "Result",
    "UsagePage",
    "UsageQuery",
    "unit_of",
]

Number = Union[int, float]  # noqa: UP007 - a runtime alias, evaluated on Python 3.10 too
DimValue = Union[str, bool, None]  # noqa: UP007
Aggregation = Literal["sum", "count", "max", "min", "latest", "unique_count", "time_weighted"]
AGGREGATIONS: tuple[str, ...] = (
    "sum",
    "count",
    "max",
    "min",
    "latest",
    "unique_count",
    "time_weighted",
)
GAUGE_AGGREGATIONS: tuple[str, ...] = ("sum", "max", "min", "time_weighted")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def _check_name(kind: str) -> Callable[[Any, Any, str], None]:
    def check(_inst: Any, _attr: Any, value: str) -> None:
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise ValueError(f"{kind} name {value!r} must match {NAME_RE.pattern}")

    return check


def unit_of(name: str) -> str:
    """The unit a measure named ``name`` counts in, when its meter does not say: ``bytes`` for
    ``*_bytes``, ``tokens`` for ``*_tokens``, ``requests`` for ``num_model_requests``, else the
    name without a ``num_`` prefix (``num_sessions`` counts sessions, ``tiles`` tiles)."""
    for suffix in ("bytes", "tokens", "requests", "seconds"):
        if name == suffix or name.endswith("_" + suffix):
            return suffix
    return name.removeprefix("num_")


def _measures(items: Iterable[Measure]) -> tuple[Measure, ...]:
    return tuple(items)


def _dimensions(items: Iterable[Dimension]) -> tuple[Dimension, ...]:
    return tuple(items)


def _sums(
    items: Mapping[str, Iterable[str]] | Iterable[tuple[str, Iterable[str]]],
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    pairs = items.items() if isinstance(items, Mapping) else items
    return tuple((total, tuple(parts)) for total, parts in pairs)


def _allowed(items: Iterable[str] | None) -> frozenset[str] | None:
    return None if items is None else frozenset(items)


@attrs.frozen
class Measure:
    """One number a meter records, and how it aggregates within a bucket.

    A *gauge* measure is not summed over time: each series (one full combination of
    dimension values) contributes its latest value in the bucket, and the series are then
    combined with ``aggregation`` (``sum``, ``max`` or ``min``).

    A ``time_weighted`` measure is a gauge integrated over time: per series, value x seconds,
    each value holding from its event until the series' next one (across bucket edges, and
    into a query's range from before it), summed across series. It is always a gauge.

    Values are whole numbers (tokens, requests, bytes) unless the measure is ``fractional``
    (seconds of compute, say): then floats are kept as given. ``unit`` is what one of them is
    (``bytes``, ``tokens``...; by default from the name, :func:`unit_of`): the dashboard shows
    bytes in binary units and every other number with its unit.
    """

    name: str = attrs.field(validator=_check_name("measure"))
    aggregation: Aggregation = "sum"
    gauge: bool = False
    fractional: bool = False
    unit: str = attrs.field(
        default=attrs.Factory(lambda self: unit_of(self.name), takes_self=True),
        validator=attrs.validators.instance_of(str),
    )

    def __attrs_post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {self.aggregation!r} not one of {AGGREGATIONS}")
        if self.aggregation == "time_weighted":
            object.__setattr__(self, "gauge", True)
        if self.gauge and self.aggregation not in GAUGE_AGGREGATIONS:
            raise ValueError(f"a gauge combines series with one of {GAUGE_AGGREGATIONS}")


@attrs.frozen
class Dimension:
    """A dimension events may carry: a string (optionally from a fixed set) or a bool.

    ``default`` is what an event without the dimension stands for (OpenAI's ``api_source``:
    ``"unlabeled"``): an event that says it is stored as one that does not, so the two are
    the same event and the same group, and a group of such events reads ``default``.
    """

    name: str = attrs.field(validator=_check_name("dimension"))
    kind: Literal["str", "bool"] = "str"
    allowed: frozenset[str] | None = attrs.field(default=None, converter=_allowed)
    default: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.default is None:
            return
        if self.kind != "str" or not isinstance(self.default, str):
            raise ValueError(f"dimension {self.name!r}: a default is a string of a str dimension")
        if self.allowed is not None and self.default not in self.allowed:
            raise ValueError(f"dimension {self.name!r}: default {self.default!r} is not allowed")


@attrs.frozen
class MeterSpec:
    """A meter: its measures, its dimensions, and the name of its result object.

    ``sums`` names measures that are the sum of others (``{"input_tokens":
    ("input_cached_tokens", "input_uncached_tokens")}``): an event that gives a total and all
    of its parts must give parts that add up to it.
    """

    name: str = attrs.field(validator=_check_name("meter"))
    measures: tuple[Measure, ...] = attrs.field(converter=_measures)
    dimensions: tuple[Dimension, ...] = attrs.field(converter=_dimensions, default=())
    result_object: str = ""
    sums: tuple[tuple[str, tuple[str, ...]], ...] = attrs.field(converter=_sums, default=())

    def __attrs_post_init__(self) -> None:
        if not self.measures:
            raise ValueError(f"meter {self.name!r} needs at least one measure")
        for what, names in (
            ("measure", [m.name for m in self.measures]),
            ("dimension", [d.name for d in self.dimensions]),
        ):
            if len(set(names)) != len(names):
                raise ValueError(f"meter {self.name!r} repeats a {what} name")
        # A result object holds "object", every dimension and every measure as flat keys.
        clash = set(self.measure_names) & set(self.dimension_names)
        clash |= {"object"} & {*self.measure_names, *self.dimension_names}
        if clash:
            raise ValueError(f"meter {self.name!r}: {sorted(clash)} would collide in a result")
        if not self.result_object:
            object.__setattr__(self, "result_object", f"usage.{self.name}.result")
        measures = set(self.measure_names)
        for total, parts in self.sums:
            unknown = sorted({total, *parts} - measures)
            if unknown or not parts or total in parts:
                raise ValueError(
                    f"meter {self.name!r}: sum {total} = {' + '.join(parts)} must name "
                    f"other measures of the meter (unknown: {unknown})"
                )

    @property
    def measure_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.measures)

    @property
    def dimension_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    def measure(self, name: str) -> Measure | None:
        return next((m for m in self.measures if m.name == name), None)

    def dimension(self, name: str) -> Dimension | None:
        return next((d for d in self.dimensions if d.name == name), None)


@attrs.frozen(eq=True, hash=False)
class Event:
    """One usage event. ``(organization_id, meter, id)`` identifies it forever.

    Appending the same key again with the same payload (time, values, dimensions) is a no-op;
    with another payload it is a *conflict*: reported, and the stored event is kept unchanged.
    """

    id: str
    meter: str
    organization_id: str
    time: int
    values: Mapping[str, Number] = attrs.field(factory=dict)
    dimensions: Mapping[str, DimValue] = attrs.field(factory=dict)


EventStatus = Literal["accepted", "duplicate", "conflict"]


@attrs.frozen
class AppendResult:
    """What an append did, per event and in total.

    ``accepted`` events were new; ``duplicates`` were already stored with the same payload
    (a retry: nothing changed); ``conflicts`` lists the ids that were already stored — or
    came earlier in the same batch — with *other* data: the stored event is kept unchanged
    and the new data is not recorded. ``statuses`` gives each input event's outcome in the
    order given (empty when the result was built by hand).
    """

    accepted: int
    duplicates: int
    conflicts: tuple[str, ...] = ()
    statuses: tuple[EventStatus, ...] = attrs.field(default=(), repr=False, eq=False)

    def __add__(self, other: AppendResult) -> AppendResult:
        return AppendResult(
            self.accepted + other.accepted,
            self.duplicates + other.duplicates,
            self.conflicts + other.conflicts,
            self.statuses + other.statuses,
        )


@attrs.frozen
class UsageQuery:
    """A validated bucket query; ``page_start`` is the first bucket of this page."""

    meter: str
    organization_id: str
    start_time: int
    end_time: int
    bucket_width: str
    width: int
    group_by: tuple[str, ...]
    filters: tuple[tuple[str, tuple[DimValue, ...]], ...]
    limit: int
    page_start: int

    @property
    def filter_map(self) -> dict[str, tuple[DimValue, ...]]:
        return dict(self.filters)

    @property
    def page_end(self) -> int:
        """End of the last bucket on this page, clipped to ``end_time`` for scanning."""
        return min(self.page_start + self.limit * self.width, self.end_time)

    @property
    def scan_start(self) -> int:
        return max(self.start_time, self.page_start)


@attrs.frozen
class CounterLine:
    """One counter an atomic quota operation touches.

    The operation is admitted only if, for every line with a ``limit``,
    ``floor(previous * prev_weight) + current + amount <= limit`` (``previous`` is the value
    of ``prev_key``, for sliding windows; 0 without one). Admitted: every ``amount`` is added
    to its ``key``, which expires at ``expires_at`` (Unix seconds; ``None`` = never).
    """

    key: str
    amount: int
    limit: int | None = None
    expires_at: int | None = None
    prev_key: str | None = None
    prev_weight: float = 0.0


@attrs.frozen
class Hold:
    """Amounts a reservation holds on counters until it is settled, released or expires."""

    id: str
    organization_id: str
    amounts: tuple[tuple[str, int], ...]
    expires_at: int


@attrs.frozen
class CounterResult:
    """The outcome of an atomic quota operation: admitted or not, and each line's state.

    ``used`` is each line's counter after the operation (before it, when refused);
    ``previous`` is the value of each line's ``prev_key`` (0 without one).
    """

    admitted: bool
    used: tuple[int, ...]
    previous: tuple[int, ...]


GroupKey = tuple[DimValue, ...]
GroupRow = tuple[int, GroupKey]
"""(bucket start, group-by values in ``group_by`` order): the key of one aggregated row."""


@attrs.frozen
class Result:
    """One row of a bucket: every grouping field (``None`` when not grouped) and the numbers."""

    object: str
    group: Mapping[str, DimValue]
    values: Mapping[str, Number | None]


@attrs.frozen
class Bucket:
    start_time: int
    end_time: int
    results: tuple[Result, ...]


@attrs.frozen
class UsagePage:
    """A page of buckets; ``next_page`` is an opaque cursor, or ``None`` on the last page."""

    data: tuple[Bucket, ...]
    has_more: bool
    next_page: str | None

    def to_dict(self) -> dict[str, object]:
        """The OpenAI page envelope: ``{"object": "page", "data": [...], ...}``."""
        if _to_openai is None:  # pragma: no cover - meterkit's __init__ loads the format
            raise RuntimeError("meterkit.convert is not loaded")
        return _to_openai(self)


_to_openai: Callable[[UsagePage], dict[str, object]] | None = None


def use_page_format(to_dict: Callable[[UsagePage], dict[str, object]]) -> None:
    """Make ``to_dict`` what :meth:`UsagePage.to_dict` answers with: the OpenAI wire format's
    unstructure, given by :mod:`meterkit.convert` when it loads (the format knows the models;
    the models do not import the format)."""
    global _to_openai
    _to_openai = to_dict
