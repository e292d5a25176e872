"""Late events and closed periods: accepted within the lateness window, in their own bucket;
refused beyond it or in a closed period, with nothing stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import services
from clock import Clock
from meterkit import Event, LateEventError, Meter, PeriodClosed, ValidationError
from meterkit.config import load_config
from meterkit.lateness import parse_lateness

NOW = 1_765_022_400  # 2025-12-06T12:00:00Z
DAY = 86_400
HOUR = 3_600


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from services.store_urls(request.param, tmp_path, "late")


def tokens(i: int, t: int, org: str = "org_a", n: int = 10) -> Event:
    return Event(f"e{i}", "tokens", org, t, {"tokens": n})


def daily(m: Meter, org: str = "org_a") -> dict[int, int]:
    page = m.usage("tokens", organization_id=org, start_time=NOW - 10 * DAY, end_time=NOW, limit=31)
    return {b.start_time: sum(int(r.values["tokens"] or 0) for r in b.results) for b in page.data}


def test_late_events_within_the_window_land_in_their_own_bucket(url: str) -> None:
    with Meter(url, clock=Clock(NOW), lateness="3d") as m:
        m.record_many([tokens(0, NOW - 2 * DAY), tokens(1, NOW - 3 * DAY)])  # 3 days: the edge
        days = daily(m)
        assert days[NOW - NOW % DAY - 2 * DAY] == 10 and days[NOW - NOW % DAY - 3 * DAY] == 10
        assert m.quotas.used("org_a", "tokens") == 20  # counted in their billing period
        with pytest.raises(LateEventError) as late:
            m.record_many([tokens(2, NOW - HOUR), tokens(3, NOW - 3 * DAY - 1)])
        assert late.value.field == "events[1].time"
        assert (late.value.lateness, late.value.accepted_from) == (3 * DAY, NOW - 3 * DAY)
        assert sum(daily(m).values()) == 20  # the whole batch stored nothing
        assert m.quotas.used("org_a", "tokens") == 20


def test_closed_periods_refuse_their_events_in_every_process(url: str, tmp_path: Path) -> None:
    clock = Clock(NOW)
    with Meter(url, clock=clock) as a:
        a.record_many([tokens(0, NOW - 5 * DAY, "org_a"), tokens(1, NOW - 5 * DAY, "org_b")])
        start = NOW - NOW % DAY - 4 * DAY
        assert a.close_period("org_a", start) == start
        assert a.close_period("org_a", start - DAY) == start  # only forward
        with pytest.raises(PeriodClosed) as closed:
            a.record_many([tokens(2, NOW - HOUR), tokens(3, start - 1)])
        assert closed.value.field == "events[1].time"
        assert (closed.value.organization_id, closed.value.closed_before) == ("org_a", start)
        a.record_many([tokens(3, start)])  # the first second after the close
        a.record_many([tokens(4, start - 1, "org_b")])  # another organization's period is open
        if url != "memory://":
            with Meter(url, clock=clock) as b:  # another process reads the close from the store
                with pytest.raises(PeriodClosed):
                    b.record_many([tokens(5, start - DAY)])
                assert b.closed_before("org_a") == start and b.closed_before("org_b") == 0
        a.close_period(None, start - DAY)  # every organization, further back
        with pytest.raises(PeriodClosed):
            a.record_many([tokens(6, start - 2 * DAY, "org_b")])
        assert a.closed_before("org_b") == start - DAY
        # A duplicate of an event in a closed period is refused too: nothing can change there.
        with pytest.raises(PeriodClosed):
            a.record_many([tokens(0, NOW - 5 * DAY, "org_a")])
        assert sum(daily(a, "org_a").values()) == 20 and sum(daily(a, "org_b").values()) == 20


def test_bad_lateness_and_closes_are_refused() -> None:
    assert parse_lateness("12h") == 12 * HOUR and parse_lateness(90) == 90
    assert parse_lateness(None) is None and parse_lateness("30s") == 30
    for bad in ("soon", -1, 1.5, True, "7w"):
        with pytest.raises(ValidationError) as err:
            Meter("memory://", lateness=bad)
        assert err.value.field == "lateness"
    with Meter("memory://", clock=Clock(NOW)) as m:
        for org, before, field in [("", NOW, "organization_id"), ("org_a", NOW + 1, "before")]:
            with pytest.raises(ValidationError) as err:
                m.close_period(org, before)
            assert err.value.field == field
        assert m.closed_before("org_a") == 0


def test_lateness_from_the_configuration_file(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('store = "memory://"\nlateness = "2d"\n')
    assert load_config(path).lateness == 2 * DAY
    with Meter.from_config(path, clock=Clock(NOW)) as m:
        assert m.lateness == 2 * DAY
    path.write_text('store = "memory://"\nlateness = "two days"\n')
    with pytest.raises(ValidationError) as err:
        load_config(path)
    assert err.value.field == "lateness"
