"""The protocol every store implements.

A store keeps events (idempotently, by ``(meter, id)``) and hands them back for a time range.
It *may* also answer a bucket query natively (SQL ``GROUP BY``, or pre-aggregated rollups
later): :meth:`Store.aggregate` returns ``None`` when it will not, and the engine then
aggregates :meth:`Store.scan`. A native answer must equal the engine's on the same events.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from meterkit.engine.aggregate import Rows
from meterkit.models import Event, MeterSpec, UsageQuery

__all__ = ["Store"]


@runtime_checkable
class Store(Protocol):
    url: str

    def ensure_meter(self, spec: MeterSpec) -> None:
        """Prepare to keep events of ``spec`` (create or widen tables). Idempotent."""

    def append(self, events: Sequence[Event]) -> list[Event]:
        """Store validated events atomically (all, or on error none); return the new ones.

        An event whose ``(meter, id)`` is already stored (or repeats earlier in the batch)
        is a duplicate: it changes nothing and is left out of the returned list.
        """

    def scan(self, meter: str, organization_id: str, start: int, end: int) -> Iterator[Event]:
        """Every stored event of ``meter`` and ``organization_id`` with ``start <= time < end``."""

    def aggregate(self, spec: MeterSpec, query: UsageQuery) -> Rows | None:
        """The query's rows computed natively, or ``None`` to let the engine do it."""

    def secret(self) -> bytes:
        """A random key kept with the data, for signing cursors; the same on every open."""

    def close(self) -> None:
        """Release connections. The store is not used afterwards."""
