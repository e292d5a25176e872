"""``sqlite:///path.db`` — the embedded default: one file, WAL mode, SQL aggregation."""

from __future__ import annotations

import contextlib
import itertools
import json
import operator
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import sqlite_utils

from meterkit import counters
from meterkit.engine import rollup, timeweighted
from meterkit.engine.aggregate import Rows
from meterkit.errors import StoreUnavailable, ValidationError
from meterkit.hookspecs import hookimpl
from meterkit.models import (
    CounterLine,
    CounterResult,
    DimValue,
    Event,
    Hold,
    MeterSpec,
    UsageQuery,
)
from meterkit.stores import sqlagg
from meterkit.validate import check_record

__all__ = ["SQLiteStore", "options_from_url", "path_from_url"]

SCHEMA_VERSION = 2
"""1: events keyed by ``id`` per meter. 2: keyed by ``(organization_id, id)``."""
_CHUNK = 500
SCAN_CHUNK = 5000
"""Events a scan reads at a time."""


def path_from_url(url: str) -> str:
    """``sqlite:///rel.db`` → ``rel.db``; ``sqlite:////abs.db`` → ``/abs.db``."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URL: {url!r} (expected sqlite:///path.db)")
    path = url[len("sqlite:///") :].split("?", 1)[0]
    if not path:
        raise ValueError("sqlite URL has no path")
    return path


SYNCHRONOUS = ("full", "normal")


def options_from_url(url: str) -> dict[str, str]:
    """The ``?key=value`` options of a SQLite URL: ``synchronous`` and ``timeout``."""
    query = url.split("?", 1)[1] if "?" in url else ""
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - {"synchronous", "timeout"}
    if unknown:
        raise ValidationError("url", f"unknown SQLite option {sorted(unknown)[0]!r}")
    if options.get("synchronous", "full").lower() not in SYNCHRONOUS:
        raise ValidationError("url", "synchronous must be 'full' or 'normal'")
    try:
        if float(options.get("timeout", "30")) <= 0:
            raise ValueError
    except ValueError:
        raise ValidationError("url", "timeout must be a positive number of seconds") from None
    return options


def _member(column: str, values: list[Any]) -> tuple[str, list[Any]]:
    return f"{column} IN ({', '.join('?' * len(values))})", values


def _table(meter: str) -> str:
    return f"events_{meter}"


def _dim(name: str) -> str:
    return f"d_{name}"


def _val(name: str) -> str:
    return f"v_{name}"


GRAIN_NAMES = {60: "1m", 3600: "1h", 86400: "1d"}
_INT64 = 2**63 - 1


def _rollup_table(meter: str, grain: int) -> str:
    return f"rollup_{meter}_{GRAIN_NAMES[grain]}"


def _cell(kind: str, measure: str) -> str:
    return f"{kind}_{measure}"


_DIALECT = sqlagg.Dialect(
    table=lambda meter: f"[{_table(meter)}]",
    dim=lambda name: f"[{_dim(name)}]",
    val=lambda name: f"[{_val(name)}]",
    member=_member,
    rollup=lambda meter, grain: f"[{_rollup_table(meter, grain)}]",
    cell=lambda kind, measure: f"[{_cell(kind, measure)}]",
)

# Value cells keep each number as given (BLOB affinity, like the event table's values).
_CELL_TYPES: dict[str, Any] = {
    "s": bytes,
    "n": int,
    "mn": bytes,
    "mx": bytes,
    "t": int,
    "i": str,
    "l": bytes,
}


def _layout(spec: MeterSpec) -> dict[str, list[str]]:
    """What a meter's rollups keep of each measure: when it changes they are built anew."""
    out: dict[str, list[str]] = {}
    for kind, name in rollup.columns(spec):
        out.setdefault(name, []).append(kind)
    return out


def fit_sums(
    folded: Mapping[int, Mapping[rollup.Key, tuple[tuple[DimValue, ...], list[Any]]]],
    sums: Sequence[int],
) -> None:
    """Turn sums past SQLite's integer range into floats, in place, in rows folded by
    :func:`~meterkit.engine.rollup.fold_grains` (``sums``: the cells holding sums): queries
    then read that meter from its events (see :func:`sqlagg.overflowed`)."""
    # Values are never negative, so a day's sum is at least each of its hours' and minutes':
    # when no day passes the range, nothing does.
    coarsest = folded[max(folded)]
    if any(
        cells[i] is not None and cells[i] > _INT64 for _t, cells in coarsest.values() for i in sums
    ):
        for rows in folded.values():
            for _tup, cells in rows.values():
                for i in sums:
                    if cells[i] is not None and cells[i] > _INT64:
                        cells[i] = float(cells[i])


def _picker(wanted: tuple[int, ...]) -> Callable[[list[Any]], tuple[Any, ...]]:
    """``cells -> (cells[i] for i in wanted)`` as a tuple, at C speed where it can."""
    if len(wanted) > 1:
        return operator.itemgetter(*wanted)
    if wanted:
        only = wanted[0]
        return lambda cells: (cells[only],)
    return lambda cells: ()


def upsert_batches(
    rows: Mapping[rollup.Key, tuple[tuple[DimValue, ...], list[Any]]],
) -> dict[tuple[int, ...], list[tuple[Any, ...]]]:
    """Bind parameters of :func:`sqlagg.upsert` for one grain's folded rows, grouped by the
    value cells each row has (its non-NULL ones): ``{cells: [params, ...]}``."""
    out: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}
    picks: dict[tuple[bool, ...], tuple[tuple[int, ...], Callable[[list[Any]], Any]]] = {}
    # Rows of one batch share a handful of shapes: each is worked out once.
    for key, (tup, cells) in rows.items():
        pattern = tuple(map(operator.is_, cells, itertools.repeat(None)))
        found = picks.get(pattern)
        if found is None:
            wanted = tuple(i for i, empty in enumerate(pattern) if not empty)
            found = picks[pattern] = (wanted, _picker(wanted))
            out[wanted] = []
        out[found[0]].append((*key, *tup, *found[1](cells)))
    return out


class SQLiteStore:
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
            self._migrate()
        row = conn.execute("SELECT value FROM mk_meta WHERE key = 'cursor_secret'").fetchone()
        self._secret = bytes.fromhex(row[0])

    def _migrate(self) -> None:
        """Bring an older file to :data:`SCHEMA_VERSION`; the caller holds the write lock."""
        row = self.conn.execute("SELECT value FROM mk_meta WHERE key = 'schema_version'").fetchone()
        tables = [t for t in self.db.table_names() if t.startswith("events_")]
        version = int(row[0]) if row else (1 if tables else SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{self.path} is at schema version {version}, newer than this meterkit knows "
                f"({SCHEMA_VERSION}); upgrade meterkit"
            )
        if version < 2:
            for name in tables:
                # Rebuild with ids unique per organization: every row is copied, none can
                # collide (they were unique by id alone), and the index is recreated.
                for sql in self.db.table(name).transform_sql(pk=("organization_id", "id")):
                    self.conn.execute(sql)
                self.conn.execute(
                    f"CREATE INDEX IF NOT EXISTS [idx_{name}_org_time] "
                    f"ON [{name}] (organization_id, time)"
                )
        if row is None or version != SCHEMA_VERSION:
            self.conn.execute(
                "INSERT INTO mk_meta(key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    @property
    def conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection = self.db.conn
        return conn

    def _write(self) -> _Immediate:
        return _Immediate(self.conn, self._forget_rolled_back, self._undo.clear)

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
            table = self.db.table(_table(spec.name))
            # Value columns are declared BLOB so SQLite keeps each number as given (int or
            # float) rather than coercing it by affinity.
            columns: dict[str, Any] = {"id": str, "organization_id": str, "time": int}
            for d in spec.dimensions:
                columns[_dim(d.name)] = int if d.kind == "bool" else str
            for m in spec.measures:
                columns[_val(m.name)] = bytes
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
        want = _layout(spec) if rollup.rollable(spec) else None
        present = all(self.db.table(_rollup_table(spec.name, g)).exists() for g in rollup.GRAINS)
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
                self.conn.execute(f"DROP TABLE IF EXISTS [{_rollup_table(spec.name, grain)}]")
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
            columns[_dim(d.name)] = int if d.kind == "bool" else str
        for kind, name in rollup.columns(spec):
            columns[_cell(kind, name)] = _CELL_TYPES[kind]
        decl = {str: "TEXT", int: "INTEGER", bytes: "BLOB"}
        for grain in rollup.GRAINS:
            table = self.db.table(_rollup_table(spec.name, grain))
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
                f"SELECT rowid FROM [{_table(spec.name)}] WHERE rowid > ? ORDER BY rowid "
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
            sql = self._upserts[key] = sqlagg.upsert(spec, grain, _DIALECT, cells=cells)
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
                    f"DELETE FROM [{_rollup_table(spec.name, grain)}] WHERE bucket >= ?", (since,)
                )
            return self._fold_all(spec, progress, since)

    def drop_events_before(self, spec: MeterSpec, before: int) -> int:
        """Delete ``spec``'s events before ``before`` and its minute rollups there, in one
        transaction (per organization, along the (organization_id, time) index)."""
        with self._lock, self._write():
            self.ensure_meter(spec)
            events = _table(spec.name)
            minutes = _rollup_table(spec.name, rollup.GRAINS[0])
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
            rows = self.conn.execute(
                f"SELECT DISTINCT organization_id FROM [{_table(meter)}] ORDER BY organization_id"
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
        cols = sqlagg.rollup_columns(spec, _DIALECT)
        with self._lock:
            found = self.conn.execute(
                f"SELECT {', '.join(cols)} FROM {_DIALECT.rollup(spec.name, grain)}"
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
        table = _table(spec.name)
        once: dict[tuple[str, str], Event] = {}
        for e in batch:
            once.setdefault((e.organization_id, e.id), e)
        unique = list(once.values())
        dims, measures = spec.dimension_names, spec.measure_names
        cols = ["id", "organization_id", "time", *map(_dim, dims), *map(_val, measures)]
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
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i : i + _CHUNK]
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
                f"DELETE FROM [{_table(spec.name)}] WHERE organization_id = ? AND id = ?",
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
                f"DELETE FROM [{_rollup_table(spec.name, grain)}] WHERE organization_id = ? "
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
                self._select(meter, f"{cond} ORDER BY time, id LIMIT ?", [*params, SCAN_CHUNK])
            )

        return sqlagg.scan_chunks(read, SCAN_CHUNK)

    def get_events(self, meter: str, organization_id: str, ids: Sequence[str]) -> list[Event]:
        unique = list(dict.fromkeys(ids))
        found: list[Event] = []
        for i in range(0, len(unique), _CHUNK):
            chunk = unique[i : i + _CHUNK]
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
            + [f"[{_dim(d)}]" for d in dims]
            + [f"[{_val(m)}]" for m in measures]
        )
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {cols} FROM [{_table(meter)}] WHERE {where}", params
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
        day = before - before % rollup.GRAINS[-1]
        dims = spec.dimension_names
        bools = {d.name for d in spec.dimensions if d.kind == "bool"}

        def decoded(row: Sequence[Any]) -> dict[str, DimValue]:
            return {d: (bool(v) if d in bools else v) for d, v in zip(dims, row) if v is not None}

        sql = sqlagg.latest_before(spec, measures, _DIALECT)
        with self._lock:
            self.conn.execute("BEGIN")
            try:
                rows = self.conn.execute(sql, (organization_id, day)).fetchall()
                events = list(self.scan(spec.name, organization_id, day, before))
            finally:
                self.conn.execute("COMMIT")
        latest = sqlagg.latest_items(spec, measures, rows, decoded)
        return timeweighted.carried(spec, organization_id, measures, before, events, latest)

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
        plan = sqlagg.query_statements(spec, query, _DIALECT, rolled)
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

    # -- records ------------------------------------------------------------------------------

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

    # -- counters -----------------------------------------------------------------------------

    def counters_apply(
        self, lines: Sequence[CounterLine], *, now: int, hold: Hold | None = None
    ) -> CounterResult:
        with self._lock, self._write() as conn:
            return counters.apply(_SQLiteCounters(conn, now), lines, now, hold)

    def counters_settle(self, hold_id: str, deltas: Sequence[tuple[str, int]], *, now: int) -> bool:
        with self._lock, self._write() as conn:
            return counters.settle(_SQLiteCounters(conn, now), hold_id, deltas, now)

    def counters_add(
        self, deltas: Sequence[tuple[str, int]], *, now: int, expires_at: int | None = None
    ) -> list[int]:
        with self._lock, self._write() as conn:
            backend = _SQLiteCounters(conn, now)
            return [backend.add(key, delta, expires_at) for key, delta in deltas]

    def counters_set(
        self, key: str, value: int, *, now: int, expires_at: int | None = None
    ) -> None:
        with self._lock, self._write() as conn:
            conn.execute(
                "INSERT INTO mk_counters(key, value, expires_at) VALUES (?, ?, ?) ON CONFLICT(key) "
                "DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                (key, value, expires_at),
            )

    def counters_read(self, keys: Sequence[str], *, now: int) -> list[int]:
        with self._lock:
            expired = self.conn.execute(
                "SELECT 1 FROM mk_holds WHERE expires_at <= ? LIMIT 1", (now,)
            ).fetchone()
            if expired is None:
                return _SQLiteCounters(self.conn, now).read(keys, now)
            # Give expired holds back first, as counters_apply would: reads agree with decisions.
            with self._write() as conn:
                backend = _SQLiteCounters(conn, now)
                counters.release_expired(backend, now)
                return backend.read(keys, now)

    def claim_once(self, marker: str, *, now: int, expires_at: int | None = None) -> bool:
        with self._lock, self._write() as conn:
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

    def secret(self) -> bytes:
        return self._secret

    def close(self) -> None:
        with self._lock:
            self.conn.close()


class _SQLiteCounters:
    """Counter primitives in SQL; the caller holds a ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, conn: sqlite3.Connection, now: int) -> None:
        self.conn, self.now = conn, now
        # What this transaction has read or written, so a counter is selected once.
        self.seen: dict[str, tuple[int, int | None]] = {}

    def _get(self, key: str) -> tuple[int, int | None]:
        if key not in self.seen:
            row = self.conn.execute(
                "SELECT value, expires_at FROM mk_counters WHERE key = ?", (key,)
            ).fetchone()
            live = row is not None and (row[1] is None or row[1] > self.now)
            self.seen[key] = (int(row[0]), row[1]) if live else (0, None)
        return self.seen[key]

    def read(self, keys: Sequence[str], now: int) -> list[int]:
        return [self._get(k)[0] for k in keys]

    def add(self, key: str, delta: int, expires_at: int | None) -> int:
        value, expires = self._get(key)
        value = counters.clamp(value + delta)
        expires = expires_at if expires_at is not None else expires
        self.conn.execute(
            "INSERT INTO mk_counters(key, value, expires_at) VALUES (?, ?, ?) ON CONFLICT(key) "
            "DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            (key, value, expires),
        )
        self.seen[key] = (value, expires)
        return value

    def _holds(self, sql: str, params: tuple[Any, ...]) -> list[Hold]:
        rows = self.conn.execute(
            f"SELECT id, organization_id, amounts, expires_at FROM mk_holds WHERE {sql}", params
        ).fetchall()
        holds = [
            Hold(r[0], r[1], tuple((k, int(v)) for k, v in json.loads(r[2])), r[3]) for r in rows
        ]
        self.conn.executemany("DELETE FROM mk_holds WHERE id = ?", [(h.id,) for h in holds])
        return holds

    def pop_expired_holds(self, now: int) -> list[Hold]:
        return self._holds("expires_at <= ?", (now,))

    def pop_hold(self, hold_id: str) -> Hold | None:
        found = self._holds("id = ?", (hold_id,))
        return found[0] if found else None

    def put_hold(self, hold: Hold) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO mk_holds(id, organization_id, amounts, expires_at) "
            "VALUES (?, ?, ?, ?)",
            (hold.id, hold.organization_id, json.dumps(hold.amounts), hold.expires_at),
        )


class _Immediate:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error), nestable by depth."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        on_rollback: Callable[[], object] = lambda: None,
        on_commit: Callable[[], object] = lambda: None,
    ) -> None:
        self.conn = conn
        self.on_rollback = on_rollback  # e.g. forget tables whose creation was rolled back
        self.on_commit = on_commit
        self.outer = False

    def __enter__(self) -> sqlite3.Connection:
        self.outer = not self.conn.in_transaction
        if self.outer:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                # "database is locked" after the busy timeout, or the file is unreachable.
                raise StoreUnavailable(f"SQLite could not start a write: {exc}") from exc
        return self.conn

    def __exit__(self, exc_type: object, *_: object) -> None:
        if not self.outer:
            return
        if exc_type is not None:
            self.conn.execute("ROLLBACK")
            self.on_rollback()
            return
        try:
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            self.on_rollback()
            raise StoreUnavailable(f"SQLite could not commit: {exc}") from exc
        self.on_commit()


@hookimpl
def meterkit_open_store(url: str, scheme: str) -> SQLiteStore | None:
    return SQLiteStore(url) if scheme == "sqlite" else None


@hookimpl
def meterkit_store_schemes() -> list[str]:
    return ["sqlite"]
