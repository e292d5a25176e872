"""The SQL a relational store sends to answer a bucket query natively.

SQLite and PostgreSQL differ only in spelling (quotes, placeholders, ``%`` vs ``mod``), so
both build their statements here and merge the answers here: one translation of the engine's
semantics into SQL, held to the engine by the same conformance suite.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs

from meterkit.engine import rollup, timeweighted
from meterkit.engine.aggregate import Rows, empty_value
from meterkit.models import DimValue, Event, MeterSpec, Number, UsageQuery

__all__ = [
    "Dialect",
    "Statements",
    "latest_before",
    "latest_items",
    "merge_rows",
    "overflowed",
    "query_statements",
    "rollup_columns",
    "rollup_statements",
    "scan_chunks",
    "statements",
    "upsert",
]

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
    rollup: Callable[[str, int], str] = lambda meter, grain: ""  # meter, grain -> quoted table
    cell: Callable[[str, str], str] = lambda kind, measure: ""  # kind, measure -> quoted column
    least: str = "min"
    greatest: str = "max"


@attrs.frozen
class Statements:
    """``(measure, sql)`` pairs — ``None`` for the plain aggregates — sharing ``params``.

    The plain statement comes first: its rows are every (bucket, group) that has events.
    """

    sql: tuple[tuple[str | None, str], ...]
    params: tuple[Any, ...]


def _filters(query: UsageQuery, d: Dialect) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
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
    return where, params


def statements(spec: MeterSpec, query: UsageQuery, d: Dialect) -> Statements:
    """The statements answering ``query`` from the raw events."""
    p = d.placeholder
    where = [f"organization_id = {p}", f"time >= {p}", f"time < {p}"]
    params: list[Any] = [query.organization_id, query.scan_start, query.page_end]
    more, extra = _filters(query, d)
    where += more
    params += extra
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


def scan_chunks(
    read: Callable[[tuple[int, str] | None], list[Event]], size: int
) -> Iterator[Event]:
    """A scan in chunks of ``size`` events in ``(time, id)`` order: ``read(after)`` reads the
    next chunk, from the start (``after`` ``None``) or after the ``(time, id)`` read last, so a
    tie in time across a chunk's end is neither lost nor read twice. The first chunk is read
    here, at the call; the next ones as the caller's loop reaches them."""
    batch = read(None)

    def chunks(batch: list[Event]) -> Iterator[Event]:
        while batch:
            yield from batch
            if len(batch) < size:
                return
            last = batch[-1]
            batch = read((last.time, str(last.id)))

    return chunks(batch)


def merge_rows(
    spec: MeterSpec,
    query: UsageQuery,
    answers: Iterable[tuple[str | None, Iterable[Sequence[Any]]]],
    *,
    value: Callable[[Any], Number | None] | None = None,
    group: Callable[[str, Any], DimValue] | None = None,
) -> Rows:
    """Rows from each statement's answer, in the order :func:`statements` gave them.

    ``value`` decodes a number and ``group`` a group value (both: as the database gave it).
    """
    plain = [m.name for m in spec.measures if not m.gauge and m.aggregation != "latest"]
    width = len(query.group_by)
    blank = {m.name: empty_value(m) for m in spec.measures}
    group_by = query.group_by
    rows: Rows = {}
    for measure, found in answers:
        for row in found:
            raw_group = row[1 : 1 + width]
            key = (
                int(row[0]),
                tuple(raw_group)
                if group is None
                else tuple(group(g, v) for g, v in zip(group_by, raw_group)),
            )
            values = rows.get(key)
            if values is None:
                values = rows[key] = dict(blank)
            if measure is None:
                for name, raw in zip(plain, row[1 + width :]):
                    decoded = raw if value is None else value(raw)
                    if decoded is not None:
                        values[name] = decoded
            else:
                values[measure] = row[-1] if value is None else value(row[-1])
    return rows


# -- rollups ----------------------------------------------------------------------------------

_UPSERT = {
    "s": "coalesce(r.{c} + excluded.{c}, r.{c}, excluded.{c})",
    "n": "coalesce(r.{c}, 0) + coalesce(excluded.{c}, 0)",
    "mn": "coalesce({least}(r.{c}, excluded.{c}), r.{c}, excluded.{c})",
    "mx": "coalesce({greatest}(r.{c}, excluded.{c}), r.{c}, excluded.{c})",
}
_ROLLED = {"sum": ("s", "SUM"), "count": ("n", "SUM"), "min": ("mn", "MIN"), "max": ("mx", "MAX")}


def latest_before(spec: MeterSpec, measures: Sequence[str], d: Dialect) -> str:
    """``SELECT`` of an organization's day rollup rows before a day (parameters: organization,
    day) that hold a latest value of one of the gauges ``measures``: the dimensions, then each
    gauge's time, id and value (read by :func:`latest_items`)."""
    cells = [d.cell(kind, name) for name in measures for kind in ("t", "i", "l")]
    held = " OR ".join(f"{d.cell('t', name)} IS NOT NULL" for name in measures)
    p = d.placeholder
    return (
        f"SELECT {', '.join([*map(d.dim, spec.dimension_names), *cells])} "
        f"FROM {d.rollup(spec.name, rollup.GRAINS[-1])} "
        f"WHERE organization_id = {p} AND bucket < {p} AND ({held})"
    )


def latest_items(
    spec: MeterSpec,
    measures: Sequence[str],
    rows: Iterable[Sequence[Any]],
    dims: Callable[[Sequence[Any]], dict[str, DimValue]],
    value: Callable[[Any], Any] | None = None,
) -> Iterator[timeweighted.Latest]:
    """The rows of :func:`latest_before` as :func:`~meterkit.engine.timeweighted.carried` takes
    them; ``dims`` decodes a row's dimension columns, ``value`` a stored value."""
    n = len(spec.dimension_names)
    for row in rows:
        found = dims(row[:n])
        for j, name in enumerate(measures):
            t, i, v = row[n + 3 * j : n + 3 * j + 3]
            if t is not None:
                yield found, name, int(t), i, v if value is None else value(v)


def rollup_columns(spec: MeterSpec, d: Dialect) -> list[str]:
    """A rollup table's columns, quoted, in the order :func:`upsert` binds them."""
    cells = [d.cell(kind, name) for kind, name in rollup.columns(spec)]
    return ["organization_id", "bucket", "series", *map(d.dim, spec.dimension_names), *cells]


def upsert(
    spec: MeterSpec,
    grain: int,
    d: Dialect,
    source: str | None = None,
    cells: Sequence[int] | None = None,
) -> str:
    """``INSERT`` of one rollup row that merges into the row already there (see
    :func:`meterkit.engine.rollup.merger`): one statement for every store. ``source`` (a
    ``SELECT``) gives many rows at once instead, each key at most once. ``cells``: only these
    value cells (indexes in :func:`~meterkit.engine.rollup.columns` order; a latest value's
    three together) are written — what a row leaves out reads NULL and merges as nothing."""
    p = d.placeholder
    layout = rollup.columns(spec)
    wanted = set(range(len(layout)) if cells is None else cells)
    cols = rollup_columns(spec, d)[: 3 + len(spec.dimension_names)]
    cols += [d.cell(kind, name) for i, (kind, name) in enumerate(layout) if i in wanted]
    sets = []
    i = 0
    while i < len(layout):
        kind, name = layout[i]
        if i not in wanted:
            i += 1
            continue
        if kind == "t":
            t, ident, latest = (d.cell(k, name) for k in ("t", "i", "l"))
            newer = (
                f"excluded.{t} IS NOT NULL AND (r.{t} IS NULL OR excluded.{t} > r.{t} "
                f"OR (excluded.{t} = r.{t} AND excluded.{ident} > r.{ident}))"
            )
            for c in (t, ident, latest):
                sets.append(f"{c} = CASE WHEN {newer} THEN excluded.{c} ELSE r.{c} END")
            i += 3
            continue
        c = d.cell(kind, name)
        sets.append(f"{c} = " + _UPSERT[kind].format(c=c, least=d.least, greatest=d.greatest))
        i += 1
    conflict = "DO NOTHING" if not sets else "DO UPDATE SET " + ", ".join(sets)
    return (
        f"INSERT INTO {d.rollup(spec.name, grain)} AS r ({', '.join(cols)}) "
        + (source if source is not None else f"VALUES ({', '.join([p] * len(cols))}) ")
        + f" ON CONFLICT (organization_id, bucket, series) {conflict}"
    )


def _raw_cell(kind: str, column: str) -> str:
    if kind == "n":
        return f"CASE WHEN {column} IS NULL THEN 0 ELSE 1 END"
    if kind == "t":
        return "time"
    if kind == "i":
        return "id"
    return column


def rollup_statements(
    spec: MeterSpec, query: UsageQuery, d: Dialect, segments: Sequence[rollup.Segment]
) -> Statements:
    """The statements answering ``query`` from rollups and, at unaligned edges, raw events
    (``segments`` from :func:`meterkit.engine.rollup.plan`): each source in a ``UNION ALL``,
    combined as :func:`meterkit.engine.rollup.combine` does. Rows as :func:`statements`."""
    p = d.placeholder
    more, extra = _filters(query, d)
    width = int(query.width)
    dims = [d.dim(n) for n in spec.dimension_names]
    group_at = [spec.dimension_names.index(g) for g in query.group_by]
    keys = [f"k{i}" for i in group_at]
    params: list[Any] = []
    # Per source: its FROM ... WHERE ... (with the bucket), and the expression of each cell.
    sources: list[tuple[str, dict[tuple[str, str], str]]] = []
    for grain, lo, hi in segments:
        if grain is None:
            table, time = d.table(spec.name), "time"
            cells = {(k, m): _raw_cell(k, d.val(m)) for k, m in rollup.columns(spec)}
        else:
            table, time = d.rollup(spec.name, grain), "bucket"
            cells = {(k, m): d.cell(k, m) for k, m in rollup.columns(spec)}
        cond = " AND ".join([f"organization_id = {p}", f"{time} >= {p}", f"{time} < {p}", *more])
        params += [query.organization_id, lo, hi, *extra]
        bucket = f"({time} - " + d.modulo.format(time, width) + ")"
        sources.append((f"{bucket} AS b FROM {table} WHERE {cond}", cells))

    def union(
        select: Callable[[dict[tuple[str, str], str]], list[str]],
        present: str | None = None,
    ) -> str:
        """Every source's rows, ``present`` (a measure) keeping those that carry it."""
        parts = []
        for tail, cells in sources:
            where = f" AND {cells[('l', present)]} IS NOT NULL" if present else ""
            parts.append(f"SELECT {', '.join([*select(cells), tail])}{where}")
        return " UNION ALL ".join(parts)

    out: list[tuple[str | None, str]] = []
    plain = [m for m in spec.measures if not m.gauge and m.aggregation != "latest"]
    aggs = [_ROLLED[m.aggregation] for m in plain]
    inner = union(
        lambda cells: [
            *(f"{dims[i]} AS k{i}" for i in group_at),
            *(
                f"{cells[(kind, m.name)]} AS c{j}"
                for j, (m, (kind, _)) in enumerate(zip(plain, aggs))
            ),
        ]
    )
    select = ["b", *keys, *(f"{fn}(c{j})" for j, (_, fn) in enumerate(aggs))]
    group = ", ".join(["b", *keys])
    out.append((None, f"SELECT {', '.join(select)} FROM ({inner}) AS u GROUP BY {group}"))
    every = list(range(len(dims)))
    for m in spec.measures:
        if not (m.gauge or m.aggregation == "latest"):
            continue
        # The latest (time, id) per series (gauges) or per group (latest), as in the engine.
        at = every if m.gauge else group_at
        window = ", ".join(["b", *(f"k{i}" for i in at)])

        def latest(
            cells: dict[tuple[str, str], str], name: str = m.name, at: list[int] = at
        ) -> list[str]:
            keys_at = [f"{dims[i]} AS k{i}" for i in at]
            return [*keys_at, *(f"{cells[(kind, name)]} AS {kind}" for kind in ("t", "i", "l"))]

        part = union(latest, present=m.name)
        ranked = (
            f"SELECT u.*, ROW_NUMBER() OVER (PARTITION BY {window} ORDER BY t DESC, i DESC) AS rn "
            f"FROM ({part}) AS u"
        )
        head = ", ".join(["b", *keys])
        if m.gauge:
            sql = (
                f"SELECT {head}, {_GAUGE[m.aggregation]}(l) FROM ({ranked}) AS w "
                f"WHERE rn = 1 GROUP BY {group}"
            )
        else:
            sql = f"SELECT {head}, l FROM ({ranked}) AS w WHERE rn = 1"
        out.append((m.name, sql))
    return Statements(tuple(out), tuple(params))


def query_statements(spec: MeterSpec, query: UsageQuery, d: Dialect, rollups: bool) -> Statements:
    """What a store with ``rollups`` kept for ``spec`` sends for ``query`` (the rollups the
    planner picks), or one without (the raw events)."""
    if rollups:
        segments = rollup.plan(query.scan_start, query.page_end, query.width)
        return rollup_statements(spec, query, d, segments)
    return statements(spec, query, d)


def overflowed(spec: MeterSpec, rows: Rows) -> bool:
    """Whether a whole-number sum came back as a float: rollups that passed the store's
    integer range (the answer must then come from the events)."""
    whole = [m.name for m in spec.measures if not m.fractional and not m.gauge]
    if not whole or not rows:
        return False
    # The types of every whole-number cell, gathered without a Python loop per row.
    cells = map(operator.itemgetter(*whole), rows.values())
    found = set(map(type, cells if len(whole) == 1 else itertools.chain.from_iterable(cells)))
    return float in found
