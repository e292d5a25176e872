"""Durable ingest: ``Meter.record_many`` into SQLite vs raw ``sqlite3.executemany``.

Both sides write the same rows, in the same batches, into a table of the same shape (the
raw table is created from the DDL meterkit itself emitted: text primary key on ``id``, index
on ``(organization_id, time)``), with the same durability as meterkit's SQLite store: WAL
journal, one ``BEGIN IMMEDIATE`` transaction per batch, and the store's own ``synchronous``
setting, read from the :class:`~meterkit.stores.sqlite.SQLiteStore` the meter opened (``FULL``
by default, ``NORMAL`` with ``?synchronous=normal``) and checked on both connections.

Each :class:`Target` is one meterkit file and its raw twin at one ``synchronous`` setting.
All sides of all targets take turns batch by batch (the order rotating from batch to batch),
so the files grow in step and other load on the machine falls on every side alike. Only the
call that stores a batch is timed: the batch's ``Event`` objects (meterkit) or tuples (raw)
are built beforehand, as the input each side is handed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data import DIMENSIONS, MEASURES, METER, Row, batches, to_event

import meterkit
from meterkit.stores.sqlite import SQLiteStore

__all__ = [
    "COLUMNS",
    "TABLE",
    "IngestFigures",
    "Target",
    "ingest",
    "prepare_schema",
    "raw_connect",
    "table_ddl",
]

TABLE = f"events_{METER}"
# The store's column names, in the order of a data.Row.
COLUMNS = (
    "id",
    "organization_id",
    "time",
    *(f"d_{d}" for d in DIMENSIONS),
    *(f"v_{m}" for m in MEASURES),
)
# PRAGMA synchronous answers with a number.
_SYNCHRONOUS_LEVEL = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}


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


@dataclass
class Target:
    """A meterkit file and its raw twin, both written at one ``synchronous`` setting.

    ``options`` is the SQLite URL's query (``""``: the store's default, ``FULL``).
    ``synchronous`` is filled in by :func:`ingest` from the store meterkit opened.
    """

    mk_path: Path
    raw_path: Path
    options: str = ""
    synchronous: str = ""
    mk: IngestFigures = field(default_factory=lambda: IngestFigures(0, 0, 0.0, 0))
    raw: IngestFigures = field(default_factory=lambda: IngestFigures(0, 0, 0.0, 0))

    @property
    def url(self) -> str:
        return f"sqlite:///{self.mk_path}{'?' + self.options if self.options else ''}"


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
    with meterkit.Meter(f"sqlite:///{path}") as meter:
        meter.store.ensure_meter(meter.spec(METER))
    return table_ddl(path)


def _synchronous(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA synchronous").fetchone()
    return int(row[0])


def raw_connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """A raw connection with the store's settings: WAL and its ``synchronous`` level."""
    if synchronous not in _SYNCHRONOUS_LEVEL:
        raise ValueError(f"unknown synchronous setting {synchronous!r}")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def ingest(
    targets: Sequence[Target], ddl: Sequence[str], rows: Sequence[Row], batch_size: int
) -> None:
    """Store ``rows`` batch by batch through meterkit and through raw ``sqlite3``, per target.

    meterkit calls ``Meter.record_many``; raw runs ``INSERT OR IGNORE`` (the raw way to keep
    ids unique without failing the batch) through ``executemany`` in ``BEGIN IMMEDIATE`` …
    ``COMMIT``. Figures are added to each target's ``mk`` and ``raw``.
    """
    sql = (
        f"INSERT OR IGNORE INTO [{TABLE}] ({', '.join(COLUMNS)}) "
        f"VALUES ({', '.join('?' * len(COLUMNS))})"
    )
    meters: list[meterkit.Meter] = []
    conns: list[sqlite3.Connection] = []
    sides: list[Callable[[Sequence[Row]], None]] = []
    try:
        for target in targets:
            meter = meterkit.Meter(target.url)
            meters.append(meter)
            store = meter.store
            if not isinstance(store, SQLiteStore):
                raise TypeError(f"{target.url} did not open a SQLiteStore")
            # The raw side runs at whatever durability the store chose for itself.
            target.synchronous = store.synchronous
            conn = raw_connect(target.raw_path, store.synchronous)
            conns.append(conn)
            for statement in ddl:
                conn.execute(
                    statement.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1).replace(
                        "CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1
                    )
                )
            level = _synchronous(store.conn)
            assert level == _synchronous(conn) == _SYNCHRONOUS_LEVEL[store.synchronous], (
                target.url,
                level,
                _synchronous(conn),
            )
            sides += [_mk_side(meter, target.mk), _raw_side(conn, sql, target.raw)]
            target.mk.events += len(rows)
            target.raw.events += len(rows)
        for i, chunk in enumerate(batches(rows, batch_size)):
            k = i % len(sides)
            for side in sides[k:] + sides[:k]:
                side(chunk)
    finally:
        for conn in conns:
            conn.close()
        for meter in meters:
            meter.close()


def _mk_side(meter: meterkit.Meter, figures: IngestFigures) -> Callable[[Sequence[Row]], None]:
    def run(chunk: Sequence[Row]) -> None:
        events = [to_event(r) for r in chunk]
        t0 = time.perf_counter()
        result = meter.record_many(events)
        figures.seconds += time.perf_counter() - t0
        figures.accepted += result.accepted
        figures.batches += 1

    return run


def _raw_side(
    conn: sqlite3.Connection, sql: str, figures: IngestFigures
) -> Callable[[Sequence[Row]], None]:
    def run(chunk: Sequence[Row]) -> None:
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        cursor = conn.executemany(sql, chunk)
        conn.execute("COMMIT")
        figures.seconds += time.perf_counter() - t0
        figures.accepted += cursor.rowcount
        figures.batches += 1

    return run
