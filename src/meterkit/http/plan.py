"""Plan usage, ``GET /api/v1/usage`` (docs/http.md, "Plan usage"): a FastAPI-shaped surface.

Errors are FastAPI's: a bad date is a 422 ``{"detail": [{"loc": ["query", "start_date"], ...}]}``,
a missing token a 401 ``{"detail": "Not authenticated"}``.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from meterkit.errors import ValidationError
from meterkit.http.core import Response, json_response
from meterkit.http.errors import FASTAPI, ParamError
from meterkit.http.params import one
from meterkit.http.routing import Call, Param, Reply, Route, Surface, json_schema_ref

__all__ = ["SURFACE"]

_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _date(call: Call, name: str) -> dt.date | None:
    raw = one(call.request, name)
    if raw is None:
        return None
    try:
        if _DATE_RE.fullmatch(raw):
            return dt.date.fromisoformat(raw)
    except ValueError:
        pass
    # pydantic's wording and type for a bad ``date`` field, which FastAPI passes through.
    raise ParamError(
        name,
        "Input should be a valid date in the format YYYY-MM-DD",
        type="date_from_datetime_parsing",
        input=raw[:200],
    )


def _usage(call: Call) -> Response:
    start, end = _date(call, "start_date"), _date(call, "end_date")
    try:
        # The rules (range, order) live once, in Meter.plan_usage; only the input is added.
        usage = call.meter.plan_usage(call.organization_id, start, end)
    except ValidationError as exc:
        if exc.field not in ("start_date", "end_date"):
            raise
        raise ParamError(exc.field, exc.message, input=one(call.request, exc.field)) from None
    return json_response(usage)


def _metric() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Used / limit / remaining; a limit of -1 means unlimited.",
        "properties": {n: {"type": "integer"} for n in ("used", "limit", "remaining")},
        "required": ["used", "limit", "remaining"],
    }


SCHEMAS: dict[str, Any] = {
    "UsageMetric": _metric(),
    "PlanUsage": {
        "type": "object",
        "properties": {
            "plan": {"type": "string"},
            "period_start": {"type": "string", "format": "date"},
            "period_end": {"type": "string", "format": "date"},
            "tokens": json_schema_ref("UsageMetric"),
            "queries": json_schema_ref("UsageMetric"),
            "spaces": json_schema_ref("UsageMetric"),
            "rate_limit_rpm": {"type": "integer"},
            "rate_limit_per_day": {"type": "integer"},
        },
        # Every other metric the plan limits, by its name.
        "additionalProperties": json_schema_ref("UsageMetric"),
        "required": [
            "plan",
            "period_start",
            "period_end",
            "tokens",
            "queries",
            "spaces",
            "rate_limit_rpm",
            "rate_limit_per_day",
        ],
    },
}

_DATE = {
    "type": "string",
    "format": "date",
    # 1970-01-01 to 9999-12-30: every day of it ends within the Unix seconds meterkit keeps.
    "pattern": "^(19[7-9][0-9]|[2-9][0-9]{3})-[0-9]{2}-[0-9]{2}$",
    "not": {"const": "9999-12-31"},
}

SURFACE = Surface(
    "plan",
    (
        Route(
            method="GET",
            path="/api/v1/usage",
            handler=_usage,
            errors=FASTAPI,
            operation_id="get_usage_api_v1_usage_get",
            summary="Org-level usage for the active billing period and the plan's limits.",
            tags=("plan",),
            scope="usage:read",
            params=(
                Param("start_date", _DATE, "Start date, inclusive (default: 1st of this month)."),
                Param("end_date", _DATE, "End date, inclusive (default: today, UTC)."),
            ),
            replies=(
                Reply(200, "Successful Response", json_schema_ref("PlanUsage")),
                Reply(422, "Validation Error", json_schema_ref("HTTPValidationError")),
            ),
        ),
    ),
    SCHEMAS,
)
