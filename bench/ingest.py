"""Durable ingest: ``Meter.record_many`` into SQLite vs raw ``sqlite3.executemany``.

Both sides write the same rows, in the same batches, into a table of the same shape (the
raw table is created from the DDL meterkit itself emitted: text primary key on ``id``, index
on ``(organization_id, time)``), with the same durability settings as meterkit's SQLite
store: WAL journal, ``synchronous=NORMAL``, one ``BEGIN IMMEDIATE`` transaction per batch.

The two sides take turns batch by batch. Only the call that stores a batch is timed: the
batch's ``Event`` objects (meterkit) or tuples (raw) are built beforehand, as the input each
side is handed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data import DIMENSIONS, MEASURES, METER, Row, batches, to_event

import meterkit

__all__ = ["IngestFigures", "ingest", "prepare_schema", "raw_connect", "table_ddl"]

TABLE = f"events_{METER}"
# The store's column names, in the order of a data.Row.
COLUMNS = (
    "id",
    "organization_id",
    "time",
    *(f"d_{d}" for d in DIMENSIONS),
    *(f"v_{m}" for m in MEASURES),
)


@dataclass
class IngestFigures:
    events: int
    accepted: int
    seconds: float
    batches: int

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "events_per_s": round(self.events_per_s)}


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def table_ddl(path: Path) -> list[str]:
    """The CREATE statements of meterkit's events table and its indexes, from its own file."""
    conn = sqlite3.connect(path)
    try:
        ddl = [
            sql
            for (sql,) in conn.execute(
                "SELECT sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL "
                "ORDER BY type DESC",  # the table before its indexes
                (TABLE,),
            )
        ]
    finally:
        conn.close()
    if not ddl:
        raise RuntimeError(f"{path} has no table {TABLE}: has meterkit recorded into it?")
    return ddl


def prepare_schema(path: Path) -> list[str]:
    """Let meterkit create its (empty) events table in ``path``, and return its DDL."""
    with meterkit.Meter(_url(path)) as meter:
        meter.store.ensure_meter(meter.spec(METER))
    return table_ddl(path)


def raw_connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def ingest(
    mk_path: Path, raw_path: Path, ddl: Sequence[str], rows: Sequence[Row], batch_size: int
) -> tuple[IngestFigures, IngestFigures]:
    """Store ``rows`` batch by batch through meterkit and through raw ``sqlite3``.

    The two sides take turns batch by batch (alternating which goes first), so both files
    grow in step and other load on the machine falls on both alike. meterkit calls
    ``Meter.record_many``; raw runs ``INSERT OR IGNORE`` (the raw way to keep ids unique
    without failing the batch) through ``executemany`` in ``BEGIN IMMEDIATE`` … ``COMMIT``.
    """
    sql = (
        f"INSERT OR IGNORE INTO [{TABLE}] ({', '.join(COLUMNS)}) "
        f"VALUES ({', '.join('?' * len(COLUMNS))})"
    )
    mk = IngestFigures(len(rows), 0, 0.0, 0)
    raw = IngestFigures(len(rows), 0, 0.0, 0)
    conn = raw_connect(raw_path)
    try:
        for statement in ddl:
            conn.execute(
                statement.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1).replace(
                    "CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1
                )
            )
        with meterkit.Meter(_url(mk_path)) as meter:

            def run_mk(chunk: Sequence[Row]) -> None:
                events = [to_event(r) for r in chunk]
                t0 = time.perf_counter()
                result = meter.record_many(events)
                mk.seconds += time.perf_counter() - t0
                mk.accepted += result.accepted
                mk.batches += 1

            def run_raw(chunk: Sequence[Row]) -> None:
                t0 = time.perf_counter()
                conn.execute("BEGIN IMMEDIATE")
                cursor = conn.executemany(sql, chunk)
                conn.execute("COMMIT")
                raw.seconds += time.perf_counter() - t0
                raw.accepted += cursor.rowcount
                raw.batches += 1

            for i, chunk in enumerate(batches(rows, batch_size)):
                first, second = (run_mk, run_raw) if i % 2 == 0 else (run_raw, run_mk)
                first(chunk)
                second(chunk)
    finally:
        conn.close()
    return mk, raw
