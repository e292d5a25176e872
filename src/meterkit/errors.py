"""Exceptions raised by meterkit."""

from __future__ import annotations

__all__ = [
    "EventConflict",
    "LateEventError",
    "MeterkitError",
    "NotFound",
    "PeriodClosed",
    "QuotaExceeded",
    "RetentionError",
    "StateConflict",
    "StoreConflict",
    "StoreUnavailable",
    "ValidationError",
]


class MeterkitError(Exception):
    """Base class of every error meterkit raises on purpose."""


class ValidationError(MeterkitError, ValueError):
    """Bad input: ``field`` names what was wrong; nothing was stored."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class NotFound(ValidationError):
    """Well-formed input naming something that does not exist (an event to correct): HTTP
    answers 404."""


class StateConflict(ValidationError):
    """Well-formed input that what is stored refuses (an event void already, a spend limit
    above the operator's cap, one spend alert too many): HTTP answers 409."""


class EventConflict(ValidationError):
    """An event id already recorded for this organization and meter with other data.

    The stored event is unchanged and nothing of the new one was recorded. ``ids`` lists the
    conflicting ids.
    """

    def __init__(self, field: str, ids: tuple[str, ...]) -> None:
        self.ids = ids
        shown = ", ".join(repr(i) for i in ids[:5])
        super().__init__(
            field,
            f"id {shown} is already recorded for this organization and meter with other data; "
            "the stored event is unchanged (use a new id for new usage)",
        )


class LateEventError(ValidationError):
    """An event is older than the meter's lateness window accepts (``Meter(lateness=...)``).

    ``lateness`` is the window in seconds; ``accepted_from`` the earliest time accepted now.
    """

    def __init__(self, field: str, message: str, *, lateness: int, accepted_from: int) -> None:
        self.lateness = lateness
        self.accepted_from = accepted_from
        super().__init__(field, message)


class PeriodClosed(ValidationError):
    """An event falls in a closed period (``Meter.close_period``): its usage is final.

    ``organization_id`` is the event's organization, ``closed_before`` the end of what is
    closed for it.
    """

    def __init__(
        self, field: str, message: str, *, organization_id: str, closed_before: int
    ) -> None:
        self.organization_id = organization_id
        self.closed_before = closed_before
        super().__init__(field, message)


class StoreUnavailable(MeterkitError):
    """The store could not be reached or did not answer in time."""


class StoreConflict(StoreUnavailable):
    """The store aborted a transaction that changed nothing (a deadlock victim, a
    serialization failure): running it again may succeed."""


class QuotaExceeded(MeterkitError):
    """A quota decision refused the request; ``decision`` says which limit."""

    def __init__(self, decision: object) -> None:
        self.decision = decision
        super().__init__(f"quota exceeded: {getattr(decision, 'refused_by', None)}")


class RetentionError(ValidationError):
    """A query needs raw events older than a meter keeps, or an event is older than that.

    ``meter`` and ``days`` name the retention; ``retained_from`` is the first second whose
    raw events are still kept.
    """

    def __init__(self, field: str, message: str, *, meter: str, days: int, since: int) -> None:
        self.meter = meter
        self.days = days
        self.retained_from = since
        super().__init__(field, message)
