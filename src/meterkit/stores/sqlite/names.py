"""Names, URLs and SQL builders of the SQLite store."""

from __future__ import annotations

import itertools
import operator
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from meterkit.engine import rollup
from meterkit.errors import ValidationError
from meterkit.models import DimValue, MeterSpec
from meterkit.stores import sqlagg

CHUNK = 500
SCAN_CHUNK = 5000


def path_from_url(url: str) -> str:
    """``sqlite:///rel.db`` → ``rel.db``; ``sqlite:////abs.db`` → ``/abs.db``."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URL: {url!r} (expected sqlite:///path.db)")
    path = url[len("sqlite:///") :].split("?", 1)[0]
    if not path:
        raise ValueError("sqlite URL has no path")
    return path


SYNCHRONOUS = ("full", "normal")


def options_from_url(url: str) -> dict[str, str]:
    """The ``?key=value`` options of a SQLite URL: ``synchronous`` and ``timeout``."""
    query = url.split("?", 1)[1] if "?" in url else ""
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - {"synchronous", "timeout"}
    if unknown:
        raise ValidationError("url", f"unknown SQLite option {sorted(unknown)[0]!r}")
    if options.get("synchronous", "full").lower() not in SYNCHRONOUS:
        raise ValidationError("url", "synchronous must be 'full' or 'normal'")
    try:
        if float(options.get("timeout", "30")) <= 0:
            raise ValueError
    except ValueError:
        raise ValidationError("url", "timeout must be a positive number of seconds") from None
    return options


def member(column: str, values: list[Any]) -> tuple[str, list[Any]]:
    return f"{column} IN ({', '.join('?' * len(values))})", values


def events_table(meter: str) -> str:
    return f"events_{meter}"


def dim_column(name: str) -> str:
    return f"d_{name}"


def value_column(name: str) -> str:
    return f"v_{name}"


GRAIN_NAMES = {60: "1m", 3600: "1h", 86400: "1d"}


INT64 = 2**63 - 1


def rollup_table(meter: str, grain: int) -> str:
    return f"rollup_{meter}_{GRAIN_NAMES[grain]}"


def cell_column(kind: str, measure: str) -> str:
    return f"{kind}_{measure}"


DIALECT = sqlagg.Dialect(
    table=lambda meter: f"[{events_table(meter)}]",
    dim=lambda name: f"[{dim_column(name)}]",
    val=lambda name: f"[{value_column(name)}]",
    member=member,
    rollup=lambda meter, grain: f"[{rollup_table(meter, grain)}]",
    cell=lambda kind, measure: f"[{cell_column(kind, measure)}]",
)


CELL_TYPES: dict[str, Any] = {
    "s": bytes,
    "n": int,
    "mn": bytes,
    "mx": bytes,
    "t": int,
    "i": str,
    "l": bytes,
}


def rollup_layout(spec: MeterSpec) -> dict[str, list[str]]:
    """What a meter's rollups keep of each measure: when it changes they are built anew."""
    out: dict[str, list[str]] = {}
    for kind, name in rollup.columns(spec):
        out.setdefault(name, []).append(kind)
    return out


def fit_sums(
    folded: Mapping[int, Mapping[rollup.Key, tuple[tuple[DimValue, ...], list[Any]]]],
    sums: Sequence[int],
) -> None:
    """Turn sums past SQLite's integer range into floats, in place, in rows folded by
    :func:`~meterkit.engine.rollup.fold_grains` (``sums``: the cells holding sums): queries
    then read that meter from its events (see :func:`sqlagg.overflowed`)."""
    # Values are never negative, so a day's sum is at least each of its hours' and minutes':
    # when no day passes the range, nothing does.
    coarsest = folded[max(folded)]
    if any(
        cells[i] is not None and cells[i] > INT64 for _t, cells in coarsest.values() for i in sums
    ):
        for rows in folded.values():
            for _tup, cells in rows.values():
                for i in sums:
                    if cells[i] is not None and cells[i] > INT64:
                        cells[i] = float(cells[i])


def picker(wanted: tuple[int, ...]) -> Callable[[list[Any]], tuple[Any, ...]]:
    """``cells -> (cells[i] for i in wanted)`` as a tuple, at C speed where it can."""
    if len(wanted) > 1:
        return operator.itemgetter(*wanted)
    if wanted:
        only = wanted[0]
        return lambda cells: (cells[only],)
    return lambda cells: ()


def upsert_batches(
    rows: Mapping[rollup.Key, tuple[tuple[DimValue, ...], list[Any]]],
) -> dict[tuple[int, ...], list[tuple[Any, ...]]]:
    """Bind parameters of :func:`sqlagg.upsert` for one grain's folded rows, grouped by the
    value cells each row has (its non-NULL ones): ``{cells: [params, ...]}``."""
    out: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}
    picks: dict[tuple[bool, ...], tuple[tuple[int, ...], Callable[[list[Any]], Any]]] = {}
    # Rows of one batch share a handful of shapes: each is worked out once.
    for key, (tup, cells) in rows.items():
        pattern = tuple(map(operator.is_, cells, itertools.repeat(None)))
        found = picks.get(pattern)
        if found is None:
            wanted = tuple(i for i, empty in enumerate(pattern) if not empty)
            found = picks[pattern] = (wanted, picker(wanted))
            out[wanted] = []
        out[found[0]].append((*key, *tup, *found[1](cells)))
    return out
