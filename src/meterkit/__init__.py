"""meterkit: embeddable usage metering — buckets, costs and quotas."""

from meterkit.errors import (
    EventConflict,
    LateEventError,
    MeterkitError,
    PeriodClosed,
    QuotaExceeded,
    RetentionError,
    StoreUnavailable,
    ValidationError,
)
from meterkit.hookspecs import hookimpl
from meterkit.meter import Meter
from meterkit.models import (
    AppendResult,
    Bucket,
    Dimension,
    Event,
    Measure,
    MeterSpec,
    Result,
    UsagePage,
    UsageQuery,
)
from meterkit.periods import BillingCycle, Period
from meterkit.planmetrics import Metric, Source
from meterkit.plans import Grant, OrgPlan, Plan
from meterkit.quotas import Decision, LimitState, Reservation

__all__ = [
    "AppendResult",
    "BillingCycle",
    "Bucket",
    "Decision",
    "Dimension",
    "Event",
    "EventConflict",
    "Grant",
    "LateEventError",
    "LimitState",
    "Measure",
    "Meter",
    "MeterSpec",
    "MeterkitError",
    "Metric",
    "OrgPlan",
    "Period",
    "PeriodClosed",
    "Plan",
    "QuotaExceeded",
    "Reservation",
    "Result",
    "RetentionError",
    "Source",
    "StoreUnavailable",
    "UsagePage",
    "UsageQuery",
    "ValidationError",
    "hookimpl",
]

__version__ = "0.1.0"
