"""Every organization side by side over a range: usage, costs, spend and how close each is to
its plan's limits (``meterkit top``), for an operator who serves many customers."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import attrs

from meterkit.catalog import CHARGES_METER
from meterkit.errors import ValidationError
from meterkit.models import MeterSpec
from meterkit.plans import UNLIMITED
from meterkit.recovery import counted_organizations

__all__ = ["OrganizationLine", "UsageColumn", "default_columns", "organizations_overview"]

COSTS_PAGE = 180  # the costs endpoint's largest page, in day buckets
NANO = Decimal("0.000000001")  # money is shown to the nano-dollar, the unit spend counts in


@attrs.frozen
class UsageColumn:
    """One usage figure per organization: a counted measure's total over the range, or a
    gauge's level at its end (never a sum of levels)."""

    meter: str
    measure: str
    gauge: bool = False
    unit: str = ""

    @property
    def name(self) -> str:
        return self.meter if self.measure == self.meter else f"{self.meter}.{self.measure}"

    @classmethod
    def parse(cls, specs: dict[str, MeterSpec], text: str) -> UsageColumn:
        """``meter.measure`` (or a meter alone: its main measure), checked against ``specs``."""
        meter, _, measure = text.partition(".")
        spec = specs.get(meter)
        if spec is None:
            raise ValidationError("--usage", f"unknown meter {meter!r} in {text!r}")
        found = spec.measure(measure) if measure else _main(spec)
        if found is None:
            raise ValidationError(
                "--usage",
                f"{meter} has no measure {measure!r} (known: {', '.join(spec.measure_names)})",
            )
        return cls(meter, found.name, found.gauge, found.unit)


def _main(spec: MeterSpec) -> Any:
    return spec.measure(spec.name) or spec.measures[0]


def default_columns(specs: dict[str, MeterSpec], limited: set[str]) -> list[UsageColumn]:
    """The main measure (the one named after it, else its first) of each meter a plan limits
    (``tokens``, ``storage_bytes``...), or of every meter when no plan limits one; charges
    left out: the cost column counts them."""
    names = [n for n in specs if n != CHARGES_METER.name]
    return [UsageColumn.parse(specs, n) for n in names if n in limited or not limited]


@attrs.frozen
class OrganizationLine:
    """One organization's row. ``quota_used`` is the largest share of a limit used now (1.0 at
    the limit; ``None`` without a finite limit), on ``quota_metric``."""

    organization_id: str
    plan: str | None
    usage: dict[str, int | float | None]
    cost: Decimal
    spend: Decimal | None
    spend_limit: Decimal | None
    quota_used: float | None
    quota_metric: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON object: money as exact decimal strings (dollars), usage as numbers."""

        def money(value: Decimal | None) -> str | None:
            return None if value is None else str(value.quantize(NANO))

        return {
            "organization_id": self.organization_id,
            "plan": self.plan,
            "usage": dict(self.usage),
            "cost": money(self.cost),
            "spend": money(self.spend),
            "spend_limit": money(self.spend_limit),
            "quota_used": self.quota_used,
            "quota_metric": self.quota_metric,
        }


def _usage(meter: Any, column: UsageColumn, org: str, start: int, end: int) -> int | float | None:
    rows = meter.totals(column.meter, organization_id=org, start_time=start, end_time=end)
    values: list[int | float | None] = [v.get(column.measure) for _, v in rows]
    if column.gauge:
        # The level at the range's end: the last bucket with a reading.
        return next((v for v in reversed(values) if v is not None), None)
    return sum(v for v in values if v is not None)


def _cost(meter: Any, org: str, start: int, end: int) -> Decimal:
    total = Decimal(0)
    page: str | None = None
    while True:
        found = meter.costs(
            organization_id=org, start_time=start, end_time=end, limit=COSTS_PAGE, page=page
        )
        total += sum((r.amount for b in found.data for r in b.results), Decimal(0))
        page = found.next_page
        if not found.has_more or page is None:
            return total


def _nearest(status: dict[str, Any]) -> tuple[float | None, str | None]:
    """The share used of the limit nearest to being reached, and its metric."""
    peak: tuple[float | None, str | None] = (None, None)
    for line in status["limits"]:
        if line["limit"] == UNLIMITED:
            continue
        share = line["used"] / line["limit"] if line["limit"] else float("inf")
        if peak[0] is None or share > peak[0]:
            peak = (share, line["metric"])
    return peak


def organizations_overview(
    meter: Any,
    *,
    start_time: int,
    end_time: int,
    columns: Sequence[UsageColumn] | None = None,
) -> tuple[list[UsageColumn], list[OrganizationLine]]:
    """One line per organization that has events on any meter or a plan, spend limit or cap:
    the ``columns`` of usage over ``[start_time, end_time)`` (default: every meter's main
    measure that any organization used), what its usage cost over the range, its spend this
    month against its spend limit, and the limit of its plan it is nearest to now. Money is
    in dollars, to the nano-dollar.

    Each usage figure is only queried for the organizations with events on that meter."""
    if end_time <= start_time:
        raise ValidationError("end_time", "must be after start_time")
    specs = dict(meter.meters)
    limited = meter.quotas.meters_counted(n for plan in meter.quotas.plans() for n in plan.limits)
    chosen = list(columns) if columns is not None else default_columns(specs, limited)
    per_meter: dict[str, set[str]] = {}
    for name, spec in specs.items():
        meter.store.ensure_meter(spec)
        per_meter[name] = set(meter.store.organizations(name))
    orgs = set(counted_organizations(meter)).union(*per_meter.values())
    usage: dict[str, dict[str, int | float | None]] = {org: {} for org in orgs}
    for column in chosen:
        for org in orgs:
            usage[org][column.name] = (
                _usage(meter, column, org, start_time, end_time)
                if org in per_meter[column.meter]
                else None
            )
    if columns is None:
        # By default, only the columns someone used.
        chosen = [c for c in chosen if any(usage[o][c.name] for o in orgs)]
        usage = {o: {c.name: usage[o][c.name] for c in chosen} for o in orgs}
    lines = []
    for org in sorted(orgs):
        status = meter.quota_status(org)
        state = meter.spend(org)  # exact, where the status has floats
        cap = state.limit
        share, metric = _nearest(status)
        lines.append(
            OrganizationLine(
                organization_id=org,
                plan=status["plan"],
                usage=usage[org],
                cost=_cost(meter, org, start_time, end_time).quantize(NANO),
                spend=state.counted.quantize(NANO),
                spend_limit=Decimal(cap.threshold_amount) / 100 if cap is not None else None,
                quota_used=share,
                quota_metric=metric,
            )
        )
    return chosen, lines
