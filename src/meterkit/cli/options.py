"""What the data commands share: options, the meter they open, how they print."""

from __future__ import annotations

import datetime as dt
import functools
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from meterkit.cli import eventfiles
from meterkit.cli.common import BadInput, open_meter, store_options
from meterkit.errors import ValidationError
from meterkit.eventio import parse_rfc3339
from meterkit.meter import Meter

__all__ = ["FORMATS"]


FORMATS = ("table", "json", "csv")


def parse_time(option: str, text: str | None) -> int | None:
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


def parse_pairs(option: str, items: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BadInput(f"{option}: {item!r} must be NAME=VALUE")
        out.append((name.strip(), value))
    return out


def parse_number(option: str, text: str) -> int | float:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise BadInput(f"{option}: {text!r} is not a number") from None


@contextmanager
def fields_named(names: Mapping[str, str]) -> Iterator[None]:
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


def data_store_options(func: Any) -> Any:
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


def meter_for(config: Path | None, db: str | None, *, existing: bool) -> Meter:
    now = click.get_current_context().meta.get("meterkit.now")
    return open_meter(config, db, now, existing=existing)


def emit(
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
                "" if v is None else (shown(v) if h in numeric else str(v))
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


def shown(value: Any) -> str:
    if isinstance(value, Decimal):
        return f"{value:,.6f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
