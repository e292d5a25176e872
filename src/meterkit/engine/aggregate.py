"""Group events into (bucket, group) rows and aggregate each measure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meterkit.engine import timeweighted
from meterkit.models import DimValue, Event, GroupRow, Measure, MeterSpec, Number, UsageQuery

__all__ = ["Rows", "aggregate", "empty_value", "gauge_total", "matches"]

Rows = dict[GroupRow, dict[str, "Number | None"]]


def empty_value(measure: Measure) -> Number | None:
    """What a measure reads when no event in the row carries it."""
    if measure.aggregation in ("sum", "count", "unique_count", "time_weighted"):
        return 0
    return None


def matches(event: Event, query: UsageQuery) -> bool:
    """Whether ``event`` is inside the query's scan window and passes its filters."""
    if event.organization_id != query.organization_id or event.meter != query.meter:
        return False
    if not query.scan_start <= event.time < query.page_end:
        return False
    return all(event.dimensions.get(name) in allowed for name, allowed in query.filters)


class _Acc:
    """Running state of one measure in one row."""

    __slots__ = ("latest", "series", "total", "uniques")

    def __init__(self) -> None:
        self.total: Any = None
        self.latest: tuple[int, str] | None = None
        self.uniques: set[Number] = set()
        self.series: dict[tuple[DimValue, ...], tuple[int, str, Number]] = {}


def _add(
    measure: Measure, acc: _Acc, event: Event, value: Number, series: tuple[DimValue, ...]
) -> None:
    agg = measure.aggregation
    if measure.gauge:
        seen = acc.series.get(series)
        if seen is None or (event.time, event.id) > seen[:2]:
            acc.series[series] = (event.time, event.id, value)
    elif agg == "sum":
        acc.total = value if acc.total is None else acc.total + value
    elif agg == "count":
        acc.total = 1 if acc.total is None else acc.total + 1
    elif agg == "max":
        acc.total = value if acc.total is None else max(acc.total, value)
    elif agg == "min":
        acc.total = value if acc.total is None else min(acc.total, value)
    elif agg == "latest":
        if acc.latest is None or (event.time, event.id) > acc.latest:
            acc.latest = (event.time, event.id)
            acc.total = value
    else:  # unique_count
        acc.uniques.add(value)


def gauge_total(measure: Measure, latest: list[Number]) -> Number | None:
    """A gauge's value in a row: its series' latest values combined as the measure says."""
    if not latest:
        return empty_value(measure)
    if measure.aggregation == "max":
        return max(latest)
    if measure.aggregation == "min":
        return min(latest)
    return sum(latest)


def _finish(measure: Measure, acc: _Acc) -> Number | None:
    if measure.gauge:
        return gauge_total(measure, [v for _t, _i, v in acc.series.values()])
    if measure.aggregation == "unique_count":
        return len(acc.uniques)
    return empty_value(measure) if acc.total is None else acc.total


def aggregate(spec: MeterSpec, query: UsageQuery, events: Iterable[Event]) -> Rows:
    """Aggregate the events that :func:`matches` the query into rows keyed by (bucket, group).

    A ``time_weighted`` measure also reads events before the window, for the values they carry
    into it (see :mod:`meterkit.engine.timeweighted`)."""
    weighted = timeweighted.names(spec)
    if weighted:
        events = list(events)
    width = query.width
    dims = spec.dimension_names
    accs: dict[GroupRow, list[_Acc]] = {}
    measures = tuple(m for m in spec.measures if m.name not in weighted)
    for event in events if measures else ():
        if not matches(event, query):
            continue
        get = event.dimensions.get
        key: GroupRow = (event.time - event.time % width, tuple(get(g) for g in query.group_by))
        row = accs.get(key)
        if row is None:
            row = accs[key] = [_Acc() for _ in measures]
        series = tuple(get(d) for d in dims)
        for measure, acc in zip(measures, row):
            value = event.values.get(measure.name)
            if value is not None:
                _add(measure, acc, event, value, series)
    out: Rows = {
        key: {m.name: _finish(m, acc) for m, acc in zip(measures, row)} for key, row in accs.items()
    }
    if weighted:
        integrals = timeweighted.integrate(spec, query, events)
        empties = {m.name: empty_value(m) for m in spec.measures}
        for key in {*out, *integrals}:
            out[key] = {**empties, **out.get(key, {}), **integrals.get(key, {})}
    return out
