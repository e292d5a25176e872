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
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from meterkit import engine, integrals
from meterkit.catalog import builtin_meters
from meterkit.engine import rollup, timeweighted
from meterkit.engine.aggregate import Rows
from meterkit.models import Dimension, DimValue, Event, Measure, MeterSpec, Number, UsageQuery
from meterkit.stores.base import RollupStore, Store
from meterkit.validate import BUCKET_WIDTHS, MAX_TIME, check_event, check_usage_query

__all__ = [
    "COMPLETIONS",
    "SUITE_METER",
    "SUITE_METERS",
    "T0",
    "VECTOR_STORES",
    "WEIGHTED_METER",
    "StoreConformance",
    "StoreFactory",
    "assert_rows_match",
    "normalized",
    "store_rows",
]

DAY = 86400
T0 = 1_730_419_200
"""2024-11-01T00:00:00Z: a multiple of every bucket width, so offsets from it are boundaries."""

SUITE_METER = MeterSpec(
    "conformance",
    measures=(
        Measure("total", fractional=True),
        Measure("calls", "count"),
        Measure("peak", "max", fractional=True),
        Measure("low", "min", fractional=True),
        Measure("last", "latest", fractional=True),
        Measure("distinct", "unique_count", fractional=True),
        Measure("level", "sum", gauge=True, fractional=True),
        Measure("level_max", "max", gauge=True, fractional=True),
        Measure("level_min", "min", gauge=True, fractional=True),
    ),
    dimensions=(
        Dimension("region"),
        Dimension("tier", allowed=frozenset({"free", "pro"})),
        Dimension("flag", kind="bool"),
    ),
)
"""A meter with every aggregation, gauges combined three ways, and str, enum and bool dims."""

ROLLED_METER = MeterSpec(
    "rolled",
    measures=tuple(m for m in SUITE_METER.measures if m.aggregation != "unique_count"),
    dimensions=SUITE_METER.dimensions,
)
""":data:`SUITE_METER` without its ``unique_count``: every query of it can come from rollups."""

WEIGHTED_METER = MeterSpec(
    "weighted",
    measures=(
        Measure("held", "time_weighted"),
        Measure("held_f", "time_weighted", fractional=True),
        Measure("moved"),
    ),
    dimensions=(Dimension("region"), Dimension("flag", kind="bool")),
)
"""Time-weighted gauges (whole and fractional) beside a sum: integrals carried across buckets
and into windows from before them, on every store."""

COMPLETIONS = builtin_meters()["completions"]
VECTOR_STORES = builtin_meters()["vector_stores"]
SUITE_METERS: tuple[MeterSpec, ...] = (
    SUITE_METER,
    ROLLED_METER,
    COMPLETIONS,
    VECTOR_STORES,
    WEIGHTED_METER,
)

_END_OF_TIME = MAX_TIME + 1
_STR_VALUES = ("a", "b", "c")


# -- helpers ----------------------------------------------------------------------------------


def normalized(event: Event) -> tuple[Any, ...]:
    """An event as a comparable tuple that also tells ``1`` from ``1.0`` and ``True`` from ``1``.

    A ``None`` dimension and a missing one mean the same (the engine reads both as ``None``),
    so ``None`` entries are dropped.
    """
    values = tuple(sorted((k, type(v).__name__, v) for k, v in event.values.items()))
    dims = tuple(
        sorted((k, type(v).__name__, v) for k, v in event.dimensions.items() if v is not None)
    )
    return (event.meter, event.id, event.organization_id, event.time, values, dims)


def _sorted_norm(events: Iterable[Event]) -> list[tuple[Any, ...]]:
    return sorted((normalized(e) for e in events), key=repr)


def scan_all(store: Store, meter: str, org: str) -> list[Event]:
    return list(store.scan(meter, org, 0, _END_OF_TIME))


def make_query(
    spec: MeterSpec,
    *,
    org: str,
    start: int,
    end: int,
    width: str,
    group_by: Sequence[str] = (),
    filters: Mapping[str, Sequence[DimValue]] | None = None,
    limit: int | None = None,
    page: int = 0,
) -> UsageQuery:
    """A validated query; ``limit`` defaults to the width's maximum, ``page`` skips pages."""
    query = check_usage_query(
        spec,
        organization_id=org,
        start_time=start,
        end_time=end,
        bucket_width=width,
        group_by=list(group_by),
        filters=filters,
        limit=limit if limit is not None else BUCKET_WIDTHS[width][2],
    )
    if page:
        page_start = query.page_start + page * query.limit * query.width
        if page_start < query.end_time:
            query = attrs.evolve(query, page_start=page_start)
    return query


def store_rows(store: Store, spec: MeterSpec, query: UsageQuery) -> Rows:
    """What :class:`~meterkit.Meter` would aggregate: the native answer, else engine over scan."""
    if timeweighted.names(spec):
        return integrals.time_weighted_rows(store, spec, query)
    rows = store.aggregate(spec, query)
    if rows is None:
        events = store.scan(spec.name, query.organization_id, query.scan_start, query.page_end)
        rows = engine.aggregate(spec, query, events)
    return rows


def _numbers_match(aggregation: str, got: object, want: Number | None) -> bool:
    if want is None or got is None:
        return got is want
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return False
    # max/min over equal values (1 and 1.0) may pick either one; every other aggregation
    # determines the type: an int total must stay an int.
    if aggregation not in ("max", "min") and type(got) is not type(want):
        return False
    if isinstance(got, int) and isinstance(want, int):
        return got == want
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)


def assert_rows_match(got: Rows, want: Rows, spec: MeterSpec, context: str = "") -> None:
    """Same (bucket, group) keys and, measure by measure, the same numbers."""
    where = f" ({context})" if context else ""
    assert set(got) == set(want), (
        f"row keys differ{where}: missing {sorted(set(want) - set(got), key=repr)}, "
        f"unexpected {sorted(set(got) - set(want), key=repr)}"
    )
    for key, values in want.items():
        for measure in spec.measures:
            expected = values[measure.name]
            actual = got[key].get(measure.name)
            assert _numbers_match(measure.aggregation, actual, expected), (
                f"{measure.name} ({measure.aggregation}{', gauge' if measure.gauge else ''}) "
                f"of row {key}{where}: store says {actual!r}, engine says {expected!r}"
            )


def _event(
    id: str,
    *,
    meter: str = SUITE_METER.name,
    org: str = "org_a",
    time: int = T0,
    values: Mapping[str, Number] | None = None,
    dims: Mapping[str, DimValue] | None = None,
) -> Event:
    return Event(id, meter, org, time, dict(values or {"total": 1}), dict(dims or {}))


class _InjectedFault(RuntimeError):
    """Raised on purpose inside an append, standing in for a disk or connection failure."""


class _UnusableId(str):
    """An id that cannot be hashed or compared: a store that looks at it has to fail."""

    def __hash__(self) -> int:
        raise _InjectedFault("this id cannot be hashed")

    def __eq__(self, other: object) -> bool:
        raise _InjectedFault("this id cannot be compared")

    def __ne__(self, other: object) -> bool:
        raise _InjectedFault("this id cannot be compared")


class _UnreadableValues(Mapping[str, Number]):
    """A values mapping that fails when a store reads it."""

    def __getitem__(self, key: str) -> Number:
        raise _InjectedFault("values cannot be read")

    def __iter__(self) -> Iterator[str]:
        raise _InjectedFault("values cannot be read")

    def __len__(self) -> int:
        raise _InjectedFault("values cannot be read")


# -- the factory ------------------------------------------------------------------------------


class StoreFactory:
    """Opens stores for one test, each under a directory of its own, and closes them after."""

    def __init__(
        self, opener: Callable[[Path], Store], root: Path, meters: Sequence[MeterSpec]
    ) -> None:
        self._opener = opener
        self._root = root
        self._meters = tuple(meters)
        self._open: list[Store] = []
        self._fresh = itertools.count()

    def open(self, name: str = "main", *, ensure: bool = True) -> Store:
        """Open (or reopen) the store kept at ``name``; ``ensure`` prepares the suite's meters."""
        location = self._root / name
        location.mkdir(parents=True, exist_ok=True)
        store = self._opener(location)
        self._open.append(store)
        if ensure:
            for spec in self._meters:
                store.ensure_meter(spec)
        return store

    def fresh(self) -> Store:
        """A new, empty store at a location no other store in this test uses."""
        return self.open(f"fresh-{next(self._fresh)}")

    def close(self, store: Store) -> None:
        if any(s is store for s in self._open):
            self._open = [s for s in self._open if s is not store]
            store.close()

    def reopen(self, store: Store, name: str = "main") -> Store:
        """Close ``store`` and open the data at ``name`` again."""
        self.close(store)
        return self.open(name)

    def close_all(self) -> None:
        while self._open:
            self._open.pop().close()


# -- hypothesis strategies --------------------------------------------------------------------


def _times() -> st.SearchStrategy[int]:
    # Half the times sit on or next to a minute / hour / day boundary, where off-by-one
    # bucketing would show; the rest are spread over three days.
    boundary = st.builds(
        lambda unit, k, nudge: T0 + (k * unit) % (3 * DAY) + nudge,
        st.sampled_from((60, 3600, DAY)),
        st.integers(0, 3 * 24 * 60),
        st.sampled_from((-1, 0, 0, 1)),
    )
    return st.one_of(boundary, st.integers(T0 - 60, T0 + 3 * DAY + 60))


def _numbers(fractional: bool = True) -> st.SearchStrategy[Number]:
    ints = st.integers(0, 20)
    if not fractional:
        return ints
    few_floats = st.one_of(
        st.sampled_from((0.5, 2.0, 7.25)),
        st.floats(min_value=0, max_value=100, allow_nan=False, allow_infinity=False),
    )
    return st.one_of(ints, ints, ints, few_floats)


def _dim_values(dim: Dimension) -> st.SearchStrategy[DimValue]:
    if dim.kind == "bool":
        return st.sampled_from((True, False, None))
    # Two values (and None) keep series few, so they repeat within a bucket.
    choices = sorted(dim.allowed) if dim.allowed is not None else list(_STR_VALUES[:2])
    return st.sampled_from([*choices, None])


def _values(spec: MeterSpec) -> st.SearchStrategy[dict[str, Number]]:
    # Each measure is present three times in four, so rows usually hold several values.
    def maybe(m: Measure) -> st.SearchStrategy[Number | None]:
        number = _numbers(m.fractional)
        return st.one_of(st.none(), number, number, number)

    return st.fixed_dictionaries({m.name: maybe(m) for m in spec.measures}).map(
        lambda values: _summed(spec, {k: v for k, v in values.items() if v is not None})
    )


def _summed(spec: MeterSpec, values: dict[str, Number]) -> dict[str, Number]:
    """``values`` with each of the meter's totals made the sum of its parts where an event
    gives all of them (a meter refuses it otherwise), innermost sums first."""
    pending = [(total, parts) for total, parts in spec.sums if total in values]
    while pending:
        ready = [
            (total, parts)
            for total, parts in pending
            if not any(p == other for p in parts for other, _ in pending)
        ]
        for total, parts in ready or pending:
            if all(p in values for p in parts):
                values[total] = sum(values[p] for p in parts)
        pending = [item for item in pending if item not in (ready or pending)]
    return values


def _events(spec: MeterSpec, times: st.SearchStrategy[int]) -> st.SearchStrategy[Event]:
    return st.builds(
        Event,
        id=st.sampled_from([f"e{i}" for i in range(40)]),
        meter=st.just(spec.name),
        organization_id=st.sampled_from(("org_a", "org_a", "org_b")),
        time=times,
        values=_values(spec),
        dimensions=st.fixed_dictionaries(
            {}, optional={d.name: _dim_values(d) for d in spec.dimensions}
        ),
    )


@attrs.frozen
class _Scenario:
    """Append batches, and the hot times their events cluster around (queries cut there)."""

    hot: tuple[int, ...]
    batches: tuple[tuple[Event, ...], ...]


def _near(hot: Sequence[int]) -> st.SearchStrategy[int]:
    return st.builds(
        lambda t, d: t + d, st.sampled_from(hot), st.sampled_from((0, 0, -1, 1, 30, 59))
    )


@st.composite
def _scenarios(draw: st.DrawFn) -> _Scenario:
    # A few hot times shared by many events put several events in one bucket and one series,
    # where latest, gauges, max and unique counts tell apart from a plain sum.
    hot = tuple(draw(st.lists(_times(), min_size=1, max_size=3)))
    times = st.one_of(_near(hot), _near(hot), _times())
    meters = st.sampled_from((SUITE_METER, ROLLED_METER, *SUITE_METERS))
    events = meters.flatmap(lambda spec: _events(spec, times))
    batches = []
    for _ in range(draw(st.integers(1, 3), label="number of batches")):
        size = draw(st.integers(0, 40), label="batch size")
        # Ids repeat within and across batches (40 ids, up to 120 events).
        batches.append(tuple(draw(events) for _ in range(size)))
    return _Scenario(hot, tuple(batches))


@st.composite
def _queries(draw: st.DrawFn, spec: MeterSpec, hot: Sequence[int]) -> UsageQuery:
    names = list(spec.dimension_names)
    width = draw(st.sampled_from(sorted(BUCKET_WIDTHS)))
    max_limit = BUCKET_WIDTHS[width][2]
    mode = draw(st.sampled_from(("everything", "at_events", "anywhere")))
    if mode == "everything":
        # All the data on one page: every event counts somewhere.
        width = draw(st.sampled_from(("1h", "1d")))
        start = T0 - 120 - draw(st.integers(0, 90))
        end = T0 + 3 * DAY + 120 + draw(st.integers(0, 90))
        limit, page = BUCKET_WIDTHS[width][2], 0
    elif mode == "at_events":
        # Range edges on event times catch a closed or shifted [start, end).
        start, end = sorted((draw(_near(hot)), draw(_near(hot))))
        end = max(end, start + 1)
        limit, page = max_limit, 0
    else:
        start = draw(_times())
        end = draw(
            st.one_of(
                st.integers(start + 1, start + 2 * 3600),
                st.integers(start + 1, start + 3 * DAY + 120),
            )
        )
        limit = draw(st.one_of(st.just(max_limit), st.integers(1, max_limit)))
        page = draw(st.sampled_from((0, 0, 1, 2)))
    group_by = draw(st.lists(st.sampled_from(names), unique=True, max_size=3))
    filter_on = draw(st.lists(st.sampled_from(names), unique=True, max_size=2))
    filters = {}
    for name in filter_on:
        dim = spec.dimension(name)
        assert dim is not None
        filters[name] = draw(st.lists(_dim_values(dim), min_size=1, max_size=3))
    return make_query(
        spec,
        org=draw(st.sampled_from(("org_a", "org_a", "org_b"))),
        start=start,
        end=end,
        width=width,
        group_by=group_by,
        filters=filters,
        limit=limit,
        page=page,
    )


def _append_scenario(store: Store, scenario: _Scenario) -> list[Event]:
    """Append the scenario's batches, checking each returns exactly its new events; all the
    events stored, in order."""
    specs = {spec.name: spec for spec in SUITE_METERS}
    seen: set[tuple[str, str, str]] = set()
    appended: list[Event] = []
    for batch in scenario.batches:
        checked = [check_event(specs[e.meter], e) for e in batch]
        expected_new = []
        for event in checked:
            if (event.meter, event.organization_id, event.id) not in seen:
                seen.add((event.meter, event.organization_id, event.id))
                expected_new.append(event)
        got = store.append(checked)
        assert [normalized(e) for e in got] == [normalized(e) for e in expected_new]
        appended.extend(expected_new)
    return appended


@st.composite
def _kept_queries(
    draw: st.DrawFn, spec: MeterSpec, before: int, from_before: bool = False
) -> UsageQuery:
    """Queries a store must still answer after dropping the events before ``before``: hour
    or day buckets from a start on the hour, or any query from ``before`` on (only those
    with ``from_before``: time-weighted windows need their events)."""
    names = list(spec.dimension_names)
    if not from_before and draw(st.booleans(), label="from rollups"):
        width = draw(st.sampled_from(("1h", "1d")))
        start = T0 + 3600 * draw(st.integers(-24, 3 * 24))
        end = start + 3600 * draw(st.integers(1, 4 * 24))
        if end >= before:  # an unaligned end reads minutes and events, which are kept there
            end += draw(st.sampled_from((0, 1, 59, 60, 1801, 3599)))
    else:
        width = draw(st.sampled_from(sorted(BUCKET_WIDTHS)))
        start = before + draw(st.sampled_from((0, 1, 59, 60, 3599, 3600, 5000)))
        end = start + draw(st.integers(1, 4 * DAY))
    group_by = draw(st.lists(st.sampled_from(names), unique=True, max_size=3))
    filters = {}
    for name in draw(st.lists(st.sampled_from(names), unique=True, max_size=1)):
        dim = spec.dimension(name)
        assert dim is not None
        filters[name] = draw(st.lists(_dim_values(dim), min_size=1, max_size=2))
    return make_query(
        spec,
        org=draw(st.sampled_from(("org_a", "org_b"))),
        start=start,
        end=end,
        width=width,
        group_by=group_by,
        filters=filters,
    )


def _store_property(examples: int) -> settings:
    """Settings of the suite's property tests over a store."""
    return settings(
        max_examples=examples,
        deadline=None,
        # No "explain" phase: on a failing store it costs minutes and the shrunk example
        # already says what went wrong.
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
        # Each subclass runs these methods against its own store, hence differing executors;
        # every example opens a fresh store, so the function-scoped fixture is not shared state.
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
            HealthCheck.too_slow,
        ],
    )


def _deterministic_events() -> list[Event]:
    """A fixed data set over three days: boundary times, both orgs, all dims, ints and floats."""
    rng = random.Random(20241101)
    offsets = [0, 1, 59, 60, 61, 3599, 3600, 3601, DAY - 1, DAY, DAY + 1, 2 * DAY - 60]
    offsets += [rng.randrange(-120, 3 * DAY) for _ in range(150)]
    floats = (0.5, 1.25, 3.0, 9.75)
    events = []
    for i, offset in enumerate(offsets):
        values: dict[str, Number] = {}
        for j, measure in enumerate(SUITE_METER.measures):
            if (i + j) % 5 == 4:
                continue  # some events leave some measures out
            values[measure.name] = floats[i % 4] if (i * 7 + j) % 6 == 0 else rng.randrange(0, 40)
        dims: dict[str, DimValue] = {}
        if i % 4:
            dims["region"] = _STR_VALUES[i % 3]
        if i % 5:
            dims["tier"] = ("free", "pro")[i % 2]
        if i % 3:
            dims["flag"] = (True, False, None)[i % 3]
        org = "org_b" if i % 7 == 0 else "org_a"
        events.append(Event(f"ev{i}", SUITE_METER.name, org, T0 + offset, values, dims))
    return events


_AGGREGATE_SHAPES: dict[str, dict[str, Any]] = {
    "everything": {},
    "group_by_region_and_flag": {"group_by": ("region", "flag")},
    "filter_with_none": {"filters": {"region": [None, "b"]}, "group_by": ("tier",)},
    "filter_bool_false": {"filters": {"flag": [False]}, "group_by": ("region",)},
    "filter_bool_true_or_none": {"filters": {"flag": [True, None], "tier": ["pro"]}},
    "group_by_every_dimension": {"group_by": ("tier", "flag", "region")},
    # Limits chosen so that the second page of each width still holds events.
    "second_page": {"page": 1, "limit": {"1m": 1440, "1h": 24, "1d": 1}, "group_by": ("flag",)},
}


# -- the suite --------------------------------------------------------------------------------


class StoreConformance:
    """Subclass as ``Test<Something>`` and implement :meth:`make_store`.

    Set ``persistent = False`` for a store that keeps nothing once closed; the tests about
    reopening then skip.
    """

    persistent: ClassVar[bool] = True
    meters: ClassVar[tuple[MeterSpec, ...]] = SUITE_METERS

    def make_store(self, location: Path) -> Store:
        """Open the store whose data lives at ``location`` (an existing directory)."""
        raise NotImplementedError("a StoreConformance subclass must implement make_store()")

    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> Iterator[StoreFactory]:
        factory = StoreFactory(self.make_store, tmp_path, self.meters)
        try:
            yield factory
        finally:
            factory.close_all()

    @pytest.fixture
    def store(self, store_factory: StoreFactory) -> Store:
        return store_factory.open()

    def _require_persistence(self) -> None:
        if not self.persistent:
            pytest.skip("this store keeps nothing across reopening")

    # -- the protocol ---------------------------------------------------------------------

    def test_implements_the_store_protocol(self, store: Store) -> None:
        assert isinstance(store, Store)
        assert isinstance(store.url, str) and store.url

    def test_fresh_store_is_empty(self, store: Store) -> None:
        for spec in self.meters:
            assert scan_all(store, spec.name, "org_a") == []

    # -- append ---------------------------------------------------------------------------

    def test_append_returns_exactly_the_new_events(self, store: Store) -> None:
        batch = [_event("a", time=T0 + 5), _event("b", time=T0 + 1), _event("c", org="org_b")]
        assert _sorted_norm(store.append(batch)) == _sorted_norm(batch)
        more = [_event("a", values={"total": 99}), _event("d"), _event("b")]
        assert [normalized(e) for e in store.append(more)] == [normalized(more[1])]
        assert store.append([]) == []

    def test_duplicate_in_a_later_batch_is_not_stored_again(self, store: Store) -> None:
        first = [_event("a", values={"total": 1}), _event("b", values={"total": 2})]
        store.append(first)
        again = [_event("a", values={"total": 50}, time=T0 + 9), _event("c")]
        assert [e.id for e in store.append(again)] == ["c"]
        # The first write wins: the later copy of "a" changed nothing.
        stored = scan_all(store, SUITE_METER.name, "org_a")
        assert _sorted_norm(stored) == _sorted_norm([*first, again[1]])

    def test_duplicate_within_one_batch_is_stored_once(self, store: Store) -> None:
        a1 = _event("a", values={"total": 1})
        a2 = _event("a", values={"total": 7}, time=T0 + 60)
        b = _event("b")
        new = store.append([a1, b, a2, b])
        assert [normalized(e) for e in new] == [normalized(a1), normalized(b)]
        assert _sorted_norm(scan_all(store, SUITE_METER.name, "org_a")) == _sorted_norm([a1, b])

    def test_same_id_in_two_meters_is_two_events(self, store: Store) -> None:
        mine = _event("shared", values={"total": 3})
        theirs = _event("shared", meter=COMPLETIONS.name, values={"input_tokens": 3})
        assert len(store.append([mine, theirs])) == 2
        assert _sorted_norm(scan_all(store, SUITE_METER.name, "org_a")) == [normalized(mine)]
        assert _sorted_norm(scan_all(store, COMPLETIONS.name, "org_a")) == [normalized(theirs)]

    def test_ids_are_unique_per_organization_and_meter(self, store: Store) -> None:
        # One organization using an id first must not swallow another's event of that id.
        first = _event("x", org="org_a", values={"total": 1})
        theirs = _event("x", org="org_b", values={"total": 2})
        assert len(store.append([first])) == 1
        assert [normalized(e) for e in store.append([theirs])] == [normalized(theirs)]
        assert store.append([_event("x", org="org_b", values={"total": 2})]) == []
        assert _sorted_norm(scan_all(store, SUITE_METER.name, "org_a")) == [normalized(first)]
        assert _sorted_norm(scan_all(store, SUITE_METER.name, "org_b")) == [normalized(theirs)]

    def test_same_id_for_two_organizations_in_one_batch(self, store: Store) -> None:
        a, b = _event("y", org="org_a"), _event("y", org="org_b", values={"total": 5})
        assert _sorted_norm(store.append([a, b, a])) == _sorted_norm([a, b])

    def test_get_events_reads_stored_copies_of_one_organization(self, store: Store) -> None:
        mine = _event("g", values={"total": 3}, dims={"region": "eu"})
        theirs = _event("g", org="org_b", values={"total": 4})
        store.append([mine, theirs, _event("h")])
        got = store.get_events(SUITE_METER.name, "org_a", ["g", "missing", "g"])
        assert [normalized(e) for e in got] == [normalized(mine)]
        got_b = store.get_events(SUITE_METER.name, "org_b", ["g", "h"])
        assert [normalized(e) for e in got_b] == [normalized(theirs)]
        assert store.get_events(SUITE_METER.name, "org_a", []) == []
        assert store.get_events(COMPLETIONS.name, "org_a", ["g"]) == []

    def test_meter_reports_conflicts_and_keeps_the_stored_event(
        self, store_factory: StoreFactory
    ) -> None:
        from meterkit.errors import EventConflict
        from meterkit.meter import Meter

        meter = Meter(store=store_factory.open(), meters=self.meters, clock=lambda: T0 + DAY)
        kept = _event("c1", values={"total": 1, "peak": 2}, dims={"region": "eu"})
        assert meter.record_many([kept]).accepted == 1
        same = attrs.evolve(kept, dimensions={"region": "eu", "tier": None})
        other_time = attrs.evolve(kept, time=kept.time + 1)
        other_value = attrs.evolve(kept, values={"total": 2, "peak": 2})
        other_dim = attrs.evolve(kept, dimensions={"region": "us"})
        other_org = attrs.evolve(kept, organization_id="org_b", values={"total": 9})
        result = meter.record_many([same, other_time, other_value, other_dim, other_org])
        assert result.statuses == ("duplicate", "conflict", "conflict", "conflict", "accepted")
        assert (result.accepted, result.duplicates, result.conflicts) == (1, 1, ("c1",) * 3)
        # In one batch: the first copy is the reference for the later ones.
        batch = [
            _event("c2", values={"total": 1}),
            _event("c2", values={"total": 1}),
            _event("c2", values={"total": 8}),
        ]
        assert meter.record_many(batch).statuses == ("accepted", "duplicate", "conflict")
        with pytest.raises(EventConflict) as caught:
            meter.record(
                SUITE_METER.name,
                {"total": 5},
                organization_id="org_a",
                time=kept.time,
                id="c1",
                dimensions={"region": "eu"},
            )
        assert caught.value.field == "id" and caught.value.ids == ("c1",)
        stored = {e.id: normalized(e) for e in scan_all(meter.store, SUITE_METER.name, "org_a")}
        assert stored == {"c1": normalized(kept), "c2": normalized(batch[0])}

    def test_every_valid_string_round_trips(self, store: Store) -> None:
        # What validation lets through, the store must keep exactly (and find by).
        texts = ["Ω≈ç√", "'; DROP TABLE x; --", "q\"uo'te", "🦄 astral", "\u202eRTL", "x" * 256]
        events = [
            _event(t, org=t, values={"total": i + 1}, dims={"region": t})
            for i, t in enumerate(texts)
        ]
        assert _sorted_norm(store.append(events)) == _sorted_norm(events)
        assert store.append(events) == []
        for e in events:
            assert [
                normalized(g) for g in scan_all(store, SUITE_METER.name, e.organization_id)
            ] == [normalized(e)]
            got = store.get_events(SUITE_METER.name, e.organization_id, [e.id])
            assert [normalized(g) for g in got] == [normalized(e)]

    def test_meter_refuses_unstorable_strings_before_the_store(
        self, store_factory: StoreFactory
    ) -> None:
        from meterkit.errors import ValidationError
        from meterkit.meter import Meter

        meter = Meter(store=store_factory.open(), meters=self.meters, clock=lambda: T0 + DAY)
        for bad in ("a\x00b", "\ud800", "x" * 257, ""):
            for event in (
                _event(bad),
                _event("ok", org=bad),
                _event("ok", dims={"region": bad}),
            ):
                with pytest.raises(ValidationError):
                    meter.record_many([_event("fine"), event])
        assert scan_all(meter.store, SUITE_METER.name, "org_a") == []

    def test_records_with_unstorable_text_are_refused_by_every_store(self, store: Store) -> None:
        from meterkit.errors import ValidationError

        store.put_record("plan", "kept", {"name": "Ω 🦄 'quoted'", "nested": [{"a": "b"}]})
        for bad in ({"name": "a\x00b"}, {"name": "\ud800"}, {"n": [{"x\udfff": 1}]}):
            with pytest.raises(ValidationError):
                store.put_record("plan", "bad", bad)
        with pytest.raises(ValidationError):
            store.put_record("plan", "bad\x00key", {})
        assert store.get_record("plan", "bad") is None
        assert [k for k, _ in store.list_records("plan")] == ["kept"]
        assert store.get_record("plan", "kept") == {
            "name": "Ω 🦄 'quoted'",
            "nested": [{"a": "b"}],
        }

    def test_a_hold_of_a_known_id_is_replaced(self, store: Store) -> None:
        from meterkit.models import CounterLine, Hold

        first = Hold("lease", "org", (("t", 7),), T0 + 5)
        store.counters_apply([CounterLine("t", 7)], now=T0, hold=first)
        again = Hold("lease", "org", (("t", 4),), T0 + 50)
        assert store.counters_apply([CounterLine("t", -3)], now=T0 + 1, hold=again).admitted
        store.counters_apply([], now=T0 + 5)
        assert store.counters_read(["t"], now=T0 + 5) == [4]
        store.counters_apply([], now=T0 + 50)
        assert store.counters_read(["t"], now=T0 + 50) == [0]

    def test_counters_never_pass_the_bound(self, store: Store) -> None:
        from meterkit.counters import MAX_COUNTER
        from meterkit.models import CounterLine

        assert store.counters_apply([CounterLine("big", MAX_COUNTER)], now=T0).admitted
        lines = [CounterLine("small", 1, 10), CounterLine("big", 1)]
        assert not store.counters_apply(lines, now=T0).admitted
        assert store.counters_read(["big", "small"], now=T0) == [MAX_COUNTER, 0]
        assert store.counters_add([("big", MAX_COUNTER)], now=T0) == [MAX_COUNTER]
        assert store.counters_add([("big", -2 * MAX_COUNTER)], now=T0) == [0]

    def test_idempotent_across_reopen(self, store_factory: StoreFactory) -> None:
        self._require_persistence()
        store = store_factory.open()
        batch = [_event(f"e{i}", time=T0 + i * 611) for i in range(20)]
        assert len(store.append(batch)) == 20
        store = store_factory.reopen(store)
        extra = _event("e20")
        assert [e.id for e in store.append([*batch, extra])] == ["e20"]
        store = store_factory.reopen(store)
        assert store.append(batch) == []
        assert _sorted_norm(scan_all(store, SUITE_METER.name, "org_a")) == _sorted_norm(
            [*batch, extra]
        )

    def _assert_all_or_nothing(
        self, store_factory: StoreFactory, make_bad: Callable[[], Event]
    ) -> None:
        store = store_factory.fresh()
        good = [
            _event("g1", time=T0 + 1),
            _event("g2", meter=COMPLETIONS.name, values={"input_tokens": 4}),
            _event("g3", time=T0 + 2),
        ]
        before = _event("before")
        store.append([before])
        try:
            store.append([*good, make_bad()])
        except Exception:
            # It failed: nothing of the batch may be visible, and the store must still work.
            # Meters are ensured again first, as Meter does before every append and query: a
            # store may forget what a rolled-back transaction could have created.
            for spec in self.meters:
                store.ensure_meter(spec)
            assert [str(e.id) for e in scan_all(store, SUITE_METER.name, "org_a")] == ["before"]
            assert scan_all(store, COMPLETIONS.name, "org_a") == []
            assert _sorted_norm(store.append(good)) == _sorted_norm(good)
        else:
            # It succeeded: then all of the good events are stored, not some.
            assert store.append(good) == []
            ids = {str(e.id) for e in scan_all(store, SUITE_METER.name, "org_a")}
            assert {"before", "g1", "g3"} <= ids
            assert [str(e.id) for e in scan_all(store, COMPLETIONS.name, "org_a")] == ["g2"]

    def test_batch_is_all_or_nothing_when_a_meter_was_never_ensured(
        self, store_factory: StoreFactory
    ) -> None:
        self._assert_all_or_nothing(store_factory, lambda: _event("bad", meter="never_ensured"))

    def test_batch_is_all_or_nothing_when_an_id_is_unusable(
        self, store_factory: StoreFactory
    ) -> None:
        self._assert_all_or_nothing(store_factory, lambda: _event(_UnusableId("bad")))

    def test_batch_is_all_or_nothing_when_values_cannot_be_read(
        self, store_factory: StoreFactory
    ) -> None:
        def bad() -> Event:
            return Event("bad", SUITE_METER.name, "org_a", T0 + 3, _UnreadableValues(), {})

        self._assert_all_or_nothing(store_factory, bad)

    # -- scan -----------------------------------------------------------------------------

    def test_scan_is_half_open_and_per_organization_and_meter(self, store: Store) -> None:
        start, end = T0 + 3600, T0 + 7200
        times = [start - 1, start, start + 1, end - 1, end, end + 1]
        events = [_event(f"t{t}", time=t) for t in times]
        other_org = [_event(f"o{t}", org="org_b", time=t) for t in times]
        other_meter = [
            _event(f"m{t}", meter=COMPLETIONS.name, values={"input_tokens": 1}, time=t)
            for t in times
        ]
        store.append([*events, *other_org, *other_meter])
        got = list(store.scan(SUITE_METER.name, "org_a", start, end))
        want = [e for e in events if start <= e.time < end]
        assert len(want) == 3
        assert _sorted_norm(got) == _sorted_norm(want)
        assert list(store.scan(SUITE_METER.name, "org_c", 0, _END_OF_TIME)) == []
        assert list(store.scan(SUITE_METER.name, "org_a", start, start)) == []

    def test_dimensions_round_trip(self, store: Store) -> None:
        events = [
            _event("t", dims={"flag": True, "region": "north", "tier": "pro"}),
            _event("f", dims={"flag": False, "region": None}),
            _event("n", dims={"flag": None, "tier": None}),
            _event("empty"),
            _event(
                "c",
                meter=COMPLETIONS.name,
                values={"input_tokens": 1},
                dims={"batch": False, "model": "gpt-4o", "user_id": None},
            ),
        ]
        store.append(events)
        got = {e.id: e for e in scan_all(store, SUITE_METER.name, "org_a")}
        assert got["t"].dimensions["flag"] is True
        assert got["f"].dimensions["flag"] is False
        assert got["t"].dimensions["region"] == "north"
        for eid, name in (("f", "region"), ("n", "flag"), ("n", "tier"), ("empty", "flag")):
            assert got[eid].dimensions.get(name) is None
        (completion,) = scan_all(store, COMPLETIONS.name, "org_a")
        assert completion.dimensions["batch"] is False
        assert completion.dimensions.get("user_id") is None
        assert _sorted_norm(got.values()) == _sorted_norm(events[:4])

    def test_numbers_keep_their_type(self, store: Store) -> None:
        values: dict[str, Number] = {
            "total": 3,
            "calls": 3.0,
            "peak": 2**53 - 1,
            "low": 0,
            "last": 0.1,
            "level": 0.0,
        }
        store.append([_event("n", values=values)])
        (got,) = scan_all(store, SUITE_METER.name, "org_a")
        assert {k: (type(v), v) for k, v in got.values.items()} == {
            k: (type(v), v) for k, v in values.items()
        }

    # -- aggregate ------------------------------------------------------------------------

    def _check_query(
        self,
        store: Store,
        spec: MeterSpec,
        query: UsageQuery,
        appended: Sequence[Event],
        context: str,
    ) -> Rows:
        want = engine.aggregate(spec, query, appended)
        if timeweighted.names(spec):
            # What the window's events cannot tell alone: the values carried into it.
            got = integrals.time_weighted_rows(store, spec, query)
            assert_rows_match(got, want, spec, f"{context}, time-weighted")
            return want
        scanned = list(
            store.scan(spec.name, query.organization_id, query.scan_start, query.page_end)
        )
        assert_rows_match(engine.aggregate(spec, query, scanned), want, spec, f"{context}, scan")
        native = store.aggregate(spec, query)
        if native is not None:
            assert_rows_match(native, want, spec, f"{context}, native aggregate")
        return want

    @pytest.mark.parametrize("width", ["1m", "1h", "1d"])
    @pytest.mark.parametrize("shape", sorted(_AGGREGATE_SHAPES))
    def test_aggregate_equals_the_engine(self, store: Store, width: str, shape: str) -> None:
        events = _deterministic_events()
        store.append(events)
        params = dict(_AGGREGATE_SHAPES[shape])
        if isinstance(params.get("limit"), dict):
            params["limit"] = params["limit"][width]
        # Starts 30 s into a minute: the first bucket of every width is partial.
        query = make_query(
            SUITE_METER, org="org_a", start=T0 + 30, end=T0 + 2 * DAY + 100, width=width, **params
        )
        want = self._check_query(store, SUITE_METER, query, events, f"{shape} {width}")
        assert want, "the data set should put events in this window"

    @pytest.mark.parametrize("width", ["1m", "1h", "1d"])
    @pytest.mark.parametrize("shape", sorted(_AGGREGATE_SHAPES))
    def test_rollable_meter_equals_the_engine(self, store: Store, width: str, shape: str) -> None:
        # The same data on a meter without unique_count: a store with rollups answers it from
        # them, reading events only at the unaligned edges of the window.
        events = [
            attrs.evolve(
                e,
                meter=ROLLED_METER.name,
                values={k: v for k, v in e.values.items() if k != "distinct"},
            )
            for e in _deterministic_events()
        ]
        # Late: half the events arrive after the rest, into buckets that already have rows.
        store.append(events[1::2])
        store.append(events[::2])
        store.append(events[:40])  # and again: duplicates change nothing
        params = dict(_AGGREGATE_SHAPES[shape])
        if isinstance(params.get("limit"), dict):
            params["limit"] = params["limit"][width]
        for start, end in ((T0 + 30, T0 + 2 * DAY + 100), (T0 - 90, T0 + 3 * DAY)):
            query = make_query(
                ROLLED_METER, org="org_a", start=start, end=end, width=width, **params
            )
            want = self._check_query(store, ROLLED_METER, query, events, f"{shape} {width}")
            assert want, "the data set should put events in this window"

    def test_replaced_events_are_answered_as_the_engine_over_them(self, store: Store) -> None:
        # A correction (meterkit.corrections) puts an event in the place of another of its id:
        # rollups from that day on answer as the engine over the corrected events.
        replace = getattr(store, "replace_event", None)
        if replace is None:
            pytest.skip("this store cannot correct events")
        events = [
            attrs.evolve(
                e,
                meter=ROLLED_METER.name,
                values={k: v for k, v in e.values.items() if k != "distinct"},
            )
            for e in _deterministic_events()
        ]
        store.append(events)
        corrected = list(events)
        # The first events of both organizations, and one of each further on: each
        # correction refolds its own organization only, and the other's answers stay.
        orgs = ("org_a", "org_b")
        firsts = [next(i for i, e in enumerate(events) if e.organization_id == o) for o in orgs]
        for i in sorted({*firsts, 7, 40, 99}):
            old = corrected[i]
            new = attrs.evolve(
                old,
                values={} if i % 2 else {"total": 3, "peak": 1000.5, "last": 7},
                dimensions={**old.dimensions, "region": "c"} if i == 40 else old.dimensions,
            )
            got = replace(ROLLED_METER, new)
            assert got is not None and got.id == old.id and dict(got.values) == dict(old.values)
            corrected[i] = new
        missing = attrs.evolve(events[0], id="never-stored")
        assert replace(ROLLED_METER, missing) is None
        for width in ("1m", "1h", "1d"):
            limit = {"1m": 1440, "1h": 168, "1d": 31}[width]
            for org, group_by in itertools.product(("org_a", "org_b"), ((), ("region",))):
                query = make_query(
                    ROLLED_METER,
                    org=org,
                    start=T0,
                    end=T0 + (DAY if width == "1m" else 3 * DAY),
                    width=width,
                    group_by=group_by,
                    limit=limit,
                )
                self._check_query(store, ROLLED_METER, query, corrected, f"replaced {width}")

    def test_aggregate_of_an_empty_window_is_empty(self, store: Store) -> None:
        store.append(_deterministic_events())
        query = make_query(
            SUITE_METER, org="org_a", start=T0 + 10 * DAY, end=T0 + 11 * DAY, width="1h"
        )
        assert store_rows(store, SUITE_METER, query) == {}
        query = make_query(SUITE_METER, org="org_zzz", start=T0, end=T0 + DAY, width="1h")
        assert store_rows(store, SUITE_METER, query) == {}

    def test_aggregate_completions_with_bool_batch(self, store: Store) -> None:
        events = []
        for i in range(60):
            events.append(
                Event(
                    f"c{i}",
                    COMPLETIONS.name,
                    "org_a",
                    T0 + i * 1777,
                    {"input_tokens": 100 + i, "output_tokens": i % 9, "num_model_requests": 1},
                    {
                        "batch": (True, False, None)[i % 3],
                        "model": ("gpt-4o", "o1")[i % 2],
                        "project_id": "proj_a" if i % 4 else None,
                    },
                )
            )
        store.append(events)
        cases: list[dict[str, Any]] = [
            {"filters": {"batch": [False]}, "group_by": ("model", "project_id")},
            {"filters": {"batch": [True]}},
            {"group_by": ("batch",)},
            {"filters": {"batch": [None, True], "project_id": ["proj_a"]}, "group_by": ("model",)},
        ]
        for width in ("1h", "1d"):
            for params in cases:
                query = make_query(
                    COMPLETIONS, org="org_a", start=T0 + 7, end=T0 + 2 * DAY, width=width, **params
                )
                want = self._check_query(store, COMPLETIONS, query, events, f"{params} {width}")
                assert want
        # Independent check of one number: non-batch input tokens over the whole range.
        query = make_query(
            COMPLETIONS,
            org="org_a",
            start=T0,
            end=T0 + 3 * DAY,
            width="1d",
            filters={"batch": [False]},
        )
        rows = store_rows(store, COMPLETIONS, query)
        total = sum(v["input_tokens"] or 0 for v in rows.values())
        assert total == sum(100 + i for i in range(60) if i % 3 == 1)

    def test_aggregate_vector_stores_gauge(self, store: Store) -> None:
        # Two projects, each reporting its size several times a day: a day's figure is the
        # sum of each project's latest report in that day, not the sum of all reports.
        reports = [
            ("p1", T0 + 100, 10),
            ("p1", T0 + 5000, 30),
            ("p2", T0 + 200, 7),
            ("p1", T0 + DAY + 1, 5),
            ("p2", T0 + DAY + 50, 8),
            ("p2", T0 + 2 * DAY - 1, 2),
        ]
        events = [
            Event(f"v{i}", VECTOR_STORES.name, "org_a", t, {"usage_bytes": b}, {"project_id": p})
            for i, (p, t, b) in enumerate(reports)
        ]
        store.append(events)
        query = make_query(VECTOR_STORES, org="org_a", start=T0, end=T0 + 2 * DAY, width="1d")
        rows = self._check_query(store, VECTOR_STORES, query, events, "vector_stores 1d")
        assert rows == {(T0, ()): {"usage_bytes": 37}, (T0 + DAY, ()): {"usage_bytes": 7}}
        got = store_rows(store, VECTOR_STORES, query)
        assert {k: v["usage_bytes"] for k, v in got.items()} == {(T0, ()): 37, (T0 + DAY, ()): 7}

    def test_time_weighted_gauge_integrates_across_buckets_and_windows(self, store: Store) -> None:
        # Series a: 10 from T0+600, 40 from T0+DAY+3600 (a later day, so it carries across).
        # Series b: 7 from T0+DAY-60, with an earlier event of the same second and a smaller
        # id that the later one overrides. Integrals are value x seconds.
        spec = WEIGHTED_METER
        reports = [
            ("a1", "eu", T0 + 600, 10),
            ("a2", "eu", T0 + DAY + 3600, 40),
            ("b0", "us", T0 + DAY - 60, 99),
            ("b1", "us", T0 + DAY - 60, 7),
        ]
        events = [
            Event(i, spec.name, "org_a", t, {"held": v}, {"region": r}) for i, r, t, v in reports
        ]
        store.append(events)
        query = make_query(spec, org="org_a", start=T0, end=T0 + 3 * DAY, width="1d")
        rows = self._check_query(store, spec, query, events, "time-weighted 1d")
        day0 = 10 * (DAY - 600) + 7 * 60
        day1 = 10 * 3600 + 40 * (DAY - 3600) + 7 * DAY
        day2 = 40 * DAY + 7 * DAY
        assert {k: v["held"] for k, v in rows.items()} == {
            (T0, ()): day0,
            (T0 + DAY, ()): day1,
            (T0 + 2 * DAY, ()): day2,
        }
        # A window that starts after every event still integrates what was carried into it,
        # and only over the part of its bucket inside the window.
        late = make_query(
            spec,
            org="org_a",
            start=T0 + 2 * DAY + 100,
            end=T0 + 2 * DAY + 400,
            width="1h",
            group_by=["region"],
        )
        got = store_rows(store, spec, late)
        assert {k: v["held"] for k, v in got.items()} == {
            (T0 + 2 * DAY, ("eu",)): 40 * 300,
            (T0 + 2 * DAY, ("us",)): 7 * 300,
        }
        assert got == engine.aggregate(spec, late, events)

    # -- secret ---------------------------------------------------------------------------

    def test_secret_is_long_and_stable(self, store_factory: StoreFactory) -> None:
        store = store_factory.open()
        secret = store.secret()
        assert isinstance(secret, bytes) and len(secret) >= 16
        assert store.secret() == secret
        assert store_factory.fresh().secret() != secret, "each store needs its own random key"
        if self.persistent:
            assert store_factory.reopen(store).secret() == secret

    # -- meters ---------------------------------------------------------------------------

    def test_ensure_meter_is_idempotent(self, store: Store) -> None:
        events = [_event("a"), _event("b", time=T0 + 60)]
        store.append(events)
        for _ in range(3):
            store.ensure_meter(SUITE_METER)
        assert store.append(events) == []
        assert _sorted_norm(scan_all(store, SUITE_METER.name, "org_a")) == _sorted_norm(events)
        assert len(store.append([_event("c")])) == 1

    def test_widening_a_meter_keeps_old_events_readable(self, store_factory: StoreFactory) -> None:
        v1 = MeterSpec("widening", (Measure("a"),), (Dimension("x"),))
        v2 = MeterSpec(
            "widening",
            (Measure("a"), Measure("b", "max")),
            (Dimension("x"), Dimension("y", kind="bool")),
        )
        store = store_factory.open()
        store.ensure_meter(v1)
        old = [
            Event("o1", "widening", "org_a", T0 + 10, {"a": 1}, {"x": "p"}),
            Event("o2", "widening", "org_a", T0 + 20, {"a": 2.5}, {}),
        ]
        store.append(old)
        store.ensure_meter(v2)
        assert _sorted_norm(scan_all(store, "widening", "org_a")) == _sorted_norm(old)
        new = Event("n1", "widening", "org_a", T0 + 30, {"a": 1, "b": 4}, {"x": "p", "y": True})
        assert [e.id for e in store.append([old[0], new])] == ["n1"]
        everything = [*old, new]
        assert _sorted_norm(scan_all(store, "widening", "org_a")) == _sorted_norm(everything)
        for group_by in ((), ("y",), ("x", "y")):
            query = make_query(
                v2, org="org_a", start=T0, end=T0 + DAY, width="1h", group_by=group_by
            )
            assert self._check_query(store, v2, query, everything, f"widened {group_by}")
        if self.persistent:
            store = store_factory.reopen(store)
            store.ensure_meter(v2)
            assert _sorted_norm(scan_all(store, "widening", "org_a")) == _sorted_norm(everything)

    # -- the property ---------------------------------------------------------------------

    @_store_property(80)
    @given(scenario=_scenarios(), data=st.data())
    def test_store_agrees_with_the_engine_on_random_events(
        self, store_factory: StoreFactory, scenario: _Scenario, data: st.DataObject
    ) -> None:
        store = store_factory.fresh()
        try:
            appended = _append_scenario(store, scenario)
            for _ in range(data.draw(st.integers(1, 3), label="number of queries")):
                spec = data.draw(
                    st.sampled_from((SUITE_METER, ROLLED_METER, *SUITE_METERS)), label="meter"
                )
                query = data.draw(_queries(spec, scenario.hot), label="query")
                want_events = [
                    e
                    for e in appended
                    if e.meter == spec.name
                    and e.organization_id == query.organization_id
                    and query.scan_start <= e.time < query.page_end
                ]
                scanned = store.scan(
                    spec.name, query.organization_id, query.scan_start, query.page_end
                )
                assert _sorted_norm(scanned) == _sorted_norm(want_events)
                self._check_query(store, spec, query, appended, repr(query))
        finally:
            store_factory.close(store)

    @_store_property(40)
    @given(scenario=_scenarios(), data=st.data())
    def test_dropping_old_events_keeps_hour_and_day_answers(
        self, store_factory: StoreFactory, scenario: _Scenario, data: st.DataObject
    ) -> None:
        # Retention: events before a day are dropped, with their minute rollups; hour and day
        # buckets, and anything after the day, still equal the engine over every event.
        store = store_factory.fresh()
        try:
            if not isinstance(store, RollupStore):
                pytest.skip(f"{type(store).__name__} keeps no rollups, so it drops no events")
            appended = _append_scenario(store, scenario)
            before = T0 + DAY * data.draw(st.integers(0, 3), label="days kept from")
            rolled = [spec for spec in SUITE_METERS if rollup.rollable(spec)]
            for spec in rolled:
                store.ensure_meter(spec)
                old = [e for e in appended if e.meter == spec.name and e.time < before]
                assert store.drop_events_before(spec, before) == len(old)
                assert all(bucket >= before for _, bucket, _ in store.rollup_rows(spec, 60))
                for org in ("org_a", "org_b"):
                    kept = [
                        e
                        for e in appended
                        if e.meter == spec.name and e.organization_id == org and e.time >= before
                    ]
                    assert _sorted_norm(scan_all(store, spec.name, org)) == _sorted_norm(kept)
            if data.draw(st.booleans(), label="rebuild from the day"):
                for spec in rolled:
                    store.rebuild_rollups(spec, since=before)
            for _ in range(data.draw(st.integers(1, 4), label="number of queries")):
                spec = data.draw(st.sampled_from(rolled), label="meter")
                weighted = bool(timeweighted.names(spec))
                query = data.draw(_kept_queries(spec, before, weighted), label="query")
                want = engine.aggregate(spec, query, appended)
                if weighted:
                    # Values carried from dropped days come from the day rollups.
                    got = integrals.time_weighted_rows(store, spec, query)
                    assert_rows_match(got, want, spec, f"{query!r} after dropping to {before}")
                    continue
                native = store.aggregate(spec, query)
                assert native is not None, "a store with rollups answers from them"
                assert_rows_match(native, want, spec, f"{query!r} after dropping to {before}")
        finally:
            store_factory.close(store)
