"""The SQL a relational store sends to answer a bucket query natively.

SQLite and PostgreSQL differ only in spelling (quotes, placeholders, ``%`` vs ``mod``), so
both build their statements here and merge the answers here: one translation of the engine's
semantics into SQL, held to the engine by the same conformance suite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from meterkit.engine.aggregate import Rows, empty_value
from meterkit.models import DimValue, MeterSpec, Number, UsageQuery

__all__ = ["Dialect", "Statements", "merge_rows", "statements"]

_PLAIN = {
    "sum": "SUM({})",
    "count": "COUNT({})",
    "max": "MAX({})",
    "min": "MIN({})",
    "unique_count": "COUNT(DISTINCT {})",
}
_GAUGE = {"sum": "SUM", "max": "MAX", "min": "MIN"}


@attrs.frozen
class Dialect:
    """How one database spells what the statements need."""

    table: Callable[[str], str]  # meter name -> quoted table
    dim: Callable[[str], str]  # dimension name -> quoted column
    val: Callable[[str], str]  # measure name -> quoted column
    member: Callable[[str, list[Any]], tuple[str, list[Any]]]  # column IN values -> sql, params
    placeholder: str = "?"
    modulo: str = "{} % {}"
    subquery_alias: str = ""


@attrs.frozen
class Statements:
    """``(measure, sql)`` pairs — ``None`` for the plain aggregates — sharing ``params``.

    The plain statement comes first: its rows are every (bucket, group) that has events.
    """

    sql: tuple[tuple[str | None, str], ...]
    params: tuple[Any, ...]


def statements(spec: MeterSpec, query: UsageQuery, d: Dialect) -> Statements:
    p = d.placeholder
    where = [f"organization_id = {p}", f"time >= {p}", f"time < {p}"]
    params: list[Any] = [query.organization_id, query.scan_start, query.page_end]
    for name, allowed in query.filters:
        col = d.dim(name)
        present = [v for v in allowed if v is not None]
        parts = []
        if present:
            sql, extra = d.member(col, present)
            parts.append(sql)
            params.extend(extra)
        if None in allowed:
            parts.append(f"{col} IS NULL")
        where.append("(" + " OR ".join(parts) + ")")
    bucket = "(time - " + d.modulo.format("time", int(query.width)) + ")"
    groups = [d.dim(g) for g in query.group_by]
    part = ", ".join([bucket, *groups])
    table = d.table(spec.name)
    cond = " AND ".join(where)

    plain = [m for m in spec.measures if not m.gauge and m.aggregation != "latest"]
    select = [bucket, *groups, *(_PLAIN[m.aggregation].format(d.val(m.name)) for m in plain)]
    out: list[tuple[str | None, str]] = [
        (None, f"SELECT {', '.join(select)} FROM {table} WHERE {cond} GROUP BY {part}")
    ]
    series = ", ".join([bucket, *(d.dim(name) for name in spec.dimension_names)])
    for m in spec.measures:
        if not (m.gauge or m.aggregation == "latest"):
            continue
        col = d.val(m.name)
        # The latest value per series (gauges) or per group (latest): ties in time go to
        # the greatest id, as in the engine.
        window = series if m.gauge else part
        inner = (
            f"SELECT {bucket} AS b, {', '.join([*groups, col])}, "
            f"ROW_NUMBER() OVER (PARTITION BY {window} ORDER BY time DESC, id DESC) AS rn "
            f"FROM {table} WHERE {cond} AND {col} IS NOT NULL"
        )
        outer = ", ".join(["b", *groups])
        if m.gauge:
            sql = (
                f"SELECT {outer}, {_GAUGE[m.aggregation]}({col}) FROM ({inner})"
                f"{d.subquery_alias} WHERE rn = 1 GROUP BY {outer}"
            )
        else:
            sql = f"SELECT {outer}, {col} FROM ({inner}){d.subquery_alias} WHERE rn = 1"
        out.append((m.name, sql))
    return Statements(tuple(out), tuple(params))


def merge_rows(
    spec: MeterSpec,
    query: UsageQuery,
    answers: Iterable[tuple[str | None, Iterable[Sequence[Any]]]],
    *,
    value: Callable[[Any], Number | None] = lambda v: v,
    group: Callable[[str, Any], DimValue] = lambda _name, v: v,
) -> Rows:
    """Rows from each statement's answer, in the order :func:`statements` gave them."""
    plain = [m.name for m in spec.measures if not m.gauge and m.aggregation != "latest"]
    width = len(query.group_by)
    blank = {m.name: empty_value(m) for m in spec.measures}
    rows: Rows = {}
    for measure, found in answers:
        for row in found:
            key = (
                int(row[0]),
                tuple(group(g, v) for g, v in zip(query.group_by, row[1 : 1 + width])),
            )
            values = rows.setdefault(key, dict(blank))
            if measure is None:
                for name, raw in zip(plain, row[1 + width :]):
                    decoded = value(raw)
                    if decoded is not None:
                        values[name] = decoded
            else:
                values[measure] = value(row[-1])
    return rows
