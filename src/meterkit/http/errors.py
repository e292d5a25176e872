"""Errors in the shape of the surface they came to.

Two shapes exist. The OpenAI shape, ``{"error": {"message", "type", "param", "code"}}``, is
used by the OpenAI-shaped endpoints and by meterkit's own (account usage, operations, events,
meta). The FastAPI shape, ``{"detail": "..."}`` or, for bad parameters, ``{"detail": [{"loc",
"msg", "type", "input"}]}``, is used by the plan-usage surface, which is documented as a
FastAPI app.

Handlers raise :class:`HttpError` (a status of their choosing) or
:class:`meterkit.ValidationError` (the surface's "bad input" status, naming the field); the
route's :class:`ErrorShape` turns either into a :class:`~meterkit.http.core.Response`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from meterkit.errors import NotFound, StateConflict, ValidationError
from meterkit.http.core import Response, json_response

__all__ = [
    "FASTAPI",
    "MAX_ECHO",
    "MESSAGES",
    "METERKIT",
    "OPENAI",
    "ErrorShape",
    "FastAPIErrors",
    "HttpError",
    "OpenAIErrors",
    "ParamError",
    "bounded",
]


class HttpError(Exception):
    """Answer with ``status``; ``code`` is machine-readable, ``param`` names the bad input."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = tuple(headers)


class ParamError(ValidationError):
    """A bad query parameter, with the machine-readable ``type`` FastAPI would report."""

    def __init__(
        self, field: str, message: str, *, type: str = "value_error", input: Any = None
    ) -> None:
        super().__init__(field, message)
        self.type = type
        self.input = input


# The messages of the errors every surface shares, by code.
MESSAGES = {
    "missing_api_key": "No API key provided: send the header 'Authorization: Bearer <key>'.",
    "invalid_api_key": "Incorrect, unknown or revoked API key provided.",
    "insufficient_scope": "This key lacks the scope this endpoint needs.",
    "admin_required": "This operation needs a key with the admin role.",
    "not_found": "No such endpoint.",
    "method_not_allowed": "This endpoint does not accept that method.",
    "payload_too_large": "The request body is too large.",
    "internal_error": "The server failed to answer this request.",
    "store_unavailable": "The usage store is unavailable; try again shortly.",
}


@attrs.frozen
class ErrorShape:
    """How one surface spells its errors; ``invalid_status`` answers a ValidationError."""

    name: str
    invalid_status: int

    def error(self, err: HttpError) -> Response:  # pragma: no cover - abstract
        raise NotImplementedError

    def invalid(self, exc: ValidationError) -> Response:
        # Well-formed input the stored state refuses is not the caller's syntax error.
        if isinstance(exc, NotFound):
            return self.error(HttpError(404, exc.message, param=exc.field, code="not_found"))
        if isinstance(exc, StateConflict):
            return self.error(HttpError(409, exc.message, param=exc.field, code="conflict"))
        return self.error(
            HttpError(self.invalid_status, exc.message, param=exc.field, code="invalid_value")
        )

    def schema_name(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


_SERVER_ERRORS = {500, 501, 502, 503, 504}
MAX_ECHO = 300
"""Characters of a message, a field name or an input an error echoes: a reply to a huge bad
input stays small (a 1 MB unknown key answers in well under a kilobyte)."""


def bounded(text: Any, limit: int = MAX_ECHO) -> Any:
    """``text`` cut to ``limit`` characters (marked with "…"); anything else as it is."""
    if isinstance(text, str) and len(text) > limit:
        return text[:limit] + "…"
    return text


@attrs.frozen
class OpenAIErrors(ErrorShape):
    """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API answers."""

    def error(self, err: HttpError) -> Response:
        body = {
            "error": {
                "message": bounded(err.message, 3 * MAX_ECHO),
                "type": "server_error" if err.status in _SERVER_ERRORS else "invalid_request_error",
                "param": bounded(err.param),
                "code": err.code,
            }
        }
        return json_response(body, err.status, err.headers)

    def schema_name(self) -> str:
        return "Error"


# What FastAPI (and Starlette under it) answers itself, by meterkit's error code.
_FASTAPI_DETAIL = {
    "missing_api_key": "Not authenticated",
    "invalid_api_key": "Invalid authentication credentials",
    "insufficient_scope": "Not enough permissions",
    "admin_required": "Not enough permissions",
    "not_found": "Not Found",
    "method_not_allowed": "Method Not Allowed",
    "internal_error": "Internal Server Error",
    "store_unavailable": "Service Unavailable",
}


@attrs.frozen
class FastAPIErrors(ErrorShape):
    """``{"detail": str}``, and for bad query parameters a 422 with a list of details."""

    def error(self, err: HttpError) -> Response:
        detail = _FASTAPI_DETAIL.get(err.code or "", bounded(err.message, 3 * MAX_ECHO))
        return json_response({"detail": detail}, err.status, err.headers)

    def invalid(self, exc: ValidationError) -> Response:
        item: dict[str, Any] = {
            "type": getattr(exc, "type", "value_error"),
            "loc": ["query", bounded(exc.field)],
            "msg": bounded(exc.message, 3 * MAX_ECHO),
            "input": bounded(getattr(exc, "input", None)),
        }
        return json_response({"detail": [item]}, self.invalid_status)

    def schema_name(self) -> str:
        return "HTTPError"


OPENAI = OpenAIErrors("openai", 400)
"""The OpenAI usage and costs endpoints: bad parameters are 400."""

METERKIT = OpenAIErrors("meterkit", 422)
"""meterkit's own surfaces: the OpenAI shape; an invalid field is 422, a malformed body 400."""

FASTAPI = FastAPIErrors("fastapi", 422)
"""The plan-usage surface: bad parameters are a FastAPI-style 422."""
