"""The PostgreSQL store: events, rollups and records, over a :class:`PgPool`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from meterkit.engine import rollup, timeweighted
from meterkit.engine.aggregate import Rows
from meterkit.models import DimValue, Event, MeterSpec, UsageQuery
from meterkit.stores import sqlagg
from meterkit.stores.base import CounterCalls
from meterkit.stores.postgres.counters import PgCounters
from meterkit.stores.postgres.names import (
    CELL_TYPES,
    DIALECT,
    NUMERIC_CELLS,
    cell_column,
    decode,
    digest,
    dim_column,
    encode,
    events_table,
    ident,
    ingest_sql,
    insert_sql,
    quoted,
    rollup_layout,
    rollup_table,
    stages,
    value_column,
)
from meterkit.stores.postgres.pool import PgPool
from meterkit.stores.postgres.rollups import add_rollups, ensure_rollups, fold_all, read_events
from meterkit.validate import check_record

if TYPE_CHECKING:
    import psycopg

__all__ = ["SCAN_CHUNK", "PostgresStore"]

CHUNK = 5000
SCAN_CHUNK = 5000


class PostgresStore(CounterCalls):
    """A :class:`~meterkit.stores.Store` on PostgreSQL, safe to share between threads.

    Nothing is sent to the server until the first call (which also creates or migrates the
    schema), so a process can start while the database is down and work once it is back.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.db = PgPool(url)
        """The connections, and how calls run on them."""
        self.counter_rows = PgCounters(self.db)
        """The quota counters' calls (this store's ``counters_*``)."""
        self._specs: dict[str, MeterSpec] = {}
        # Batches of at least this many events are copied in (COPY into a staging table);
        # smaller ones travel as arrays in one pipelined statement, one round trip.
        self.copy_from = 64

    def atomic_writes(self) -> AbstractContextManager[None]:
        """Every call this thread makes inside runs on one connection, in one transaction
        (see :meth:`PgPool.atomic_writes`)."""
        return self.db.atomic_writes()

    def db_now(self) -> float:
        """The database server's clock, as Unix seconds (see :meth:`PgPool.db_now`)."""
        return self.db.db_now()

    def ensure_meter(self, spec: MeterSpec) -> None:
        if self._specs.get(spec.name) == spec:
            return
        table = events_table(spec.name)
        columns: dict[str, str] = {
            "id": 'text COLLATE "C" NOT NULL',
            "organization_id": 'text COLLATE "C" NOT NULL',
            "time": "bigint NOT NULL",
        }
        dims: dict[str, str] = {}
        for d in spec.dimensions:
            dims[dim_column(d.name)] = "boolean" if d.kind == "bool" else 'text COLLATE "C"'
        columns.update(dims)
        for m in spec.measures:
            columns[value_column(m.name)] = "numeric"
        layout = rollup_layout(spec)
        marker = f"rollups/{spec.name}"
        rolled: dict[str, dict[str, str]] = {}
        if layout is not None:
            cells = {cell_column(k, m): CELL_TYPES[k] for k, m in rollup.columns(spec)}
            for grain in rollup.GRAINS:
                rolled[rollup_table(spec.name, grain)] = {
                    "organization_id": 'text COLLATE "C" NOT NULL',
                    "bucket": "bigint NOT NULL",
                    "series": 'text COLLATE "C" NOT NULL',
                    **dims,
                    **cells,
                }

        def have(cur: psycopg.Cursor[Any]) -> tuple[dict[str, set[str]], Any]:
            names = [table, *rolled]
            cur.execute(
                "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c "
                "ON c.oid = a.attrelid WHERE a.attrelid = ANY(ARRAY(SELECT to_regclass(n) "
                "FROM unnest(%s::text[]) AS n)) AND a.attnum > 0 AND NOT a.attisdropped",
                ([quoted(n) for n in names],),
            )
            found: dict[str, set[str]] = {n: set() for n in names}
            for rel, att in cur.fetchall():
                found.setdefault(rel, set()).add(att)
            cur.execute("SELECT value FROM mk_meta WHERE key = %s", (marker,))
            row = cur.fetchone()
            return found, json.loads(row[0]) if row else None

        def create(cur: psycopg.Cursor[Any]) -> None:
            # DDL only under a lock per table: concurrent CREATE TABLE IF NOT EXISTS can still
            # fail on the catalog's unique index. Every statement is IF NOT EXISTS, so the
            # script is right whatever another process did before the lock was granted; it
            # goes in one round trip (names are meterkit's own, so nothing is interpolated
            # that could be data).
            lock = f"meterkit/table/{table}"
            cols = ", ".join(f"{quoted(n)} {t}" for n, t in columns.items())
            cols += ", PRIMARY KEY (organization_id, id)"
            script = [
                f"SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '/{lock}', 0))",
                f"CREATE TABLE IF NOT EXISTS {quoted(table)} ({cols})",
                f"CREATE INDEX IF NOT EXISTS {quoted(ident('', table, '_org_time'))} "
                f"ON {quoted(table)} (organization_id, time)",
            ]
            for name, kind in columns.items():
                if name not in existing[table]:
                    added = f"{quoted(name)} {kind}"
                    script.append(f"ALTER TABLE {quoted(table)} ADD COLUMN IF NOT EXISTS {added}")
            cur.execute(";\n".join(script))
            ensure_rollups(cur, spec, marker, layout, rolled)

        # Look first: ALTER TABLE takes an exclusive lock on the table even when every column
        # is there already, and this runs whenever a process starts.
        # On a connection of its own, never in an atomic_writes() transaction: a table made
        # there would be forgotten by its rollback while this store remembers it.
        existing, recorded = self.db.run(
            "preparing a meter", have, tx=False, idempotent=True, own=True
        )
        complete = set(columns) <= existing[table] and all(
            set(want) <= existing.get(name, set()) for name, want in rolled.items()
        )
        if not complete or recorded != layout:
            self.db.run("preparing a meter", create, pipeline=False, own=True)
        self._specs[spec.name] = spec

    def rebuild_rollups(
        self, spec: MeterSpec, progress: Callable[[int], None] | None = None, *, since: int = 0
    ) -> int:
        """Empty ``spec``'s rollups (from ``since``) and fold them anew from its events, in one
        transaction under the meter's DDL lock; ``progress(events_read)`` after each chunk."""
        self.ensure_meter(spec)
        if not rollup.rollable(spec):
            return 0
        lock = f"meterkit/table/{events_table(spec.name)}"

        def rebuild(cur: psycopg.Cursor[Any]) -> int:
            cur.execute(
                f"SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '/{lock}', 0))"
            )
            for grain in rollup.GRAINS:
                cur.execute(
                    f"DELETE FROM {quoted(rollup_table(spec.name, grain))} WHERE bucket >= %s",
                    (since,),
                )
            return fold_all(cur, spec, progress, since)

        return self.db.run("rebuilding rollups", rebuild, pipeline=False)

    def replace_event(self, spec: MeterSpec, event: Event) -> Event | None:
        """Put ``event`` in the place of the stored event of its id (same time), and refold
        the rollup rows it was or is in (its series before and after, that UTC day), in
        one transaction under the meter's DDL lock; the event replaced, or ``None``."""
        self.ensure_meter(spec)
        table = quoted(events_table(spec.name))
        dims, measures = spec.dimension_names, spec.measure_names
        cols = [
            "id",
            "organization_id",
            "time",
            *map(dim_column, dims),
            *map(value_column, measures),
        ]
        row = [
            event.id,
            event.organization_id,
            event.time,
            *map(event.dimensions.get, dims),
            *(encode(event.values.get(m)) for m in measures),
        ]
        lock = f"meterkit/table/{events_table(spec.name)}"

        def replace(cur: psycopg.Cursor[Any]) -> Event | None:
            cur.execute(
                f"SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '/{lock}', 0))"
            )
            found = read_events(
                cur, spec, "organization_id = %s AND id = %s", (event.organization_id, event.id)
            )
            if not found:
                return None
            old = found[0]
            cur.execute(
                f"DELETE FROM {table} WHERE organization_id = %s AND id = %s",
                (event.organization_id, event.id),
            )
            cur.execute(
                f"INSERT INTO {table} ({', '.join(map(quoted, cols))}) "
                f"VALUES ({', '.join(['%s'] * len(cols))})",
                row,
            )
            if rollup.rollable(spec):
                scope = rollup.Refold.of(old, event)
                for grain in rollup.GRAINS:
                    cur.execute(
                        f"DELETE FROM {quoted(rollup_table(spec.name, grain))} "
                        "WHERE organization_id = %s AND series = ANY(%s::text[]) "
                        "AND bucket >= %s AND bucket < %s",
                        (scope.organization_id, list(scope.series), scope.start, scope.end),
                    )
                day = read_events(
                    cur,
                    spec,
                    "organization_id = %s AND time >= %s AND time < %s",
                    (scope.organization_id, scope.start, scope.end),
                )
                add_rollups(cur, spec, [e for e in day if scope.covers(e)])
            return old

        return self.db.run("replacing an event", replace, pipeline=False)

    def drop_events_before(self, spec: MeterSpec, before: int) -> int:
        """Delete ``spec``'s events before ``before`` and its minute rollups there, in one
        transaction (per organization, along the (organization_id, time) index)."""
        self.ensure_meter(spec)
        events = quoted(events_table(spec.name))
        minutes = quoted(rollup_table(spec.name, rollup.GRAINS[0]))
        rolled = rollup.rollable(spec)

        def drop(cur: psycopg.Cursor[Any]) -> int:
            cur.execute(f"SELECT DISTINCT organization_id FROM {events}")
            dropped = 0
            for (org,) in cur.fetchall():
                cur.execute(
                    f"DELETE FROM {events} WHERE organization_id = %s AND time < %s",
                    (org, before),
                )
                dropped += cur.rowcount
                if rolled:
                    cur.execute(
                        f"DELETE FROM {minutes} WHERE organization_id = %s AND bucket < %s",
                        (org, before),
                    )
            return dropped

        return self.db.run("dropping old events", drop, pipeline=False)

    def organizations(self, meter: str) -> list[str]:
        if meter not in self._specs:
            return []
        table = quoted(events_table(meter))
        sql = f"SELECT DISTINCT organization_id FROM {table} ORDER BY organization_id"

        def read(cur: psycopg.Cursor[Any]) -> list[str]:
            cur.execute(sql)
            return [r[0] for r in cur.fetchall()]

        return self.db.run("reading organizations", read, tx=False, idempotent=True)

    def rollup_rows(
        self, spec: MeterSpec, grain: int
    ) -> dict[rollup.Key, tuple[dict[str, Any], list[Any]]]:
        """Every stored rollup row of ``spec`` at ``grain`` (none when it keeps no rollups)."""
        if not rollup.rollable(spec):
            return {}
        self.ensure_meter(spec)
        dims = spec.dimension_names
        numeric = [kind in NUMERIC_CELLS for kind, _ in rollup.columns(spec)]
        sql = (
            f"SELECT {', '.join(sqlagg.rollup_columns(spec, DIALECT))} "
            f"FROM {DIALECT.rollup(spec.name, grain)}"
        )

        def read(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cur.execute(sql)
            return cur.fetchall()

        n = len(dims)
        out = {}
        for row in self.db.run("reading rollups", read, tx=False, idempotent=True):
            found = {d: v for d, v in zip(dims, row[3 : 3 + n]) if v is not None}
            cells = [decode(v) if num else v for num, v in zip(numeric, row[3 + n :])]
            out[(row[0], int(row[1]), row[2])] = (found, cells)
        return out

    def append(self, events: Sequence[Event]) -> list[Event]:
        # Everything is read from the events before the transaction starts: an event that
        # cannot be read (or a meter never ensured) fails the call with nothing written.
        seen: set[tuple[str, str, str]] = set()
        by_meter: dict[str, list[Event]] = {}
        for event in events:
            key = (event.meter, event.organization_id, event.id)
            if key in seen:
                continue
            seen.add(key)
            by_meter.setdefault(event.meter, []).append(event)
        copied = sum(len(b) for b in by_meter.values()) >= self.copy_from
        statements: list[tuple[str, str, list[list[Any]]]] = []
        staged: list[tuple[str, str, str, list[str], list[list[Any]]]] = []
        for meter, batch in by_meter.items():
            spec = self._specs[meter]
            dims, measures = spec.dimension_names, spec.measure_names
            bools = {d.name for d in spec.dimensions if d.kind == "bool"}
            cols = ["id", "organization_id", "time"]
            types = ["text", "text", "bigint"]
            cols += [dim_column(d) for d in dims]
            types += ["boolean" if d in bools else "text" for d in dims]
            cols += [value_column(m) for m in measures]
            types += ["numeric"] * len(measures)
            rows = [
                [str(e.id), e.organization_id, e.time]
                + [e.dimensions.get(d) for d in dims]
                + [encode(e.values.get(m)) for m in measures]
                for e in batch
            ]
            rolled = rollup.rollable(spec)
            if rolled:
                for row, series in zip(rows, rollup.series_keys(spec, batch), strict=True):
                    row.append(series)
                cols_in, types_in = [*cols, "series"], [*types, "text"]
            else:
                cols_in, types_in = cols, types
            if copied:
                # Bulk: the rows are copied into a staging table, then one statement moves the
                # new ones into the events (and rollups) from there.
                stage = ident("mk_stage_", meter, "_" + digest(cols_in, types_in))
                source = f"SELECT {', '.join(quoted(c) for c in cols_in)} FROM {quoted(stage)}"
                sql = ingest_sql(spec, cols, source) if rolled else insert_sql(meter, cols, source)
                ddl = ", ".join(f"{quoted(c)} {t}" for c, t in zip(cols_in, types_in, strict=True))
                staged.append((stage, ddl, sql, types_in, rows))
                continue
            arrays: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)]
            unnest = (
                "SELECT * FROM unnest("
                + ", ".join(f"%b::{t}[]" for t in types_in)
                + f") AS u({', '.join(quoted(c) for c in cols_in)})"
            )
            if rolled:
                statements.append((meter, ingest_sql(spec, cols, unnest), arrays))
            else:
                statements.append((meter, insert_sql(meter, cols, unnest), arrays))

        created: list[tuple[Any, str]] = []

        def write(cur: psycopg.Cursor[Any]) -> set[tuple[str, str, str]]:
            # Every INSERT is sent before any result is read: in pipeline mode they travel
            # together instead of one round trip each.
            sent = []
            for meter, sql, arrays in statements:
                for i in range(0, len(arrays[0]), CHUNK):
                    chunk_cur = cur.connection.cursor()
                    chunk_cur.execute(sql, [a[i : i + CHUNK] for a in arrays])
                    sent.append((meter, chunk_cur))
            stored: set[tuple[str, str, str]] = set()
            for meter, chunk_cur in sent:
                stored.update((meter, r[0], r[1]) for r in chunk_cur.fetchall())
                chunk_cur.close()
            return stored

        def copy(cur: psycopg.Cursor[Any]) -> set[tuple[str, str, str]]:
            conn = cur.connection
            have = stages.setdefault(conn, set())
            stored: set[tuple[str, str, str]] = set()
            for (stage, ddl, sql, types, rows), meter in zip(staged, by_meter, strict=True):
                if stage not in have:
                    # A session's own table, emptied at every commit (and gone with a rollback
                    # of the transaction that made it, hence remembered only after a commit).
                    cur.execute(
                        f"CREATE TEMPORARY TABLE IF NOT EXISTS {quoted(stage)} ({ddl}) "
                        "ON COMMIT DELETE ROWS"
                    )
                    created.append((conn, stage))
                with cur.copy(f"COPY {quoted(stage)} FROM STDIN (FORMAT BINARY)") as pipe:
                    pipe.set_types(types)
                    for row in rows:
                        pipe.write_row(row)
                cur.execute(sql)
                stored.update((meter, r[0], r[1]) for r in cur.fetchall())
            return stored

        if not statements and not staged:
            return []
        if staged:
            stored = self.db.run("appending events", copy, pipeline=False)
            for conn, stage in created:
                stages.setdefault(conn, set()).add(stage)
        else:
            stored = self.db.run("appending events", write)
        # Keep the first copy of each new (meter, organization_id, id), in the order given.
        new: list[Event] = []
        for event in events:
            key = (event.meter, event.organization_id, str(event.id))
            if key in stored:
                stored.discard(key)
                new.append(event)
        return new

    def scan(self, meter: str, organization_id: str, start: int, end: int) -> Iterator[Event]:
        # In chunks of SCAN_CHUNK, so a long scan never holds every event in memory. The
        # first is read here (a store that is down fails the call); a later one that fails
        # raises StoreUnavailable from the caller's loop.
        where = "organization_id = %s AND time >= %s AND time < %s"

        def read(after: tuple[int, str] | None) -> list[Event]:
            params: tuple[Any, ...]
            if after is None:
                cond, params = where, (organization_id, start, end)
            else:
                cond = f"{where} AND (time, id) > (%s, %s)"
                params = (organization_id, after[0], end, *after)
            return list(
                self._select(
                    meter,
                    f"{cond} ORDER BY time, id LIMIT %s",
                    (*params, SCAN_CHUNK),
                    "scanning events",
                )
            )

        return sqlagg.scan_chunks(read, SCAN_CHUNK)

    def get_events(self, meter: str, organization_id: str, ids: Sequence[str]) -> list[Event]:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return []
        return list(
            self._select(
                meter,
                "organization_id = %s AND id = ANY(%s::text[])",
                (organization_id, unique),
                "reading events",
            )
        )

    def _select(self, meter: str, where: str, params: Sequence[Any], what: str) -> Iterator[Event]:
        spec = self._specs[meter]
        # Read eagerly: a failure is raised here, not halfway through the caller's loop.
        return iter(
            self.db.run(
                what, lambda cur: read_events(cur, spec, where, params), tx=False, idempotent=True
            )
        )

    def latest_before(
        self, spec: MeterSpec, organization_id: str, before: int, measures: Sequence[str]
    ) -> list[Event] | None:
        if not rollup.rollable(spec) or self._specs.get(spec.name) != spec:
            return None
        dims = spec.dimension_names
        sql = sqlagg.latest_before(spec, measures, DIALECT)

        def decoded(row: Sequence[Any]) -> dict[str, DimValue]:
            return {d: v for d, v in zip(dims, row) if v is not None}

        def day_latest(day: int) -> list[timeweighted.Latest]:
            def read(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
                cur.execute(sql, (organization_id, day))
                return cur.fetchall()

            rows = self.db.run("reading rollups", read, tx=False, idempotent=True)
            return list(sqlagg.latest_items(spec, measures, rows, decoded, decode))

        def scan(start: int, end: int) -> Iterator[Event]:
            return self.scan(spec.name, organization_id, start, end)

        return rollup.latest_before(spec, organization_id, before, measures, day_latest, scan)

    def aggregate(self, spec: MeterSpec, query: UsageQuery) -> Rows | None:
        if timeweighted.names(spec):
            return None  # integrals come from events: see meterkit.integrals
        rolled = rollup.rollable(spec) and self._specs.get(spec.name) == spec
        plan = sqlagg.query_statements(spec, query, DIALECT, rolled)
        params = list(plan.params)

        def run(cur: psycopg.Cursor[Any]) -> Rows:
            sent = []
            for measure, sql in plan.sql:
                query_cur = cur.connection.cursor()
                query_cur.execute(sql, params)  # all sent first: one round trip (pipeline)
                sent.append((measure, query_cur))
            answers = []
            for measure, query_cur in sent:
                answers.append((measure, query_cur.fetchall()))
                query_cur.close()
            # MAX/MIN over numeric return one of the inputs, scale included, so an int maximum
            # stays an int; SUM's scale is the largest input scale, so any float makes it one.
            return sqlagg.merge_rows(spec, query, answers, value=decode)

        # REPEATABLE READ: every statement sees the same snapshot, so an append landing
        # between them cannot give a row a gauge without its sums.
        def snapshot(cur: psycopg.Cursor[Any]) -> Rows:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return run(cur)

        return self.db.run("aggregating events", snapshot)

    def put_record(self, kind: str, key: str, data: Mapping[str, Any]) -> None:
        check_record(kind, key, data)
        text = json.dumps(data, sort_keys=True)

        def put(cur: psycopg.Cursor[Any]) -> None:
            cur.execute(
                "INSERT INTO mk_records (kind, key, data) VALUES (%s, %s, %s::jsonb) "
                "ON CONFLICT (kind, key) DO UPDATE SET data = excluded.data",
                (kind, key, text),
            )

        self.db.run("writing a record", put, tx=False, idempotent=True)

    def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        def get(cur: psycopg.Cursor[Any]) -> dict[str, Any] | None:
            cur.execute(
                "SELECT data::text FROM mk_records WHERE kind = %s AND key = %s", (kind, key)
            )
            row = cur.fetchone()
            return json.loads(row[0]) if row else None

        return self.db.run("reading a record", get, tx=False, idempotent=True)

    def list_records(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        def get(cur: psycopg.Cursor[Any]) -> list[tuple[str, dict[str, Any]]]:
            cur.execute(
                "SELECT key, data::text FROM mk_records WHERE kind = %s ORDER BY key", (kind,)
            )
            return [(k, json.loads(d)) for k, d in cur.fetchall()]

        return self.db.run("listing records", get, tx=False, idempotent=True)

    def delete_record(self, kind: str, key: str) -> bool:
        def delete(cur: psycopg.Cursor[Any]) -> bool:
            cur.execute("DELETE FROM mk_records WHERE kind = %s AND key = %s", (kind, key))
            return cur.rowcount > 0

        return self.db.run("deleting a record", delete, tx=False)

    def secret(self) -> bytes:
        return self.db.secret()

    def close(self) -> None:
        self.db.close()
