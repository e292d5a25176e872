"""What the conformance suites share: the meters, the helpers, the hypothesis strategies."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from meterkit import engine, integrals
from meterkit.catalog import builtin_meters
from meterkit.engine import timeweighted
from meterkit.engine.aggregate import Rows
from meterkit.models import Dimension, DimValue, Event, Measure, MeterSpec, Number, UsageQuery
from meterkit.stores.base import Store
from meterkit.validate import BUCKET_WIDTHS, MAX_TIME, check_event, check_usage_query

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

END_OF_TIME = MAX_TIME + 1
STR_VALUES = ("a", "b", "c")


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


def sorted_norm(events: Iterable[Event]) -> list[tuple[Any, ...]]:
    return sorted((normalized(e) for e in events), key=repr)


def scan_all(store: Store, meter: str, org: str) -> list[Event]:
    return list(store.scan(meter, org, 0, END_OF_TIME))


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


def numbers_match(aggregation: str, got: object, want: Number | None) -> bool:
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
            assert numbers_match(measure.aggregation, actual, expected), (
                f"{measure.name} ({measure.aggregation}{', gauge' if measure.gauge else ''}) "
                f"of row {key}{where}: store says {actual!r}, engine says {expected!r}"
            )


def suite_event(
    id: str,
    *,
    meter: str = SUITE_METER.name,
    org: str = "org_a",
    time: int = T0,
    values: Mapping[str, Number] | None = None,
    dims: Mapping[str, DimValue] | None = None,
) -> Event:
    return Event(id, meter, org, time, dict(values or {"total": 1}), dict(dims or {}))


class InjectedFault(RuntimeError):
    """Raised on purpose inside an append, standing in for a disk or connection failure."""


class UnusableId(str):
    """An id that cannot be hashed or compared: a store that looks at it has to fail."""

    def __hash__(self) -> int:
        raise InjectedFault("this id cannot be hashed")

    def __eq__(self, other: object) -> bool:
        raise InjectedFault("this id cannot be compared")

    def __ne__(self, other: object) -> bool:
        raise InjectedFault("this id cannot be compared")


class UnreadableValues(Mapping[str, Number]):
    """A values mapping that fails when a store reads it."""

    def __getitem__(self, key: str) -> Number:
        raise InjectedFault("values cannot be read")

    def __iter__(self) -> Iterator[str]:
        raise InjectedFault("values cannot be read")

    def __len__(self) -> int:
        raise InjectedFault("values cannot be read")


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


def any_time() -> st.SearchStrategy[int]:
    # Half the times sit on or next to a minute / hour / day boundary, where off-by-one
    # bucketing would show; the rest are spread over three days.
    boundary = st.builds(
        lambda unit, k, nudge: T0 + (k * unit) % (3 * DAY) + nudge,
        st.sampled_from((60, 3600, DAY)),
        st.integers(0, 3 * 24 * 60),
        st.sampled_from((-1, 0, 0, 1)),
    )
    return st.one_of(boundary, st.integers(T0 - 60, T0 + 3 * DAY + 60))


def any_number(fractional: bool = True) -> st.SearchStrategy[Number]:
    ints = st.integers(0, 20)
    if not fractional:
        return ints
    few_floats = st.one_of(
        st.sampled_from((0.5, 2.0, 7.25)),
        st.floats(min_value=0, max_value=100, allow_nan=False, allow_infinity=False),
    )
    return st.one_of(ints, ints, ints, few_floats)


def any_dim_value(dim: Dimension) -> st.SearchStrategy[DimValue]:
    if dim.kind == "bool":
        return st.sampled_from((True, False, None))
    # Two values (and None) keep series few, so they repeat within a bucket.
    choices = sorted(dim.allowed) if dim.allowed is not None else list(STR_VALUES[:2])
    return st.sampled_from([*choices, None])


def any_values(spec: MeterSpec) -> st.SearchStrategy[dict[str, Number]]:
    # Each measure is present three times in four, so rows usually hold several values.
    def maybe(m: Measure) -> st.SearchStrategy[Number | None]:
        number = any_number(m.fractional)
        return st.one_of(st.none(), number, number, number)

    return st.fixed_dictionaries({m.name: maybe(m) for m in spec.measures}).map(
        lambda values: summed(spec, {k: v for k, v in values.items() if v is not None})
    )


def summed(spec: MeterSpec, values: dict[str, Number]) -> dict[str, Number]:
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


def any_event(spec: MeterSpec, times: st.SearchStrategy[int]) -> st.SearchStrategy[Event]:
    return st.builds(
        Event,
        id=st.sampled_from([f"e{i}" for i in range(40)]),
        meter=st.just(spec.name),
        organization_id=st.sampled_from(("org_a", "org_a", "org_b")),
        time=times,
        values=any_values(spec),
        dimensions=st.fixed_dictionaries(
            {}, optional={d.name: any_dim_value(d) for d in spec.dimensions}
        ),
    )


@attrs.frozen
class Scenario:
    """Append batches, and the hot times their events cluster around (queries cut there)."""

    hot: tuple[int, ...]
    batches: tuple[tuple[Event, ...], ...]


def near(hot: Sequence[int]) -> st.SearchStrategy[int]:
    return st.builds(
        lambda t, d: t + d, st.sampled_from(hot), st.sampled_from((0, 0, -1, 1, 30, 59))
    )


@st.composite
def any_scenario(draw: st.DrawFn) -> Scenario:
    # A few hot times shared by many events put several events in one bucket and one series,
    # where latest, gauges, max and unique counts tell apart from a plain sum.
    hot = tuple(draw(st.lists(any_time(), min_size=1, max_size=3)))
    times = st.one_of(near(hot), near(hot), any_time())
    meters = st.sampled_from((SUITE_METER, ROLLED_METER, *SUITE_METERS))
    events = meters.flatmap(lambda spec: any_event(spec, times))
    batches = []
    for _ in range(draw(st.integers(1, 3), label="number of batches")):
        size = draw(st.integers(0, 40), label="batch size")
        # Ids repeat within and across batches (40 ids, up to 120 events).
        batches.append(tuple(draw(events) for _ in range(size)))
    return Scenario(hot, tuple(batches))


@st.composite
def any_query(draw: st.DrawFn, spec: MeterSpec, hot: Sequence[int]) -> UsageQuery:
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
        start, end = sorted((draw(near(hot)), draw(near(hot))))
        end = max(end, start + 1)
        limit, page = max_limit, 0
    else:
        start = draw(any_time())
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
        filters[name] = draw(st.lists(any_dim_value(dim), min_size=1, max_size=3))
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


def append_scenario(store: Store, scenario: Scenario) -> list[Event]:
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
def any_kept_query(
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
        filters[name] = draw(st.lists(any_dim_value(dim), min_size=1, max_size=2))
    return make_query(
        spec,
        org=draw(st.sampled_from(("org_a", "org_b"))),
        start=start,
        end=end,
        width=width,
        group_by=group_by,
        filters=filters,
    )


def store_property(examples: int) -> settings:
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


def deterministic_events() -> list[Event]:
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
            dims["region"] = STR_VALUES[i % 3]
        if i % 5:
            dims["tier"] = ("free", "pro")[i % 2]
        if i % 3:
            dims["flag"] = (True, False, None)[i % 3]
        org = "org_b" if i % 7 == 0 else "org_a"
        events.append(Event(f"ev{i}", SUITE_METER.name, org, T0 + offset, values, dims))
    return events


AGGREGATE_SHAPES: dict[str, dict[str, Any]] = {
    "everything": {},
    "group_by_region_and_flag": {"group_by": ("region", "flag")},
    "filter_with_none": {"filters": {"region": [None, "b"]}, "group_by": ("tier",)},
    "filter_bool_false": {"filters": {"flag": [False]}, "group_by": ("region",)},
    "filter_bool_true_or_none": {"filters": {"flag": [True, None], "tier": ["pro"]}},
    "group_by_every_dimension": {"group_by": ("tier", "flag", "region")},
    # Limits chosen so that the second page of each width still holds events.
    "second_page": {"page": 1, "limit": {"1m": 1440, "1h": 24, "1d": 1}, "group_by": ("flag",)},
}
