"""Time-weighted queries over a store: the window's events and what carries into it.

Stores do not integrate: :func:`time_weighted_rows` hands the engine the events of the window
and, per series, the latest event before it (from a rollup store's day rollups when it keeps
them, else from a scan), and the engine integrates (:mod:`meterkit.engine.timeweighted`).
"""

from __future__ import annotations

import itertools

from meterkit.engine import aggregate, timeweighted
from meterkit.engine.aggregate import Rows
from meterkit.models import Event, MeterSpec, UsageQuery
from meterkit.stores.base import RollupStore, Store

__all__ = ["carried_in", "time_weighted_rows"]


def carried_in(store: Store, spec: MeterSpec, query: UsageQuery, reading: MeterSpec) -> list[Event]:
    """Per series of ``spec`` (the meter as the store keeps it), the latest event before the
    query's window carrying each measure ``reading`` integrates."""
    measures = timeweighted.names(reading)
    org, before = query.organization_id, query.scan_start
    if isinstance(store, RollupStore):
        found = store.latest_before(spec, org, before, measures)
        if found is not None:
            return found
    events = store.scan(spec.name, org, 0, before)
    return timeweighted.carried(spec, org, measures, before, events)


def time_weighted_rows(
    store: Store, spec: MeterSpec, query: UsageQuery, reading: MeterSpec | None = None
) -> Rows:
    """The rows of ``query`` read as ``reading`` (default ``spec``: its own time-weighted
    measures), which may read some of ``spec``'s gauges time-weighted (see
    :func:`~meterkit.engine.timeweighted.reading`)."""
    reading = reading or spec
    window = store.scan(spec.name, query.organization_id, query.scan_start, query.page_end)
    events = itertools.chain(carried_in(store, spec, query, reading), window)
    return aggregate(reading, query, events)
