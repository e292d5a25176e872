"""The operations API (docs/http.md, "Operations"): ``POST /v1/op/{operation_id}`` and
``POST /v1/{resource}/{action}``, JSON body in, NDJSON out.

:data:`OPERATIONS` drives both path forms. The body's ``organization_id`` must be the key's
own organization: any other is a 403, whether or not that organization exists, and never
data. An unknown operation is a 404 (after authentication, so it reveals nothing either).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from meterkit.errors import ValidationError
from meterkit.http import fields
from meterkit.http.core import Response, ndjson_response
from meterkit.http.errors import METERKIT, HttpError
from meterkit.http.params import json_body
from meterkit.http.routing import Call, Param, Reply, Route, Surface, json_schema_ref
from meterkit.validate import MAX_VALUE, check_id

if TYPE_CHECKING:
    from meterkit.meter import Meter

__all__ = ["OPERATIONS", "SURFACE", "Operation"]

NDJSON = "application/x-ndjson"
Rows = list[dict[str, Any]]


@attrs.frozen
class Operation:
    """One operation: its id (``resource.action``), what it needs, and what it runs."""

    id: str
    summary: str
    scope: str
    run: Callable[[Meter, str, Mapping[str, Any], str], Rows]  # meter, org, body, caller
    fields: Mapping[str, Mapping[str, Any]]
    result: str
    admin: bool = False
    required: tuple[str, ...] = ()
    rules: Mapping[str, Any] = attrs.field(factory=dict)  # more JSON Schema for the body

    @property
    def paths(self) -> tuple[str, str]:
        resource, action = self.id.split(".", 1)
        return f"/v1/op/{self.id}", f"/v1/{resource}/{action}"


def _current(meter: Meter, org: str, _body: Mapping[str, Any], _caller: str) -> Rows:
    return [meter.current_usage(org)]


def _history(meter: Meter, org: str, body: Mapping[str, Any], _caller: str) -> Rows:
    return meter.usage_history(org, body.get("months", 6))


def _recalculate(meter: Meter, org: str, _body: Mapping[str, Any], _caller: str) -> Rows:
    return [meter.recalculate_storage(org)]


def _put_asset(meter: Meter, org: str, body: Mapping[str, Any], _caller: str) -> Rows:
    return [meter.put_asset(org, body.get("resource"), body.get("bytes")).to_dict()]  # type: ignore[arg-type]


def _delete_asset(meter: Meter, org: str, body: Mapping[str, Any], _caller: str) -> Rows:
    resource = body.get("resource")
    deleted = meter.delete_asset(org, resource)  # type: ignore[arg-type]
    return [{"organization_id": org, "resource": resource, "deleted": deleted}]


def _list_assets(meter: Meter, org: str, _body: Mapping[str, Any], _caller: str) -> Rows:
    return [asset.to_dict() for asset in meter.assets(org)]


def _void(meter: Meter, org: str, body: Mapping[str, Any], caller: str) -> Rows:
    done = meter.void(
        body.get("meter"),  # type: ignore[arg-type]  # each is checked there, by name
        org,
        body.get("event_id"),  # type: ignore[arg-type]
        reason=body.get("reason"),  # type: ignore[arg-type]
        actor=caller,
    )
    return [done.to_dict()]


def _amend(meter: Meter, org: str, body: Mapping[str, Any], caller: str) -> Rows:
    done = meter.amend(
        body.get("meter"),  # type: ignore[arg-type]
        org,
        body.get("event_id"),  # type: ignore[arg-type]
        values=body.get("values"),
        dimensions=body.get("dimensions"),
        reason=body.get("reason"),  # type: ignore[arg-type]
        actor=caller,
    )
    return [done.to_dict()]


def _list_corrections(meter: Meter, org: str, body: Mapping[str, Any], _caller: str) -> Rows:
    return [
        c.to_dict()
        for c in meter.corrections(org, meter=body.get("meter"), event_id=body.get("event_id"))
    ]


_ORG = {"organization_id": fields.ID}
_CORRECTED = {
    "meter": {**fields.METER, "description": "The event's meter."},
    "event_id": {**fields.ID, "description": "The event's id."},
    "reason": {**fields.TEXT, "description": "Why (kept in the audit trail)."},
}
_RESOURCE = {"resource": {**fields.ID, "description": "The asset's name."}}

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "usage.current",
        "Usage for the current billing period: storage, tiles, credits, jobs.",
        "usage:read",
        _current,
        _ORG,
        "UsageCurrent",
    ),
    Operation(
        "usage.history",
        "Tile requests and peak storage per month for the past N months (one line each).",
        "usage:read",
        _history,
        {**_ORG, "months": {"type": "integer", "minimum": 1, "maximum": 120, "default": 6}},
        "UsageHistoryMonth",
    ),
    Operation(
        "usage.recalculate_storage",
        "Recompute the organization's storage from its actual stored assets (org admin).",
        "usage:write",
        _recalculate,
        _ORG,
        "StorageRecalculated",
        admin=True,
    ),
    Operation(
        "assets.put",
        "Register (or resize) a stored asset of the organization: storage recalculation's "
        "source when no plugin reports assets (org admin).",
        "usage:write",
        _put_asset,
        {**_ORG, **_RESOURCE, "bytes": {"type": "integer", "minimum": 0, "maximum": MAX_VALUE}},
        "Asset",
        admin=True,
        required=("resource", "bytes"),
    ),
    Operation(
        "assets.delete",
        "Forget a stored asset of the organization (org admin).",
        "usage:write",
        _delete_asset,
        {**_ORG, **_RESOURCE},
        "AssetDeleted",
        admin=True,
        required=("resource",),
    ),
    Operation(
        "assets.list",
        "The organization's registered stored assets, one line each.",
        "usage:read",
        _list_assets,
        _ORG,
        "Asset",
    ),
    Operation(
        "corrections.void",
        "Void a stored event: it counts for nothing any more; the key that asked is the "
        "correction's actor (org admin).",
        "usage:write",
        _void,
        {**_ORG, **_CORRECTED},
        "Correction",
        admin=True,
        required=("meter", "event_id", "reason"),
    ),
    Operation(
        "corrections.amend",
        "Give a stored event new values and/or dimensions (each replaced whole); the key "
        "that asked is the correction's actor (org admin).",
        "usage:write",
        _amend,
        {
            **_ORG,
            **_CORRECTED,
            "values": {
                "type": "object",
                "additionalProperties": {"type": "number", "minimum": 0, "maximum": MAX_VALUE},
            },
            "dimensions": {"type": "object"},
        },
        "Correction",
        admin=True,
        required=("meter", "event_id", "reason"),
        rules={"anyOf": [{"required": ["values"]}, {"required": ["dimensions"]}]},
    ),
    Operation(
        "corrections.list",
        "The organization's corrections, oldest first, one line each (optionally of one "
        "meter or event).",
        "usage:read",
        _list_corrections,
        {**_ORG, "meter": fields.METER, "event_id": fields.ID},
        "Correction",
    ),
)


def _handler(op: Operation) -> Callable[[Call], Response]:
    def handle(call: Call) -> Response:
        body = json_body(call.request, empty={})
        if not isinstance(body, dict):
            raise HttpError(400, "The body must be a JSON object.", code="invalid_body")
        for name in body:
            if name not in op.fields:
                raise ValidationError(str(name)[:100], f"is not a field of {op.id}")
        org = check_id("organization_id", body.get("organization_id"))
        if org != call.organization_id:
            raise HttpError(
                403,
                "This key cannot act on that organization.",
                param="organization_id",
                code="forbidden_organization",
            )
        # Rows are computed before answering, so a failure is an error response, not a
        # broken stream.
        who = call.caller
        caller = who.key_id or f"{who.role}@{org}"
        return ndjson_response(op.run(call.meter, org, body, caller))

    return handle


def _unknown(call: Call) -> Response:
    raise HttpError(404, "Unknown operation.", code="unknown_operation")


def _routes() -> tuple[Route, ...]:
    routes: list[Route] = []
    for op in OPERATIONS:
        body = {
            "type": "object",
            "properties": dict(op.fields),
            "required": ["organization_id", *op.required],
            "additionalProperties": False,
            **op.rules,
        }
        for i, path in enumerate(op.paths):
            routes.append(
                Route(
                    method="POST",
                    path=path,
                    handler=_handler(op),
                    errors=METERKIT,
                    operation_id=op.id if i == 0 else op.id.replace(".", "_"),
                    summary=op.summary,
                    tags=("operations",),
                    scope=op.scope,
                    admin=op.admin,
                    body={"application/json": body},
                    replies=(
                        Reply(200, "One JSON object per line.", json_schema_ref(op.result), NDJSON),
                        Reply(400, "The body is not a JSON object.", json_schema_ref("Error")),
                        Reply(422, "A bad field, named in error.param.", json_schema_ref("Error")),
                    ),
                )
            )
    # Catch-alls answer unknown operations with a 404 in this surface's shape.
    for path, params in (
        ("/v1/op/{operation_id}", (Param("operation_id", {"type": "string"}, location="path"),)),
        (
            "/v1/{resource}/{action}",
            (
                Param("resource", {"type": "string"}, location="path"),
                Param("action", {"type": "string"}, location="path"),
            ),
        ),
    ):
        routes.append(
            Route(
                method="POST",
                path=path,
                handler=_unknown,
                errors=METERKIT,
                operation_id=f"unknown_{len(routes)}",
                summary="Unknown operation.",
                params=params,
                hidden=True,
            )
        )
    return tuple(routes)


def _metric(*extra: str) -> dict[str, Any]:
    names = ("used", "limit", "remaining", *extra)
    return {
        "type": "object",
        "properties": {n: {"type": "integer"} for n in names},
        "required": list(names),
    }


_STAMP = {"type": "string", "format": "date-time"}

SCHEMAS: dict[str, Any] = {
    "UsageCurrent": {
        "type": "object",
        "properties": {
            "organization_id": {"type": "string"},
            "period_start": _STAMP,
            "period_end": _STAMP,
            "storage": _metric(),
            "tiles": _metric(),
            "credits": _metric("available", "purchased"),
            "jobs": _metric(),
        },
        "required": [
            "organization_id",
            "period_start",
            "period_end",
            "storage",
            "tiles",
            "credits",
            "jobs",
        ],
    },
    "UsageHistoryMonth": {
        "type": "object",
        "properties": {
            "month": {"type": "string", "description": "YYYY-MM"},
            "period_start": _STAMP,
            "period_end": _STAMP,
            "tile_requests": {"type": "integer"},
            "peak_storage_bytes": {"type": "integer"},
        },
        "required": ["month", "period_start", "period_end", "tile_requests", "peak_storage_bytes"],
    },
    "StorageRecalculated": {
        "type": "object",
        "properties": {
            "organization_id": {"type": "string"},
            "storage_bytes": {"type": "integer"},
            "previous_bytes": {"type": "integer"},
            "resources": {"type": "integer"},
            "recalculated_at": _STAMP,
        },
        "required": [
            "organization_id",
            "storage_bytes",
            "previous_bytes",
            "resources",
            "recalculated_at",
        ],
    },
}

SCHEMAS["Asset"] = {
    "type": "object",
    "properties": {
        "organization_id": {"type": "string"},
        "resource": {"type": "string"},
        "bytes": {"type": "integer"},
        "updated_at": {"type": "integer", "description": "Unix seconds"},
    },
    "required": ["organization_id", "resource", "bytes", "updated_at"],
}
SCHEMAS["AssetDeleted"] = {
    "type": "object",
    "properties": {
        "organization_id": {"type": "string"},
        "resource": {"type": "string"},
        "deleted": {"type": "boolean"},
    },
    "required": ["organization_id", "resource", "deleted"],
}

_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "meter": {"type": "string"},
        "organization_id": {"type": "string"},
        "time": {"type": "integer"},
        "values": {"type": "object"},
        "dimensions": {"type": "object"},
    },
    "required": ["id", "meter", "organization_id", "time", "values", "dimensions"],
}
SCHEMAS["Correction"] = {
    "type": "object",
    "properties": {
        "object": {"type": "string", "enum": ["correction"]},
        "id": {"type": "string"},
        "organization_id": {"type": "string"},
        "meter": {"type": "string"},
        "event_id": {"type": "string"},
        "action": {"type": "string", "enum": ["void", "amend"]},
        "reason": {"type": "string"},
        "actor": {"type": "string", "description": "The key (id) that made the correction."},
        "at": {"type": "integer", "description": "Unix seconds"},
        "before": _EVENT,
        "after": _EVENT,
    },
    "required": [
        "object",
        "id",
        "organization_id",
        "meter",
        "event_id",
        "action",
        "reason",
        "actor",
        "at",
        "before",
        "after",
    ],
}

SURFACE = Surface("operations", _routes(), SCHEMAS)
