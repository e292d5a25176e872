"""The Flask guard: a hello-world view, bare and behind ``meterkit.flask.init_app``.

Both run in this process through Flask's test client (no server, no sockets), so the figure is
what the guard itself adds to a request: identify, decide, settle and record. The guarded apps
use ``memory://`` and a SQLite file (FULL) holding a plan too generous to refuse. Rounds rotate
the contenders; the median round is reported as µs per request and the ratio to the bare app.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from report import fmt_rate, fmt_ratio, median, table

__all__ = ["run"]

ORG = "org_flask"
REQUESTS = 2000  # per round and contender


def _app(db: str | None) -> tuple[Any, dict[str, str]]:
    from flask import Flask

    app = Flask("bench")

    @app.get("/")
    def hello() -> str:
        return "Hello, world!"

    if db is None:
        return app.test_client(), {}
    import meterkit
    from meterkit import Plan
    from meterkit.auth import create_key
    from meterkit.flask import init_app

    meter = meterkit.Meter(db)
    meter.set_plan(Plan("bench", limits={"queries": 10**12}, rate_limit_rpm=10**9))
    meter.assign_plan(ORG, "bench")
    token, _ = create_key(meter, ORG, "member", ["usage:read"])
    init_app(app, meter, url_prefix="/meterkit")
    return app.test_client(), {"Authorization": f"Bearer {token}"}


def _per_request(client: Any, headers: dict[str, str]) -> float:
    t0 = time.perf_counter()
    for _ in range(REQUESTS):
        r = client.get("/", headers=headers)
        assert r.status_code == 200, r.status_code
    return (time.perf_counter() - t0) / REQUESTS


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rounds = max(1, args.rounds)
    contenders = {
        "Flask hello-world": _app(None),
        "+ meterkit guard, memory://": _app("memory://"),
        "+ meterkit guard, SQLite (FULL)": _app(f"sqlite:///{work / 'flask-guard.db'}"),
    }
    print(f"flask: {REQUESTS:,} requests per round and contender, {rounds} rounds", flush=True)
    for client, headers in contenders.values():  # warm-up, not counted
        _per_request(client, headers)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds[name].append(_per_request(*contenders[name]))
    per = {name: median(v) for name, v in seconds.items()}
    bare = per[names[0]]
    rows: list[tuple[str, ...]] = [("", "requests/s", "us per request", "vs bare")]
    for name in names:
        rows.append(
            (name, fmt_rate(1 / per[name]), f"{per[name] * 1e6:,.0f}", fmt_ratio(bare / per[name]))
        )
    print()
    print(table("Flask test client, GET / (one thread, in process); median of rounds", rows))
    return {
        name: {"requests_per_s": round(1 / s), "us_per_request": round(s * 1e6, 1)}
        for name, s in per.items()
    }
