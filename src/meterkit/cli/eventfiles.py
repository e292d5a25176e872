"""Reading and writing events as files: NDJSON, JSON arrays, CSV and CloudEvents.

:func:`read_events` turns a file's records into ``(line, event)`` pairs (``line`` counts from 1:
the line of an NDJSON record or a CSV row, the position of a JSON array's element) and a bad
record into a :class:`BadRecord` in its place, so a caller can report it and skip the batch it
belongs to. :func:`write_events` writes what :func:`read_events` reads back unchanged.

CSV columns are ``id``, ``meter``, ``organization_id``, ``time``, ``value.<measure>`` and
``dim.<dimension>``; ``--map COLUMN=FIELD`` names another column for any of them (``ts=time``,
``tokens=value.tokens``). An empty cell is an absent value or dimension. Numbers read as ``int``
unless written with a point or an exponent; a bool dimension reads ``true`` / ``false``.
Times are Unix seconds or RFC 3339. A record without an id gets one derived from its content,
so importing the same file again finds duplicates instead of new events.

**Safe to open in a spreadsheet.** A text cell that a spreadsheet would run as a formula —
starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return — is written with a
``'`` in front (OWASP's advice against CSV injection), and so is one that starts with ``'``
followed by such a character or another ``'``; reading takes exactly that ``'`` off again, so
export → import is lossless (:func:`escape_cell`, :func:`unescape_cell`). Numbers are written
as they are. A cell holding a comma, a quote, a line feed or a carriage return is quoted
(:func:`csv_row`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any, Literal

import attrs

from meterkit import eventio
from meterkit.convert import native_converter
from meterkit.errors import ValidationError
from meterkit.models import Event, MeterSpec

__all__ = [
    "FORMATS",
    "BadRecord",
    "Format",
    "csv_cell",
    "csv_row",
    "derived_id",
    "detect_format",
    "escape_cell",
    "read_events",
    "unescape_cell",
    "write_events",
]

Format = Literal["ndjson", "json", "csv", "cloudevents"]
FORMATS: tuple[str, ...] = ("ndjson", "json", "csv", "cloudevents")
_CSV_FIELDS = ("id", "meter", "organization_id", "time")


_FORMULA = ("=", "+", "-", "@", "\t", "\r")
_QUOTED = frozenset(',"\r\n')


def _quote_first(text: str) -> bool:
    """Whether ``text`` is ``'`` followed by a formula character or another ``'``: what an
    escaped cell looks like, so a cell that already does is escaped too."""
    return text.startswith("'") and len(text) > 1 and (text[1] == "'" or text[1] in _FORMULA)


def escape_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text, never runs: ``'`` in front of one starting
    with a formula character (or with ``'`` and then one, or ``''``)."""
    return "'" + text if text.startswith(_FORMULA) or _quote_first(text) else text


def unescape_cell(text: str) -> str:
    """What :func:`escape_cell` was given: its ``'`` taken off again (only that one)."""
    return text[1:] if _quote_first(text) else text


def csv_row(cells: Iterable[str]) -> str:
    """One CSV line: cells joined by commas, each quoted where it holds a comma, a quote or
    a line break (``\r`` too, which :mod:`csv` would leave bare), ending in ``\n``."""
    out = [c if _QUOTED.isdisjoint(c) else '"' + c.replace('"', '""') + '"' for c in cells]
    if out == [""]:
        out = ['""']  # a row of one empty cell, not a blank line
    return ",".join(out) + "\n"


@attrs.frozen
class BadRecord:
    """A record that is not an event: where it is and why."""

    line: int
    message: str


def detect_format(name: str, head: str) -> Format:
    """The format of a file from its name, else from its first characters."""
    lower = name.lower()
    if lower.endswith((".ndjson", ".jsonl")):
        return "ndjson"
    if lower.endswith(".csv"):
        return "csv"
    stripped = head.lstrip()
    if stripped.startswith("["):
        return "cloudevents" if '"specversion"' in head else "json"
    if stripped.startswith("{"):
        return "cloudevents" if '"specversion"' in head.split("\n", 1)[0] else "ndjson"
    return "csv"


def derived_id(event: Event) -> str:
    """An id from an event's content: the same record always gets the same one."""
    raw = json.dumps(
        [event.meter, event.organization_id, event.time, event.values, event.dimensions],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return "imp_" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def _time(value: Any, field: str) -> Any:
    """Unix seconds as given (the meter checks them), or an RFC 3339 string converted."""
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        return eventio.parse_rfc3339(text, field)
    return value


class _Strings:
    """One object per distinct name and dimension value: the JSON decoder makes a new string
    for every key of every record, and storing events whose strings are shared (their hashes
    computed once, compared by identity) costs a tenth less. Bounded: forgets past 100,000."""

    def __init__(self) -> None:
        self.seen: dict[Any, Any] = {}
        # share(s, s): the first object equal to s.
        self.share: Callable[[Any, Any], Any] = self.seen.setdefault

    def event(self, event: Event) -> Event:
        """``event`` with its names and string dimension values shared."""
        if len(self.seen) > 100_000:
            self.seen.clear()
        share = self.share
        values, dims = event.values, event.dimensions
        if type(values) is not dict or type(dims) is not dict:
            return event
        return Event(
            event.id,
            share(event.meter, event.meter),
            share(event.organization_id, event.organization_id),
            event.time,
            {share(k, k): v for k, v in values.items()},
            {share(k, k): share(v, v) if type(v) is str else v for k, v in dims.items()},
        )


_NATIVE = frozenset({"id", "meter", "organization_id", "time", "values", "dimensions"})
_NATIVE_REQUIRED = frozenset({"meter", "organization_id", "values"})


def _fast_native(item: Any, strings: _Strings) -> Event | None:
    """The common case, a well-formed native event, built at once with shared strings (or
    ``None``: let :func:`meterkit.eventio.native_event` say what is wrong)."""
    if type(item) is not dict:
        return None
    keys = item.keys()
    if not (keys <= _NATIVE and keys >= _NATIVE_REQUIRED):
        return None
    values, dims, time = item["values"], item.get("dimensions") or {}, item.get("time")
    if type(values) is not dict or type(dims) is not dict or type(time) is str:
        return None
    if len(strings.seen) > 100_000:
        strings.seen.clear()
    share = strings.share
    meter, org = item["meter"], item["organization_id"]
    event = Event(
        item.get("id"),  # type: ignore[arg-type]
        share(meter, meter) if type(meter) is str else meter,
        share(org, org) if type(org) is str else org,
        time,  # type: ignore[arg-type]
        {share(k, k): v for k, v in values.items()},
        {share(k, k): share(v, v) if type(v) is str else v for k, v in dims.items()},
    )
    return event if event.id else attrs.evolve(event, id=derived_id(event))


def _tidy(event: Event, field: str, strings: _Strings | None = None) -> Event:
    """The event with its RFC 3339 time in seconds, an id if it had none, shared strings."""
    if isinstance(event.time, str):
        event = attrs.evolve(event, time=_time(event.time, f"{field}.time"))
    if not event.id:
        event = attrs.evolve(event, id=derived_id(event))
    return event if strings is None else strings.event(event)


def _number(text: str, field: str) -> int | float:
    try:
        if any(c in text for c in ".eE") and not text.lower().startswith(("inf", "-inf", "nan")):
            return float(text)
        return int(text)
    except ValueError:
        raise ValidationError(field, f"is not a number: {text[:40]!r}") from None


def _dim(spec: MeterSpec | None, name: str, text: str, field: str) -> Any:
    dim = spec.dimension(name) if spec is not None else None
    if dim is not None and dim.kind == "bool":
        lowered = text.lower()
        if lowered not in ("true", "false"):
            raise ValidationError(field, f"must be true or false, not {text[:40]!r}")
        return lowered == "true"
    return text


# Bytes that are not UTF-8, as a reader opened with errors="surrogateescape" hands them on: a
# line holding one is reported by its number, and the lines around it still read.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]")
_NOT_UTF8_TEXT = "is not UTF-8 text"


def _not_utf8(text: str) -> re.Match[str] | None:
    """Where ``text`` holds bytes that were not UTF-8 (an ASCII text, the common case,
    cannot: the search is skipped)."""
    return None if text.isascii() else _ESCAPED_BYTES.search(text)


def _csv_events(
    handle: IO[str],
    specs: Mapping[str, MeterSpec],
    mapping: Mapping[str, str],
    defaults: Mapping[str, str],
) -> Iterator[tuple[int, Event | BadRecord]]:
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        yield 1, BadRecord(1, f"is not valid CSV: {exc}")
        return
    fields = [mapping.get(name, name) for name in header]
    for name in fields:
        if name not in _CSV_FIELDS and not name.startswith(("value.", "dim.")):
            yield (
                1,
                BadRecord(
                    1,
                    f"column {name!r} is none of {', '.join(_CSV_FIELDS)}, "
                    "value.<measure>, dim.<dimension> (map it with --map)",
                ),
            )
            return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # a cell over the field limit, a NUL byte
            yield reader.line_num, BadRecord(reader.line_num, f"is not valid CSV: {exc}")
            continue
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if any(_not_utf8(cell) for cell in row):
            yield line, BadRecord(line, _NOT_UTF8_TEXT)
            continue
        if len(row) != len(fields):
            yield line, BadRecord(line, f"has {len(row)} cells, the header {len(fields)}")
            continue
        try:
            cells = {
                name: text if name == "time" or name.startswith("value.") else unescape_cell(text)
                for name, text in zip(fields, row)
            }
            meter = cells.get("meter") or defaults.get("meter")
            org = cells.get("organization_id") or defaults.get("organization_id")
            if not meter:
                raise ValidationError("meter", "is missing (give the column or --meter)")
            if not org:
                raise ValidationError("organization_id", "is missing (give the column or --org)")
            spec = specs.get(meter)
            values = {
                name[6:]: _number(text.strip(), name)
                for name, text in cells.items()
                if name.startswith("value.") and text.strip()
            }
            dims = {
                name[4:]: _dim(spec, name[4:], text, name)
                for name, text in cells.items()
                if name.startswith("dim.") and text != ""
            }
            time = cells.get("time", "").strip()
            event = Event(
                cells.get("id", ""),
                meter,
                org,
                _time(time, "time") if time else None,  # type: ignore[arg-type]
                values,
                dims,
            )
            yield line, _tidy(event, "row")
        except ValidationError as exc:
            yield line, BadRecord(line, f"{exc.field}: {exc.message}")


def read_events(
    handle: IO[str],
    fmt: Format,
    specs: Mapping[str, MeterSpec],
    *,
    mapping: Mapping[str, str] | None = None,
    defaults: Mapping[str, str] | None = None,
) -> Iterator[tuple[int, Event | BadRecord]]:
    """Each record of ``handle`` as ``(line, event or BadRecord)``, in order.

    ``defaults`` gives ``meter`` and ``organization_id`` for records that name none (CSV
    rows, native events, CloudEvents without a subject)."""
    defaults = defaults or {}
    strings = _Strings()
    if fmt == "csv":
        yield from _csv_events(handle, specs, mapping or {}, defaults)
        return
    if fmt == "ndjson" and not defaults:
        yield from _ndjson_events(handle, strings)
        return
    if fmt == "ndjson":
        items: Iterable[tuple[int, Any]] = _ndjson_items(handle)
    else:
        items = _array_items(handle)
    yield from _events_of(items, fmt, defaults, strings)


def _ndjson_events(handle: IO[str], strings: _Strings) -> Iterator[tuple[int, Event | BadRecord]]:
    """NDJSON without defaults to fill in: one tight loop for the common case, well-formed
    native events (the rest go the long way, for their messages)."""
    loads = json.loads
    for line, text in enumerate(handle, 1):
        if _not_utf8(text):
            yield line, BadRecord(line, _NOT_UTF8_TEXT)
            continue
        try:
            item = loads(text)
        except (ValueError, RecursionError) as exc:
            if text.strip():
                yield line, BadRecord(line, _not_json(exc))
            continue
        event = _fast_native(item, strings)
        if event is not None:
            yield line, event
        else:
            yield from _events_of(((line, item),), "ndjson", {}, strings)


def _events_of(
    items: Iterable[tuple[int, Any]],
    fmt: Format,
    defaults: Mapping[str, str],
    strings: _Strings,
) -> Iterator[tuple[int, Event | BadRecord]]:
    for line, item in items:
        if isinstance(item, BadRecord):
            yield line, item
            continue
        try:
            if fmt == "cloudevents" or (isinstance(item, dict) and "specversion" in item):
                org = None
                if isinstance(item, dict) and not item.get("subject"):
                    org = defaults.get("organization_id")
                event = eventio.cloud_event(item, "event", organization_id=org)
            else:
                if defaults and isinstance(item, dict):
                    item = {**defaults, **item}
                fast = _fast_native(item, strings)
                if fast is not None:
                    yield line, fast
                    continue
                event = eventio.native_event(item, "event")
            yield line, _tidy(event, "event", strings)
        except ValidationError as exc:
            yield line, BadRecord(line, f"{exc.field}: {exc.message}")


def _not_json(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "is nested too deeply to read"
    return f"is not valid JSON: {str(exc)[:200]}"


def _ndjson_items(handle: IO[str]) -> Iterator[tuple[int, Any]]:
    for line, text in enumerate(handle, 1):
        if not text.strip():
            continue
        if _not_utf8(text):
            yield line, BadRecord(line, _NOT_UTF8_TEXT)
            continue
        try:
            item = json.loads(text)
        except (ValueError, RecursionError) as exc:
            yield line, BadRecord(line, _not_json(exc))
        else:
            yield line, item


def _array_items(handle: IO[str]) -> Iterator[tuple[int, Any]]:
    text = handle.read()
    bad = _not_utf8(text)
    if bad is not None:
        # One document: it cannot be read around the bytes that are not UTF-8.
        line = text.count("\n", 0, bad.start()) + 1
        yield line, BadRecord(line, _NOT_UTF8_TEXT)
        return
    try:
        data = json.loads(text) if text.strip() else []
    except (ValueError, RecursionError) as exc:
        yield 1, BadRecord(1, _not_json(exc))
        return
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        yield 1, BadRecord(1, "must be a JSON array of events")
        return
    yield from enumerate(data, 1)


def write_events(
    out: IO[str],
    events: Iterable[Event],
    fmt: Literal["ndjson", "csv"],
    specs: Mapping[str, MeterSpec],
) -> int:
    """Write ``events`` as NDJSON native events or CSV (columns from ``specs``); the count."""
    count = 0
    if fmt == "ndjson":
        for event in events:
            out.write(json.dumps(native_converter.unstructure(event), separators=(",", ":")) + "\n")
            count += 1
        return count
    measures = sorted({m for spec in specs.values() for m in spec.measure_names})
    dims = sorted({d for spec in specs.values() for d in spec.dimension_names})
    out.write(
        csv_row([*_CSV_FIELDS, *(f"value.{m}" for m in measures), *(f"dim.{d}" for d in dims)])
    )
    for event in events:
        values = [_cell(event.values.get(m)) for m in measures]
        cells = [csv_cell(event.dimensions.get(d)) for d in dims]
        named = (
            escape_cell(event.id),
            escape_cell(event.meter),
            escape_cell(event.organization_id),
        )
        out.write(csv_row([*named, str(event.time), *values, *cells]))
        count += 1
    return count


def csv_cell(value: Any) -> str:
    """A CSV cell: text neutralised for spreadsheets, anything else as it is (``None`` is
    empty, a bool ``true`` / ``false``)."""
    return escape_cell(value) if isinstance(value, str) else _cell(value)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)
