"""The pure-Python aggregation engine. It knows nothing of stores: it takes events, returns rows.

Every store's native answer must equal :func:`aggregate` on the same events; the property
tests hold them to it.
"""

from __future__ import annotations

from meterkit.engine.aggregate import Rows, aggregate, empty_value, matches
from meterkit.engine.cursor import decode_cursor, encode_cursor
from meterkit.engine.page import bucket_starts, build_page, next_cursor, page_rows

__all__ = [
    "Rows",
    "aggregate",
    "bucket_starts",
    "build_page",
    "decode_cursor",
    "empty_value",
    "encode_cursor",
    "matches",
    "next_cursor",
    "page_rows",
]
