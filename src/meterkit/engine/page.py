"""Turn aggregated rows into a page of buckets."""

from __future__ import annotations

from meterkit.engine.aggregate import Rows, empty_value
from meterkit.engine.cursor import encode_cursor
from meterkit.models import Bucket, DimValue, MeterSpec, Number, Result, UsagePage, UsageQuery

__all__ = ["bucket_starts", "build_page"]


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


def build_page(spec: MeterSpec, query: UsageQuery, rows: Rows, secret: bytes) -> UsagePage:
    starts, next_start = bucket_starts(query)
    by_bucket: dict[int, list[tuple[tuple[DimValue, ...], dict[str, Number | None]]]] = {}
    for (start, group), values in rows.items():
        by_bucket.setdefault(start, []).append((group, values))
    blank = dict.fromkeys(spec.dimension_names)
    empties = {m.name: empty_value(m) for m in spec.measures}
    group_by = query.group_by
    kind = spec.result_object
    buckets = []
    for start in starts:
        found = by_bucket.get(start, ())
        if len(found) > 1:
            found.sort(key=lambda r: _order(r[0]))
        results = tuple(
            Result(kind, {**blank, **dict(zip(group_by, group))}, {**empties, **values})  # type: ignore[arg-type]
            for group, values in found
        )
        buckets.append(Bucket(start, start + query.width, results))
    cursor = encode_cursor(secret, query, next_start) if next_start is not None else None
    return UsagePage(tuple(buckets), next_start is not None, cursor)
