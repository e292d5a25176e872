"""meterkit: embeddable usage metering — buckets, costs and quotas."""

from meterkit.errors import MeterkitError, QuotaExceeded, StoreUnavailable, ValidationError
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

__all__ = [
    "AppendResult",
    "Bucket",
    "Dimension",
    "Event",
    "Measure",
    "Meter",
    "MeterSpec",
    "MeterkitError",
    "QuotaExceeded",
    "Result",
    "StoreUnavailable",
    "UsagePage",
    "UsageQuery",
    "ValidationError",
    "hookimpl",
]

__version__ = "0.1.0"
