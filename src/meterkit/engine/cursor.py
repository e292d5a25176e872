"""Opaque page cursors, bound to the query they came from and signed so they cannot be forged."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from meterkit.errors import ValidationError
from meterkit.models import UsageQuery

__all__ = ["decode_cursor", "encode_cursor"]

_SIG_BYTES = 12


def _fingerprint(query: UsageQuery) -> bytes:
    # end_time and limit are left out on purpose: a client paging with "end_time = now"
    # or a new page size still continues the same listing.
    return json.dumps(
        [
            query.meter,
            query.organization_id,
            query.start_time,
            query.bucket_width,
            list(query.group_by),
            [[k, sorted(map(repr, v))] for k, v in query.filters],
        ],
        separators=(",", ":"),
    ).encode()


def _sign(secret: bytes, query: UsageQuery, payload: bytes) -> bytes:
    return hmac.new(secret, _fingerprint(query) + b"\0" + payload, hashlib.sha256).digest()[
        :_SIG_BYTES
    ]


def encode_cursor(secret: bytes, query: UsageQuery, next_start: int) -> str:
    payload = str(next_start).encode()
    token = payload + b"." + _sign(secret, query, payload)
    return "page_" + base64.urlsafe_b64encode(token).decode().rstrip("=")


def decode_cursor(secret: bytes, query: UsageQuery, cursor: object) -> int:
    """The bucket start a cursor resumes at; a forged or foreign cursor is a ValidationError."""
    if not isinstance(cursor, str) or not cursor.startswith("page_") or len(cursor) > 200:
        raise ValidationError("page", "is not a cursor returned by this API")
    raw = cursor[5:]
    try:
        token = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        payload, sig = token.split(b".", 1)
        start = int(payload.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("page", "is not a cursor returned by this API") from None
    if not hmac.compare_digest(sig, _sign(secret, query, payload)):
        raise ValidationError("page", "does not belong to this query")
    if start % query.width or start <= query.page_start or start >= query.end_time:
        raise ValidationError("page", "is outside this query's time range")
    return start
