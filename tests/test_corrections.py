"""Corrections: void and amend stored events, kept as an audit trail.

A hypothesis property holds every store to the pure engine over the corrected events — usage
from rollups at every width, quota counters and spend — and the examples check the audit
trail, the refusals and the HTTP operations.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import services
from clock import Clock
from meterkit import (
    Event,
    EventConflict,
    Measure,
    Meter,
    MeterSpec,
    Metric,
    PeriodClosed,
    RetentionError,
    ValidationError,
    engine,
)
from meterkit.auth import create_key
from meterkit.http import HttpApp
from meterkit.http.core import Request
from meterkit.models import Dimension
from meterkit.spend import NANO
from meterkit.testing import assert_rows_match, make_query

_EXAMPLES = itertools.count()
NOW = 1_765_022_400  # 2025-12-06T12:00:00Z
DAY = 86_400
MONTH = 1_764_547_200  # 2025-12-01

METER = MeterSpec(
    "corrected",
    measures=(
        Measure("units"),
        Measure("calls", "count"),
        Measure("peak", "max"),
        Measure("low", "min"),
        Measure("last", "latest"),
        Measure("level", "sum", gauge=True),
    ),
    dimensions=(Dimension("region"), Dimension("flag", kind="bool")),
)


@pytest.fixture(scope="module", params=["memory", "sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from services.store_urls(request.param, tmp_path_factory.mktemp("corr"), "corr")


_EVENTS = st.lists(
    st.tuples(
        st.integers(0, 9 * DAY),  # seconds after MONTH
        st.fixed_dictionaries(
            {},
            optional={
                "units": st.integers(0, 1000),
                "calls": st.integers(0, 5),
                "peak": st.integers(0, 1000),
                "low": st.integers(0, 1000),
                "last": st.integers(0, 1000),
                "level": st.integers(0, 1000),
            },
        ),
        st.fixed_dictionaries(
            {}, optional={"region": st.sampled_from(["eu", "us"]), "flag": st.booleans()}
        ),
    ),
    min_size=1,
    max_size=20,
)
_FIXES = st.lists(
    st.tuples(
        st.integers(0, 19),
        st.sampled_from(["void", "amend", "amend_dims"]),
        st.fixed_dictionaries({"units": st.integers(0, 1000), "peak": st.integers(0, 1000)}),
        st.sampled_from(["eu", "us", None]),
    ),
    max_size=6,
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=_EVENTS, fixes=_FIXES, width=st.sampled_from(["1m", "1h", "1d"]))
def test_corrected_answers_equal_the_engine_over_the_corrected_events(
    url: str, raw: list[tuple[int, dict[str, int], dict[str, Any]]], fixes: list[Any], width: str
) -> None:
    clock = Clock(MONTH + 10 * DAY)
    units_metric = Metric.parse("units", "corrected.units")
    with Meter(url, clock=clock, meters=[METER], metrics=[units_metric]) as m:
        # One organization per example: hypothesis may draw an example twice, and the module's
        # shared store would then still hold the first run's corrections.
        org = f"org_{next(_EXAMPLES)}"
        m.set_price(
            {
                "meter": METER.name,
                "measure": "units",
                "unit_price": "0.0013",
                "line_item": "units",
                "quantity_unit": "units",
            }
        )
        events = {
            f"e{i}": Event(f"e{i}", METER.name, org, MONTH + at, values, dims)
            for i, (at, values, dims) in enumerate(raw)
        }
        m.record_many(list(events.values()))
        for index, action, values, region in fixes:
            event_id = f"e{index % len(raw)}"
            old = events[event_id]
            try:
                if action == "void":
                    m.void(METER.name, org, event_id, reason="test", actor="tester")
                    events[event_id] = Event(old.id, old.meter, org, old.time, {}, old.dimensions)
                elif action == "amend":
                    m.amend(METER.name, org, event_id, values=values, reason="t", actor="tester")
                    events[event_id] = Event(
                        old.id, old.meter, org, old.time, values, old.dimensions
                    )
                else:
                    dims = {**old.dimensions, "region": region}
                    m.amend(METER.name, org, event_id, dimensions=dims, reason="t", actor="a")
                    kept = {k: v for k, v in dims.items() if v is not None}
                    events[event_id] = Event(old.id, old.meter, org, old.time, old.values, kept)
            except ValidationError as exc:
                # Only what changes nothing is refused: an event voided twice, an amendment to
                # what it already is.
                assert "void already" in exc.message or "changes nothing" in exc.message
        corrected = list(events.values())
        first = MONTH + raw[0][0]
        start, span, limit = {
            "1m": (first - first % DAY, DAY, 1440),
            "1h": (MONTH, 7 * DAY, 168),
            "1d": (MONTH, 10 * DAY, 10),
        }[width]
        for group_by in ((), ("region",), ("region", "flag")):
            query = make_query(
                METER,
                org=org,
                start=start,
                end=start + span,
                width=width,
                group_by=group_by,
                limit=limit,
            )
            page = m.reader.rows(METER, query)
            assert_rows_match(page, engine.aggregate(METER, query, corrected), METER, width)
        # The quota counter of the meter's own metric, and spend, follow the corrections.
        assert m.quotas.used(org, "units", at=MONTH + 5 * DAY) == sum(
            int(e.values.get("units", 0)) for e in corrected
        )
        exact = sum(Decimal(int(e.values.get("units", 0))) * Decimal("0.0013") for e in corrected)
        costs = m.costs(organization_id=org, start_time=MONTH, end_time=MONTH + 10 * DAY, limit=10)
        assert sum(costs.totals().values(), Decimal(0)) == exact
        counted = m.quotas.spent(org, MONTH + 5 * DAY)
        assert exact * NANO <= counted <= exact * NANO + 1 + len(fixes)


@pytest.fixture
def meter(tmp_path: Path) -> Iterator[Meter]:
    units_metric = Metric.parse("units", "corrected.units")
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with Meter(url, clock=Clock(NOW), meters=[METER], metrics=[units_metric]) as m:
        yield m


def units(m: Meter, org: str = "org_a") -> int:
    return int(m.total(METER.name, "units", organization_id=org, start_time=MONTH, end_time=NOW))


def test_void_and_amend_keep_an_audit_trail(meter: Meter) -> None:
    meter.record(METER.name, {"units": 5}, organization_id="org_a", time=NOW - DAY, id="a")
    meter.record(METER.name, {"units": 7}, organization_id="org_a", time=NOW - DAY, id="b")
    fixed = meter.amend(
        METER.name, "org_a", "a", values={"units": 3}, reason="double count", actor="ops@acme"
    )
    assert (fixed.action, fixed.before["values"], fixed.after["values"]) == (
        "amend",
        {"units": 5},
        {"units": 3},
    )
    voided = meter.void(METER.name, "org_a", "b", reason="test traffic", actor="ops@acme")
    assert units(meter) == 3
    trail = meter.corrections("org_a")
    assert [(c.event_id, c.action, c.reason, c.actor, c.at) for c in trail] == [
        ("a", "amend", "double count", "ops@acme", NOW),
        ("b", "void", "test traffic", "ops@acme", NOW),
    ]
    assert trail[1] == voided and meter.corrections("org_a", event_id="a") == [fixed]
    # The original sent again is a conflict, never counted twice; the amended one a duplicate.
    with pytest.raises(EventConflict):
        meter.record(METER.name, {"units": 7}, organization_id="org_a", time=NOW - DAY, id="b")
    assert not meter.record(
        METER.name, {"units": 3}, organization_id="org_a", time=NOW - DAY, id="a"
    )
    assert units(meter) == 3 and meter.verify_rollups() == []


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda m: m.void(METER.name, "org_a", "nope", reason="r", actor="a"), "event_id"),
        (lambda m: m.void(METER.name, "org_a", "a", reason="", actor="a"), "reason"),
        (lambda m: m.void(METER.name, "org_a", "a", reason="r", actor=""), "actor"),
        (lambda m: m.void("nope", "org_a", "a", reason="r", actor="a"), "meter"),
        (lambda m: m.amend(METER.name, "org_a", "a", reason="r", actor="a"), "values"),
        (
            lambda m: m.amend(
                METER.name, "org_a", "a", values={"units": -1}, reason="r", actor="a"
            ),
            "values.units",
        ),
        (
            lambda m: m.amend(METER.name, "org_a", "a", values={"units": 5}, reason="r", actor="a"),
            "values",
        ),
    ],
)
def test_bad_corrections_are_refused_and_change_nothing(
    meter: Meter, call: Any, field: str
) -> None:
    meter.record(METER.name, {"units": 5}, organization_id="org_a", time=NOW - DAY, id="a")
    with pytest.raises(ValidationError) as err:
        call(meter)
    assert err.value.field == field
    assert units(meter) == 5 and meter.corrections("org_a") == []
    assert meter.quotas.used("org_a", "units") == 5


def test_closed_periods_and_retention_refuse_corrections(meter: Meter) -> None:
    meter.record(METER.name, {"units": 5}, organization_id="org_a", time=NOW - 3 * DAY, id="a")
    meter.close_period("org_a", NOW - 2 * DAY)
    with pytest.raises(PeriodClosed):
        meter.void(METER.name, "org_a", "a", reason="r", actor="a")
    meter.record(METER.name, {"units": 5}, organization_id="org_b", time=NOW - 3 * DAY, id="a")
    meter.set_retention(METER.name, 1)
    with pytest.raises(RetentionError):
        meter.void(METER.name, "org_b", "a", reason="r", actor="a")
    assert units(meter, "org_b") == 5


def lines(response: Any) -> list[Any]:
    return [json.loads(x) for x in b"".join(response.iter_body()).splitlines()]


def test_corrections_over_http_name_the_key_that_made_them(meter: Meter) -> None:
    meter.record(METER.name, {"units": 5}, organization_id="org_a", time=NOW - DAY, id="a")
    admin, key = create_key(meter, "org_a", "admin", ["usage:read", "usage:write"])
    member = create_key(meter, "org_a", "member", ["usage:read", "usage:write"])[0]
    app = HttpApp(meter)

    def post(path: str, body: dict[str, Any], token: str = admin) -> Any:
        request = Request(
            "POST",
            path,
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
            body=json.dumps(body).encode(),
        )
        return app.handle(request)

    body = {"organization_id": "org_a", "meter": METER.name, "event_id": "a", "reason": "r"}
    assert post("/v1/corrections/void", body, member).status == 403
    done = post("/v1/corrections/amend", {**body, "values": {"units": 2}})
    assert done.status == 200, lines(done)
    (line,) = lines(done)
    assert (line["action"], line["actor"], line["after"]["values"]) == (
        "amend",
        key.id,
        {"units": 2},
    )
    listed = post("/v1/op/corrections.list", {"organization_id": "org_a"})
    assert [x["id"] for x in lines(listed)] == [line["id"]]
    bad = post("/v1/corrections/void", {**body, "event_id": "nope"})
    assert bad.status == 404 and lines(bad)[0]["error"]["param"] == "event_id"
    assert units(meter) == 2
    assert post("/v1/corrections/void", body).status == 200
    twice = post("/v1/corrections/void", body)  # void already: a conflict, not bad input
    assert twice.status == 409 and lines(twice)[0]["error"]["code"] == "conflict"
    assert units(meter) == 0
