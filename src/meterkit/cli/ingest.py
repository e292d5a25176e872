"""Recording, importing and exporting events (``meterkit record``, ``import``, ``export``)."""

from __future__ import annotations

import gc
import io
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

import click

from meterkit.cli import eventfiles
from meterkit.cli.common import BadInput, reported
from meterkit.cli.options import (
    data_store_options,
    fields_named,
    meter_for,
    parse_number,
    parse_pairs,
    parse_time,
)
from meterkit.errors import EventConflict, ValidationError
from meterkit.meter import Meter
from meterkit.models import Event
from meterkit.stores.base import RollupStore

__all__ = ["MAX_REPORTED", "export", "import_", "record"]


@click.command("record")
@click.argument("meter")
@click.option("--org", "organization_id", required=True, help="The organization.")
@click.option("-v", "--value", "values", multiple=True, metavar="MEASURE=N", help="A measure.")
@click.option("-d", "--dim", "dims", multiple=True, metavar="NAME=VALUE", help="A dimension.")
@click.option("--time", "when", metavar="T", help="Unix seconds or RFC 3339 (default: now).")
@click.option("--id", "event_id", metavar="ID", help="The event id (default: a new one).")
@data_store_options
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
    numbers = {name: parse_number("--value", text) for name, text in parse_pairs("--value", values)}
    if not numbers:
        raise BadInput("--value: give at least one MEASURE=N")
    m = meter_for(config, db, existing=False)
    try:
        spec = m.meters.get(meter)
        if spec is None:
            raise BadInput(f"METER: unknown meter {meter!r} (known: {', '.join(sorted(m.meters))})")
        dimensions: dict[str, Any] = {}
        for name, text in parse_pairs("--dim", dims):
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
        with reported(), fields_named(names):
            new = m.record(
                meter,
                numbers,
                organization_id=organization_id,
                time=parse_time("--time", when),
                id=event_id,
                dimensions=dimensions,
            )
        click.echo("recorded" if new else "duplicate: already recorded with the same data")
    except EventConflict as exc:
        raise BadInput(f"--id: {exc}") from None
    finally:
        m.close()


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
@data_store_options
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
    columns = dict(parse_pairs("--map", mapping))
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
    m = meter_for(config, db, existing=False)
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


@click.command("export")
@click.option("--meter", "meters", multiple=True, help="A meter to export (default: all).")
@click.option("--org", "orgs", multiple=True, help="An organization (default: all).")
@click.option("--start-time", metavar="T", help="From this time (Unix seconds or RFC 3339).")
@click.option("--end-time", metavar="T", help="Before this time.")
@click.option(
    "--format", "fmt", type=click.Choice(["ndjson", "csv"]), default="ndjson", show_default=True
)
@click.option("-o", "--output", default="-", metavar="FILE", help="Write here (default: stdout).")
@data_store_options
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
    start = parse_time("--start-time", start_time) or 0
    end = parse_time("--end-time", end_time)
    m = meter_for(config, db, existing=True)
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
            targets = m.quotas.book.assigned()
        for org in targets:
            yield from sorted(store.scan(name, org, start, stop), key=lambda e: (e.time, e.id))
