"""Transactions of the SQLite store: ``BEGIN IMMEDIATE``, nestable, with its schema version."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import sqlite_utils

from meterkit.errors import StoreUnavailable

__all__ = ["SCHEMA_VERSION", "Immediate", "migrate"]

SCHEMA_VERSION = 2


class Immediate:
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


def migrate(db: sqlite_utils.Database, path: str) -> None:
    """Bring an older file to :data:`SCHEMA_VERSION`; the caller holds the write lock."""
    row = db.conn.execute("SELECT value FROM mk_meta WHERE key = 'schema_version'").fetchone()
    tables = [t for t in db.table_names() if t.startswith("events_")]
    version = int(row[0]) if row else (1 if tables else SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"{path} is at schema version {version}, newer than this meterkit knows "
            f"({SCHEMA_VERSION}); upgrade meterkit"
        )
    if version < 2:
        for name in tables:
            # Rebuild with ids unique per organization: every row is copied, none can
            # collide (they were unique by id alone), and the index is recreated.
            for sql in db.table(name).transform_sql(pk=("organization_id", "id")):
                db.conn.execute(sql)
            db.conn.execute(
                f"CREATE INDEX IF NOT EXISTS [idx_{name}_org_time] "
                f"ON [{name}] (organization_id, time)"
            )
    if row is None or version != SCHEMA_VERSION:
        db.conn.execute(
            "INSERT INTO mk_meta(key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
