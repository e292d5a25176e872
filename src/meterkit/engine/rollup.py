"""Rollups: exact partial aggregates per UTC minute, hour and day, and how a query uses them.

A rollup row holds, for one organization, one grain bucket and one *series* (the full tuple of
dimension values), what every measure needs to be combined later without the events:

===============  ====================================================================
aggregation      kept per row
===============  ====================================================================
``sum``          ``s``: the sum
``count``        ``n``: how many events carried the measure
``min``/``max``  ``mn`` / ``mx``
``latest``,      ``t``, ``i``, ``l``: the time, id and value of the latest event
gauges           (ties in time go to the greatest id, as in :func:`aggregate`)
===============  ====================================================================

``unique_count`` keeps nothing: a meter with such a measure answers from its events.

:func:`plan` splits a query's window into the coarsest grain whose buckets tile the query's
buckets and finer pieces (down to raw events) at unaligned edges; :func:`combine` turns rollup
rows and raw events alike into the engine's rows. Stores keep rollups in their own tables and
translate :func:`combine` into SQL; this module is what the memory store runs and what every
store's rollups are checked against (:func:`fold` over the events).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from meterkit.engine.aggregate import Rows, empty_value
from meterkit.models import DimValue, Event, GroupRow, Measure, MeterSpec, Number, UsageQuery

__all__ = [
    "GRAINS",
    "Key",
    "Segment",
    "answer",
    "columns",
    "combine",
    "differences",
    "event_items",
    "fold",
    "merge",
    "plan",
    "rollable",
    "series_key",
]

GRAINS: tuple[int, ...] = (60, 3600, 86400)
"""The rollup grains, in seconds: a UTC minute, hour and day."""

_KINDS = {"sum": ("s",), "count": ("n",), "min": ("mn",), "max": ("mx",)}
_LATEST = ("t", "i", "l")

Key = tuple[str, int, str]
"""A rollup row's key: ``(organization_id, bucket start, series key)``."""

Segment = tuple["int | None", int, int]
"""``(grain, start, end)``: read ``[start, end)`` from that grain's rollups, or raw events
when the grain is ``None``."""


def rollable(spec: MeterSpec) -> bool:
    """Whether rollups can answer ``spec``'s queries: no ``unique_count`` measure."""
    return all(m.aggregation != "unique_count" for m in spec.measures)


def _kinds(measure: Measure) -> tuple[str, ...]:
    if measure.gauge or measure.aggregation == "latest":
        return _LATEST
    return _KINDS.get(measure.aggregation, ())


def columns(spec: MeterSpec) -> tuple[tuple[str, str], ...]:
    """``(kind, measure)`` per value a rollup row of ``spec`` keeps, in row order."""
    return tuple((kind, m.name) for m in spec.measures for kind in _kinds(m))


def series_key(dimensions: Mapping[str, DimValue]) -> str:
    """The text that names a series: its non-null dimensions, sorted (so a dimension added to
    the meter later keeps every existing series' key)."""
    return json.dumps(sorted((k, v) for k, v in dimensions.items() if v is not None))


def fold(
    spec: MeterSpec, events: Iterable[Event], grain: int
) -> dict[Key, tuple[dict[str, DimValue], list[Any]]]:
    """The rollup rows of ``events`` at ``grain``: key -> (dimensions, values in
    :func:`columns` order)."""
    layout = columns(spec)
    out: dict[Key, tuple[dict[str, DimValue], list[Any]]] = {}
    keys: dict[tuple[DimValue, ...], str] = {}
    dims = spec.dimension_names
    for event in events:
        get = event.dimensions.get
        values = tuple(get(d) for d in dims)
        series = keys.get(values)
        if series is None:
            series = keys[values] = series_key(event.dimensions)
        key = (event.organization_id, event.time - event.time % grain, series)
        row = out.get(key)
        if row is None:
            row = out[key] = (
                {d: v for d, v in zip(dims, values) if v is not None},
                [None] * len(layout),
            )
        merge(layout, row[1], _event_values(layout, event))
    return out


def _event_values(layout: Sequence[tuple[str, str]], event: Event) -> list[Any]:
    out: list[Any] = []
    for kind, name in layout:
        value = event.values.get(name)
        if value is None:
            out.append(None)
        elif kind == "n":
            out.append(1)
        elif kind == "t":
            out.append(event.time)
        elif kind == "i":
            out.append(event.id)
        else:
            out.append(value)
    return out


def merge(layout: Sequence[tuple[str, str]], into: list[Any], other: Sequence[Any]) -> None:
    """Combine ``other`` (values of the same layout) into ``into``, in place."""
    i = 0
    n = len(layout)
    while i < n:
        kind = layout[i][0]
        new = other[i]
        if kind == "t":
            if new is not None and (
                into[i] is None or (new, other[i + 1]) > (into[i], into[i + 1])
            ):
                into[i : i + 3] = other[i : i + 3]
            i += 3
            continue
        if new is not None:
            old = into[i]
            if old is None:
                into[i] = new
            elif kind in ("s", "n"):
                into[i] = old + new
            elif kind == "mn":
                into[i] = min(old, new)
            else:
                into[i] = max(old, new)
        i += 1


def plan(start: int, end: int, width: int, grains: Sequence[int] = GRAINS) -> list[Segment]:
    """Cover ``[start, end)`` with the coarsest grains that divide ``width``: aligned middles
    from rollups, unaligned edges from finer grains and, below a minute, raw events."""
    usable = sorted((g for g in grains if width % g == 0), reverse=True)
    out: list[Segment] = []

    def cover(a: int, b: int, level: int) -> None:
        if a >= b:
            return
        if level == len(usable):
            out.append((None, a, b))
            return
        g = usable[level]
        lo, hi = -(-a // g) * g, b - b % g
        if lo >= hi:
            cover(a, b, level + 1)
            return
        cover(a, lo, level + 1)
        out.append((g, lo, hi))
        cover(hi, b, level + 1)

    cover(start, end, 0)
    return out


def answer(
    spec: MeterSpec,
    query: UsageQuery,
    rows_in: Callable[[int, int, int], Iterable[tuple[int, Mapping[str, DimValue], Sequence[Any]]]],
    events_in: Callable[[int, int], Iterable[Event]],
) -> Rows:
    """The query's rows from rollups: ``rows_in(grain, start, end)`` gives the rollup rows of
    the organization's buckets in ``[start, end)``, ``events_in(start, end)`` its raw events
    there. Filters are applied here, to both."""
    filters = query.filters

    def passes(dimensions: Mapping[str, DimValue]) -> bool:
        return all(dimensions.get(name) in allowed for name, allowed in filters)

    def items() -> Iterator[tuple[int, Mapping[str, DimValue], Sequence[Any]]]:
        for grain, start, end in plan(query.scan_start, query.page_end, query.width):
            found: Iterable[tuple[int, Mapping[str, DimValue], Sequence[Any]]]
            if grain is None:
                found = event_items(spec, events_in(start, end))
            else:
                found = rows_in(grain, start, end)
            yield from (item for item in found if passes(item[1]))

    return combine(spec, query, items())


def combine(
    spec: MeterSpec,
    query: UsageQuery,
    items: Iterable[tuple[int, Mapping[str, DimValue], Sequence[Any]]],
) -> Rows:
    """The engine's rows from ``(bucket, dimensions, values)`` items: rollup rows (``values`` in
    :func:`columns` order) of the query's window, already filtered; raw events come in through
    :func:`event_items`. The items' buckets are at most the query's width."""
    layout = columns(spec)
    width = query.width
    group_by = query.group_by
    dims = spec.dimension_names
    measures = spec.measures
    # Per row: the combined values; per (row, series): gauges' latest (time, id, value).
    partial: dict[GroupRow, list[Any]] = {}
    series: dict[GroupRow, dict[tuple[DimValue, ...], list[Any]]] = {}
    gauges = [i for i, (kind, name) in enumerate(layout) if kind == "t" and _gauge(spec, name)]
    for bucket, dimensions, values in items:
        get = dimensions.get
        row = (bucket - bucket % width, tuple(get(g) for g in group_by))
        acc = partial.get(row)
        if acc is None:
            partial[row] = acc = [None] * len(layout)
        merge(layout, acc, values)
        if gauges:
            per_row = series.get(row)
            if per_row is None:
                per_row = series[row] = {}
            tup = tuple(get(d) for d in dims)
            seen = per_row.get(tup)
            if seen is None:
                per_row[tup] = seen = [None] * len(layout)
            merge(layout, seen, values)
    out: Rows = {}
    for row, acc in partial.items():
        numbers: dict[str, Number | None] = {}
        i = 0
        for measure in measures:
            kinds = _kinds(measure)
            if measure.gauge:
                latest = [s[i + 2] for s in series[row].values() if s[i] is not None]
                numbers[measure.name] = _gauge_total(measure, latest)
            elif kinds:
                value = acc[i + 2] if kinds == _LATEST else acc[i]
                numbers[measure.name] = empty_value(measure) if value is None else value
            i += len(kinds)
        out[row] = numbers
    return out


def _gauge(spec: MeterSpec, name: str) -> bool:
    measure = spec.measure(name)
    return bool(measure and measure.gauge)


def _gauge_total(measure: Measure, latest: list[Number]) -> Number | None:
    if not latest:
        return empty_value(measure)
    if measure.aggregation == "max":
        return max(latest)
    if measure.aggregation == "min":
        return min(latest)
    return sum(latest)


def event_items(
    spec: MeterSpec, events: Iterable[Event]
) -> Iterator[tuple[int, Mapping[str, DimValue], list[Any]]]:
    """Raw events as :func:`combine` items."""
    layout = columns(spec)
    for event in events:
        yield event.time, event.dimensions, _event_values(layout, event)


def differences(
    spec: MeterSpec,
    grain: int,
    want: Mapping[Key, tuple[Mapping[str, DimValue], Sequence[Any]]],
    got: Mapping[Key, tuple[Mapping[str, DimValue], Sequence[Any]]],
) -> list[str]:
    """What differs between the rollups ``fold`` gives (``want``) and a store's (``got``), one
    line each: a missing or unexpected row, or a value that is not the same number."""
    layout = columns(spec)
    out = []
    for key in sorted(set(want) | set(got)):
        org, bucket, series = key
        where = f"{spec.name} {grain}s {org} @{bucket} {series}"
        if key not in got:
            out.append(f"{where}: missing")
        elif key not in want:
            out.append(f"{where}: no events make this row")
        else:
            for (kind, name), a, b in zip(layout, want[key][1], got[key][1]):
                if not _same(a, b):
                    out.append(f"{where}: {kind} of {name} is {b!r}, the events give {a!r}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return False
        return bool(abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b)))
    return bool(a == b)
