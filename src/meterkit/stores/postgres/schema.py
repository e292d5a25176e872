"""The schema of the PostgreSQL store: versioned migrations, each a SQL file run once.

``migrations/NNNN_name.sql``: the first line is a comment describing it; the rest is one
script sent in one round trip (no parameters). A later change to the schema is a new file;
files already released never change.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from meterkit.errors import MeterkitError
from meterkit.stores.postgres.names import lock_key

if TYPE_CHECKING:
    import psycopg

__all__ = ["MIGRATIONS", "migrate"]


def _load() -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    found = []
    folder = resources.files(__package__).joinpath("migrations")
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if not item.name.endswith(".sql"):
            continue
        text = item.read_text(encoding="utf-8")
        head, _, script = text.partition("\n")
        found.append((int(item.name[:4]), head.removeprefix("-- ").strip(), (script.rstrip(),)))
    return tuple(found)


MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = _load()
"""``(version, description, statements)``, applied in order, each exactly once per schema."""


def search_path_head(conn: psycopg.Connection[Any]) -> str | None:
    """The first schema named in ``search_path`` (which may not exist yet)."""
    row = conn.execute("SHOW search_path").fetchone()
    for item in str(row[0] if row else "").split(","):
        name = item.strip()
        if name.startswith('"') and name.endswith('"'):
            name = name[1:-1].replace('""', '"')
        if name and name != "$user":
            return name
    return None


def migrate(conn: psycopg.Connection[Any]) -> str | None:
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
        target = schema or search_path_head(conn)
        if target is None:
            raise MeterkitError("PostgreSQL search_path names no schema to create tables in")
        # Held until this transaction ends: a second process waits here, then sees the
        # migrations the first one committed and applies none of them again.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("migrate", target),))
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
