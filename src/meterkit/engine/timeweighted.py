"""Time-weighted gauges: a gauge integrated over time, per series, summed across series.

Each value of a series holds from its event's time until the series' next event (ties in time
go to the greatest id, as for every gauge). A bucket's reading is the integral of that step
function over the part of the bucket inside the query's window (value x seconds), summed over
the series of the row's group; a value recorded before the window carries into it.

A row exists for a ``(bucket, group)`` when one of the group's series has a value during some
of that part of the bucket: an event in it, or one carried from before. The engine needs, per
series, the latest event before the window; :func:`carried` picks those out of any events (or
the rollup rows of whole days before it), so a store hands over a handful instead of its
whole history.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs

from meterkit.models import DimValue, Event, GroupRow, Measure, MeterSpec, Number, UsageQuery

__all__ = ["Latest", "carried", "integrate", "names", "reading"]

_Series = tuple[DimValue, ...]


def names(spec: MeterSpec) -> tuple[str, ...]:
    """The meter's ``time_weighted`` measures."""
    return tuple(m.name for m in spec.measures if m.aggregation == "time_weighted")


def reading(spec: MeterSpec, measures: Iterable[str]) -> MeterSpec:
    """``spec`` with the named gauges read time-weighted: what costs price a gauge by."""
    wanted = set(measures)
    return attrs.evolve(
        spec,
        measures=tuple(
            Measure(m.name, "time_weighted", fractional=m.fractional, unit=m.unit)
            if m.name in wanted
            else m
            for m in spec.measures
        ),
    )


Latest = tuple[Mapping[str, DimValue], str, int, str, Number]
"""``(dimensions, measure, time, id, value)``: the latest event of a series carrying a measure,
as a rollup row's latest-value cells name it (see :func:`meterkit.engine.rollup.latest_of`)."""


def carried(
    spec: MeterSpec,
    organization_id: str,
    measures: Sequence[str],
    before: int,
    events: Iterable[Event] = (),
    latest: Iterable[Latest] = (),
) -> list[Event]:
    """Per series and measure, the latest value before ``before``, as events.

    ``events`` may be any events of the meter and organization (those from ``before`` on are
    ignored); ``latest`` adds what rollup rows of earlier days say their series' latest events
    were, so a store need not read those days' events.
    """
    dims = spec.dimension_names
    wanted = set(measures)
    best: dict[tuple[_Series, str], tuple[int, str, Number, Mapping[str, DimValue]]] = {}

    def offer(d: Mapping[str, DimValue], name: str, t: int, i: str, v: Number) -> None:
        key = (tuple(d.get(x) for x in dims), name)
        seen = best.get(key)
        if seen is None or (t, i) > seen[:2]:
            best[key] = (t, i, v, d)

    for d, name, t, i, v in latest:
        if t < before and name in wanted:
            offer(d, name, t, i, v)
    for event in events:
        if event.time >= before:
            continue
        for name in measures:
            value = event.values.get(name)
            if value is not None:
                offer(event.dimensions, name, event.time, event.id, value)
    return [
        Event(i, spec.name, organization_id, t, {name: v}, dict(d))
        for (_series, name), (t, i, v, d) in best.items()
    ]


def integrate(
    spec: MeterSpec, query: UsageQuery, events: Iterable[Event]
) -> dict[GroupRow, dict[str, Number]]:
    """The ``time_weighted`` measures' rows: for each (bucket, group) with a value, each
    measure's integral over ``[max(bucket, window start), min(bucket end, window end))``.

    ``events`` are the meter's events before the window's end (earlier ones only for what
    they carry in: :func:`carried` gives just those)."""
    measures = [m for m in spec.measures if m.aggregation == "time_weighted"]
    dims = spec.dimension_names
    low, high, width = query.scan_start, query.page_end, query.width
    org, meter, filters = query.organization_id, query.meter, query.filters
    # Per (measure, series): the latest value before the window, and the window's events.
    before: dict[tuple[str, _Series], tuple[int, str, Number]] = {}
    inside: dict[tuple[str, _Series], list[tuple[int, str, Number]]] = {}
    groups: dict[_Series, tuple[DimValue, ...]] = {}
    for event in events:
        if event.time >= high or event.organization_id != org or event.meter != meter:
            continue
        get = event.dimensions.get
        if filters and not all(get(name) in allowed for name, allowed in filters):
            continue
        series = tuple(event.dimensions.get(d) for d in dims)
        if series not in groups:
            groups[series] = tuple(event.dimensions.get(g) for g in query.group_by)
        for m in measures:
            value = event.values.get(m.name)
            if value is None:
                continue
            key = (m.name, series)
            if event.time < low:
                seen = before.get(key)
                if seen is None or (event.time, event.id) > seen[:2]:
                    before[key] = (event.time, event.id, value)
            else:
                inside.setdefault(key, []).append((event.time, event.id, value))
    out: dict[GroupRow, dict[str, Number]] = {}
    for key in sorted({*before, *inside}, key=_order):
        name, series = key
        steps = sorted(inside.get(key, ()))
        start = before[key][2] if key in before else None
        # Change points: the carried value from the window's start, then each event's.
        points: list[tuple[int, Number]] = [] if start is None else [(low, start)]
        points += [(t, v) for t, _i, v in steps]
        group = groups[series]
        for (t, v), following in zip(points, [*points[1:], (high, None)]):
            end = following[0]
            while t < end:
                bucket = t - t % width
                cut = min(bucket + width, end)
                row = out.get((bucket, group))
                if row is None:
                    row = out[(bucket, group)] = {m.name: 0 for m in measures}
                row[name] += v * (cut - t)
                t = cut
    return out


def _order(key: tuple[str, _Series]) -> tuple[str, tuple[tuple[int, str], ...]]:
    name, series = key
    return name, tuple((0, "") if v is None else (1, repr(v)) for v in series)
