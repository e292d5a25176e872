"""Requests per second of a Starlette hello-world with and without ``MeteringMiddleware``.

Each server is its own uvicorn process on 127.0.0.1 (one worker, access log off). The plain app
answers ``GET /`` with ``Hello, world!``; the metered ones are the same app wrapped in
:class:`meterkit.asgi.MeteringMiddleware` over a SQLite store holding a plan with a quota
(``queries``) and both rate limits, set high enough never to refuse, and an API key sent as
``Authorization: Bearer …`` by the load generator (to every server alike). So every metered
request authenticates the key, reserves one query against three limits before the app runs,
and commits it and records a ``requests`` event after: the middleware's defaults.

The load generator is ``wrk`` when it is installed (one thread, fixed concurrency), else an
httpx async client with the same fixed concurrency (in this process: it tops out well below
what the plain app serves, so its ratios understate the middleware's cost). Runs take turns
(plain, metered, …, the order rotating per round) so other load on the machine falls on
every server alike; the median of the rounds is reported. Correctness guards: no non-2xx
answers, a metered answer carries the rate-limit headers and a plain one does not, and the
quota counted at least every request the load generator saw answered.

    python bench/middleware.py serve --port 8000 [--db sqlite:///m.db]   # one server, by hand
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from report import fmt_rate, fmt_ratio, median, table

ORG = "org_http"
HELLO = b"Hello, world!"

__all__ = ["Server", "build_app", "run"]


# -- the server (runs in the child process) --------------------------------------------------


def build_app(db: str | None, token_file: str | None = None) -> Any:
    """The hello-world app, wrapped in ``MeteringMiddleware`` over ``db`` when given.

    A ``memory://`` store lives in this process only, so it is prepared here and its key's
    token written to ``token_file`` for the benchmark to send.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(HELLO.decode())

    app = Starlette(routes=[Route("/", hello)])
    if db is None:
        return app
    import meterkit
    from meterkit.asgi import MeteringMiddleware

    meter = meterkit.Meter(db)
    if db.startswith("memory://"):
        token = prepare(meter)
        if token_file is not None:
            Path(token_file).write_text(token)
    return MeteringMiddleware(app, meter=meter)


def serve(argv: Sequence[str]) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="middleware.py serve")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--db", help="a store URL: wrap the app in MeteringMiddleware over it")
    p.add_argument("--token-file", help="memory:// only: write the prepared key's token here")
    args = p.parse_args(argv)
    uvicorn.run(
        build_app(args.db, args.token_file),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )
    return 0


# -- the benchmark (runs in the bench process) ------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def prepare_store(url: str) -> str:
    """The plan, the organization and an API key in ``url``; returns the key's token."""
    import meterkit

    with meterkit.Meter(url) as meter:
        return prepare(meter)


def prepare(meter: Any) -> str:
    """The plan, the organization and an API key in ``meter``'s store; the key's token."""
    from meterkit import Plan
    from meterkit.auth import create_key

    meter.set_plan(
        Plan(
            "bench",
            "Bench",
            limits={"queries": 10**12},
            rate_limit_rpm=10**9,
            rate_limit_per_day=10**12,
        )
    )
    meter.assign_plan(ORG, "bench")
    token, _ = create_key(meter, ORG, "member", ["usage:read"])
    return str(token)


def queries_used(url: str) -> int:
    import meterkit

    with meterkit.Meter(url) as meter:
        return meter.quotas.used(ORG, "queries")


@dataclass
class Load:
    requests: int
    seconds: float
    non_2xx: int
    errors: int
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class Server:
    name: str
    db: str | None
    token: str | None  # None: a memory:// server prepares its own key and writes token_file
    log: Path
    token_file: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    runs: list[Load] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--port", str(self.port)]
        if self.db is not None:
            cmd += ["--db", self.db]
        if self.token_file is not None:
            self.token_file.unlink(missing_ok=True)
            cmd += ["--token-file", str(self.token_file)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            if self.token is None and self.token_file is not None and self.token_file.exists():
                self.token = self.token_file.read_text().strip() or None
            try:
                if self.token is None:
                    raise httpx.ConnectError("the server has not written its token yet")
                r = httpx.get(self.url, headers=auth(self.token), timeout=2.0)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start in {timeout:g} s") from None
                time.sleep(0.1)
                continue
            assert r.status_code == 200 and r.content == HELLO, (self.name, r.status_code)
            metered = "x-ratelimit-limit" in r.headers and "ratelimit-policy" in r.headers
            assert metered == (self.db is not None), (self.name, dict(r.headers))
            return

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(wrk: str, url: str, token: str, concurrency: int, seconds: float) -> Load:
    out = subprocess.run(
        [
            wrk,
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    return Load(
        requests=int(total.group(1)),
        seconds=_ms(total.group(2) + total.group(3)) / 1000,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(x) for x in errors.groups()) if errors else 0,
        latency_p50_ms=_ms(p50.group(1)) if p50 else None,
        latency_p99_ms=_ms(p99.group(1)) if p99 else None,
    )


async def _httpx_load(url: str, token: str, concurrency: int, seconds: float) -> Load:
    latencies: list[float] = []
    counts = {"ok": 0, "other": 0, "errors": 0}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=auth(token), limits=limits, timeout=30.0) as client:
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    r = await client.get(url)
                except httpx.TransportError:
                    counts["errors"] += 1
                    continue
                latencies.append(time.perf_counter() - start)
                counts["ok" if 200 <= r.status_code < 400 else "other"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()

    def pct(q: float) -> float | None:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
            if latencies
            else None
        )

    return Load(
        requests=counts["ok"] + counts["other"],
        seconds=elapsed,
        non_2xx=counts["other"],
        errors=counts["errors"],
        latency_p50_ms=pct(0.5),
        latency_p99_ms=pct(0.99),
    )


def generate_load(wrk: str | None, url: str, token: str, concurrency: int, seconds: float) -> Load:
    if wrk is not None:
        return run_wrk(wrk, url, token, concurrency, seconds)
    return asyncio.run(_httpx_load(url, token, concurrency, seconds))


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    generator = (
        f"wrk (1 thread, {args.concurrency} connections)"
        if wrk
        else f"httpx.AsyncClient ({args.concurrency} concurrent requests; wrk not installed)"
    )
    for path in ("http-full.db", "http-normal.db"):
        for suffix in ("", "-wal", "-shm"):
            (work / f"{path}{suffix}").unlink(missing_ok=True)
    full_db = f"sqlite:///{work / 'http-full.db'}"
    normal_db = f"sqlite:///{work / 'http-normal.db'}?synchronous=normal"
    full_token = prepare_store(full_db)
    servers = [
        # The plain app is sent the same header as the metered ones, and ignores it.
        Server("Starlette hello-world", None, full_token, work / "http-plain.log"),
        Server(
            "+ MeteringMiddleware, memory://",
            "memory://",
            None,
            work / "http-memory.log",
            token_file=work / "http-memory.token",
        ),
        Server("+ MeteringMiddleware, SQLite (FULL)", full_db, full_token, work / "http-full.log"),
        Server(
            "+ MeteringMiddleware, SQLite (synchronous=normal)",
            normal_db,
            prepare_store(normal_db),
            work / "http-normal.log",
        ),
    ]
    print(
        f"middleware: uvicorn on 127.0.0.1, load by {generator}, {args.http_rounds} rounds x "
        f"{args.duration:g} s per server ...",
        flush=True,
    )
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        for s in servers:  # warm-up, not counted
            assert s.token is not None
            generate_load(wrk, s.url, s.token, args.concurrency, 1.0)
        for r in range(args.http_rounds):
            k = r % len(servers)
            for s in [*servers[k:], *servers[:k]]:
                assert s.token is not None
                load = generate_load(wrk, s.url, s.token, args.concurrency, args.duration)
                assert load.non_2xx == 0 and load.errors == 0, (s.name, load)
                s.runs.append(load)
    finally:
        for s in servers:
            s.stop()
    for s in servers[1:]:
        assert s.db is not None
        if s.db.startswith("memory://"):
            continue  # its counters lived in the server process, gone with it
        used = queries_used(s.db)
        seen = sum(load.requests for load in s.runs)
        assert used >= seen, (s.name, used, seen)

    plain = median([load.rps for load in servers[0].runs])
    rows: list[tuple[str, ...]] = [("", "requests/s (median)", "min", "p50", "p99", "vs plain")]
    result: dict[str, Any] = {
        "generator": generator,
        "concurrency": args.concurrency,
        "seconds_per_run": args.duration,
        "rounds": args.http_rounds,
        "servers": {},
    }
    for s in servers:
        rps = median([load.rps for load in s.runs])
        p50 = median([load.latency_p50_ms or 0.0 for load in s.runs])
        p99 = median([load.latency_p99_ms or 0.0 for load in s.runs])
        rows.append(
            (
                s.name,
                fmt_rate(rps),
                fmt_rate(min(load.rps for load in s.runs)),
                f"{p50:.1f} ms",
                f"{p99:.1f} ms",
                fmt_ratio(rps / plain),
            )
        )
        result["servers"][s.name] = {
            "store": s.db.rsplit("/", 1)[-1] if s.db else None,
            "rps_median": round(rps),
            "rps_runs": [round(load.rps) for load in s.runs],
            "requests": sum(load.requests for load in s.runs),
            "latency_p50_ms_median": round(p50, 2),
            "latency_p99_ms_median": round(p99, 2),
            "ratio_over_plain": round(rps / plain, 4),
        }
    print(
        table(
            f"\nHTTP GET / through uvicorn ({generator}; median of {args.http_rounds} runs "
            f"of {args.duration:g} s)",
            rows,
        ),
        flush=True,
    )
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        raise SystemExit(serve(sys.argv[2:]))
    sys.exit(
        "usage: python bench/middleware.py serve --port N [--db URL]; "
        "the benchmark runs through bench/run.py --only middleware"
    )
