""":class:`HttpApp`: every surface's routes behind one ``handle(request) -> response``.

The adapters (:mod:`meterkit.asgi`, :mod:`meterkit.flask`) translate their framework's request
into a :class:`~meterkit.http.core.Request`, call :meth:`HttpApp.handle`, and translate the
:class:`~meterkit.http.core.Response` back. ``handle`` never raises: a bad request gets an
error in the shape of the surface it came to, a store outage a 503, and anything unexpected a
500 with a generic message (the traceback goes to the ``meterkit.http`` logger, never to the
client).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from meterkit.auth import Principal, authenticate
from meterkit.errors import StoreUnavailable, ValidationError
from meterkit.http.core import Request, Response
from meterkit.http.errors import FASTAPI, MESSAGES, METERKIT, ErrorShape, HttpError
from meterkit.http.routing import Call, Route, Surface, match_path

if TYPE_CHECKING:
    from meterkit.meter import Meter

__all__ = ["DEFAULT_MAX_BODY", "HttpApp", "default_surfaces"]

logger = logging.getLogger("meterkit.http")

DEFAULT_MAX_BODY = 5 * 1024 * 1024
_CHALLENGE = (("www-authenticate", "Bearer"),)


def default_surfaces() -> tuple[Surface, ...]:
    """Every surface meterkit serves, in matching order (concrete paths before patterns)."""
    from meterkit.http import (
        account,
        dashboard,
        events,
        meta,
        openai,
        operations,
        operator,
        plan,
        quota,
        spend,
    )

    return (
        meta.SURFACE,
        dashboard.SURFACE,
        quota.SURFACE,
        openai.SURFACE,
        spend.SURFACE,
        plan.SURFACE,
        account.SURFACE,
        events.SURFACE,
        operations.SURFACE,
        operator.SURFACE,
    )


def _fallback_shape(path: str) -> ErrorShape:
    # An unknown path under /api/ belongs to the FastAPI-shaped surface.
    return FASTAPI if path.startswith("/api/") else METERKIT


class HttpApp:
    """Serves meterkit's HTTP surfaces over ``meter``.

    ``surfaces`` defaults to all of them (:func:`default_surfaces`); ``max_body_bytes``
    bounds request bodies (413 above it). The organization usage and costs endpoints take admin
    keys, as OpenAI's do; ``member_usage=True`` lets member keys (with ``usage:read``) read
    them too.
    """

    def __init__(
        self,
        meter: Meter,
        *,
        surfaces: Iterable[Surface] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        member_usage: bool = False,
    ) -> None:
        self.meter = meter
        self.member_usage = member_usage
        self.surfaces = tuple(surfaces) if surfaces is not None else default_surfaces()
        self.routes: tuple[Route, ...] = tuple(r for s in self.surfaces for r in s.routes)
        self.max_body_bytes = max_body_bytes
        self._openapi: dict[str, Any] | None = None

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
        """The route for ``method path`` and its path parameters; else the methods ``path`` has."""
        allowed: list[str] = []
        found: tuple[Route, dict[str, str]] | None = None
        for route in self.routes:
            params = match_path(route, path)
            if params is None:
                continue
            if route.method == method and found is None:
                if not route.hidden:
                    return route, params, []
                found = route, params
            elif not route.hidden and route.method not in allowed:
                allowed.append(route.method)
        # A hidden catch-all only answers paths that no documented route has.
        if found is not None and not allowed:
            return found[0], found[1], []
        return None, {}, allowed

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of every (non-hidden) route, built once."""
        if self._openapi is None:
            from meterkit.http.events import meter_schemas
            from meterkit.http.meta import openapi_document

            names = {"meters": self.meter.meters, "metrics": self.meter.quotas.metrics()}
            document = openapi_document(self.routes, self.surfaces, names)
            # Each meter's events, with its own measures and dimensions.
            document["components"]["schemas"].update(meter_schemas(self.meter.meters))
            self._openapi = document
        return self._openapi

    def handle(self, request: Request) -> Response:
        """Answer one request. Never raises."""
        try:
            return self._handle(request)
        except Exception:
            logger.exception("meterkit.http: failed to answer %s", _describe(request))
            return METERKIT.error(HttpError(500, MESSAGES["internal_error"], code="internal_error"))

    def _handle(self, request: Request) -> Response:
        method = request.method.upper() if isinstance(request.method, str) else ""
        path = request.path if isinstance(request.path, str) else ""
        route, params, allowed = self.match(method, path)
        shape = route.errors if route is not None else _fallback_shape(path)
        try:
            if route is None:
                if allowed:
                    raise HttpError(
                        405,
                        MESSAGES["method_not_allowed"],
                        code="method_not_allowed",
                        headers=(("allow", ", ".join(allowed)),),
                    )
                raise HttpError(404, MESSAGES["not_found"], code="not_found")
            if len(request.body) > self.max_body_bytes:
                raise HttpError(
                    413,
                    f"{MESSAGES['payload_too_large']} The limit is {self.max_body_bytes} bytes.",
                    code="payload_too_large",
                )
            principal = self._authorize(route, request) if route.auth else None
            return route.handler(Call(request, self.meter, principal, params, self))
        except HttpError as err:
            return shape.error(err)
        except ValidationError as exc:
            return shape.invalid(exc)
        except StoreUnavailable:
            logger.warning("meterkit.http: store unavailable for %s", _describe(request))
            return shape.error(
                HttpError(
                    503,
                    MESSAGES["store_unavailable"],
                    code="store_unavailable",
                    headers=(("retry-after", "1"),),
                )
            )
        except Exception:
            logger.exception("meterkit.http: failed to answer %s", _describe(request))
            return shape.error(HttpError(500, MESSAGES["internal_error"], code="internal_error"))

    def _authorize(self, route: Route, request: Request) -> Principal:
        header = request.header("authorization")
        if not header:
            raise HttpError(
                401, MESSAGES["missing_api_key"], code="missing_api_key", headers=_CHALLENGE
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise HttpError(
                401, MESSAGES["invalid_api_key"], code="invalid_api_key", headers=_CHALLENGE
            )
        try:
            principal = authenticate(self.meter, token)
        except ValidationError as exc:
            # The token is a str here, so this is a plugin returning something odd: a server bug.
            raise RuntimeError(f"authentication failed: {exc}") from exc
        if principal is None:
            raise HttpError(
                401, MESSAGES["invalid_api_key"], code="invalid_api_key", headers=_CHALLENGE
            )
        if route.scope is not None and not principal.has_scope(route.scope):
            raise HttpError(
                403,
                f"{MESSAGES['insufficient_scope']} Missing scope: {route.scope}.",
                code="insufficient_scope",
            )
        if (
            route.admin
            and not principal.is_admin
            and not (route.member_usage and self.member_usage)
        ):
            raise HttpError(403, MESSAGES["admin_required"], code="admin_required")
        return principal


def _describe(request: Request) -> str:
    return f"{request.method!r} {request.path!r}"[:300]
