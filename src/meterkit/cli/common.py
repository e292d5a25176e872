"""What every ``meterkit`` command shares: opening the store, and turning errors into exits.

Bad input exits with status 2 and one line naming the option or field at fault; a store that
does not answer exits with 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from meterkit.errors import StoreUnavailable, ValidationError
from meterkit.meter import DEFAULT_URL, Meter

__all__ = ["BadInput", "StartedClock", "open_meter", "reported", "store_options"]


class BadInput(click.ClickException):
    """Input meterkit refused: exit status 2, like click's own usage errors."""

    exit_code = 2


@contextmanager
def reported() -> Iterator[None]:
    """Turn meterkit's errors into one-line messages (no traceback) with the right status."""
    try:
        yield
    except ValidationError as exc:
        raise BadInput(f"{exc.field}: {exc.message}") from None
    except StoreUnavailable as exc:
        raise click.ClickException(f"the store is unavailable: {exc}") from None


class StartedClock:
    """A clock that read ``start`` when it was made and has run on in real time since
    (or, ``frozen``, reads ``start`` for ever)."""

    def __init__(self, start: float, *, frozen: bool = False) -> None:
        self.start = start
        self.frozen = frozen
        self.origin = time.monotonic()

    def __call__(self) -> float:
        return self.start if self.frozen else self.start + (time.monotonic() - self.origin)


def open_meter(
    config: Path | None,
    db: str | None,
    now: int | None = None,
    *,
    frozen: bool = False,
    existing: bool = False,
) -> Meter:
    """The meter a command works on: ``--config`` (its store, or ``--db`` instead), else
    ``--db``, else the embedded default. With ``now``, its clock starts at that Unix time;
    with ``existing`` (commands that only read or change what is there), a SQLite ``--db``
    must name a file that exists: a typo is reported instead of creating an empty store."""
    url = db or DEFAULT_URL
    if existing and db and db.startswith("sqlite:///"):
        from meterkit.stores.sqlite import path_from_url

        try:
            path = path_from_url(db)
        except ValueError as exc:
            raise BadInput(f"--db: {exc}") from None
        if path != ":memory:" and not Path(path).exists():
            raise BadInput(f"--db: {path} does not exist (this command creates no store)")
    if frozen and now is None:
        raise BadInput("--freeze-clock needs --now")
    extra: dict[str, Any] = {} if now is None else {"clock": StartedClock(now, frozen=frozen)}
    try:
        if config is not None:
            if db:
                return Meter.from_config(config, url=db, **extra)
            return Meter.from_config(config, **extra)
        return Meter(url, **extra)
    except ValidationError as exc:
        if config is None or (db and exc.field == "url"):
            raise BadInput(f"--db: {exc.message}") from None
        raise BadInput(f"invalid configuration {config}: {exc.field}: {exc.message}") from None
    except StoreUnavailable as exc:
        raise click.ClickException(f"the store is unavailable: {exc}") from None
    except Exception as exc:
        # A driver's own error (a SQLite file in a missing directory, say): still one line.
        raise click.ClickException(f"cannot open the store: {exc}") from None


def store_options(func: Any) -> Any:
    func = click.option(
        "--db",
        metavar="URL",
        help=f"Store URL; overrides the config's store. [default: {DEFAULT_URL}]",
    )(func)
    func = click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        help="TOML configuration file (store, meters, prices, plans, organizations).",
    )(func)
    return func
