"""Quota counters in PostgreSQL: rows of ``mk_counters`` and ``mk_holds``.

A decision is one call of the server-side function ``mk_counters_apply`` (the rule of
:func:`meterkit.counters.apply`, written once in SQL in ``migrations/0003_counters_apply.sql``
and held to it by the conformance suite); settles, adds and reads lock the rows they touch in
key order and run :mod:`meterkit.counters` over them.
"""

from __future__ import annotations

import json
import time as _time
from collections.abc import Iterable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from meterkit import counters
from meterkit.errors import StoreUnavailable
from meterkit.models import CounterLine, CounterResult, Hold
from meterkit.stores.postgres.pool import PgPool

if TYPE_CHECKING:
    import psycopg

__all__ = ["PgCounters"]

SWEEP_EVERY = 60.0


def live(expires_at: int | None, now: int) -> bool:
    return expires_at is None or expires_at > now


def hold_of(row: Sequence[Any]) -> Hold:
    amounts = row[2] if not isinstance(row[2], str) else json.loads(row[2])
    return Hold(row[0], row[1], tuple((str(k), int(v)) for k, v in amounts), int(row[3]))


def pop_expired_holds(cur: psycopg.Cursor[Any], now: int) -> list[Hold]:
    # SKIP LOCKED: a hold another transaction is already releasing is theirs to release; not
    # waiting for it is what lets hold rows be taken before counter rows without deadlocks.
    cur.execute(
        "DELETE FROM mk_holds WHERE id IN (SELECT id FROM mk_holds WHERE expires_at <= %s "
        "ORDER BY id FOR UPDATE SKIP LOCKED) RETURNING id, organization_id, amounts, expires_at",
        (now,),
    )
    return sorted((hold_of(r) for r in cur.fetchall()), key=lambda h: h.id)


def lock_rows(
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


class CounterRows:
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

    def value(self, key: str) -> tuple[int, int | None]:
        value, expires = self.rows.get(key, (0, None))
        if not live(expires, self.now):
            return 0, None
        return value, expires

    def read(self, keys: Sequence[str], now: int) -> list[int]:
        return [self.value(k)[0] for k in keys]

    def add(self, key: str, delta: int, expires_at: int | None) -> int:
        if key not in self.rows:
            raise KeyError(f"counter {key!r} was not locked by this transaction")
        value, expires = self.value(key)
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


class PgCounters:
    """The :class:`~meterkit.stores.base.CounterStore` calls of the PostgreSQL store."""

    def __init__(self, db: PgPool) -> None:
        self.db = db
        self.url = db.url
        self._next_sweep = 0.0

    def close(self) -> None:
        """Nothing of its own: the store closes the pool."""

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
        values = self.db.run("applying a quota decision", apply, tx=False, idempotent=True)
        result = CounterResult(values[0] == 1, tuple(values[1 : 1 + n]), tuple(values[1 + n :]))
        self.maybe_sweep(now)
        return result

    def counters_settle(self, hold_id: str, deltas: Sequence[tuple[str, int]], *, now: int) -> bool:
        def settle(cur: psycopg.Cursor[Any]) -> bool:
            # Hold rows first, counter rows second, as in counters_apply: the same order in
            # every transaction is what keeps them from deadlocking.
            expired = pop_expired_holds(cur, now)
            cur.execute(
                "DELETE FROM mk_holds WHERE id = %s RETURNING id, organization_id, amounts, "
                "expires_at",
                (hold_id,),
            )
            popped = [hold_of(r) for r in cur.fetchall()]
            writes = {key for key, _ in deltas} if popped else set()
            writes.update(key for h in expired for key, _ in h.amounts)
            backend = CounterRows(cur, now, lock_rows(cur, writes, []), expired, popped)
            settled = counters.settle(backend, hold_id, deltas, now)
            backend.flush()
            return settled

        return self.db.run("settling a reservation", settle)

    def counters_add(
        self, deltas: Sequence[tuple[str, int]], *, now: int, expires_at: int | None = None
    ) -> list[int]:
        def add(cur: psycopg.Cursor[Any]) -> list[int]:
            backend = CounterRows(cur, now, lock_rows(cur, [k for k, _ in deltas], []), [])
            values = [backend.add(key, delta, expires_at) for key, delta in deltas]
            backend.flush()
            return values

        values = self.db.run("adding to counters", add)
        self.maybe_sweep(now)
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

        self.db.run("setting a counter", put, tx=False, idempotent=True)

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
            found = {r[0]: int(r[1]) for r in rows if r[0] is not None and live(r[2], now)}
            return [found.get(k, 0) for k in keys]

        def release_then_read(cur: psycopg.Cursor[Any]) -> list[int]:
            # Give expired holds back first, as counters_apply would: reads agree with
            # decisions.
            expired = pop_expired_holds(cur, now)
            writes = [key for h in expired for key, _ in h.amounts]
            backend = CounterRows(cur, now, lock_rows(cur, writes, keys), expired)
            counters.release_expired(backend, now)
            backend.flush()
            return backend.read(keys, now)

        values = self.db.run("reading counters", read, tx=False, idempotent=True)
        if values is None:
            values = self.db.run("reading counters", release_then_read)
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

        return self.db.run("claiming a marker", claim, tx=False)

    def maybe_sweep(self, now: int) -> None:
        """Now and then, delete counters and claims that expired (they read as absent anyway)."""
        tick = _time.monotonic()
        if tick < self._next_sweep or getattr(self.db.pinned, "cur", None) is not None:
            return  # not inside a caller's transaction: it would hold the swept rows
        self._next_sweep = tick + SWEEP_EVERY

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
            self.db.run("sweeping expired counters", sweep, tx=False, idempotent=True)
