"""SQLite specifics: URL options, durability setting, and a busy database as StoreUnavailable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import meterkit
from meterkit import Plan


def pragma(m: meterkit.Meter, name: str) -> object:
    return m.store.conn.execute(f"PRAGMA {name}").fetchone()[0]  # type: ignore[attr-defined]


def test_durable_by_default(tmp_path: Path) -> None:
    with meterkit.Meter(f"sqlite:///{tmp_path}/a.db") as m:
        assert pragma(m, "journal_mode") == "wal"
        assert pragma(m, "synchronous") == 2  # FULL: a commit is on disk before it returns


def test_synchronous_normal_on_request(tmp_path: Path) -> None:
    with meterkit.Meter(f"sqlite:///{tmp_path}/a.db?synchronous=normal") as m:
        assert pragma(m, "synchronous") == 1
        assert m.record("requests", {"requests": 1}, organization_id="o", time=60, id="e")


@pytest.mark.parametrize("query", ["synchronous=off", "timeout=-1", "timeout=soon", "colour=red"])
def test_bad_options(tmp_path: Path, query: str) -> None:
    with pytest.raises(meterkit.ValidationError) as info:
        meterkit.Meter(f"sqlite:///{tmp_path}/a.db?{query}")
    assert info.value.field == "url"


def locked_meter(tmp_path: Path, policy: str) -> tuple[meterkit.Meter, sqlite3.Connection]:
    m = meterkit.Meter(f"sqlite:///{tmp_path}/l.db?timeout=0.2", policy=policy)  # type: ignore[arg-type]
    m.set_plan(Plan("p", limits={"tokens": 5}))
    m.assign_plan("o", "p")
    other = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    return m, other


def test_busy_database_fails_closed(tmp_path: Path) -> None:
    m, other = locked_meter(tmp_path, "closed")
    with pytest.raises(meterkit.StoreUnavailable):
        m.check("o", {"tokens": 1})
    with pytest.raises(meterkit.StoreUnavailable):
        m.record("tokens", {"tokens": 1}, organization_id="o", time=60, id="e1")
    other.execute("ROLLBACK")
    # Recovers without reopening; the refused attempts debited nothing.
    decision = m.check("o", {"tokens": 5})
    assert decision.allowed and decision.used == 5
    m.close()


def test_busy_database_fails_open(tmp_path: Path) -> None:
    m, other = locked_meter(tmp_path, "open")
    decision = m.check("o", {"tokens": 1})
    assert decision.allowed and decision.degraded
    other.execute("ROLLBACK")
    assert m.quotas.used("o", "tokens") == 0
    m.close()


def test_every_aggregation_is_answered_in_sql(tmp_path: Path) -> None:
    """The store's own SQL answers (no fallback to the engine), and equals the engine."""
    from meterkit import Dimension, Measure, MeterSpec, engine
    from meterkit.validate import check_usage_query

    spec = MeterSpec(
        "mixed",
        [
            Measure("total"),
            Measure("seen", "count"),
            Measure("peak", "max"),
            Measure("low", "min"),
            Measure("last", "latest"),
            Measure("kinds", "unique_count"),
            Measure("held", gauge=True),
        ],
        [Dimension("project_id"), Dimension("flag", kind="bool")],
    )
    with meterkit.Meter(f"sqlite:///{tmp_path}/m.db", meters=[spec]) as m:
        for i in range(40):
            m.record(
                "mixed",
                {
                    "total": i,
                    "seen": 1,
                    "peak": i % 7,
                    "low": i % 5,
                    "last": i,
                    "kinds": i % 3,
                    "held": 10 * i,
                },
                organization_id="o",
                time=i * 1800,
                id=f"e{i}",
                dimensions={"project_id": f"p{i % 2}", "flag": i % 3 == 0},
            )
        for group_by in ([], ["project_id"], ["flag"]):
            query = check_usage_query(
                spec,
                organization_id="o",
                start_time=0,
                end_time=3 * 86400,
                bucket_width="1h",
                group_by=group_by,
                filters={"flag": [True, None]},
                limit=72,
            )
            native = m.store.aggregate(spec, query)
            assert native is not None
            events = m.store.scan("mixed", "o", query.scan_start, query.page_end)
            assert native == engine.aggregate(spec, query, events)
