"""The bucket engine against a brute-force oracle, plus edge times, limits, envelope and cursors."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meterkit
from meterkit import Dimension, Event, Measure, Meter, MeterSpec, ValidationError, hookimpl
from meterkit.engine import aggregate, build_page, decode_cursor
from meterkit.stores.memory import MemoryStore
from meterkit.validate import check_usage_query
from openai_types import fields_of, result_types

# Widths, default and maximum limits, written from the OpenAI usage API's documentation rather
# than read from the code.
WIDTHS: dict[str, int] = {"1m": 60, "1h": 3600, "1d": 86400}
LIMITS: dict[str, tuple[int, int]] = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}

# Every number and grouping field of the official SDK's completions result.
_NUMBERS, _REQUIRED, _GROUPS = fields_of(result_types()["organization.usage.completions.result"])
COMPLETIONS_NUMBERS = tuple(sorted(_NUMBERS))
COMPLETIONS_GROUPS = tuple(sorted(_GROUPS))


def ts(*parts: int) -> int:
    """Unix seconds of a UTC wall-clock time."""
    return int(dt.datetime(*parts, tzinfo=dt.timezone.utc).timestamp())


# A meter with one measure of every aggregation, and gauges combined each way.
PROBE = MeterSpec(
    "probe",
    (
        Measure("total", fractional=True),
        Measure("hits", "count"),
        Measure("peak", "max", fractional=True),
        Measure("low", "min", fractional=True),
        Measure("last", "latest", fractional=True),
        Measure("distinct", "unique_count", fractional=True),
        Measure("level", gauge=True, fractional=True),
        Measure("level_max", "max", gauge=True, fractional=True),
        Measure("level_min", "min", gauge=True, fractional=True),
    ),
    (
        Dimension("region", allowed={"eu", "us"}),
        Dimension("tier"),
        Dimension("flag", kind="bool"),
    ),
    result_object="probe.result",
)
DIM_VALUES: dict[str, list[Any]] = {
    "region": ["eu", "us", None],
    "tier": ["a", "b", "c", None],
    "flag": [True, False, None],
}


# --------------------------------------------------------------------------------------------
# The oracle: direct transcription of the documented semantics, one bucket at a time.
# --------------------------------------------------------------------------------------------


def _key(event: Event) -> tuple[int, str]:
    return (event.time, event.id)


def oracle_value(spec: MeterSpec, measure: Measure, events: Sequence[Event]) -> Any:
    carrying = [e for e in events if measure.name in e.values]
    values = [e.values[measure.name] for e in carrying]
    if measure.gauge:
        if not carrying:
            return 0 if measure.aggregation == "sum" else None
        # Per series (the full dimension tuple), the value of its latest event.
        latest: dict[tuple[Any, ...], Any] = {}
        for e in sorted(carrying, key=_key):
            latest[tuple(e.dimensions.get(d) for d in spec.dimension_names)] = e.values[
                measure.name
            ]
        return {"sum": sum, "max": max, "min": min}[measure.aggregation](latest.values())
    agg = measure.aggregation
    if agg == "sum":
        return sum(values)
    if agg == "count":
        return len(values)
    if agg == "unique_count":
        return len(set(values))
    if not carrying:
        return None
    if agg == "max":
        return max(values)
    if agg == "min":
        return min(values)
    assert agg == "latest"
    return max(carrying, key=_key).values[measure.name]


def oracle_buckets(
    spec: MeterSpec,
    events: Sequence[Event],
    *,
    organization_id: str,
    start_time: int,
    end_time: int,
    width: int,
    group_by: Sequence[str] = (),
    filters: Mapping[str, Sequence[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every bucket of ``[start_time, end_time)`` in the OpenAI dict shape, results sorted."""
    filters = filters or {}
    out: list[dict[str, Any]] = []
    bucket = start_time - start_time % width
    while bucket < end_time:
        selected = [
            e
            for e in events
            if e.meter == spec.name
            and e.organization_id == organization_id
            and start_time <= e.time < end_time
            and bucket <= e.time < bucket + width
            and all(e.dimensions.get(k) in allowed for k, allowed in filters.items())
        ]
        groups: dict[tuple[Any, ...], list[Event]] = {}
        for e in selected:
            groups.setdefault(tuple(e.dimensions.get(g) for g in group_by), []).append(e)
        results = []
        for group, members in groups.items():
            result: dict[str, Any] = {"object": spec.result_object}
            result.update({d: None for d in spec.dimension_names})
            result.update(zip(group_by, group, strict=True))
            result.update({m.name: oracle_value(spec, m, members) for m in spec.measures})
            results.append(result)
        out.append(
            {
                "object": "bucket",
                "start_time": bucket,
                "end_time": bucket + width,
                "results": sort_results(results, spec),
            }
        )
        bucket += width
    return out


def sort_results(results: list[dict[str, Any]], spec: MeterSpec) -> list[dict[str, Any]]:
    # Result order within a bucket is not part of the contract; compare them in one order.
    return sorted(results, key=lambda r: json.dumps([r[d] for d in spec.dimension_names]))


def normalised(buckets: Sequence[dict[str, Any]], spec: MeterSpec) -> list[dict[str, Any]]:
    return [{**b, "results": sort_results(list(b["results"]), spec)} for b in buckets]


# --------------------------------------------------------------------------------------------
# Random scenarios.
# --------------------------------------------------------------------------------------------

# Starting points near month, year and leap-day boundaries, and an ordinary day.
BASES = [ts(2024, 1, 30), ts(2024, 2, 28), ts(2024, 12, 30), ts(2023, 6, 15, 12)]

# Small integers and quarters: every sum of them is exact in floating point, so the oracle
# and the engine may add them in different orders and still agree exactly.
numbers = st.one_of(st.integers(0, 20), st.integers(0, 80).map(lambda k: k / 4))
whole = st.integers(0, 20)


@attrs.frozen
class Scenario:
    bucket_width: str
    start_time: int
    end_time: int
    events: tuple[Event, ...]
    group_by: tuple[str, ...]
    filters: dict[str, list[Any]]
    limits: tuple[int, ...]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    bucket_width = draw(st.sampled_from(sorted(WIDTHS)))
    width = WIDTHS[bucket_width]
    start = draw(st.sampled_from(BASES)) + draw(st.one_of(st.just(0), st.integers(0, 3 * width)))
    end = start + draw(st.integers(1, 40 * width))
    aligned = start - start % width
    edge_times = [start - 1, start, aligned, end - 1, end, aligned + width, aligned + width - 1]
    # Some events cluster in the first buckets, so groups there are often non-trivial.
    times = st.one_of(
        st.integers(aligned - width, end + width),
        st.integers(start, min(end, start + 2 * width)),
        st.sampled_from(edge_times),
    )
    n = draw(st.integers(0, 40))
    # Ids of varying length, so (time, id) ties are broken by string order, not by number.
    ids = draw(st.permutations(range(n)))
    events = []
    for i in ids:
        measures = draw(st.sets(st.sampled_from(PROBE.measure_names)))
        dims = {}
        for name, choices in DIM_VALUES.items():
            # Absent and explicit None are both "no value" for a dimension.
            if draw(st.booleans()):
                dims[name] = draw(st.sampled_from(choices))
        events.append(
            Event(
                id=f"e{i}",
                meter="probe",
                organization_id=draw(st.sampled_from(["org_a", "org_a", "org_a", "org_b"])),
                time=draw(times),
                values={
                    m: draw(numbers if PROBE.measure(m).fractional else whole)  # type: ignore[union-attr]
                    for m in sorted(measures)
                },
                dimensions=dims,
            )
        )
    group_by = tuple(draw(st.lists(st.sampled_from(sorted(DIM_VALUES)), unique=True, max_size=3)))
    filters = draw(
        st.dictionaries(
            st.sampled_from(sorted(DIM_VALUES)),
            st.just(None),
            max_size=2,
        )
    )
    filter_values = {
        name: draw(st.lists(st.sampled_from(DIM_VALUES[name]), min_size=1, unique=True))
        for name in filters
    }
    max_limit = LIMITS[bucket_width][1]
    limits = tuple(
        draw(
            st.lists(
                st.one_of(st.integers(1, 6), st.integers(1, max_limit)), min_size=1, max_size=4
            )
        )
    )
    return Scenario(bucket_width, start, end, tuple(events), group_by, filter_values, limits)


def expected_for(scenario: Scenario) -> list[dict[str, Any]]:
    return oracle_buckets(
        PROBE,
        scenario.events,
        organization_id="org_a",
        start_time=scenario.start_time,
        end_time=scenario.end_time,
        width=WIDTHS[scenario.bucket_width],
        group_by=scenario.group_by,
        filters=scenario.filters,
    )


def check_paging(pages: Sequence[meterkit.UsagePage], limits: Sequence[int], total: int) -> None:
    """Page sizes follow the limits, and only the last page says there is no more."""
    seen = 0
    for i, page in enumerate(pages):
        last = i == len(pages) - 1
        assert len(page.data) == min(limits[i % len(limits)], total - seen)
        seen += len(page.data)
        assert page.has_more is (not last)
        assert (page.next_page is None) is last
    assert seen == total


SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(scenarios())
def test_meter_equals_oracle_across_pages(scenario: Scenario) -> None:
    expected = expected_for(scenario)
    with Meter("memory://", meters=[PROBE], max_future_skew=None) as meter:
        meter.record_many(scenario.events)
        pages: list[meterkit.UsagePage] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {
                "organization_id": "org_a",
                "start_time": scenario.start_time,
                "end_time": scenario.end_time,
                "bucket_width": scenario.bucket_width,
                "group_by": list(scenario.group_by),
                "filters": scenario.filters,
                # The limit may change from page to page; the listing still continues.
                "limit": scenario.limits[len(pages) % len(scenario.limits)],
                "page": cursor,
            }
            page = meter.usage("probe", **params)
            # The wire page built straight from the rows is the objects' page, to the byte.
            wire = meter.usage_dict("probe", **params)
            assert json.dumps(wire) == json.dumps(page.to_dict())
            pages.append(page)
            cursor = page.next_page
            if cursor is None:
                break
            assert len(pages) <= len(expected)
    got = [b for p in pages for b in p.to_dict()["data"]]  # type: ignore[attr-defined]
    starts = [b["start_time"] for b in got]
    assert starts == sorted(set(starts)), "a bucket came twice or out of order"
    assert normalised(got, PROBE) == expected
    check_paging(pages, scenario.limits, len(expected))


@SETTINGS
@given(scenarios())
def test_engine_functions_equal_oracle_across_pages(scenario: Scenario) -> None:
    expected = expected_for(scenario)
    secret = b"k" * 32
    # The engine is handed every event, of every org and another meter, and must pick.
    other_meter = [attrs.evolve(e, meter="other") for e in scenario.events]
    events = [*scenario.events, *other_meter]
    pages: list[meterkit.UsagePage] = []
    cursor: str | None = None
    while True:
        query = check_usage_query(
            PROBE,
            organization_id="org_a",
            start_time=scenario.start_time,
            end_time=scenario.end_time,
            bucket_width=scenario.bucket_width,
            group_by=scenario.group_by,
            filters=scenario.filters,
            limit=scenario.limits[len(pages) % len(scenario.limits)],
        )
        if cursor is not None:
            query = attrs.evolve(query, page_start=decode_cursor(secret, query, cursor))
        page = build_page(PROBE, query, aggregate(PROBE, query, events), secret)
        pages.append(page)
        cursor = page.next_page
        if cursor is None:
            break
        assert len(pages) <= len(expected)
    got = [b for p in pages for b in p.to_dict()["data"]]  # type: ignore[attr-defined]
    assert normalised(got, PROBE) == expected
    check_paging(pages, scenario.limits, len(expected))


def test_oracle_sanity() -> None:
    # The oracle itself, on a hand-computed case: two series of a gauge, ties broken by id.
    t = ts(2024, 5, 1)
    events = [
        Event("b", "probe", "o", t, {"level": 5, "last": 1, "distinct": 3}, {"tier": "a"}),
        Event("a", "probe", "o", t, {"level": 9, "last": 2, "distinct": 3}, {"tier": "a"}),
        Event("c", "probe", "o", t + 1, {"level": 4, "distinct": 4}, {"tier": "b"}),
    ]
    (bucket,) = oracle_buckets(
        PROBE, events, organization_id="o", start_time=t, end_time=t + 60, width=60
    )
    (row,) = bucket["results"]
    assert row["level"] == 5 + 4  # "b" > "a" at the same second, plus series tier=b
    assert row["last"] == 1
    assert row["distinct"] == 2
    # Measures no event carries: 0 for counters, None for extremes, 0 for a gauge sum.
    assert row["hits"] == 0 and row["peak"] is None and row["level_max"] is None


# --------------------------------------------------------------------------------------------
# Edge times, on both built-in stores.
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def meter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Meter]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'edge.db'}"
    with Meter(url, max_future_skew=None) as m:  # calendar edges, whatever "now" is
        yield m


def put(meter: Meter, *times: int, org: str = "org_1", tokens: Sequence[int] = ()) -> None:
    """One completions event per time; input_tokens identifies the event when given."""
    for i, t in enumerate(times):
        meter.record(
            "completions",
            {"input_tokens": tokens[i] if tokens else 1, "num_model_requests": 1},
            organization_id=org,
            time=t,
            id=f"evt_{i}_{t}",
        )


def totals(page: meterkit.UsagePage) -> list[tuple[int, int, int]]:
    """(start, end, input_tokens) of each bucket, 0 for an empty one."""
    out = []
    for b in page.data:
        assert len(b.results) <= 1
        tokens = b.results[0].values["input_tokens"] if b.results else 0
        out.append((b.start_time, b.end_time, tokens))
    return out  # type: ignore[return-value]


def usage(meter: Meter, start: int, end: int, width: str, **kw: Any) -> meterkit.UsagePage:
    return meter.usage(
        "completions",
        organization_id="org_1",
        start_time=start,
        end_time=end,
        bucket_width=width,
        **kw,
    )


def test_bucket_boundaries(meter: Meter) -> None:
    t = ts(2024, 7, 4, 10)
    end = t + 3 * 3600
    put(
        meter,
        t - 1,
        t,
        t + 3599,
        t + 3600,
        end - 1,
        end,
        tokens=[1000, 1, 2, 4, 8, 2000],
    )
    page = usage(meter, t, end, "1h")
    assert totals(page) == [(t, t + 3600, 3), (t + 3600, t + 7200, 4), (t + 7200, end, 8)]
    assert page.has_more is False and page.next_page is None


def test_start_mid_bucket(meter: Meter) -> None:
    hour = ts(2024, 7, 4, 10)
    start = hour + 1800
    put(meter, hour, start - 1, start, hour + 3599, hour + 3600, tokens=[1000, 2000, 1, 2, 4])
    page = usage(meter, start, hour + 7200, "1h")
    # The first bucket starts at the aligned hour but counts only from start_time on.
    assert totals(page) == [(hour, hour + 3600, 3), (hour + 3600, hour + 7200, 4)]


def test_end_mid_bucket(meter: Meter) -> None:
    day = ts(2024, 7, 4)
    end = day + 86400 + 3600
    put(meter, day, end - 1, end, tokens=[1, 2, 1000])
    page = usage(meter, day, end, "1d")
    # The last bucket keeps its full width, but counts only before end_time.
    assert totals(page) == [(day, day + 86400, 1), (day + 86400, day + 2 * 86400, 2)]


def test_month_end(meter: Meter) -> None:
    put(meter, ts(2024, 1, 31, 23, 59, 59), ts(2024, 2, 1), tokens=[1, 2])
    page = usage(meter, ts(2024, 1, 31), ts(2024, 2, 2), "1d")
    assert totals(page) == [
        (ts(2024, 1, 31), ts(2024, 2, 1), 1),
        (ts(2024, 2, 1), ts(2024, 2, 2), 2),
    ]
    hourly = usage(meter, ts(2024, 1, 31, 23), ts(2024, 2, 1, 1), "1h")
    assert totals(hourly) == [
        (ts(2024, 1, 31, 23), ts(2024, 2, 1), 1),
        (ts(2024, 2, 1), ts(2024, 2, 1, 1), 2),
    ]


def test_year_end(meter: Meter) -> None:
    put(meter, ts(2024, 12, 31, 23, 59, 59), ts(2025, 1, 1), tokens=[1, 2])
    daily = usage(meter, ts(2024, 12, 30), ts(2025, 1, 2), "1d")
    assert totals(daily) == [
        (ts(2024, 12, 30), ts(2024, 12, 31), 0),
        (ts(2024, 12, 31), ts(2025, 1, 1), 1),
        (ts(2025, 1, 1), ts(2025, 1, 2), 2),
    ]
    minutes = usage(meter, ts(2024, 12, 31, 23, 59), ts(2025, 1, 1, 0, 1), "1m")
    assert totals(minutes) == [
        (ts(2024, 12, 31, 23, 59), ts(2025, 1, 1), 1),
        (ts(2025, 1, 1), ts(2025, 1, 1, 0, 1), 2),
    ]


def test_leap_day(meter: Meter) -> None:
    put(
        meter,
        ts(2024, 2, 28, 23, 59, 59),
        ts(2024, 2, 29),
        ts(2024, 2, 29, 13, 30),
        ts(2024, 2, 29, 23, 59, 59),
        ts(2024, 3, 1),
        tokens=[1, 2, 4, 8, 16],
    )
    daily = usage(meter, ts(2024, 2, 28), ts(2024, 3, 2), "1d")
    assert totals(daily) == [
        (ts(2024, 2, 28), ts(2024, 2, 29), 1),
        (ts(2024, 2, 29), ts(2024, 3, 1), 14),
        (ts(2024, 3, 1), ts(2024, 3, 2), 16),
    ]
    hourly = usage(meter, ts(2024, 2, 29), ts(2024, 3, 1), "1h")
    expected = [(ts(2024, 2, 29, h), ts(2024, 2, 29, h) + 3600, 0) for h in range(24)]
    expected[0] = (*expected[0][:2], 2)
    expected[13] = (*expected[13][:2], 4)
    expected[23] = (*expected[23][:2], 8)
    assert totals(hourly) == expected
    assert hourly.has_more is False


def test_minutes_over_an_hour(meter: Meter) -> None:
    hour = ts(2024, 3, 10, 8)
    times = [hour + 60 * m + s for m, s in [(0, 0), (7, 59), (7, 1), (30, 30), (59, 59)]]
    put(meter, *times, tokens=[1, 2, 4, 8, 16])
    page = usage(meter, hour, hour + 3600, "1m")
    assert len(page.data) == 60 and page.has_more is False
    got = {start: n for start, _end, n in totals(page) if n}
    assert got == {hour: 1, hour + 7 * 60: 6, hour + 30 * 60: 8, hour + 59 * 60: 16}
    assert [b.start_time for b in page.data] == [hour + 60 * i for i in range(60)]
    assert all(b.end_time - b.start_time == 60 for b in page.data)


def test_empty_buckets_are_returned(meter: Meter) -> None:
    day = ts(2024, 4, 1)
    put(meter, day + 2 * 86400 + 5)
    put(meter, day + 86400, org="org_2")  # another organization's usage is invisible
    page = usage(meter, day, day + 5 * 86400, "1d")
    assert [b.start_time for b in page.data] == [day + i * 86400 for i in range(5)]
    assert [len(b.results) for b in page.data] == [0, 0, 1, 0, 0]
    assert page.to_dict()["data"][0]["results"] == []  # type: ignore[index]


@pytest.mark.parametrize("width", sorted(WIDTHS))
def test_default_and_max_limit(meter: Meter, width: str) -> None:
    default, maximum = LIMITS[width]
    start = ts(2024, 1, 1)
    end = start + (maximum + 5) * WIDTHS[width]
    page = usage(meter, start, end, width)
    assert len(page.data) == default and page.has_more
    page = usage(meter, start, end, width, limit=maximum)
    assert len(page.data) == maximum and page.has_more
    rest = usage(meter, start, end, width, limit=maximum, page=page.next_page)
    assert len(rest.data) == 5 and not rest.has_more
    assert rest.data[0].start_time == start + maximum * WIDTHS[width]
    with pytest.raises(ValidationError) as err:
        usage(meter, start, end, width, limit=maximum + 1)
    assert err.value.field == "limit"


# --------------------------------------------------------------------------------------------
# The OpenAI envelope.
# --------------------------------------------------------------------------------------------


def completions_result(group: Mapping[str, Any], numbers: Mapping[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"object": "organization.usage.completions.result"}
    out.update({g: group.get(g) for g in COMPLETIONS_GROUPS})
    out.update({n: numbers.get(n, 0) for n in COMPLETIONS_NUMBERS})
    return out


def test_page_envelope_completions(meter: Meter) -> None:
    day = ts(2024, 11, 1)
    dims = {
        "project_id": "proj_a",
        "user_id": "user_1",
        "api_key_id": "key_1",
        "model": "gpt-4o",
        "service_tier": "default",
    }
    meter.record(
        "completions",
        {
            "input_tokens": 120,
            "output_tokens": 40,
            "input_cached_tokens": 20,
            "num_model_requests": 1,
        },
        organization_id="org_1",
        time=day + 10,
        id="evt_1",
        dimensions={**dims, "batch": False},
    )
    meter.record(
        "completions",
        {"input_tokens": 5, "num_model_requests": 1},
        organization_id="org_1",
        time=day + 20,
        id="evt_2",
        dimensions={**dims, "batch": True},
    )
    meter.record(
        "completions",
        {"input_tokens": 7, "num_model_requests": 2},
        organization_id="org_1",
        time=day + 86400,
        id="evt_3",
        dimensions={**dims, "model": "gpt-4o-mini", "batch": False},
    )
    page = meter.usage(
        "completions",
        organization_id="org_1",
        start_time=day,
        end_time=day + 3 * 86400,
        bucket_width="1d",
        group_by=["batch", "model"],
        limit=2,
    )
    body = page.to_dict()
    assert isinstance(body["next_page"], str)
    expected = {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": day,
                "end_time": day + 86400,
                "results": [
                    completions_result(
                        {"batch": False, "model": "gpt-4o"},
                        {
                            "input_tokens": 120,
                            "output_tokens": 40,
                            "input_cached_tokens": 20,
                            "num_model_requests": 1,
                        },
                    ),
                    completions_result(
                        {"batch": True, "model": "gpt-4o"},
                        {"input_tokens": 5, "num_model_requests": 1},
                    ),
                ],
            },
            {
                "object": "bucket",
                "start_time": day + 86400,
                "end_time": day + 2 * 86400,
                "results": [
                    completions_result(
                        {"batch": False, "model": "gpt-4o-mini"},
                        {"input_tokens": 7, "num_model_requests": 2},
                    ),
                ],
            },
        ],
        "has_more": True,
        "next_page": body["next_page"],
    }
    spec = meter.spec("completions")
    assert {**body, "data": normalised(body["data"], spec)} == expected  # type: ignore[arg-type]
    for bucket in body["data"]:  # type: ignore[attr-defined]
        for result in bucket["results"]:
            assert type(result["batch"]) is bool
    # Plain JSON types throughout: it survives a round trip unchanged.
    assert json.loads(json.dumps(body)) == body

    last = meter.usage(
        "completions",
        organization_id="org_1",
        start_time=day,
        end_time=day + 3 * 86400,
        bucket_width="1d",
        group_by=["batch", "model"],
        limit=2,
        page=page.next_page,
    ).to_dict()
    assert last == {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": day + 2 * 86400,
                "end_time": day + 3 * 86400,
                "results": [],
            }
        ],
        "has_more": False,
        "next_page": None,
    }


def test_page_envelope_ungrouped_and_gauge(meter: Meter) -> None:
    day = ts(2024, 11, 1)
    # Two stores of one project: each series keeps its latest size, then they are summed.
    for i, (t, size, project) in enumerate(
        [(10, 100, "p1"), (20, 150, "p1"), (30, 1000, "p2"), (40, 7, "p3")]
    ):
        meter.record(
            "vector_stores",
            {"usage_bytes": size},
            organization_id="org_1",
            time=day + t,
            id=f"vs_{i}",
            dimensions={"project_id": project},
        )
    body = meter.usage(
        "vector_stores",
        organization_id="org_1",
        start_time=day,
        end_time=day + 86400,
        filters={"project_id": ["p1", "p2"]},
    ).to_dict()
    assert body == {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": day,
                "end_time": day + 86400,
                "results": [
                    {
                        "object": "organization.usage.vector_stores.result",
                        "project_id": None,
                        "usage_bytes": 1150,
                    },
                ],
            }
        ],
        "has_more": False,
        "next_page": None,
    }


# --------------------------------------------------------------------------------------------
# Cursors.
# --------------------------------------------------------------------------------------------

DAY0 = ts(2024, 6, 1)
SPAN = dict(start_time=DAY0, end_time=DAY0 + 10 * 86400, bucket_width="1d")


@pytest.fixture
def paged() -> Iterator[tuple[Meter, str]]:
    with Meter("memory://") as m:
        put(m, *(DAY0 + i * 86400 + 60 for i in range(10)), tokens=list(range(1, 11)))
        page = m.usage("completions", organization_id="org_1", limit=3, **SPAN)  # type: ignore[arg-type]
        assert page.next_page is not None
        yield m, page.next_page


def _unwrap(cursor: str) -> bytes:
    raw = cursor[len("page_") :]
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))


def _wrap(token: bytes) -> str:
    return "page_" + base64.urlsafe_b64encode(token).decode().rstrip("=")


def _forgeries(cursor: str) -> list[object]:
    token = _unwrap(cursor)
    flipped = [_wrap(token[:i] + bytes([token[i] ^ 1]) + token[i + 1 :]) for i in range(len(token))]
    payload, sig = token.split(b".", 1)
    # A valid-looking bucket start further on, with the original signature.
    moved = _wrap(str(int(payload) + 86400).encode() + b"." + sig)
    return [
        *flipped,
        moved,
        cursor[:-2],
        cursor + "AA",
        "page_",
        "page_!!!!",
        "not-a-cursor",
        "",
        "x" * 500,
        _wrap(b"12345"),
        _wrap(b"abc." + sig),
        12345,
        b"page_abc",
    ]


def test_forged_cursors_are_rejected(paged: tuple[Meter, str]) -> None:
    meter, cursor = paged
    for forged in _forgeries(cursor):
        with pytest.raises(ValidationError) as err:
            meter.usage("completions", organization_id="org_1", limit=3, page=forged, **SPAN)  # type: ignore[arg-type]
        assert err.value.field == "page", forged


@pytest.mark.parametrize(
    "change",
    [
        {"organization_id": "org_2"},
        {"group_by": ["model"]},
        {"filters": {"model": ["gpt-4o"]}},
        {"meter": "embeddings"},
        {"start_time": DAY0 + 86400},
        {"bucket_width": "1h"},
    ],
    ids=["org", "group_by", "filters", "meter", "start_time", "bucket_width"],
)
def test_foreign_cursor_is_rejected(paged: tuple[Meter, str], change: dict[str, Any]) -> None:
    meter, cursor = paged
    args: dict[str, Any] = {
        "meter": "completions",
        "organization_id": "org_1",
        "limit": 3,
        **SPAN,
        **change,
    }
    if args["bucket_width"] == "1h":
        args["end_time"] = DAY0 + 100 * 3600
    name = args.pop("meter")
    with pytest.raises(ValidationError) as err:
        meter.usage(name, page=cursor, **args)
    assert err.value.field == "page"


def test_cursor_changing_limit_and_end_time_continues(paged: tuple[Meter, str]) -> None:
    meter, cursor = paged
    # A bigger page, and end_time moved on (as with "end_time = now"): resume at bucket 3.
    later = DAY0 + 12 * 86400
    page = meter.usage(
        "completions",
        organization_id="org_1",
        start_time=DAY0,
        end_time=later,
        bucket_width="1d",
        limit=31,
        page=cursor,
    )
    assert [b.start_time for b in page.data] == [DAY0 + i * 86400 for i in range(3, 12)]
    assert [b.results[0].values["input_tokens"] if b.results else 0 for b in page.data] == [
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        0,
        0,
    ]
    assert page.has_more is False and page.next_page is None
    smaller = meter.usage(
        "completions",
        organization_id="org_1",
        start_time=DAY0,
        end_time=DAY0 + 5 * 86400,
        bucket_width="1d",
        limit=1,
        page=cursor,
    )
    assert [b.start_time for b in smaller.data] == [DAY0 + 3 * 86400]
    assert smaller.has_more is True


def test_cursor_past_a_shortened_end_time_is_rejected(paged: tuple[Meter, str]) -> None:
    meter, cursor = paged
    with pytest.raises(ValidationError) as err:
        meter.usage(
            "completions",
            organization_id="org_1",
            start_time=DAY0,
            end_time=DAY0 + 2 * 86400,
            bucket_width="1d",
            page=cursor,
        )
    assert err.value.field == "page"


class SharedMemory:
    """A store plugin for scheme ``shared://``: one MemoryStore per URL, like one database
    opened by several processes."""

    def __init__(self) -> None:
        self.stores: dict[str, MemoryStore] = {}

    @hookimpl
    def meterkit_open_store(self, url: str, scheme: str) -> MemoryStore | None:
        if scheme != "shared":
            return None
        return self.stores.setdefault(url, MemoryStore(url))

    @hookimpl
    def meterkit_store_schemes(self) -> list[str]:
        return ["shared"]


def test_cursor_is_bound_to_the_store() -> None:
    plugin = SharedMemory()
    first = Meter("shared://one", plugins=[plugin])
    again = Meter("shared://one", plugins=[plugin])
    other = Meter("shared://two", plugins=[plugin])
    assert first.store is again.store is plugin.stores["shared://one"]
    put(first, *(DAY0 + i * 86400 for i in range(10)))
    cursor = first.usage("completions", organization_id="org_1", limit=3, **SPAN).next_page  # type: ignore[arg-type]
    # Same store, another Meter: the cursor continues, with the data recorded through `first`.
    page = again.usage("completions", organization_id="org_1", limit=3, page=cursor, **SPAN)  # type: ignore[arg-type]
    assert [b.start_time for b in page.data] == [DAY0 + i * 86400 for i in range(3, 6)]
    assert all(len(b.results) == 1 for b in page.data)
    with pytest.raises(ValidationError) as err:
        other.usage("completions", organization_id="org_1", limit=3, page=cursor, **SPAN)  # type: ignore[arg-type]
    assert err.value.field == "page"
