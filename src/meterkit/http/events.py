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

from collections.abc import Mapping
from typing import Any

import attrs

from meterkit import eventio
from meterkit.errors import ValidationError
from meterkit.eventio import CLOUDEVENT, CLOUDEVENTS_BATCH, JSON, NDJSON, parse_rfc3339
from meterkit.http import fields
from meterkit.http.core import Response, json_response
from meterkit.http.errors import METERKIT, HttpError
from meterkit.http.params import parse_json
from meterkit.http.routing import Call, Reply, Route, Surface, json_schema_ref
from meterkit.models import Dimension, Event, MeterSpec
from meterkit.validate import MAX_TIME, MAX_VALUE

__all__ = ["CLOUDEVENTS_BATCH", "NDJSON", "SURFACE", "parse_rfc3339"]

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
    org = _own(call, item.get("organization_id"), f"{field}.organization_id")
    return eventio.native_event({**item, "organization_id": org}, field)


def _cloud(call: Call, item: Any, field: str) -> Event:
    event = eventio.cloud_event(item, field, organization_id="")
    org = _own(call, item.get("subject"), f"{field}.subject")
    return attrs.evolve(event, organization_id=org)


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
        "id": fields.ID,
        "meter": fields.METER,
        "organization_id": {
            "anyOf": [{"type": "null"}, fields.ID],
            "description": "Default: the key's organization.",
        },
        "time": {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_TIME,
            "description": "Unix seconds; default: now.",
        },
        "values": {
            "type": "object",
            "additionalProperties": {"type": "number", "minimum": 0, "maximum": MAX_VALUE},
        },
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
        "id": fields.ID,
        "source": {"type": "string"},
        "type": {
            **fields.METER,
            fields.NAMES_MARK: {"names": "meters", "prefixes": ["meterkit.", ""]},
            "description": "meterkit.<meter>, or the bare meter name.",
        },
        "time": {
            "type": "string",
            "format": "date-time",
            "pattern": "^(19[7-9][0-9]|[2-9][0-9]{3})-",
            "description": "RFC 3339, from 1970 to 9999.",
        },
        "subject": {
            "anyOf": [{"type": "null"}, fields.ID],
            "description": "The organization; default: the key's.",
        },
        "datacontenttype": {"const": JSON},
        "data": {
            "type": "object",
            "properties": {
                "values": _EVENT["properties"]["values"],
                "dimensions": _EVENT["properties"]["dimensions"],
            },
            "required": ["values"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "type", "data"],
    "additionalProperties": False,
}


def _values(spec: MeterSpec) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            m.name: {
                "type": "number" if m.fractional else "integer",
                "minimum": 0,
                "maximum": MAX_VALUE,
            }
            for m in spec.measures
        },
        "additionalProperties": False,
    }


def _dimension(dim: Dimension) -> dict[str, Any]:
    if dim.kind == "bool":
        return {"type": ["boolean", "null"]}
    if dim.allowed is not None:
        return {"enum": [*sorted(dim.allowed), None]}
    return {"anyOf": [{"type": "null"}, fields.TEXT]}


def _dimensions(spec: MeterSpec) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {d.name: _dimension(d) for d in spec.dimensions},
        "additionalProperties": False,
    }


def meter_schemas(specs: Mapping[str, MeterSpec]) -> dict[str, Any]:
    """``Event`` and ``CloudEvent`` as this server takes them: one form per meter, with that
    meter's measures (whole numbers unless fractional) and dimensions (their allowed values)
    and nothing else. (A total given with all its parts must equal their sum, which JSON
    Schema cannot say.)"""
    native, cloud = [], []
    for name, spec in sorted(specs.items()):
        values, dims = _values(spec), _dimensions(spec)
        event = {**_EVENT, "properties": {**_EVENT["properties"], "meter": {"const": name}}}
        event["properties"]["values"], event["properties"]["dimensions"] = values, dims
        native.append(event)
        data = {**_CLOUD_EVENT["properties"]["data"]}
        data["properties"] = {"values": values, "dimensions": dims}
        kind = {
            "enum": [f"meterkit.{name}", name],
            "description": "meterkit.<meter>, or the bare meter name.",
        }
        properties = {**_CLOUD_EVENT["properties"], "type": kind, "data": data}
        cloud.append({**_CLOUD_EVENT, "properties": properties})
    return {"Event": {"oneOf": native}, "CloudEvent": {"oneOf": cloud}}


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
