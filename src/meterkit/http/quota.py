"""An organization's limits now, ``GET /v1/organization/quota``: each quota and gauge with
what is used, what remains and when it resets, its rate limits and its spend limit (what the
dashboard's gauges show; :func:`meterkit.summaries.quota_status`)."""

from __future__ import annotations

from typing import Any

from meterkit.http.core import Response, json_response
from meterkit.http.errors import METERKIT
from meterkit.http.routing import Call, Reply, Route, Surface, json_schema_ref

__all__ = ["SURFACE"]


def _quota(call: Call) -> Response:
    return json_response(call.meter.quota_status(call.organization_id))


_INT = {"type": "integer"}
_NULLABLE_INT = {"type": ["integer", "null"]}

SCHEMAS: dict[str, Any] = {
    "OrganizationQuota": {
        "type": "object",
        "properties": {
            "object": {"type": "string", "enum": ["organization.quota"]},
            "organization_id": {"type": "string"},
            "as_of": {**_INT, "description": "The moment these numbers are at (Unix seconds)."},
            "plan": {"type": ["string", "null"]},
            "period_start": _INT,
            "period_end": _INT,
            "limits": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "metric": {"type": "string"},
                        "kind": {"type": "string", "enum": ["period", "gauge"]},
                        "used": _INT,
                        "limit": {**_INT, "description": "-1: unlimited."},
                        "remaining": {**_INT, "description": "-1: unlimited."},
                        "reset_at": {**_NULLABLE_INT, "description": "null for gauges."},
                    },
                    "required": ["metric", "kind", "used", "limit", "remaining", "reset_at"],
                },
            },
            "rate_limits": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "window": {"type": "string", "enum": ["minute", "day"]},
                        "limit": _INT,
                    },
                    "required": ["window", "limit"],
                },
            },
            "spend_limit": {
                "anyOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "properties": {
                            "currency": {"type": "string"},
                            "used": {"type": "number"},
                            "limit": {"type": "number"},
                            "remaining": {"type": "number"},
                            "reset_at": _INT,
                            "enforcing": {"type": "boolean"},
                        },
                        "required": [
                            "currency",
                            "used",
                            "limit",
                            "remaining",
                            "reset_at",
                            "enforcing",
                        ],
                    },
                ]
            },
        },
        "required": [
            "object",
            "organization_id",
            "as_of",
            "plan",
            "period_start",
            "period_end",
            "limits",
            "rate_limits",
            "spend_limit",
        ],
    },
}

SURFACE = Surface(
    "quota",
    (
        Route(
            method="GET",
            path="/v1/organization/quota",
            handler=_quota,
            errors=METERKIT,
            operation_id="organization_quota",
            summary="Every limit of the caller's organization: used, remaining, resets.",
            description="The plan's period quotas and gauges, its rate limits and the spend "
            "limit, as the organization stands now.",
            tags=("account",),
            scope="usage:read",
            replies=(
                Reply(200, "The organization's limits.", json_schema_ref("OrganizationQuota")),
            ),
        ),
    ),
    SCHEMAS,
)
