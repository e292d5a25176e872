"""Turn aggregated rows into a page of buckets."""

from __future__ import annotations

from meterkit.engine.aggregate import Rows, empty_value
from meterkit.engine.cursor import encode_cursor
from meterkit.models import Bucket, DimValue, MeterSpec, Number, Result, UsagePage, UsageQuery

__all__ = ["bucket_starts", "build_page", "next_cursor", "page_rows"]


def bucket_starts(query: UsageQuery) -> tuple[list[int], int | None]:
    """This page's bucket starts, and the start of the next page (``None`` if there is none)."""
    starts: list[int] = []
    start = query.page_start
    while start < query.end_time and len(starts) < query.limit:
        starts.append(start)
        start += query.width
    return starts, (start if start < query.end_time else None)


def _order(group: tuple[DimValue, ...]) -> tuple[tuple[int, str], ...]:
    return tuple((0, "") if v is None else (1, str(v)) for v in group)


def page_rows(
    spec: MeterSpec, query: UsageQuery, rows: Rows
) -> list[tuple[int, list[tuple[dict[str, DimValue], dict[str, Number | None]]]]]:
    """Each bucket start of the page with its results in order, as ``(group fields, values)``
    dicts: every dimension (``None`` where not grouped) and every measure (empty ones filled).
    Both page forms, :func:`build_page`'s objects and the wire's dicts, are made from this."""
    starts, _next = bucket_starts(query)
    by_bucket: dict[int, list[tuple[tuple[DimValue, ...], dict[str, Number | None]]]] = {}
    for (start, group), values in rows.items():
        by_bucket.setdefault(start, []).append((group, values))
    blank = dict.fromkeys(spec.dimension_names)
    empties = {m.name: empty_value(m) for m in spec.measures}
    group_by = query.group_by
    # A group of events without a dimension that has a default reads the default.
    defaults = [
        (i, d.default) for i, d in enumerate(map(spec.dimension, group_by)) if d and d.default
    ]
    out = []
    for start in starts:
        found = by_bucket.get(start, [])
        if defaults:
            found = [(_defaulted(group, defaults), values) for group, values in found]
        if len(found) > 1:
            found.sort(key=lambda r: _order(r[0]))
        out.append(
            (
                start,
                [
                    ({**blank, **dict(zip(group_by, group))}, {**empties, **values})
                    for group, values in found
                ],
            )
        )
    return out


def _defaulted(
    group: tuple[DimValue, ...], defaults: list[tuple[int, str]]
) -> tuple[DimValue, ...]:
    values = list(group)
    for i, default in defaults:
        if values[i] is None:
            values[i] = default
    return tuple(values)


def next_cursor(query: UsageQuery, secret: bytes) -> str | None:
    """The cursor of the page after this one, or ``None`` on the last page."""
    _starts, next_start = bucket_starts(query)
    return encode_cursor(secret, query, next_start) if next_start is not None else None


def build_page(spec: MeterSpec, query: UsageQuery, rows: Rows, secret: bytes) -> UsagePage:
    """The page as objects (:class:`~meterkit.models.UsagePage`)."""
    kind, width = spec.result_object, query.width
    buckets = tuple(
        Bucket(start, start + width, tuple(Result(kind, group, values) for group, values in found))  # type: ignore[arg-type]
        for start, found in page_rows(spec, query, rows)
    )
    cursor = next_cursor(query, secret)
    return UsagePage(buckets, cursor is not None, cursor)
