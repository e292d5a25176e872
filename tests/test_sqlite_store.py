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
