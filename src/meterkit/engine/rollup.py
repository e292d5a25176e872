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

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from meterkit.engine.aggregate import Rows, empty_value, gauge_total
from meterkit.engine.timeweighted import Latest, carried
from meterkit.models import DimValue, Event, GroupRow, Measure, MeterSpec, Number, UsageQuery

__all__ = [
    "GRAINS",
    "Key",
    "Refold",
    "Segment",
    "answer",
    "columns",
    "combine",
    "differences",
    "event_items",
    "fold",
    "fold_grains",
    "latest_of",
    "merger",
    "named",
    "plan",
    "rollable",
    "series_key",
    "series_keys",
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
    """The key that names a series: a 128-bit BLAKE2 digest of its non-null dimensions, sorted
    (so a dimension added to the meter later keeps every existing series' key). A rollup row
    keeps the dimensions themselves in columns of their own; the key only has to be short and
    unique (two series sharing one would take 2**64 series to expect)."""
    text = json.dumps(sorted((k, v) for k, v in dimensions.items() if v is not None))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def fold(
    spec: MeterSpec, events: Iterable[Event], grain: int
) -> dict[Key, tuple[dict[str, DimValue], list[Any]]]:
    """The rollup rows of ``events`` at ``grain``: key -> (dimensions, values in
    :func:`columns` order)."""
    return named(spec, fold_grains(spec, events, (grain,))[grain])


def named(
    spec: MeterSpec, rows: Mapping[Key, tuple[tuple[DimValue, ...], list[Any]]]
) -> dict[Key, tuple[dict[str, DimValue], list[Any]]]:
    """Rows of :func:`fold_grains` with their dimensions as a dict, as :func:`fold` gives."""
    dims = spec.dimension_names
    return {
        key: ({d: v for d, v in zip(dims, tup) if v is not None}, values)
        for key, (tup, values) in rows.items()
    }


_SERIES: dict[tuple[str, ...], dict[tuple[DimValue, ...], str]] = {}


def fold_grains(
    spec: MeterSpec, events: Iterable[Event], grains: Sequence[int] = GRAINS
) -> dict[int, dict[Key, tuple[tuple[DimValue, ...], list[Any]]]]:
    """:func:`fold` at each of ``grains``, reading each event once; each row's dimensions
    as a tuple in the meter's order."""
    layout = columns(spec)
    merge_into = _Merger.of(layout).merge
    out: dict[int, dict[Key, tuple[tuple[DimValue, ...], list[Any]]]] = {g: {} for g in grains}
    tables = [(g, out[g]) for g in grains]
    dims = spec.dimension_names
    names = [name for _, name in layout]
    # Sums, minima, maxima and latest values are the event's own values: read them in one go.
    as_given = all(kind in ("s", "mn", "mx", "l") for kind, _ in layout)
    keys = _SERIES.get(dims)
    if keys is None or len(keys) >= 65536:
        keys = _SERIES[dims] = {}
    for event in events:
        tup = tuple(map(event.dimensions.get, dims))
        series = keys.get(tup)
        if series is None:
            series = keys[tup] = series_key(event.dimensions)
        values = list(map(event.values.get, names)) if as_given else _event_values(layout, event)
        org, time = event.organization_id, event.time
        for grain, rows in tables:
            key = (org, time - time % grain, series)
            row = rows.get(key)
            if row is None:
                rows[key] = (tup, values.copy())
            else:
                merge_into(row[1], values)
    return out


@attrs.frozen
class Refold:
    """The rollup rows an event replaced in place was or is in (a correction, see
    :mod:`meterkit.corrections`): its organization's rows of the series before and after,
    in every grain's buckets over the event's UTC day. A store deletes those rows and folds
    again the events that :meth:`covers`."""

    organization_id: str
    start: int
    end: int
    series: tuple[str, ...]

    @classmethod
    def of(cls, old: Event, new: Event) -> Refold:
        assert new.time is not None
        day = new.time - new.time % GRAINS[-1]
        keys = sorted({series_key(old.dimensions), series_key(new.dimensions)})
        return cls(new.organization_id, day, day + GRAINS[-1], tuple(keys))

    def covers(self, event: Event) -> bool:
        """Whether ``event`` is one those rows are folded from."""
        t = event.time
        return (
            event.organization_id == self.organization_id
            and t is not None
            and self.start <= t < self.end
            and series_key(event.dimensions) in self.series
        )


def series_keys(spec: MeterSpec, events: Iterable[Event]) -> list[str]:
    """Each event's :func:`series_key`, in order."""
    dims = spec.dimension_names
    keys = _SERIES.get(dims)
    if keys is None or len(keys) >= 65536:
        keys = _SERIES[dims] = {}
    out = []
    for event in events:
        tup = tuple(map(event.dimensions.get, dims))
        series = keys.get(tup)
        if series is None:
            series = keys[tup] = series_key(event.dimensions)
        out.append(series)
    return out


class _Merger:
    """Merging rows of one layout, its cells sorted by kind up front (see :func:`merger`)."""

    _cache: dict[tuple[tuple[str, str], ...], _Merger] = {}

    def __init__(self, layout: Sequence[tuple[str, str]]) -> None:
        kinds = [kind for kind, _ in layout]
        self.adds = [i for i, k in enumerate(kinds) if k in ("s", "n")]
        self.mins = [i for i, k in enumerate(kinds) if k == "mn"]
        self.maxs = [i for i, k in enumerate(kinds) if k == "mx"]
        self.latest = [i for i, k in enumerate(kinds) if k == "t"]

    @classmethod
    def of(cls, layout: tuple[tuple[str, str], ...]) -> _Merger:
        found = cls._cache.get(layout)
        if found is None:
            found = cls._cache[layout] = cls(layout)
        return found

    def merge(self, into: list[Any], other: Sequence[Any]) -> None:
        for i in self.adds:
            new = other[i]
            if new is not None:
                old = into[i]
                into[i] = new if old is None else old + new
        for i in self.mins:
            new = other[i]
            if new is not None and (into[i] is None or new < into[i]):
                into[i] = new
        for i in self.maxs:
            new = other[i]
            if new is not None and (into[i] is None or new > into[i]):
                into[i] = new
        for i in self.latest:
            new = other[i]
            if new is not None and (
                into[i] is None or (new, other[i + 1]) > (into[i], into[i + 1])
            ):
                into[i : i + 3] = other[i : i + 3]


def _event_values(layout: Sequence[tuple[str, str]], event: Event) -> list[Any]:
    out: list[Any] = []
    get = event.values.get
    for kind, name in layout:
        value = get(name)
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


def merger(layout: tuple[tuple[str, str], ...]) -> Callable[[list[Any], Sequence[Any]], None]:
    """How rows of one layout combine: ``merge(into, other)`` folds ``other`` into ``into``
    in place (sums and counts add, minima and maxima keep theirs, the latest (time, id)
    wins), looked up once for many rows."""
    return _Merger.of(layout).merge


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
    merger = _Merger.of(layout)
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
        merger.merge(acc, values)
        if gauges:
            per_row = series.get(row)
            if per_row is None:
                per_row = series[row] = {}
            tup = tuple(get(d) for d in dims)
            seen = per_row.get(tup)
            if seen is None:
                per_row[tup] = seen = [None] * len(layout)
            merger.merge(seen, values)
    out: Rows = {}
    for row, acc in partial.items():
        numbers: dict[str, Number | None] = {}
        i = 0
        for measure in measures:
            kinds = _kinds(measure)
            if measure.gauge:
                latest = [s[i + 2] for s in series[row].values() if s[i] is not None]
                numbers[measure.name] = gauge_total(measure, latest)
            elif kinds:
                value = acc[i + 2] if kinds == _LATEST else acc[i]
                numbers[measure.name] = empty_value(measure) if value is None else value
            i += len(kinds)
        out[row] = numbers
    return out


def _gauge(spec: MeterSpec, name: str) -> bool:
    measure = spec.measure(name)
    return bool(measure and measure.gauge)


def latest_of(
    spec: MeterSpec,
    measures: Sequence[str],
    rows: Iterable[tuple[Mapping[str, DimValue], Sequence[Any]]],
) -> Iterator[Latest]:
    """What rollup rows (dimensions, values in :func:`columns` order) say of each gauge in
    ``measures``: its series' latest event in the row's bucket, for
    :func:`meterkit.engine.timeweighted.carried`."""
    layout = columns(spec)
    at = [(layout.index(("t", name)), name) for name in measures]
    for dimensions, values in rows:
        for pos, name in at:
            if values[pos] is not None:
                yield dimensions, name, values[pos], values[pos + 1], values[pos + 2]


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
        org, bucket, _series = key
        dims = (want.get(key) or got[key])[0]
        where = f"{spec.name} {grain}s {org} @{bucket} {dict(dims)}"
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


def latest_before(
    spec: MeterSpec,
    organization_id: str,
    before: int,
    measures: Sequence[str],
    day_latest: Callable[[int], Iterable[Latest]],
    scan: Callable[[int, int], Iterable[Event]],
) -> list[Event]:
    """Per series, the latest event before ``before`` carrying each gauge of ``measures``:
    what the day rollups of the days before ``before``'s day say (``day_latest(day)``: their
    latest cells, :func:`latest_of`), then the events of that day (``scan(day, before)``).

    The one definition of :meth:`~meterkit.stores.base.Store.latest_before`: every store
    answers with it, giving only how it reads its rows and events."""
    day = before - before % GRAINS[-1]
    return carried(spec, organization_id, measures, before, scan(day, before), day_latest(day))
