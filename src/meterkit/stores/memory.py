"""``memory://`` — events in a dict, for tests and throwaway processes."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence

from meterkit.engine.aggregate import Rows
from meterkit.hookspecs import hookimpl
from meterkit.models import Event, MeterSpec, UsageQuery

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.RLock()
        self._ids: dict[str, set[str]] = {}
        self._events: dict[tuple[str, str], list[Event]] = {}
        self._secret = os.urandom(32)

    def ensure_meter(self, spec: MeterSpec) -> None:
        with self._lock:
            self._ids.setdefault(spec.name, set())

    def append(self, events: Sequence[Event]) -> list[Event]:
        with self._lock:
            new = []
            for event in events:
                ids = self._ids.setdefault(event.meter, set())
                if event.id in ids:
                    continue
                ids.add(event.id)
                self._events.setdefault((event.meter, event.organization_id), []).append(event)
                new.append(event)
            return new

    def scan(self, meter: str, organization_id: str, start: int, end: int) -> Iterator[Event]:
        with self._lock:
            events = list(self._events.get((meter, organization_id), ()))
        return (e for e in events if start <= e.time < end)

    def aggregate(self, spec: MeterSpec, query: UsageQuery) -> Rows | None:
        return None

    def secret(self) -> bytes:
        return self._secret

    def close(self) -> None:
        pass


@hookimpl
def meterkit_open_store(url: str, scheme: str) -> MemoryStore | None:
    return MemoryStore(url) if scheme == "memory" else None


@hookimpl
def meterkit_store_schemes() -> list[str]:
    return ["memory"]
