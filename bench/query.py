"""The 31-day grouped query: ``Meter.usage`` vs a raw SQL ``GROUP BY`` over the same rows.

For context it also times the same query through the pure-Python engine: once as ``Meter``
falls back to it (SQLite scan, then :func:`meterkit.engine.aggregate`), once on events
already in memory. Every path must give the same rows; that is checked, not timed.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from data import DAY, MEASURES, METER, QUERY_DAYS, QUERY_END, START, Row, to_event
from ingest import TABLE

import meterkit
from meterkit import engine
from meterkit.engine.aggregate import Rows
from meterkit.models import MeterSpec, UsageQuery
from meterkit.stores.sqlite import SQLiteStore
from meterkit.validate import check_usage_query

__all__ = [
    "Key",
    "QueryBench",
    "Timing",
    "engine_scan_rss",
    "minute_queries",
    "minute_sql",
    "raw_sql",
]

T = TypeVar("T")
Key = tuple[int, Any, Any]
"""(bucket start, model, project_id)"""
Totals = dict[Key, tuple[Any, ...]]

GROUP_BY = ["model", "project_id"]
END = QUERY_END


def raw_sql() -> str:
    sums = ", ".join(f"SUM(v_{m})" for m in MEASURES)
    return (
        f"SELECT (time - time % {DAY}) AS bucket, d_model, d_project_id, {sums} "
        f"FROM [{TABLE}] WHERE organization_id = ? AND time >= ? AND time < ? "
        "GROUP BY bucket, d_model, d_project_id"
    )


class Timing:
    def __init__(self, runs: list[float]) -> None:
        self.runs = runs

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": round(self.median, 4),
            "min_s": round(min(self.runs), 4),
            "runs_s": [round(r, 4) for r in self.runs],
        }


class _ScanOnly(SQLiteStore):
    """The SQLite store without its SQL aggregation: ``Meter`` then scans and runs the engine."""

    def aggregate(self, spec: MeterSpec, query: UsageQuery) -> Rows | None:
        return None


def _page_totals(page: meterkit.UsagePage) -> Totals:
    return {
        (b.start_time, r.group["model"], r.group["project_id"]): tuple(
            r.values[m] for m in MEASURES
        )
        for b in page.data
        for r in b.results
    }


def _raw_totals(rows: Sequence[tuple[Any, ...]]) -> Totals:
    return {(r[0], r[1], r[2]): tuple(0 if v is None else v for v in r[3:]) for r in rows}


def _time(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class QueryBench:
    """Runs each path ``repeat`` times (after one warm-up run) and keeps every timing."""

    def __init__(self, mk_path: Path, raw_path: Path, organization_id: str) -> None:
        self.mk_path = mk_path
        self.raw_path = raw_path
        self.org = organization_id

    def usage(self, meter: meterkit.Meter) -> meterkit.UsagePage:
        page = meter.usage(
            METER,
            organization_id=self.org,
            start_time=START,
            end_time=END,
            bucket_width="1d",
            group_by=GROUP_BY,
            limit=QUERY_DAYS,
        )
        assert not page.has_more and len(page.data) == QUERY_DAYS
        return page

    def sql_vs_raw(self, repeat: int) -> tuple[Timing, Timing, Timing, Totals]:
        """meterkit ``usage()`` and raw SQL, interleaved; also ``usage().to_dict()``."""
        sql = raw_sql()
        args = (self.org, START, END)
        mk_runs: list[float] = []
        raw_runs: list[float] = []
        dict_runs: list[float] = []
        with meterkit.Meter(f"sqlite:///{self.mk_path}") as meter:
            raw = sqlite3.connect(self.raw_path)
            try:
                mk_totals = _page_totals(self.usage(meter))  # warm-up
                raw_totals = _raw_totals(raw.execute(sql, args).fetchall())
                for _ in range(repeat):
                    t, page = _time(lambda: self.usage(meter))
                    mk_runs.append(t)
                    t, rows = _time(lambda: raw.execute(sql, args).fetchall())
                    raw_runs.append(t)
                    t, _ = _time(lambda: self.usage(meter).to_dict())
                    dict_runs.append(t)
                    assert _page_totals(page) == mk_totals
                    assert _raw_totals(rows) == raw_totals
            finally:
                raw.close()
        check_same("meterkit usage()", mk_totals, "raw SQL", raw_totals)
        return Timing(mk_runs), Timing(raw_runs), Timing(dict_runs), raw_totals

    def engine_scan(self, repeat: int, expected: Totals) -> Timing:
        """``Meter.usage`` with the store's SQL aggregation turned off: scan + pure engine."""
        runs = []
        meter = meterkit.Meter(store=_ScanOnly(f"sqlite:///{self.mk_path}"))
        with meter:
            for _ in range(repeat):
                t, page = _time(lambda: self.usage(meter))
                runs.append(t)
                check_same("engine over SQLite scan", _page_totals(page), "raw SQL", expected)
        return Timing(runs)

    def engine_pure(self, rows: Sequence[Row], repeat: int, expected: Totals) -> Timing:
        """:func:`meterkit.engine.aggregate` + ``build_page`` on events already in memory."""
        events = [to_event(r) for r in rows if r[1] == self.org and START <= r[2] < END]
        spec = meterkit.Meter("memory://").spec(METER)
        query = check_usage_query(
            spec,
            organization_id=self.org,
            start_time=START,
            end_time=END,
            bucket_width="1d",
            group_by=GROUP_BY,
            filters=None,
            limit=QUERY_DAYS,
        )
        secret = b"\0" * 32
        runs = []
        for _ in range(repeat):
            t, page = _time(
                lambda: engine.build_page(
                    spec, query, engine.aggregate(spec, query, events), secret
                )
            )
            runs.append(t)
            check_same("pure engine", _page_totals(page), "raw SQL", expected)
        return Timing(runs)

    def after_prune(self, work: Path, repeat: int, expected: Totals) -> dict[str, Any]:
        """Retention on a copy of the database: half the window's raw events dropped by
        ``Meter.prune`` (timed), then the same query, which must give the same rows (from the
        day rollups)."""
        copy = work / "pruned.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)
        source = sqlite3.connect(self.mk_path)
        target = sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        # Now 45 days after the window opened, keeping 30 days: events before its 16th day go.
        now = START + 45 * DAY
        with meterkit.Meter(f"sqlite:///{copy}", clock=lambda: now) as meter:
            before = meter.store.conn.execute(f"SELECT count(*) FROM [{TABLE}]").fetchone()[0]
            meter.set_retention(METER, 30)
            t, dropped = _time(meter.prune)
            after = meter.store.conn.execute(f"SELECT count(*) FROM [{TABLE}]").fetchone()[0]
            assert before - after == dropped[METER] > 0, (before, after, dropped)
            runs = []
            for _ in range(repeat):
                q, page = _time(lambda: self.usage(meter))
                runs.append(q)
                check_same("usage() after prune", _page_totals(page), "raw SQL", expected)
        copy.unlink()
        return {
            "events_before": before,
            "events_dropped": dropped[METER],
            "prune_s": round(t, 3),
            "dropped_per_s": round(dropped[METER] / t),
            "query_after_prune": Timing(runs).as_dict(),
        }


MINUTE_DAY = START + 10 * DAY  # a weekday inside the window
"""The day the 1440 x 1m queries cover."""


def minute_sql(group_by_model: bool) -> str:
    sums = ", ".join(f"SUM(v_{m})" for m in MEASURES)
    model = ", d_model" if group_by_model else ""
    return (
        f"SELECT (time - time % 60) AS bucket{model}, {sums} FROM [{TABLE}] "
        f"WHERE organization_id = ? AND time >= ? AND time < ? GROUP BY bucket{model}"
    )


def _minute_page_totals(page: meterkit.UsagePage, grouped: bool) -> Totals:
    return {
        (b.start_time, r.group["model"] if grouped else None, None): tuple(
            r.values[m] for m in MEASURES
        )
        for b in page.data
        for r in b.results
    }


def _minute_raw_totals(rows: Sequence[tuple[Any, ...]], grouped: bool) -> Totals:
    width = 2 if grouped else 1
    return {
        (r[0], r[1] if grouped else None, None): tuple(0 if v is None else v for v in r[width:])
        for r in rows
    }


def minute_queries(bench: QueryBench, repeat: int) -> dict[str, tuple[Timing, Timing, Timing, int]]:
    """1440 x ``1m`` over one day, ungrouped and grouped by model: ``usage()`` (objects) and
    ``usage_dict()`` (the JSON page the HTTP API serves, built from the rows) against the raw
    ``GROUP BY`` on the same rows, interleaved. Per query: (usage, usage_dict, raw, rows)."""
    out: dict[str, tuple[Timing, Timing, Timing, int]] = {}
    args = (bench.org, MINUTE_DAY, MINUTE_DAY + DAY)
    with meterkit.Meter(f"sqlite:///{bench.mk_path}") as meter:
        raw = sqlite3.connect(bench.raw_path)
        try:
            for name, grouped in (("ungrouped", False), ("by_model", True)):
                sql = minute_sql(grouped)

                params: dict[str, Any] = {
                    "organization_id": bench.org,
                    "start_time": MINUTE_DAY,
                    "end_time": MINUTE_DAY + DAY,
                    "bucket_width": "1m",
                    "group_by": ["model"] if grouped else None,
                    "limit": 1440,
                }

                def usage(params: dict[str, Any] = params) -> meterkit.UsagePage:
                    return meter.usage(METER, **params)

                def usage_dict(params: dict[str, Any] = params) -> dict[str, Any]:
                    return meter.usage_dict(METER, **params)

                want = _minute_raw_totals(raw.execute(sql, args).fetchall(), grouped)
                check_same("meterkit 1m", _minute_page_totals(usage(), grouped), "raw 1m", want)
                assert usage_dict() == usage().to_dict()
                mk_runs, dict_runs, raw_runs = [], [], []
                for _ in range(repeat):
                    t, page = _time(usage)
                    mk_runs.append(t)
                    t, wire = _time(usage_dict)
                    dict_runs.append(t)
                    t, _rows = _time(lambda sql=sql: raw.execute(sql, args).fetchall())
                    raw_runs.append(t)
                    assert len(page.data) == len(wire["data"]) == 1440
                out[name] = (Timing(mk_runs), Timing(dict_runs), Timing(raw_runs), len(want))
        finally:
            raw.close()
    return out


# VmHWM is this process's own high-water mark: ru_maxrss would also count the memory of the
# process it was forked from, which Linux carries across exec.
_RSS_SCRIPT = """
import sys
sys.path.insert(0, {bench!r})
import meterkit
from query import QueryBench, _ScanOnly
meter = meterkit.Meter(store=_ScanOnly("sqlite:///" + {path!r}))
if {run!r}:
    QueryBench({path!r}, {path!r}, {org!r}).usage(meter)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def engine_scan_rss(mk_path: Path, organization_id: str) -> tuple[int, int]:
    """Peak RSS in KiB of a fresh process answering the query through the engine over a
    scan, and of one that opens the same meter without querying (the floor)."""
    import subprocess
    import sys

    out = []
    for run in (False, True):
        code = _RSS_SCRIPT.format(
            bench=str(Path(__file__).parent), path=str(mk_path), org=organization_id, run=run
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        out.append(int(done.stdout.split()[-1]))
    return out[1], out[0]


def check_same(name_a: str, a: Totals, name_b: str, b: Totals) -> None:
    """A correctness guard: both answers must agree row for row (not a speed assertion)."""
    if a != b:
        only_a = sorted(set(a) - set(b))[:5]
        only_b = sorted(set(b) - set(a))[:5]
        differ = [k for k in sorted(set(a) & set(b)) if a[k] != b[k]][:5]
        raise AssertionError(
            f"{name_a} and {name_b} disagree: only in {name_a} {only_a}, "
            f"only in {name_b} {only_b}, different {[(k, a[k], b[k]) for k in differ]}"
        )
