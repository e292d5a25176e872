"""meterkit benchmarks: durable SQLite ingest and a 31-day grouped query, each against raw
``sqlite3`` on the same rows in the same run, printed as ratios.

    python bench/run.py                   # 1,000,000 events (a few minutes)
    python bench/run.py --quick           # ~20k events, a smoke run
    python bench/run.py --only query --dir bench/.data/1m   # reuse files kept by --dir

Speed is measured here and never asserted; the only assertions are correctness guards
(meterkit and raw SQL must give the same rows). Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import MEASURES, QUERY_DAYS, QUERY_END, START, Dataset, generate, to_event
from ingest import IngestFigures, ingest, prepare_schema, table_ddl
from query import QueryBench, Timing

import meterkit

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "latest.json"
MK_DB = "mk.db"
RAW_DB = "raw.db"
MARKER = "dataset.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--events", type=int, default=1_000_000, help="events to generate")
    p.add_argument("--quick", action="store_true", help="smoke run: 20k events, 3 repeats")
    p.add_argument("--only", choices=["ingest", "query"], help="run one benchmark only")
    p.add_argument("--batch", type=int, default=10_000, help="events per record_many call")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per query path")
    p.add_argument("--seed", type=int, default=20241101, help="data generator seed")
    p.add_argument(
        "--dir",
        type=Path,
        help="keep the database files here (default: a temporary directory); "
        "--only query reuses files a previous run left for the same data",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print a cProfile of one meterkit ingest batch and query",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.events = 20_000
        args.repeat = min(args.repeat, 3)
        args.batch = min(args.batch, 2_000)
    if args.events < 1 or args.batch < 1 or args.repeat < 1:
        p.error("--events, --batch and --repeat must be positive")
    return args


@contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="meterkit-bench-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def file_bytes(path: Path) -> int:
    return sum(
        Path(f"{path}{s}").stat().st_size for s in ("", "-wal") if Path(f"{path}{s}").exists()
    )


def dataset_key(data: Dataset) -> dict[str, Any]:
    return {"events": len(data.rows), "seed": data.seed, "meterkit": meterkit.__version__}


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}/s"


def fmt_s(x: float) -> str:
    return f"{x * 1000:,.1f} ms" if x < 1 else f"{x:,.2f} s"


def table(title: str, rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title]
    for j, r in enumerate(rows):
        cells = zip(r, widths, strict=True)
        lines.append(
            "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))
        )
        if j == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def profile(fn: Callable[[], object], title: str, limit: int = 20) -> None:
    prof = cProfile.Profile()
    prof.runcall(fn)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(limit)
    print(f"\n--- profile: {title} ---\n{out.getvalue()}")


def run_ingest(args: argparse.Namespace, data: Dataset, work: Path) -> dict[str, Any]:
    mk_path, raw_path = work / MK_DB, work / RAW_DB
    remove_db(mk_path)
    remove_db(raw_path)
    (work / MARKER).unlink(missing_ok=True)
    ddl = prepare_schema(mk_path)
    print(f"ingest: {len(data.rows):,} events in batches of {args.batch:,} ...", flush=True)
    mk, raw = ingest(mk_path, raw_path, ddl, data.rows, args.batch)
    assert mk.accepted == raw.accepted == len(data.rows), (mk, raw)
    mk_bytes, raw_bytes = file_bytes(mk_path), file_bytes(raw_path)
    # Every id again: nothing new may be stored.
    mk_dup, raw_dup = ingest(mk_path, raw_path, ddl, data.rows, args.batch)
    assert mk_dup.accepted == 0 and raw_dup.accepted == 0, (mk_dup, raw_dup)
    assert table_ddl(raw_path) == ddl
    (work / MARKER).write_text(json.dumps(dataset_key(data)))
    if args.profile:
        events = [to_event(r) for r in data.rows[: args.batch]]
        scratch = work / "profile.db"
        remove_db(scratch)
        with meterkit.Meter(f"sqlite:///{scratch}") as meter:
            meter.record_many(events[:1])
            profile(lambda: meter.record_many(events), f"record_many({len(events):,} events)")
        remove_db(scratch)

    def side(fresh: IngestFigures, dup: IngestFigures, size: int) -> dict[str, Any]:
        return {**fresh.as_dict(), "file_bytes": size, "duplicate_reingest": dup.as_dict()}

    result = {
        "batch": args.batch,
        "meterkit": side(mk, mk_dup, mk_bytes),
        "raw": side(raw, raw_dup, raw_bytes),
        # How many times longer meterkit takes than raw sqlite3 (1.0 = as fast).
        "ratio_meterkit_over_raw": round(mk.seconds / raw.seconds, 2),
        "duplicate_ratio_meterkit_over_raw": round(mk_dup.seconds / raw_dup.seconds, 2),
    }
    print(
        table(
            f"\nDurable ingest into SQLite ({len(data.rows):,} events, WAL, synchronous=NORMAL, "
            f"1 transaction per {args.batch:,})",
            [
                ("", "events/s", "seconds", "re-ingest dups", "file"),
                (
                    "meterkit record_many",
                    fmt_rate(mk.events_per_s),
                    f"{mk.seconds:.2f}",
                    f"{mk_dup.seconds:.2f} s",
                    f"{mk_bytes / 2**20:.1f} MiB",
                ),
                (
                    "raw sqlite3 executemany",
                    fmt_rate(raw.events_per_s),
                    f"{raw.seconds:.2f}",
                    f"{raw_dup.seconds:.2f} s",
                    f"{raw_bytes / 2**20:.1f} MiB",
                ),
                (
                    "ratio meterkit/raw (time)",
                    f"{result['ratio_meterkit_over_raw']:.2f}x",
                    "",
                    f"{result['duplicate_ratio_meterkit_over_raw']:.2f}x",
                    "",
                ),
            ],
        ),
        flush=True,
    )
    return result


def ensure_loaded(args: argparse.Namespace, data: Dataset, work: Path) -> None:
    """For ``--only query``: reuse kept files of the same data, else load them (untimed)."""
    marker = work / MARKER
    if (
        marker.exists()
        and json.loads(marker.read_text()) == dataset_key(data)
        and (work / MK_DB).exists()
        and (work / RAW_DB).exists()
    ):
        print(f"query: reusing {work / MK_DB} and {work / RAW_DB}")
        return
    mk_path, raw_path = work / MK_DB, work / RAW_DB
    remove_db(mk_path)
    remove_db(raw_path)
    print(f"query: loading {len(data.rows):,} events (not timed) ...", flush=True)
    ddl = prepare_schema(mk_path)
    ingest(mk_path, raw_path, ddl, data.rows, args.batch)
    marker.write_text(json.dumps(dataset_key(data)))


def expected_totals(data: Dataset) -> tuple[int, list[int]]:
    """Events and per-measure sums in the query window, straight from the generated rows."""
    org = data.query_organization
    window = [r for r in data.rows if r[1] == org and START <= r[2] < QUERY_END]
    sums = [sum(r[9 + i] or 0 for r in window) for i in range(len(MEASURES))]
    return len(window), sums


def run_query(args: argparse.Namespace, data: Dataset, work: Path) -> dict[str, Any]:
    bench = QueryBench(work / MK_DB, work / RAW_DB, data.query_organization)
    n_window, sums = expected_totals(data)
    print(
        f"query: {QUERY_DAYS} days x 1d, group_by model+project_id, {n_window:,} of "
        f"{len(data.rows):,} events in range; {args.repeat} runs each ...",
        flush=True,
    )
    mk, raw, to_dict, totals = bench.sql_vs_raw(args.repeat)
    got = [sum(v[i] for v in totals.values()) for i in range(len(MEASURES))]
    assert got == sums, (got, sums)
    engine_repeat = min(args.repeat, 3)
    scan = bench.engine_scan(engine_repeat, totals)
    pure = bench.engine_pure(data.rows, engine_repeat, totals)
    if args.profile:
        with meterkit.Meter(f"sqlite:///{work / MK_DB}") as meter:
            profile(lambda: bench.usage(meter), "Meter.usage (SQLite)")

    ratio = mk.median / raw.median
    result = {
        "organization_id": data.query_organization,
        "events_in_range": n_window,
        "rows": len(totals),
        "buckets": QUERY_DAYS,
        "repeat": args.repeat,
        "meterkit_usage": mk.as_dict(),
        "raw_sql": raw.as_dict(),
        "meterkit_usage_to_dict": to_dict.as_dict(),
        "engine_over_sqlite_scan": scan.as_dict(),
        "engine_in_memory": pure.as_dict(),
        "ratio_meterkit_over_raw": round(ratio, 2),
        "ratio_engine_scan_over_raw": round(scan.median / raw.median, 2),
        "ratio_engine_in_memory_over_raw": round(pure.median / raw.median, 2),
    }

    def line(name: str, t: Timing) -> tuple[str, ...]:
        return (
            name,
            fmt_s(t.median),
            fmt_s(min(t.runs)),
            f"{t.median / raw.median:.2f}x",
            str(len(t.runs)),
        )

    print(
        table(
            f"\n{QUERY_DAYS}-day grouped query ({n_window:,} events in range, "
            f"{len(totals):,} rows; median of runs)",
            [
                ("", "median", "min", "vs raw", "runs"),
                line("raw SQL GROUP BY", raw),
                line("meterkit usage()", mk),
                line("meterkit usage().to_dict()", to_dict),
                line("engine over SQLite scan", scan),
                line("engine, events in memory", pure),
            ],
        ),
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    print(
        f"meterkit {meterkit.__version__}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    t0 = time.perf_counter()
    data = generate(args.events, args.seed)
    gen_s = time.perf_counter() - t0
    print(
        f"data: {len(data.rows):,} completions events, {len(data.organizations)} orgs, "
        f"{data.projects} projects, {data.users} users, {data.api_keys} API keys, "
        f"generated in {gen_s:.1f} s",
        flush=True,
    )
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "meterkit": meterkit.__version__,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        # Other work on the machine skews every figure; the load average says how much.
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "args": {k: v for k, v in vars(args).items() if k not in ("dir", "out")},
        "data": {
            "events": len(data.rows),
            "seed": data.seed,
            "organizations": len(data.organizations),
            "projects": data.projects,
            "users": data.users,
            "api_keys": data.api_keys,
            "generate_s": round(gen_s, 2),
        },
    }
    with workdir(args.dir) as work:
        if args.only != "query":
            results["ingest"] = run_ingest(args, data, work)
        if args.only != "ingest":
            if args.only == "query":
                ensure_loaded(args, data, work)
            results["query"] = run_query(args, data, work)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\ntotal {results['total_s']:.1f} s; results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
