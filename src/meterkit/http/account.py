"""Account usage, ``GET /v1/usage`` (docs/http.md, "Account usage"): storage, credits and
plan, camelCase.

What a caller sees depends on the key's role: admins also get the purchased credit balance
and the seats; for members those keys are absent (not null).
"""

from __future__ import annotations

from typing import Any

from meterkit.http.core import Response, json_response
from meterkit.http.errors import METERKIT
from meterkit.http.routing import Call, Reply, Route, Surface, json_schema_ref

__all__ = ["SURFACE"]


def _usage(call: Call) -> Response:
    role = "admin" if call.caller.is_admin else "member"
    return json_response(call.meter.account_usage(call.organization_id, role))


def _obj(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


_INT = {"type": "integer"}
_STR = {"type": "string"}

SCHEMAS: dict[str, Any] = {
    "AccountUsage": _obj(
        {
            "storage": _obj({"used": _INT, "limit": _INT}, ["used", "limit"]),
            "credits": _obj(
                {
                    "used": _INT,
                    "limit": _INT,
                    "available": _INT,
                    "billingPeriod": _STR,
                    "periodStart": {"type": "string", "format": "date-time"},
                    "periodEnd": {"type": "string", "format": "date-time"},
                    "purchasedBalance": {**_INT, "description": "Admins only."},
                },
                ["used", "limit", "available", "billingPeriod", "periodStart", "periodEnd"],
            ),
            "plan": _obj(
                {"tier": _STR, "name": _STR, "billingCycle": _STR}, ["tier", "name", "billingCycle"]
            ),
            "seats": {
                **_obj(
                    {"count": _INT, "creditsPerSeat": {"type": ["integer", "null"]}},
                    ["count", "creditsPerSeat"],
                ),
                "description": "Admins only.",
            },
        },
        ["storage", "credits", "plan"],
    ),
}

SURFACE = Surface(
    "account",
    (
        Route(
            method="GET",
            path="/v1/usage",
            handler=_usage,
            errors=METERKIT,
            operation_id="account_usage",
            summary="Storage, credits and subscription of the caller's organization.",
            description="Admins also see the purchased credit balance, the seat count and the "
            "credits per seat; members never do (the fields are absent).",
            tags=("account",),
            scope="usage:read",
            replies=(Reply(200, "The organization's usage.", json_schema_ref("AccountUsage")),),
        ),
    ),
    SCHEMAS,
)
