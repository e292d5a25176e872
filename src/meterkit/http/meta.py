"""meterkit's own meta endpoints: ``GET /healthz`` and ``GET /openapi.json``.

The OpenAPI document is generated from the routing table every surface contributes to, so it
lists exactly what :class:`~meterkit.http.app.HttpApp` serves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from meterkit.http.core import Response, json_response
from meterkit.http.errors import METERKIT
from meterkit.http.fields import NAMES_MARK
from meterkit.http.routing import Call, Reply, Route, Surface, json_schema_ref

__all__ = ["SURFACE", "openapi_document"]

logger = logging.getLogger("meterkit.http")

SECURITY_SCHEME = "bearerAuth"


def _health(call: Call) -> Response:
    try:
        # One cheap round trip proves the store answers (a missing record is fine).
        call.meter.store.get_record("meta", "healthz")
    except Exception:
        logger.warning("meterkit.http: health check failed", exc_info=True)
        return json_response({"status": "unavailable"}, 503)
    return json_response({"status": "ok"})


def _openapi(call: Call) -> Response:
    return json_response(call.app.openapi())


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
                "required": ["message", "type", "param", "code"],
            }
        },
        "required": ["error"],
    },
    "HTTPError": {
        "type": "object",
        "properties": {"detail": {"type": "string"}},
        "required": ["detail"],
    },
    "HTTPValidationError": {
        "type": "object",
        "properties": {
            "detail": {"type": "array", "items": json_schema_ref("ValidationError")},
        },
    },
    "ValidationError": {
        "type": "object",
        "properties": {
            "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"type": "string"},
            "type": {"type": "string"},
            "input": {},
        },
        "required": ["loc", "msg", "type"],
    },
    "Health": {
        "type": "object",
        "properties": {"status": {"type": "string", "enum": ["ok", "unavailable"]}},
        "required": ["status"],
    },
}


def _reply(reply: Reply) -> dict[str, Any]:
    out: dict[str, Any] = {"description": reply.description}
    if reply.schema is not None:
        out["content"] = {reply.media: {"schema": dict(reply.schema)}}
    return out


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary}
    if route.description:
        op["description"] = route.description
    if route.tags:
        op["tags"] = list(route.tags)
    if route.params:
        op["parameters"] = [p.to_openapi() for p in route.params]
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {media: {"schema": dict(schema)} for media, schema in route.body.items()},
        }
    error = json_schema_ref(route.errors.schema_name())
    replies = {str(r.status): _reply(r) for r in route.replies}
    common = [
        (500, "An unexpected error (a generic message)."),
        (503, "The usage store is unavailable."),
    ]
    if route.auth:
        op["security"] = [{SECURITY_SCHEME: []}]
        common += [
            (401, "A missing, unknown or revoked key."),
            (403, "The key lacks the scope or role, or asks for another organization."),
        ]
    else:
        op["security"] = []
    for status, description in common:
        replies.setdefault(str(status), _reply(Reply(status, description, error)))
    op["responses"] = dict(sorted(replies.items()))
    return op


def _named(schema: Any, names: Mapping[str, list[str]]) -> Any:
    """``schema`` with each field marked :data:`~meterkit.http.fields.NAMES_MARK` listing the
    names it takes on this server (another name is refused, so the document says so); left
    the mark's plain schema where the names are not given."""
    if isinstance(schema, list):
        return [_named(v, names) for v in schema]
    if not isinstance(schema, dict):
        return schema
    mark = schema.get(NAMES_MARK)
    plain = {k: _named(v, names) for k, v in schema.items() if k != NAMES_MARK}
    if mark is None or mark["names"] not in names:
        return plain
    prefixes = mark.get("prefixes", [""])
    plain.pop("pattern", None)
    return plain | {"enum": [p + n for p in prefixes for n in names[mark["names"]]]}


def openapi_document(
    routes: Iterable[Route],
    surfaces: Iterable[Surface],
    names: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, Any]:
    """An OpenAPI 3.1 document for ``routes`` (hidden ones left out); a field that takes the
    server's meters or metrics lists ``names["meters"]`` or ``names["metrics"]``."""
    from meterkit import __version__

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not route.hidden:
            paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    schemas: dict[str, Any] = {}
    for surface in surfaces:
        schemas.update(surface.schemas)
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "meterkit",
            "version": __version__,
            "description": "Usage metering: OpenAI-shaped usage and costs, plan usage, "
            "account usage, usage operations and event ingest.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A meterkit API key (mk_...).",
                },
            },
            "schemas": dict(sorted(schemas.items())),
        },
    }
    found: dict[str, Any] = _named(document, {k: sorted(v) for k, v in (names or {}).items()})
    return found


SURFACE = Surface(
    "meta",
    (
        Route(
            method="GET",
            path="/healthz",
            handler=_health,
            errors=METERKIT,
            operation_id="healthz",
            summary="Whether the server and its store answer.",
            tags=("meta",),
            auth=False,
            replies=(
                Reply(200, "The store answers.", json_schema_ref("Health")),
                Reply(503, "The store does not answer.", json_schema_ref("Health")),
            ),
        ),
        Route(
            method="GET",
            path="/openapi.json",
            handler=_openapi,
            errors=METERKIT,
            operation_id="openapi",
            summary="This OpenAPI document.",
            tags=("meta",),
            auth=False,
            replies=(Reply(200, "An OpenAPI 3.1 document.", {"type": "object"}),),
        ),
    ),
    SCHEMAS,
)
