"""Corrections: void or amend a stored event, with who did it and why, kept as an audit trail.

A correction replaces the stored event of an id in place (:meth:`Meter.void`,
:meth:`Meter.amend`; the operations ``corrections.void``, ``corrections.amend`` and
``corrections.list`` over HTTP):

- **void** keeps the id with no values: the event adds nothing to any measure any more, and the
  original sent again is a conflict, never counted twice;
- **amend** gives it new ``values`` and/or ``dimensions`` (its time stays): queries, costs and
  rollups read the new event, and a later send of the amended event is a duplicate.

The store replaces the event and refolds the rollup rows it was and is in (its series before
and after, over its UTC day), in one transaction, so every answer is exactly the engine's over
the corrected events; quota and spend counters take the old event's contributions out and
count the new one's. Each correction is a store record of the kind
``corrections/<organization>`` — before, after, reason, actor and time — listed by
:meth:`Meter.corrections`.

An event in a closed period (:mod:`meterkit.lateness`) cannot be corrected, nor one older than
its meter's retention (its raw event may be gone).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs

from meterkit import lateness as lateness_module
from meterkit import retention as retention_module
from meterkit.errors import NotFound, StateConflict, ValidationError
from meterkit.ids import new_id
from meterkit.models import DimValue, Event, Number
from meterkit.validate import MAX_STRING, check_event, check_id, check_string

if TYPE_CHECKING:
    from typing_extensions import Required, TypedDict

    from meterkit.recorder import Recorder
    from meterkit.stores.base import Store

    class AmendKeywords(TypedDict, total=False):
        """The keywords of an amendment, for type checkers."""

        values: Mapping[str, Number] | None
        dimensions: Mapping[str, DimValue] | None
        reason: Required[str]
        actor: Required[str]


__all__ = [
    "Action",
    "Correction",
    "Request",
    "check_reason",
    "correct",
    "event_dict",
    "kind",
    "list_corrections",
]

Action = Literal["void", "amend"]
MAX_REASON = 1000


def kind(organization_id: str) -> str:
    return f"corrections/{organization_id}"


def check_reason(value: object) -> str:
    text = check_string("reason", value)
    if len(text) > MAX_REASON:
        raise ValidationError("reason", f"is longer than {MAX_REASON} characters")
    return text


def check_actor(value: object) -> str:
    text = check_id("actor", value)
    if len(text) > MAX_STRING:
        raise ValidationError("actor", f"is longer than {MAX_STRING} characters")
    return text


def event_dict(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "meter": event.meter,
        "organization_id": event.organization_id,
        "time": event.time,
        "values": dict(event.values),
        "dimensions": dict(event.dimensions),
    }


@attrs.frozen
class Correction:
    """One correction of one event: what it was, what it became, who, why and when."""

    id: str
    organization_id: str
    meter: str
    event_id: str
    action: str
    reason: str
    actor: str
    at: int
    before: Mapping[str, Any]
    after: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": "correction",
            "id": self.id,
            "organization_id": self.organization_id,
            "meter": self.meter,
            "event_id": self.event_id,
            "action": self.action,
            "reason": self.reason,
            "actor": self.actor,
            "at": self.at,
            "before": dict(self.before),
            "after": dict(self.after),
        }

    def to_record(self) -> dict[str, Any]:
        out = self.to_dict()
        for key in ("object", "id", "organization_id"):
            out.pop(key)
        return out

    @classmethod
    def from_record(cls, key: str, organization_id: str, data: Mapping[str, Any]) -> Correction:
        return cls(
            key,
            organization_id,
            data["meter"],
            data["event_id"],
            data["action"],
            data["reason"],
            data["actor"],
            int(data["at"]),
            data["before"],
            data["after"],
        )


@attrs.frozen
class Request:
    """What a caller asks to correct (checked by :func:`correct`)."""

    meter: str
    organization_id: str
    event_id: str
    action: Action
    values: Mapping[str, Number] | None
    dimensions: Mapping[str, DimValue] | None
    reason: str
    actor: str

    @classmethod
    def amend(
        cls,
        meter: str,
        organization_id: str,
        event_id: str,
        *,
        values: Mapping[str, Number] | None = None,
        dimensions: Mapping[str, DimValue] | None = None,
        reason: str,
        actor: str,
    ) -> Request:
        """An amendment: new ``values`` and/or ``dimensions`` (at least one)."""
        if values is None and dimensions is None:
            raise ValidationError("values", "give values or dimensions to amend")
        return cls(meter, organization_id, event_id, "amend", values, dimensions, reason, actor)


def list_corrections(
    store: Store, organization_id: str, *, meter: str | None = None, event_id: str | None = None
) -> list[Correction]:
    """The organization's corrections, oldest first, optionally of one meter or event."""
    org = check_id("organization_id", organization_id)
    found = [Correction.from_record(key, org, data) for key, data in store.list_records(kind(org))]
    found = [
        c
        for c in found
        if (meter is None or c.meter == meter) and (event_id is None or c.event_id == event_id)
    ]
    return sorted(found, key=lambda c: (c.at, c.id))


def correct(
    recorder: Recorder,
    recount: Callable[[Sequence[Event], Sequence[Event]], object],
    request: Request,
) -> Correction:
    """Replace the stored event, recount what it fed (``recount(removed, added)``) and keep
    the correction, in one transaction; every check first."""
    spec = recorder.registry.spec(request.meter)
    org = check_id("organization_id", request.organization_id)
    eid = check_id("event_id", request.event_id)
    why = check_reason(request.reason)
    who = check_actor(request.actor)
    replace = recorder.capabilities.replace_event
    if replace is None:
        raise ValidationError("meter", f"the store {recorder.store.url} cannot correct events")
    recorder.registry.ensure(spec)
    recorder.flush()  # events queued here are in the store first
    found = recorder.store.get_events(spec.name, org, [eid])
    if not found:
        raise NotFound("event_id", f"no event {eid!r} of meter {spec.name!r} for {org}")
    old = found[0]
    if request.action == "void":
        if not old.values:
            raise StateConflict("event_id", f"{eid!r} is void already")
        new = Event(old.id, spec.name, org, old.time, {}, dict(old.dimensions))
    else:
        draft = Event(
            old.id,
            spec.name,
            org,
            old.time,
            dict(old.values) if request.values is None else request.values,
            dict(old.dimensions) if request.dimensions is None else request.dimensions,
        )
        try:
            new = check_event(spec, draft, "event")
        except ValidationError as exc:
            raise ValidationError(exc.field.removeprefix("event."), exc.message) from None
        if new.values == old.values and new.dimensions == old.dimensions:
            raise StateConflict("values", "the amendment changes nothing")
    now = recorder.now()
    # A close made elsewhere a moment ago counts.
    closed = recorder.closed_periods(fresh=True)
    lateness_module.check_open("event_id", closed, org, old.time, f"{eid!r} is")
    retention_module.check_kept(
        "event_id",
        spec.name,
        recorder.retention.days.get(spec.name),
        now,
        old.time,
        f"{eid!r} is",
    )
    correction = Correction(
        new_id("corr"),
        org,
        spec.name,
        eid,
        request.action,
        why,
        who,
        now,
        event_dict(old),
        event_dict(new),
    )
    with recorder.writes():
        replaced = replace(spec, new)
        if replaced is None:
            raise ValidationError("event_id", f"no event {eid!r} of meter {spec.name!r}")
        recount([replaced], [new])
        recorder.store.put_record(kind(org), correction.id, correction.to_record())
    return correction
