"""Single ``record()`` calls on SQLite (FULL), from one thread and from 16 at once.

Each call is durable on return. Against it, the same durable write done by hand: a raw
``sqlite3`` connection per thread (WAL, ``synchronous=FULL``, the same DDL meterkit emitted)
committing one ``INSERT`` per call. Group commit is what lets 16 meterkit callers share
fsyncs; the raw twin commits every call on its own, as each caller would without it. Rounds
alternate the contenders on fresh files; the median round is reported.
"""

from __future__ import annotations

import argparse
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from report import fmt_rate, fmt_ratio, median, table

from meterkit import Meter

__all__ = ["run"]

T0 = 1_730_419_200
CALLS = 2400  # per round, spread over the threads


def _threads(n: int, work: Callable[[int, int], None]) -> float:
    """Seconds for ``n`` threads to make CALLS calls between them, started together."""
    per = CALLS // n
    start = threading.Barrier(n + 1)

    def body(k: int) -> None:
        start.wait()
        for i in range(per):
            work(k, i)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return (time.perf_counter() - t0) / (per * n)


def _meterkit(work_dir: Path, n: int) -> float:
    meter = Meter(f"sqlite:///{work_dir / f'mk-{uuid.uuid4().hex}.db'}", clock=lambda: T0 + 3600)
    meter.record("tokens", {"tokens": 1}, organization_id="org", id="warm", time=T0)
    try:
        return _threads(
            n,
            lambda k, i: meter.record(
                "tokens", {"tokens": 1}, organization_id="org", id=f"{k}-{i}", time=T0 + 60
            ),
        )
    finally:
        meter.close()


def _raw(work_dir: Path, n: int) -> float:
    path = work_dir / f"raw-{uuid.uuid4().hex}.db"
    with Meter(f"sqlite:///{path}") as meter:  # the same DDL meterkit emits for the meter
        meter.store.ensure_meter(meter.spec("tokens"))
    local = threading.local()

    def write(k: int, i: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = sqlite3.connect(path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO events_tokens (id, organization_id, time, v_tokens) VALUES (?, ?, ?, ?)",
            (f"{k}-{i}", "org", T0 + 60, 1),
        )
        conn.execute("COMMIT")

    return _threads(n, write)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rounds = max(1, args.rounds)
    print(
        f"records: {CALLS:,} record() calls per round, 1 and 16 threads, {rounds} rounds",
        flush=True,
    )
    contenders = {
        ("meterkit", 1): lambda: _meterkit(work, 1),
        ("meterkit", 16): lambda: _meterkit(work, 16),
        ("raw", 1): lambda: _raw(work, 1),
        ("raw", 16): lambda: _raw(work, 16),
    }
    seconds: dict[tuple[str, int], list[float]] = {k: [] for k in contenders}
    for r in range(rounds):
        order = list(contenders)
        order = order[r % len(order) :] + order[: r % len(order)]
        for key in order:
            seconds[key].append(contenders[key]())
    per_call = {k: median(v) for k, v in seconds.items()}
    rows: list[tuple[str, ...]] = [("", "calls/s", "us per call", "vs 1 thread", "vs raw twin")]
    for who, label in (("meterkit", "meterkit record()"), ("raw", "raw sqlite3, a commit each")):
        for n in (1, 16):
            s = per_call[(who, n)]
            rows.append(
                (
                    f"{label}, {n} thread{'s' if n > 1 else ''}",
                    fmt_rate(1 / s),
                    f"{s * 1e6:,.0f}",
                    fmt_ratio(per_call[(who, 1)] / s),
                    fmt_ratio(per_call[("raw", n)] / s) if who == "meterkit" else "",
                )
            )
    print()
    print(table("Durable record() calls, SQLite FULL; median of rounds", rows))
    return {
        f"{who}_{n}_threads": {"calls_per_s": round(1 / s), "us_per_call": round(s * 1e6, 1)}
        for (who, n), s in per_call.items()
    }
