"""The routing table: one :class:`Route` per endpoint, carrying what serving and documenting it
need (auth, scope, error shape, parameters, responses).

:class:`~meterkit.http.app.HttpApp` matches requests against these routes, and
``GET /openapi.json`` is generated from the very same routes, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from meterkit.http.core import Request, Response
from meterkit.http.errors import ErrorShape

if TYPE_CHECKING:
    from meterkit.auth import Principal
    from meterkit.meter import Meter


class Served(Protocol):
    """What a handler may ask of the app serving it (``HttpApp`` is one)."""

    def openapi(self) -> dict[str, Any]: ...


__all__ = [
    "Call",
    "Handler",
    "Param",
    "Reply",
    "Route",
    "Surface",
    "json_schema_ref",
    "match_path",
]

Schema = Mapping[str, Any]


@attrs.frozen
class Param:
    """A query or path parameter, as OpenAPI describes it."""

    name: str
    schema: Schema
    description: str = ""
    required: bool = False
    location: str = "query"

    def to_openapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "in": self.location,
            "required": self.required or self.location == "path",
            "schema": dict(self.schema),
        }
        if self.description:
            out["description"] = self.description
        if self.schema.get("type") == "array":
            # Repeated keys: group_by=a&group_by=b (the bracket form group_by[]=a is accepted too).
            out["style"] = "form"
            out["explode"] = True
        return out


@attrs.frozen
class Reply:
    """A documented response: status, description, and the body's schema and media type."""

    status: int
    description: str
    schema: Schema | None = None
    media: str = "application/json"


@attrs.frozen
class Call:
    """What a handler gets: the request, the meter, the caller and the path's parameters."""

    request: Request
    meter: Meter
    principal: Principal | None
    path_params: Mapping[str, str]
    app: Served

    @property
    def caller(self) -> Principal:
        """The authenticated caller (only on routes with ``auth``)."""
        if self.principal is None:
            raise RuntimeError("this route does not authenticate its callers")
        return self.principal

    @property
    def organization_id(self) -> str:
        """The caller's organization: the only one this request may read or write."""
        return self.caller.organization_id


Handler = Callable[[Call], Response]


@attrs.frozen
class Route:
    """One endpoint.

    ``auth``: a bearer token is required; ``scope``: the token must carry it; ``admin``: the
    token's role must be ``admin`` — unless ``member_usage`` and the app lets members read
    organization usage (``HttpApp(member_usage=True)``). ``hidden`` routes are served but left
    out of the OpenAPI document (catch-alls that only answer 404 in the right shape).
    """

    method: str
    path: str
    handler: Handler
    errors: ErrorShape
    operation_id: str
    summary: str
    tags: tuple[str, ...] = ()
    description: str = ""
    auth: bool = True
    scope: str | None = None
    admin: bool = False
    member_usage: bool = False
    params: tuple[Param, ...] = ()
    body: Mapping[str, Schema] | None = None
    replies: tuple[Reply, ...] = ()
    hidden: bool = False

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path[1:].split("/"))


@attrs.frozen
class Surface:
    """One API surface: its routes and the component schemas its replies refer to."""

    name: str
    routes: tuple[Route, ...]
    schemas: Mapping[str, Schema] = attrs.field(factory=dict)


def match_path(route: Route, path: str) -> dict[str, str] | None:
    """The path parameters if ``path`` fits the route's template, else ``None``.

    A parameter matches one non-empty segment; there is no trailing-slash leniency.
    """
    if not path.startswith("/"):
        return None
    parts = path[1:].split("/")
    if len(parts) != len(route.segments):
        return None
    params: dict[str, str] = {}
    for pattern, part in zip(route.segments, parts, strict=True):
        if pattern.startswith("{") and pattern.endswith("}"):
            if not part:
                return None
            params[pattern[1:-1]] = part
        elif pattern != part:
            return None
    return params


def json_schema_ref(name: str) -> dict[str, str]:
    """``{"$ref": "#/components/schemas/<name>"}``."""
    return {"$ref": f"#/components/schemas/{name}"}
