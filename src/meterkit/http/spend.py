"""Spend limit and spend alerts, in the official SDK's shapes (``client.admin.organization``).

``/v1/organization/spend_limit`` (GET, POST to create or replace, DELETE) and
``/v1/organization/spend_alerts`` (POST to create, GET to list in cursor pages) with
``/v1/organization/spend_alerts/{alert_id}`` (GET, POST to update, DELETE). Admin keys only,
as OpenAI secures them; errors in the OpenAI shape. The rules live in :mod:`meterkit.spend`.
"""

from __future__ import annotations

from typing import Any

from meterkit.http import fields
from meterkit.http.core import Response, json_response
from meterkit.http.errors import OPENAI, HttpError
from meterkit.http.params import json_body, one
from meterkit.http.routing import Call, Param, Reply, Route, Surface, json_schema_ref
from meterkit.ids import new_id

__all__ = ["SURFACE"]

WRITE = "usage:write"
READ = "usage:read"
MAX_PAGE = 100


def _body(call: Call) -> dict[str, Any]:
    data = json_body(call.request)
    if not isinstance(data, dict):
        raise HttpError(400, "The body must be a JSON object.", code="invalid_body")
    return data


def _no_limit(org: str) -> HttpError:
    return HttpError(404, f"Organization {org} has no spend limit.", code="not_found")


def _limit(call: Call) -> Response:
    state = call.meter.spend(call.organization_id)
    if state.limit is None:
        raise _no_limit(call.organization_id)
    return json_response(state.to_dict())


def _update_limit(call: Call) -> Response:
    data = _body(call)
    state = call.meter.set_spend_limit(
        call.organization_id,
        data.get("threshold_amount"),  # type: ignore[arg-type]  # checked there, by name
        currency=data.get("currency"),  # type: ignore[arg-type]
        interval=data.get("interval"),  # type: ignore[arg-type]
    )
    return json_response(state.to_dict())


def _delete_limit(call: Call) -> Response:
    if not call.meter.delete_spend_limit(call.organization_id):
        if call.meter.spend_cap(call.organization_id) is not None:
            raise HttpError(
                403,
                "This organization's spend limit is set by the operator of this service and "
                "cannot be removed with an API key.",
                code="spend_limit_set_by_operator",
            )
        raise _no_limit(call.organization_id)
    return json_response({"object": "organization.spend_limit.deleted", "deleted": True})


def _alert_id(call: Call) -> str:
    alert_id = call.path_params["alert_id"]
    if call.meter.spend_alert(call.organization_id, alert_id) is None:
        raise HttpError(404, f"No spend alert found with id '{alert_id[:100]}'.", code="not_found")
    return alert_id


def _create_alert(call: Call) -> Response:
    alert = call.meter.put_spend_alert(call.organization_id, new_id("spalert"), _body(call))
    return json_response(alert.to_dict())


def _update_alert(call: Call) -> Response:
    alert_id = _alert_id(call)
    data = _body(call)
    return json_response(call.meter.put_spend_alert(call.organization_id, alert_id, data).to_dict())


def _get_alert(call: Call) -> Response:
    alert = call.meter.spend_alert(call.organization_id, _alert_id(call))
    assert alert is not None
    return json_response(alert.to_dict())


def _delete_alert(call: Call) -> Response:
    alert_id = _alert_id(call)
    call.meter.delete_spend_alert(call.organization_id, alert_id)
    return json_response(
        {"object": "organization.spend_alert.deleted", "id": alert_id, "deleted": True}
    )


def _page_size(call: Call) -> int:
    raw = one(call.request, "limit")
    if raw is None:
        return 20
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise HttpError(400, f"limit must be a whole number from 1 to {MAX_PAGE}.", param="limit")
    return int(raw)


def _list_alerts(call: Call) -> Response:
    size = _page_size(call)
    order = one(call.request, "order")
    order = "asc" if order is None else order
    if order not in ("asc", "desc"):
        raise HttpError(400, "order must be 'asc' or 'desc'.", param="order")
    alerts = call.meter.spend_alerts(call.organization_id)
    if order == "desc":
        alerts.reverse()
    ids = [a.id for a in alerts]
    after, before = one(call.request, "after"), one(call.request, "before")
    start, end = 0, len(alerts)
    for name, cursor in (("after", after), ("before", before)):
        if cursor is not None and cursor not in ids:
            message = f"{name} is not a spend alert id of this organization."
            raise HttpError(400, message, param=name)
    if after is not None:
        start = ids.index(after) + 1
    if before is not None:
        end = ids.index(before)
        start = max(start, end - size) if after is None else start
    window = alerts[start:end][:size]
    has_more = start + len(window) < end
    return json_response(
        {
            "object": "list",
            "data": [a.to_dict() for a in window],
            "first_id": window[0].id if window else None,
            "last_id": window[-1].id if window else None,
            "has_more": has_more,
        }
    )


_ALERT_ID = (Param("alert_id", fields.ID, "The spend alert's id.", location="path"),)

SCHEMAS: dict[str, Any] = {
    "OrganizationSpendLimit": {
        "type": "object",
        "properties": {
            "object": {"type": "string", "enum": ["organization.spend_limit"]},
            "currency": {"type": "string", "enum": ["USD"]},
            "interval": {"type": "string", "enum": ["month"]},
            "threshold_amount": {"type": "integer", "description": "In cents."},
            "enforcement": {
                "type": "object",
                "properties": {"status": {"type": "string", "enum": ["inactive", "enforcing"]}},
                "required": ["status"],
            },
        },
        "required": ["object", "currency", "interval", "threshold_amount", "enforcement"],
    },
    "SpendLimitUpdate": {
        "type": "object",
        "properties": {
            "currency": {"type": "string", "enum": ["USD"]},
            "interval": {"type": "string", "enum": ["month"]},
            "threshold_amount": fields.CENTS,
        },
        "required": ["currency", "interval", "threshold_amount"],
    },
    "SpendAlertNotificationChannel": {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": ["email"]},
            "recipients": fields.RECIPIENTS,
            "subject_prefix": {"anyOf": [{"type": "null"}, {**fields.ONE_LINE, "maxLength": 200}]},
        },
        "required": ["type", "recipients"],
    },
    "SpendAlertWrite": {
        "type": "object",
        "properties": {
            "currency": {"type": "string", "enum": ["USD"]},
            "interval": {"type": "string", "enum": ["month"]},
            "threshold_amount": fields.CENTS,
            "notification_channel": json_schema_ref("SpendAlertNotificationChannel"),
        },
        "required": ["currency", "interval", "threshold_amount", "notification_channel"],
    },
    "OrganizationSpendAlert": {
        "type": "object",
        "properties": {
            "object": {"type": "string", "enum": ["organization.spend_alert"]},
            "id": {"type": "string"},
            "currency": {"type": "string", "enum": ["USD"]},
            "interval": {"type": "string", "enum": ["month"]},
            "threshold_amount": {"type": "integer"},
            "notification_channel": json_schema_ref("SpendAlertNotificationChannel"),
        },
        "required": [
            "object",
            "id",
            "currency",
            "interval",
            "threshold_amount",
            "notification_channel",
        ],
    },
    "OrganizationSpendAlertList": {
        "type": "object",
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": json_schema_ref("OrganizationSpendAlert")},
            "first_id": {"type": ["string", "null"]},
            "last_id": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"},
        },
        "required": ["object", "data", "first_id", "last_id", "has_more"],
    },
    "Deleted": {
        "type": "object",
        "properties": {
            "object": {"type": "string"},
            "id": {"type": "string"},
            "deleted": {"type": "boolean"},
        },
        "required": ["object", "deleted"],
    },
}


def _route(
    method: str,
    path: str,
    handler: Any,
    operation_id: str,
    summary: str,
    reply: str,
    *,
    body: str | None = None,
    params: tuple[Param, ...] = (),
    scope: str = WRITE,
) -> Route:
    replies = [Reply(200, summary, json_schema_ref(reply))]
    if body is not None or params:
        replies.append(Reply(400, "A bad field, named in error.param.", json_schema_ref("Error")))
    if "{" in path or (method in ("GET", "DELETE") and "limit" in path):
        replies.append(Reply(404, "Nothing of that id.", json_schema_ref("Error")))
    if method == "DELETE" and path == _LIMIT:
        replies.append(
            Reply(
                403,
                "Only the operator's cap is set: an API key cannot lift it.",
                json_schema_ref("Error"),
            )
        )
    return Route(
        method=method,
        path=path,
        handler=handler,
        errors=OPENAI,
        operation_id=operation_id,
        summary=summary,
        tags=("spend",),
        scope=scope,
        admin=True,
        params=params,
        body=None if body is None else {"application/json": json_schema_ref(body)},
        replies=tuple(replies),
    )


_LIMIT = "/v1/organization/spend_limit"
_ALERTS = "/v1/organization/spend_alerts"
_ALERT = _ALERTS + "/{alert_id}"
_STRING = {"type": "string"}

SURFACE = Surface(
    "spend",
    (
        _route(
            "GET",
            _LIMIT,
            _limit,
            "spend_limit_retrieve",
            "The hard spend limit.",
            "OrganizationSpendLimit",
            scope=READ,
        ),
        _route(
            "POST",
            _LIMIT,
            _update_limit,
            "spend_limit_update",
            "Create or replace the hard spend limit.",
            "OrganizationSpendLimit",
            body="SpendLimitUpdate",
        ),
        _route(
            "DELETE",
            _LIMIT,
            _delete_limit,
            "spend_limit_delete",
            "Delete the hard spend limit.",
            "Deleted",
        ),
        _route(
            "POST",
            _ALERTS,
            _create_alert,
            "spend_alerts_create",
            "Create a spend alert.",
            "OrganizationSpendAlert",
            body="SpendAlertWrite",
        ),
        _route(
            "GET",
            _ALERTS,
            _list_alerts,
            "spend_alerts_list",
            "A page of spend alerts.",
            "OrganizationSpendAlertList",
            scope=READ,
            params=(
                Param("after", _STRING, "The id after which the page starts."),
                Param("before", _STRING, "The id before which the page ends."),
                Param(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 20},
                    "Alerts per page.",
                ),
                Param(
                    "order",
                    {"type": "string", "enum": ["asc", "desc"]},
                    "Oldest first (asc, the default) or newest first.",
                ),
            ),
        ),
        _route(
            "GET",
            _ALERT,
            _get_alert,
            "spend_alerts_retrieve",
            "One spend alert.",
            "OrganizationSpendAlert",
            params=_ALERT_ID,
            scope=READ,
        ),
        _route(
            "POST",
            _ALERT,
            _update_alert,
            "spend_alerts_update",
            "Update a spend alert.",
            "OrganizationSpendAlert",
            body="SpendAlertWrite",
            params=_ALERT_ID,
        ),
        _route(
            "DELETE",
            _ALERT,
            _delete_alert,
            "spend_alerts_delete",
            "Delete a spend alert.",
            "Deleted",
            params=_ALERT_ID,
        ),
    ),
    SCHEMAS,
)
