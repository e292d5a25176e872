"""An organization's limits now, ``GET /v1/organization/quota``: each quota and gauge with
what is used, what remains and when it resets, its rate limits and its spend limit (what the
dashboard's gauges show; :func:`meterkit.summaries.quota_status`); and its usage meters,
``GET /v1/organization/meters``, those in use first (the dashboard's meter list)."""

from __future__ import annotations

from typing import Any

from meterkit.http.core import Response, json_response
from meterkit.http.errors import METERKIT
from meterkit.http.openai import ENDPOINTS
from meterkit.http.routing import Call, Reply, Route, Surface, json_schema_ref
from meterkit.summaries import organization_meters

__all__ = ["SURFACE"]


def _quota(call: Call) -> Response:
    return json_response(call.meter.quota_status(call.organization_id))


_USAGE = {e.name: e for e in ENDPOINTS if not e.costs}


def _meters(call: Call) -> Response:
    listed = organization_meters(call.meter, call.organization_id, _USAGE)
    for line in listed["data"]:
        endpoint = _USAGE[line["name"]]
        line["path"] = endpoint.path
        line["group_by"] = list(endpoint.group_by)
    return json_response(listed)


_INT = {"type": "integer"}
_STR = {"type": "string"}
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
                        "unit": {
                            "type": "string",
                            "description": "What the metric counts in: bytes, tokens, requests...",
                        },
                        "kind": {"type": "string", "enum": ["period", "gauge"]},
                        "used": _INT,
                        "limit": {**_INT, "description": "-1: unlimited."},
                        "remaining": {**_INT, "description": "-1: unlimited."},
                        "reset_at": {**_NULLABLE_INT, "description": "null for gauges."},
                    },
                    "required": [
                        "metric",
                        "unit",
                        "kind",
                        "used",
                        "limit",
                        "remaining",
                        "reset_at",
                    ],
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
    "OrganizationMeters": {
        "type": "object",
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "organization_id": _STR,
            "as_of": _INT,
            "days": {**_INT, "description": "How far back in_use looks, in days."},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "object": {"type": "string", "enum": ["organization.meter"]},
                        "name": _STR,
                        "path": {**_STR, "description": "Where its usage is served."},
                        "in_use": {"type": "boolean"},
                        "limited": {
                            "type": "boolean",
                            "description": "A limit of the organization's plan counts it.",
                        },
                        "group_by": {"type": "array", "items": _STR},
                        "measures": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "name": _STR,
                                    "unit": _STR,
                                    "gauge": {
                                        "type": "boolean",
                                        "description": "A level (never summed over time).",
                                    },
                                },
                                "required": ["name", "unit", "gauge"],
                            },
                        },
                    },
                    "required": [
                        "object",
                        "name",
                        "path",
                        "in_use",
                        "limited",
                        "group_by",
                        "measures",
                    ],
                },
            },
        },
        "required": ["object", "organization_id", "as_of", "days", "data"],
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
        Route(
            method="GET",
            path="/v1/organization/meters",
            handler=_meters,
            errors=METERKIT,
            operation_id="organization_meters",
            summary="The usage meters of the caller's organization, those in use first.",
            description="Each usage kind served under /v1/organization/usage/, with its "
            "measures' units and whether each is a gauge; those with usage in the last 30 "
            "days, or counted by a limit of the plan, come first.",
            tags=("account",),
            scope="usage:read",
            replies=(
                Reply(200, "The organization's meters.", json_schema_ref("OrganizationMeters")),
            ),
        ),
    ),
    SCHEMAS,
)
