"""JSON Schema for the fields many request bodies share, written from the checks that refuse
them (:mod:`meterkit.validate`, :mod:`meterkit.spend`), so ``/openapi.json`` admits what the
server admits and no more."""

from __future__ import annotations

from typing import Any

from meterkit.models import NAME_RE
from meterkit.spend import LINE_BREAKS, MAX_CENTS, MAX_RECIPIENTS
from meterkit.validate import MAX_STRING

__all__ = [
    "CENTS",
    "EMAIL",
    "ID",
    "METER",
    "METRIC",
    "NAME",
    "NAMES_MARK",
    "ONE_LINE",
    "RECIPIENTS",
    "TEXT",
]

_CONTROL = "\\x00-\\x1f"
# What str.strip() takes off besides control characters, spelled out: "\\s" differs between
# regex dialects (ECMA-262's has U+FEFF and lacks U+0085).
_SPACE = "\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
_BREAKS = "".join(f"\\u{ord(c):04x}" for c in LINE_BREAKS)

TEXT: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_STRING,
    "pattern": "^[^\\x00]*$",
}
"""A non-empty string of at most 256 characters, without NUL (``check_string``)."""

ID: dict[str, Any] = {
    **TEXT,
    # No control character, and no space at either edge (``check_id``).
    "pattern": f"^[^{_SPACE}{_CONTROL}](?:[^{_CONTROL}]*[^{_SPACE}{_CONTROL}])?$",
}
"""An organization, event, alert or asset id."""

NAME: dict[str, Any] = {"type": "string", "pattern": NAME_RE.pattern}
"""A meter, measure or dimension name."""

NAMES_MARK = "x-meterkit-names"
"""Marks a field whose values are names the server knows: ``{"names": "meters"}`` (or
``"metrics"``), with ``"prefixes"`` to list each name under each prefix. ``/openapi.json``
lists the names in its place (:func:`meterkit.http.meta.openapi_document`)."""

METER: dict[str, Any] = {**NAME, NAMES_MARK: {"names": "meters"}}
"""A meter of this server."""

METRIC: dict[str, Any] = {"type": "string", NAMES_MARK: {"names": "metrics"}}
"""A metric a plan may limit on this server."""

ONE_LINE: dict[str, Any] = {**TEXT, "pattern": f"^[^{_BREAKS}\\x00]*$"}
"""Text on one line: no line break of any kind (an alert's email header)."""

EMAIL: dict[str, Any] = {
    **TEXT,
    "pattern": f"^[^@ <>,;{_BREAKS}\\x00]+@[^ <>,;{_BREAKS}\\x00]*\\.[^ <>,;{_BREAKS}\\x00]*$",
}
"""An email address as an alert's recipients take it."""

RECIPIENTS: dict[str, Any] = {
    "type": "array",
    "items": EMAIL,
    "minItems": 1,
    "maxItems": MAX_RECIPIENTS,
}

CENTS: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_CENTS}
"""A positive amount of cents (``check_cents``; a body's ``2747.0`` is read as ``2747``)."""
