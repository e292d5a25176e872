"""The write-ahead record of counter changes, for counters kept apart from the events
(PostgreSQL or SQLite events with Redis counters).

Two stores share no transaction, so the counter changes a write of events causes are first
written *into the event store, in the events' own transaction*, as one record of kind
:data:`KIND`; once that commits they are applied to the counters, then the record is deleted.
A ``kill -9`` between the commit and the counters leaves the record behind, and
:meth:`CountLog.replay` applies it later: when a :class:`~meterkit.Meter` next opens the
store, at the next flush after the counters failed, and before ``rebuild_counters`` and
``doctor`` compare anything.

Exactly once: each organization's changes are applied in one atomic counters call together with
a marker line (``w␟org␟record id``) that admits only while the marker is absent, so a record
applied by its writer and replayed by another process, or replayed twice, counts once. A
record not applied within :data:`KEEP_SECONDS` is dropped (logged): the periods it fed are long
over, and ``rebuild_counters`` rebuilds the current ones from the events.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from meterkit.errors import StoreUnavailable
from meterkit.models import CounterLine, CounterResult
from meterkit.periods import Period

__all__ = ["KEEP_SECONDS", "KIND", "Changes", "CountLog"]

logger = logging.getLogger("meterkit")

KIND = "counts"
"""Record kind of the write-ahead record."""

KEEP_SECONDS = 40 * 86_400
"""How long a record (and its marker) is kept to be applied: longer than any billing period."""

Changes = tuple[str, list[tuple[str, int]], Mapping[str, Period]]
"""One organization's counter changes, and the spend month of each spend key among them."""


class _Store(Protocol):
    def put_record(self, kind: str, key: str, data: Mapping[str, Any]) -> None: ...

    def list_records(self, kind: str) -> list[tuple[str, dict[str, Any]]]: ...

    def delete_record(self, kind: str, key: str) -> bool: ...


class _Counters(Protocol):
    def counters_apply(
        self, lines: Sequence[CounterLine], *, now: int, hold: Any = None
    ) -> CounterResult: ...


Applied = Callable[[Changes, Sequence[int]], None]
"""Told of each organization's changes once applied, with the counters' values after."""


class CountLog:
    """Counter changes logged in the event store's transaction, applied once after it."""

    def __init__(
        self,
        store: _Store,
        counters: _Counters,
        clock: Callable[[], int],
        applied: Applied,
    ) -> None:
        self.store = store
        self.counters = counters
        self.clock = clock
        self.applied = applied
        self._local = threading.local()
        self.behind = False  # a record is left to replay (the counters failed)
        self._replayed = False

    @property
    def due(self) -> bool:
        """Whether :meth:`replay` should run: never yet in this process, or the counters
        failed since."""
        return self.behind or not self._replayed

    def replay_if_due(self) -> None:
        """:meth:`replay` when :attr:`due`."""
        if self.due:
            self.replay()

    def last_applied(self) -> bool:
        """Whether the last write of this thread had its changes applied (or had none)."""
        return bool(getattr(self._local, "applied", True))

    def collecting(self) -> list[Changes] | None:
        """The changes of the write under way in this thread, or ``None`` outside one."""
        found: list[Changes] | None = getattr(self._local, "log", None)
        return found

    @contextmanager
    def around(self, begin: Callable[[], Any]) -> Iterator[None]:
        """``begin()``'s transaction; counter changes collected inside are written as one
        record before it commits, and applied after it did."""
        if self.collecting() is not None:
            with begin():
                yield  # nested: the outermost write logs and applies
            return
        log: list[Changes] = []
        key = f"cl_{uuid.uuid4().hex}"
        self._local.log = log
        self._local.applied = True
        merged: list[Changes] = []
        until = 0
        try:
            with begin():
                yield
                if log:
                    merged, until = _merged(log), self.clock() + KEEP_SECONDS
                    self.store.put_record(KIND, key, _record(merged, until))
        finally:
            self._local.log = None
        if log:
            self._local.applied = self._apply(key, merged, until)

    def replay(self) -> int:
        """Apply every record left behind; how many there were."""
        self.behind, self._replayed = False, True
        records = self.store.list_records(KIND)
        now = self.clock()
        for key, data in records:
            if data.get("until", 0) <= now:
                logger.error("meterkit: dropped counter changes %s not applied in time", key)
                self.store.delete_record(KIND, key)
                continue
            self._apply(key, _changes(data), int(data["until"]))
        return len(records)

    def _apply(self, key: str, log: list[Changes], until: int) -> bool:
        """Apply a record's changes once, then delete it; ``False`` if the counters failed
        (the record stays, for :meth:`replay`)."""
        now = self.clock()
        try:
            for changes in log:
                org, deltas, _months = changes
                marker = CounterLine(f"w\x1f{org}\x1f{key}", 1, 1, until)
                lines = [marker, *(CounterLine(k, d) for k, d in deltas)]
                result = self.counters.counters_apply(lines, now=now)
                if result.admitted:
                    self.applied(changes, result.used[1:])
            self.store.delete_record(KIND, key)
        except StoreUnavailable:
            self.behind = True
            logger.warning(
                "meterkit: counter changes %s stored with their events, not yet applied to "
                "the counters (unavailable); applied at the next flush or open",
                key,
            )
            return False
        return True


def _merged(log: list[Changes]) -> list[Changes]:
    """One entry per organization (its changes apply in one call, under one marker)."""
    deltas: dict[str, dict[str, int]] = {}
    months: dict[str, dict[str, Period]] = {}
    for org, changes, spent in log:
        mine = deltas.setdefault(org, {})
        for k, d in changes:
            mine[k] = mine.get(k, 0) + d
        months.setdefault(org, {}).update(spent)
    return [
        (org, [(k, d) for k, d in sorted(mine.items()) if d], months[org])
        for org, mine in sorted(deltas.items())
        if any(mine.values())
    ]


def _record(log: list[Changes], until: int) -> dict[str, Any]:
    return {
        "until": until,
        "changes": [
            [org, [[k, d] for k, d in deltas], {k: [p.start, p.end] for k, p in months.items()}]
            for org, deltas, months in log
        ],
    }


def _changes(data: Mapping[str, Any]) -> list[Changes]:
    return [
        (org, [(k, int(d)) for k, d in deltas], {k: Period(s, e) for k, (s, e) in months.items()})
        for org, deltas, months in data["changes"]
    ]
