"""The TOML configuration file: store, meters, prices, plans and organizations.

``Meter.from_config(path)`` reads it; ``meterkit serve --config`` does too. Every problem
is a :class:`~meterkit.ValidationError` whose ``field`` is the path of the bad key, such
as ``plans.pro.limits.tokens``; nothing is written to the store until the whole file is valid.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs

from meterkit.errors import ValidationError
from meterkit.lateness import parse_lateness
from meterkit.models import Dimension, Measure, MeterSpec
from meterkit.notify import notifiers_from_config
from meterkit.periods import BillingCycle
from meterkit.planmetrics import Metric
from meterkit.plans import PLAN_FIELDS, OrgPlan, Plan
from meterkit.quotas.leases import DEFAULT_FLUSH_INTERVAL, DEFAULT_TTL, check_timing
from meterkit.retention import parse_retention
from meterkit.spend import check_cents
from meterkit.validate import check_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from meterkit.models import MeterSpec
    from meterkit.pricing import Price
    from meterkit.quotas import Quotas


class Meter(Protocol):
    """What a configuration writes into: a :class:`~meterkit.Meter`."""

    quotas: Quotas

    @property
    def meters(self) -> Mapping[str, MeterSpec]: ...

    def set_plan(self, plan: Plan) -> Plan: ...

    def assign_plan(self, organization_id: str, plan: str, *, seats: int = 1) -> OrgPlan: ...

    def set_spend_cap(self, organization_id: str, threshold_amount: int) -> Any: ...

    def set_price(self, price: Price | Mapping[str, Any]) -> Price: ...

    def set_metric(self, metric: Metric) -> Metric: ...

    def close(self) -> None: ...


M = TypeVar("M", bound=Meter)


__all__ = ["Config", "load_config"]

_TOP = {
    "store",
    "counters",
    "policy",
    "default_plan",
    "thresholds",
    "max_future_skew",
    "leases",
    "lease_ttl",
    "flush_interval",
    "meters",
    "metrics",
    "prices",
    "plans",
    "organizations",
    "retention",
    "notify",
    "spend_limits",
    "lateness",
}


@attrs.frozen
class Config:
    store: str
    counters: str | None = None
    policy: str = "closed"
    default_plan: str | None = None
    thresholds: tuple[float, ...] = (0.8, 1.0)
    max_future_skew: int | None = 300
    leases: bool = True
    lease_ttl: int = DEFAULT_TTL
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    meters: tuple[MeterSpec, ...] = ()
    metrics: tuple[Metric, ...] = ()
    prices: tuple[dict[str, Any], ...] = ()
    plans: tuple[Plan, ...] = ()
    organizations: tuple[OrgPlan, ...] = ()
    retention: tuple[tuple[str, int], ...] = ()
    notifiers: tuple[Any, ...] = ()
    spend_limits: tuple[tuple[str, int], ...] = ()
    lateness: int | None = None

    def meter_kwargs(self) -> dict[str, Any]:
        return {
            "counters": self.counters,
            "policy": self.policy,
            "default_plan": self.default_plan,
            "thresholds": self.thresholds,
            "max_future_skew": self.max_future_skew,
            "leases": self.leases,
            "lease_ttl": self.lease_ttl,
            "flush_interval": self.flush_interval,
            "meters": self.meters,
            "metrics": self.metrics,
            "retention": dict(self.retention),
            "notifiers": self.notifiers,
            "lateness": self.lateness,
        }

    def open(self, factory: Callable[..., M], **overrides: Any) -> M:
        """``factory(store URL, **options)`` (a :class:`~meterkit.Meter`) opened on this file's
        store and options, with its metrics, prices, plans and assignments written.

        Keyword arguments override the file (``url=...`` replaces ``store``).
        """
        kwargs = self.meter_kwargs()
        metrics = kwargs.pop("metrics", ())
        override = overrides.pop("url", None)
        kwargs.update(overrides)
        try:
            meter = factory(override or self.store, **kwargs)
        except ValidationError as exc:
            if exc.field == "url" and not override:
                raise ValidationError("store", exc.message) from None  # the file's own key
            raise
        try:
            for metric in metrics:
                try:
                    meter.set_metric(metric)
                except ValidationError as exc:  # named after the file's [metrics.NAME] table
                    tail = exc.field.removeprefix("metric.").removeprefix("metric")
                    raise ValidationError(
                        f"metrics.{metric.name}{'.' + tail if tail else ''}", exc.message
                    ) from None
            self.apply(meter)
        except BaseException:
            meter.close()
            raise
        return meter

    def apply(self, meter: Meter) -> None:
        """Write the prices, plans and assignments into the meter's store (idempotent)."""
        prices = [self._price(meter, i, data) for i, data in enumerate(self.prices)]
        for plan in self.plans:  # every plan checked before any is written
            try:
                meter.quotas.check_plan_metrics(plan)
            except ValidationError as exc:
                raise ValidationError(f"plans.{plan.id}.{exc.field}", exc.message) from None
        for plan in self.plans:
            meter.set_plan(plan)
        for org in self.organizations:
            meter.assign_plan(org.organization_id, org.plan, seats=org.seats)
        for price in prices:
            meter.set_price(price)
        for org_id, cents in self.spend_limits:
            # The file is the operator's: its limits are caps an organization cannot lift.
            meter.set_spend_cap(org_id, cents)

    @staticmethod
    def _price(meter: Meter, index: int, data: Mapping[str, Any]) -> Price:
        from meterkit.pricing import price_from_dict

        try:
            return price_from_dict(data, meter.meters)
        except ValidationError as exc:
            raise ValidationError(f"prices[{index}].{exc.field}", exc.message) from None


def _table(field: str, value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(field, "must be a table")
    return dict(value)


def _only(field: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValidationError(
            f"{field}.{unknown[0]}" if field else unknown[0],
            f"unknown key (allowed: {sorted(allowed)})",
        )


def _wrap(field: str, build: Any) -> Any:
    try:
        return build()
    except ValidationError as exc:
        raise ValidationError(f"{field}.{exc.field.split('.')[-1]}", exc.message) from None
    except (TypeError, ValueError) as exc:
        raise ValidationError(field, str(exc)) from None


def _meters(items: object) -> tuple[MeterSpec, ...]:
    if not isinstance(items, list):
        raise ValidationError("meters", "must be an array of tables ([[meters]])")
    specs = []
    for i, raw in enumerate(items):
        field = f"meters[{i}]"
        data = _table(field, raw)
        _only(field, data, {"name", "measures", "dimensions", "result_object", "sums"})

        def build(data: dict[str, Any] = data) -> MeterSpec:
            measures = [Measure(**_table("measures", m)) for m in data.get("measures", [])]
            dims = [Dimension(**_table("dimensions", d)) for d in data.get("dimensions", [])]
            return MeterSpec(
                data.get("name", ""),
                measures,
                dims,
                result_object=data.get("result_object", ""),
                sums=_table("sums", data.get("sums", {})),
            )

        specs.append(_wrap(field, build))
    return tuple(specs)


def _metrics(items: object) -> tuple[Metric, ...]:
    """``[metrics.NAME]`` tables: ``sources = "meter.measure + ..."``, optional ``where``."""
    out = []
    for name, raw in _table("metrics", items).items():
        field = f"metrics.{name}"
        data = _table(field, raw)
        _only(field, data, {"sources", "where"})
        where = _table(f"{field}.where", data.get("where", {}))
        try:
            out.append(Metric.parse(name, data.get("sources", ""), where=where or None))
        except ValidationError as exc:
            raise ValidationError(f"{field}.{exc.field}", exc.message) from None
    return tuple(out)


def _plans(items: object) -> tuple[Plan, ...]:
    plans = []
    for plan_id, raw in _table("plans", items).items():
        field = f"plans.{plan_id}"
        data = _table(field, raw)
        _only(field, data, set(PLAN_FIELDS))
        limits = _table(f"{field}.limits", data.get("limits", {}))

        def build(
            data: dict[str, Any] = data, plan_id: str = plan_id, limits: dict[str, Any] = limits
        ) -> Plan:
            cycle = BillingCycle(data.get("billing_cycle", "monthly"), data.get("anchor_day", 1))
            return Plan(
                id=plan_id,
                name=data.get("name", plan_id),
                billing_cycle=cycle,
                limits=limits,
                rate_limit_rpm=data.get("rate_limit_rpm", -1),
                rate_limit_per_day=data.get("rate_limit_per_day", -1),
                credits_per_seat=data.get("credits_per_seat"),
            )

        try:
            plans.append(build())
        except ValidationError as exc:
            tail = exc.field.removeprefix("plan.")
            raise ValidationError(f"{field}.{tail}", exc.message) from None
    return tuple(plans)


def _organizations(items: object, plan_ids: set[str]) -> tuple[OrgPlan, ...]:
    orgs = []
    for org_id, raw in _table("organizations", items).items():
        field = f"organizations.{org_id}"
        data = _table(field, raw)
        _only(field, data, {"plan", "seats"})
        if data.get("plan") not in plan_ids:
            raise ValidationError(f"{field}.plan", f"unknown plan {data.get('plan')!r}")
        orgs.append(_wrap(field, lambda d=data, o=org_id: OrgPlan(o, d["plan"], d.get("seats", 1))))
    return tuple(orgs)


def _times(data: Any) -> Any:
    """TOML datetimes become Unix seconds (naive ones are refused: times are UTC)."""
    if isinstance(data, dict):
        return {k: _times(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_times(v) for v in data]
    if isinstance(data, dt.datetime):
        if data.tzinfo is None:
            raise ValidationError("effective_from", "datetime needs a UTC offset (e.g. ...Z)")
        return int(data.timestamp())
    return data


def load_config(path: str | os.PathLike[str]) -> Config:
    """Parse and validate a configuration file (nothing is opened or written)."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ValidationError("config", f"no such file: {os.fspath(path)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError("config", f"not valid TOML: {exc}") from None
    _only("", raw, _TOP)
    store = raw.get("store", "sqlite:///meterkit.db")
    if not isinstance(store, str) or "://" not in store:
        raise ValidationError("store", "must be a store URL such as 'sqlite:///meterkit.db'")
    counters = raw.get("counters")
    if counters is not None and (not isinstance(counters, str) or "://" not in counters):
        raise ValidationError("counters", "must be a URL such as 'redis://127.0.0.1:6379/0'")
    policy = raw.get("policy", "closed")
    if policy not in ("closed", "open"):
        raise ValidationError("policy", "must be 'closed' or 'open'")
    thresholds = raw.get("thresholds", [0.8, 1.0])
    if not isinstance(thresholds, list) or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in thresholds
    ):
        raise ValidationError("thresholds", "must be a list of fractions in (0, 1]")
    skew = raw.get("max_future_skew", 300)
    if isinstance(skew, bool) or not isinstance(skew, int) or skew < -1:
        raise ValidationError(
            "max_future_skew", "must be whole seconds >= 0, or -1 to accept any future time"
        )
    leases = raw.get("leases", True)
    if not isinstance(leases, bool):
        raise ValidationError("leases", "must be true or false")
    lease_ttl, flush_interval = check_timing(
        raw.get("lease_ttl", DEFAULT_TTL), raw.get("flush_interval", DEFAULT_FLUSH_INTERVAL)
    )
    plans = _plans(raw.get("plans", {}))
    default_plan = raw.get("default_plan")
    if default_plan is not None and default_plan not in {p.id for p in plans}:
        raise ValidationError("default_plan", f"unknown plan {default_plan!r}")
    prices = raw.get("prices", [])
    if not isinstance(prices, list) or not all(isinstance(p, dict) for p in prices):
        raise ValidationError("prices", "must be an array of tables ([[prices]])")
    kept = raw.get("retention", {})
    if not isinstance(kept, Mapping):
        raise ValidationError("retention", "must be a table of meter = days ([retention])")
    retention: list[tuple[str, int]] = []
    for name, days in kept.items():
        parsed = parse_retention(days, f"retention.{name}")
        assert parsed is not None  # TOML has no null
        retention.append((name, parsed))
    limits = _table("spend_limits", raw.get("spend_limits", {}))
    for org_id, cents in limits.items():
        try:
            check_id("spend_limits", org_id)
            check_cents(cents, f"spend_limits.{org_id}")
        except ValidationError as exc:
            raise ValidationError(f"spend_limits.{org_id}", exc.message) from None
    return Config(
        store=store,
        counters=counters,
        policy=policy,
        default_plan=default_plan,
        thresholds=tuple(float(t) for t in thresholds),
        max_future_skew=None if skew == -1 else skew,
        leases=leases,
        lease_ttl=lease_ttl,
        flush_interval=float(flush_interval),
        meters=_meters(raw.get("meters", [])),
        metrics=_metrics(raw.get("metrics", {})),
        prices=tuple(_times(p) for p in prices),
        plans=plans,
        organizations=_organizations(raw.get("organizations", {}), {p.id for p in plans}),
        retention=tuple(retention),
        notifiers=tuple(notifiers_from_config(_table("notify", raw.get("notify", {})))),
        spend_limits=tuple(sorted(limits.items())),
        lateness=parse_lateness(raw.get("lateness")),
    )
