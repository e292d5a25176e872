"""Group commit: appends from many threads share one store transaction (one fsync).

A caller hands its validated batch to :meth:`GroupWriter.append` and blocks until that batch
is durable. A lone caller writes at once. Callers arriving while a write is in flight queue up;
when it ends, one of them (the leader) writes every queued batch in one transaction, then wakes
the others with their own results. So N concurrent callers cost about one commit per write in
flight instead of N, and each still returns only once its own events are stored.

Each batch stays all-or-nothing on its own: if the combined write fails, every batch of the
group is written again alone, so one caller's failure is never another's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import attrs

from meterkit.idempotency import GetEvents, classify
from meterkit.models import AppendResult, Event

__all__ = ["GroupWriter"]

Append = Callable[[Sequence[Event]], list[Event]]


@attrs.define(eq=False)
class _Slot:
    events: Sequence[Event]
    done: bool = False
    result: AppendResult | None = None
    new: list[Event] = attrs.field(factory=list)
    error: BaseException | None = None
    # For a caller that waits: set when the slot is done, or when it is to lead the next
    # write. A caller that leads at once needs none.
    ready: threading.Event | None = None


class GroupWriter:
    """Serialises appends to one store, batching the callers that wait on each other."""

    def __init__(self, append: Append, get_events: GetEvents) -> None:
        self._append = append
        self._get_events = get_events
        self._lock = threading.Lock()
        self._pending: list[_Slot] = []
        self._writing = False
        self.writes = 0  # store transactions made, for tests and benchmarks

    def append(self, events: Sequence[Event]) -> tuple[AppendResult, list[Event]]:
        """Store ``events`` (validated) durably; their outcome and the ones that were new."""
        slot = _Slot(events)
        with self._lock:
            self._pending.append(slot)
            lead = not self._writing
            if not lead:
                slot.ready = threading.Event()
            self._writing = True
        if slot.ready is not None:
            # Woken once: either done by a leader, or made the next leader.
            slot.ready.wait()
        if not slot.done:
            with self._lock:
                group, self._pending = self._pending, []
            try:
                self._write(group)
            finally:
                self._hand_over(group)
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result, slot.new

    def _hand_over(self, group: list[_Slot]) -> None:
        """Wake the callers written for, and exactly one waiting caller to write next."""
        for done in group:
            if not done.done:  # cannot happen, but never leave a caller waiting for ever
                done.error, done.done = RuntimeError("the group write did not finish"), True
            if done.ready is not None:
                done.ready.set()
        with self._lock:
            if self._pending:
                # Every pending caller waits on its event; still _writing, it leads next.
                ready = self._pending[0].ready
                assert ready is not None
                ready.set()
            else:
                self._writing = False

    def _write(self, group: list[_Slot]) -> None:
        try:
            if len(group) > 1:
                combined = [e for slot in group for e in slot.events]
                try:
                    new: list[Event] | None = self._store(combined)
                except Exception:
                    new = None  # each batch again on its own: one's failure is not another's
                if new is not None:
                    self._share(group, combined, new)
                    return
            for slot in group:
                try:
                    self._share([slot], slot.events, self._store(slot.events))
                except Exception as exc:
                    slot.error, slot.done = exc, True
        except BaseException as exc:
            # Stored, but the outcome could not be told (the store went away in between):
            # the callers get the error and may send again, which is idempotent.
            for slot in group:
                if not slot.done:
                    slot.error, slot.done = exc, True

    def _store(self, events: Sequence[Event]) -> list[Event]:
        self.writes += 1
        return self._append(events)

    def _share(self, group: list[_Slot], events: Sequence[Event], new: list[Event]) -> None:
        """Each slot's own result from the group's classification (statuses by position)."""
        result = classify(events, new, self._get_events)
        offset = 0
        for slot in group:
            n = len(slot.events)
            statuses = result.statuses[offset : offset + n]
            mine = slot.events
            slot.result = AppendResult(
                statuses.count("accepted"),
                statuses.count("duplicate"),
                tuple(e.id for e, s in zip(mine, statuses) if s == "conflict"),
                statuses,
            )
            slot.new = [e for e, s in zip(mine, statuses) if s == "accepted"]
            slot.done = True
            offset += n
