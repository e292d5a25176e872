"""Billing periods: calendar months (optionally anchored on a day), or days — all UTC."""

from __future__ import annotations

import calendar
import datetime as dt
from typing import Literal

import attrs

from meterkit.errors import ValidationError

__all__ = ["BillingCycle", "Period", "utc"]

UTC = dt.timezone.utc


def utc(ts: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, UTC)


def _stamp(d: dt.datetime) -> int:
    return int(d.timestamp())


@attrs.frozen
class Period:
    """``[start, end)`` in Unix seconds."""

    start: int
    end: int

    def contains(self, t: int) -> bool:
        return self.start <= t < self.end

    @property
    def last_second(self) -> int:
        return self.end - 1


def _anchored(year: int, month: int, day: int) -> dt.datetime:
    """Day ``day`` of the month, or its last day when the month is shorter (31 → Feb 28/29)."""
    last = calendar.monthrange(year, month)[1]
    return dt.datetime(year, month, min(day, last), tzinfo=UTC)


def _shift(year: int, month: int, by: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + by
    return index // 12, index % 12 + 1


@attrs.frozen
class BillingCycle:
    """``monthly`` (anchored on ``anchor_day``, 1 = calendar month) or ``daily``."""

    kind: Literal["monthly", "daily"] = "monthly"
    anchor_day: int = 1

    def __attrs_post_init__(self) -> None:
        if self.kind not in ("monthly", "daily"):
            raise ValidationError("billing_cycle", "must be 'monthly' or 'daily'")
        if (
            isinstance(self.anchor_day, bool)
            or not isinstance(self.anchor_day, int)
            or not (1 <= self.anchor_day <= 31)
        ):
            raise ValidationError("anchor_day", "must be an integer from 1 to 31")

    def period_at(self, t: int) -> Period:
        """The period containing ``t``."""
        when = utc(t)
        if self.kind == "daily":
            start = dt.datetime(when.year, when.month, when.day, tzinfo=UTC)
            return Period(_stamp(start), _stamp(start + dt.timedelta(days=1)))
        year, month = when.year, when.month
        start = _anchored(year, month, self.anchor_day)
        if when < start:
            year, month = _shift(year, month, -1)
            start = _anchored(year, month, self.anchor_day)
        ny, nm = _shift(year, month, 1)
        return Period(_stamp(start), _stamp(_anchored(ny, nm, self.anchor_day)))

    def previous(self, period: Period) -> Period:
        return self.period_at(period.start - 1)

    def history(self, t: int, count: int) -> list[Period]:
        """The ``count`` periods ending with the one containing ``t``, oldest first."""
        periods: list[Period] = []
        period = self.period_at(t)
        while len(periods) < count:
            periods.append(period)
            period = self.previous(period)
        return periods[::-1]
