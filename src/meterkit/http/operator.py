"""The operator's endpoints, ``/v1/operator/...``: plans, assignments, credit grants and the
spend cap of any organization, for a key with the ``operator`` scope (docs/http.md, "Operator").

An organization's own keys never carry that scope unless the operator gave it: an admin key
with ``usage:write`` sets its organization's own spend limit at or under the cap
(:mod:`meterkit.http.spend`), and gets 403 here. Errors are meterkit's own shape: an invalid
field is 422 naming it, and nothing is changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from meterkit.errors import ValidationError
from meterkit.http import fields
from meterkit.http.core import Response, json_response
from meterkit.http.errors import METERKIT, HttpError
from meterkit.http.params import json_body
from meterkit.http.routing import Call, Param, Reply, Route, Surface, json_schema_ref
from meterkit.plans import PLAN_FIELDS, UNLIMITED, Plan
from meterkit.validate import MAX_TIME, MAX_VALUE, check_id

__all__ = ["OPERATOR", "SURFACE"]

OPERATOR = "operator"
"""The scope of the operator's keys (``meterkit keys create ORG --scopes operator``)."""


def _body(call: Call, allowed: tuple[str, ...]) -> dict[str, Any]:
    data = json_body(call.request)
    if not isinstance(data, dict):
        raise HttpError(400, "The body must be a JSON object.", code="invalid_body")
    for name in data:
        if name not in allowed:
            raise ValidationError(str(name)[:100], f"unknown field; known: {', '.join(allowed)}")
    return data


def _org(call: Call) -> str:
    return check_id("organization_id", call.path_params["organization_id"])


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {"object": "plan", "id": plan.id, **plan.to_record()}


def _get_plan(call: Call) -> Response:
    plan_id = check_id("plan_id", call.path_params["plan_id"])
    plan = call.meter.get_plan(plan_id)
    if plan is None:
        raise HttpError(404, f"No plan {plan_id}.", code="not_found")
    return json_response(_plan_json(plan))


def _put_plan(call: Call) -> Response:
    plan_id = check_id("plan_id", call.path_params["plan_id"])
    data = _body(call, PLAN_FIELDS)
    if not isinstance(data.get("limits", {}), Mapping):
        raise ValidationError("limits", "must be an object of metric to limit")
    # Plan checks every field, by name, before the store is touched.
    return json_response(_plan_json(call.meter.set_plan(Plan.from_record(plan_id, data))))


def _assignment(call: Call) -> Response:
    org = _org(call)
    assignment, _plan = call.meter.plan_of(org)
    if assignment is None:
        raise HttpError(404, f"Organization {org} has no plan.", code="not_found")
    return json_response(_assignment_json(org, assignment.plan, assignment.seats))


def _assignment_json(org: str, plan: str, seats: int) -> dict[str, Any]:
    return {"object": "organization.plan", "organization_id": org, "plan": plan, "seats": seats}


def _assign(call: Call) -> Response:
    org = _org(call)
    data = _body(call, ("plan", "seats"))
    plan, seats = data.get("plan"), data.get("seats", 1)
    if not isinstance(plan, str):
        raise ValidationError("plan", "must be a plan id")
    if isinstance(seats, bool) or not isinstance(seats, int) or seats < 1:
        raise ValidationError("seats", "must be a whole number, at least 1")
    done = call.meter.assign_plan(org, plan, seats=seats)
    return json_response(_assignment_json(org, done.plan, done.seats))


def _grant(call: Call) -> Response:
    org = _org(call)
    data = _body(call, ("id", "credits", "expires_at"))
    grant_id = data.get("id")
    if grant_id is not None:
        # The same id sent again replaces the grant, never adds a second: a retry is safe.
        check_id("id", grant_id)
    grant = call.meter.grant_credits(
        org,
        data.get("credits"),  # type: ignore[arg-type]  # checked there, by name
        expires_at=data.get("expires_at"),
        id=grant_id,
    )
    return json_response(
        {
            "object": "organization.credit_grant",
            "id": grant.id,
            "organization_id": org,
            "credits": grant.credits,
            "granted_at": grant.granted_at,
            "expires_at": grant.expires_at,
        }
    )


def _cap_json(org: str, cents: int | None) -> dict[str, Any]:
    return {"object": "organization.spend_cap", "organization_id": org, "threshold_amount": cents}


def _get_cap(call: Call) -> Response:
    org = _org(call)
    cents = call.meter.spend_cap(org)
    if cents is None:
        raise HttpError(404, f"Organization {org} has no spend cap.", code="not_found")
    return json_response(_cap_json(org, cents))


def _put_cap(call: Call) -> Response:
    org = _org(call)
    data = _body(call, ("threshold_amount",))
    call.meter.set_spend_cap(org, data.get("threshold_amount"))  # type: ignore[arg-type]
    return json_response(_cap_json(org, call.meter.spend_cap(org)))


def _delete_cap(call: Call) -> Response:
    org = _org(call)
    if not call.meter.delete_spend_cap(org):
        raise HttpError(404, f"Organization {org} has no spend cap.", code="not_found")
    return json_response({"object": "organization.spend_cap.deleted", "deleted": True})


_ORG = Param("organization_id", fields.ID, "The organization.", location="path")
_PLAN = Param("plan_id", fields.ID, "The plan.", location="path")
_OBJECT: dict[str, Any] = {"type": "object"}
_LIMIT: dict[str, Any] = {
    "type": "integer",
    "minimum": UNLIMITED,
    "maximum": MAX_VALUE,
    "description": "-1: unlimited.",
}

SCHEMAS: dict[str, Any] = {
    "OperatorPlan": {
        "type": "object",
        "properties": {
            "name": {"anyOf": [{"const": ""}, fields.TEXT]},
            "billing_cycle": {"type": "string", "enum": ["monthly", "daily"]},
            "anchor_day": {"type": "integer", "minimum": 1, "maximum": 31},
            "limits": {
                "type": "object",
                "propertyNames": fields.METRIC,
                "additionalProperties": _LIMIT,
            },
            "rate_limit_rpm": _LIMIT,
            "rate_limit_per_day": _LIMIT,
            "credits_per_seat": {"anyOf": [{"type": "null"}, _LIMIT]},
        },
        "additionalProperties": False,
    },
    "OperatorAssignment": {
        "type": "object",
        "properties": {
            "plan": fields.ID,
            "seats": {"type": "integer", "minimum": 1, "maximum": MAX_VALUE},
        },
        "required": ["plan"],
        "additionalProperties": False,
    },
    "OperatorGrant": {
        "type": "object",
        "properties": {
            "id": {"anyOf": [{"type": "null"}, fields.ID]},
            "credits": {"type": "integer", "minimum": 1, "maximum": MAX_VALUE},
            "expires_at": {
                "anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": MAX_TIME}]
            },
        },
        "required": ["credits"],
        "additionalProperties": False,
    },
    "OperatorSpendCap": {
        "type": "object",
        "properties": {"threshold_amount": fields.CENTS},
        "required": ["threshold_amount"],
        "additionalProperties": False,
    },
}

_PLANS = "/v1/operator/plans/{plan_id}"
_ORGS = "/v1/operator/organizations/{organization_id}"


def _route(
    method: str,
    path: str,
    handler: Callable[[Call], Response],
    operation_id: str,
    summary: str,
    body: str | None = None,
) -> Route:
    replies = [Reply(200, summary, _OBJECT)]
    if body is not None:
        replies.append(Reply(422, "A bad field, named in error.param.", json_schema_ref("Error")))
    if method != "PUT" and body is None:
        replies.append(Reply(404, "Nothing there.", json_schema_ref("Error")))
    return Route(
        method=method,
        path=path,
        handler=handler,
        errors=METERKIT,
        operation_id=operation_id,
        summary=summary,
        tags=("operator",),
        scope=OPERATOR,
        admin=True,
        params=(_PLAN,) if "{plan_id}" in path else (_ORG,),
        body=None if body is None else {"application/json": json_schema_ref(body)},
        replies=tuple(replies),
    )


SURFACE = Surface(
    "operator",
    (
        _route("GET", _PLANS, _get_plan, "operator_plan_retrieve", "A plan."),
        _route(
            "PUT",
            _PLANS,
            _put_plan,
            "operator_plan_put",
            "Create or replace a plan.",
            "OperatorPlan",
        ),
        _route("GET", _ORGS + "/plan", _assignment, "operator_assignment", "The plan assigned."),
        _route(
            "PUT",
            _ORGS + "/plan",
            _assign,
            "operator_assign",
            "Put the organization on a plan.",
            "OperatorAssignment",
        ),
        _route(
            "POST",
            _ORGS + "/credit_grants",
            _grant,
            "operator_grant",
            "Grant credits (an id sent again replaces that grant).",
            "OperatorGrant",
        ),
        _route("GET", _ORGS + "/spend_cap", _get_cap, "operator_cap", "The spend cap, in cents."),
        _route(
            "PUT",
            _ORGS + "/spend_cap",
            _put_cap,
            "operator_cap_put",
            "Set the spend cap, in cents per UTC month.",
            "OperatorSpendCap",
        ),
        _route("DELETE", _ORGS + "/spend_cap", _delete_cap, "operator_cap_delete", "Remove it."),
    ),
    SCHEMAS,
)
