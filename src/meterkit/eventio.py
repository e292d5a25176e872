"""Events as files and messages carry them: native JSON objects and CloudEvents 1.0.

A *native* event is the JSON form of :class:`~meterkit.models.Event` (``id``, ``meter``,
``organization_id``, ``time``, ``values``, ``dimensions``; see :mod:`meterkit.convert`). A
CloudEvent (structured mode) names the meter in ``type`` (``meterkit.<meter>`` or ``<meter>``),
the organization in ``subject``, its time in RFC 3339 ``time`` and carries ``{"values": ...,
"dimensions": ...}`` as ``data``. The HTTP ingest endpoint and ``meterkit import`` read both;
values and dimensions are checked against the meter when the events are recorded.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

from meterkit.errors import ValidationError
from meterkit.models import Event

__all__ = [
    "CLOUDEVENT",
    "CLOUDEVENTS_BATCH",
    "JSON",
    "NDJSON",
    "cloud_event",
    "native_event",
    "parse_rfc3339",
]

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


_NATIVE_FIELDS = frozenset({"id", "meter", "organization_id", "time", "values", "dimensions"})
_NATIVE_REQUIRED = frozenset({"meter", "organization_id", "values"})


def native_event(item: Any, field: str) -> Event:
    """A native event object as an :class:`Event` (time may be ``None``: "now"). Only its
    fields are checked here; types are checked against the meter when it is recorded."""
    if not isinstance(item, dict):
        raise ValidationError(field, "must be a JSON object")
    keys = item.keys()
    if not keys <= _NATIVE_FIELDS:
        raise ValidationError(field, f"unknown event fields: {sorted(keys - _NATIVE_FIELDS)}")
    if not keys >= _NATIVE_REQUIRED:
        raise ValidationError(field, f"missing event fields: {sorted(_NATIVE_REQUIRED - keys)}")
    return Event(
        item.get("id"),  # type: ignore[arg-type]
        item["meter"],
        item["organization_id"],
        item.get("time"),  # type: ignore[arg-type]
        item["values"],
        item.get("dimensions") or {},
    )


def cloud_event(item: Any, field: str, *, organization_id: str | None = None) -> Event:
    """A CloudEvent as an :class:`Event`: its ``subject`` is the organization unless
    ``organization_id`` is given (the HTTP endpoint checks the subject itself)."""
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
    if organization_id is None:
        subject = item.get("subject")
        if not isinstance(subject, str) or not subject:
            raise ValidationError(f"{field}.subject", "must name the organization")
        organization_id = subject
    time = item.get("time")
    seconds = parse_rfc3339(time, f"{field}.time") if time is not None else None
    # id, values and dimensions are checked against the meter, with the rest, by record_many.
    return Event(
        id=item.get("id"),  # type: ignore[arg-type]
        meter=meter,
        organization_id=organization_id,
        time=seconds,  # type: ignore[arg-type]  # None: record_many stamps "now"
        values=data["values"],
        dimensions=data.get("dimensions") or {},
    )
