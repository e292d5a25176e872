"""Duplicates and conflicts: what became of each event of an append.

An event is identified by ``(organization_id, meter, id)``. Stores only keep the first copy
of a key; this module tells, for every event handed to them, whether it was new, a retry of
what is stored (same payload), or a *conflict* (same key, other payload), so that every store
reports the same thing without repeating the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from meterkit.models import AppendResult, Event, EventStatus

__all__ = ["classify", "same_payload"]

Key = tuple[str, str, str]
GetEvents = Callable[[str, str, Sequence[str]], list[Event]]


def key(event: Event) -> Key:
    return (event.organization_id, event.meter, event.id)


def _same_map(a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    if a == b:  # the common case: dict equality in C
        return True
    return {k: v for k, v in a.items() if v is not None} == {
        k: v for k, v in b.items() if v is not None
    }


def same_payload(a: Event, b: Event) -> bool:
    """Whether two copies of one event agree on time, values and set dimensions.

    A dimension given as ``None`` is the same as one not given (neither is stored); numbers
    compare by value, so ``3`` and ``3.0`` are the same amount.
    """
    return (
        a.time == b.time and _same_map(a.values, b.values) and _same_map(a.dimensions, b.dimensions)
    )


def classify(events: Sequence[Event], new: Sequence[Event], get_events: GetEvents) -> AppendResult:
    """The outcome of appending ``events`` (validated), of which the store kept ``new``.

    The reference copy of a key is the stored one when the key was there before, else the
    first copy in this batch; every other copy is a duplicate or a conflict against it.
    ``get_events(meter, organization_id, ids)`` is only asked about keys that were not new.
    """
    if len(new) == len(events):
        # Stores keep at most one copy of a key: as many new events as given means every
        # one was new (a batch repeating a key would have kept fewer).
        first: EventStatus = "accepted"
        every = (first,) * len(events)
        return AppendResult(len(events), 0, (), every)
    # By key, not identity: a store may hand back copies of the events it kept.
    fresh = {key(e) for e in new}
    reference: dict[Key, Event] = {}
    missing: dict[tuple[str, str], list[str]] = {}
    for event in events:
        k = key(event)
        if k in fresh:
            reference.setdefault(k, event)
        elif k not in reference:
            reference[k] = event  # placeholder until the stored copy is read
            missing.setdefault((event.meter, event.organization_id), []).append(event.id)
    for (meter, org), ids in missing.items():
        found = {key(stored): stored for stored in get_events(meter, org, ids)}
        for i in ids:
            k = (org, meter, i)
            # Absent only if the stored copy vanished (retention) since the append.
            reference[k] = found.get(k, reference[k])
    statuses: list[EventStatus] = []
    conflicts: list[str] = []
    accepted = duplicates = 0
    for event in events:
        k = key(event)
        if k in fresh:
            fresh.discard(k)
            statuses.append("accepted")
            accepted += 1
        elif same_payload(reference[k], event):
            statuses.append("duplicate")
            duplicates += 1
        else:
            statuses.append("conflict")
            conflicts.append(event.id)
    return AppendResult(accepted, duplicates, tuple(conflicts), tuple(statuses))
