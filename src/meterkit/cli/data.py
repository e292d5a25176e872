"""The data commands of ``meterkit``: record, import, export, usage, costs, quota, top, plans,
metrics, prices, doctor and shell completion (see docs/cli.md).

Every command exits 2 on bad input with one line naming the option at fault, 1 when the store
does not answer, and a command that only reads never creates a store.
"""

from __future__ import annotations

import datetime as dt
import functools
import gc
import io
import json
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, cast

import click

from meterkit import overview
from meterkit.cli import eventfiles
from meterkit.cli.common import BadInput, open_meter, reported, store_options
from meterkit.errors import EventConflict, ValidationError
from meterkit.eventio import parse_rfc3339
from meterkit.http.openai import FILTERS
from meterkit.meter import Meter
from meterkit.metrics import Metric
from meterkit.models import Event, UsagePage
from meterkit.periods import BillingCycle
from meterkit.plans import UNLIMITED, Plan
from meterkit.pricing import price_to_dict
from meterkit.recovery import counted_organizations, counter_differences
from meterkit.stores.base import RollupStore

__all__ = ["COMMANDS"]

FORMATS = ("table", "json", "csv")


def _time(option: str, text: str | None) -> int | None:
    """Unix seconds or an RFC 3339 time (``2025-12-01T00:00:00Z``; a bare date is midnight UTC)."""
    if text is None:
        return None
    value = text.strip()
    if value.lstrip("-").isdigit():
        return int(value)
    if len(value) == 10 and value[4] == "-" and value[7] == "-":
        value += "T00:00:00Z"
    try:
        return parse_rfc3339(value, option)
    except ValidationError:
        raise BadInput(f"{option}: {text!r} is neither Unix seconds nor an RFC 3339 time") from None


def _pairs(option: str, items: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BadInput(f"{option}: {item!r} must be NAME=VALUE")
        out.append((name.strip(), value))
    return out


def _number(option: str, text: str) -> int | float:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise BadInput(f"{option}: {text!r} is not a number") from None


@contextmanager
def _fields(names: Mapping[str, str]) -> Iterator[None]:
    """Name the option behind a field in a ValidationError (``values.x`` -> ``--value``)."""
    try:
        yield
    except ValidationError as exc:
        field = exc.field
        if field.startswith("event."):
            field = field[6:]
        head = field.split(".", 1)[0].split("[", 1)[0]
        option = names.get(head)
        where = f"{option} ({exc.field})" if option and option != exc.field else exc.field
        raise BadInput(f"{where}: {exc.message}") from None


def _store_options(func: Any) -> Any:
    """``--config``, ``--db`` and ``--now`` (the clock starts there: for scripts and tests)."""
    inner = store_options(func)

    @functools.wraps(inner)
    def with_now(*args: Any, now: int | None = None, **kwargs: Any) -> Any:
        click.get_current_context().meta["meterkit.now"] = now
        return inner(*args, **kwargs)

    return click.option(
        "--now",
        type=click.IntRange(0),
        default=None,
        metavar="SECONDS",
        help="Act as if it were this Unix time (the clock runs on from there).",
    )(with_now)


def _meter(config: Path | None, db: str | None, *, existing: bool) -> Meter:
    now = click.get_current_context().meta.get("meterkit.now")
    return open_meter(config, db, now, existing=existing)


# -- record -----------------------------------------------------------------------------------


@click.command("record")
@click.argument("meter")
@click.option("--org", "organization_id", required=True, help="The organization.")
@click.option("-v", "--value", "values", multiple=True, metavar="MEASURE=N", help="A measure.")
@click.option("-d", "--dim", "dims", multiple=True, metavar="NAME=VALUE", help="A dimension.")
@click.option("--time", "when", metavar="T", help="Unix seconds or RFC 3339 (default: now).")
@click.option("--id", "event_id", metavar="ID", help="The event id (default: a new one).")
@_store_options
def record(
    meter: str,
    organization_id: str,
    values: tuple[str, ...],
    dims: tuple[str, ...],
    when: str | None,
    event_id: str | None,
    config: Path | None,
    db: str | None,
) -> None:
    """Record one event: `meterkit record tokens --org org_1 -v tokens=120 -d model=gpt-4o`."""
    numbers = {name: _number("--value", text) for name, text in _pairs("--value", values)}
    if not numbers:
        raise BadInput("--value: give at least one MEASURE=N")
    m = _meter(config, db, existing=False)
    try:
        spec = m.meters.get(meter)
        if spec is None:
            raise BadInput(f"METER: unknown meter {meter!r} (known: {', '.join(sorted(m.meters))})")
        dimensions: dict[str, Any] = {}
        for name, text in _pairs("--dim", dims):
            dim = spec.dimension(name)
            if dim is not None and dim.kind == "bool":
                if text.lower() not in ("true", "false"):
                    raise BadInput(f"--dim: {name} must be true or false")
                dimensions[name] = text.lower() == "true"
            else:
                dimensions[name] = text
        names = {
            "values": "--value",
            "dimensions": "--dim",
            "time": "--time",
            "id": "--id",
            "organization_id": "--org",
            "event": "METER",
            "meter": "METER",
        }
        with reported(), _fields(names):
            new = m.record(
                meter,
                numbers,
                organization_id=organization_id,
                time=_time("--time", when),
                id=event_id,
                dimensions=dimensions,
            )
        click.echo("recorded" if new else "duplicate: already recorded with the same data")
    except EventConflict as exc:
        raise BadInput(f"--id: {exc}") from None
    finally:
        m.close()


# -- import -----------------------------------------------------------------------------------


class _Progress:
    """A progress bar with events/s and ETA on a terminal (rich), nothing otherwise."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.bar: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[events]:>10,} events"),
            TextColumn("{task.fields[rate]:>8,.0f}/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task("import", total=total, events=0, rate=0.0)
        self.started = time.perf_counter()

    def update(self, done_bytes: int, events: int) -> None:
        if self.bar is not None:
            rate = events / max(time.perf_counter() - self.started, 1e-9)
            self.bar.update(self.task, completed=done_bytes, events=events, rate=rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _Counted(io.RawIOBase):
    """A binary stream that counts the bytes read through it (for the progress bar)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.read_bytes += len(data)
        return len(data)


@click.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", *eventfiles.FORMATS]),
    default="auto",
    show_default=True,
    help="auto: by the file's name, else its first characters.",
)
@click.option(
    "--map", "mapping", multiple=True, metavar="COLUMN=FIELD", help="CSV: a column's field."
)
@click.option("--meter", "default_meter", help="The meter of records that name none.")
@click.option("--org", "default_org", help="The organization of records that name none.")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=5000, show_default=True)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress bar on stderr (default: when stderr is a terminal).",
)
@_store_options
def import_(
    files: tuple[str, ...],
    fmt: str,
    mapping: tuple[str, ...],
    default_meter: str | None,
    default_org: str | None,
    batch_size: int,
    progress: bool | None,
    config: Path | None,
    db: str | None,
) -> None:
    """Import events from NDJSON, JSON arrays, CSV or CloudEvents files (`-` is stdin).

    Batched and idempotent: events already stored are reported as duplicates (or conflicts,
    with other data). A bad record is reported with its line; the batch it is in stores
    nothing, and the command exits 2 once the rest is imported."""
    columns = dict(_pairs("--map", mapping))
    for field in columns.values():
        if field not in ("id", "meter", "organization_id", "time") and not field.startswith(
            ("value.", "dim.")
        ):
            raise BadInput(
                f"--map: {field!r} must be id, meter, organization_id, time, value.<measure> "
                "or dim.<dimension>"
            )
    for name in files:
        if name != "-" and not Path(name).is_file():
            raise BadInput(f"FILES: {name} is not a file")
    defaults = {k: v for k, v in (("meter", default_meter), ("organization_id", default_org)) if v}
    show = sys.stderr.isatty() if progress is None else progress
    m = _meter(config, db, existing=False)
    totals = {"read": 0, "accepted": 0, "duplicates": 0, "conflicts": 0, "bad": 0, "reported": 0}
    conflicts: list[str] = []
    try:
        with _few_collections():
            for name in files:
                _import_file(m, name, fmt, columns, defaults, batch_size, show, totals, conflicts)
    finally:
        m.close()
    click.echo(
        f"{totals['read']:,} events read: {totals['accepted']:,} new, "
        f"{totals['duplicates']:,} duplicates, {totals['conflicts']:,} conflicts, "
        f"{totals['bad']:,} in batches not stored",
        err=True,
    )
    if conflicts:
        shown = ", ".join(conflicts[:10]) + (" …" if len(conflicts) > 10 else "")
        click.echo(f"conflicts (stored with other data, left unchanged): {shown}", err=True)
    if totals["reported"] > MAX_REPORTED:
        click.echo(
            f"… and {totals['reported'] - MAX_REPORTED:,} more bad records not shown", err=True
        )
    if totals["bad"]:
        raise SystemExit(2)


MAX_REPORTED = 1000
"""Bad records an import names one by one; the rest are counted."""


def _report_bad(totals: dict[str, int], message: str) -> None:
    totals["reported"] += 1
    if totals["reported"] <= MAX_REPORTED:
        click.echo(message, err=True)


@contextmanager
def _few_collections() -> Iterator[None]:
    """Run the cyclic garbage collector rarely for the import's length.

    An import allocates millions of short-lived, acyclic containers (parsed JSON, events),
    which reference counting frees; at the default thresholds the collector would also walk
    them every 700 allocations, a quarter of the import's time. What was alive before is
    frozen out of its reach; the thresholds are restored afterwards."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _import_file(
    m: Meter,
    name: str,
    fmt: str,
    columns: Mapping[str, str],
    defaults: Mapping[str, str],
    batch_size: int,
    show: bool,
    totals: dict[str, int],
    conflicts: list[str],
) -> None:
    raw: IO[bytes] = sys.stdin.buffer if name == "-" else Path(name).open("rb")  # noqa: SIM115
    size = None if name == "-" else Path(name).stat().st_size
    counted = _Counted(raw)
    buffered = io.BufferedReader(counted, buffer_size=1 << 16)
    # Bytes that are not UTF-8 reach the reader as lone surrogates: it reports their line.
    handle = io.TextIOWrapper(buffered, encoding="utf-8", errors="surrogateescape", newline="")
    try:
        chosen = fmt
        if fmt == "auto":
            head = buffered.peek(4096)[:4096].decode("utf-8", "replace")
            chosen = eventfiles.detect_format(name, head)
        bar = _Progress(show, size)
        number = 0

        def store(batch: list[tuple[int, Event]], bad: list[eventfiles.BadRecord]) -> None:
            nonlocal number
            number += 1
            lines = [line for line, _ in batch] + [b.line for b in bad]
            span = f"batch {number}, lines {min(lines)}-{max(lines)}"
            totals["read"] += len(batch) + len(bad)
            if bad:
                for record in bad:
                    _report_bad(
                        totals, f"{name}:{record.line}: {record.message} ({span}: not stored)"
                    )
                totals["bad"] += len(batch) + len(bad)
                return
            events = [e for _, e in batch]
            try:
                result = m.record_many(events)
            except ValidationError as exc:
                # Every bad event of the batch, not only the first, so one rerun fixes them.
                found = m.invalid_events(events) or [(-1, exc)]
                for _i, error in found:
                    line = _line_of(error.field, batch)
                    _report_bad(
                        totals,
                        f"{name}:{line}: {error.field}: {error.message} ({span}: not stored)",
                    )
                totals["bad"] += len(batch)
            else:
                totals["accepted"] += result.accepted
                totals["duplicates"] += result.duplicates
                totals["conflicts"] += len(result.conflicts)
                conflicts.extend(result.conflicts)

        records = eventfiles.read_events(
            handle, cast(eventfiles.Format, chosen), m.meters, mapping=columns, defaults=defaults
        )
        try:
            for batch, bad, read_bytes in _batches(records, batch_size, counted):
                store(batch, bad)
                bar.update(read_bytes, totals["read"])
        finally:
            bar.close()
    except UnicodeDecodeError:
        raise BadInput(f"FILES: {name} is not UTF-8 text") from None
    finally:
        if name != "-":
            raw.close()


def _batches(
    records: Iterable[tuple[int, Event | eventfiles.BadRecord]], size: int, counted: _Counted
) -> Iterator[tuple[list[tuple[int, Event]], list[eventfiles.BadRecord], int]]:
    """Records in batches of ``size``: (events with their lines, bad records, bytes read)."""
    batch: list[tuple[int, Event]] = []
    bad: list[eventfiles.BadRecord] = []
    for line, item in records:
        if isinstance(item, eventfiles.BadRecord):
            bad.append(item)
        else:
            batch.append((line, item))
        if len(batch) + len(bad) >= size:
            yield batch, bad, counted.read_bytes
            batch, bad = [], []
    if batch or bad:
        yield batch, bad, counted.read_bytes


def _line_of(field: str, batch: Sequence[tuple[int, Event]]) -> int:
    """The line of ``events[i]`` named by a record_many error, or the batch's first."""
    if field.startswith("events["):
        try:
            return batch[int(field[7 : field.index("]")])][0]
        except (ValueError, IndexError):
            pass
    return batch[0][0] if batch else 0


# -- export -----------------------------------------------------------------------------------


@click.command("export")
@click.option("--meter", "meters", multiple=True, help="A meter to export (default: all).")
@click.option("--org", "orgs", multiple=True, help="An organization (default: all).")
@click.option("--start-time", metavar="T", help="From this time (Unix seconds or RFC 3339).")
@click.option("--end-time", metavar="T", help="Before this time.")
@click.option(
    "--format", "fmt", type=click.Choice(["ndjson", "csv"]), default="ndjson", show_default=True
)
@click.option("-o", "--output", default="-", metavar="FILE", help="Write here (default: stdout).")
@_store_options
def export(
    meters: tuple[str, ...],
    orgs: tuple[str, ...],
    start_time: str | None,
    end_time: str | None,
    fmt: str,
    output: str,
    config: Path | None,
    db: str | None,
) -> None:
    """Export stored events as NDJSON or CSV; `meterkit import` reads them back unchanged."""
    start = _time("--start-time", start_time) or 0
    end = _time("--end-time", end_time)
    m = _meter(config, db, existing=True)
    try:
        specs = m.meters
        for name in meters:
            if name not in specs:
                raise BadInput(f"--meter: unknown meter {name!r}")
        chosen = {n: specs[n] for n in (meters or sorted(specs))}
        if not meters and isinstance(m.store, RollupStore):
            # Only meters with events: a CSV's columns are those of the meters it holds.
            chosen = {n: s for n, s in chosen.items() if _has_events(m, s)}
        out: IO[str] = (
            sys.stdout if output == "-" else Path(output).open("w", encoding="utf-8", newline="")  # noqa: SIM115
        )
        try:
            with reported():
                count = eventfiles.write_events(
                    out,
                    _events(m, chosen, orgs, start, end),
                    cast(Any, fmt),
                    chosen,
                )
        finally:
            if out is not sys.stdout:
                out.close()
    finally:
        m.close()
    click.echo(f"{count:,} events exported", err=True)


def _has_events(m: Meter, spec: Any) -> bool:
    store = m.store
    store.ensure_meter(spec)
    return isinstance(store, RollupStore) and bool(store.organizations(spec.name))


def _events(
    m: Meter, specs: Mapping[str, Any], orgs: Sequence[str], start: int, end: int | None
) -> Iterator[Event]:
    store = m.store
    stop = end if end is not None else 2**62
    for name, spec in specs.items():
        store.ensure_meter(spec)
        if orgs:
            targets: Iterable[str] = orgs
        elif isinstance(store, RollupStore):
            targets = store.organizations(name)
        else:
            targets = [key for key, _ in store.list_records("org")]
        for org in targets:
            yield from sorted(store.scan(name, org, start, stop), key=lambda e: (e.time, e.id))


# -- usage and costs --------------------------------------------------------------------------


def _filter_options(func: Any) -> Any:
    for name, spec in reversed(list(FILTERS.items())):
        flag = "--" + name.replace("_", "-")
        if spec.boolean:
            func = click.option(
                f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=spec.description
            )(func)
        else:
            func = click.option(flag, name, multiple=True, help=spec.description)(func)
    return func


def _query_options(func: Any) -> Any:
    func = click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True
    )(func)
    func = click.option("--page", default=None, help="The next_page cursor of a page.")(func)
    func = click.option("--limit", type=click.IntRange(1), default=None, help="Buckets per page.")(
        func
    )
    func = click.option("--group-by", "group_by", multiple=True, help="A field to group by.")(func)
    func = click.option("--end-time", metavar="T", help="End (exclusive; default: now).")(func)
    func = click.option("--start-time", metavar="T", required=True, help="Start (inclusive).")(func)
    func = click.option("--org", "organization_id", required=True, help="The organization.")(func)
    return func


def _filters(given: Mapping[str, Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, value in given.items():
        spec = FILTERS[name]
        if spec.boolean:
            if value is not None:
                out[spec.dimension] = [True] if value else [False, None]
        elif value:
            out[spec.dimension] = list(value)
    return out


_QUERY_FIELDS = {
    "start_time": "--start-time",
    "end_time": "--end-time",
    "group_by": "--group-by",
    "limit": "--limit",
    "page": "--page",
    "bucket_width": "--bucket-width",
    "organization_id": "--org",
    "filters": "a filter",
}


@click.command("usage")
@click.argument("kind")
@_query_options
@click.option(
    "--bucket-width", type=click.Choice(["1m", "1h", "1d"]), default="1d", show_default=True
)
@click.option(
    "--measures",
    "measures",
    multiple=True,
    metavar="M[,M...]",
    help="Measures to show in a table or CSV (default: those with values on the page).",
)
@_filter_options
@_store_options
def usage(
    kind: str,
    organization_id: str,
    start_time: str,
    end_time: str | None,
    group_by: tuple[str, ...],
    limit: int | None,
    page: str | None,
    fmt: str,
    bucket_width: str,
    measures: tuple[str, ...],
    config: Path | None,
    db: str | None,
    **filter_values: Any,
) -> None:
    """One page of usage of a meter (an OpenAI usage kind or your own), as the API answers."""
    m = _meter(config, db, existing=True)
    try:
        if kind not in m.meters:
            raise BadInput(f"KIND: unknown meter {kind!r} (known: {', '.join(sorted(m.meters))})")
        filters = _filters(filter_values)
        spec = m.meters[kind]
        shown = [name for given in measures for name in given.split(",") if name]
        for name in shown:
            if name not in spec.measure_names:
                raise BadInput(
                    f"--measures: {kind} has no measure {name!r} "
                    f"(known: {', '.join(spec.measure_names)})"
                )
        for dim in filters:
            if spec.dimension(dim) is None:
                raise BadInput(f"a filter: {kind} has no dimension {dim!r}")
        with reported(), _fields(_QUERY_FIELDS):
            result = m.usage(
                kind,
                organization_id=organization_id,
                start_time=_time("--start-time", start_time),
                end_time=_time("--end-time", end_time),
                bucket_width=bucket_width,
                group_by=list(group_by) or None,
                filters=filters or None,
                limit=limit,
                page=page,
            )
        _print_usage(result, shown or _with_values(result, spec.measure_names), list(group_by), fmt)
    finally:
        m.close()


@click.command("costs")
@_query_options
@click.option("--project-ids", "project_ids", multiple=True, help="Only these projects.")
@click.option("--api-key-ids", "api_key_ids", multiple=True, help="Only these API keys.")
@click.option("--line-items", "line_items", multiple=True, help="Only these line items.")
@_store_options
def costs(
    organization_id: str,
    start_time: str,
    end_time: str | None,
    group_by: tuple[str, ...],
    limit: int | None,
    page: str | None,
    fmt: str,
    project_ids: tuple[str, ...],
    api_key_ids: tuple[str, ...],
    line_items: tuple[str, ...],
    config: Path | None,
    db: str | None,
) -> None:
    """One page of daily costs, as the API's costs endpoint answers."""
    filters = {
        dim: list(values)
        for dim, values in (
            ("project_id", project_ids),
            ("api_key_id", api_key_ids),
            ("line_item", line_items),
        )
        if values
    }
    m = _meter(config, db, existing=True)
    try:
        with reported(), _fields(_QUERY_FIELDS):
            result = m.costs(
                organization_id=organization_id,
                start_time=_time("--start-time", start_time),
                end_time=_time("--end-time", end_time),
                group_by=list(group_by) or None,
                filters=filters or None,
                limit=limit,
                page=page,
            )
        data = result.to_dict()
        if fmt == "json":
            click.echo(json.dumps(data, indent=2))
            return
        header = ["start_time", *group_by, "amount", "currency"]
        if "line_item" in group_by:
            header += ["quantity", "quantity_unit"]
        rows = []
        for bucket in result.data:
            for r in bucket.results:
                row: list[Any] = [_iso(bucket.start_time)]
                row += [getattr(r, g) for g in group_by]
                row += [r.amount, r.currency]
                if "line_item" in group_by:
                    row += [r.quantity, r.quantity_unit]
                rows.append(row)
        _emit(header, rows, fmt, numeric={"amount", "quantity"}, more=result.next_page)
    finally:
        m.close()


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _with_values(page: UsagePage, measures: Sequence[str]) -> list[str]:
    """The measures with a value other than zero on the page (the first one if none has):
    a meter of many measures stays a readable table."""
    found = {
        name for bucket in page.data for r in bucket.results for name, v in r.values.items() if v
    }
    return [name for name in measures if name in found] or list(measures[:1])


def _print_usage(page: UsagePage, measures: Sequence[str], group_by: list[str], fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(page.to_dict(), indent=2))
        return
    header = ["start_time", *group_by, *measures]
    rows: list[list[Any]] = []
    for bucket in page.data:
        for r in bucket.results:
            rows.append(
                [_iso(bucket.start_time), *(r.group.get(g) for g in group_by)]
                + [r.values.get(m) for m in measures]
            )
    _emit(header, rows, fmt, numeric=set(measures), more=page.next_page)


def _emit(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    fmt: str,
    *,
    numeric: set[str],
    more: str | None = None,
) -> None:
    """Rows as a table with aligned numbers (rich), or CSV."""
    if fmt == "csv":
        # Text cells neutralised for spreadsheets (dimension values are the tenants' own).
        sys.stdout.write(eventfiles.csv_row(eventfiles.escape_cell(h) for h in header))
        for row in rows:
            sys.stdout.write(eventfiles.csv_row(eventfiles.csv_cell(v) for v in row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    for name in header:
        table.add_column(name, justify="right" if name in numeric else "left", no_wrap=True)
    for row in rows:
        table.add_row(
            *(
                "" if v is None else (_shown(v) if h in numeric else str(v))
                for h, v in zip(header, row)
            )
        )
    # On a terminal, its width; piped, as wide as the rows are (never cut short).
    console = Console(width=None if sys.stdout.isatty() else 100_000)
    console.print(table)
    if not rows:
        console.print("(no results)")
    if more:
        console.print(f"more: --page {more}")


def _shown(value: Any) -> str:
    if isinstance(value, Decimal):
        return f"{value:,.6f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# -- quota ------------------------------------------------------------------------------------


@click.command("quota")
@click.argument("organization_id", metavar="ORG")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@_store_options
def quota(organization_id: str, fmt: str, config: Path | None, db: str | None) -> None:
    """Every limit of an organization: used, limit, remaining, when it resets.

    `--format json` is what `GET /v1/organization/quota` answers."""
    m = _meter(config, db, existing=True)
    try:
        with reported(), _fields({"organization_id": "ORG"}):
            status = m.quota_status(organization_id)
    finally:
        m.close()
    if fmt == "json":
        click.echo(json.dumps(status, indent=2))
        return

    def amount(n: int) -> Any:
        return "unlimited" if n == UNLIMITED else n

    rows: list[list[Any]] = [
        [
            line["metric"],
            line["used"],
            amount(line["limit"]),
            amount(line["remaining"]),
            _iso(line["reset_at"]) if line["reset_at"] else "never (a level)",
        ]
        for line in status["limits"]
    ]
    rows += [
        [f"requests per {r['window']}", None, r["limit"], None, None] for r in status["rate_limits"]
    ]
    spend = status["spend_limit"]
    if spend:
        rows.append(
            [
                f"spend ({spend['currency']})",
                spend["used"],
                spend["limit"],
                spend["remaining"],
                _iso(spend["reset_at"]),
            ]
        )
    if not rows:
        click.echo(f"{organization_id} has no plan and no spend limit: nothing is limited")
        return
    _emit(
        ["metric", "used", "limit", "remaining", "resets"],
        rows,
        "table",
        numeric={"used", "limit", "remaining"},
    )


# -- top --------------------------------------------------------------------------------------

_TOP_FIXED = ("cost", "spend", "spend_limit", "quota_used", "quota_metric", "plan", "organization")


@click.command("top")
@click.option(
    "--start-time", metavar="T", help="Start (inclusive; default: the 1st of this month)."
)
@click.option("--end-time", metavar="T", help="End (exclusive; default: now).")
@click.option(
    "--usage",
    "usage_columns",
    multiple=True,
    metavar="METER[.MEASURE]",
    help="A usage column (repeatable; default: each meter's main measure that has usage).",
)
@click.option(
    "--sort",
    default="cost",
    show_default=True,
    metavar="COLUMN",
    help="The column to sort by: cost, spend, spend_limit, quota_used, quota_metric, plan, "
    "organization or a usage column.",
)
@click.option("--ascending", is_flag=True, help="Smallest first (default: largest first).")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many rows.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@_store_options
def top(
    start_time: str | None,
    end_time: str | None,
    usage_columns: tuple[str, ...],
    sort: str,
    ascending: bool,
    limit: int | None,
    fmt: str,
    config: Path | None,
    db: str | None,
) -> None:
    """Every organization side by side: usage and costs over a range, spend this month and
    the plan limit each is nearest to. Money is in dollars, exact."""
    m = _meter(config, db, existing=True)
    try:
        now = m.now()
        start = _time("--start-time", start_time)
        end = _time("--end-time", end_time)
        if start is None:
            month = dt.datetime.fromtimestamp(now, dt.timezone.utc)
            start = int(month.replace(day=1, hour=0, minute=0, second=0).timestamp())
        end = now + 1 if end is None else end
        with reported(), _fields({"end_time": "--end-time"}):
            specs = dict(m.meters)
            columns = [overview.UsageColumn.parse(specs, text) for text in usage_columns]
            known = [*_TOP_FIXED, *(c.name for c in columns)]
            if usage_columns and sort not in known:
                raise BadInput(f"--sort: no column {sort!r} (known: {', '.join(known)})")
            shown, lines = overview.organizations_overview(
                m, start_time=start, end_time=end, columns=columns or None
            )
    finally:
        m.close()
    names = [c.name for c in shown]
    if sort not in (*_TOP_FIXED, *names):
        raise BadInput(f"--sort: no column {sort!r} (known: {', '.join([*_TOP_FIXED, *names])})")

    def cell(line: overview.OrganizationLine) -> Any:
        if sort in names:
            return line.usage.get(sort)
        return getattr(line, "organization_id" if sort == "organization" else sort)

    ranked = sorted(lines, key=lambda line: line.organization_id)
    present = [line for line in ranked if cell(line) is not None]
    absent = [line for line in ranked if cell(line) is None]  # last either way
    present.sort(key=cell, reverse=not ascending)
    ranked = (present + absent)[:limit]
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "start_time": start,
                    "end_time": end,
                    "columns": names,
                    "data": [line.to_dict() for line in ranked],
                },
                indent=2,
            )
        )
        return
    header = ["organization", "plan", *names, "cost", "spend", "spend_limit", "quota_used",
              "quota_metric"]  # fmt: skip
    rows = [
        [
            line.organization_id,
            line.plan,
            *(line.usage.get(n) for n in names),
            line.cost,
            line.spend,
            line.spend_limit,
            _share(line.quota_used, fmt),
            line.quota_metric,
        ]
        for line in ranked
    ]
    _emit(header, rows, fmt, numeric={*names, "cost", "spend", "spend_limit", "quota_used"})


def _share(value: float | None, fmt: str) -> Any:
    """A share of a limit: a percentage in a table, a fraction (4 places) in CSV."""
    if value is None:
        return None
    return f"{value:.1%}" if fmt == "table" else round(value, 4)


# -- plans and prices -------------------------------------------------------------------------


@click.group("plans")
def plans() -> None:
    """List, show, create or change plans, and put organizations on them."""


@plans.command("list")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@_store_options
def plans_list(fmt: str, config: Path | None, db: str | None) -> None:
    """Every plan."""
    m = _meter(config, db, existing=True)
    try:
        found = [Plan.from_record(key, data) for key, data in m.store.list_records("plan")]
    finally:
        m.close()
    if fmt == "json":
        click.echo(json.dumps([{"id": p.id, **p.to_record()} for p in found], indent=2))
        return
    rows = [
        [
            p.id,
            p.name,
            p.billing_cycle.kind,
            ", ".join(f"{k}={v}" for k, v in sorted(p.limits.items())),
            p.rate_limit_rpm,
            p.rate_limit_per_day,
        ]
        for p in found
    ]
    _emit(
        ["id", "name", "cycle", "limits", "rpm", "per day"], rows, fmt, numeric={"rpm", "per day"}
    )


@plans.command("show")
@click.argument("plan_id", metavar="PLAN")
@_store_options
def plans_show(plan_id: str, config: Path | None, db: str | None) -> None:
    """One plan, as JSON."""
    m = _meter(config, db, existing=True)
    try:
        data = m.store.get_record("plan", plan_id)
    finally:
        m.close()
    if data is None:
        raise BadInput(f"PLAN: no plan {plan_id!r}")
    click.echo(json.dumps({"id": plan_id, **Plan.from_record(plan_id, data).to_record()}, indent=2))


@plans.command("set")
@click.argument("plan_id", metavar="PLAN")
@click.option("--name", default=None, help="A display name.")
@click.option("--limit", "limits", multiple=True, metavar="METRIC=N", help="-1: unlimited.")
@click.option("--rpm", type=int, default=None, help="Requests per minute.")
@click.option("--per-day", type=int, default=None, help="Requests per day.")
@click.option("--billing-cycle", type=click.Choice(["monthly", "daily"]), default=None)
@click.option("--anchor-day", type=click.IntRange(1, 31), default=None)
@_store_options
def plans_set(
    plan_id: str,
    name: str | None,
    limits: tuple[str, ...],
    rpm: int | None,
    per_day: int | None,
    billing_cycle: str | None,
    anchor_day: int | None,
    config: Path | None,
    db: str | None,
) -> None:
    """Create a plan, or change the given fields of one."""
    parsed = {}
    for metric, text in _pairs("--limit", limits):
        try:
            parsed[metric] = int(text)
        except ValueError:
            raise BadInput(f"--limit: {metric}={text!r} is not a whole number") from None
    m = _meter(config, db, existing=False)
    try:
        data = m.store.get_record("plan", plan_id)
        old = Plan.from_record(plan_id, data) if data else None
        fields = {
            "plan.id": "PLAN",
            "plan.name": "--name",
            "plan.limits": "--limit",
            "plan.rate_limit_rpm": "--rpm",
            "plan.rate_limit_per_day": "--per-day",
        }
        with reported(), _fields({**fields, "plan": "PLAN"}):
            try:
                cycle = BillingCycle(
                    cast(Any, billing_cycle) or (old.billing_cycle.kind if old else "monthly"),
                    anchor_day or (old.billing_cycle.anchor_day if old else 1),
                )
            except ValidationError as exc:
                raise BadInput(f"--billing-cycle: {exc.message}") from None
            plan = Plan(
                plan_id,
                name if name is not None else (old.name if old else ""),
                cycle,
                {**(dict(old.limits) if old else {}), **parsed},
                rpm if rpm is not None else (old.rate_limit_rpm if old else UNLIMITED),
                per_day if per_day is not None else (old.rate_limit_per_day if old else UNLIMITED),
                old.credits_per_seat if old else None,
            )
            m.set_plan(plan)
    finally:
        m.close()
    click.echo(f"plan {plan_id} saved")


@plans.command("assign")
@click.argument("organization_id", metavar="ORG")
@click.argument("plan_id", metavar="PLAN")
@click.option("--seats", type=click.IntRange(0), default=1, show_default=True)
@_store_options
def plans_assign(
    organization_id: str, plan_id: str, seats: int, config: Path | None, db: str | None
) -> None:
    """Put an organization on a plan."""
    m = _meter(config, db, existing=True)
    try:
        if m.store.get_record("plan", plan_id) is None:
            raise BadInput(f"PLAN: no plan {plan_id!r}")
        with reported(), _fields({"organization_id": "ORG", "plan": "PLAN", "seats": "--seats"}):
            m.assign_plan(organization_id, plan_id, seats=seats)
    finally:
        m.close()
    click.echo(f"{organization_id} is on plan {plan_id}")


@click.group("metrics")
def metrics() -> None:
    """List or define plan metrics: what a plan's limit on them counts."""


@metrics.command("list")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@_store_options
def metrics_list(fmt: str, config: Path | None, db: str | None) -> None:
    """Every metric a plan may limit: defined ones with their sources, and meters of their
    own name."""
    m = _meter(config, db, existing=True)
    try:
        defined = {metric.name: metric for metric in m.defined_metrics()}
        names = m.quotas.metrics()
        gauges = {name for name in names if m.quotas.is_gauge(name)}
    finally:
        m.close()
    if fmt == "json":
        out = []
        for name in names:
            found = defined.get(name)
            out.append(
                {
                    "name": name,
                    "kind": "gauge" if name in gauges else "counted",
                    **(found.to_record() if found else {"sources": []}),
                }
            )
        click.echo(json.dumps(out, indent=2))
        return
    rows = []
    for name in names:
        found = defined.get(name)
        sources = found.expression if found else ""
        where = ""
        if found:
            where = "; ".join(
                f"{s.meter}.{n} in {', '.join(sorted(map(str, allowed)))}"
                for s in found.sources
                for n, allowed in s.where
            )
        kind = "gauge" if name in gauges else "defined" if found else "meter"
        rows.append([name, kind, sources or f"{name}.{name}", where])
    _emit(["metric", "kind", "counts", "where"], rows, fmt, numeric=set())


@metrics.command("set")
@click.argument("name", metavar="METRIC")
@click.option(
    "--sources",
    required=True,
    metavar="EXPR",
    help="What it counts: 'meter.measure + meter.measure ...'.",
)
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="DIM=VALUE",
    help="Count only events with this dimension value (repeat for more values).",
)
@_store_options
def metrics_set(
    name: str, sources: str, where: tuple[str, ...], config: Path | None, db: str | None
) -> None:
    """Define a plan metric and store it: every process on the store counts it, and its
    counters of the current period are rebuilt from the events."""
    allowed: dict[str, list[str]] = {}
    for dim, value in _pairs("--where", where):
        allowed.setdefault(dim, []).append(value)
    m = _meter(config, db, existing=False)
    try:
        with reported():
            try:
                metric = Metric.parse(name, sources, where=allowed or None)
                m.set_metric(metric)
            except ValidationError as exc:
                tail = exc.field.removeprefix("metric.")
                option = (
                    "METRIC"
                    if tail == "name"
                    else "--where"
                    if ".where" in tail or tail == "where"
                    else "--sources"
                )
                raise BadInput(f"{option} ({tail}): {exc.message}") from None
    finally:
        m.close()
    click.echo(f"metric {name} saved: {metric.expression}")


@click.command("spend-cap")
@click.argument("organization_id", metavar="ORG")
@click.option("--cents", type=int, default=None, help="Set the cap, in cents per UTC month.")
@click.option("--delete", "delete", is_flag=True, help="Remove the cap.")
@_store_options
def spend_cap(
    organization_id: str, cents: int | None, delete: bool, config: Path | None, db: str | None
) -> None:
    """Show, set or remove the operator's cap on an organization's spend: its own limit (set
    with its admin key) may be lower, never higher."""
    if cents is not None and delete:
        raise BadInput("--cents and --delete: give one")
    m = _meter(config, db, existing=cents is None)
    try:
        with reported(), _fields({"organization_id": "ORG", "threshold_amount": "--cents"}):
            if delete:
                found = m.delete_spend_cap(organization_id)
                click.echo(
                    f"{organization_id}: cap removed" if found else f"{organization_id}: no cap"
                )
                return
            if cents is not None:
                m.set_spend_cap(organization_id, cents)
            cap = m.spend_cap(organization_id)
            state = m.spend(organization_id)
    finally:
        m.close()
    limit = state.limit.threshold_amount if state.limit else None
    click.echo(
        f"{organization_id}: cap {'none' if cap is None else f'{cap} cents'}; "
        f"limit in force {'none' if limit is None else f'{limit} cents'}; "
        f"spent this month ${state.counted:.2f}"
    )


@click.group("prices")
def prices() -> None:
    """List or set prices."""


@prices.command("list")
@click.option("--meter", default=None, help="Only this meter's prices.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@_store_options
def prices_list(meter: str | None, fmt: str, config: Path | None, db: str | None) -> None:
    """Every price version."""
    m = _meter(config, db, existing=True)
    try:
        with reported():
            book = list(m.prices())
    finally:
        m.close()
    found = [p for p in book if meter is None or p.meter == meter]
    if fmt == "json":
        click.echo(json.dumps([price_to_dict(p) for p in found], indent=2))
        return
    rows = [
        [
            p.meter,
            p.measure,
            json.dumps(dict(p.where)) if p.where else "",
            p.unit_price if p.unit_price is not None else "tiered",
            p.per,
            p.currency,
            p.line_item,
            p.quantity_unit,
            _iso(p.effective_from),
        ]
        for p in found
    ]
    header = [
        "meter",
        "measure",
        "where",
        "unit_price",
        "per",
        "currency",
        "line_item",
        "unit",
        "from",
    ]
    _emit(header, rows, fmt, numeric={"unit_price", "per"})


@prices.command("set")
@click.option("--meter", required=True)
@click.option("--measure", required=True)
@click.option("--unit-price", required=True, help="A decimal: the price of --per units.")
@click.option("--per", type=int, default=1, show_default=True)
@click.option("--quantity-per", type=int, default=1, show_default=True)
@click.option("--currency", default="usd", show_default=True)
@click.option("--line-item", required=True)
@click.option("--quantity-unit", required=True)
@click.option("--where", "where", multiple=True, metavar="DIM=VALUE")
@click.option("--effective-from", metavar="T", default=None, help="Default: always.")
@_store_options
def prices_set(
    meter: str,
    measure: str,
    unit_price: str,
    per: int,
    quantity_per: int,
    currency: str,
    line_item: str,
    quantity_unit: str,
    where: tuple[str, ...],
    effective_from: str | None,
    config: Path | None,
    db: str | None,
) -> None:
    """Add or replace a price version."""
    m = _meter(config, db, existing=False)
    try:
        spec = m.meters.get(meter)
        conditions: dict[str, Any] = {}
        for name, text in _pairs("--where", where):
            dim = spec.dimension(name) if spec else None
            conditions[name] = (text.lower() == "true") if dim and dim.kind == "bool" else text
        names = {
            "meter": "--meter",
            "measure": "--measure",
            "unit_price": "--unit-price",
            "per": "--per",
            "quantity_per": "--quantity-per",
            "currency": "--currency",
            "line_item": "--line-item",
            "quantity_unit": "--quantity-unit",
            "where": "--where",
            "effective_from": "--effective-from",
            "tiers": "--measure",
        }
        with reported(), _fields(names):
            saved = m.set_price(
                {
                    "meter": meter,
                    "measure": measure,
                    "unit_price": unit_price,
                    "per": per,
                    "quantity_per": quantity_per,
                    "currency": currency,
                    "line_item": line_item,
                    "quantity_unit": quantity_unit,
                    "where": conditions,
                    "effective_from": _time("--effective-from", effective_from) or 0,
                }
            )
    finally:
        m.close()
    click.echo(f"price {saved.id} saved")


# -- doctor -----------------------------------------------------------------------------------


@click.command("doctor")
@_store_options
def doctor(config: Path | None, db: str | None) -> None:
    """Check the store: it answers, its schema, rollups and quota counters against the events.

    Exits 1 when something is wrong."""
    before = _schema_before(db) if db else None
    m = _meter(config, db, existing=True)
    problems = 0

    def say(ok: bool, text: str) -> None:
        nonlocal problems
        problems += not ok
        click.echo(f"{'ok  ' if ok else 'FAIL'}  {text}")

    try:
        with reported():
            started = time.perf_counter()
            m.store.list_records("plan")
            say(True, f"{m.store.url}: answers ({(time.perf_counter() - started) * 1000:.1f} ms)")
            for line, ok in _schema(m, before):
                say(ok, line)
            if isinstance(m.store, RollupStore):
                differences = m.verify_rollups()
                for text in differences[:20]:
                    say(False, f"rollup {text}")
                if differences:
                    click.echo(f"      {len(differences)} in all: `meterkit rollups rebuild`")
                else:
                    say(True, "rollups agree with the events")
            else:
                say(True, "this store keeps no rollups")
            for line, ok in _plan_metrics(m):
                say(ok, line)
            for line, ok in _counters(m):
                say(ok, line)
    finally:
        m.close()
    if problems:
        raise SystemExit(1)


def _schema_before(url: str) -> int | None:
    """A SQLite file's schema version read before the store is opened (opening migrates)."""
    if not url.startswith("sqlite:///"):
        return None
    import sqlite3

    from meterkit.stores.sqlite import path_from_url

    path = path_from_url(url)
    if path == ":memory:" or not Path(path).exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM mk_meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()
    return int(row[0]) if row else 1


def _schema(m: Meter, before: int | None) -> Iterator[tuple[str, bool]]:
    store = m.store
    if type(store).__name__ == "SQLiteStore":
        from meterkit.stores.sqlite import SCHEMA_VERSION

        found = before if before is not None else SCHEMA_VERSION
        yield f"schema version {found} (this meterkit: {SCHEMA_VERSION})", True
        if found < SCHEMA_VERSION:
            yield f"{SCHEMA_VERSION - found} migration(s) were pending: applied on opening", True
    elif type(store).__name__ == "PostgresStore":
        from meterkit.stores.postgres import MIGRATIONS

        latest = MIGRATIONS[-1][0]
        yield f"schema migrations through version {latest} applied", True
    else:
        yield "schema: this store keeps none (it lives in memory)", True


def _plan_metrics(m: Meter) -> Iterator[tuple[str, bool]]:
    """Every limit of every plan names a metric something counts."""
    defined = m.defined_metrics()
    if defined:
        shown = ", ".join(f"{x.name} = {x.expression}" for x in defined)
        yield f"plan metrics stored: {shown}", True
    known = set(m.quotas.metrics())
    for key, data in m.store.list_records("plan"):
        for metric in sorted(Plan.from_record(key, data).limits):
            if metric not in known:
                yield (
                    f"plan {key} limits {metric!r}, which nothing counts "
                    f"(`meterkit metrics set {metric} --sources ...`)",
                    False,
                )


def _counters(m: Meter) -> Iterator[tuple[str, bool]]:
    orgs = counted_organizations(m)
    wrong = []
    for org in orgs:
        for metric, (want, got) in counter_differences(m, org).items():
            wrong.append(f"{org} {metric}: counted {got:,}, the events give {want:,}")
    for line in wrong[:20]:
        yield f"quota counter {line} (meterkit's rebuild_counters fixes it)", False
    if not wrong:
        yield f"quota counters agree with the events ({len(orgs)} organizations)", True


# -- completion -------------------------------------------------------------------------------


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script: `eval "$(meterkit completion bash)"`."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    root = ctx.find_root().command
    click.echo(cls(root, {}, "meterkit", "_METERKIT_COMPLETE").source())


COMMANDS: tuple[click.Command, ...] = (
    record,
    import_,
    export,
    usage,
    costs,
    quota,
    top,
    plans,
    metrics,
    spend_cap,
    prices,
    doctor,
    completion,
)
