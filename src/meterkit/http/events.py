"""Event ingest, ``POST /v1/events``: meterkit's native events, NDJSON, or a CloudEvents batch.

The body is read by its ``Content-Type``, which is required (anything else is 415, with the
accepted types in the message and in an ``Accept-Post`` header):

* ``application/json``: a JSON array of native events (``id``, ``meter``,
  ``organization_id``, ``time``, ``values``, ``dimensions``; see ``meterkit.convert``);
* ``application/x-ndjson``: one native event per line;
* ``application/cloudevents-batch+json``: a JSON array of CloudEvents 1.0 (structured mode);
  ``application/cloudevents+json``: a single one.

A batch is stored all-or-nothing: one invalid event, or one for another organization, and
nothing is stored. The answer counts new events, retries of stored ones and conflicts (an id
this organization already used for the meter with other data: the stored event is kept), and
gives each event's status in order: ``{"accepted": n, "duplicates": m, "conflicts": k,
"events": [{"id": ..., "meter": ..., "status": "accepted" | "duplicate" | "conflict"}]}``.
Sending the same batch again is safe.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from typing import Any

from meterkit.convert import native_converter
from meterkit.errors import ValidationError
from meterkit.http.core import Response, json_response
from meterkit.http.errors import METERKIT, HttpError
from meterkit.http.params import parse_json
from meterkit.http.routing import Call, Reply, Route, Surface, json_schema_ref
from meterkit.models import Event

__all__ = ["CLOUDEVENTS_BATCH", "NDJSON", "SURFACE", "parse_rfc3339"]

JSON = "application/json"
NDJSON = "application/x-ndjson"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"
CLOUDEVENT = "application/cloudevents+json"
TYPE_PREFIX = "meterkit."

# ASCII digits only ([0-9], not \d), matched with fullmatch.
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_rfc3339(value: object, field: str) -> int:
    """An RFC 3339 timestamp (offset required) as whole UTC seconds, fractions floored."""
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValidationError(field, "must be an RFC 3339 time such as 2025-01-01T00:00:00Z")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    offset = match.group(8)
    if offset in ("Z", "z"):
        tz = dt.timezone.utc
    else:
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise ValidationError(field, f"has an invalid offset {offset!r}")
        tz = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
    try:
        stamp = dt.datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp()
    except (ValueError, OverflowError):
        raise ValidationError(field, f"is not a real time: {value!r}") from None
    return math.floor(stamp)


ACCEPTED_TYPES = (JSON, NDJSON, CLOUDEVENTS_BATCH, CLOUDEVENT)


def _media_type(call: Call) -> str:
    raw = call.request.header("content-type") or ""
    media = raw.split(";", 1)[0].strip().lower()
    if media not in ACCEPTED_TYPES:
        shown = f"not {media[:80]!r}" if media else "without a Content-Type header"
        raise HttpError(
            415,
            f"Send the events as {', '.join(ACCEPTED_TYPES)}; the request came {shown}.",
            code="unsupported_media_type",
            headers=(("accept-post", ", ".join(ACCEPTED_TYPES)),),
        )
    return media


def _items(call: Call, media: str) -> list[Any]:
    try:
        text = call.request.body.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "The body is not UTF-8 text.", code="invalid_body") from None
    if media == NDJSON:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(parse_json(line))
                except ValueError as exc:
                    raise HttpError(
                        400, f"Line {n} is not valid JSON: {str(exc)[:200]}", code="invalid_body"
                    ) from None
        return items
    try:
        data = parse_json(text) if text.strip() else None
    except ValueError as exc:
        raise HttpError(
            400, f"The body is not valid JSON: {str(exc)[:200]}", code="invalid_body"
        ) from None
    if media == CLOUDEVENT:
        data = [data]
    if not isinstance(data, list):
        raise HttpError(400, "The body must be a JSON array of events.", code="invalid_body")
    return data


def _own(call: Call, org: object, field: str) -> str:
    """The organization an event is for: the key's own, unless it names another (403)."""
    if org is None:
        return call.organization_id
    if org != call.organization_id:
        raise HttpError(
            403,
            "This key cannot record events for that organization.",
            param=field,
            code="forbidden_organization",
        )
    return call.organization_id


def _native(call: Call, item: Any, field: str) -> Event:
    if not isinstance(item, dict):
        raise ValidationError(field, "must be a JSON object")
    item = {
        **item,
        "organization_id": _own(call, item.get("organization_id"), f"{field}.organization_id"),
    }
    try:
        event: Event = native_converter.structure(item, Event)
    except (TypeError, ValueError) as exc:
        raise ValidationError(field, str(exc)[:300]) from None
    return event


def _cloud(call: Call, item: Any, field: str) -> Event:
    if not isinstance(item, dict):
        raise ValidationError(field, "must be a CloudEvent (a JSON object)")
    version = item.get("specversion", "1.0")
    if version != "1.0":
        raise ValidationError(f"{field}.specversion", "must be '1.0'")
    kind = item.get("type")
    if not isinstance(kind, str) or not kind:
        raise ValidationError(f"{field}.type", "must name the meter (meterkit.<meter> or <meter>)")
    meter = kind[len(TYPE_PREFIX) :] if kind.startswith(TYPE_PREFIX) else kind
    media = item.get("datacontenttype", JSON)
    if not isinstance(media, str) or media.split(";", 1)[0].strip().lower() != JSON:
        raise ValidationError(f"{field}.datacontenttype", "must be application/json")
    data = item.get("data")
    if not isinstance(data, dict):
        raise ValidationError(f"{field}.data", "must be an object with values (and dimensions)")
    extra = set(data) - {"values", "dimensions"}
    if extra:
        raise ValidationError(f"{field}.data", f"unknown fields: {sorted(extra)[:5]}")
    if "values" not in data:
        raise ValidationError(f"{field}.data.values", "is required")
    time = item.get("time")
    seconds = parse_rfc3339(time, f"{field}.time") if time is not None else None
    # id, values and dimensions are checked against the meter, with the rest, by record_many.
    return Event(
        id=item.get("id"),  # type: ignore[arg-type]
        meter=meter,
        organization_id=_own(call, item.get("subject"), f"{field}.subject"),
        time=seconds,  # type: ignore[arg-type]  # None: record_many stamps "now"
        values=data["values"],
        dimensions=data.get("dimensions") or {},
    )


def _ingest(call: Call) -> Response:
    media = _media_type(call)
    read = _cloud if media in (CLOUDEVENTS_BATCH, CLOUDEVENT) else _native
    events = [read(call, item, f"events[{i}]") for i, item in enumerate(_items(call, media))]
    for i, event in enumerate(events):
        # Ids are required over HTTP: they are what makes a retried batch safe.
        if event.id is None:
            raise ValidationError(f"events[{i}].id", "is required (it makes retries safe)")
    result = call.meter.record_many(events)
    return json_response(
        {
            "accepted": result.accepted,
            "duplicates": result.duplicates,
            "conflicts": len(result.conflicts),
            "events": [
                {"id": e.id, "meter": e.meter, "status": status}
                for e, status in zip(events, result.statuses, strict=True)
            ],
        }
    )


_EVENT: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "meter": {"type": "string"},
        "organization_id": {"type": "string", "description": "Default: the key's organization."},
        "time": {"type": "integer", "description": "Unix seconds; default: now."},
        "values": {"type": "object", "additionalProperties": {"type": "number"}},
        "dimensions": {
            "type": "object",
            "additionalProperties": {"type": ["string", "boolean", "null"]},
        },
    },
    "required": ["id", "meter", "values"],
    "additionalProperties": False,
}

_CLOUD_EVENT: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "specversion": {"const": "1.0"},
        "id": {"type": "string"},
        "source": {"type": "string"},
        "type": {"type": "string", "description": "meterkit.<meter>, or the bare meter name."},
        "time": {"type": "string", "format": "date-time"},
        "subject": {"type": "string", "description": "The organization; default: the key's."},
        "datacontenttype": {"const": JSON},
        "data": {
            "type": "object",
            "properties": {
                "values": _EVENT["properties"]["values"],
                "dimensions": _EVENT["properties"]["dimensions"],
            },
            "required": ["values"],
        },
    },
    "required": ["id", "type", "data"],
}

SCHEMAS: dict[str, Any] = {
    "Event": dict(_EVENT),
    "CloudEvent": dict(_CLOUD_EVENT),
    "Ingested": {
        "type": "object",
        "properties": {
            "accepted": {"type": "integer", "description": "New events, now stored."},
            "duplicates": {
                "type": "integer",
                "description": "Events already stored with the same data: nothing changed.",
            },
            "conflicts": {
                "type": "integer",
                "description": "Ids already used with other data: the stored event is kept.",
            },
            "events": {
                "type": "array",
                "description": "Each event's outcome, in the order sent.",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "meter": {"type": "string"},
                        "status": {"enum": ["accepted", "duplicate", "conflict"]},
                    },
                    "required": ["id", "meter", "status"],
                },
            },
        },
        "required": ["accepted", "duplicates", "conflicts", "events"],
    },
}

SURFACE = Surface(
    "events",
    (
        Route(
            method="POST",
            path="/v1/events",
            handler=_ingest,
            errors=METERKIT,
            operation_id="ingest_events",
            summary="Record a batch of usage events, all or nothing; duplicates are no-ops.",
            tags=("events",),
            scope="usage:write",
            body={
                JSON: {"type": "array", "items": json_schema_ref("Event")},
                NDJSON: json_schema_ref("Event"),
                CLOUDEVENTS_BATCH: {"type": "array", "items": json_schema_ref("CloudEvent")},
                CLOUDEVENT: json_schema_ref("CloudEvent"),
            },
            replies=(
                Reply(
                    200,
                    "How many events were new and how many already stored.",
                    json_schema_ref("Ingested"),
                ),
                Reply(400, "The body cannot be read.", json_schema_ref("Error")),
                Reply(403, "An event is for another organization.", json_schema_ref("Error")),
                Reply(413, "The body is too large.", json_schema_ref("Error")),
                Reply(415, "An unsupported content type.", json_schema_ref("Error")),
                Reply(
                    422,
                    "An invalid event, named in error.param; nothing was stored.",
                    json_schema_ref("Error"),
                ),
            ),
        ),
    ),
    SCHEMAS,
)
