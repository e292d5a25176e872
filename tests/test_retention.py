"""Raw-event retention: old events refused, dropped by prune, hour and day answers kept.

That a store answers hour and day queries exactly after dropping old events is the
conformance suite's (``test_dropping_old_events_keeps_hour_and_day_answers``, every store).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import services
from meterkit import Dimension, Event, Measure, Meter, MeterSpec, ValidationError
from meterkit.auth import create_key
from meterkit.cli import main
from meterkit.http import HttpApp, Request
from meterkit.pricing import Price, Tier
from meterkit.retention import RetentionError, parse_retention, retained_from

DAY = 86400
# A Tuesday at 10:20:30 UTC: nothing about retention is aligned to it.
NOW = int(dt.datetime(2026, 3, 17, 10, 20, 30, tzinfo=dt.timezone.utc).timestamp())
SPEC = MeterSpec(
    "calls",
    (
        Measure("n"),
        Measure("peak", "max"),
        Measure("last", "latest"),
        Measure("level", "sum", gauge=True),
    ),
    (Dimension("model"), Dimension("project_id")),
)
UNIQUE = MeterSpec("visitors", (Measure("user", "unique_count"),))


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


def history(days: int = 60, per_day: int = 37) -> list[Event]:
    """Events over the ``days`` days before NOW, every hour of the day hit some day."""
    out = []
    for i in range(days * per_day):
        t = NOW - days * DAY + i * (DAY // per_day) + i % 61
        out.append(
            Event(
                f"e{i}",
                "calls",
                "org_a" if i % 5 else "org_b",
                t,
                {"n": i % 7 + 1, "peak": i % 13, "last": i, "level": i % 4},
                {"model": ("m1", "m2", "m3")[i % 3], "project_id": f"p{i % 2}"},
            )
        )
    return out


def _url(kind: str, tmp_path: Path) -> Iterator[str]:
    yield from services.store_urls(kind, tmp_path, "k")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from _url(request.param, tmp_path)


def graduated(bound: int) -> Price:
    """``calls.n`` at 0.25 up to ``bound`` units a month, 0.125 after."""
    return Price(
        "calls",
        "n",
        line_item="calls",
        quantity_unit="calls",
        tiers=[Tier(bound, "0.25"), Tier(None, "0.125")],
        tier_mode="graduated",
    )


def answers(m: Meter, org: str = "org_a") -> dict[str, object]:
    """Hour and day answers over the whole history, and costs of an old month."""
    day = NOW - NOW % DAY
    out: dict[str, object] = {}
    for width, start, end in (
        ("1d", day - 61 * DAY, day + DAY),
        ("1h", day - 50 * DAY + 3600, day - 48 * DAY - 7200),
        ("1d", day - 45 * DAY, NOW - 100),  # the end unaligned, inside the retained days
    ):
        pages = []
        page = None
        while True:
            found = m.usage(
                "calls",
                organization_id=org,
                start_time=start,
                end_time=end,
                bucket_width=width,
                group_by=["model", "project_id"],
                page=page,
            )
            pages.append(found.to_dict()["data"])
            if not found.has_more:
                break
            page = found.next_page
        out[f"{width} {start} {end}"] = pages
    costs = m.costs(
        organization_id=org,
        start_time=day - 58 * DAY,
        end_time=day - 28 * DAY,
        group_by=["line_item", "project_id"],
        limit=30,
    )
    out["costs"] = costs.to_dict()["data"]
    return out


def test_parse_retention() -> None:
    assert parse_retention(90) == 90
    assert parse_retention("90d") == 90
    assert parse_retention(" 7D ") == 7
    assert parse_retention(dt.timedelta(days=30)) == 30
    assert parse_retention(None) is None
    for bad in (0, -3, "90", "12h", "d", 1.5, True, dt.timedelta(hours=36), [90]):
        with pytest.raises(ValidationError) as err:
            parse_retention(bad, "retention.calls")
        assert err.value.field == "retention.calls"
        assert "whole number of days" in err.value.message


def test_the_retained_window_starts_on_a_utc_day() -> None:
    since = retained_from(NOW, 30)
    assert since % DAY == 0
    assert NOW - 31 * DAY < since <= NOW - 30 * DAY


def test_an_old_event_is_refused_and_its_batch_stores_nothing(url: str) -> None:
    clock = Clock(NOW)
    with Meter(url, meters=[SPEC], clock=clock, retention={"calls": 30}) as m:
        since = retained_from(NOW, 30)
        old = Event("old", "calls", "org_a", since - 1, {"n": 1}, {})
        with pytest.raises(RetentionError) as err:
            m.record("calls", {"n": 1}, organization_id="org_a", time=since - 1, id="old")
        assert err.value.field == "event.time"
        assert "meter 'calls' keeps raw events for 30 days" in err.value.message
        assert err.value.retained_from == since and err.value.days == 30
        good = Event("good", "calls", "org_a", since, {"n": 5}, {})
        with pytest.raises(RetentionError) as err:
            m.record_many([good, old])
        assert err.value.field == "events[1].time"
        assert m.total("calls", "n", organization_id="org_a", start_time=since, end_time=NOW) == 0
        m.record_many([good])  # the first second of the window is kept
        assert m.total("calls", "n", organization_id="org_a", start_time=since, end_time=NOW) == 5


def test_prune_keeps_hour_and_day_answers_and_costs(url: str) -> None:
    clock = Clock(NOW)
    with Meter(url, meters=[SPEC], clock=clock) as m:
        m.set_price(graduated(2000))
        everything = history()
        m.record_many(everything)
        before = {org: answers(m, org) for org in ("org_a", "org_b")}
        recent = m.usage(
            "calls",
            organization_id="org_a",
            start_time=retained_from(NOW, 30) + 30,
            end_time=retained_from(NOW, 30) + 4 * 3600,
            bucket_width="1m",
            limit=1440,
        ).to_dict()
        assert m.set_retention("calls", "30d") == 30
        dropped = m.prune()
        cut = retained_from(NOW, 30) - DAY  # one day of margin
        assert dropped == {"calls": sum(e.time < cut for e in everything)} and dropped["calls"]
        assert m.prune() == {"calls": 0}
        assert {org: answers(m, org) for org in ("org_a", "org_b")} == before
        again = m.usage(
            "calls",
            organization_id="org_a",
            start_time=retained_from(NOW, 30) + 30,
            end_time=retained_from(NOW, 30) + 4 * 3600,
            bucket_width="1m",
            limit=1440,
        )
        assert again.to_dict() == recent
        assert m.verify_rollups() == []
        assert m.rebuild_rollups("calls") == {"calls": sum(e.time >= cut for e in everything)}
        assert m.verify_rollups() == []
        assert {org: answers(m, org) for org in ("org_a", "org_b")} == before
        # A dropped event sent again is refused, not counted twice.
        with pytest.raises(RetentionError):
            m.record_many([everything[0]])


def test_queries_that_need_dropped_events_fail_naming_the_retention(url: str) -> None:
    clock = Clock(NOW)
    with Meter(url, meters=[SPEC, UNIQUE], clock=clock, retention={"calls": 30}) as m:
        since = retained_from(NOW, 30)
        hour = since - 5 * DAY
        for start, width in ((hour, "1m"), (hour + 60, "1h"), (hour + 1, "1d")):
            with pytest.raises(RetentionError) as err:
                m.usage("calls", organization_id="org_a", start_time=start, bucket_width=width)
            assert err.value.field == "start_time"
            assert "meter 'calls' keeps raw events for 30 days" in err.value.message
            assert "bucket_width 1h or 1d with a start_time on the hour" in err.value.message
        # On the hour, hours and days come from rollups, even into the retained window.
        m.usage("calls", organization_id="org_a", start_time=hour, bucket_width="1h", limit=168)
        m.usage("calls", organization_id="org_a", start_time=hour, bucket_width="1d")
        # A meter without rollups reads events for every query.
        m.set_retention("visitors", 7)
        with pytest.raises(RetentionError) as err:
            m.usage("visitors", organization_id="org_a", start_time=NOW - 8 * DAY)
        assert "keeps no rollups" in err.value.message
        m.usage("visitors", organization_id="org_a", start_time=retained_from(NOW, 7))
        assert m.prune() == {"calls": 0, "visitors": 0}
        # Time moves on: what was kept yesterday may not be today.
        start = retained_from(NOW, 30) + 30
        m.usage("calls", organization_id="org_a", start_time=start, bucket_width="1m")
        clock.now += DAY
        with pytest.raises(RetentionError):
            m.usage("calls", organization_id="org_a", start_time=start, bucket_width="1m")


def test_the_retention_is_kept_by_the_store(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    with Meter(db, meters=[SPEC], clock=Clock(NOW)) as m:
        m.set_retention("calls", 30)
    with Meter(db, meters=[SPEC], clock=Clock(NOW)) as m:
        assert m.retention == {"calls": 30}
        with pytest.raises(RetentionError):
            m.record("calls", {"n": 1}, organization_id="org_a", time=NOW - 40 * DAY)
        assert m.set_retention("calls", None) is None
    with Meter(db, meters=[SPEC], clock=Clock(NOW)) as m:
        assert m.retention == {}
        m.record("calls", {"n": 1}, organization_id="org_a", time=NOW - 40 * DAY)


def test_bad_retention_names_the_field_and_opens_nothing(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    with pytest.raises(ValidationError) as err:
        Meter(f"sqlite:///{db}", retention={"calls": "forever"})
    assert err.value.field == "retention.calls"
    assert not db.exists()
    with pytest.raises(ValidationError) as err:
        Meter("memory://", retention={"nope": 30})
    assert err.value.field == "retention.nope" and "unknown meter" in err.value.message


def test_config_file_sets_retention(tmp_path: Path) -> None:
    config = tmp_path / "meterkit.toml"
    config.write_text(
        f'store = "sqlite:///{tmp_path / "c.db"}"\n\n[retention]\ncompletions = "90d"\n'
        "embeddings = 30\n"
    )
    with Meter.from_config(config, clock=Clock(NOW)) as m:
        assert m.retention == {"completions": 90, "embeddings": 30}
    config.write_text('store = "memory://"\n\n[retention]\ncompletions = "3 months"\n')
    with pytest.raises(ValidationError) as err:
        Meter.from_config(config)
    assert err.value.field == "retention.completions"


def test_cli_prunes(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'p.db'}"
    runner = CliRunner()
    with Meter(db, max_future_skew=None) as m:
        now = m.now()
        m.record_many(
            [
                Event(f"c{i}", "completions", "org_a", now - i * DAY, {"input_tokens": 1}, {})
                for i in range(50)
            ]
        )
    nothing = runner.invoke(main, ["prune", "--db", db])
    assert nothing.exit_code == 0 and "no meter has a retention" in nothing.output
    with Meter(db) as m:
        m.set_retention("completions", 30)
        cut = retained_from(m.now(), 30) - DAY
        want = sum(now - i * DAY < cut for i in range(50))
    done = runner.invoke(main, ["prune", "--db", db, "--meter", "completions"])
    assert done.exit_code == 0, done.output
    assert f"completions: {want:,} events dropped (retention 30 days)" in done.output
    good = runner.invoke(main, ["rollups", "verify", "--db", db])
    assert good.exit_code == 0, good.output


def test_http_answers_a_query_past_the_retention_with_the_error_shape() -> None:
    with Meter("memory://", clock=Clock(NOW), retention={"completions": 30}) as m:
        token, _ = create_key(m, "org_a", "admin", ("usage:read",))
        r = HttpApp(m).handle(
            Request(
                "GET",
                "/v1/organization/usage/completions",
                (("start_time", str(NOW - 40 * DAY + 1)), ("bucket_width", "1d")),
                {"authorization": f"Bearer {token}"},
            )
        )
        assert r.status == 400
        body = json.loads(r.body)
        assert body["error"]["param"] == "start_time"
        assert "keeps raw events for 30 days" in body["error"]["message"]


def test_costs_past_a_dropped_tier_crossing(url: str) -> None:
    # The tier bound is passed on a day that prune drops. Ungrouped, that day's usage is one
    # aggregate per moment and is priced across the bound exactly; split by project, which
    # project's units fell above the bound depends on the order of events that are gone.
    with Meter(url, meters=[SPEC], clock=Clock(NOW)) as m:
        m.set_price(graduated(1000))
        m.record_many(history())
        day = NOW - NOW % DAY
        window = {"organization_id": "org_a", "start_time": day - 40 * DAY, "limit": 30}
        whole = m.costs(**window, group_by=["line_item"]).to_dict()
        m.set_retention("calls", 30)
        assert m.prune()["calls"] > 0
        assert m.costs(**window, group_by=["line_item"]).to_dict() == whole
        with pytest.raises(RetentionError) as err:
            m.costs(**window, group_by=["line_item", "project_id"])
        assert err.value.field == "start_time"
        assert "keeps raw events for 30 days" in err.value.message
