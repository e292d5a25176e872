"""Files and schemas written by meterkit 0.1 (event ids unique per meter) open and migrate.

Several processes open the same old file or schema at once: exactly one migrates, nothing is
lost, a duplicate within one organization is still a duplicate, and another organization may
now use an id that was taken. 0.1 kept no rollups: they are built from the old events, once,
and agree with them.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

import processes
import services
from meterkit import AppendResult, Event, Meter
from meterkit.stores.postgres import MIGRATIONS

T0 = 1_730_419_200
PROCESSES = 4
RUN = uuid.uuid4().hex[:8]


def old_events() -> list[Event]:
    return [Event(f"e{i}", "tokens", f"org_{i % 2}", T0 + i, {"tokens": i + 1}) for i in range(20)]


def _open_and_record(url: str, k: int, barrier: Any, results: Any) -> None:
    try:
        barrier.wait(timeout=60)
        with Meter(url, clock=lambda: T0 + 3600) as m:
            # An id 0.1 gave to org_0 is free for org_1 after the migration (and vice versa).
            m.record(
                "tokens",
                {"tokens": 100},
                organization_id=f"org_{(k + 1) % 2}",
                id=f"e{k}",
                time=T0 + 50,
            )
            again = m.record_many(old_events())
        results.put((again.accepted, again.duplicates, len(again.conflicts)))
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def open_at_once(url: str) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    return processes.spawn(_open_and_record, lambda k: (url, k, barrier), PROCESSES)


def check_migrated(url: str) -> None:
    with Meter(url, clock=lambda: T0 + 3600) as m:
        assert m.record_many(old_events()) == AppendResult(0, 20)
        stored: dict[tuple[str, str], int] = {}
        for org in ("org_0", "org_1"):
            for e in m.store.scan("tokens", org, 0, T0 + 3600):
                stored[(org, e.id)] = int(e.values["tokens"])
        want = {(e.organization_id, e.id): int(e.values["tokens"]) for e in old_events()}
        want |= {(f"org_{(k + 1) % 2}", f"e{k}"): 100 for k in range(PROCESSES)}
        assert stored == want
        # Rollups built once from the old events, then kept up by every process's writes.
        assert m.verify_rollups("tokens") == []
        for org in ("org_0", "org_1"):
            total = m.total(
                "tokens", "tokens", organization_id=org, start_time=T0, end_time=T0 + 3600
            )
            assert total == sum(v for (o, _), v in want.items() if o == org)


# -- SQLite -----------------------------------------------------------------------------------


def make_sqlite_v1(path: Path) -> str:
    """A file as 0.1 left it: events keyed by id alone, schema version 1."""
    url = f"sqlite:///{path}"
    with Meter(url) as m:
        assert m.record_many(old_events()).accepted == 20
    db = sqlite_utils.Database(sqlite3.connect(path, isolation_level=None))
    db.execute("BEGIN IMMEDIATE")
    for sql in db.table("events_tokens").transform_sql(pk="id"):
        db.execute(sql)
    db.execute("UPDATE mk_meta SET value = '1' WHERE key = 'schema_version'")
    for grain in ("1m", "1h", "1d"):
        db.execute(f"DROP TABLE rollup_tokens_{grain}")
    db.execute("DELETE FROM mk_meta WHERE key LIKE 'rollups/%'")
    db.execute("COMMIT")
    assert db.table("events_tokens").pks == ["id"]
    db.conn.close()
    return url


@pytest.mark.slow
def test_sqlite_file_from_0_1_migrates_once_with_many_processes(tmp_path: Path) -> None:
    url = make_sqlite_v1(tmp_path / "old.db")
    results = open_at_once(url)
    assert sorted(results) == [(0, 20, 0)] * PROCESSES, results
    db = sqlite_utils.Database(tmp_path / "old.db")
    assert db.table("events_tokens").pks == ["organization_id", "id"]
    assert db.execute("SELECT value FROM mk_meta WHERE key = 'schema_version'").fetchone() == ("2",)
    assert any(i.columns == ["organization_id", "time"] for i in db.table("events_tokens").indexes)
    db.conn.close()
    check_migrated(url)


def test_a_newer_sqlite_file_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    Meter(url).close()
    conn = sqlite3.connect(tmp_path / "new.db")
    conn.execute("UPDATE mk_meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(Exception, match="newer"):
        Meter(url)


# -- PostgreSQL -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    url = services.postgres_url()
    yield url
    services.drop_schemas(url, f"mk_m{RUN}\\_")


def make_postgres_v1(postgres_url: str) -> str:
    """A schema as 0.1 left it: migration 1 only, events keyed by id alone."""
    import psycopg

    schema = f"mk_m{RUN}_{uuid.uuid4().hex[:8]}"
    url = services.with_params(postgres_url, schema=schema)
    with Meter(url) as m:
        assert m.record_many(old_events()).accepted == 20
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute(
            "ALTER TABLE events_tokens DROP CONSTRAINT events_tokens_pkey, ADD PRIMARY KEY (id)"
        )
        conn.execute("DELETE FROM mk_schema_migrations WHERE version > 1")
        for grain in ("1m", "1h", "1d"):
            conn.execute(f"DROP TABLE rollup_tokens_{grain}")
        conn.execute("DELETE FROM mk_meta WHERE key LIKE 'rollups/%'")
    return url


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_schema_from_0_1_migrates_once_with_many_processes(postgres_url: str) -> None:
    import psycopg

    url = make_postgres_v1(postgres_url)
    results = open_at_once(url)
    assert sorted(results) == [(0, 20, 0)] * PROCESSES, results
    schema = url.rsplit("schema=", 1)[1]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        versions = conn.execute(
            f'SELECT version FROM "{schema}".mk_schema_migrations ORDER BY version'
        ).fetchall()
        assert versions == [(v,) for v, _, _ in MIGRATIONS]
        key = conn.execute(
            "SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_constraint c "
            "CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord) "
            "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum "
            "WHERE c.conrelid = %s::regclass AND c.contype = 'p'",
            (f'"{schema}".events_tokens',),
        ).fetchone()
        assert key == (["organization_id", "id"],)
    check_migrated(url)
