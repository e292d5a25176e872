"""``memory://`` — events in a dict, for tests and throwaway processes."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from meterkit import counters
from meterkit.engine import rollup, timeweighted
from meterkit.engine.aggregate import Rows
from meterkit.hookspecs import hookimpl
from meterkit.models import CounterLine, CounterResult, Event, Hold, MeterSpec, UsageQuery
from meterkit.validate import check_record

__all__ = ["MemoryStore"]


class MemoryStore:
    shared = False
    """Nobody else sees these counters: decisions are made directly, without leases."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.RLock()
        # (meter, organization_id) -> id -> event: ids are unique within a tenant's meter.
        self._ids: dict[tuple[str, str], dict[str, Event]] = {}
        self._events: dict[tuple[str, str], list[Event]] = {}
        self._secret = os.urandom(32)
        self._records: dict[str, dict[str, dict[str, Any]]] = {}
        self._counters: dict[str, tuple[int, int | None]] = {}
        self._holds: dict[str, Hold] = {}
        self._claims: dict[str, int | None] = {}
        self._specs: dict[str, MeterSpec] = {}
        # (meter, organization_id, grain) -> bucket -> series key -> (dimensions, values)
        self._rollups: dict[tuple[str, str, int], dict[int, dict[str, Any]]] = {}
        self._dropped: dict[str, int] = {}  # meter -> events before this were dropped

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the store's lock around every call made inside, in this thread."""
        with self._lock:
            yield

    def ensure_meter(self, spec: MeterSpec) -> None:
        # Known already: no lock, so callers queueing for a group commit do not wait here on
        # the write in flight.
        if self._specs.get(spec.name) == spec:
            return
        with self._lock:
            old = self._specs.get(spec.name)
            if old != spec:
                self._specs[spec.name] = spec
                since = self._dropped.get(spec.name, 0)
                if old is not None and since:
                    self._relayout(old, spec, since)
                self.rebuild_rollups(spec, since=since)

    def _relayout(self, old: MeterSpec, new: MeterSpec, before: int) -> None:
        """Rows before ``before`` (their events dropped) in ``new``'s column layout: a cell
        that ``old`` did not keep is empty."""
        was = {cell: i for i, cell in enumerate(rollup.columns(old))}
        at = [was.get(cell) for cell in rollup.columns(new)]
        for (meter, _org, _grain), buckets in self._rollups.items():
            if meter != new.name:
                continue
            for bucket, rows in buckets.items():
                if bucket < before:
                    for series, (dims, values) in rows.items():
                        rows[series] = (dims, [None if i is None else values[i] for i in at])

    def append(self, events: Sequence[Event]) -> list[Event]:
        with self._lock:
            # Decide first, then write: an error while reading the batch leaves nothing behind.
            new: list[Event] = []
            batch: set[tuple[str, str, str]] = set()
            for event in events:
                key = (event.meter, event.organization_id, event.id)
                if key in batch or event.id in self._ids.get(key[:2], ()):
                    continue
                batch.add(key)
                new.append(event)
            # Rollups are folded before anything is written: an event whose values cannot
            # be read fails the batch with nothing stored.
            by_meter: dict[str, list[Event]] = {}
            for event in new:
                by_meter.setdefault(event.meter, []).append(event)
            folded = [
                (spec, self._fold(spec, batch))
                for meter, batch in by_meter.items()
                if (spec := self._specs.get(meter)) is not None and rollup.rollable(spec)
            ]
            for event in new:
                tenant = (event.meter, event.organization_id)
                self._ids.setdefault(tenant, {})[event.id] = event
                self._events.setdefault(tenant, []).append(event)
            for spec, rows in folded:
                self._add_rollups(spec, rows)
            return new

    @staticmethod
    def _fold(spec: MeterSpec, events: Sequence[Event]) -> dict[int, Any]:
        return rollup.fold_grains(spec, events)

    def _add_rollups(self, spec: MeterSpec, folded: dict[int, Any]) -> None:
        merge = rollup.merger(rollup.columns(spec))
        dims = spec.dimension_names
        for grain, rows_by_key in folded.items():
            for (org, bucket, series), (tup, values) in rows_by_key.items():
                buckets = self._rollups.get((spec.name, org, grain))
                if buckets is None:
                    buckets = self._rollups[(spec.name, org, grain)] = {}
                rows = buckets.get(bucket)
                if rows is None:
                    rows = buckets[bucket] = {}
                seen = rows.get(series)
                if seen is None:
                    rows[series] = ({d: v for d, v in zip(dims, tup) if v is not None}, values)
                else:
                    merge(seen[1], values)

    def rebuild_rollups(self, spec: MeterSpec, progress: Any = None, *, since: int = 0) -> int:
        """Drop ``spec``'s rollups from ``since`` and fold them anew from its events; the
        events read."""
        with self._lock:
            for key, buckets in self._rollups.items():
                if key[0] == spec.name:
                    for bucket in [b for b in buckets if b >= since]:
                        del buckets[bucket]
            events = [
                e
                for (meter, _), stored in self._events.items()
                if meter == spec.name
                for e in stored
                if e.time >= since
            ]
            self._add_rollups(spec, self._fold(spec, events))
            if progress is not None:
                progress(len(events))
            return len(events)

    def drop_events_before(self, spec: MeterSpec, before: int) -> int:
        """Delete ``spec``'s events before ``before`` and its minute rollups there."""
        dropped = 0
        with self._lock:
            for (meter, org), stored in self._events.items():
                if meter != spec.name:
                    continue
                old = [e for e in stored if e.time < before]
                if not old:
                    continue
                dropped += len(old)
                stored[:] = [e for e in stored if e.time >= before]
                ids = self._ids[(meter, org)]
                for event in old:
                    del ids[event.id]
            self._dropped[spec.name] = max(self._dropped.get(spec.name, 0), before)
            for (meter, _org, grain), buckets in self._rollups.items():
                if meter == spec.name and grain == rollup.GRAINS[0]:
                    for bucket in [b for b in buckets if b < before]:
                        del buckets[bucket]
        return dropped

    def organizations(self, meter: str) -> list[str]:
        with self._lock:
            return sorted(org for (m, org), events in self._events.items() if m == meter and events)

    def rollup_rows(
        self, spec: MeterSpec, grain: int
    ) -> dict[rollup.Key, tuple[dict[str, Any], list[Any]]]:
        """Every stored rollup row of ``spec`` at ``grain``."""
        with self._lock:
            return {
                (org, bucket, series): (dict(dims), list(values))
                for (meter, org, g), buckets in self._rollups.items()
                if meter == spec.name and g == grain
                for bucket, rows in buckets.items()
                for series, (dims, values) in rows.items()
            }

    def replace_event(self, spec: MeterSpec, event: Event) -> Event | None:
        """Put ``event`` in the place of the stored event of its id (same time), and refold
        the rollup rows it was or is in (its series before and after, that UTC day); the
        event replaced, or ``None``."""
        with self._lock:
            tenant = (event.meter, event.organization_id)
            old = self._ids.get(tenant, {}).get(event.id)
            if old is None:
                return None
            stored = self._events[tenant]
            stored[next(i for i, e in enumerate(stored) if e is old)] = event
            self._ids[tenant][event.id] = event
            if rollup.rollable(spec) and self._specs.get(spec.name) == spec:
                scope = rollup.Refold.of(old, event)
                for grain in rollup.GRAINS:
                    buckets = self._rollups.get((spec.name, event.organization_id, grain), {})
                    for bucket in [b for b in buckets if scope.start <= b < scope.end]:
                        for key in scope.series:
                            buckets[bucket].pop(key, None)
                again = [e for e in stored if scope.covers(e)]
                self._add_rollups(spec, self._fold(spec, again))
            return old

    def get_events(self, meter: str, organization_id: str, ids: Sequence[str]) -> list[Event]:
        with self._lock:
            stored = self._ids.get((meter, organization_id), {})
            return [stored[i] for i in dict.fromkeys(ids) if i in stored]

    def scan(self, meter: str, organization_id: str, start: int, end: int) -> Iterator[Event]:
        with self._lock:
            events = list(self._events.get((meter, organization_id), ()))
        return (e for e in events if start <= e.time < end)

    def latest_before(
        self, spec: MeterSpec, organization_id: str, before: int, measures: Sequence[str]
    ) -> list[Event] | None:
        if not rollup.rollable(spec) or self._specs.get(spec.name) != spec:
            return None
        days = (spec.name, organization_id, rollup.GRAINS[-1])

        def day_latest(day: int) -> Iterator[timeweighted.Latest]:
            found = self._rollups.get(days, {})
            rows = [row for b, held in found.items() if b < day for row in held.values()]
            return rollup.latest_of(spec, measures, rows)

        def scan(start: int, end: int) -> Iterator[Event]:
            return self.scan(spec.name, organization_id, start, end)

        with self._lock:  # the rows and the day's events of one moment
            return rollup.latest_before(spec, organization_id, before, measures, day_latest, scan)

    def aggregate(self, spec: MeterSpec, query: UsageQuery) -> Rows | None:
        if not rollup.rollable(spec) or self._specs.get(spec.name) != spec:
            return None
        if timeweighted.names(spec):
            return None  # integrals come from events: see meterkit.integrals
        org = query.organization_id
        with self._lock:

            def rows_in(grain: int, start: int, end: int) -> list[tuple[int, Any, Any]]:
                buckets = self._rollups.get((spec.name, org, grain), {})
                if (end - start) // grain < len(buckets):
                    found = ((b, buckets.get(b)) for b in range(start, end, grain))
                else:
                    found = ((b, rows) for b, rows in buckets.items() if start <= b < end)
                return [(b, d, v) for b, rows in found if rows for d, v in rows.values()]

            def events_in(start: int, end: int) -> list[Event]:
                stored = self._events.get((spec.name, org), ())
                return [e for e in stored if start <= e.time < end]

            return rollup.answer(spec, query, rows_in, events_in)

    # -- records ------------------------------------------------------------------------------

    def put_record(self, kind: str, key: str, data: Mapping[str, Any]) -> None:
        check_record(kind, key, data)
        with self._lock:
            self._records.setdefault(kind, {})[key] = json.loads(json.dumps(data))

    def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        with self._lock:
            data = self._records.get(kind, {}).get(key)
            return json.loads(json.dumps(data)) if data is not None else None

    def list_records(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            items = sorted(self._records.get(kind, {}).items())
            return [(k, json.loads(json.dumps(v))) for k, v in items]

    def delete_record(self, kind: str, key: str) -> bool:
        with self._lock:
            return self._records.get(kind, {}).pop(key, None) is not None

    # -- counters -----------------------------------------------------------------------------

    def counters_apply(
        self, lines: Sequence[CounterLine], *, now: int, hold: Hold | None = None
    ) -> CounterResult:
        # meterkit.counters.apply over the dicts, without a backend object: this store decides
        # on the request path of memory:// meters. The rule is counters.decide.
        with self._lock:
            if self._holds:
                counters.release_expired(self._backend(now), now)
            values = self._counters
            current: list[int] = []
            expiry: list[int | None] = []
            previous: list[int] = []
            for line in lines:
                value, expires = values.get(line.key, _ABSENT)
                if expires is not None and expires <= now:
                    value, expires = _ABSENT
                current.append(value)
                expiry.append(expires)
                prev = 0
                if line.prev_key:
                    prev, prev_expires = values.get(line.prev_key, _ABSENT)
                    if prev_expires is not None and prev_expires <= now:
                        prev = 0
                previous.append(prev)
            used = counters.decide(lines, current, previous)
            if used is None:
                return CounterResult(False, tuple(current), tuple(previous))
            for line, value, expires in zip(lines, used, expiry):
                values[line.key] = (value, expires if line.expires_at is None else line.expires_at)
            if hold is not None:
                self._holds[hold.id] = hold
            return CounterResult(True, used, tuple(previous))

    def counters_settle(self, hold_id: str, deltas: Sequence[tuple[str, int]], *, now: int) -> bool:
        with self._lock:
            return counters.settle(self._backend(now), hold_id, deltas, now)

    def counters_add(
        self, deltas: Sequence[tuple[str, int]], *, now: int, expires_at: int | None = None
    ) -> list[int]:
        with self._lock:
            backend = self._backend(now)
            return [backend.add(key, delta, expires_at) for key, delta in deltas]

    def counters_set(
        self, key: str, value: int, *, now: int, expires_at: int | None = None
    ) -> None:
        with self._lock:
            self._counters[key] = (value, expires_at)

    def counters_read(self, keys: Sequence[str], *, now: int) -> list[int]:
        with self._lock:
            backend = self._backend(now)
            counters.release_expired(backend, now)
            return backend.read(keys, now)

    def claim_once(self, marker: str, *, now: int, expires_at: int | None = None) -> bool:
        with self._lock:
            seen = self._claims.get(marker, 0)
            if marker in self._claims and (seen is None or seen > now):
                return False
            self._claims[marker] = expires_at
            return True

    def _backend(self, now: int) -> _MemoryCounters:
        return _MemoryCounters(self._counters, self._holds, now)

    def secret(self) -> bytes:
        return self._secret

    def close(self) -> None:
        pass


_ABSENT: tuple[int, int | None] = (0, None)


class _MemoryCounters:
    """Counter primitives over the store's dicts; the caller holds the store's lock."""

    def __init__(
        self, values: dict[str, tuple[int, int | None]], holds: dict[str, Hold], now: int
    ) -> None:
        self.values, self.holds, self.now = values, holds, now

    def _get(self, key: str) -> tuple[int, int | None]:
        value, expires = self.values.get(key, (0, None))
        if expires is not None and expires <= self.now:
            return 0, None
        return value, expires

    def read(self, keys: Sequence[str], now: int) -> list[int]:
        return [self._get(k)[0] for k in keys]

    def add(self, key: str, delta: int, expires_at: int | None) -> int:
        value, expires = self._get(key)
        value = counters.clamp(value + delta)
        self.values[key] = (value, expires_at if expires_at is not None else expires)
        return value

    def pop_expired_holds(self, now: int) -> list[Hold]:
        expired = [h for h in self.holds.values() if h.expires_at <= now]
        for hold in expired:
            del self.holds[hold.id]
        return expired

    def pop_hold(self, hold_id: str) -> Hold | None:
        return self.holds.pop(hold_id, None)

    def put_hold(self, hold: Hold) -> None:
        self.holds[hold.id] = hold


@hookimpl
def meterkit_open_store(url: str, scheme: str) -> MemoryStore | None:
    return MemoryStore(url) if scheme == "memory" else None


@hookimpl
def meterkit_store_schemes() -> list[str]:
    return ["memory"]
