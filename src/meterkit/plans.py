"""Plans, organizations' plan assignments and purchased credit grants."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from meterkit.errors import ValidationError
from meterkit.periods import BillingCycle
from meterkit.validate import MAX_VALUE, check_id, check_string

__all__ = ["PLAN_FIELDS", "UNLIMITED", "Grant", "OrgPlan", "Plan", "check_limit"]

UNLIMITED = -1


def check_limit(field: str, value: object) -> int:
    """A limit is a non-negative integer up to ``MAX_VALUE``, or ``-1`` for unlimited."""
    if isinstance(value, bool) or not isinstance(value, int) or value < UNLIMITED:
        raise ValidationError(field, "must be a non-negative integer, or -1 for unlimited")
    if value > MAX_VALUE:
        raise ValidationError(field, f"must not exceed {MAX_VALUE}")
    return value


@attrs.frozen
class Plan:
    """What an organization may use: limits per metric per billing period, and rate limits.

    ``limits`` maps a metric (``tokens``, ``queries``, ``credits``, …) to its allowance per
    billing period; gauge metrics (``spaces``, ``storage_bytes``) are limits on what exists at
    once. ``-1`` is unlimited. With ``credits_per_seat`` the credit allowance is
    ``seats * credits_per_seat`` instead of ``limits["credits"]``.
    """

    id: str
    name: str = ""
    billing_cycle: BillingCycle = attrs.field(factory=BillingCycle)
    limits: Mapping[str, int] = attrs.field(factory=dict)
    rate_limit_rpm: int = UNLIMITED
    rate_limit_per_day: int = UNLIMITED
    credits_per_seat: int | None = None

    def __attrs_post_init__(self) -> None:
        check_id("plan.id", self.id)
        if not isinstance(self.name, str):
            raise ValidationError("plan.name", "must be a string")
        if self.name:
            check_string("plan.name", self.name)
        if not isinstance(self.billing_cycle, BillingCycle):
            raise ValidationError("plan.billing_cycle", "must be a BillingCycle")
        if not isinstance(self.limits, Mapping):
            raise ValidationError("plan.limits", "must be a mapping of metric to limit")
        for metric, limit in self.limits.items():
            check_string("plan.limits", metric)
            check_limit(f"plan.limits.{metric}", limit)
        check_limit("plan.rate_limit_rpm", self.rate_limit_rpm)
        check_limit("plan.rate_limit_per_day", self.rate_limit_per_day)
        if self.credits_per_seat is not None:
            check_limit("plan.credits_per_seat", self.credits_per_seat)

    def limit(self, metric: str, seats: int = 1) -> int:
        if metric == "credits" and self.credits_per_seat is not None:
            return (
                UNLIMITED if self.credits_per_seat == UNLIMITED else seats * self.credits_per_seat
            )
        return self.limits.get(metric, UNLIMITED)

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "billing_cycle": self.billing_cycle.kind,
            "anchor_day": self.billing_cycle.anchor_day,
            "limits": dict(self.limits),
            "rate_limit_rpm": self.rate_limit_rpm,
            "rate_limit_per_day": self.rate_limit_per_day,
            "credits_per_seat": self.credits_per_seat,
        }

    @classmethod
    def from_record(cls, plan_id: str, data: Mapping[str, Any]) -> Plan:
        return cls(
            id=plan_id,
            name=data.get("name", ""),
            billing_cycle=BillingCycle(
                data.get("billing_cycle", "monthly"), data.get("anchor_day", 1)
            ),
            limits=dict(data.get("limits", {})),
            rate_limit_rpm=data.get("rate_limit_rpm", UNLIMITED),
            rate_limit_per_day=data.get("rate_limit_per_day", UNLIMITED),
            credits_per_seat=data.get("credits_per_seat"),
        )


PLAN_FIELDS = (
    "name",
    "billing_cycle",
    "anchor_day",
    "limits",
    "rate_limit_rpm",
    "rate_limit_per_day",
    "credits_per_seat",
)
"""The fields of a stored plan (:meth:`Plan.to_record`), as a file or a request gives them."""


@attrs.frozen
class OrgPlan:
    """An organization's plan assignment."""

    organization_id: str
    plan: str
    seats: int = 1

    def __attrs_post_init__(self) -> None:
        check_id("organization_id", self.organization_id)
        check_id("plan", self.plan)
        if isinstance(self.seats, bool) or not isinstance(self.seats, int) or self.seats < 0:
            raise ValidationError("seats", "must be a non-negative integer")
        if self.seats > MAX_VALUE:
            raise ValidationError("seats", f"must not exceed {MAX_VALUE}")


@attrs.frozen
class Grant:
    """Purchased credits: raise the credit limit of the periods they are valid in.

    A grant is valid from ``granted_at`` until ``expires_at`` (by default the end of the
    billing period it was bought in, so a purchase is spent once, not every month).
    """

    id: str
    organization_id: str
    credits: int
    granted_at: int
    expires_at: int | None

    def valid_at(self, t: int) -> bool:
        return self.granted_at <= t and (self.expires_at is None or t < self.expires_at)
