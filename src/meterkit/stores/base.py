"""The protocol every store implements.

A store keeps events (idempotently, by ``(organization_id, meter, id)``) and hands them back
for a time range. It *may* also answer a bucket query natively (SQL ``GROUP BY``, or its
rollups): :meth:`Store.aggregate` returns ``None`` when it will not, and the engine then
aggregates :meth:`Store.scan`. A native answer must equal the engine's on the same events.

A store that keeps rollups (:class:`RollupStore`) updates them in the transaction that appends
the events, answers from them as :func:`meterkit.engine.rollup.answer` does, and lets them be
rebuilt and compared with the events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import attrs

from meterkit.engine import rollup
from meterkit.engine.aggregate import Rows
from meterkit.models import CounterLine, CounterResult, Event, Hold, MeterSpec, UsageQuery

__all__ = [
    "AtomicWrites",
    "Capabilities",
    "CorrectsEvents",
    "CounterCalls",
    "CounterStore",
    "ListsOrganizations",
    "RollupStore",
    "Store",
    "TellsTime",
    "Transactional",
]


@runtime_checkable
class CounterStore(Protocol):
    """Quota counters on their own (``Meter(url, counters="redis://...")``).

    Every :class:`Store` is one; a counters-only backend implements just these methods.
    """

    url: str

    def counters_apply(
        self, lines: Sequence[CounterLine], *, now: int, hold: Hold | None = None
    ) -> CounterResult:
        """Atomically admit all lines or none (:func:`meterkit.counters.admits`).

        First releases every hold that expired at ``now``. Admitted: adds each amount and,
        with ``hold``, remembers it so it can be settled later; a hold of an id already held
        replaces it, amounts and expiry (leases rewrite theirs this way). Counters whose
        ``expires_at <= now`` read as 0. Keys are distinct within one call. A line without a
        limit may have a negative amount (a give-back); counters never go below 0.
        """

    def counters_settle(self, hold_id: str, deltas: Sequence[tuple[str, int]], *, now: int) -> bool:
        """Atomically forget a hold and add ``deltas`` (negative to give back).

        ``False`` (and nothing changed) when the hold is unknown: settled, released or expired.
        """

    def counters_add(
        self, deltas: Sequence[tuple[str, int]], *, now: int, expires_at: int | None = None
    ) -> list[int]:
        """Add unconditionally (usage that already happened); the values after."""

    def counters_set(
        self, key: str, value: int, *, now: int, expires_at: int | None = None
    ) -> None:
        """Set one counter (a gauge recalculated from its source)."""

    def counters_read(self, keys: Sequence[str], *, now: int) -> list[int]:
        """Current values (0 for absent or expired keys), after releasing expired holds."""

    def claim_once(self, marker: str, *, now: int, expires_at: int | None = None) -> bool:
        """``True`` for the first caller ever to claim ``marker`` (until it expires)."""

    def close(self) -> None:
        """Release connections."""


@runtime_checkable
class Store(CounterStore, Protocol):
    """Events, records and (inherited) quota counters."""

    url: str

    def ensure_meter(self, spec: MeterSpec) -> None:
        """Prepare to keep events of ``spec`` (create or widen tables). Idempotent."""

    def append(self, events: Sequence[Event]) -> list[Event]:
        """Store validated events atomically (all, or on error none); return the new ones.

        An event whose ``(organization_id, meter, id)`` is already stored (or repeats earlier
        in the batch) changes nothing and is left out of the returned list, whatever its
        payload: the same id in another organization is another event. Telling a duplicate
        from a conflict (same key, other data) is :class:`~meterkit.Meter`'s job, from
        :meth:`get_events`.
        """

    def get_events(self, meter: str, organization_id: str, ids: Sequence[str]) -> list[Event]:
        """The stored events of ``meter`` and ``organization_id`` with these ids (any order)."""

    def scan(self, meter: str, organization_id: str, start: int, end: int) -> Iterator[Event]:
        """Every stored event of ``meter`` and ``organization_id`` with ``start <= time < end``."""

    def aggregate(self, spec: MeterSpec, query: UsageQuery) -> Rows | None:
        """The query's rows computed natively, or ``None`` to let the engine do it."""

    # -- records: prices, plans, organizations, grants, keys (JSON objects by kind and key) ----

    def put_record(self, kind: str, key: str, data: Mapping[str, Any]) -> None:
        """Insert or replace one record."""

    def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        """One record, or ``None``."""

    def list_records(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        """Every record of ``kind`` as ``(key, data)``, ordered by key."""

    def delete_record(self, kind: str, key: str) -> bool:
        """Remove a record; ``True`` if it existed."""

    def secret(self) -> bytes:
        """A random key kept with the data, for signing cursors; the same on every open."""

    def close(self) -> None:
        """Release connections. The store is not used afterwards."""


@runtime_checkable
class RollupStore(Store, Protocol):
    """A store that keeps rollups (see :mod:`meterkit.engine.rollup`).

    For every meter without a ``unique_count`` measure it keeps, per organization, grain
    (:data:`~meterkit.engine.rollup.GRAINS`), bucket and series, what
    :func:`~meterkit.engine.rollup.fold` gives for the stored events, updated in the same
    transaction as :meth:`~Store.append` (a query sees its own writes at once). Its
    :meth:`~Store.aggregate` reads them as :func:`~meterkit.engine.rollup.plan` says: the
    conformance suite holds that to the engine.
    """

    def organizations(self, meter: str) -> list[str]:
        """Every organization with a stored event of ``meter``, sorted."""

    def rollup_rows(
        self, spec: MeterSpec, grain: int
    ) -> dict[rollup.Key, tuple[dict[str, Any], list[Any]]]:
        """Every stored rollup row of ``spec`` at ``grain``: key -> (dimensions, values in
        :func:`~meterkit.engine.rollup.columns` order)."""

    def rebuild_rollups(self, spec: MeterSpec, progress: Any = None, *, since: int = 0) -> int:
        """Empty ``spec``'s rollups and fold them anew from its events, atomically;
        ``progress(events_read)`` after each chunk when given. Returns the events read.

        With ``since`` (a UTC day start), only rows of buckets from ``since`` on are rebuilt,
        from the events from ``since`` on: older rows stay as they are (their events may
        have been dropped, see :meth:`drop_events_before`)."""

    def replace_event(self, spec: MeterSpec, event: Event) -> Event | None:
        """Put ``event`` in the place of the stored event of its organization and id (same
        time; a correction, see :mod:`meterkit.corrections`) and refold the rollup rows it
        was and is in (its series before and after, over its UTC day), atomically. Returns
        the event replaced, or ``None`` (nothing stored under that id: nothing changes)."""

    def latest_before(
        self, spec: MeterSpec, organization_id: str, before: int, measures: Sequence[str]
    ) -> list[Event] | None:
        """Per series, the latest event before ``before`` carrying each of the gauges
        ``measures`` (:func:`~meterkit.engine.timeweighted.carried`): what a time-weighted
        query carries into its window. Earlier days come from the day rollups, so events
        dropped by retention still carry their values. ``None`` when ``spec`` is not the
        meter whose rollups are kept."""

    def drop_events_before(self, spec: MeterSpec, before: int) -> int:
        """Delete ``spec``'s events with ``time < before`` (a UTC day start) and its minute
        rollup rows of buckets before it, for every organization, atomically; hour and day
        rollups stay. Returns the events deleted."""


class CounterCalls:
    """The :class:`CounterStore` calls of a store whose counters are a part of it of their
    own (``counter_rows``): the SQL stores inherit them, each from one line."""

    counter_rows: CounterStore

    def counters_apply(
        self, lines: Sequence[CounterLine], *, now: int, hold: Hold | None = None
    ) -> CounterResult:
        return self.counter_rows.counters_apply(lines, now=now, hold=hold)

    def counters_settle(self, hold_id: str, deltas: Sequence[tuple[str, int]], *, now: int) -> bool:
        return self.counter_rows.counters_settle(hold_id, deltas, now=now)

    def counters_add(
        self, deltas: Sequence[tuple[str, int]], *, now: int, expires_at: int | None = None
    ) -> list[int]:
        return self.counter_rows.counters_add(deltas, now=now, expires_at=expires_at)

    def counters_set(
        self, key: str, value: int, *, now: int, expires_at: int | None = None
    ) -> None:
        self.counter_rows.counters_set(key, value, now=now, expires_at=expires_at)

    def counters_read(self, keys: Sequence[str], *, now: int) -> list[int]:
        return self.counter_rows.counters_read(keys, now=now)

    def claim_once(self, marker: str, *, now: int, expires_at: int | None = None) -> bool:
        return self.counter_rows.claim_once(marker, now=now, expires_at=expires_at)


# -- what a store can do beyond Store: declared by having the method, found once ------------


@runtime_checkable
class Transactional(Protocol):
    """A store whose calls can share one transaction (SQLite, memory): the events, counter
    changes and records written in it commit together."""

    def transaction(self) -> AbstractContextManager[None]:
        """One transaction around everything the block writes (nested blocks join it)."""


@runtime_checkable
class AtomicWrites(Protocol):
    """A store that holds no transaction across calls but makes one write of events and the
    counter changes they cause atomic (PostgreSQL)."""

    def atomic_writes(self) -> AbstractContextManager[None]:
        """The block's appends and counter changes commit as one."""


@runtime_checkable
class TellsTime(Protocol):
    """A store whose server has one clock for every process and host (PostgreSQL)."""

    def db_now(self) -> float:
        """The server's time, Unix seconds."""


@runtime_checkable
class CorrectsEvents(Protocol):
    """A store that can put a corrected event in the place of a stored one
    (:meth:`RollupStore.replace_event`)."""

    def replace_event(self, spec: MeterSpec, event: Event) -> Event | None:
        """See :meth:`RollupStore.replace_event`."""


@runtime_checkable
class ListsOrganizations(Protocol):
    """A store that lists the organizations with events of a meter
    (:meth:`RollupStore.organizations`)."""

    def organizations(self, meter: str) -> list[str]:
        """See :meth:`RollupStore.organizations`."""


@attrs.frozen
class Capabilities:
    """What a store can do beyond :class:`Store`, found once when a
    :class:`~meterkit.Meter` opens it (:meth:`of`), never probed per call: each is the
    store's method, or ``None`` when it has none. ``shared``: the store is seen by other
    processes (every store but ``memory://``)."""

    transaction: Callable[[], AbstractContextManager[None]] | None
    atomic_writes: Callable[[], AbstractContextManager[None]] | None
    db_now: Callable[[], float] | None
    replace_event: Callable[[MeterSpec, Event], Event | None] | None
    organizations: Callable[[str], list[str]] | None
    shared: bool

    @classmethod
    def of(cls, store: object) -> Capabilities:
        return cls(
            transaction=store.transaction if isinstance(store, Transactional) else None,
            atomic_writes=store.atomic_writes if isinstance(store, AtomicWrites) else None,
            db_now=store.db_now if isinstance(store, TellsTime) else None,
            replace_event=store.replace_event if isinstance(store, CorrectsEvents) else None,
            organizations=store.organizations if isinstance(store, ListsOrganizations) else None,
            shared=bool(getattr(store, "shared", True)),
        )
