"""Raw-event retention: how long a meter keeps its events once rollups hold their totals.

A meter with a retention of ``N`` days keeps its raw events (and its minute rollups) from the
UTC day ``N`` days before now; :meth:`meterkit.Meter.prune` drops what is older, one day later
still (a margin for events validated just before a day turned and for clocks that differ by
less than a day). Hour and day rollups are kept: ``1h`` and ``1d`` queries and costs keep
answering from them.

Three rules keep that exact:

- an event older than :func:`retained_from` is refused: its id might be one already dropped,
  which could no longer be told from a duplicate, so it could be counted twice;
- a query that would read raw events or minute rollups before :func:`retained_from` fails
  with :class:`RetentionError` instead of answering from what is left;
- rebuilding and verifying rollups start at the day before which events were dropped.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from meterkit.engine import rollup
from meterkit.errors import RetentionError, ValidationError

if TYPE_CHECKING:
    from meterkit.stores.base import Store

__all__ = [
    "Retention",
    "RetentionError",
    "check_kept",
    "check_query",
    "check_scan",
    "describe",
    "from_records",
    "parse_retention",
    "parse_retentions",
    "prune_before",
    "retained_from",
]

DAY = 86400
FINEST_KEPT = 3600
"""The finest grain kept before the retained window: hour (and day) rollups."""

RECORD = "retention"
"""Store records of this kind hold each meter's retention: ``{"days": N}``."""

PRUNED = "retention.pruned"
"""Store records of this kind hold the day before which a meter's events were dropped."""


def parse_retention(value: object, field: str = "retention") -> int | None:
    """Whole days from ``90``, ``"90d"`` or ``timedelta(days=90)``; ``None`` keeps everything."""
    if value is None:
        return None
    days: object = value
    if isinstance(value, str):
        text = value.strip().lower()
        days = int(text[:-1]) if text.endswith("d") and text[:-1].isdigit() else None
    elif isinstance(value, dt.timedelta):
        days = value.days if value == dt.timedelta(days=value.days) else None
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValidationError(
            field, f"must be a whole number of days of at least 1 (90, '90d'), not {value!r}"
        )
    return days


def parse_retentions(value: object) -> dict[str, int | None]:
    """``{meter: days}`` (each as :func:`parse_retention`) from a mapping, or ``None``."""
    if value is not None and not isinstance(value, Mapping):
        raise ValidationError("retention", "must map meter names to days")
    return {
        name: parse_retention(days, f"retention.{name}") for name, days in (value or {}).items()
    }


def retained_from(now: int, days: int) -> int:
    """The first second whose raw events are kept: the UTC day ``days`` days before ``now``."""
    start = now - days * DAY
    return start - start % DAY


def prune_before(now: int, days: int) -> int:
    """Raw events before this may be dropped now: one day before :func:`retained_from`."""
    return retained_from(now, days) - DAY


def describe(meter: str, days: int, since: int) -> str:
    when = dt.datetime.fromtimestamp(since, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"meter {meter!r} keeps raw events for {days} days (retention), from {when}"


def check_scan(field: str, meter: str, days: int | None, now: int, start: int) -> None:
    """Refuse to read raw events of ``meter`` from ``start`` when they may be dropped."""
    if days is None:
        return
    since = retained_from(now, days)
    if start < since:
        raise RetentionError(
            field,
            f"needs raw events before the retained window: {describe(meter, days, since)}; "
            "ask for a later start_time",
            meter=meter,
            days=days,
            since=since,
        )


def check_query(
    meter: str, days: int | None, now: int, start: int, end: int, width: int, *, rolled: bool
) -> None:
    """Refuse a bucket query over ``[start, end)`` that would read raw events or minute
    rollups before the retained window (``rolled``: the store answers from rollups)."""
    if days is None:
        return
    since = retained_from(now, days)
    if start >= since:
        return
    fine = (
        [(a, b) for grain, a, b in rollup.plan(start, end, width) if (grain or 0) < FINEST_KEPT]
        if rolled
        else [(start, end)]
    )
    if any(a < since for a, _ in fine):
        hint = (
            "before it, use bucket_width 1h or 1d with a start_time on the hour"
            if rolled
            else "this meter keeps no rollups, so every query reads raw events"
        )
        raise RetentionError(
            "start_time",
            f"needs raw events or minute rollups before the retained window: "
            f"{describe(meter, days, since)}; {hint}",
            meter=meter,
            days=days,
            since=since,
        )


def from_records(records: list[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """Each meter's retention in days, from its store records (bad ones are ignored)."""
    out: dict[str, int] = {}
    for name, data in records:
        days = data.get("days") if isinstance(data, Mapping) else None
        if isinstance(days, int) and not isinstance(days, bool) and days >= 1:
            out[name] = days
    return out


def check_kept(
    field: str, meter: str, days: int | None, now: int, time: int, what: str, why: str = ""
) -> None:
    """Refuse, naming ``field``, a ``time`` before ``meter``'s retained window (``days``;
    ``None``: all is kept): ``what`` says whose time it is, ``why`` (optional) why it matters."""
    if days is None:
        return
    since = retained_from(now, days)
    if time < since:
        raise RetentionError(
            field,
            f"{what} older than the retained window: {describe(meter, days, since)}{why}",
            meter=meter,
            days=days,
            since=since,
        )


class Retention:
    """The days of raw events each meter keeps, as the store holds them.

    Read from the store when first needed (opening a Meter sends nothing to it); the
    retentions given when the meter was opened are stored then, where they differ.
    """

    def __init__(self, store: Store, wanted: Mapping[str, int | None]) -> None:
        self.store = store
        self._wanted = dict(wanted)
        self._known: dict[str, int] | None = None
        self._lock = threading.Lock()

    @property
    def days(self) -> dict[str, int]:
        """Days kept, per meter that has a retention (the live dict: do not change it)."""
        known = self._known
        if known is None:
            with self._lock:
                known = self._known
                if known is None:
                    known = from_records(self.store.list_records(RECORD))
                    for name, days in self._wanted.items():
                        self._keep(known, name, days)
                    self._known = known
        return known

    def set(self, name: str, days: int | None) -> None:
        """Keep ``name``'s events ``days`` days (``None``: all), stored at once."""
        known = self.days
        with self._lock:
            self._keep(known, name, days)

    def _keep(self, known: dict[str, int], name: str, days: int | None) -> None:
        """Store ``name``'s retention where it differs from ``known``, and note it there."""
        if known.get(name) == days:
            return
        if days is None:
            self.store.delete_record(RECORD, name)
            known.pop(name, None)
        else:
            self.store.put_record(RECORD, name, {"days": days})
            known[name] = days
