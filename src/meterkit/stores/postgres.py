"""``postgresql://`` — the shared store for many processes and hosts (psycopg 3 + a pool).

Everything a process keeps in SQLite lives here instead, so every process pointed at the same
database gives the same answers:

- **Schema** created and migrated by meterkit: ``mk_schema_migrations`` records which versioned
  migration ran; they run in one transaction under ``pg_advisory_xact_lock``, so processes
  starting together wait for each other instead of racing on ``CREATE TABLE``.
- **Events** in one table per meter, ``events_<meter>``, like the SQLite store: primary key
  ``(organization_id, id)``, ``d_<dim>`` and ``v_<measure>`` columns. Values are ``numeric``
  and keep their Python type through the *scale*: an ``int`` is stored with scale 0, a
  ``float`` exactly (its binary value in decimal) with scale >= 1. Scale survives
  ``SUM``/``MAX``/``MIN``, so aggregates come back with the engine's type as well.
- **Appends** are one transaction: ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` says
  exactly which events were new, whichever process raced to store them.
- **Aggregation** in SQL, the same shape as the SQLite store, equal to the engine.
- **Counters** are rows of ``mk_counters``, changed in one transaction that locks the touched
  rows (``SELECT ... FOR UPDATE`` in key order, so two transactions never wait on each other
  in a cycle); never a table lock. The decision itself is :func:`meterkit.counters.apply`.

Connection failures, pool timeouts and statement timeouts raise
:class:`~meterkit.errors.StoreUnavailable`; the pool replaces broken connections, so the next
call works again once the server is back.

URL: any libpq URL (``postgresql://user@host:5432/db?sslmode=require``, or ``postgres://``),
plus these meterkit options, removed before connecting:

``schema``         keep meterkit's tables in this schema (created if missing)
``pool_min_size``  connections kept open (default 1)
``pool_max_size``  connections at most (default 10)
``pool_timeout``   seconds to wait for a free connection before ``StoreUnavailable`` (default 5)

``connect_timeout`` defaults to 5 seconds. A ``statement_timeout`` can be set the libpq way:
``?options=-cstatement_timeout%3D2000``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import select
import threading
import time as _time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from meterkit import counters
from meterkit.engine import rollup, timeweighted
from meterkit.engine.aggregate import Rows
from meterkit.errors import MeterkitError, StoreConflict, StoreUnavailable
from meterkit.hookspecs import hookimpl
from meterkit.models import (
    CounterLine,
    CounterResult,
    DimValue,
    Event,
    Hold,
    MeterSpec,
    Number,
    UsageQuery,
)
from meterkit.stores import sqlagg
from meterkit.validate import check_record

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = ["MIGRATIONS", "SCHEMES", "PostgresStore"]

SCHEMES = ("postgresql", "postgres")
_T = TypeVar("_T")
_CHUNK = 5000
SCAN_CHUNK = 5000
"""Events a scan reads at a time."""
_MAX_IDENT = 63  # PostgreSQL silently truncates longer identifiers: never let it.
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")  # unquoted in search_path: lower case
_SWEEP_EVERY = 60.0
# meterkit.counters.apply, line for line, as the Lua script of the Redis store mirrors it:
# expired holds given back first (SKIP LOCKED), every row it touches locked in key order
# (placeholders made for absent ones, read as 0), all lines admitted or none, the hold written
# (or replaced) with them. Returns {admitted, used..., previous...}.
_APPLY_FUNCTION = """
CREATE OR REPLACE FUNCTION mk_counters_apply(
  k text[], amt bigint[], lim bigint[], exp bigint[], pk text[], w float8[], now_ bigint,
  hid text, horg text, hamounts jsonb, hexp bigint
) RETURNS bigint[] LANGUAGE plpgsql AS $fn$
DECLARE
  n int := coalesce(array_length(k, 1), 0);
  maxc constant bigint := 9007199254740991;
  rel_k text[] := '{}';
  rel_a bigint[] := '{}';
  want text[];
  rk text[];
  rv bigint[];
  re bigint[];
  dirty boolean[];
  cur bigint[] := '{}';
  prev bigint[] := '{}';
  used bigint[] := '{}';
  ok boolean := true;
  h record;
  item jsonb;
  i int;
  j int;
  tries int := 0;
BEGIN
  FOR h IN
    WITH gone AS (
      DELETE FROM mk_holds WHERE id IN (
        SELECT id FROM mk_holds WHERE expires_at <= now_ ORDER BY id FOR UPDATE SKIP LOCKED
      ) RETURNING id, amounts
    ) SELECT id, amounts FROM gone ORDER BY id
  LOOP
    FOR item IN SELECT value FROM jsonb_array_elements(h.amounts) LOOP
      rel_k := rel_k || (item->>0);
      rel_a := rel_a || (item->>1)::bigint;
    END LOOP;
  END LOOP;
  want := ARRAY(
    SELECT DISTINCT (x COLLATE "C") AS y FROM unnest(k || pk || rel_k) AS x
    WHERE x IS NOT NULL ORDER BY y
  );
  LOOP
    INSERT INTO mk_counters (key, value, expires_at)
      SELECT x, 0, 0 FROM unnest(want) AS x ORDER BY x COLLATE "C"
      ON CONFLICT (key) DO NOTHING;
    SELECT array_agg(s.key ORDER BY s.key), array_agg(s.value ORDER BY s.key),
           array_agg(s.expires_at ORDER BY s.key)
      INTO rk, rv, re
      FROM (SELECT key, value, expires_at FROM mk_counters WHERE key = ANY(want)
            ORDER BY key FOR UPDATE) AS s;
    -- A placeholder the sweep deleted between the two statements is simply made again.
    EXIT WHEN coalesce(array_length(rk, 1), 0) = coalesce(array_length(want, 1), 0);
    tries := tries + 1;
    IF tries >= 10 THEN
      RAISE EXCEPTION 'meterkit: could not lock its counter rows';
    END IF;
  END LOOP;
  dirty := array_fill(false, ARRAY[coalesce(array_length(rk, 1), 0)]);
  FOR i IN 1 .. coalesce(array_length(rk, 1), 0) LOOP
    IF re[i] IS NOT NULL AND re[i] <= now_ THEN  -- expired (or a placeholder): absent
      rv[i] := 0;
      re[i] := NULL;
    END IF;
  END LOOP;
  FOR j IN 1 .. coalesce(array_length(rel_k, 1), 0) LOOP
    i := array_position(rk, rel_k[j]);
    rv[i] := greatest(0, least(maxc, rv[i] - rel_a[j]));
    dirty[i] := true;
  END LOOP;
  FOR j IN 1 .. n LOOP
    cur := cur || rv[array_position(rk, k[j])];
    prev := prev || CASE WHEN pk[j] IS NULL THEN 0 ELSE rv[array_position(rk, pk[j])] END;
    IF cur[j] + amt[j] > maxc THEN
      ok := false;
    ELSIF lim[j] IS NOT NULL
          AND floor(prev[j]::float8 * w[j])::bigint + cur[j] + amt[j] > lim[j] THEN
      ok := false;
    END IF;
  END LOOP;
  IF ok THEN
    FOR j IN 1 .. n LOOP
      i := array_position(rk, k[j]);
      rv[i] := greatest(0, least(maxc, rv[i] + amt[j]));
      IF exp[j] IS NOT NULL THEN
        re[i] := exp[j];
      END IF;
      dirty[i] := true;
      used := used || rv[i];
    END LOOP;
    IF hid IS NOT NULL THEN
      INSERT INTO mk_holds (id, organization_id, amounts, expires_at)
        VALUES (hid, horg, hamounts, hexp)
        ON CONFLICT (id) DO UPDATE SET organization_id = excluded.organization_id,
          amounts = excluded.amounts, expires_at = excluded.expires_at;
    END IF;
  ELSE
    used := cur;
  END IF;
  UPDATE mk_counters AS c SET value = u.v, expires_at = u.e
    FROM unnest(rk, rv, re, dirty) AS u(key, v, e, d)
    WHERE u.d AND c.key = u.key;
  RETURN ARRAY[CASE WHEN ok THEN 1 ELSE 0 END]::bigint[] || used || prev;
END
$fn$
"""

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "meta, records, counters, holds and claims",
        (
            'CREATE TABLE mk_meta (key text COLLATE "C" PRIMARY KEY, value text NOT NULL)',
            'CREATE TABLE mk_records (kind text COLLATE "C", key text COLLATE "C", '
            "data jsonb NOT NULL, PRIMARY KEY (kind, key))",
            'CREATE TABLE mk_counters (key text COLLATE "C" PRIMARY KEY, '
            "value bigint NOT NULL, expires_at bigint)",
            "CREATE INDEX mk_counters_expires ON mk_counters (expires_at) "
            "WHERE expires_at IS NOT NULL",
            'CREATE TABLE mk_holds (id text COLLATE "C" PRIMARY KEY, organization_id text '
            "NOT NULL, amounts jsonb NOT NULL, expires_at bigint NOT NULL)",
            "CREATE INDEX mk_holds_expires ON mk_holds (expires_at)",
            'CREATE TABLE mk_claims (marker text COLLATE "C" PRIMARY KEY, expires_at bigint)',
            "CREATE INDEX mk_claims_expires ON mk_claims (expires_at) WHERE expires_at IS NOT NULL",
        ),
    ),
    (
        2,
        "event ids unique per organization: primary key (organization_id, id)",
        (
            # Every events table of this schema whose primary key is still (id) alone. Rows
            # were unique by id, so none collide under the wider key; nothing is copied.
            """DO $$
DECLARE t record;
BEGIN
  FOR t IN
    SELECT c.oid::regclass AS tab, k.conname
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema()
    JOIN pg_constraint k ON k.conrelid = c.oid AND k.contype = 'p'
    WHERE c.relkind IN ('r', 'p') AND c.relname LIKE 'events\\_%' AND array_length(k.conkey, 1) = 1
  LOOP
    EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I, ADD PRIMARY KEY (organization_id, id)',
                   t.tab, t.conname);
  END LOOP;
END $$""",
        ),
    ),
    (
        3,
        "counters_apply in one round trip: the decision as a server-side function",
        (_APPLY_FUNCTION,),
    ),
)
"""``(version, description, statements)``, applied in order, each exactly once per schema.

A later change to the schema is a new entry at the end; entries already released never change.
"""


# -- names and numbers ------------------------------------------------------------------------


def _ident(prefix: str, name: str, suffix: str = "") -> str:
    """``prefix + name + suffix``, shortened with a hash when longer than PostgreSQL allows."""
    full = f"{prefix}{name}{suffix}"
    if len(full) <= _MAX_IDENT:
        return full
    digest = hashlib.sha1(full.encode()).hexdigest()[:8]
    keep = _MAX_IDENT - len(prefix) - len(suffix) - len(digest) - 1
    return f"{prefix}{name[:keep]}_{digest}{suffix}"


def _q(name: str) -> str:
    # Every name here is built from meterkit's own name rule ([a-z][a-z0-9_]*), so quoting is
    # only there to keep words such as "time" or "user" from meaning anything to SQL.
    return f'"{name}"'


def _table(meter: str) -> str:
    return _ident("events_", meter)


def _dim(name: str) -> str:
    return _ident("d_", name)


def _val(name: str) -> str:
    return _ident("v_", name)


def _lock_key(*parts: str) -> int:
    """A signed 64-bit advisory-lock key for ``parts``, the same in every process."""
    digest = hashlib.sha256("\x1f".join(("meterkit", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _encode(value: Number | None) -> Decimal | None:
    """A number as ``numeric`` whose scale says its type: 0 for ``int``, >= 1 for ``float``."""
    if value is None:
        return None
    if isinstance(value, float):
        exact = Decimal(value)  # the float's exact binary value; nothing rounded
        exponent = exact.as_tuple().exponent
        if isinstance(exponent, int) and exponent >= 0:
            return Decimal(f"{int(value)}.0")
        return exact
    return Decimal(value)


def _number(value: Decimal | int) -> Number:
    """Back from ``numeric``: scale 0 is an ``int``, any other scale a ``float``."""
    if isinstance(value, int):
        return value
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent >= 0:
        return int(value)
    return float(value)


def _decode(value: Decimal | int | None) -> Number | None:
    return None if value is None else _number(value)


_GRAIN_NAMES = {60: "_1m", 3600: "_1h", 86400: "_1d"}


def _rollup_table(meter: str, grain: int) -> str:
    return _ident("rollup_", meter, _GRAIN_NAMES[grain])


def _cell(kind: str, measure: str) -> str:
    return _ident(f"{kind}_", measure)


_DIALECT = sqlagg.Dialect(
    table=lambda meter: _q(_table(meter)),
    dim=lambda name: _q(_dim(name)),
    val=lambda name: _q(_val(name)),
    member=lambda column, values: (f"{column} = ANY(%s)", [values]),
    placeholder="%s",
    modulo="mod({}, {})",
    subquery_alias=" AS s",
    rollup=lambda meter, grain: _q(_rollup_table(meter, grain)),
    cell=lambda kind, measure: _q(_cell(kind, measure)),
    least="LEAST",
    greatest="GREATEST",
)
_CELL_TYPES = {
    "s": "numeric",
    "n": "bigint",
    "mn": "numeric",
    "mx": "numeric",
    "t": "bigint",
    "i": 'text COLLATE "C"',
    "l": "numeric",
}
_NUMERIC_CELLS = frozenset({"s", "mn", "mx", "l"})


def _layout(spec: MeterSpec) -> dict[str, list[str]] | None:
    """What a meter's rollups keep of each measure (``None``: it keeps none)."""
    if not rollup.rollable(spec):
        return None
    out: dict[str, list[str]] = {}
    for kind, name in rollup.columns(spec):
        out.setdefault(name, []).append(kind)
    return out


_LATEST = "(array_agg({x} ORDER BY time DESC, id DESC) FILTER (WHERE {v} IS NOT NULL))[1]"
_FOLD = {
    "s": "SUM({v})",
    "n": "NULLIF(COUNT({v}), 0)",
    "mn": "MIN({v})",
    "mx": "MAX({v})",
    "t": _LATEST.replace("{x}", "time"),
    "i": _LATEST.replace("{x}", "id"),
    "l": _LATEST.replace("{x}", "{v}"),
}


def _ingest_sql(spec: MeterSpec, cols: Sequence[str], source: str) -> str:
    """One statement that appends a batch of events and folds the new ones into every grain's
    rollups, as :func:`meterkit.engine.rollup.fold` would: the events come from ``source``
    (a ``SELECT`` of the columns and each event's series key, computed in Python, last); the
    rollup rows are upserted in key order, so concurrent writers lock them in one order.
    Returns the new events' keys."""
    names = [_q(c) for c in cols]
    dims = [_q(_dim(d)) for d in spec.dimension_names]
    parts = [
        f"input ({', '.join([*names, 'series'])}) AS ({source})",
        f"ins AS (INSERT INTO {_q(_table(spec.name))} ({', '.join(names)}) "
        f"SELECT {', '.join(names)} FROM input ON CONFLICT (organization_id, id) DO NOTHING "
        "RETURNING organization_id, id)",
        "new AS (SELECT input.* FROM input JOIN ins USING (organization_id, id))",
    ]
    cells = [_FOLD[kind].format(v=_q(_val(name))) for kind, name in rollup.columns(spec)]
    for grain in rollup.GRAINS:
        key = ["organization_id", f"time - mod(time, {grain})", "series", *dims]
        select = (
            f"SELECT {', '.join([*key, *cells])} FROM new GROUP BY {', '.join(key)} "
            "ORDER BY 1, 2, 3"
        )
        parts.append(f"r{grain} AS ({sqlagg.upsert(spec, grain, _DIALECT, select)})")
    return "WITH " + ", ".join(parts) + " SELECT organization_id, id FROM ins"


def _insert_sql(meter: str, cols: Sequence[str], source: str) -> str:
    """Append a batch from ``source`` (no rollups); returns the new events' keys."""
    names = ", ".join(_q(c) for c in cols)
    return (
        f"INSERT INTO {_q(_table(meter))} ({names}) SELECT {names} FROM ({source}) AS input "
        "ON CONFLICT (organization_id, id) DO NOTHING RETURNING organization_id, id"
    )


def _digest(*parts: Sequence[str]) -> str:
    """A short name for a column layout: a staging table per layout, so a widened meter
    never copies into a table of its old columns."""
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=6).hexdigest()


_stages: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
"""The staging tables each pooled connection has made (temporary tables live per session)."""


def _rollup_params(
    spec: MeterSpec, rows: Mapping[rollup.Key, tuple[tuple[Any, ...], Sequence[Any]]]
) -> list[tuple[Any, ...]]:
    """Bind parameters of the upsert for rows folded by
    :func:`~meterkit.engine.rollup.fold_grains`, sorted by key: concurrent writers then lock
    rollup rows in one order and never deadlock on them."""
    numeric = [kind in _NUMERIC_CELLS for kind, _ in rollup.columns(spec)]
    return [
        (
            *key,
            *rows[key][0],
            *(_encode(v) if num else v for num, v in zip(numeric, rows[key][1], strict=True)),
        )
        for key in sorted(rows)
    ]


# -- connection options -----------------------------------------------------------------------


def _conninfo(url: str) -> tuple[str, dict[str, Any]]:
    """The libpq connection string for ``url`` and meterkit's own options taken out of it."""
    from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    opts: dict[str, Any] = {"min_size": 1, "max_size": 10, "timeout": 5.0}
    # libpq rejects query parameters it does not know, so meterkit's own come out first.
    for key, name, kind in (
        ("pool_min_size", "min_size", int),
        ("pool_max_size", "max_size", int),
        ("pool_timeout", "timeout", float),
    ):
        if key in query:
            try:
                opts[name] = kind(query.pop(key))
            except ValueError:
                raise MeterkitError(f"PostgreSQL URL option {key} must be a number") from None
    schema = query.pop("schema", None)
    if schema is not None:
        if not _SCHEMA_RE.match(schema):
            raise MeterkitError(f"PostgreSQL URL option schema={schema!r} is not a plain name")
        query["options"] = f"{query.get('options', '')} -csearch_path={schema}".strip()
    query.setdefault("connect_timeout", "5")
    return urlunsplit(
        (scheme, parts.netloc, parts.path, urlencode(query, quote_via=quote), "")
    ), opts


# -- the store --------------------------------------------------------------------------------


class PostgresStore:
    """A :class:`~meterkit.stores.Store` on PostgreSQL, safe to share between threads.

    Nothing is sent to the server until the first call (which also creates or migrates the
    schema), so a process can start while the database is down and work once it is back.
    """

    def __init__(self, url: str) -> None:
        from psycopg_pool import ConnectionPool

        self.url = url
        conninfo, opts = _conninfo(url)
        self._conninfo = conninfo
        self._timeout: float = opts["timeout"]
        # Why the pool could not connect, as the server or libpq said it (the pool connects in
        # the background, so a caller would otherwise only learn "no connection in time").
        self._connect_error: str | None = None
        # (monotonic time, message) of the last "no connection in time": for the next
        # pool_timeout seconds every call fails at once instead of waiting again.
        self._down: tuple[float, str] | None = None
        self._pool: ConnectionPool[Any] = ConnectionPool(
            conninfo,
            connection_class=_connection_class(self),
            min_size=opts["min_size"],
            max_size=max(opts["max_size"], opts["min_size"]),
            timeout=opts["timeout"],
            kwargs={"autocommit": True},
            check=_check_connection,
            name="meterkit",
            open=True,
        )
        self._specs: dict[str, MeterSpec] = {}
        self._secret: bytes | None = None
        self._boot_lock = threading.Lock()
        # The cursor of this thread's atomic_writes() transaction, when one is open.
        self._pinned = threading.local()
        self._clock_lock = threading.Lock()
        self._clock_offset: tuple[float, float] | None = None  # (measured at, offset)
        self._next_sweep = 0.0
        # Batches of at least this many events are copied in (COPY into a staging table);
        # smaller ones travel as arrays in one pipelined statement, one round trip.
        self.copy_from = 64

    # -- plumbing -----------------------------------------------------------------------------

    def _connect_failed(self, exc: BaseException) -> None:
        self._connect_error = _one_line(exc).removeprefix("connection failed: ")

    @contextmanager
    def _unavailable(self, what: str) -> Iterator[None]:
        import psycopg
        from psycopg_pool import PoolTimeout

        down = self._down
        if down is not None and _time.monotonic() - down[0] < self._timeout:
            raise StoreUnavailable(f"PostgreSQL store unavailable while {what}: {down[1]}")
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            # OperationalError covers a refused or dropped connection, PoolTimeout (no free
            # connection in time), AdminShutdown (pg_terminate_backend) and QueryCanceled
            # (statement_timeout): the server did not answer, whatever the reason.
            detail = _one_line(exc)
            if isinstance(exc, PoolTimeout):
                if self._connect_error is not None:
                    detail = f"{self._connect_error} (no connection within {self._timeout:g} s)"
                self._down = (_time.monotonic(), detail)
            raise StoreUnavailable(f"PostgreSQL store unavailable while {what}: {detail}") from exc
        self._down = None

    def _run(
        self,
        what: str,
        fn: Callable[[psycopg.Cursor[Any]], _T],
        *,
        tx: bool = True,
        pipeline: bool = True,
        idempotent: bool = False,
        own: bool = False,
    ) -> _T:
        """``fn(cursor)`` on a pooled connection, in one transaction when ``tx``.

        Transactions run in pipeline mode: statements whose results are not read yet travel
        together (``BEGIN`` with the first, ``COMMIT`` with the last writes), which saves a
        round trip each.

        Run again, because the first try certainly changed nothing: a transaction PostgreSQL
        aborted as a deadlock victim or serialization failure; and a call whose
        connection broke before its transaction reached ``COMMIT`` (or that only reads, or
        is ``idempotent``) — a connection the server dropped just before it was handed out —
        on as many connections as the pool keeps open, plus one.
        A connection lost *during* ``COMMIT`` is never retried: the commit may have happened.
        """
        import psycopg.errors

        pinned = None if own else getattr(self._pinned, "cur", None)
        if pinned is not None:
            # Inside atomic_writes(): on its connection, in its transaction; a failure fails
            # the whole of it, which its caller may run again.
            return fn(pinned)
        self._bootstrap()
        # Every pooled connection may have been dropped at once (a server restart): a call
        # that certainly changed nothing may try as many of them as the pool keeps, plus one.
        reconnects = self._pool.min_size + 1
        with self._unavailable(what):
            for attempt in itertools.count():
                reached_commit = False
                conn = None
                try:
                    with self._pool.connection() as conn:
                        if not tx:
                            with conn.cursor() as cur:
                                return fn(cur)
                        if not pipeline:
                            with conn.transaction(), conn.cursor() as cur:
                                result = fn(cur)
                                reached_commit = True
                                return result
                        with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
                            result = fn(cur)
                            reached_commit = True
                            return result
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                    if attempt >= 5:
                        raise
                    _time.sleep(random.uniform(0, 0.01 * 2**attempt))
                except psycopg.OperationalError:
                    safe = (tx and not reached_commit) or idempotent
                    if reconnects <= 0 or conn is None or not conn.broken or not safe:
                        raise
                    reconnects -= 1
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def atomic_writes(self) -> Iterator[None]:
        """Every call this thread makes inside runs on one connection, in one transaction:
        events and the counter changes they cause commit together or not at all (a
        ``kill -9`` between them cannot leave one without the other). A deadlock or
        serialization failure raises :class:`~meterkit.errors.StoreConflict` with nothing
        written: run the block again."""
        import psycopg.errors

        if getattr(self._pinned, "cur", None) is not None:
            yield  # nested: the outer transaction commits
            return
        self._bootstrap()
        try:
            with (
                self._unavailable("writing events and counters"),
                self._pool.connection() as conn,
                conn.transaction(),
                conn.cursor() as cur,
            ):
                self._pinned.cur = cur
                try:
                    yield
                finally:
                    self._pinned.cur = None
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if isinstance(
                cause, (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
            ):
                raise StoreConflict(str(exc)) from cause
            raise

    def _reachable(self) -> None:
        """Connect once, directly, before waiting on the pool: a server that refuses or a host
        that does not resolve is one clear error at once, not a pool's retries for
        ``pool_timeout`` seconds."""
        import psycopg

        with self._unavailable("opening the store"):
            try:
                psycopg.connect(self._conninfo, autocommit=True).close()
            except psycopg.OperationalError as exc:
                # Remembered as a pool timeout is: calls for the next pool_timeout seconds
                # fail at once with the same cause.
                self._connect_failed(exc)
                self._down = (_time.monotonic(), str(self._connect_error))
                raise

    def _bootstrap(self) -> None:
        if self._secret is not None:
            return
        with self._boot_lock:
            if self._secret is not None:
                return
            self._reachable()
            with self._unavailable("opening the store"), self._pool.connection() as conn:
                secret = _migrate(conn)
                if secret is None:
                    conn.execute(
                        "INSERT INTO mk_meta (key, value) VALUES ('cursor_secret', %s) "
                        "ON CONFLICT (key) DO NOTHING",
                        (os.urandom(32).hex(),),
                    )
                    row = conn.execute(
                        "SELECT value FROM mk_meta WHERE key = 'cursor_secret'"
                    ).fetchone()
                    assert row is not None
                    secret = str(row[0])
            self._secret = bytes.fromhex(secret)

    def db_now(self) -> float:
        """The database server's clock, as Unix seconds.

        One clock for every process and host: ``Meter(store=store, clock=store.db_now)`` makes
        every quota window, billing period and event time agree with the database instead of
        each host's own clock. The offset from the local clock is measured once a minute, so
        a call costs no round trip.
        """
        local = _time.time()
        with self._clock_lock:
            cached = self._clock_offset
            if cached is not None and local - cached[0] < 60:
                return local + cached[1]

        def ask(cur: psycopg.Cursor[Any]) -> float:
            before = _time.time()
            cur.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
            row = cur.fetchone()
            after = _time.time()
            assert row is not None
            return float(row[0]) - (before + after) / 2

        offset = self._run("reading the database clock", ask, tx=False, idempotent=True)
        with self._clock_lock:
            self._clock_offset = (local, offset)
        return _time.time() + offset

    # -- meters -------------------------------------------------------------------------------

    def ensure_meter(self, spec: MeterSpec) -> None:
        if self._specs.get(spec.name) == spec:
            return
        table = _table(spec.name)
        columns: dict[str, str] = {
            "id": 'text COLLATE "C" NOT NULL',
            "organization_id": 'text COLLATE "C" NOT NULL',
            "time": "bigint NOT NULL",
        }
        dims: dict[str, str] = {}
        for d in spec.dimensions:
            dims[_dim(d.name)] = "boolean" if d.kind == "bool" else 'text COLLATE "C"'
        columns.update(dims)
        for m in spec.measures:
            columns[_val(m.name)] = "numeric"
        layout = _layout(spec)
        marker = f"rollups/{spec.name}"
        rolled: dict[str, dict[str, str]] = {}
        if layout is not None:
            cells = {_cell(k, m): _CELL_TYPES[k] for k, m in rollup.columns(spec)}
            for grain in rollup.GRAINS:
                rolled[_rollup_table(spec.name, grain)] = {
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
                ([_q(n) for n in names],),
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
            cols = ", ".join(f"{_q(n)} {t}" for n, t in columns.items())
            cols += ", PRIMARY KEY (organization_id, id)"
            script = [
                f"SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '/{lock}', 0))",
                f"CREATE TABLE IF NOT EXISTS {_q(table)} ({cols})",
                f"CREATE INDEX IF NOT EXISTS {_q(_ident('', table, '_org_time'))} "
                f"ON {_q(table)} (organization_id, time)",
            ]
            for name, kind in columns.items():
                if name not in existing[table]:
                    script.append(
                        f"ALTER TABLE {_q(table)} ADD COLUMN IF NOT EXISTS {_q(name)} {kind}"
                    )
            cur.execute(";\n".join(script))
            self._ensure_rollups(cur, spec, marker, layout, rolled)

        # Look first: ALTER TABLE takes an exclusive lock on the table even when every column
        # is there already, and this runs whenever a process starts.
        # On a connection of its own, never in an atomic_writes() transaction: a table made
        # there would be forgotten by its rollback while this store remembers it.
        existing, recorded = self._run(
            "preparing a meter", have, tx=False, idempotent=True, own=True
        )
        complete = set(columns) <= existing[table] and all(
            set(want) <= existing.get(name, set()) for name, want in rolled.items()
        )
        if not complete or recorded != layout:
            self._run("preparing a meter", create, pipeline=False, own=True)
        self._specs[spec.name] = spec

    def _ensure_rollups(
        self,
        cur: psycopg.Cursor[Any],
        spec: MeterSpec,
        marker: str,
        layout: dict[str, list[str]] | None,
        rolled: dict[str, dict[str, str]],
    ) -> None:
        """Create, widen or rebuild ``spec``'s rollup tables, under the meter's DDL lock: a
        schema written before rollups existed (or a measure whose aggregation changed) gets
        them built from its events here, once; the next process finds the layout recorded."""
        cur.execute("SELECT value FROM mk_meta WHERE key = %s", (marker,))
        row = cur.fetchone()
        old = json.loads(row[0]) if row else None
        cur.execute(
            "SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest(%s::text[]) AS n",
            ([_q(_rollup_table(spec.name, g)) for g in rollup.GRAINS],),
        )
        present = bool(cur.fetchone()[0])  # type: ignore[index]
        # Kept (and widened) when every measure keeps what it kept; a missing table means
        # the rollups are incomplete, so they are built anew.
        keep = (
            present
            and old is not None
            and layout is not None
            and all(old.get(m) in (None, kinds) for m, kinds in layout.items())
        )
        script = []
        if not keep:
            script += [
                f"DROP TABLE IF EXISTS {_q(_rollup_table(spec.name, g))}" for g in rollup.GRAINS
            ]
        for name, cols in rolled.items():
            body = ", ".join(f"{_q(n)} {t}" for n, t in cols.items())
            script.append(
                f"CREATE TABLE IF NOT EXISTS {_q(name)} ({body}, "
                "PRIMARY KEY (organization_id, bucket, series))"
            )
            script += [
                f"ALTER TABLE {_q(name)} ADD COLUMN IF NOT EXISTS {_q(n)} {t}"
                for n, t in cols.items()
            ]
        if script:
            cur.execute(";\n".join(script))
        if layout is None:
            cur.execute("DELETE FROM mk_meta WHERE key = %s", (marker,))
            return
        cur.execute(
            "INSERT INTO mk_meta (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (marker, json.dumps(layout, sort_keys=True)),
        )
        if not keep:
            self._fold_all(cur, spec)

    def _fold_all(
        self,
        cur: psycopg.Cursor[Any],
        spec: MeterSpec,
        progress: Callable[[int], None] | None = None,
        since: int = 0,
    ) -> int:
        """Fold every stored event of ``spec`` from ``since`` into its rollups, in this
        transaction."""
        done = 0
        after: tuple[str, str] = ("", "")
        while True:
            chunk = list(
                self._read(
                    cur,
                    spec,
                    "time >= %s AND (organization_id, id) > (%s, %s) "
                    "ORDER BY organization_id, id LIMIT 10000",
                    (since, *after),
                )
            )
            if not chunk:
                return done
            self._add_rollups(cur, spec, chunk)
            done += len(chunk)
            after = (chunk[-1].organization_id, str(chunk[-1].id))
            if progress is not None:
                progress(done)

    def _add_rollups(
        self, cur: psycopg.Cursor[Any], spec: MeterSpec, events: Sequence[Event]
    ) -> None:
        if not events or not rollup.rollable(spec):
            return
        # One statement per grain: the rows as arrays, unnested in key order.
        types = ["text", "bigint", "text"]
        types += ["boolean" if d.kind == "bool" else "text" for d in spec.dimensions]
        types += [_CELL_TYPES[kind].split()[0] for kind, _ in rollup.columns(spec)]
        source = "SELECT * FROM unnest(" + ", ".join(f"%b::{t}[]" for t in types) + ")"
        for grain, rows in rollup.fold_grains(spec, events).items():
            params = _rollup_params(spec, rows)
            columns = [list(c) for c in zip(*params, strict=True)]
            cur.execute(sqlagg.upsert(spec, grain, _DIALECT, source), columns)

    def rebuild_rollups(
        self, spec: MeterSpec, progress: Callable[[int], None] | None = None, *, since: int = 0
    ) -> int:
        """Empty ``spec``'s rollups (from ``since``) and fold them anew from its events, in one
        transaction under the meter's DDL lock; ``progress(events_read)`` after each chunk."""
        self.ensure_meter(spec)
        if not rollup.rollable(spec):
            return 0
        lock = f"meterkit/table/{_table(spec.name)}"

        def rebuild(cur: psycopg.Cursor[Any]) -> int:
            cur.execute(
                f"SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '/{lock}', 0))"
            )
            for grain in rollup.GRAINS:
                cur.execute(
                    f"DELETE FROM {_q(_rollup_table(spec.name, grain))} WHERE bucket >= %s",
                    (since,),
                )
            return self._fold_all(cur, spec, progress, since)

        return self._run("rebuilding rollups", rebuild, pipeline=False)

    def replace_event(self, spec: MeterSpec, event: Event) -> Event | None:
        """Put ``event`` in the place of the stored event of its id (same time), and refold
        the rollup rows it was or is in (its series before and after, that UTC day), in
        one transaction under the meter's DDL lock; the event replaced, or ``None``."""
        self.ensure_meter(spec)
        table = _q(_table(spec.name))
        dims, measures = spec.dimension_names, spec.measure_names
        cols = ["id", "organization_id", "time", *map(_dim, dims), *map(_val, measures)]
        row = [
            event.id,
            event.organization_id,
            event.time,
            *map(event.dimensions.get, dims),
            *(_encode(event.values.get(m)) for m in measures),
        ]
        lock = f"meterkit/table/{_table(spec.name)}"

        def replace(cur: psycopg.Cursor[Any]) -> Event | None:
            cur.execute(
                f"SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '/{lock}', 0))"
            )
            found = self._read(
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
                f"INSERT INTO {table} ({', '.join(map(_q, cols))}) "
                f"VALUES ({', '.join(['%s'] * len(cols))})",
                row,
            )
            if rollup.rollable(spec):
                scope = rollup.Refold.of(old, event)
                for grain in rollup.GRAINS:
                    cur.execute(
                        f"DELETE FROM {_q(_rollup_table(spec.name, grain))} "
                        "WHERE organization_id = %s AND series = ANY(%s::text[]) "
                        "AND bucket >= %s AND bucket < %s",
                        (scope.organization_id, list(scope.series), scope.start, scope.end),
                    )
                day = self._read(
                    cur,
                    spec,
                    "organization_id = %s AND time >= %s AND time < %s",
                    (scope.organization_id, scope.start, scope.end),
                )
                self._add_rollups(cur, spec, [e for e in day if scope.covers(e)])
            return old

        return self._run("replacing an event", replace, pipeline=False)

    def drop_events_before(self, spec: MeterSpec, before: int) -> int:
        """Delete ``spec``'s events before ``before`` and its minute rollups there, in one
        transaction (per organization, along the (organization_id, time) index)."""
        self.ensure_meter(spec)
        events = _q(_table(spec.name))
        minutes = _q(_rollup_table(spec.name, rollup.GRAINS[0]))
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

        return self._run("dropping old events", drop, pipeline=False)

    def organizations(self, meter: str) -> list[str]:
        if meter not in self._specs:
            return []
        sql = f"SELECT DISTINCT organization_id FROM {_q(_table(meter))} ORDER BY organization_id"

        def read(cur: psycopg.Cursor[Any]) -> list[str]:
            cur.execute(sql)
            return [r[0] for r in cur.fetchall()]

        return self._run("reading organizations", read, tx=False, idempotent=True)

    def rollup_rows(
        self, spec: MeterSpec, grain: int
    ) -> dict[rollup.Key, tuple[dict[str, Any], list[Any]]]:
        """Every stored rollup row of ``spec`` at ``grain`` (none when it keeps no rollups)."""
        if not rollup.rollable(spec):
            return {}
        self.ensure_meter(spec)
        dims = spec.dimension_names
        numeric = [kind in _NUMERIC_CELLS for kind, _ in rollup.columns(spec)]
        sql = (
            f"SELECT {', '.join(sqlagg.rollup_columns(spec, _DIALECT))} "
            f"FROM {_DIALECT.rollup(spec.name, grain)}"
        )

        def read(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cur.execute(sql)
            return cur.fetchall()

        n = len(dims)
        out = {}
        for row in self._run("reading rollups", read, tx=False, idempotent=True):
            found = {d: v for d, v in zip(dims, row[3 : 3 + n]) if v is not None}
            cells = [_decode(v) if num else v for num, v in zip(numeric, row[3 + n :])]
            out[(row[0], int(row[1]), row[2])] = (found, cells)
        return out

    # -- events -------------------------------------------------------------------------------

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
            cols += [_dim(d) for d in dims]
            types += ["boolean" if d in bools else "text" for d in dims]
            cols += [_val(m) for m in measures]
            types += ["numeric"] * len(measures)
            rows = [
                [str(e.id), e.organization_id, e.time]
                + [e.dimensions.get(d) for d in dims]
                + [_encode(e.values.get(m)) for m in measures]
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
                stage = _ident("mk_stage_", meter, "_" + _digest(cols_in, types_in))
                source = f"SELECT {', '.join(_q(c) for c in cols_in)} FROM {_q(stage)}"
                if rolled:
                    sql = _ingest_sql(spec, cols, source)
                else:
                    sql = _insert_sql(meter, cols, source)
                ddl = ", ".join(f"{_q(c)} {t}" for c, t in zip(cols_in, types_in, strict=True))
                staged.append((stage, ddl, sql, types_in, rows))
                continue
            arrays: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)]
            unnest = (
                "SELECT * FROM unnest("
                + ", ".join(f"%b::{t}[]" for t in types_in)
                + f") AS u({', '.join(_q(c) for c in cols_in)})"
            )
            if rolled:
                statements.append((meter, _ingest_sql(spec, cols, unnest), arrays))
            else:
                statements.append((meter, _insert_sql(meter, cols, unnest), arrays))

        created: list[tuple[Any, str]] = []

        def write(cur: psycopg.Cursor[Any]) -> set[tuple[str, str, str]]:
            # Every INSERT is sent before any result is read: in pipeline mode they travel
            # together instead of one round trip each.
            sent = []
            for meter, sql, arrays in statements:
                for i in range(0, len(arrays[0]), _CHUNK):
                    chunk_cur = cur.connection.cursor()
                    chunk_cur.execute(sql, [a[i : i + _CHUNK] for a in arrays])
                    sent.append((meter, chunk_cur))
            stored: set[tuple[str, str, str]] = set()
            for meter, chunk_cur in sent:
                stored.update((meter, r[0], r[1]) for r in chunk_cur.fetchall())
                chunk_cur.close()
            return stored

        def copy(cur: psycopg.Cursor[Any]) -> set[tuple[str, str, str]]:
            conn = cur.connection
            have = _stages.setdefault(conn, set())
            stored: set[tuple[str, str, str]] = set()
            for (stage, ddl, sql, types, rows), meter in zip(staged, by_meter, strict=True):
                if stage not in have:
                    # A session's own table, emptied at every commit (and gone with a rollback
                    # of the transaction that made it, hence remembered only after a commit).
                    cur.execute(
                        f"CREATE TEMPORARY TABLE IF NOT EXISTS {_q(stage)} ({ddl}) "
                        "ON COMMIT DELETE ROWS"
                    )
                    created.append((conn, stage))
                with cur.copy(f"COPY {_q(stage)} FROM STDIN (FORMAT BINARY)") as pipe:
                    pipe.set_types(types)
                    for row in rows:
                        pipe.write_row(row)
                cur.execute(sql)
                stored.update((meter, r[0], r[1]) for r in cur.fetchall())
            return stored

        if not statements and not staged:
            return []
        if staged:
            stored = self._run("appending events", copy, pipeline=False)
            for conn, stage in created:
                _stages.setdefault(conn, set()).add(stage)
        else:
            stored = self._run("appending events", write)
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
            self._run(
                what, lambda cur: self._read(cur, spec, where, params), tx=False, idempotent=True
            )
        )

    @staticmethod
    def _read(
        cur: psycopg.Cursor[Any], spec: MeterSpec, where: str, params: Sequence[Any]
    ) -> list[Event]:
        dims, measures = spec.dimension_names, spec.measure_names
        cols = ", ".join(
            ["id", "organization_id", "time"]
            + [_q(_dim(d)) for d in dims]
            + [_q(_val(m)) for m in measures]
        )
        cur.execute(f"SELECT {cols} FROM {_q(_table(spec.name))} WHERE {where}", params)
        n = len(dims)
        out = []
        for row in cur.fetchall():
            values = {
                m: _number(v) for m, v in zip(measures, row[3 + n :], strict=True) if v is not None
            }
            dvals = {d: v for d, v in zip(dims, row[3 : 3 + n], strict=True) if v is not None}
            out.append(Event(row[0], spec.name, row[1], row[2], values, dvals))
        return out

    def latest_before(
        self, spec: MeterSpec, organization_id: str, before: int, measures: Sequence[str]
    ) -> list[Event] | None:
        if not rollup.rollable(spec) or self._specs.get(spec.name) != spec:
            return None
        day = before - before % rollup.GRAINS[-1]
        dims = spec.dimension_names
        sql = sqlagg.latest_before(spec, measures, _DIALECT)

        def read(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cur.execute(sql, (organization_id, day))
            return cur.fetchall()

        rows = self._run("reading rollups", read, tx=False, idempotent=True)

        def decoded(row: Sequence[Any]) -> dict[str, DimValue]:
            return {d: v for d, v in zip(dims, row) if v is not None}

        latest = sqlagg.latest_items(spec, measures, rows, decoded, _decode)
        events = self.scan(spec.name, organization_id, day, before)
        return timeweighted.carried(spec, organization_id, measures, before, events, latest)

    def aggregate(self, spec: MeterSpec, query: UsageQuery) -> Rows | None:
        if timeweighted.names(spec):
            return None  # integrals come from events: see meterkit.integrals
        rolled = rollup.rollable(spec) and self._specs.get(spec.name) == spec
        plan = sqlagg.query_statements(spec, query, _DIALECT, rolled)
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
            return sqlagg.merge_rows(spec, query, answers, value=_decode)

        # REPEATABLE READ: every statement sees the same snapshot, so an append landing
        # between them cannot give a row a gauge without its sums.
        def snapshot(cur: psycopg.Cursor[Any]) -> Rows:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return run(cur)

        return self._run("aggregating events", snapshot)

    # -- records ------------------------------------------------------------------------------

    def put_record(self, kind: str, key: str, data: Mapping[str, Any]) -> None:
        check_record(kind, key, data)
        text = json.dumps(data, sort_keys=True)

        def put(cur: psycopg.Cursor[Any]) -> None:
            cur.execute(
                "INSERT INTO mk_records (kind, key, data) VALUES (%s, %s, %s::jsonb) "
                "ON CONFLICT (kind, key) DO UPDATE SET data = excluded.data",
                (kind, key, text),
            )

        self._run("writing a record", put, tx=False, idempotent=True)

    def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        def get(cur: psycopg.Cursor[Any]) -> dict[str, Any] | None:
            cur.execute(
                "SELECT data::text FROM mk_records WHERE kind = %s AND key = %s", (kind, key)
            )
            row = cur.fetchone()
            return json.loads(row[0]) if row else None

        return self._run("reading a record", get, tx=False, idempotent=True)

    def list_records(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        def get(cur: psycopg.Cursor[Any]) -> list[tuple[str, dict[str, Any]]]:
            cur.execute(
                "SELECT key, data::text FROM mk_records WHERE kind = %s ORDER BY key", (kind,)
            )
            return [(k, json.loads(d)) for k, d in cur.fetchall()]

        return self._run("listing records", get, tx=False, idempotent=True)

    def delete_record(self, kind: str, key: str) -> bool:
        def delete(cur: psycopg.Cursor[Any]) -> bool:
            cur.execute("DELETE FROM mk_records WHERE kind = %s AND key = %s", (kind, key))
            return cur.rowcount > 0

        return self._run("deleting a record", delete, tx=False)

    # -- counters -----------------------------------------------------------------------------

    def counters_apply(
        self, lines: Sequence[CounterLine], *, now: int, hold: Hold | None = None
    ) -> CounterResult:
        n = len(lines)
        params = (
            [line.key for line in lines],
            [line.amount for line in lines],
            [line.limit for line in lines],
            [line.expires_at for line in lines],
            [line.prev_key for line in lines],
            [float(line.prev_weight) for line in lines],
            now,
            hold.id if hold is not None else None,
            hold.organization_id if hold is not None else None,
            json.dumps(hold.amounts) if hold is not None else None,
            hold.expires_at if hold is not None else None,
        )

        def apply(cur: psycopg.Cursor[Any]) -> list[int]:
            # One statement, its own transaction: one round trip for the whole decision.
            cur.execute(
                "SELECT mk_counters_apply(%s::text[], %s::bigint[], %s::bigint[], "
                "%s::bigint[], %s::text[], %s::float8[], %s, %s, %s, %s::jsonb, %s)",
                params,
            )
            row = cur.fetchone()
            assert row is not None
            return [int(v) for v in row[0]]

        # A reply lost with its connection may be applied again on the next one: that counts
        # a decision twice (never admits past a limit), as a Redis script retried does.
        values = self._run("applying a quota decision", apply, tx=False, idempotent=True)
        result = CounterResult(values[0] == 1, tuple(values[1 : 1 + n]), tuple(values[1 + n :]))
        self._maybe_sweep(now)
        return result

    def counters_settle(self, hold_id: str, deltas: Sequence[tuple[str, int]], *, now: int) -> bool:
        def settle(cur: psycopg.Cursor[Any]) -> bool:
            # Hold rows first, counter rows second, as in counters_apply: the same order in
            # every transaction is what keeps them from deadlocking.
            expired = _pop_expired_holds(cur, now)
            cur.execute(
                "DELETE FROM mk_holds WHERE id = %s RETURNING id, organization_id, amounts, "
                "expires_at",
                (hold_id,),
            )
            popped = [_hold(r) for r in cur.fetchall()]
            writes = {key for key, _ in deltas} if popped else set()
            writes.update(key for h in expired for key, _ in h.amounts)
            backend = _PgCounters(cur, now, _lock_rows(cur, writes, []), expired, popped)
            settled = counters.settle(backend, hold_id, deltas, now)
            backend.flush()
            return settled

        return self._run("settling a reservation", settle)

    def counters_add(
        self, deltas: Sequence[tuple[str, int]], *, now: int, expires_at: int | None = None
    ) -> list[int]:
        def add(cur: psycopg.Cursor[Any]) -> list[int]:
            backend = _PgCounters(cur, now, _lock_rows(cur, [k for k, _ in deltas], []), [])
            values = [backend.add(key, delta, expires_at) for key, delta in deltas]
            backend.flush()
            return values

        values = self._run("adding to counters", add)
        self._maybe_sweep(now)
        return values

    def counters_set(
        self, key: str, value: int, *, now: int, expires_at: int | None = None
    ) -> None:
        def put(cur: psycopg.Cursor[Any]) -> None:
            cur.execute(
                "INSERT INTO mk_counters (key, value, expires_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                "expires_at = excluded.expires_at",
                (key, value, expires_at),
            )

        self._run("setting a counter", put, tx=False, idempotent=True)

    def counters_read(self, keys: Sequence[str], *, now: int) -> list[int]:
        def read(cur: psycopg.Cursor[Any]) -> list[int] | None:
            # One statement answers both "any hold expired?" and the values; the LEFT JOIN
            # yields one row even when no counter matches.
            cur.execute(
                "SELECT c.key, c.value, c.expires_at, h.expired FROM (SELECT EXISTS "
                "(SELECT 1 FROM mk_holds WHERE expires_at <= %s) AS expired) AS h "
                "LEFT JOIN mk_counters AS c ON c.key = ANY(%s)",
                (now, list(keys)),
            )
            rows = cur.fetchall()
            if rows and rows[0][3]:
                return None
            found = {r[0]: int(r[1]) for r in rows if r[0] is not None and _live(r[2], now)}
            return [found.get(k, 0) for k in keys]

        def release_then_read(cur: psycopg.Cursor[Any]) -> list[int]:
            # Give expired holds back first, as counters_apply would: reads agree with
            # decisions.
            expired = _pop_expired_holds(cur, now)
            writes = [key for h in expired for key, _ in h.amounts]
            backend = _PgCounters(cur, now, _lock_rows(cur, writes, keys), expired)
            counters.release_expired(backend, now)
            backend.flush()
            return backend.read(keys, now)

        values = self._run("reading counters", read, tx=False, idempotent=True)
        if values is None:
            values = self._run("reading counters", release_then_read)
        return values

    def claim_once(self, marker: str, *, now: int, expires_at: int | None = None) -> bool:
        def claim(cur: psycopg.Cursor[Any]) -> bool:
            # One statement: a new marker is inserted, an expired one taken over, a live one
            # left alone (and then nothing is returned).
            cur.execute(
                "INSERT INTO mk_claims (marker, expires_at) VALUES (%s, %s) "
                "ON CONFLICT (marker) DO UPDATE SET expires_at = excluded.expires_at "
                "WHERE mk_claims.expires_at IS NOT NULL AND mk_claims.expires_at <= %s "
                "RETURNING marker",
                (marker, expires_at, now),
            )
            return cur.fetchone() is not None

        return self._run("claiming a marker", claim, tx=False)

    def _maybe_sweep(self, now: int) -> None:
        """Now and then, delete counters and claims that expired (they read as absent anyway)."""
        tick = _time.monotonic()
        if tick < self._next_sweep or getattr(self._pinned, "cur", None) is not None:
            return  # not inside a caller's transaction: it would hold the swept rows
        self._next_sweep = tick + _SWEEP_EVERY

        def sweep(cur: psycopg.Cursor[Any]) -> None:
            # SKIP LOCKED: never wait for, nor block, a transaction using one of these rows.
            cur.execute(
                "DELETE FROM mk_counters WHERE key IN (SELECT key FROM mk_counters "
                "WHERE expires_at <= %s LIMIT 5000 FOR UPDATE SKIP LOCKED)",
                (now,),
            )
            cur.execute(
                "DELETE FROM mk_claims WHERE marker IN (SELECT marker FROM mk_claims "
                "WHERE expires_at <= %s LIMIT 5000 FOR UPDATE SKIP LOCKED)",
                (now,),
            )

        # Housekeeping only: the call it followed has already succeeded either way.
        with suppress(StoreUnavailable):
            self._run("sweeping expired counters", sweep, tx=False, idempotent=True)

    def secret(self) -> bytes:
        self._bootstrap()
        assert self._secret is not None
        return self._secret

    def close(self) -> None:
        self._pool.close()


# -- migrations -------------------------------------------------------------------------------


def _search_path_head(conn: psycopg.Connection[Any]) -> str | None:
    """The first schema named in ``search_path`` (which may not exist yet)."""
    row = conn.execute("SHOW search_path").fetchone()
    for item in str(row[0] if row else "").split(","):
        name = item.strip()
        if name.startswith('"') and name.endswith('"'):
            name = name[1:-1].replace('""', '"')
        if name and name != "$user":
            return name
    return None


def _migrate(conn: psycopg.Connection[Any]) -> str | None:
    """Bring the schema to the last of :data:`MIGRATIONS`; safe from many processes at once.

    Returns the cursor secret when the schema was already current (the common case, answered
    in two round trips without a lock), else ``None``.
    """
    from psycopg import sql

    latest = MIGRATIONS[-1][0]

    def check(done: int | None) -> bool:
        if done is not None and done > latest:
            raise MeterkitError(
                f"the database schema is at version {done}, newer than this meterkit "
                f"knows ({latest}); upgrade meterkit"
            )
        return done == latest

    row = conn.execute("SELECT to_regclass('mk_schema_migrations') IS NOT NULL").fetchone()
    if row and row[0]:
        row = conn.execute(
            "SELECT max(version), (SELECT value FROM mk_meta WHERE key = 'cursor_secret') "
            "FROM mk_schema_migrations"
        ).fetchone()
        if row and check(row[0]) and row[1] is not None:
            return str(row[1])
    with conn.transaction():
        row = conn.execute("SELECT current_schema()").fetchone()
        schema = row[0] if row else None
        target = schema or _search_path_head(conn)
        if target is None:
            raise MeterkitError("PostgreSQL search_path names no schema to create tables in")
        # Held until this transaction ends: a second process waits here, then sees the
        # migrations the first one committed and applies none of them again.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("migrate", target),))
        if schema is None:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(target)))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS mk_schema_migrations (version integer PRIMARY KEY, "
            "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r[0] for r in conn.execute("SELECT version FROM mk_schema_migrations")}
        if check(max(done, default=None)):
            return None
        for version, description, statements in MIGRATIONS:
            if version in done:
                continue
            # One round trip for the whole migration (no parameters: a simple-query script).
            conn.execute(";\n".join(statements))
            conn.execute(
                "INSERT INTO mk_schema_migrations (version, description) VALUES (%s, %s)",
                (version, description),
            )
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def _connection_class(store: PostgresStore) -> type[psycopg.Connection[Any]]:
    """A connection class that tells ``store`` why a connection attempt failed."""
    import psycopg

    class Connection(psycopg.Connection[Any]):
        @classmethod
        def connect(cls, *args: Any, **kwargs: Any) -> Any:
            try:
                conn = super().connect(*args, **kwargs)
            except psycopg.OperationalError as exc:
                store._connect_failed(exc)
                raise
            store._connect_error = None
            return conn

    return Connection


def _check_connection(conn: psycopg.Connection[Any]) -> None:
    """Make sure a pooled connection still works before it is handed out.

    An idle connection has nothing to say, so a readable socket means the server spoke: it
    dropped the connection (restart, ``pg_terminate_backend``, idle timeout). Only then is the
    connection tried with a round trip; if that fails the pool replaces it, and the caller
    never sees the dead one. Checking every connection that way would cost a round trip per
    call.
    """
    from psycopg_pool import ConnectionPool

    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if readable or conn.closed:
        ConnectionPool.check_connection(conn)


# -- counters ---------------------------------------------------------------------------------


def _live(expires_at: int | None, now: int) -> bool:
    return expires_at is None or expires_at > now


def _hold(row: Sequence[Any]) -> Hold:
    amounts = row[2] if not isinstance(row[2], str) else json.loads(row[2])
    return Hold(row[0], row[1], tuple((str(k), int(v)) for k, v in amounts), int(row[3]))


def _pop_expired_holds(cur: psycopg.Cursor[Any], now: int) -> list[Hold]:
    # SKIP LOCKED: a hold another transaction is already releasing is theirs to release; not
    # waiting for it is what lets hold rows be taken before counter rows without deadlocks.
    cur.execute(
        "DELETE FROM mk_holds WHERE id IN (SELECT id FROM mk_holds WHERE expires_at <= %s "
        "ORDER BY id FOR UPDATE SKIP LOCKED) RETURNING id, organization_id, amounts, expires_at",
        (now,),
    )
    return sorted((_hold(r) for r in cur.fetchall()), key=lambda h: h.id)


def _lock_rows(
    cur: psycopg.Cursor[Any], writes: Iterable[str], reads: Iterable[str]
) -> dict[str, tuple[int, int | None]]:
    """Lock the counter rows of ``writes`` (creating them) and ``reads``; their values.

    A missing row to be written is inserted as a placeholder that reads exactly like an
    absent counter (value 0, already expired), so a refused decision leaves nothing that
    counts, and the sweep deletes it later. Rows are locked in key order in one statement.
    """
    # Rows read are made too: under READ COMMITTED a row another transaction is inserting
    # would be invisible to the SELECT below even after waiting for it, and read as 0.
    wanted = keys = sorted(set(writes) | set(reads))
    if not keys:
        return {}
    for _ in range(10):
        if wanted:
            cur.execute(
                "INSERT INTO mk_counters (key, value, expires_at) "
                'SELECT k, 0, 0 FROM unnest(%s::text[]) AS t(k) ORDER BY k COLLATE "C" '
                "ON CONFLICT (key) DO NOTHING",
                (wanted,),
            )
        cur.execute(
            "SELECT key, value, expires_at FROM mk_counters WHERE key = ANY(%s) "
            "ORDER BY key FOR UPDATE",
            (keys,),
        )
        rows = {r[0]: (int(r[1]), r[2]) for r in cur.fetchall()}
        # A placeholder the sweep deleted between the two statements is simply made again.
        if all(k in rows for k in wanted):
            return rows
    raise StoreUnavailable("PostgreSQL store could not lock its counter rows")


class _PgCounters:
    """Counter primitives over rows this transaction has locked: read once, written once."""

    def __init__(
        self,
        cur: psycopg.Cursor[Any],
        now: int,
        rows: dict[str, tuple[int, int | None]],
        expired: list[Hold],
        popped: list[Hold] | None = None,
    ) -> None:
        self.cur, self.now, self.rows = cur, now, rows
        self.expired = expired
        self.popped = {h.id: h for h in popped or ()}
        self.dirty: set[str] = set()
        self.new_holds: list[Hold] = []

    def _get(self, key: str) -> tuple[int, int | None]:
        value, expires = self.rows.get(key, (0, None))
        if not _live(expires, self.now):
            return 0, None
        return value, expires

    def read(self, keys: Sequence[str], now: int) -> list[int]:
        return [self._get(k)[0] for k in keys]

    def add(self, key: str, delta: int, expires_at: int | None) -> int:
        if key not in self.rows:
            raise KeyError(f"counter {key!r} was not locked by this transaction")
        value, expires = self._get(key)
        value = counters.clamp(value + delta)
        self.rows[key] = (value, expires_at if expires_at is not None else expires)
        self.dirty.add(key)
        return value

    def pop_expired_holds(self, now: int) -> list[Hold]:
        expired, self.expired = self.expired, []
        return expired

    def pop_hold(self, hold_id: str) -> Hold | None:
        return self.popped.pop(hold_id, None)

    def put_hold(self, hold: Hold) -> None:
        self.new_holds.append(hold)

    def flush(self) -> None:
        if self.dirty:
            keys = sorted(self.dirty)
            self.cur.execute(
                "UPDATE mk_counters AS c SET value = u.value, expires_at = u.expires_at "
                "FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS u(key, value, expires_at) "
                "WHERE c.key = u.key",
                (keys, [self.rows[k][0] for k in keys], [self.rows[k][1] for k in keys]),
            )
        for hold in self.new_holds:
            self.cur.execute(
                "INSERT INTO mk_holds (id, organization_id, amounts, expires_at) "
                "VALUES (%s, %s, %s::jsonb, %s) ON CONFLICT (id) DO UPDATE SET "
                "organization_id = excluded.organization_id, amounts = excluded.amounts, "
                "expires_at = excluded.expires_at",
                (hold.id, hold.organization_id, json.dumps(hold.amounts), hold.expires_at),
            )


# -- plugin -----------------------------------------------------------------------------------


@hookimpl
def meterkit_open_store(url: str, scheme: str) -> PostgresStore | None:
    return PostgresStore(url) if scheme in SCHEMES else None


@hookimpl
def meterkit_store_schemes() -> list[str]:
    return list(SCHEMES)
