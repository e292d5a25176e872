"""What a quota decision answers, and the checks of what it is asked, before any counter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs

from meterkit.errors import ValidationError
from meterkit.plans import UNLIMITED
from meterkit.spend import SPEND
from meterkit.validate import MAX_VALUE, check_id, check_string

__all__ = [
    "MAX_TTL",
    "RATE_WINDOWS",
    "Decision",
    "LimitState",
    "Policy",
    "check_amounts",
    "check_count",
    "check_org",
    "check_ttl",
]

if TYPE_CHECKING:
    from typing_extensions import TypedDict

    class DebitKeywords(TypedDict, total=False):
        """The keywords of a debit, for type checkers."""

        dimensions: Mapping[str, Any] | None
        cost: Any
        price: Mapping[str, Mapping[str, Any]] | None

    class CheckKeywords(DebitKeywords, total=False):
        """The keywords of a check, for type checkers."""

        debit: bool
        requests: int

    class ReserveKeywords(DebitKeywords, total=False):
        """The keywords of a reservation, for type checkers."""

        ttl: int
        requests: int


RATE_WINDOWS = {"rate_limit_rpm": 60, "rate_limit_per_day": 86400}
Policy = Literal["closed", "open"]


@attrs.frozen
class LimitState:
    """One limit as a decision saw it. ``limit`` and ``remaining`` are ``-1`` when unlimited."""

    metric: str
    requested: int
    used: int
    limit: int
    remaining: int
    reset_at: int | None


@attrs.frozen
class Decision:
    """The answer to "may this request go ahead?".

    ``limit`` / ``used`` / ``remaining`` / ``reset_at`` describe the deciding limit: the one
    that refused, or (when admitted) the one with the least room left. ``retry_after`` is in
    whole seconds (at least 1) when refused and a wait can help. ``degraded`` is true when
    the store could not answer and the fail-open policy admitted the request.
    """

    allowed: bool
    organization_id: str
    limits: tuple[LimitState, ...] = ()
    refused_by: str | None = None
    retry_after: int | None = None
    degraded: bool = False
    id: str = ""

    def deciding(self) -> LimitState | None:
        """The limit this decision is told by: the one that refused it, else the limited one
        with the least share remaining (what ``limit``, ``remaining`` and ``reset_at`` are)."""
        if self.refused_by is not None:
            return next((s for s in self.limits if s.metric == self.refused_by), None)
        limited = [s for s in self.limits if s.limit != UNLIMITED]
        return min(limited, key=lambda s: (s.remaining / max(s.limit, 1), s.metric), default=None)

    @property
    def limit(self) -> int:
        state = self.deciding()
        return state.limit if state else UNLIMITED

    @property
    def used(self) -> int:
        state = self.deciding()
        return state.used if state else 0

    @property
    def remaining(self) -> int:
        state = self.deciding()
        return state.remaining if state else UNLIMITED

    @property
    def reset_at(self) -> int | None:
        state = self.deciding()
        return state.reset_at if state else None

    def state(self, metric: str) -> LimitState | None:
        return next((s for s in self.limits if s.metric == metric), None)


MAX_TTL = 366 * 86400


def check_count(field: str, value: object, *, minimum: int = 0) -> int:
    """A whole number from ``minimum`` to :data:`MAX_VALUE` (what every counter holds exactly)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValidationError(field, f"must be a {what} integer")
    if value > MAX_VALUE:
        raise ValidationError(field, f"must not exceed {MAX_VALUE}")
    return value


def check_ttl(ttl: object) -> int:
    """A reservation's ``ttl``: whole seconds from 1 to :data:`MAX_TTL`."""
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL:
        raise ValidationError("ttl", f"must be a whole number of seconds from 1 to {MAX_TTL}")
    return ttl


def check_amounts(amounts: object, field: str = "amounts") -> dict[str, int]:
    """``{metric: whole amount >= 0}``, or a ValidationError naming ``field.metric``.

    Every amount is checked before any counter is touched, so a refused call changes nothing.
    """
    if not isinstance(amounts, Mapping):
        raise ValidationError(field, "must be a mapping of metric to a whole amount")
    out: dict[str, int] = {}
    for metric, amount in amounts.items():
        if type(metric) is not str or metric not in _GOOD_NAMES:
            check_string(field, metric)
            if metric in RATE_WINDOWS:
                raise ValidationError(f"{field}.{metric}", "rate limits are counted per request")
            if metric == SPEND:
                raise ValidationError(
                    f"{field}.{metric}", "spend is decided in dollars: pass cost= or price="
                )
            _remember(_GOOD_NAMES, metric)
        if type(amount) is int and 0 <= amount <= MAX_VALUE:
            out[metric] = amount  # the common case of check_count, without a field name
        else:
            out[metric] = check_count(f"{field}.{metric}", amount)
    return out


# Names and ids already found valid (exact ``str`` only): checked once, not on every decision.
_GOOD_NAMES: set[str] = set()
_GOOD_IDS: set[str] = set()


def _remember(seen: set[str], value: str) -> None:
    if type(value) is str:
        if len(seen) >= 100_000:
            seen.clear()
        seen.add(value)


def check_org(value: object) -> str:
    """:func:`~meterkit.validate.check_id` of an ``organization_id``, remembered once valid."""
    if type(value) is str and value in _GOOD_IDS:
        return value
    org = check_id("organization_id", value)
    _remember(_GOOD_IDS, org)
    return org
