"""Quota counters in SQLite: rows of ``mk_counters`` and ``mk_holds``, each call one
``BEGIN IMMEDIATE`` transaction running :mod:`meterkit.counters` over them."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from meterkit import counters
from meterkit.models import CounterLine, CounterResult, Hold

__all__ = ["SQLiteCounters"]


class SQLiteCounters:
    """The :class:`~meterkit.stores.base.CounterStore` calls of the SQLite store, on its
    connection under its ``lock``, each in a ``write()`` transaction."""

    def __init__(
        self,
        conn: Callable[[], sqlite3.Connection],
        lock: threading.RLock,
        write: Callable[[], AbstractContextManager[sqlite3.Connection]],
        url: str = "",
    ) -> None:
        self._conn = conn
        self.lock = lock
        self.write = write
        self.url = url

    def close(self) -> None:
        """Nothing of its own: the store closes the connection."""

    @property
    def conn(self) -> sqlite3.Connection:
        return self._conn()

    def counters_apply(
        self, lines: Sequence[CounterLine], *, now: int, hold: Hold | None = None
    ) -> CounterResult:
        with self.lock, self.write() as conn:
            return counters.apply(CounterRows(conn, now), lines, now, hold)

    def counters_settle(self, hold_id: str, deltas: Sequence[tuple[str, int]], *, now: int) -> bool:
        with self.lock, self.write() as conn:
            return counters.settle(CounterRows(conn, now), hold_id, deltas, now)

    def counters_add(
        self, deltas: Sequence[tuple[str, int]], *, now: int, expires_at: int | None = None
    ) -> list[int]:
        with self.lock, self.write() as conn:
            backend = CounterRows(conn, now)
            return [backend.add(key, delta, expires_at) for key, delta in deltas]

    def counters_set(
        self, key: str, value: int, *, now: int, expires_at: int | None = None
    ) -> None:
        with self.lock, self.write() as conn:
            conn.execute(
                "INSERT INTO mk_counters(key, value, expires_at) VALUES (?, ?, ?) ON CONFLICT(key) "
                "DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                (key, value, expires_at),
            )

    def counters_read(self, keys: Sequence[str], *, now: int) -> list[int]:
        with self.lock:
            expired = self.conn.execute(
                "SELECT 1 FROM mk_holds WHERE expires_at <= ? LIMIT 1", (now,)
            ).fetchone()
            if expired is None:
                return CounterRows(self.conn, now).read(keys, now)
            # Give expired holds back first, as counters_apply would: reads agree with decisions.
            with self.write() as conn:
                backend = CounterRows(conn, now)
                counters.release_expired(backend, now)
                return backend.read(keys, now)

    def claim_once(self, marker: str, *, now: int, expires_at: int | None = None) -> bool:
        with self.lock, self.write() as conn:
            conn.execute(
                "DELETE FROM mk_claims WHERE marker = ? AND expires_at IS NOT NULL "
                "AND expires_at <= ?",
                (marker, now),
            )
            cur = conn.execute(
                "INSERT INTO mk_claims(marker, expires_at) VALUES (?, ?) "
                "ON CONFLICT(marker) DO NOTHING",
                (marker, expires_at),
            )
            return cur.rowcount == 1


class CounterRows:
    """Counter primitives in SQL; the caller holds a ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, conn: sqlite3.Connection, now: int) -> None:
        self.conn, self.now = conn, now
        # What this transaction has read or written, so a counter is selected once.
        self.seen: dict[str, tuple[int, int | None]] = {}

    def value(self, key: str) -> tuple[int, int | None]:
        if key not in self.seen:
            row = self.conn.execute(
                "SELECT value, expires_at FROM mk_counters WHERE key = ?", (key,)
            ).fetchone()
            live = row is not None and (row[1] is None or row[1] > self.now)
            self.seen[key] = (int(row[0]), row[1]) if live else (0, None)
        return self.seen[key]

    def read(self, keys: Sequence[str], now: int) -> list[int]:
        return [self.value(k)[0] for k in keys]

    def add(self, key: str, delta: int, expires_at: int | None) -> int:
        value, expires = self.value(key)
        value = counters.clamp(value + delta)
        expires = expires_at if expires_at is not None else expires
        self.conn.execute(
            "INSERT INTO mk_counters(key, value, expires_at) VALUES (?, ?, ?) ON CONFLICT(key) "
            "DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            (key, value, expires),
        )
        self.seen[key] = (value, expires)
        return value

    def take_holds(self, sql: str, params: tuple[Any, ...]) -> list[Hold]:
        rows = self.conn.execute(
            f"SELECT id, organization_id, amounts, expires_at FROM mk_holds WHERE {sql}", params
        ).fetchall()
        holds = [
            Hold(r[0], r[1], tuple((k, int(v)) for k, v in json.loads(r[2])), r[3]) for r in rows
        ]
        self.conn.executemany("DELETE FROM mk_holds WHERE id = ?", [(h.id,) for h in holds])
        return holds

    def pop_expired_holds(self, now: int) -> list[Hold]:
        return self.take_holds("expires_at <= ?", (now,))

    def pop_hold(self, hold_id: str) -> Hold | None:
        found = self.take_holds("id = ?", (hold_id,))
        return found[0] if found else None

    def put_hold(self, hold: Hold) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO mk_holds(id, organization_id, amounts, expires_at) "
            "VALUES (?, ?, ?, ?)",
            (hold.id, hold.organization_id, json.dumps(hold.amounts), hold.expires_at),
        )
