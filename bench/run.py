"""meterkit benchmarks, each against a raw baseline in the same run, printed as ratios.

ingest: durable SQLite ingest vs raw ``sqlite3``; query: a 31-day grouped query vs raw SQL;
quotas: quota check-and-debit vs the ``limits`` library; middleware: a Starlette app served by
uvicorn with and without ``MeteringMiddleware``; scale: PostgreSQL ingest and PostgreSQL /
Redis quota checks vs raw psycopg and ``limits`` on Redis.

    python bench/run.py                   # everything (about 10 minutes)
    python bench/run.py --quick           # a smoke run of everything, about a minute
    python bench/run.py --only quotas     # one part: ingest, query, quotas, middleware, scale
    python bench/run.py --only query --dir bench/.data/q   # reuse files kept by --dir

Speed is measured here and never asserted; the only assertions are correctness guards
(meterkit and the baseline must give the same answers). Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
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
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flask_guard
import gauges
import importer
import middleware
import quotas
import records
import scale
from costs import DAYS as COSTS_DAYS
from costs import run_costs
from data import MEASURES, QUERY_DAYS, QUERY_END, START, Dataset, generate, to_event
from ingest import IngestFigures, Target, ingest, prepare_schema, table_ddl
from query import QueryBench, Timing, engine_scan_rss, minute_queries
from report import fmt_rate, fmt_s, table

import meterkit

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PARTS = (
    "ingest",
    "query",
    "costs",
    "growth",
    "quotas",
    "records",
    "gauges",
    "import",
    "middleware",
    "flask",
    "scale",
)
# The growth part's data sets, in events generated (their query window holds about two thirds).
GROWTH_SIZES = (303_000, 1_550_000, 3_040_000)
MK_DB = "mk.db"
RAW_DB = "raw.db"
MK_NORMAL_DB = "mk-normal.db"
RAW_NORMAL_DB = "raw-normal.db"
MARKER = "dataset.json"
# 1,550,000 events put 1,020,046 of them in the query's 31-day window of its organization.
DEFAULT_EVENTS = 1_550_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="events to generate")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, short runs")
    p.add_argument("--only", choices=PARTS, help="run one benchmark only")
    p.add_argument("--batch", type=int, default=10_000, help="events per record_many call")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per query path")
    p.add_argument("--seed", type=int, default=20241101, help="data generator seed")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per quota-check contender")
    p.add_argument(
        "--seconds", type=float, default=0.6, help="seconds per round of a quota-check contender"
    )
    p.add_argument("--threads", type=int, default=4, help="threads for the concurrent checks")
    p.add_argument("--http-rounds", type=int, default=3, help="load runs per HTTP server")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per HTTP load run")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP requests")
    p.add_argument(
        "--scale-events", type=int, default=200_000, help="events ingested into PostgreSQL"
    )
    p.add_argument(
        "--postgres",
        default=os.environ.get("MK_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="PostgreSQL for --only scale (default $MK_POSTGRES_URL or the local server)",
    )
    p.add_argument(
        "--redis",
        default=os.environ.get("MK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        help="Redis for --only scale (default $MK_BENCH_REDIS_URL or the local server, db 0)",
    )
    p.add_argument(
        "--dir",
        type=Path,
        help="keep the database files here (default: a temporary directory); "
        "--only query reuses files a previous run left for the same data",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="JSON results file (default bench/results/latest.json; "
        "with --only PART, bench/results/PART.json)",
    )
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
        args.rounds = min(args.rounds, 2)
        args.seconds = min(args.seconds, 0.2)
        args.http_rounds = 1
        args.duration = min(args.duration, 1.0)
        args.scale_events = min(args.scale_events, 10_000)
    positive = ("events", "batch", "repeat", "rounds", "threads", "http_rounds", "concurrency")
    if any(getattr(args, k) < 1 for k in positive) or args.scale_events < 1:
        p.error("counts and sizes must be positive")
    if args.seconds <= 0 or args.duration <= 0:
        p.error("--seconds and --duration must be positive")
    if args.out is None:
        args.out = RESULTS / (f"{args.only}.json" if args.only else "latest.json")
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


def profile(fn: Callable[[], object], title: str, limit: int = 20) -> None:
    prof = cProfile.Profile()
    prof.runcall(fn)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(limit)
    print(f"\n--- profile: {title} ---\n{out.getvalue()}")


def run_ingest(args: argparse.Namespace, data: Dataset, work: Path) -> dict[str, Any]:
    full = Target(work / MK_DB, work / RAW_DB)
    normal = Target(work / MK_NORMAL_DB, work / RAW_NORMAL_DB, "synchronous=normal")
    for t in (full, normal):
        remove_db(t.mk_path)
        remove_db(t.raw_path)
    (work / MARKER).unlink(missing_ok=True)
    ddl = prepare_schema(full.mk_path)
    assert prepare_schema(normal.mk_path) == ddl
    print(
        f"ingest: {len(data.rows):,} events in batches of {args.batch:,}, at the store's default "
        "durability and at synchronous=normal, all four files in turn ...",
        flush=True,
    )
    ingest([full, normal], ddl, data.rows, args.batch)
    for t in (full, normal):
        assert t.mk.accepted == t.raw.accepted == len(data.rows), (t.mk, t.raw)
    assert (full.synchronous, normal.synchronous) == ("FULL", "NORMAL"), (full, normal)
    sizes = {t.synchronous: (file_bytes(t.mk_path), file_bytes(t.raw_path)) for t in (full, normal)}
    # Every id again (at the default durability): nothing new may be stored.
    dup = Target(full.mk_path, full.raw_path)
    ingest([dup], ddl, data.rows, args.batch)
    assert dup.mk.accepted == 0 and dup.raw.accepted == 0, (dup.mk, dup.raw)
    assert table_ddl(full.raw_path) == table_ddl(normal.raw_path) == ddl
    for t in (normal,):  # only the default-durability files are queried
        remove_db(t.mk_path)
        remove_db(t.raw_path)
    (work / MARKER).write_text(json.dumps(dataset_key(data)))
    if args.profile:
        events = [to_event(r) for r in data.rows[: args.batch]]
        scratch = work / "profile.db"
        remove_db(scratch)
        with meterkit.Meter(f"sqlite:///{scratch}") as meter:
            meter.record_many(events[:1])
            profile(lambda: meter.record_many(events), f"record_many({len(events):,} events)")
        remove_db(scratch)

    def side(fresh: IngestFigures, size: int, dup: IngestFigures | None) -> dict[str, Any]:
        out = {**fresh.as_dict(), "file_bytes": size}
        if dup is not None:
            out["duplicate_reingest"] = dup.as_dict()
        return out

    mk_n, raw_n = sizes["NORMAL"]
    mk_f, raw_f = sizes["FULL"]
    result = {
        "batch": args.batch,
        "synchronous": full.synchronous,
        "meterkit": side(full.mk, mk_f, dup.mk),
        "raw": side(full.raw, raw_f, dup.raw),
        # How many times longer meterkit takes than raw sqlite3 (1.0 = as fast).
        "ratio_meterkit_over_raw": round(full.mk.seconds / full.raw.seconds, 2),
        "duplicate_ratio_meterkit_over_raw": round(dup.mk.seconds / dup.raw.seconds, 2),
        "synchronous_normal": {
            "url_option": "?synchronous=normal",
            "meterkit": side(normal.mk, mk_n, None),
            "raw": side(normal.raw, raw_n, None),
            "ratio_meterkit_over_raw": round(normal.mk.seconds / normal.raw.seconds, 2),
        },
    }

    def line(name: str, f: IngestFigures, dup_s: str, size: int) -> tuple[str, ...]:
        return (
            name,
            fmt_rate(f.events_per_s),
            f"{f.seconds:.2f}",
            dup_s,
            f"{size / 2**20:.1f} MiB",
        )

    print(
        table(
            f"\nDurable ingest into SQLite ({len(data.rows):,} events, WAL, "
            f"1 transaction per {args.batch:,})",
            [
                ("", "events/s", "seconds", "re-ingest dups", "file"),
                line("meterkit record_many, FULL", full.mk, f"{dup.mk.seconds:.2f} s", mk_f),
                line("raw sqlite3 executemany, FULL", full.raw, f"{dup.raw.seconds:.2f} s", raw_f),
                (
                    "ratio meterkit/raw (time), FULL",
                    f"{result['ratio_meterkit_over_raw']:.2f}x",
                    "",
                    f"{result['duplicate_ratio_meterkit_over_raw']:.2f}x",
                    "",
                ),
                line("meterkit record_many, NORMAL", normal.mk, "", mk_n),
                line("raw sqlite3 executemany, NORMAL", normal.raw, "", raw_n),
                (
                    "ratio meterkit/raw (time), NORMAL",
                    f"{result['synchronous_normal']['ratio_meterkit_over_raw']:.2f}x",
                    "",
                    "",
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
    ingest([Target(mk_path, raw_path)], ddl, data.rows, args.batch)
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
    minutes = minute_queries(bench, args.repeat)
    pruned = bench.after_prune(work, args.repeat, totals)
    rss, rss_floor = engine_scan_rss(work / MK_DB, data.query_organization)
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
        "engine_over_sqlite_scan_peak_rss_kib": rss,
        "engine_over_sqlite_scan_rss_floor_kib": rss_floor,
        "retention": pruned,
        "minute_day": {
            name: {
                "result_rows": rows,
                "meterkit_usage": m.as_dict(),
                "meterkit_usage_dict": d.as_dict(),
                "raw_sql": r.as_dict(),
                "ratio_meterkit_over_raw": round(m.median / r.median, 2),
                "ratio_usage_dict_over_raw": round(d.median / r.median, 2),
            }
            for name, (m, d, r, rows) in minutes.items()
        },
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
    minute_rows: list[tuple[str, ...]] = [("", "median", "min", "vs raw", "rows")]
    for name, (m, d, r, rows) in minutes.items():
        minute_rows.append(
            (f"raw SQL GROUP BY, {name}", fmt_s(r.median), fmt_s(min(r.runs)), "", "")
        )
        for label, t in (("usage()", m), ("usage_dict()", d)):
            minute_rows.append(
                (
                    f"meterkit {label}, {name}",
                    fmt_s(t.median),
                    fmt_s(min(t.runs)),
                    f"{t.median / r.median:.2f}x",
                    f"{rows:,}",
                )
            )
    print(table("\n1440 x 1m over one day (median of runs)", minute_rows), flush=True)
    after = pruned["query_after_prune"]["median_s"]
    print(
        f"\nretention 30 days on a copy: prune dropped {pruned['events_dropped']:,} of "
        f"{pruned['events_before']:,} events in {pruned['prune_s']:.2f} s "
        f"({pruned['dropped_per_s']:,}/s); the {QUERY_DAYS}-day query after it: "
        f"{fmt_s(after)} ({after / raw.median:.2f}x raw), the same rows",
        flush=True,
    )
    print(
        f"\nengine over a SQLite scan, in a fresh process: peak RSS {rss / 1024:.0f} MiB "
        f"(the same process without the query: {rss_floor / 1024:.0f} MiB)",
        flush=True,
    )
    return result


def run_growth(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The 31-day grouped query over data sets of growing size and the same cardinality.

    Each size lives in a folder of its own under the work folder (reused with ``--dir``);
    meterkit's median ``usage()`` and the raw ``GROUP BY`` are timed on each, as in ``query``.
    """
    sizes = [min(n, args.events) for n in GROWTH_SIZES] if args.quick else list(GROWTH_SIZES)
    out: dict[str, Any] = {}
    lines = [("events generated", "in window", "raw GROUP BY", "meterkit usage()", "vs raw")]
    for n in sorted(set(sizes)):
        data = generate(n, args.seed)
        folder = work / f"growth-{n}"
        folder.mkdir(exist_ok=True)
        ensure_loaded(args, data, folder)
        bench = QueryBench(folder / MK_DB, folder / RAW_DB, data.query_organization)
        mk, raw, _to_dict, _totals = bench.sql_vs_raw(args.repeat)
        in_window, _ = expected_totals(data)
        out[str(n)] = {
            "events_in_window": in_window,
            "meterkit_usage": mk.as_dict(),
            "raw_sql": raw.as_dict(),
            "ratio_meterkit_over_raw": round(mk.median / raw.median, 3),
        }
        lines.append(
            (
                f"{n:,}",
                f"{in_window:,}",
                fmt_s(raw.median),
                fmt_s(mk.median),
                f"{mk.median / raw.median:.3f}x",
            )
        )
    first, last = out[str(min(sizes))], out[str(max(sizes))]
    growth = last["meterkit_usage"]["median_s"] / first["meterkit_usage"]["median_s"]
    raw_growth = last["raw_sql"]["median_s"] / first["raw_sql"]["median_s"]
    events_growth = last["events_in_window"] / first["events_in_window"]
    out["growth"] = {
        "events": round(events_growth, 2),
        "meterkit_time": round(growth, 2),
        "raw_time": round(raw_growth, 2),
    }
    print(
        table(
            f"\n31 x 1d grouped query as the data grows ({events_growth:.1f}x events: meterkit "
            f"{growth:.2f}x the time, raw SQL {raw_growth:.2f}x)",
            lines,
        ),
        flush=True,
    )
    return out


def run_costs_part(args: argparse.Namespace, data: Dataset, work: Path) -> dict[str, Any]:
    org = data.query_organization
    print(
        f"costs: {COSTS_DAYS} days, group_by line_item+project_id, prices per model; "
        f"{args.repeat} runs priced in aggregate, 1 priced per event ...",
        flush=True,
    )
    result = run_costs(work / MK_DB, org, args.repeat)
    agg, per_event = result["aggregated_median_s"], result["per_event_s"]
    print(
        table(
            f"\n{COSTS_DAYS}-day costs page ({result['results']:,} results; "
            f"total {result['total']})",
            [
                ("", "seconds", "vs per event"),
                ("priced per event (before)", fmt_s(per_event), "1.00x"),
                ("Meter.costs(), aggregated", fmt_s(agg), f"{agg / per_event:.3f}x"),
            ],
        ),
        flush=True,
    )
    return result


def redact(url: str) -> str:
    """``url`` without its password, for the results file."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    print(
        f"meterkit {meterkit.__version__}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    parts = [args.only] if args.only else list(PARTS)
    shown = {k: v for k, v in vars(args).items() if k not in ("dir", "out")}
    shown["postgres"], shown["redis"] = redact(args.postgres), redact(args.redis)
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "meterkit": meterkit.__version__,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        # Other work on the machine skews every figure; the load average says how much.
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "args": shown,
        "parts": {},
    }
    data: Dataset | None = None
    if "ingest" in parts or "query" in parts or "costs" in parts:
        t0 = time.perf_counter()
        data = generate(args.events, args.seed)
        gen_s = time.perf_counter() - t0
        # The data set is the benchmark's, not a contender's: without this, the cyclic GC
        # walks its millions of tuples whenever a timed call allocates enough to trigger it.
        gc.collect()
        gc.freeze()
        print(
            f"data: {len(data.rows):,} completions events, {len(data.organizations)} orgs, "
            f"{data.projects} projects, {data.users} users, {data.api_keys} API keys, "
            f"generated in {gen_s:.1f} s",
            flush=True,
        )
        results["data"] = {
            "events": len(data.rows),
            "seed": data.seed,
            "organizations": len(data.organizations),
            "projects": data.projects,
            "users": data.users,
            "api_keys": data.api_keys,
            "generate_s": round(gen_s, 2),
        }
    with workdir(args.dir) as work:
        for part in parts:
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            if part == "ingest":
                assert data is not None
                results["ingest"] = run_ingest(args, data, work)
            elif part == "query":
                assert data is not None
                if args.only == "query":
                    ensure_loaded(args, data, work)
                results["query"] = run_query(args, data, work)
            elif part == "costs":
                assert data is not None
                if args.only == "costs":
                    ensure_loaded(args, data, work)
                results["costs"] = run_costs_part(args, data, work)
            elif part == "growth":
                results["growth"] = run_growth(args, work)
            elif part == "quotas":
                results["quotas"] = quotas.run(args, work)
            elif part == "records":
                results["records"] = records.run(args, work)
            elif part == "gauges":
                results["gauges"] = gauges.run(args, work)
            elif part == "import":
                results["import"] = importer.run(args, work)
            elif part == "middleware":
                results["middleware"] = middleware.run(args, work)
            elif part == "flask":
                results["flask"] = flask_guard.run(args, work)
            elif part == "scale":
                results["scale"] = scale.run(args, work)
            # Per part: how long it took, and the 1-minute load average before and after it.
            results["parts"][part] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "loadavg_1m_before": round(load, 2),
                "loadavg_1m_after": round(os.getloadavg()[0], 2),
            }
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\ntotal {results['total_s']:.1f} s; results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
