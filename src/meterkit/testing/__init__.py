"""The store conformance suite: one set of tests every meterkit store must pass.

A store author subclasses :class:`StoreConformance` in a pytest module, says how to open the
store, and pytest collects every test below for it::

    from pathlib import Path

    from meterkit.meter import open_store
    from meterkit.testing import StoreConformance

    class TestMyStore(StoreConformance):
        persistent = True          # False for stores that forget everything on close

        def make_store(self, location: Path):
            return open_store(f"mystore:///{location}")

``make_store(location)`` must return an *empty* store the first time it sees ``location`` (a
fresh directory) and, when ``persistent`` is true, the same data again when given the same
``location`` after the earlier store was closed. Stores are used as :class:`~meterkit.Meter`
uses them: ``ensure_meter`` is called for a meter after opening, and again after a failed
append, before its events are appended or read.

The reference for every answer is the pure engine (:func:`meterkit.engine.aggregate`): a store's
native ``aggregate`` must equal it on the same events, and ``scan`` must hand back exactly the
events that were appended. This module needs pytest and hypothesis (the ``dev`` extra).

The suite is one class per capability, as a store may have only some of them:
:class:`EventConformance` (append, scan, ids), :class:`QueryConformance` (aggregates, rollups,
``latest_before``, retention) and :class:`CounterConformance` (quota counters, held to
:func:`meterkit.counters.apply`; a counters-only backend such as Redis subclasses it alone).
:class:`StoreConformance` is all three.
"""

from __future__ import annotations

import pytest

from meterkit.stores.base import CounterStore, Store
from meterkit.testing.base import Conformance
from meterkit.testing.counters import CounterConformance, ModelCounters
from meterkit.testing.events import EventConformance
from meterkit.testing.queries import QueryConformance
from meterkit.testing.support import (
    COMPLETIONS,
    ROLLED_METER,
    SUITE_METER,
    SUITE_METERS,
    T0,
    VECTOR_STORES,
    WEIGHTED_METER,
    StoreFactory,
    assert_rows_match,
    make_query,
    normalized,
    scan_all,
    store_rows,
)

__all__ = [
    "COMPLETIONS",
    "ROLLED_METER",
    "SUITE_METER",
    "SUITE_METERS",
    "T0",
    "VECTOR_STORES",
    "WEIGHTED_METER",
    "Conformance",
    "CounterConformance",
    "EventConformance",
    "ModelCounters",
    "QueryConformance",
    "StoreConformance",
    "StoreFactory",
    "assert_rows_match",
    "make_query",
    "normalized",
    "scan_all",
    "store_rows",
]


class StoreConformance(EventConformance, QueryConformance, CounterConformance):
    """Every capability of an event store: subclass as ``Test<Something>`` and implement
    :meth:`make_store`."""

    @pytest.fixture
    def counters(self, store: Store) -> CounterStore:
        return store
