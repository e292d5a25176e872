"""Input checks. Each raises :class:`ValidationError` naming the field; none has side effects."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from meterkit.errors import ValidationError
from meterkit.models import DimValue, Event, MeterSpec, Number, UsageQuery

__all__ = [
    "BUCKET_WIDTHS",
    "MAX_STRING",
    "MAX_TIME",
    "MAX_VALUE",
    "as_whole",
    "check_event",
    "check_id",
    "check_record",
    "check_string",
    "check_time",
    "check_usage_query",
]

MAX_STRING = 256
MAX_TIME = 253402300799  # 9999-12-31T23:59:59Z
# JSON-safe integers; sums of many of them still fit SQL's 64-bit integers.
MAX_VALUE = 2**53 - 1

BUCKET_WIDTHS: dict[str, tuple[int, int, int]] = {
    # width: (seconds, default limit, max limit)
    "1m": (60, 60, 1440),
    "1h": (3600, 24, 168),
    "1d": (86400, 7, 31),
}


_CONTROL = re.compile("[\x00-\x1f\ud800-\udfff]")
# What no store keeps as text: NUL (no SQL text type stores it) and lone surrogates (not
# UTF-8 at all). Refused everywhere, so every store accepts and refuses the same strings.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def as_whole(value: object) -> object:
    """A whole float (``2747.0``) as the int it equals, as JSON Schema's ``integer`` has it;
    anything else unchanged (and so refused by an int check as before)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_VALUE:
        return int(value)
    return value


def check_string(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, not {type(value).__name__}")
    if not value:
        raise ValidationError(field, "must not be empty")
    if len(value) > MAX_STRING:
        raise ValidationError(field, f"is longer than {MAX_STRING} characters")
    _refuse_unstorable(field, value)
    return value


def _refuse_unstorable(field: str, text: str) -> None:
    bad = _UNSTORABLE.search(text)
    if bad is not None:
        what = "NUL characters" if bad.group() == "\x00" else "lone surrogates (not UTF-8)"
        raise ValidationError(field, f"must not contain {what}")


def check_record(kind: str, key: str, data: object) -> None:
    """A record every store can keep as JSON text: no NUL and no lone surrogate in any key or
    string, at any depth (PostgreSQL's ``jsonb`` refuses both; SQLite would keep them). Every
    store calls this before writing, so all of them accept and refuse the same records."""

    def walk(path: str, value: object) -> None:
        if isinstance(value, str):
            _refuse_unstorable(path, value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{path}.{k}", k)
                walk(f"{path}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{path}[{i}]", item)

    walk("kind", kind)
    walk("key", key)
    walk(kind, data)


def check_id(field: str, value: object) -> str:
    value = check_string(field, value)
    if value != value.strip() or _CONTROL.search(value):
        raise ValidationError(field, "must not contain control characters or edge spaces")
    return value


def check_time(field: str, value: object) -> int:
    """Integer Unix seconds, or an aware datetime (converted to its UTC second)."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValidationError(field, "datetime must be timezone-aware")
        value = math.floor(value.timestamp())
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(
            field, f"must be integer Unix seconds or an aware datetime, not {type(value).__name__}"
        )
    if not 0 <= value <= MAX_TIME:
        raise ValidationError(field, f"must be between 0 and {MAX_TIME}")
    return value


def check_number(field: str, value: object, *, fractional: bool = True) -> Number:
    """A finite number from 0 to :data:`MAX_VALUE`; a whole one unless ``fractional``.

    A whole float (``3.0``) given for a whole-number measure is taken as the int ``3``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(field, f"must be a number, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(field, "must be finite")
    if value < 0:
        raise ValidationError(field, "must not be negative")
    if value > MAX_VALUE:
        raise ValidationError(field, f"must not exceed {MAX_VALUE}")
    if not fractional and isinstance(value, float):
        if not value.is_integer():
            raise ValidationError(
                field, "must be a whole number (this measure is not declared fractional)"
            )
        return int(value)
    return value


def check_dim_value(spec: MeterSpec, name: str, value: object, field: str) -> DimValue:
    dim = spec.dimension(name)
    if dim is None:
        raise ValidationError(field, f"meter {spec.name!r} has no dimension {name!r}")
    if value is None:
        return None
    if dim.kind == "bool":
        if not isinstance(value, bool):
            raise ValidationError(field, f"must be true or false, not {type(value).__name__}")
        return value
    value = check_string(field, value)
    if dim.allowed is not None and value not in dim.allowed:
        raise ValidationError(field, f"must be one of {sorted(dim.allowed)}")
    return value


def _plain_id(value: object) -> bool:
    """The common case of :func:`check_id` passing, without building field names."""
    return (
        type(value) is str
        and 0 < len(value) <= MAX_STRING
        and value == value.strip()
        and not _CONTROL.search(value)
    )


class _SpecIndex:
    """A meter's measure names and dimensions by name, for validating many events fast."""

    __slots__ = ("defaults", "dims", "fractional", "measures", "spec", "sums")

    def __init__(self, spec: MeterSpec) -> None:
        self.spec = spec
        self.measures = frozenset(spec.measure_names)
        self.fractional = frozenset(m.name for m in spec.measures if m.fractional)
        self.dims = {d.name: (d.kind == "bool", d.allowed) for d in spec.dimensions}
        self.defaults = {d.name: d.default for d in spec.dimensions if d.default is not None}
        self.sums = spec.sums


_INDEXES: dict[int, _SpecIndex] = {}


def _index(spec: MeterSpec) -> _SpecIndex:
    # Keyed by identity (specs are frozen); the entry keeps its spec alive, so ids stay unique.
    idx = _INDEXES.get(id(spec))
    if idx is None or idx.spec is not spec:
        if len(_INDEXES) >= 1024:
            _INDEXES.clear()
        idx = _INDEXES[id(spec)] = _SpecIndex(spec)
    return idx


def check_event(spec: MeterSpec, event: Event, field: str = "event") -> Event:
    """Validate ``event`` against its meter; returns it with plain-dict values and dimensions.

    Each check has a fast path for plain input (exact ``str`` / ``int`` / ``float`` / ``bool``
    within limits) that builds no field names; anything else goes through the full check,
    which raises the error.
    """
    idx = _index(spec)
    if not (_plain_id(event.id) and _plain_id(event.organization_id)):
        check_id(f"{field}.id", event.id)
        check_id(f"{field}.organization_id", event.organization_id)
    time = event.time
    if type(time) is not int or not 0 <= time <= MAX_TIME:
        time = check_time(f"{field}.time", time)
    if not isinstance(event.values, Mapping):
        raise ValidationError(f"{field}.values", "must be a mapping of measure to number")
    if not isinstance(event.dimensions, Mapping):
        raise ValidationError(f"{field}.dimensions", "must be a mapping of dimension to value")
    measures, fractional = idx.measures, idx.fractional
    values: dict[str, Number] = {}
    for name, value in event.values.items():
        kind = type(value)
        if (
            type(name) is str
            and name in measures
            and (kind is int or (kind is float and name in fractional))
            and 0 <= value <= MAX_VALUE  # False for NaN: the full check names it
        ):
            values[name] = value
            continue
        if not isinstance(name, str) or spec.measure(name) is None:
            raise ValidationError(f"{field}.values", f"meter {spec.name!r} has no measure {name!r}")
        values[name] = check_number(f"{field}.values.{name}", value, fractional=name in fractional)
    dims_index = idx.dims
    dims: dict[str, DimValue] = {}
    for name, dim_value in event.dimensions.items():
        known = dims_index.get(name) if type(name) is str else None
        if known is not None:
            is_bool, allowed = known
            if dim_value is None:
                dims[name] = None
                continue
            if is_bool:
                if type(dim_value) is bool:
                    dims[name] = dim_value
                    continue
            elif (
                type(dim_value) is str
                and 0 < len(dim_value) <= MAX_STRING
                and (allowed is None or dim_value in allowed)
                # ASCII text, the common case, is told without the regex.
                and (
                    ("\x00" not in dim_value and dim_value.isascii())
                    or not _UNSTORABLE.search(dim_value)
                )
            ):
                dims[name] = dim_value
                continue
        if not isinstance(name, str):
            raise ValidationError(f"{field}.dimensions", "names must be strings")
        dims[name] = check_dim_value(spec, name, dim_value, f"{field}.dimensions.{name}")
    if idx.defaults:
        for name, default in idx.defaults.items():
            if dims.get(name) == default:
                dims[name] = None  # the same event as one that leaves it out
    for total, parts in idx.sums:
        if total in values and all(p in values for p in parts):
            added = sum(values[p] for p in parts)
            if added != values[total]:
                raise ValidationError(
                    f"{field}.values.{total}",
                    f"is {values[total]}, but {' + '.join(parts)} = {added}: the parts of a "
                    "total must add up to it when all of them are given",
                )
    return Event(event.id, event.meter, event.organization_id, time, values, dims)


def _check_names(field: str, spec: MeterSpec, names: Iterable[Any]) -> tuple[str, ...]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise ValidationError(field, "must be a list of dimension names")
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or spec.dimension(name) is None:
            raise ValidationError(field, f"meter {spec.name!r} cannot group by {name!r}")
        if name not in out:
            out.append(name)
    return tuple(out)


def check_usage_query(
    spec: MeterSpec,
    *,
    organization_id: object,
    start_time: object,
    end_time: object,
    bucket_width: object,
    group_by: object,
    filters: object,
    limit: object,
    widths: Mapping[str, tuple[int, int, int]] = BUCKET_WIDTHS,
) -> UsageQuery:
    """Validate a bucket query's parameters; ``page_start`` is set to the first bucket.

    ``widths`` maps each allowed ``bucket_width`` to (seconds, default limit, max limit).
    """
    org = check_id("organization_id", organization_id)
    start = check_time("start_time", start_time)
    end = check_time("end_time", end_time)
    if end <= start:
        raise ValidationError("end_time", "must be greater than start_time")
    if not isinstance(bucket_width, str) or bucket_width not in widths:
        raise ValidationError("bucket_width", f"must be one of {list(widths)}")
    width, default_limit, max_limit = widths[bucket_width]
    if limit is None:
        limit = default_limit
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValidationError("limit", "must be an integer")
    if not 1 <= limit <= max_limit:
        raise ValidationError("limit", f"must be between 1 and {max_limit} for {bucket_width}")
    groups = _check_names("group_by", spec, group_by or ())  # type: ignore[arg-type]
    filter_items: list[tuple[str, tuple[DimValue, ...]]] = []
    if filters is not None:
        if not isinstance(filters, Mapping):
            raise ValidationError("filters", "must be a mapping of dimension to allowed values")
        for name, allowed in filters.items():
            field = f"filters.{name}"
            if not isinstance(name, str) or spec.dimension(name) is None:
                raise ValidationError(field, f"meter {spec.name!r} has no dimension {name!r}")
            if isinstance(allowed, (str, bytes, bool)) or not isinstance(allowed, Iterable):
                raise ValidationError(field, "must be a list of values")
            default = spec.dimension(name).default  # type: ignore[union-attr]
            vals = tuple(
                dict.fromkeys(
                    None if checked == default else checked
                    for checked in (check_dim_value(spec, name, v, field) for v in allowed)
                )
            )
            if not vals:
                raise ValidationError(field, "must not be empty")
            filter_items.append((name, vals))
    filter_items.sort(key=lambda item: item[0])
    return UsageQuery(
        meter=spec.name,
        organization_id=org,
        start_time=start,
        end_time=end,
        bucket_width=bucket_width,
        width=width,
        group_by=groups,
        filters=tuple(filter_items),
        limit=limit,
        page_start=start - start % width,
    )
