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

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from meterkit.errors import ValidationError
from meterkit.models import Event
from meterkit.validate import MAX_STRING, check_id, check_string

__all__ = ["Action", "Correction", "check_reason", "event_dict", "kind"]

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
