"""``sqlite:///path.db`` — the embedded default: one file, WAL mode, SQL aggregation.

The package: ``names`` (URLs, tables, SQL builders), ``connection`` (transactions and the
schema version), ``counters`` (quota counters) and ``store`` (events, rollups, records).
"""

from __future__ import annotations

from meterkit.hookspecs import hookimpl
from meterkit.stores.sqlite.connection import SCHEMA_VERSION
from meterkit.stores.sqlite.names import SCAN_CHUNK, options_from_url, path_from_url
from meterkit.stores.sqlite.store import SQLiteStore

__all__ = ["SCAN_CHUNK", "SCHEMA_VERSION", "SQLiteStore", "options_from_url", "path_from_url"]


@hookimpl
def meterkit_open_store(url: str, scheme: str) -> SQLiteStore | None:
    return SQLiteStore(url) if scheme == "sqlite" else None


@hookimpl
def meterkit_store_schemes() -> list[str]:
    return ["sqlite"]
