"""Events and rollups of the PostgreSQL store, read and folded inside a caller's cursor."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from meterkit.engine import rollup
from meterkit.models import Event, MeterSpec
from meterkit.stores import sqlagg
from meterkit.stores.postgres.names import (
    CELL_TYPES,
    DIALECT,
    dim_column,
    events_table,
    number,
    quoted,
    rollup_params,
    rollup_table,
    value_column,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["add_rollups", "ensure_rollups", "fold_all", "read_events"]


def ensure_rollups(
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
        ([quoted(rollup_table(spec.name, g)) for g in rollup.GRAINS],),
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
            f"DROP TABLE IF EXISTS {quoted(rollup_table(spec.name, g))}" for g in rollup.GRAINS
        ]
    for name, cols in rolled.items():
        body = ", ".join(f"{quoted(n)} {t}" for n, t in cols.items())
        script.append(
            f"CREATE TABLE IF NOT EXISTS {quoted(name)} ({body}, "
            "PRIMARY KEY (organization_id, bucket, series))"
        )
        script += [
            f"ALTER TABLE {quoted(name)} ADD COLUMN IF NOT EXISTS {quoted(n)} {t}"
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
        fold_all(cur, spec)


def fold_all(
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
            read_events(
                cur,
                spec,
                "time >= %s AND (organization_id, id) > (%s, %s) "
                "ORDER BY organization_id, id LIMIT 10000",
                (since, *after),
            )
        )
        if not chunk:
            return done
        add_rollups(cur, spec, chunk)
        done += len(chunk)
        after = (chunk[-1].organization_id, str(chunk[-1].id))
        if progress is not None:
            progress(done)


def add_rollups(cur: psycopg.Cursor[Any], spec: MeterSpec, events: Sequence[Event]) -> None:
    if not events or not rollup.rollable(spec):
        return
    # One statement per grain: the rows as arrays, unnested in key order.
    types = ["text", "bigint", "text"]
    types += ["boolean" if d.kind == "bool" else "text" for d in spec.dimensions]
    types += [CELL_TYPES[kind].split()[0] for kind, _ in rollup.columns(spec)]
    source = "SELECT * FROM unnest(" + ", ".join(f"%b::{t}[]" for t in types) + ")"
    for grain, rows in rollup.fold_grains(spec, events).items():
        params = rollup_params(spec, rows)
        columns = [list(c) for c in zip(*params, strict=True)]
        cur.execute(sqlagg.upsert(spec, grain, DIALECT, source), columns)


def read_events(
    cur: psycopg.Cursor[Any], spec: MeterSpec, where: str, params: Sequence[Any]
) -> list[Event]:
    dims, measures = spec.dimension_names, spec.measure_names
    cols = ", ".join(
        ["id", "organization_id", "time"]
        + [quoted(dim_column(d)) for d in dims]
        + [quoted(value_column(m)) for m in measures]
    )
    cur.execute(f"SELECT {cols} FROM {quoted(events_table(spec.name))} WHERE {where}", params)
    n = len(dims)
    out = []
    for row in cur.fetchall():
        values = {
            m: number(v) for m, v in zip(measures, row[3 + n :], strict=True) if v is not None
        }
        dvals = {d: v for d, v in zip(dims, row[3 : 3 + n], strict=True) if v is not None}
        out.append(Event(row[0], spec.name, row[1], row[2], values, dvals))
    return out
