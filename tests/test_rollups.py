"""Rollups: the planner, rebuild and verify, upgrades of the layout, and what a query reads.

That every store's answers from rollups equal the engine's is the conformance suite's
(``test_rollable_meter_equals_the_engine`` and the random-events property, on every store).
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import services
from meterkit import Event, Measure, Meter, MeterSpec
from meterkit.cli import main
from meterkit.engine import rollup
from meterkit.testing import T0, make_query, store_rows

DAY = 86400
SPEC = MeterSpec(
    "calls",
    (
        Measure("n"),
        Measure("peak", "max"),
        Measure("last", "latest"),
        Measure("level", "sum", gauge=True),
    ),
)
WIDTHS = {"1m": 60, "1h": 3600, "1d": DAY}


def events(n: int = 400, org: str = "org_a") -> list[Event]:
    return [
        Event(
            f"e{i}",
            "calls",
            org,
            T0 + i * 997 % (3 * DAY),
            {"n": i % 7 + 1, "peak": i % 13, "last": i, "level": i % 5},
            {},
        )
        for i in range(n)
    ]


# -- the planner ------------------------------------------------------------------------------


@given(
    start=st.integers(T0 - 3 * DAY, T0 + 3 * DAY),
    length=st.integers(1, 5 * DAY),
    width=st.sampled_from(sorted(WIDTHS.values())),
)
def test_plan_covers_the_range_with_the_coarsest_aligned_grains(
    start: int, length: int, width: int
) -> None:
    end = start + length
    segments = rollup.plan(start, end, width)
    # Contiguous, in order, exactly [start, end).
    assert segments[0][1] == start and segments[-1][2] == end
    for (_, _, a_end), (_, b_start, _) in itertools.pairwise(segments):
        assert a_end == b_start
    for grain, lo, hi in segments:
        assert lo < hi
        if grain is None:
            assert hi - lo < 2 * 60, "raw events only for sub-minute edges"
            continue
        assert width % grain == 0 and lo % grain == 0 and hi % grain == 0
    # The coarsest usable grain is used wherever a whole bucket of it fits.
    coarsest = width
    lo, hi = -(-start // coarsest) * coarsest, end - end % coarsest
    if lo < hi:
        assert (coarsest, lo, hi) in segments


def test_plan_of_an_aligned_day_range_is_one_segment() -> None:
    assert rollup.plan(T0, T0 + 31 * DAY, DAY) == [(DAY, T0, T0 + 31 * DAY)]
    # No whole day fits: whole hours, then minutes and seconds at the edges.
    assert rollup.plan(T0 + 30, T0 + DAY + 3601, DAY) == [
        (None, T0 + 30, T0 + 60),
        (60, T0 + 60, T0 + 3600),
        (3600, T0 + 3600, T0 + DAY + 3600),
        (None, T0 + DAY + 3600, T0 + DAY + 3601),
    ]


# -- stores -----------------------------------------------------------------------------------


def _url(kind: str, tmp_path: Path) -> Iterator[str]:
    yield from services.store_urls(kind, tmp_path, "r")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from _url(request.param, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def kept_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store that keeps its data across reopening."""
    yield from _url(request.param, tmp_path)


def tamper(meter: Meter) -> None:
    """Damage one stored rollup row, as a bug or a hand-made edit would."""
    store = meter.store
    if hasattr(store, "conn"):  # SQLite
        store.conn.execute(
            "UPDATE [rollup_calls_1h] SET s_n = s_n + 5 WHERE bucket = "
            "(SELECT min(bucket) FROM [rollup_calls_1h])"
        )
    elif hasattr(store, "_rollups"):  # memory
        rows = next(v for k, v in store._rollups.items() if k[2] == 3600)
        _dims, values = next(iter(next(iter(rows.values())).values()))
        values[0] += 5
    else:
        store.db.run(
            "tampering",
            lambda cur: cur.execute(
                "UPDATE rollup_calls_1h SET s_n = s_n + 5 "
                "WHERE ctid = (SELECT min(ctid) FROM rollup_calls_1h)"
            ),
        )


def test_rebuild_and_verify(url: str) -> None:
    with Meter(url, meters=[SPEC], max_future_skew=None) as m:
        m.record_many(events())
        assert m.verify_rollups("calls") == []
        query = make_query(SPEC, org="org_a", start=T0, end=T0 + 3 * DAY, width="1h")
        before = store_rows(m.store, SPEC, query)
        tamper(m)
        found = m.verify_rollups(["calls"])
        assert len(found) == 1 and "s of n is" in found[0] and "3600s org_a" in found[0]
        seen: list[tuple[str, int]] = []
        assert m.rebuild_rollups("calls", progress=lambda name, n: seen.append((name, n))) == {
            "calls": 400
        }
        assert seen[-1] == ("calls", 400)
        assert m.verify_rollups() == []
        assert store_rows(m.store, SPEC, query) == before


def test_a_changed_aggregation_rebuilds_the_rollups(kept_url: str) -> None:
    url = kept_url
    with Meter(url, meters=[SPEC], max_future_skew=None) as m:
        m.record_many(events())
    # The same meter with `peak` now a minimum and `n` a count: other rollup cells.
    changed = MeterSpec(
        "calls",
        (
            Measure("n", "count"),
            Measure("peak", "min"),
            Measure("last", "latest"),
            Measure("level", "sum", gauge=True),
        ),
    )
    with Meter(url, meters=[changed], max_future_skew=None) as m:
        assert m.verify_rollups() == []
        page = m.usage("calls", organization_id="org_a", start_time=T0, end_time=T0 + 3 * DAY)
        got = {b.start_time: b.results[0].values for b in page.data}
        want = {
            day: {
                "n": sum(1 for e in events() if day <= e.time < day + DAY),
                "peak": min(e.values["peak"] for e in events() if day <= e.time < day + DAY),
            }
            for day in (T0, T0 + DAY, T0 + 2 * DAY)
        }
        assert {d: {k: v[k] for k in ("n", "peak")} for d, v in got.items()} == want


def test_a_widened_meter_keeps_its_rollups(kept_url: str) -> None:
    url = kept_url
    with Meter(url, meters=[SPEC], max_future_skew=None) as m:
        m.record_many(events())
    wider = MeterSpec("calls", (*SPEC.measures, Measure("extra", "max")))
    with Meter(url, meters=[wider], max_future_skew=None) as m:
        m.record("calls", {"n": 1, "extra": 9}, organization_id="org_a", id="x", time=T0 + 5)
        assert m.verify_rollups() == []
        page = m.usage("calls", organization_id="org_a", start_time=T0, end_time=T0 + DAY)
        (result,) = page.data[0].results
        assert result.values["extra"] == 9
        assert result.values["n"] == 1 + sum(e.values["n"] for e in events() if e.time < T0 + DAY)


def test_sums_past_the_integer_range_stay_exact(tmp_path: Path) -> None:
    # SQLite keeps 64-bit integers: a rollup sum past that range is stored as a float, and
    # the query answers from the events instead, exactly (as the engine does in Python).
    big = 2**53 - 1
    with Meter(f"sqlite:///{tmp_path / 'big.db'}", meters=[SPEC], max_future_skew=None) as m:
        m.record_many(
            [Event(f"b{i}", "calls", "org_a", T0 + i, {"n": big}, {}) for i in range(2048)]
        )
        total = m.total("calls", "n", organization_id="org_a", start_time=T0, end_time=T0 + DAY)
        assert total == 2048 * big and isinstance(total, int)


def test_an_aligned_query_reads_only_the_coarsest_rollup(tmp_path: Path) -> None:
    with Meter(f"sqlite:///{tmp_path / 'q.db'}", meters=[SPEC], max_future_skew=None) as m:
        m.record_many(events())
        sent: list[str] = []
        m.store.conn.set_trace_callback(sent.append)
        try:
            m.usage("calls", organization_id="org_a", start_time=T0, end_time=T0 + 3 * DAY)
            aligned = [s for s in sent if s.lstrip().upper().startswith("SELECT")]
            sent.clear()
            m.usage("calls", organization_id="org_a", start_time=T0 + 90, end_time=T0 + 2 * DAY)
            unaligned = [s for s in sent if s.lstrip().upper().startswith("SELECT")]
        finally:
            m.store.conn.set_trace_callback(None)
    assert aligned and all("[rollup_calls_1d]" in s for s in aligned)
    assert not any(t in s for s in aligned for t in ("[events_calls]", "_1h]", "_1m]"))
    for table in ("[rollup_calls_1d]", "[rollup_calls_1h]", "[rollup_calls_1m]", "[events_calls]"):
        assert any(table in s for s in unaligned), table


def test_unique_count_meters_answer_from_events(tmp_path: Path) -> None:
    spec = MeterSpec("visits", (Measure("n"), Measure("who", "unique_count")))
    with Meter(f"sqlite:///{tmp_path / 'u.db'}", meters=[spec], max_future_skew=None) as m:
        m.record_many(
            [
                Event(f"v{i}", "visits", "org_a", T0 + i, {"n": 1, "who": i % 3}, {})
                for i in range(9)
            ]
        )
        page = m.usage("visits", organization_id="org_a", start_time=T0, end_time=T0 + DAY)
        assert page.data[0].results[0].values == {"n": 9, "who": 3}
        tables = {
            r[0]
            for r in sqlite3.connect(tmp_path / "u.db").execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )
        }
        assert "events_visits" in tables and not any("rollup_visits" in t for t in tables)


def test_cli_verifies_and_rebuilds(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'c.db'}"
    with Meter(db, max_future_skew=None) as m:
        m.record_many(
            [
                Event(f"c{i}", "completions", "org_a", T0 + i * 61, {"input_tokens": i}, {})
                for i in range(50)
            ]
        )
        m.store.conn.execute("UPDATE [rollup_completions_1d] SET s_input_tokens = 0")
    runner = CliRunner()
    bad = runner.invoke(main, ["rollups", "verify", "--db", db, "--meter", "completions"])
    assert bad.exit_code == 1
    assert "s of input_tokens is 0, the events give 1225" in bad.output
    rebuilt = runner.invoke(main, ["rollups", "rebuild", "--db", db, "--meter", "completions"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "rebuilt completions: 50 events" in rebuilt.output
    good = runner.invoke(main, ["rollups", "verify", "--db", db])
    assert good.exit_code == 0 and "rollups agree with the events" in good.output
    unknown = runner.invoke(main, ["rollups", "verify", "--db", db, "--meter", "nope"])
    assert unknown.exit_code == 2 and "meters: unknown meter 'nope'" in unknown.output


# -- scans in chunks --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_scan_reads_in_chunks_and_misses_nothing(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks of 3 over events that share times: the next chunk starts after the last
    # (time, id) read, so ties across a chunk's end are neither lost nor read twice.
    import meterkit.stores.postgres.store as pg
    import meterkit.stores.sqlite.names as sq

    monkeypatch.setattr(sq if kind == "sqlite" else pg, "SCAN_CHUNK", 3)
    stored = [Event(f"s{i:02d}", "calls", "org_a", T0 + i // 4, {"n": i}, {}) for i in range(23)]
    for url in _url(kind, tmp_path):
        with Meter(url, meters=[SPEC], max_future_skew=None) as m:
            m.record_many(list(reversed(stored)))
            m.record("calls", {"n": 1}, organization_id="org_b", id="other", time=T0)
            got = list(m.store.scan("calls", "org_a", T0, T0 + 5))
            assert [e.id for e in got] == [e.id for e in stored if e.time < T0 + 5]
            assert [e.id for e in m.store.scan("calls", "org_a", T0 + 1, T0 + 3)] == [
                f"s{i:02d}" for i in range(4, 12)
            ]
            assert list(m.store.scan("calls", "org_a", T0 + 100, T0 + 200)) == []


def test_a_dropped_rollup_table_is_built_again(kept_url: str) -> None:
    with Meter(kept_url, meters=[SPEC], max_future_skew=None) as m:
        m.record_many(events())
        store = m.store
        if hasattr(store, "conn"):
            store.conn.execute("DROP TABLE [rollup_calls_1h]")
        else:
            store.db.run("dropping", lambda cur: cur.execute("DROP TABLE rollup_calls_1h"))
    with Meter(kept_url, meters=[SPEC], max_future_skew=None) as m:
        assert m.verify_rollups() == []
        page = m.usage(
            "calls", organization_id="org_a", start_time=T0, end_time=T0 + DAY, bucket_width="1h"
        )
        assert sum(r.values["n"] for b in page.data for r in b.results) == sum(
            e.values["n"] for e in events() if e.time < T0 + DAY
        )
