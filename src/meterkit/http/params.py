"""Reading query parameters and JSON bodies strictly: every failure names the parameter."""

from __future__ import annotations

import json
import re
from typing import Any

from meterkit.http.core import Request
from meterkit.http.errors import HttpError, ParamError
from meterkit.validate import as_whole

__all__ = ["integer", "json_body", "one", "parse_json", "strings", "truth"]

_INT_RE = re.compile(r"-?[0-9]{1,19}")
_TRUE = {"true": True, "false": False}


def one(request: Request, name: str) -> str | None:
    """The parameter's value (the last one, if repeated), or ``None`` if absent."""
    return request.query_one(name)


def strings(request: Request, name: str) -> list[str]:
    """Every value of an array parameter: ``name=a&name=b`` and ``name[]=a`` alike."""
    return request.query_all(name)


def integer(request: Request, name: str, *, required: bool = False) -> int | None:
    """A base-10 integer: no sign but ``-``, no spaces, no exponent, at most 19 digits."""
    raw = one(request, name)
    if raw is None:
        if required:
            raise ParamError(name, "is required", type="missing")
        return None
    if not _INT_RE.fullmatch(raw):
        raise ParamError(
            name, f"must be an integer, not {raw[:40]!r}", type="int_parsing", input=raw[:200]
        )
    return int(raw)


def truth(request: Request, name: str) -> bool | None:
    """``true`` or ``false`` (any case), or ``None`` if absent."""
    raw = one(request, name)
    if raw is None:
        return None
    value = _TRUE.get(raw.lower())
    if value is None:
        raise ParamError(
            name, f"must be true or false, not {raw[:40]!r}", type="bool_parsing", input=raw[:200]
        )
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _number(text: str) -> int | float:
    # JSON has one number type: 2747.0 is the integer 2747 (as JSON Schema's "integer" has
    # it), so every check that wants a whole number takes it.
    return as_whole(float(text))  # type: ignore[return-value]


def parse_json(text: str | bytes) -> Any:
    """Strict JSON: ``NaN`` and ``Infinity`` refused; a whole number written with a fraction
    or exponent (``2747.0``, ``1e3``) read as the int it is; errors (deep nesting too) are
    ValueError."""
    try:
        return json.loads(text, parse_constant=_no_constants, parse_float=_number)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def json_body(request: Request, *, empty: Any = None) -> Any:
    """The request body as JSON (``empty`` for no body).

    A body sent as anything but ``application/json`` (or a ``+json`` type) is a 415, a
    malformed one a 400.
    """
    if not request.body.strip():
        return empty
    media = (request.header("content-type") or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        shown = f"not {media[:80]!r}" if media else "without a Content-Type header"
        raise HttpError(
            415,
            f"Send the body as application/json; the request came {shown}.",
            code="unsupported_media_type",
            headers=(("accept-post", "application/json"),),
        )
    try:
        return parse_json(request.body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HttpError(400, "The body is not UTF-8 text.", code="invalid_body") from None
    except ValueError as exc:
        raise HttpError(
            400, f"The body is not valid JSON: {str(exc)[:200]}", code="invalid_body"
        ) from None
