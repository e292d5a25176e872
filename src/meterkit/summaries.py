"""Usage summaries the HTTP surfaces serve, as plain Python.

Reported usage over a span comes from recorded events (``check``/``commit``/``debit`` record
theirs); gauges (``spaces``, ``storage_bytes``) report their current counted value; limits
come from the organization's plan.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from meterkit.assets import stored_sizes
from meterkit.convert import camel_converter, native_converter
from meterkit.errors import StateConflict, ValidationError
from meterkit.models import Event
from meterkit.periods import Period, utc
from meterkit.plans import UNLIMITED
from meterkit.recovery import metric_total
from meterkit.validate import MAX_VALUE, check_id

if TYPE_CHECKING:
    import pluggy

    from meterkit.models import AppendResult, Event, MeterSpec, Number
    from meterkit.quotas import Quotas
    from meterkit.stores.base import Store


class Meter(Protocol):
    """What the summaries need of a :class:`~meterkit.Meter`."""

    quotas: Quotas
    pm: pluggy.PluginManager
    store: Store

    @property
    def meters(self) -> Mapping[str, MeterSpec]: ...

    def now(self) -> int: ...

    def spec(self, name: object, field: str = ...) -> MeterSpec: ...

    def total(
        self, meter: str, measure: str, *, organization_id: str, start_time: int, end_time: int
    ) -> Number: ...

    def totals(
        self,
        meter: str,
        *,
        organization_id: str,
        start_time: int,
        end_time: int,
        bucket_width: str = "1d",
    ) -> list[tuple[int, dict[str, Number | None]]]: ...

    def record_many(self, events: Iterable[Event]) -> AppendResult: ...


__all__ = [
    "account_usage",
    "current_usage",
    "metric_unit",
    "organization_meters",
    "plan_usage",
    "quota_status",
    "recalculate_storage",
    "usage_history",
]

DAY = 86400


@attrs.frozen
class UsageMetric:
    used: int
    limit: int
    remaining: int


def _metric(used: int, limit: int) -> UsageMetric:
    remaining = UNLIMITED if limit == UNLIMITED else max(0, limit - used)
    return UsageMetric(int(used), limit, remaining)


FIRST_DATE = dt.date(1970, 1, 1)
LAST_DATE = dt.date(9999, 12, 30)  # its whole day still ends within Unix seconds meterkit keeps


def _date(field: str, value: object) -> dt.date:
    if isinstance(value, dt.datetime):
        raise ValidationError(field, "must be a date (YYYY-MM-DD), not a datetime")
    if isinstance(value, dt.date):
        if not FIRST_DATE <= value <= LAST_DATE:
            raise ValidationError(field, f"must be a date from {FIRST_DATE} to {LAST_DATE}")
        return value
    if isinstance(value, str):
        try:
            if len(value) == 10:
                return _date(field, dt.date.fromisoformat(value))
        except ValueError:
            pass
        raise ValidationError(field, f"{value!r} is not a valid date (YYYY-MM-DD)")
    raise ValidationError(field, "must be a date (YYYY-MM-DD)")


def _stamp(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())


def _iso(ts: int) -> str:
    return utc(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sum(meter: Meter, metric: str, org: str, start: int, end: int) -> int:
    if metric not in meter.meters or end <= start:
        return 0
    return int(meter.total(metric, metric, organization_id=org, start_time=start, end_time=end))


@attrs.frozen
class PlanUsage:
    plan: str
    period_start: str
    period_end: str
    tokens: UsageMetric
    queries: UsageMetric
    spaces: UsageMetric
    rate_limit_rpm: int
    rate_limit_per_day: int


def plan_usage(
    meter: Meter, organization_id: str, start_date: object = None, end_date: object = None
) -> dict[str, Any]:
    """Org-level usage for a date range and the plan's limits (``GET /api/v1/usage``).

    ``start_date`` defaults to the 1st of the current month, ``end_date`` to today; both
    are inclusive UTC dates.
    """
    org = check_id("organization_id", organization_id)
    today = utc(meter.now()).date()
    start = _date("start_date", start_date) if start_date is not None else today.replace(day=1)
    end = _date("end_date", end_date) if end_date is not None else today
    if start > end:
        if start_date is None:
            raise ValidationError(
                "end_date",
                f"must not be before start_date, which defaults to the 1st of this month ({start})",
            )
        raise ValidationError("start_date", "must not be after end_date")
    _, plan = meter.quotas.plan_of(org)
    lo, hi = _stamp(start), _stamp(end) + DAY
    limit = meter.quotas.limit_for
    usage = PlanUsage(
        plan=plan.id if plan else "none",
        period_start=start.isoformat(),
        period_end=end.isoformat(),
        tokens=_metric(_sum(meter, "tokens", org, lo, hi), limit(org, "tokens")),
        queries=_metric(_sum(meter, "queries", org, lo, hi), limit(org, "queries")),
        spaces=_metric(meter.quotas.used(org, "spaces"), limit(org, "spaces")),
        rate_limit_rpm=plan.rate_limit_rpm if plan else UNLIMITED,
        rate_limit_per_day=plan.rate_limit_per_day if plan else UNLIMITED,
    )
    out: dict[str, Any] = native_converter.unstructure(usage)
    # Every other metric the plan limits (a plan metric such as ``llm_tokens``), alike.
    for metric in sorted(plan.limits if plan else ()):
        if metric in out or meter.quotas.is_gauge(metric):
            continue
        used = metric_total(meter, metric, org, lo, hi)
        out[metric] = native_converter.unstructure(_metric(used, limit(org, metric)))
    return out


@attrs.frozen
class Storage:
    used: int
    limit: int


@attrs.frozen
class Credits:
    used: int
    limit: int
    available: int
    billing_period: str
    period_start: str
    period_end: str
    purchased_balance: int | None = None


@attrs.frozen
class PlanInfo:
    tier: str
    name: str
    billing_cycle: str


@attrs.frozen
class Seats:
    count: int
    credits_per_seat: int | None


@attrs.frozen
class AccountUsage:
    storage: Storage
    credits: Credits
    plan: PlanInfo
    seats: Seats | None = None


def account_usage(meter: Meter, organization_id: str, role: str = "member") -> dict[str, Any]:
    """Storage, credits and subscription (``GET /v1/usage``), camelCase.

    Admins also get ``credits.purchasedBalance`` and ``seats`` (``count``,
    ``creditsPerSeat``); for members those keys are absent.
    """
    org = check_id("organization_id", organization_id)
    if role not in ("member", "admin"):
        raise ValidationError("role", "must be 'member' or 'admin'")
    quotas = meter.quotas
    assignment, plan = quotas.plan_of(org)
    now = meter.now()
    period = quotas.period(org, now)
    seats = assignment.seats if assignment else 1
    allowance = plan.limit("credits", seats) if plan else UNLIMITED
    purchased = sum(g.credits for g in quotas.grants(org, now))
    used = _sum(meter, "credits", org, period.start, now + 1)
    available = UNLIMITED if allowance == UNLIMITED else max(0, allowance + purchased - used)
    admin = role == "admin"
    usage = AccountUsage(
        storage=Storage(quotas.used(org, "storage_bytes"), quotas.limit_for(org, "storage_bytes")),
        credits=Credits(
            used=used,
            limit=allowance,
            available=available,
            billing_period=plan.billing_cycle.kind if plan else "monthly",
            period_start=_iso(period.start),
            period_end=_iso(period.last_second),
            purchased_balance=purchased if admin else None,
        ),
        plan=PlanInfo(
            tier=plan.id if plan else "none",
            name=plan.name if plan else "",
            billing_cycle=plan.billing_cycle.kind if plan else "monthly",
        ),
        seats=Seats(seats, plan.credits_per_seat if plan else None) if admin else None,
    )
    out: dict[str, Any] = camel_converter.unstructure(usage)
    if admin and out["seats"].get("creditsPerSeat") is None:
        out["seats"]["creditsPerSeat"] = None
    return out


def current_usage(meter: Meter, organization_id: str) -> dict[str, Any]:
    """Usage for the current billing period: storage, tiles, credits, jobs (``usage.current``)."""
    org = check_id("organization_id", organization_id)
    quotas = meter.quotas
    now = meter.now()
    period = quotas.period(org, now)

    def counted(metric: str) -> dict[str, int]:
        used = _sum(meter, metric, org, period.start, now + 1)
        return native_converter.unstructure(_metric(used, quotas.limit_for(org, metric, now)))  # type: ignore[no-any-return]

    credits = counted("credits")
    purchased = sum(g.credits for g in quotas.grants(org, now))
    credits["available"] = (
        UNLIMITED if credits["limit"] == UNLIMITED else max(0, credits["limit"] - credits["used"])
    )
    credits["purchased"] = purchased
    return {
        "organization_id": org,
        "period_start": _iso(period.start),
        "period_end": _iso(period.last_second),
        "storage": native_converter.unstructure(
            _metric(quotas.used(org, "storage_bytes"), quotas.limit_for(org, "storage_bytes"))
        ),
        "tiles": counted("tiles"),
        "credits": credits,
        "jobs": counted("jobs"),
    }


def usage_history(meter: Meter, organization_id: str, months: object = 6) -> list[dict[str, Any]]:
    """Per billing period for the past ``months`` (oldest first): tile requests, peak storage."""
    org = check_id("organization_id", organization_id)
    if isinstance(months, bool) or not isinstance(months, int) or not 1 <= months <= 120:
        raise ValidationError("months", "must be an integer from 1 to 120")
    now = meter.now()
    out = []
    for period in meter.quotas.cycle(org).history(now, months):
        end = min(period.end, now + 1)
        out.append(
            {
                "month": utc(period.start).strftime("%Y-%m"),
                "period_start": _iso(period.start),
                "period_end": _iso(period.last_second),
                "tile_requests": _sum(meter, "tiles", org, period.start, end),
                "peak_storage_bytes": _peak(meter, org, period, end),
            }
        )
    return out


def _peak(meter: Meter, org: str, period: Period, end: int) -> int:
    if end <= period.start:
        return 0
    rows = meter.totals("storage_bytes", organization_id=org, start_time=period.start, end_time=end)
    return int(max((v.get("storage_bytes") or 0 for _, v in rows), default=0))


def recalculate_storage(meter: Meter, organization_id: str) -> dict[str, Any]:
    """Replace counted storage with the organization's real assets: what a
    ``meterkit_stored_assets`` plugin reports, or else the asset registry
    (:mod:`meterkit.assets`)."""
    org = check_id("organization_id", organization_id)
    assets = meter.pm.hook.meterkit_stored_assets(meter=meter, organization_id=org)
    if assets is None:
        assets = stored_sizes(meter.store, org)
    if not isinstance(assets, Mapping):
        raise ValidationError("assets", "the stored-assets hook must return {resource: bytes}")
    sizes: dict[str, int] = {}
    for resource, size in assets.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValidationError(f"assets.{resource}", "must be a non-negative integer")
        sizes[str(resource)] = size
    previous = meter.quotas.used(org, "storage_bytes")
    total = sum(sizes.values())
    if total > MAX_VALUE:
        raise StateConflict("assets", f"the assets hold more than {MAX_VALUE} bytes in all")
    now = meter.now()
    run = uuid.uuid4().hex
    meter.record_many(
        [
            Event(
                f"recalc_{run}:{resource}",
                "storage_bytes",
                org,
                now,
                {"storage_bytes": size},
                {"resource": resource},
            )
            for resource, size in sorted(sizes.items())
        ]
    )
    meter.quotas.set_gauge(org, "storage_bytes", total)
    return {
        "organization_id": org,
        "storage_bytes": total,
        "previous_bytes": previous,
        "resources": len(sizes),
        "recalculated_at": _iso(now),
    }


def quota_status(meter: Any, organization_id: str) -> dict[str, Any]:
    """Every limit of an organization at ``as_of`` (now; ``GET /v1/organization/quota``,
    ``meterkit quota``):
    its plan's period quotas and gauges (used, limit, remaining, when they reset; ``-1`` is
    unlimited, and a gauge never resets), its rate limits, and its spend limit when one is set
    (month-to-date dollars, the limit, what remains, when the month ends)."""
    org = check_id("organization_id", organization_id)
    quotas = meter.quotas
    now = meter.now()
    _assignment, plan = quotas.plan_of(org)
    period = quotas.period(org, now)
    limits: list[dict[str, Any]] = []
    rates: list[dict[str, Any]] = []
    if plan is not None:
        metrics = set(plan.limits) | ({"credits"} if plan.credits_per_seat is not None else set())
        for metric in sorted(metrics):
            limit = quotas.limit_for(org, metric, now)
            used = quotas.used(org, metric, at=now)
            gauge = quotas.is_gauge(metric)
            limits.append(
                {
                    "metric": metric,
                    "unit": metric_unit(meter, metric),
                    "kind": "gauge" if gauge else "period",
                    "used": used,
                    "limit": limit,
                    "remaining": UNLIMITED if limit == UNLIMITED else max(0, limit - used),
                    "reset_at": None if gauge else period.end,
                }
            )
        for window, value in (("minute", plan.rate_limit_rpm), ("day", plan.rate_limit_per_day)):
            if value != UNLIMITED:
                rates.append({"window": window, "limit": value})
    state = meter.spend(org, now)
    spend = None
    if state.limit is not None:
        cap = Decimal(state.limit.threshold_amount) / 100
        spend = {
            "currency": state.limit.currency.lower(),
            "used": float(state.counted),
            "limit": float(cap),
            "remaining": float(max(Decimal(0), cap - state.counted)),
            "reset_at": state.period_end,
            "enforcing": state.enforcing,
        }
    return {
        "object": "organization.quota",
        "organization_id": org,
        "as_of": now,
        "plan": plan.id if plan is not None else None,
        "period_start": period.start,
        "period_end": period.end,
        "limits": limits,
        "rate_limits": rates,
        "spend_limit": spend,
    }


def metric_unit(meter: Any, metric: str) -> str:
    """What a plan metric counts in: its first source's measure's unit (a metric defined over
    ``completions.input_tokens`` counts tokens), else its own meter's, else its name."""
    for defined in meter.quotas.metric_sources():
        if defined.name != metric:
            continue
        for source in defined.sources:
            found = meter.specs.get(source.meter)
            measure = found.measure(source.measure) if found is not None else None
            if source.meter != metric and measure is not None:
                return str(measure.unit)
    spec = meter.specs.get(metric)
    own = spec.measure(metric) if spec is not None else None
    return str(own.unit) if own is not None else metric


def organization_meters(
    meter: Any, organization_id: str, kinds: Iterable[str], *, days: int = 30
) -> dict[str, Any]:
    """The usage meters ``kinds`` of an organization, those it used in the last ``days`` days
    or that a limit of its plan counts listed first (each group in the order given), with
    every measure's unit and whether it is a gauge: the dashboard's meter list
    (``GET /v1/organization/meters``)."""
    org = check_id("organization_id", organization_id)
    now = meter.now()
    start = now - now % DAY - (days - 1) * DAY
    _assignment, plan = meter.quotas.plan_of(org)
    limited = meter.quotas.meters_counted(plan.limits) if plan is not None else set()
    listed = []
    for name in kinds:
        spec = meter.specs[name]
        used = any(
            value
            for _start, values in meter.totals(
                name, organization_id=org, start_time=start, end_time=now + 1
            )
            for value in values.values()
        )
        listed.append(
            {
                "object": "organization.meter",
                "name": name,
                "in_use": used,
                "limited": name in limited,
                "measures": [
                    {"name": m.name, "unit": m.unit, "gauge": m.gauge} for m in spec.measures
                ],
            }
        )
    listed.sort(key=lambda m: not (m["in_use"] or m["limited"]))
    return {"object": "list", "organization_id": org, "as_of": now, "days": days, "data": listed}
