"""The read path: usage queries planned over rollups, raw events or time-weighted integrals.

:class:`UsageReader` answers a checked :class:`~meterkit.models.UsageQuery` from the store's
rollups where it keeps them, else the engine over a scan, under the retention guard, and
cuts the answer into pages. :mod:`meterkit.costs` prices what it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import attrs

from meterkit import engine, integrals
from meterkit import retention as retention_module
from meterkit.convert import openai_page
from meterkit.engine import rollup, timeweighted
from meterkit.errors import ValidationError
from meterkit.models import DimValue, Event, MeterSpec, Number, UsagePage, UsageQuery
from meterkit.registry import Registry
from meterkit.retention import Retention
from meterkit.stores.base import RollupStore, Store
from meterkit.validate import check_time, check_usage_query

__all__ = ["UsageReader"]

if TYPE_CHECKING:
    from typing_extensions import Required, TypedDict

    class UsageKeywords(TypedDict, total=False):
        """The keywords of a usage query (:meth:`UsageReader.query`), for type checkers."""

        organization_id: Required[str]
        start_time: Required[Any]
        end_time: Any
        bucket_width: str
        group_by: Iterable[str] | None
        filters: Mapping[str, Iterable[DimValue]] | None
        limit: int | None
        page: str | None

    class SpanKeywords(TypedDict):
        """The keywords of :meth:`UsageReader.total`, for type checkers."""

        organization_id: str
        start_time: int
        end_time: int

    class TotalsKeywords(SpanKeywords, total=False):
        """The keywords of :meth:`UsageReader.totals`, for type checkers."""

        bucket_width: str


class UsageReader:
    """Usage queries over one store. ``sync`` makes what the writer holds visible first."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        retention: Retention,
        *,
        clock: Callable[[], float],
        sync: Callable[[], object] = lambda: None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.retention = retention
        self.clock = clock
        self.sync = sync

    def now(self) -> int:
        return int(self.clock())

    def end_now(self, start_time: Any) -> int:
        """The default ``end_time``: the end of the current second, so what was recorded just
        now is counted; once ``start_time`` is known to lie before it (a start in the future is
        the start's fault, not that of an end nobody gave)."""
        end = self.now() + 1
        if check_time("start_time", start_time) >= end:
            raise ValidationError(
                "start_time", f"must not be after now ({end - 1}) when no end_time is given"
            )
        return end

    def query(
        self,
        meter: str,
        *,
        organization_id: str,
        start_time: Any,
        end_time: Any = None,
        bucket_width: str = "1d",
        group_by: Iterable[str] | None = None,
        filters: Mapping[str, Iterable[DimValue]] | None = None,
        limit: int | None = None,
        page: str | None = None,
    ) -> tuple[MeterSpec, UsageQuery, bytes]:
        """The meter, the checked query (its page cursor decoded) and the cursor secret."""
        spec = self.registry.spec(meter)
        query = check_usage_query(
            spec,
            organization_id=organization_id,
            start_time=start_time,
            end_time=end_time if end_time is not None else self.end_now(start_time),
            bucket_width=bucket_width,
            group_by=group_by,
            filters=filters,
            limit=limit,
        )
        secret = self.store.secret()
        if page is not None:
            query = attrs.evolve(query, page_start=engine.decode_cursor(secret, query, page))
        return spec, query, secret

    def page(self, spec: MeterSpec, query: UsageQuery, secret: bytes) -> UsagePage:
        """One page of buckets."""
        return engine.build_page(spec, query, self.rows(spec, query), secret)

    def page_dict(self, spec: MeterSpec, query: UsageQuery, secret: bytes) -> dict[str, object]:
        """:meth:`page` as its OpenAI JSON page, built from the rows: no object per row."""
        rows = self.rows(spec, query)
        kind, width = spec.result_object, query.width
        cursor = engine.next_cursor(query, secret)
        return openai_page(
            (
                (start, start + width, ((kind, group, values) for group, values in found))
                for start, found in engine.page_rows(spec, query, rows)
            ),
            cursor is not None,
            cursor,
        )

    def rows(self, spec: MeterSpec, query: UsageQuery) -> engine.Rows:
        """The store's native answer, or the engine's over a scan when it has none."""
        self.sync()
        self.registry.ensure(spec)
        days = self.retention.days.get(spec.name)
        if days is not None:
            retention_module.check_query(
                spec.name,
                days,
                self.now(),
                query.scan_start,
                query.page_end,
                query.width,
                rolled=isinstance(self.store, RollupStore) and rollup.rollable(spec),
            )
        if timeweighted.names(spec):
            retention_module.check_scan("start_time", spec.name, days, self.now(), query.scan_start)
            return integrals.time_weighted_rows(self.store, spec, query)
        rows = self.store.aggregate(spec, query)
        if rows is None:
            # Whatever the store says it keeps, a scan must not start where events are gone.
            retention_module.check_scan("start_time", spec.name, days, self.now(), query.scan_start)
            events = self.store.scan(
                spec.name, query.organization_id, query.scan_start, query.page_end
            )
            rows = engine.aggregate(spec, query, events)
        return rows

    def totals(
        self,
        meter: str,
        *,
        organization_id: str,
        start_time: int,
        end_time: int,
        bucket_width: str = "1d",
    ) -> list[tuple[int, dict[str, Number | None]]]:
        """Per-bucket totals (no grouping, no page limit) as ``(bucket_start, values)``."""
        spec = self.registry.spec(meter)
        query = check_usage_query(
            spec,
            organization_id=organization_id,
            start_time=start_time,
            end_time=end_time,
            bucket_width=bucket_width,
            group_by=(),
            filters=None,
            limit=None,
        )
        count = -(-(query.end_time - query.page_start) // query.width)
        query = attrs.evolve(query, limit=max(count, 1))
        rows = self.rows(spec, query)
        return sorted((start, values) for (start, _group), values in rows.items())

    def total(
        self, meter: str, measure: str, *, organization_id: str, start_time: int, end_time: int
    ) -> Number:
        """The sum of a counter measure over ``[start_time, end_time)``."""
        spec = self.registry.spec(meter)
        if spec.measure(measure) is None:
            raise ValidationError("measure", f"meter {meter!r} has no measure {measure!r}")
        rows = self.totals(
            meter, organization_id=organization_id, start_time=start_time, end_time=end_time
        )
        return sum((v.get(measure) or 0) for _, v in rows)

    def retained_store(self) -> Store:
        """The store, its scans refused where they would need dropped raw events."""
        days = self.retention.days
        if not days:
            return self.store
        return cast(Store, RetainedStore(self.store, days, self.now()))


class RetainedStore:
    """A store whose scans fail with RetentionError before a meter's retained window."""

    def __init__(self, store: Store, days: Mapping[str, int], now: int) -> None:
        self.inner = store
        self.kept = days
        self.at = now

    def scan(self, meter: str, organization_id: str, start: int, end: int) -> Iterator[Event]:
        retention_module.check_scan("start_time", meter, self.kept.get(meter), self.at, start)
        return self.inner.scan(meter, organization_id, start, end)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
