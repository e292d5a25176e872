"""Time-weighted gauges on SQLite: a month of integrals against the same integral in raw SQL.

The data: ``SERIES`` volumes of one organization, each reporting its size every hour for the
30 days asked about, after a year of daily reports (so every series carries a value into the
window from long before it). meterkit answers ``usage("disk", 30 x 1d, by volume)``: the
window's events and, per series, the latest value before it (from the day rollups); the
twin reads the same file with raw ``sqlite3``: the window's events in order with ``LEAD`` and
the latest event before the window per series with ``ROW_NUMBER``, then splits the steps into
days in Python. Both give the same rows (checked); the median of rounds is reported.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

from report import fmt_ratio, fmt_s, median, table

from meterkit import Event, Measure, Meter, MeterSpec
from meterkit.models import Dimension

__all__ = ["run"]

DAY = 86_400
START = 1_764_547_200  # 2025-12-01: the window's first day
DAYS = 30
HISTORY_DAYS = 365
SERIES = 100
DISK = MeterSpec("disk", [Measure("bytes", "time_weighted")], [Dimension("volume")])


def _fill(path: Path, series: int, days: int, history: int) -> int:
    rng = random.Random(7)
    events = []
    for s in range(series):
        volume = f"vol_{s:03d}"
        size = rng.randrange(1, 10**9)
        for d in range(history):
            t = START - (history - d) * DAY + rng.randrange(DAY)
            size = max(0, size + rng.randrange(-(10**6), 10**6))
            events.append(Event(f"h{s}-{d}", "disk", "org", t, {"bytes": size}, {"volume": volume}))
        for h in range(days * 24):
            t = START + h * 3600 + rng.randrange(3600)
            size = max(0, size + rng.randrange(-(10**6), 10**6))
            events.append(Event(f"w{s}-{h}", "disk", "org", t, {"bytes": size}, {"volume": volume}))
    with Meter(f"sqlite:///{path}", meters=[DISK], clock=lambda: START + days * DAY) as meter:
        for i in range(0, len(events), 20_000):
            meter.record_many(events[i : i + 20_000])
    return len(events)


def _meterkit(path: Path, days: int) -> dict[Any, int]:
    with Meter(f"sqlite:///{path}", meters=[DISK], clock=lambda: START + days * DAY) as meter:
        page = meter.usage(
            "disk",
            organization_id="org",
            start_time=START,
            end_time=START + days * DAY,
            group_by=["volume"],
            limit=days,
        )
    return {
        (b.start_time, r.group["volume"]): int(r.values["bytes"] or 0)
        for b in page.data
        for r in b.results
    }


def _raw(path: Path, days: int) -> dict[Any, int]:
    low, high = START, START + days * DAY
    conn = sqlite3.connect(path)
    try:
        carried = conn.execute(
            "SELECT d_volume, time, v_bytes FROM (SELECT d_volume, time, v_bytes, ROW_NUMBER() "
            "OVER (PARTITION BY d_volume ORDER BY time DESC, id DESC) AS n FROM events_disk "
            "WHERE organization_id = ? AND time < ? AND v_bytes IS NOT NULL) WHERE n = 1",
            ("org", low),
        ).fetchall()
        steps = conn.execute(
            "SELECT d_volume, time, v_bytes, LEAD(time) OVER (PARTITION BY d_volume "
            "ORDER BY time, id) FROM events_disk WHERE organization_id = ? AND time >= ? "
            "AND time < ? AND v_bytes IS NOT NULL",
            ("org", low, high),
        ).fetchall()
    finally:
        conn.close()
    first = {}
    for volume, t, _v, _n in steps:
        first[volume] = min(first.get(volume, high), t)
    pieces = [(vol, low, v, first.get(vol, high)) for vol, _t, v in carried]
    pieces += [(vol, t, v, high if n is None else n) for vol, t, v, n in steps]
    out: dict[Any, int] = {}
    for volume, t, value, end in pieces:
        while t < end:
            day = t - t % DAY
            cut = min(day + DAY, end)
            out[(day, volume)] = out.get((day, volume), 0) + value * (cut - t)
            t = cut
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    series, history = (10, 60) if quick else (SERIES, HISTORY_DAYS)
    rounds = max(1, args.rounds)
    path = work / "gauges.db"
    if path.exists():
        path.unlink()
    count = _fill(path, series, DAYS, history)
    window = series * DAYS * 24
    print(
        f"gauges: {count:,} events ({series} volumes, {history} days of daily reports, then "
        f"{DAYS} days hourly: {window:,} in the window), {rounds} rounds",
        flush=True,
    )
    times: dict[str, list[float]] = {"meterkit": [], "raw": []}
    answers: dict[str, dict[Any, int]] = {}
    for r in range(rounds):
        order = ["meterkit", "raw"] if r % 2 == 0 else ["raw", "meterkit"]
        for who in order:
            t0 = time.perf_counter()
            answers[who] = (_meterkit if who == "meterkit" else _raw)(path, DAYS)
            times[who].append(time.perf_counter() - t0)
    assert answers["meterkit"] == answers["raw"], "meterkit and raw SQL integrate differently"
    mk, raw = median(times["meterkit"]), median(times["raw"])
    print()
    print(
        table(
            f"30 x 1d time-weighted, by volume ({len(answers['raw']):,} rows); median of rounds",
            [
                ("", "time", "vs raw"),
                ("meterkit usage()", fmt_s(mk), fmt_ratio(raw / mk)),
                ("raw sqlite3 (LEAD, ROW_NUMBER) + Python", fmt_s(raw), ""),
            ],
        )
    )
    return {
        "events": count,
        "window_events": window,
        "rows": len(answers["raw"]),
        "meterkit_s": round(mk, 4),
        "raw_s": round(raw, 4),
        "speed_vs_raw": round(raw / mk, 3),
    }
