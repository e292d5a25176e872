"""A real ``meterkit serve`` of a store, for the tests that drive it from outside (a browser,
schemathesis): the command line, a key, and the server (``test_server``'s start and stop)
until the block ends."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from test_server import start_with_retry, stop

TOKEN = re.compile(r"\b(mk_[0-9a-f]{16}_[A-Za-z0-9_-]{43})\b")


def meterkit(*args: str) -> str:
    """``python -m meterkit ARGS``: what it printed (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "meterkit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stdout + done.stderr


def token_in(printed: str) -> str:
    """The API key token a command printed."""
    found = TOKEN.search(printed)
    assert found, printed
    return found.group(1)


def new_key(db: str, org: str, scopes: str = "usage:read") -> str:
    """An admin key of ``org`` with ``scopes`` (comma-separated): its token."""
    return token_in(
        meterkit("keys", "create", "--org", org, "--role", "admin", "--scopes", scopes, "--db", db)
    )


@contextmanager
def serve(db: str, now: int, log: Path) -> Iterator[str]:
    """``meterkit serve`` of ``db`` on a clock frozen at ``now``: its base URL, once it
    answers ``/healthz``; its output goes to ``log``."""
    args = ["serve", "--db", db, "--now", str(now), "--freeze-clock", "--log-level", "warning"]
    server = start_with_retry(args, log, log.parent)
    try:
        yield server.base
    finally:
        stop(server)
