"""``meterkit import`` of an NDJSON file against ``record_many`` of the same events in batches.

Both write the same events, in batches of the same size, to fresh SQLite files of the same
durability (the default: WAL, ``synchronous=FULL``, rollups kept), each in a fresh process on
a clock that runs on from the same start. The import is a real ``meterkit import FILE
--progress`` process (its progress bar is drawn, to a captured stderr), timed whole: starting,
opening the store, reading and parsing the file. ``record_many`` is timed from opening the
store to closing it, its events built in memory beforehand. Rounds alternate who goes first;
the medians are reported. The import's rate over ``record_many``'s is the figure (the goal: at
least 0.8x).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from report import fmt_rate, fmt_ratio, fmt_s, median, table

from meterkit import Event, Meter

__all__ = ["run"]

START = 1_764_547_200  # 2025-12-01
EVENTS = 1_000_000
BATCH = 5000
MODELS = ("gpt-4o", "gpt-4o-mini", "o3", "gpt-4.1")


def _events(n: int) -> list[Event]:
    rng = random.Random(11)
    out = []
    for i in range(n):
        out.append(
            Event(
                f"e{i}",
                "completions",
                f"org_{i % 7}",
                START + i * 2_000_000 // n,
                {
                    "input_tokens": rng.randrange(1, 4000),
                    "output_tokens": rng.randrange(1, 1000),
                    "num_model_requests": 1,
                },
                {
                    "model": MODELS[i % len(MODELS)],
                    "project_id": f"proj_{i % 13}",
                    "batch": bool(i % 5 == 0),
                },
            )
        )
    return out


def _write(path: Path, events: list[Event]) -> None:
    with path.open("w") as out:
        for e in events:
            out.write(
                json.dumps(
                    {
                        "id": e.id,
                        "meter": e.meter,
                        "organization_id": e.organization_id,
                        "time": e.time,
                        "values": e.values,
                        "dimensions": e.dimensions,
                    },
                    separators=(",", ":"),
                )
                + "\n"
            )


def _import(path: Path, db: Path, now: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "meterkit", "import", str(path), "--progress",
         "--batch-size", str(BATCH), "--now", str(now), "--db", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "120"},
        check=True,
    )  # fmt: skip
    return time.perf_counter() - t0, done.stderr


def _record_many(n: int, db: Path, now: int) -> float:
    """``record_many`` of the same events in a fresh process, as the import runs in one: the
    events are built there first (not timed), then written in batches (timed)."""
    done = subprocess.run(
        [sys.executable, __file__, "--record-many", str(n), str(db), str(now)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def _record_many_here(n: int, db: Path, now: int) -> float:
    from meterkit.cli.common import StartedClock  # the clock `meterkit import --now` runs on

    events = _events(n)
    gc.freeze()  # the data belongs to the benchmark, not to record_many
    t0 = time.perf_counter()  # from opening the store, as the import's time includes it
    with Meter(f"sqlite:///{db}", clock=StartedClock(now)) as meter:
        for i in range(0, len(events), BATCH):
            meter.record_many(events[i : i + BATCH])
    return time.perf_counter() - t0


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n = 50_000 if getattr(args, "quick", False) else EVENTS
    path = work / "import.ndjson"
    _write(path, _events(n))
    now = START + 3_000_000
    print(f"import: {n:,} NDJSON events ({path.stat().st_size / 1e6:,.0f} MB), batches of {BATCH}")
    dbs = [work / "import-cli.db", work / "import-api.db"]
    rounds = max(2, min(args.rounds, 3))
    cli_times: list[float] = []
    api_times: list[float] = []
    stderr = ""
    for r in range(rounds):
        # Alternate who goes first: this machine's disk and caches drift within a run.
        for who in ("cli", "api") if r % 2 == 0 else ("api", "cli"):
            db = dbs[0] if who == "cli" else dbs[1]
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            if who == "cli":
                seconds, stderr = _import(path, db, now)
                cli_times.append(seconds)
            else:
                api_times.append(_record_many(n, db, now))
    cli_s, api_s = median(cli_times), median(api_times)
    last = [line for line in stderr.splitlines() if "events" in line][-2:]
    with (
        Meter(f"sqlite:///{dbs[0]}", clock=lambda: now) as a,
        Meter(f"sqlite:///{dbs[1]}", clock=lambda: now) as b,
    ):
        for org in ("org_0", "org_6"):
            a.store.ensure_meter(a.spec("completions"))
            b.store.ensure_meter(b.spec("completions"))
            got = sum(1 for _ in a.store.scan("completions", org, 0, 2**40))
            want = sum(1 for _ in b.store.scan("completions", org, 0, 2**40))
            assert got == want, "the import and record_many stored different events"
    print()
    print(
        table(
            f"NDJSON import vs record_many, SQLite FULL with rollups; median of {rounds} rounds",
            [
                ("", "time", "events/s", "vs record_many"),
                ("meterkit import (a process, file parsed)", fmt_s(cli_s), fmt_rate(n / cli_s),
                 fmt_ratio(api_s / cli_s)),
                ("Meter.record_many (events built)", fmt_s(api_s), fmt_rate(n / api_s), ""),
            ],
        )
    )  # fmt: skip
    print("progress, as drawn:", *last, sep="\n  ")
    return {
        "events": n,
        "batch": BATCH,
        "import_s": round(cli_s, 2),
        "record_many_s": round(api_s, 2),
        "import_events_per_s": round(n / cli_s),
        "record_many_events_per_s": round(n / api_s),
        "ratio": round(api_s / cli_s, 3),
        "import_rounds_s": [round(x, 2) for x in cli_times],
        "record_many_rounds_s": [round(x, 2) for x in api_times],
        "progress_tail": last,
    }


if __name__ == "__main__" and sys.argv[1:2] == ["--record-many"]:
    count, target, start = sys.argv[2:5]
    print(_record_many_here(int(count), Path(target), int(start)))
