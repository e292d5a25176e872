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

from meterkit.hookspecs import hookimpl
from meterkit.stores.postgres.schema import MIGRATIONS
from meterkit.stores.postgres.store import PostgresStore

__all__ = ["MIGRATIONS", "SCHEMES", "PostgresStore"]

SCHEMES = ("postgresql", "postgres")


@hookimpl
def meterkit_open_store(url: str, scheme: str) -> PostgresStore | None:
    return PostgresStore(url) if scheme in SCHEMES else None


@hookimpl
def meterkit_store_schemes() -> list[str]:
    return list(SCHEMES)
