"""Names, numbers and SQL builders of the PostgreSQL store."""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from meterkit.engine import rollup
from meterkit.models import MeterSpec, Number
from meterkit.stores import sqlagg

MAX_IDENT = 63  # PostgreSQL silently truncates longer identifiers: never let it.


def ident(prefix: str, name: str, suffix: str = "") -> str:
    """``prefix + name + suffix``, shortened with a hash when longer than PostgreSQL allows."""
    full = f"{prefix}{name}{suffix}"
    if len(full) <= MAX_IDENT:
        return full
    digest = hashlib.sha1(full.encode()).hexdigest()[:8]
    keep = MAX_IDENT - len(prefix) - len(suffix) - len(digest) - 1
    return f"{prefix}{name[:keep]}_{digest}{suffix}"


def quoted(name: str) -> str:
    # Every name here is built from meterkit's own name rule ([a-z][a-z0-9_]*), so quoting is
    # only there to keep words such as "time" or "user" from meaning anything to SQL.
    return f'"{name}"'


def events_table(meter: str) -> str:
    return ident("events_", meter)


def dim_column(name: str) -> str:
    return ident("d_", name)


def value_column(name: str) -> str:
    return ident("v_", name)


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory-lock key for ``parts``, the same in every process."""
    digest = hashlib.sha256("\x1f".join(("meterkit", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def encode(value: Number | None) -> Decimal | None:
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


def number(value: Decimal | int) -> Number:
    """Back from ``numeric``: scale 0 is an ``int``, any other scale a ``float``."""
    if isinstance(value, int):
        return value
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent >= 0:
        return int(value)
    return float(value)


def decode(value: Decimal | int | None) -> Number | None:
    return None if value is None else number(value)


_GRAIN_NAMES = {60: "_1m", 3600: "_1h", 86400: "_1d"}


def rollup_table(meter: str, grain: int) -> str:
    return ident("rollup_", meter, _GRAIN_NAMES[grain])


def cell_column(kind: str, measure: str) -> str:
    return ident(f"{kind}_", measure)


DIALECT = sqlagg.Dialect(
    table=lambda meter: quoted(events_table(meter)),
    dim=lambda name: quoted(dim_column(name)),
    val=lambda name: quoted(value_column(name)),
    member=lambda column, values: (f"{column} = ANY(%s)", [values]),
    placeholder="%s",
    modulo="mod({}, {})",
    subquery_alias=" AS s",
    rollup=lambda meter, grain: quoted(rollup_table(meter, grain)),
    cell=lambda kind, measure: quoted(cell_column(kind, measure)),
    least="LEAST",
    greatest="GREATEST",
)


CELL_TYPES = {
    "s": "numeric",
    "n": "bigint",
    "mn": "numeric",
    "mx": "numeric",
    "t": "bigint",
    "i": 'text COLLATE "C"',
    "l": "numeric",
}


NUMERIC_CELLS = frozenset({"s", "mn", "mx", "l"})


def rollup_layout(spec: MeterSpec) -> dict[str, list[str]] | None:
    """What a meter's rollups keep of each measure (``None``: it keeps none)."""
    if not rollup.rollable(spec):
        return None
    out: dict[str, list[str]] = {}
    for kind, name in rollup.columns(spec):
        out.setdefault(name, []).append(kind)
    return out


_LATEST = "(array_agg({x} ORDER BY time DESC, id DESC) FILTER (WHERE {v} IS NOT NULL))[1]"


FOLD = {
    "s": "SUM({v})",
    "n": "NULLIF(COUNT({v}), 0)",
    "mn": "MIN({v})",
    "mx": "MAX({v})",
    "t": _LATEST.replace("{x}", "time"),
    "i": _LATEST.replace("{x}", "id"),
    "l": _LATEST.replace("{x}", "{v}"),
}


def ingest_sql(spec: MeterSpec, cols: Sequence[str], source: str) -> str:
    """One statement that appends a batch of events and folds the new ones into every grain's
    rollups, as :func:`meterkit.engine.rollup.fold` would: the events come from ``source``
    (a ``SELECT`` of the columns and each event's series key, computed in Python, last); the
    rollup rows are upserted in key order, so concurrent writers lock them in one order.
    Returns the new events' keys."""
    names = [quoted(c) for c in cols]
    dims = [quoted(dim_column(d)) for d in spec.dimension_names]
    parts = [
        f"input ({', '.join([*names, 'series'])}) AS ({source})",
        f"ins AS (INSERT INTO {quoted(events_table(spec.name))} ({', '.join(names)}) "
        f"SELECT {', '.join(names)} FROM input ON CONFLICT (organization_id, id) DO NOTHING "
        "RETURNING organization_id, id)",
        "new AS (SELECT input.* FROM input JOIN ins USING (organization_id, id))",
    ]
    cells = [FOLD[kind].format(v=quoted(value_column(name))) for kind, name in rollup.columns(spec)]
    for grain in rollup.GRAINS:
        key = ["organization_id", f"time - mod(time, {grain})", "series", *dims]
        select = (
            f"SELECT {', '.join([*key, *cells])} FROM new GROUP BY {', '.join(key)} "
            "ORDER BY 1, 2, 3"
        )
        parts.append(f"r{grain} AS ({sqlagg.upsert(spec, grain, DIALECT, select)})")
    return "WITH " + ", ".join(parts) + " SELECT organization_id, id FROM ins"


def insert_sql(meter: str, cols: Sequence[str], source: str) -> str:
    """Append a batch from ``source`` (no rollups); returns the new events' keys."""
    names = ", ".join(quoted(c) for c in cols)
    table = quoted(events_table(meter))
    return (
        f"INSERT INTO {table} ({names}) SELECT {names} FROM ({source}) AS input "
        "ON CONFLICT (organization_id, id) DO NOTHING RETURNING organization_id, id"
    )


def digest(*parts: Sequence[str]) -> str:
    """A short name for a column layout: a staging table per layout, so a widened meter
    never copies into a table of its old columns."""
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=6).hexdigest()


stages: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def rollup_params(
    spec: MeterSpec, rows: Mapping[rollup.Key, tuple[tuple[Any, ...], Sequence[Any]]]
) -> list[tuple[Any, ...]]:
    """Bind parameters of the upsert for rows folded by
    :func:`~meterkit.engine.rollup.fold_grains`, sorted by key: concurrent writers then lock
    rollup rows in one order and never deadlock on them."""
    numeric = [kind in NUMERIC_CELLS for kind, _ in rollup.columns(spec)]
    return [
        (
            *key,
            *rows[key][0],
            *(encode(v) if num else v for num, v in zip(numeric, rows[key][1], strict=True)),
        )
        for key in sorted(rows)
    ]
