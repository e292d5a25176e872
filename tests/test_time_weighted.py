"""Time-weighted gauges and gauges priced over time (vector stores in gibibyte-hours).

The engine is checked second by second against a brute-force integral; every store is held
to the engine by the conformance suite (``WEIGHTED_METER``) and here through costs, with
corrections and retention, exactly in ``Decimal``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import services
from clock import Clock
from meterkit import Event, Measure, Meter, MeterSpec, Metric, ValidationError, engine
from meterkit.engine import timeweighted
from meterkit.models import Dimension, UsageQuery
from meterkit.pricing import GIBIBYTE_HOUR, Price, amount

_EXAMPLES = itertools.count()
DAY = 86_400
MONTH = 1_764_547_200  # 2025-12-01T00:00:00Z
GIB = 2**30

DISK = MeterSpec(
    "disk",
    measures=(Measure("bytes", "time_weighted"), Measure("writes")),
    dimensions=(Dimension("volume"), Dimension("zone")),
)


def query(
    start: int,
    end: int,
    width: int = DAY,
    group_by: tuple[str, ...] = (),
    filters: tuple[tuple[str, tuple[Any, ...]], ...] = (),
    limit: int = 100,
    page_start: int | None = None,
    spec: MeterSpec = DISK,
) -> UsageQuery:
    name = {60: "1m", 3600: "1h", DAY: "1d"}[width]
    first = start - start % width if page_start is None else page_start
    return UsageQuery(spec.name, "org", start, end, name, width, group_by, filters, limit, first)


def ev(i: str, t: int, v: int | float, volume: str = "a", **dims: Any) -> Event:
    return Event(i, DISK.name, "org", t, {"bytes": v}, {"volume": volume, **dims})


# -- the engine, by hand ---------------------------------------------------------------------


def test_a_value_holds_until_the_next_and_across_bucket_edges() -> None:
    events = [ev("1", MONTH + 3600, 100), ev("2", MONTH + DAY + 7200, 300)]
    rows = engine.aggregate(DISK, query(MONTH, MONTH + 3 * DAY), events)
    assert rows == {
        (MONTH, ()): {"bytes": 100 * (DAY - 3600), "writes": 0},
        (MONTH + DAY, ()): {"bytes": 100 * 7200 + 300 * (DAY - 7200), "writes": 0},
        (MONTH + 2 * DAY, ()): {"bytes": 300 * DAY, "writes": 0},
    }


def test_a_value_from_before_the_window_carries_in_and_the_window_cuts_its_bucket() -> None:
    events = [ev("1", MONTH - 10 * DAY, 5), ev("2", MONTH + 100, 9, volume="b")]
    rows = engine.aggregate(DISK, query(MONTH + 50, MONTH + 250, 60, group_by=("volume",)), events)
    assert rows == {
        (MONTH, ("a",)): {"bytes": 5 * 10, "writes": 0},  # [50, 60)
        # b has no value in [50, 60): no row
        (MONTH + 60, ("a",)): {"bytes": 5 * 60, "writes": 0},
        (MONTH + 60, ("b",)): {"bytes": 9 * 20, "writes": 0},  # from 100
        (MONTH + 120, ("a",)): {"bytes": 5 * 60, "writes": 0},
        (MONTH + 120, ("b",)): {"bytes": 9 * 60, "writes": 0},
        (MONTH + 180, ("a",)): {"bytes": 5 * 60, "writes": 0},
        (MONTH + 180, ("b",)): {"bytes": 9 * 60, "writes": 0},
        (MONTH + 240, ("a",)): {"bytes": 5 * 10, "writes": 0},  # [240, 250)
        (MONTH + 240, ("b",)): {"bytes": 9 * 10, "writes": 0},
    }


def test_series_are_summed_and_filtered_and_ties_go_to_the_greatest_id() -> None:
    events = [
        ev("a1", MONTH, 10, zone="x"),
        ev("b1", MONTH, 20, volume="b", zone="y"),
        ev("b2", MONTH + 600, 1, volume="b", zone="y"),
        ev("b3", MONTH + 600, 2, volume="b", zone="y"),  # same second, greater id: it holds
    ]
    rows = engine.aggregate(DISK, query(MONTH, MONTH + 3600, 3600), events)
    assert rows[(MONTH, ())]["bytes"] == 10 * 3600 + 20 * 600 + 2 * 3000
    only_y = engine.aggregate(
        DISK, query(MONTH, MONTH + 3600, 3600, filters=(("zone", ("y",)),)), events
    )
    assert only_y[(MONTH, ())]["bytes"] == 20 * 600 + 2 * 3000


def test_no_value_no_row_and_other_measures_keep_their_own_rows() -> None:
    events = [
        Event("w", DISK.name, "org", MONTH + 10, {"writes": 3}, {"volume": "a"}),
        ev("1", MONTH + DAY + 5, 7),
    ]
    rows = engine.aggregate(DISK, query(MONTH, MONTH + 2 * DAY), events)
    assert rows == {
        (MONTH, ()): {"bytes": 0, "writes": 3},
        (MONTH + DAY, ()): {"bytes": 7 * (DAY - 5), "writes": 0},
    }


def test_fractional_gauges_integrate_as_floats() -> None:
    spec = MeterSpec("cpu", [Measure("cores", "time_weighted", fractional=True)])
    events = [Event("1", "cpu", "org", MONTH, {"cores": 0.5})]
    rows = engine.aggregate(spec, query(MONTH, MONTH + 60, 60, spec=spec), events)
    assert rows == {(MONTH, ()): {"cores": 30.0}}


def test_a_time_weighted_measure_is_a_gauge_and_costs_read_gauges_time_weighted() -> None:
    assert Measure("x", "time_weighted").gauge is True
    plain = MeterSpec("v", [Measure("usage_bytes", gauge=True), Measure("n")])
    read = timeweighted.reading(plain, ["usage_bytes"])
    assert [m.aggregation for m in read.measures] == ["time_weighted", "sum"]
    assert timeweighted.names(read) == ("usage_bytes",)


# -- the engine against a brute-force integral -------------------------------------------------

_STEPS = st.lists(
    st.tuples(
        st.integers(-300, 900),  # seconds after MONTH: some before the window
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 50),
        st.sampled_from(["x", "y"]),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(
    steps=_STEPS,
    start=st.integers(0, 600),
    length=st.integers(1, 600),
    width=st.sampled_from([60, 3600]),
    grouped=st.booleans(),
)
def test_the_engine_integrates_like_summing_every_second(
    steps: list[tuple[int, str, int, str]], start: int, length: int, width: int, grouped: bool
) -> None:
    events = [
        Event(f"e{i}", DISK.name, "org", MONTH + t, {"bytes": v}, {"volume": vol, "zone": zone})
        for i, (t, vol, v, zone) in enumerate(steps)
    ]
    low, high = MONTH + start, MONTH + start + length
    group_by = ("zone",) if grouped else ()
    rows = engine.aggregate(DISK, query(low, high, width, group_by=group_by), events)

    # Second by second: each series holds its latest (time, id) value at or before that second.
    want: dict[tuple[int, tuple[Any, ...]], int] = {}
    series = {(e.dimensions["volume"], e.dimensions["zone"]) for e in events}
    for key in series:
        mine = sorted(
            (e.time, e.id, e.values["bytes"])
            for e in events
            if (e.dimensions["volume"], e.dimensions["zone"]) == key
        )
        for second in range(low, high):
            held = [v for t, _i, v in mine if t <= second]
            if held:
                row = (second - second % width, (key[1],) if grouped else ())
                want[row] = want.get(row, 0) + held[-1]
    assert {k: v["bytes"] for k, v in rows.items()} == want


# -- costs on every store: vector stores in gibibyte-hours ------------------------------------

VECTOR_PRICE = Price(
    "vector_stores",
    "usage_bytes",
    "0.10",
    per=GIBIBYTE_HOUR * 24,
    quantity_per=GIBIBYTE_HOUR,
    line_item="vector stores",
    quantity_unit="gibibyte_hours",
)


@pytest.fixture(scope="module", params=["memory", "sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from services.store_urls(request.param, tmp_path_factory.mktemp("tw"), "tw")


_SNAPSHOTS = st.lists(
    st.tuples(
        st.integers(-2 * DAY, 5 * DAY),  # seconds after MONTH
        st.sampled_from(["proj_a", "proj_b"]),
        st.integers(0, 5 * GIB),
    ),
    min_size=1,
    max_size=15,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    snapshots=_SNAPSHOTS,
    fixes=st.lists(st.tuples(st.integers(0, 14), st.integers(0, 5 * GIB) | st.none()), max_size=3),
    start=st.integers(0, 2 * DAY),
)
def test_vector_store_costs_are_the_engine_integral_priced_exactly(
    url: str,
    snapshots: list[tuple[int, str, int]],
    fixes: list[tuple[int, int | None]],
    start: int,
) -> None:
    end = MONTH + 5 * DAY
    with Meter(url, clock=Clock(end + DAY)) as m:
        # One organization per example: hypothesis may draw an example twice, and the module's
        # shared store would then still hold the first run's corrections.
        org = f"org_{next(_EXAMPLES)}"
        m.set_price(VECTOR_PRICE)
        spec = m.meters["vector_stores"]
        events = {
            f"v{i}": Event(
                f"v{i}",
                "vector_stores",
                org,
                MONTH + t,
                {"usage_bytes": size},
                {"project_id": project},
            )
            for i, (t, project, size) in enumerate(snapshots)
        }
        m.record_many(list(events.values()))
        for index, size in fixes:
            key = f"v{index % len(snapshots)}"
            old = events[key]
            if not old.values:
                continue  # voided already
            if size is None:
                m.void("vector_stores", org, key, reason="wrong", actor="ops")
                events[key] = Event(old.id, old.meter, org, old.time, {}, old.dimensions)
            elif size != old.values.get("usage_bytes"):
                m.amend(
                    "vector_stores", org, key, values={"usage_bytes": size}, reason="r", actor="o"
                )
                events[key] = Event(
                    old.id, old.meter, org, old.time, {"usage_bytes": size}, old.dimensions
                )
        low = MONTH + start
        page = m.costs(
            organization_id=org,
            start_time=low,
            end_time=end,
            group_by=["line_item", "project_id"],
            limit=10,
        )
        reading = timeweighted.reading(spec, ["usage_bytes"])
        q = UsageQuery(
            "vector_stores", org, low, end, "1d", DAY, ("project_id",), (), 10, low - low % DAY
        )
        integrals = engine.aggregate(reading, q, list(events.values()))
        want = {
            (day, project): v["usage_bytes"]
            for (day, (project,)), v in integrals.items()
            if v["usage_bytes"]
        }
        got = {(b.start_time, r.project_id): r for b in page.data for r in b.results}
        assert set(got) == set(want)
        for key, integral in want.items():
            result = got[key]
            assert result.amount == amount(integral, Decimal("0.10"), GIBIBYTE_HOUR * 24)
            assert result.quantity == amount(integral, Decimal(1), GIBIBYTE_HOUR)
            assert (result.line_item, result.quantity_unit) == ("vector stores", "gibibyte_hours")


def test_gib_hours_and_amounts_by_hand(tmp_path: Path) -> None:
    with Meter(f"sqlite:///{tmp_path / 'v.db'}", clock=Clock(MONTH + 3 * DAY)) as m:
        m.set_price(VECTOR_PRICE)
        m.record(
            "vector_stores",
            {"usage_bytes": GIB},
            organization_id="o",
            time=MONTH + 12 * 3600,
            id="a",
        )
        m.record(
            "vector_stores", {"usage_bytes": 3 * GIB}, organization_id="o", time=MONTH + DAY, id="b"
        )
        page = m.costs(
            organization_id="o", start_time=MONTH, end_time=MONTH + 2 * DAY, group_by=["line_item"]
        )
        got = [[(r.amount, r.quantity) for r in b.results] for b in page.data]
        # 1 GiB for 12 hours, then 3 GiB for 24 hours, at $0.10 per GiB-day.
        assert got == [[(Decimal("0.05"), Decimal(12))], [(Decimal("0.30"), Decimal(72))]]
        wire = page.to_dict()["data"][1]["results"][0]
        assert (wire["quantity"], wire["quantity_unit"]) == (72, "gibibyte_hours")
        # Ungrouped, quantities are null as in OpenAI's example.
        total = m.costs(organization_id="o", start_time=MONTH, end_time=MONTH + 2 * DAY)
        assert [r.quantity for b in total.data for r in b.results] == [None, None]


def test_retention_keeps_carried_values_from_the_day_rollups(tmp_path: Path) -> None:
    clock = Clock(MONTH + DAY)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with Meter(url, clock=clock, meters=[DISK], retention={"disk": 30}) as m:
        m.record(
            "disk",
            {"bytes": 8},
            organization_id="org",
            time=MONTH + 100,
            dimensions={"volume": "a"},
            id="old",
        )
        clock.t = MONTH + 40 * DAY  # 39 days on: the first event is past retention
        m.record(
            "disk",
            {"bytes": 2},
            organization_id="org",
            time=MONTH + 39 * DAY,
            dimensions={"volume": "b"},
            id="new",
        )
        start = MONTH + 38 * DAY
        before = m.usage("disk", organization_id="org", start_time=start, end_time=start + 2 * DAY)
        m.prune()
        assert list(m.store.scan("disk", "org", 0, MONTH + 10 * DAY)) == []
        after = m.usage("disk", organization_id="org", start_time=start, end_time=start + 2 * DAY)
        assert after == before
        assert [r.values["bytes"] for b in after.data for r in b.results] == [
            8 * DAY,
            8 * DAY + 2 * DAY,
        ]


def test_gauge_prices_cannot_be_tiered_and_quantity_per_is_checked() -> None:
    with pytest.raises(ValidationError) as info:
        Price("vector_stores", "usage_bytes", "1", quantity_per=0, line_item="v", quantity_unit="u")
    assert info.value.field == "quantity_per"
    with Meter("memory://", clock=Clock(MONTH)) as m:
        with pytest.raises(ValidationError) as info:
            m.set_price(
                {
                    "meter": "vector_stores",
                    "measure": "usage_bytes",
                    "tiers": [{"up_to": None, "unit_price": "1"}],
                    "tier_mode": "graduated",
                    "line_item": "v",
                    "quantity_unit": "gibibyte_hours",
                }
            )
        assert info.value.field == "tiers"
        assert m.store.list_records("price") == []


def test_a_time_weighted_measure_is_no_quota_metric() -> None:
    with pytest.raises(ValidationError) as info:
        Meter(
            "memory://",
            clock=Clock(MONTH),
            meters=[DISK],
            metrics=[Metric.parse("bytes", "disk.bytes")],
        )
    assert "gauge" in info.value.message or "sum" in info.value.message


def test_spend_counters_leave_gauges_priced_over_time_out() -> None:
    with Meter("memory://", clock=Clock(MONTH + DAY)) as m:
        m.set_price(VECTOR_PRICE)
        m.set_spend_limit("o", 1000)
        m.record("vector_stores", {"usage_bytes": 5 * GIB}, organization_id="o", time=MONTH + 10)
        assert m.quotas.spent("o", MONTH + DAY) == 0
