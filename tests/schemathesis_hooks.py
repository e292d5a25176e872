"""The request rules ``/openapi.json`` cannot state, for the schemathesis run
(``tests/test_openapi_conformance.py``). JSON Schema cannot relate one field to another, to
the server's clock or to what is stored, so a generated request that breaks one of these
rules is left out; each is named here and in docs/http.md ("What the document cannot say").
``MK_CONFORMANCE_NOW`` is the served clock (``meterkit serve --now ... --freeze-clock``)."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import schemathesis

from meterkit.catalog import builtin_meters

SPECS = builtin_meters()
NOW = int(os.environ.get("MK_CONFORMANCE_NOW", "0"))
SKEW = 300  # how far ahead of the clock an event may be (max_future_skew's default)
AMEND = ("/v1/op/corrections.amend", "/v1/corrections/amend")


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@schemathesis.hook
def filter_query(ctx: Any, query: dict[str, Any] | None) -> bool:
    if not query:
        return True
    start, end = _int(query.get("start_time")), _int(query.get("end_time"))
    # end_time is after start_time; without one, start_time is not after now.
    if start is not None and end is not None and end <= start:
        return False
    if start is not None and end is None and start > NOW:
        return False
    # end_date is not before start_date; each defaults to a day of the server's month (the
    # 1st, today), so both are given, or neither.
    if ("start_date" in query) != ("end_date" in query):
        return False
    if "end_date" in query and str(query["end_date"]) < str(query["start_date"]):
        return False
    # A page cursor is a next_page the API returned; a list's cursor is an item's id.
    if "page" in query or "after" in query or "before" in query:
        return False
    # limit's largest value depends on bucket_width (1d: 31, 1h: 168, 1m: 1440).
    top = {"1d": 31, "1h": 168, "1m": 1440}.get(str(query.get("bucket_width", "1d")), 1440)
    limit = _int(query.get("limit"))
    return limit is None or limit <= top or ctx.operation.path == "/v1/organization/costs"


def _sums_hold(meter: str, values: dict[str, Any]) -> bool:
    """A total given with all its parts equals their sum (completions, decisions)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
        return True  # a request the document itself refuses
    for total, parts in SPECS[meter].sums:
        given = total in values and all(p in values for p in parts)
        if given and values[total] != sum(values[p] for p in parts):
            return False
    return True


def _time(value: Any) -> int | None:
    if isinstance(value, str):
        try:
            return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
        except ValueError:
            return None
    return _int(value)


def _event_ok(event: Any) -> bool:
    if not isinstance(event, dict):
        return True
    meter = event.get("meter") or str(event.get("type", "")).removeprefix("meterkit.")
    if not isinstance(meter, str):
        return True  # a request the document itself refuses
    data = event.get("data") if "data" in event else event
    values = data.get("values") if isinstance(data, dict) else None
    when = _time(event.get("time"))
    # An event is not from the future, nor from before 1970 (a time zone can move a time
    # across either edge).
    if when is not None and not 0 <= when <= NOW + SKEW:
        return False
    return not (meter in SPECS and isinstance(values, dict) and not _sums_hold(meter, values))


def _amend_ok(body: dict[str, Any]) -> bool:
    # An amendment names the event's meter's own measures and dimensions.
    spec = SPECS.get(body["meter"]) if isinstance(body.get("meter"), str) else None
    if spec is None:
        return True
    values = body.get("values") or {}
    dims = body.get("dimensions") or {}
    if not (isinstance(values, dict) and isinstance(dims, dict)):
        return True  # a request the document itself refuses
    return (
        set(values) <= set(spec.measure_names)
        and set(dims) <= set(spec.dimension_names)
        and _sums_hold(spec.name, values)
    )


@schemathesis.hook
def filter_body(ctx: Any, body: Any) -> bool:
    path = ctx.operation.path
    if path == "/v1/events":
        return all(_event_ok(e) for e in (body if isinstance(body, list) else [body]))
    if path in AMEND and isinstance(body, dict):
        return _amend_ok(body)
    return True
