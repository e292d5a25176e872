"""The SQLite store: events, rollups and records in one file."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import sqlite_utils

from meterkit.engine import rollup, timeweighted
from meterkit.engine.aggregate import Rows
from meterkit.errors import ValidationError
from meterkit.models import DimValue, Event, MeterSpec, UsageQuery
from meterkit.stores import sqlagg
from meterkit.stores.base import CounterCalls
from meterkit.stores.sqlite import names
from meterkit.stores.sqlite.connection import Immediate, migrate
from meterkit.stores.sqlite.counters import SQLiteCounters
from meterkit.stores.sqlite.names import (
    CELL_TYPES,
    CHUNK,
    DIALECT,
    cell_column,
    dim_column,
    events_table,
    fit_sums,
    options_from_url,
    path_from_url,
    rollup_layout,
    rollup_table,
    upsert_batches,
    value_column,
)
from meterkit.validate import check_record

__all__ = ["SQLiteStore"]


class SQLiteStore(CounterCalls):
    """One connection shared under a lock; ``BEGIN IMMEDIATE`` serialises writing processes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = path_from_url(url)
        options = options_from_url(url)
        # FULL by default: a commit is on disk before append() returns, so an acknowledged
        # event survives a power loss too. "normal" trades that for write speed.
        self.synchronous = options.get("synchronous", "full").upper()
        self._lock = threading.RLock()
        self._upserts: dict[tuple[MeterSpec, int, tuple[int, ...]], str] = {}
        folder = os.path.dirname(os.path.abspath(self.path))
        if self.path != ":memory:" and not os.path.isdir(folder):
            raise ValidationError("url", f"the folder of {self.path!r} does not exist: {folder}")
        conn = sqlite3.connect(
            self.path,
            timeout=float(options.get("timeout", "30")),
            isolation_level=None,
            check_same_thread=False,
        )
        self.db = sqlite_utils.Database(conn)
        if self.path != ":memory:":
            self.db.enable_wal()
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        self._specs: dict[str, MeterSpec] = {}
        self._undo: list[tuple[str, MeterSpec | None]] = []
        with self._lock, self._write():
            self.db.table("mk_meta").create(
                {"key": str, "value": str}, pk="key", if_not_exists=True
            )
            self.db.table("mk_records").create(
                {"kind": str, "key": str, "data": str}, pk=("kind", "key"), if_not_exists=True
            )
            self.db.table("mk_counters").create(
                {"key": str, "value": int, "expires_at": int}, pk="key", if_not_exists=True
            )
            self.db.table("mk_holds").create(
                {"id": str, "organization_id": str, "amounts": str, "expires_at": int},
                pk="id",
                if_not_exists=True,
            )
            conn.execute("CREATE INDEX IF NOT EXISTS idx_mk_holds_expires ON mk_holds (expires_at)")
            self.db.table("mk_claims").create(
                {"marker": str, "expires_at": int}, pk="marker", if_not_exists=True
            )
            conn.execute(
                "INSERT INTO mk_meta(key, value) VALUES ('cursor_secret', ?)"
                " ON CONFLICT(key) DO NOTHING",
                (os.urandom(32).hex(),),
            )
            # Under BEGIN IMMEDIATE: a second process opening the file now waits, then finds
            # the version this one wrote and migrates nothing again.
            migrate(self.db, self.path)
        row = conn.execute("SELECT value FROM mk_meta WHERE key = 'cursor_secret'").fetchone()
        self._secret = bytes.fromhex(row[0])
        self.counter_rows = SQLiteCounters(lambda: self.conn, self._lock, self._write, url)
        """The quota counters' calls (this store's ``counters_*``)."""

    @property
    def conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection = self.db.conn
        return conn

    def _write(self) -> Immediate:
        return Immediate(self.conn, self._forget_rolled_back, self._undo.clear)

    def _forget_rolled_back(self) -> None:
        for name, previous in reversed(self._undo):
            if previous is None:
                self._specs.pop(name, None)
            else:
                self._specs[name] = previous
        self._undo.clear()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One ``BEGIN IMMEDIATE`` transaction around every call made inside, in this thread."""
        with self._lock, self._write():
            yield

    def ensure_meter(self, spec: MeterSpec) -> None:
        # Known already: no lock, so callers queueing for a group commit do not wait here on
        # the write in flight.
        known = self._specs.get(spec.name)
        if known is spec or known == spec:
            return
        with self._lock:
            if self._specs.get(spec.name) == spec:
                return
            table = self.db.table(events_table(spec.name))
            # Value columns are declared BLOB so SQLite keeps each number as given (int or
            # float) rather than coercing it by affinity.
            columns: dict[str, Any] = {"id": str, "organization_id": str, "time": int}
            for d in spec.dimensions:
                columns[dim_column(d.name)] = int if d.kind == "bool" else str
            for m in spec.measures:
                columns[value_column(m.name)] = bytes
            with self._write():
                if not table.exists():
                    table.create(
                        columns,
                        pk=("organization_id", "id"),
                        not_null={"organization_id", "time"},
                        if_not_exists=True,
                    )
                    self.conn.execute(
                        f"CREATE INDEX IF NOT EXISTS [idx_{table.name}_org_time] "
                        f"ON [{table.name}] (organization_id, time)"
                    )
                else:
                    have = set(table.columns_dict)
                    for name, kind in columns.items():
                        if name not in have:
                            table.add_column(name, kind)
                self._ensure_rollups(spec)
            if self.conn.in_transaction:
                # Inside a caller's transaction the DDL may yet roll back; remember what to undo.
                self._undo.append((spec.name, self._specs.get(spec.name)))
            self._specs[spec.name] = spec

    def _ensure_rollups(self, spec: MeterSpec) -> None:
        """Create, widen or rebuild ``spec``'s rollup tables; the caller holds the write lock.

        A file written before rollups existed (or a measure whose aggregation changed) gets
        them built from its events here, once: the next process finds the layout recorded.
        """
        marker = f"rollups/{spec.name}"
        row = self.conn.execute("SELECT value FROM mk_meta WHERE key = ?", (marker,)).fetchone()
        old = json.loads(row[0]) if row else None
        want = rollup_layout(spec) if rollup.rollable(spec) else None
        present = all(self.db.table(rollup_table(spec.name, g)).exists() for g in rollup.GRAINS)
        if old == want and want is not None and present:
            self._widen_rollups(spec)
            return
        # Kept (and widened) when every measure keeps what it kept; a missing table means
        # the rollups are incomplete, so they are built anew.
        keep = (
            present
            and old is not None
            and want is not None
            and all(old.get(m) in (None, kinds) for m, kinds in want.items())
        )
        if keep:
            self._widen_rollups(spec)
        else:
            for grain in rollup.GRAINS:
                self.conn.execute(f"DROP TABLE IF EXISTS [{rollup_table(spec.name, grain)}]")
        if want is None:
            self.conn.execute("DELETE FROM mk_meta WHERE key = ?", (marker,))
            return
        self.conn.execute(
            "INSERT INTO mk_meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (marker, json.dumps(want, sort_keys=True)),
        )
        if not keep:
            self._widen_rollups(spec)
            self._fold_all(spec)

    def _widen_rollups(self, spec: MeterSpec) -> None:
        columns: dict[str, Any] = {"organization_id": str, "bucket": int, "series": str}
        for d in spec.dimensions:
            columns[dim_column(d.name)] = int if d.kind == "bool" else str
        for kind, name in rollup.columns(spec):
            columns[cell_column(kind, name)] = CELL_TYPES[kind]
        decl = {str: "TEXT", int: "INTEGER", bytes: "BLOB"}
        for grain in rollup.GRAINS:
            table = self.db.table(rollup_table(spec.name, grain))
            if not table.exists():
                # WITHOUT ROWID: the rows live in their key's b-tree, so an upsert updates one
                # b-tree instead of a table and its key index.
                body = ", ".join(f"[{n}] {decl[t]}" for n, t in columns.items())
                self.conn.execute(
                    f"CREATE TABLE [{table.name}] ({body}, "
                    "PRIMARY KEY (organization_id, bucket, series)) WITHOUT ROWID"
                )
                continue
            have = set(table.columns_dict)
            for name, kind in columns.items():
                if name not in have:
                    table.add_column(name, kind)

    def _fold_all(
        self, spec: MeterSpec, progress: Callable[[int], None] | None = None, since: int = 0
    ) -> int:
        """Fold every stored event of ``spec`` from ``since`` into its (empty or partial)
        rollups."""
        last, done = -1, 0
        after = " AND time >= ?" if since else ""
        tail = [since] if since else []
        while True:
            rows = self.conn.execute(
                f"SELECT rowid FROM [{events_table(spec.name)}] WHERE rowid > ? ORDER BY rowid "
                "LIMIT 1 OFFSET 9999",
                (last,),
            ).fetchone()
            upto = rows[0] if rows else None
            where = "rowid > ?" + (" AND rowid <= ?" if upto is not None else "") + after
            params = ([last] if upto is None else [last, upto]) + tail
            chunk = list(self._select(spec.name, where, params, spec))
            self._add_rollups(self.conn, spec, chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)
            if upto is None:
                return done
            last = upto

    def _add_rollups(
        self, conn: sqlite3.Connection, spec: MeterSpec, events: Sequence[Event]
    ) -> None:
        if not events or not rollup.rollable(spec):
            return
        sums = [i for i, (kind, _) in enumerate(rollup.columns(spec)) if kind == "s"]
        folded = rollup.fold_grains(spec, events)
        fit_sums(folded, sums)
        for grain, rows in folded.items():
            # A wide meter's events carry a few of its measures: each statement writes only
            # the cells its rows have (NULL cells merge as nothing, so leaving them out is
            # the same upsert, with far fewer values bound and compared).
            for cells, params in upsert_batches(rows).items():
                conn.executemany(self._upsert(spec, grain, cells), params)

    def _upsert(self, spec: MeterSpec, grain: int, cells: tuple[int, ...]) -> str:
        key = (spec, grain, cells)
        sql = self._upserts.get(key)
        if sql is None:
            if len(self._upserts) > 4096:
                self._upserts.clear()
            sql = self._upserts[key] = sqlagg.upsert(spec, grain, DIALECT, cells=cells)
        return sql

    def rebuild_rollups(
        self, spec: MeterSpec, progress: Callable[[int], None] | None = None, *, since: int = 0
    ) -> int:
        """Empty ``spec``'s rollups (from ``since``) and fold them anew from its events, in one
        transaction; ``progress(events_read)`` after each chunk. The number of events read."""
        with self._lock, self._write():
            self.ensure_meter(spec)
            if not rollup.rollable(spec):
                return 0
            for grain in rollup.GRAINS:
                self.conn.execute(
                    f"DELETE FROM [{rollup_table(spec.name, grain)}] WHERE bucket >= ?", (since,)
                )
            return self._fold_all(spec, progress, since)

    def drop_events_before(self, spec: MeterSpec, before: int) -> int:
        """Delete ``spec``'s events before ``before`` and its minute rollups there, in one
        transaction (per organization, along the (organization_id, time) index)."""
        with self._lock, self._write():
            self.ensure_meter(spec)
            events = events_table(spec.name)
            minutes = rollup_table(spec.name, rollup.GRAINS[0])
            rolled = rollup.rollable(spec)
            dropped = 0
            orgs = self.conn.execute(f"SELECT DISTINCT organization_id FROM [{events}]")
            for (org,) in orgs.fetchall():
                dropped += self.conn.execute(
                    f"DELETE FROM [{events}] WHERE organization_id = ? AND time < ?", (org, before)
                ).rowcount
                if rolled:
                    self.conn.execute(
                        f"DELETE FROM [{minutes}] WHERE organization_id = ? AND bucket < ?",
                        (org, before),
                    )
            return dropped

    def organizations(self, meter: str) -> list[str]:
        if meter not in self._specs:
            return []
        with self._lock:
            table = events_table(meter)
            rows = self.conn.execute(
                f"SELECT DISTINCT organization_id FROM [{table}] ORDER BY organization_id"
            ).fetchall()
        return [r[0] for r in rows]

    def rollup_rows(
        self, spec: MeterSpec, grain: int
    ) -> dict[rollup.Key, tuple[dict[str, DimValue], list[Any]]]:
        """Every stored rollup row of ``spec`` at ``grain`` (none when it keeps no rollups)."""
        if not rollup.rollable(spec):
            return {}
        dims = spec.dimension_names
        bools = {d.name for d in spec.dimensions if d.kind == "bool"}
        cols = sqlagg.rollup_columns(spec, DIALECT)
        with self._lock:
            found = self.conn.execute(
                f"SELECT {', '.join(cols)} FROM {DIALECT.rollup(spec.name, grain)}"
            ).fetchall()
        out = {}
        n = len(dims)
        for row in found:
            values = {
                d: (bool(v) if d in bools else v)
                for d, v in zip(dims, row[3 : 3 + n])
                if v is not None
            }
            out[(row[0], row[1], row[2])] = (values, list(row[3 + n :]))
        return out

    def append(self, events: Sequence[Event]) -> list[Event]:
        by_meter: dict[str, list[Event]] = {}
        for event in events:
            by_meter.setdefault(event.meter, []).append(event)
        new: list[Event] = []
        with self._lock, self._write() as conn:
            for meter, batch in by_meter.items():
                spec = self._specs[meter]
                fresh = self._insert(conn, spec, batch)
                self._add_rollups(conn, spec, fresh)
                new.extend(fresh)
        if len(by_meter) > 1:  # one meter's fresh events are already in the caller's order
            order = {id(e): i for i, e in enumerate(events)}
            new.sort(key=lambda e: order[id(e)])
        return new

    def _insert(self, conn: sqlite3.Connection, spec: MeterSpec, batch: list[Event]) -> list[Event]:
        """Insert the events of ``batch`` not stored yet (the first copy of a repeated id);
        the caller holds the write lock. Returns them, in order."""
        table = events_table(spec.name)
        once: dict[tuple[str, str], Event] = {}
        for e in batch:
            once.setdefault((e.organization_id, e.id), e)
        unique = list(once.values())
        dims, measures = spec.dimension_names, spec.measure_names
        cols = [
            "id",
            "organization_id",
            "time",
            *map(dim_column, dims),
            *map(value_column, measures),
        ]
        sql = (
            f"INSERT INTO [{table}] ({', '.join(f'[{c}]' for c in cols)}) "
            f"VALUES ({', '.join('?' * len(cols))}) ON CONFLICT DO NOTHING"
        )

        def rows(events: list[Event]) -> Iterator[tuple[Any, ...]]:
            for e in events:
                yield (
                    e.id,
                    e.organization_id,
                    e.time,
                    *map(e.dimensions.get, dims),
                    *map(e.values.get, measures),
                )

        # Most batches are all new (or, re-sent, all stored): one INSERT tells which, by how
        # many rows it added. Only a mix needs the stored ids read, after undoing it.
        conn.execute("SAVEPOINT mk_append")
        try:
            before = conn.total_changes
            conn.executemany(sql, rows(unique))
            added = conn.total_changes - before
            if added == len(unique):
                return unique
            if added == 0:
                return []
            conn.execute("ROLLBACK TO mk_append")
        finally:
            conn.execute("RELEASE mk_append")
        # Under the write lock nobody else can insert, so "not there yet" stays true until
        # this INSERT: the returned list is exactly what was stored.
        stored: set[tuple[str, str]] = set()
        by_org: dict[str, list[str]] = {}
        for org, event_id in once:
            by_org.setdefault(org, []).append(event_id)
        for org, ids in by_org.items():
            for i in range(0, len(ids), CHUNK):
                chunk = ids[i : i + CHUNK]
                stored.update(
                    (org, r[0])
                    for r in conn.execute(
                        f"SELECT id FROM [{table}] WHERE organization_id = ? "
                        f"AND id IN ({', '.join('?' * len(chunk))})",
                        [org, *chunk],
                    )
                )
        fresh = [e for key, e in once.items() if key not in stored]
        conn.executemany(sql, rows(fresh))
        return fresh

    def replace_event(self, spec: MeterSpec, event: Event) -> Event | None:
        """Put ``event`` in the place of the stored event of its id (same time), and refold
        the rollup rows it was or is in (its series before and after, that UTC day), in one
        transaction; the event replaced, or ``None``."""
        with self._lock, self._write() as conn:
            found = self.get_events(spec.name, event.organization_id, [event.id])
            if not found:
                return None
            old = found[0]
            conn.execute(
                f"DELETE FROM [{events_table(spec.name)}] WHERE organization_id = ? AND id = ?",
                (event.organization_id, event.id),
            )
            self._insert(conn, spec, [event])
            if rollup.rollable(spec):
                self._refold(conn, spec, old, event)
            return old

    def _refold(self, conn: sqlite3.Connection, spec: MeterSpec, old: Event, new: Event) -> None:
        """Fold anew the rollup rows a replaced event was or is in (:class:`rollup.Refold`);
        the caller holds the write."""
        scope = rollup.Refold.of(old, new)
        marks = ", ".join("?" * len(scope.series))
        for grain in rollup.GRAINS:
            conn.execute(
                f"DELETE FROM [{rollup_table(spec.name, grain)}] WHERE organization_id = ? "
                f"AND series IN ({marks}) AND bucket >= ? AND bucket < ?",
                (scope.organization_id, *scope.series, scope.start, scope.end),
            )
        day = self.scan(spec.name, scope.organization_id, scope.start, scope.end)
        self._add_rollups(conn, spec, [e for e in day if scope.covers(e)])

    def scan(self, meter: str, organization_id: str, start: int, end: int) -> Iterator[Event]:
        # In chunks of SCAN_CHUNK, each read under the lock on its own, so a long scan holds
        # neither the lock nor every event in memory; a scan may see events appended while
        # it runs (a native aggregate reads one snapshot).
        where = "organization_id = ? AND time >= ? AND time < ?"

        def read(after: tuple[int, str] | None) -> list[Event]:
            params: list[Any]
            if after is None:
                cond, params = where, [organization_id, start, end]
            else:
                cond = f"{where} AND (time, id) > (?, ?)"
                params = [organization_id, after[0], end, *after]
            return list(
                self._select(
                    meter, f"{cond} ORDER BY time, id LIMIT ?", [*params, names.SCAN_CHUNK]
                )
            )

        return sqlagg.scan_chunks(read, names.SCAN_CHUNK)

    def get_events(self, meter: str, organization_id: str, ids: Sequence[str]) -> list[Event]:
        unique = list(dict.fromkeys(ids))
        found: list[Event] = []
        for i in range(0, len(unique), CHUNK):
            chunk = unique[i : i + CHUNK]
            found.extend(
                self._select(
                    meter,
                    f"organization_id = ? AND id IN ({', '.join('?' * len(chunk))})",
                    [organization_id, *chunk],
                )
            )
        return found

    def _select(
        self, meter: str, where: str, params: list[Any], spec: MeterSpec | None = None
    ) -> Iterator[Event]:
        spec = spec or self._specs[meter]
        dims = spec.dimension_names
        bools = {d.name for d in spec.dimensions if d.kind == "bool"}
        measures = spec.measure_names
        cols = ", ".join(
            ["id", "organization_id", "time"]
            + [f"[{dim_column(d)}]" for d in dims]
            + [f"[{value_column(m)}]" for m in measures]
        )
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {cols} FROM [{events_table(meter)}] WHERE {where}", params
            ).fetchall()
        n = len(dims)
        for row in rows:
            dvals = row[3 : 3 + n]
            yield Event(
                row[0],
                meter,
                row[1],
                row[2],
                {m: v for m, v in zip(measures, row[3 + n :]) if v is not None},
                {d: (bool(v) if d in bools else v) for d, v in zip(dims, dvals) if v is not None},
            )

    def latest_before(
        self, spec: MeterSpec, organization_id: str, before: int, measures: Sequence[str]
    ) -> list[Event] | None:
        if not rollup.rollable(spec) or self._specs.get(spec.name) != spec:
            return None
        dims = spec.dimension_names
        bools = {d.name for d in spec.dimensions if d.kind == "bool"}
        sql = sqlagg.latest_before(spec, measures, DIALECT)

        def decoded(row: Sequence[Any]) -> dict[str, DimValue]:
            return {d: (bool(v) if d in bools else v) for d, v in zip(dims, row) if v is not None}

        def day_latest(day: int) -> list[timeweighted.Latest]:
            rows = self.conn.execute(sql, (organization_id, day)).fetchall()
            return list(sqlagg.latest_items(spec, measures, rows, decoded))

        def scan(start: int, end: int) -> list[Event]:
            return list(self.scan(spec.name, organization_id, start, end))

        with self._lock:
            self.conn.execute("BEGIN")  # the rows and the day's events of one snapshot
            try:
                return rollup.latest_before(
                    spec, organization_id, before, measures, day_latest, scan
                )
            finally:
                self.conn.execute("COMMIT")

    def aggregate(self, spec: MeterSpec, query: UsageQuery) -> Rows | None:
        if timeweighted.names(spec):
            return None  # integrals come from events: see meterkit.integrals
        try:
            with self._lock:
                return self._aggregate(spec, query)
        except (sqlite3.OperationalError, OverflowError):
            # e.g. "integer overflow" in SUM: let the engine compute it in Python.
            return None

    def _aggregate(self, spec: MeterSpec, query: UsageQuery) -> Rows | None:
        rolled = rollup.rollable(spec) and self._specs.get(spec.name) == spec
        plan = sqlagg.query_statements(spec, query, DIALECT, rolled)
        bools = {d.name for d in spec.dimensions if d.kind == "bool"}

        def to_bool(name: str, value: Any) -> DimValue:
            return bool(value) if name in bools and value is not None else value

        # Only a bool dimension needs its group values decoded (SQLite keeps 0 and 1).
        group = to_bool if bools & set(query.group_by) else None

        # One read transaction: in WAL mode every statement sees the same snapshot, so an
        # append from another process between them cannot split a row.
        self.conn.execute("BEGIN")
        try:
            answers = [(m, self.conn.execute(sql, plan.params).fetchall()) for m, sql in plan.sql]
        finally:
            self.conn.execute("COMMIT")
        rows = sqlagg.merge_rows(spec, query, answers, group=group)
        return None if rolled and sqlagg.overflowed(spec, rows) else rows

    def put_record(self, kind: str, key: str, data: Mapping[str, Any]) -> None:
        check_record(kind, key, data)
        with self._lock, self._write() as conn:
            conn.execute(
                "INSERT INTO mk_records(kind, key, data) VALUES (?, ?, ?) "
                "ON CONFLICT(kind, key) DO UPDATE SET data = excluded.data",
                (kind, key, json.dumps(data, sort_keys=True)),
            )

    def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self.conn.execute(
                "SELECT data FROM mk_records WHERE kind = ? AND key = ?", (kind, key)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def list_records(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT key, data FROM mk_records WHERE kind = ? ORDER BY key", (kind,)
            ).fetchall()
        return [(k, json.loads(d)) for k, d in rows]

    def delete_record(self, kind: str, key: str) -> bool:
        with self._lock, self._write() as conn:
            cur = conn.execute("DELETE FROM mk_records WHERE kind = ? AND key = ?", (kind, key))
            return cur.rowcount > 0

    def secret(self) -> bytes:
        return self._secret

    def close(self) -> None:
        with self._lock:
            self.conn.close()
