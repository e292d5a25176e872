"""Late events and closed periods: how far back usage may still arrive.

Usage is often reported late — a batch job, a queue that was down. ``Meter(lateness=...)``
bounds how late: an event whose time lies more than ``lateness`` before the clock is refused
with :class:`LateEventError` (a ``ValidationError`` on ``events[i].time``), and its whole
batch stores nothing. An event within the window is accepted and lands in the bucket of its
own time, like any other; with no ``lateness`` (the default) any past time is accepted.

A **closed period** is one whose usage is final — invoiced, say. ``Meter.close_period(org,
before)`` (or for every organization, ``organization_id=None``) refuses every later event
stamped before ``before`` with :class:`PeriodClosed`. Closing is kept in the store (records of
the kind ``closed``, keyed by organization or ``*``), so every process sharing it refuses
alike — within ``cache_seconds`` (1 s) of the close. A close only moves forward.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Any

from meterkit.errors import LateEventError, PeriodClosed, ValidationError

__all__ = [
    "ALL",
    "RECORD",
    "LateEventError",
    "PeriodClosed",
    "check_open",
    "closed_map",
    "parse_lateness",
]

RECORD = "closed"
ALL = "*"
"""The key of a close that applies to every organization."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TEXT = re.compile(r"(\d+)\s*([smhd])")


def parse_lateness(value: object, field: str = "lateness") -> int | None:
    """Whole seconds from ``3600``, ``"12h"``, ``"7d"``, ``"90m"``, ``"30s"`` or a
    ``timedelta``; ``None``: any past time is accepted."""
    if value is None:
        return None
    seconds: object = value
    if isinstance(value, str):
        found = _TEXT.fullmatch(value.strip().lower())
        seconds = int(found.group(1)) * _UNITS[found.group(2)] if found else None
    elif isinstance(value, dt.timedelta):
        total = value.total_seconds()
        seconds = int(total) if total == int(total) else None
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 0:
        raise ValidationError(
            field, f"must be whole seconds of at least 0 (3600, '12h', '7d'), not {value!r}"
        )
    return seconds


def closed_map(records: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, int]:
    """``{organization or '*': closed before}`` from the store's ``closed`` records."""
    return {key: int(data["before"]) for key, data in records}


def closed_before(closed: Mapping[str, int], organization_id: str) -> int:
    """The time before which ``organization_id``'s usage is closed (0: none)."""
    return max(closed.get(organization_id, 0), closed.get(ALL, 0))


def check_open(
    field: str, closed: Mapping[str, int], organization_id: str, time: int, what: str
) -> None:
    """Refuse, naming ``field``, a ``time`` in a closed period of ``organization_id``;
    ``what`` begins the message ("falls", "'evt_1' is")."""
    before = closed_before(closed, organization_id)
    if time < before:
        raise PeriodClosed(
            field,
            f"{what} in a closed period: usage of {organization_id} before {before} is final",
            organization_id=organization_id,
            closed_before=before,
        )
