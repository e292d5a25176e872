"""A real ``meterkit serve`` of a store, for the tests that drive it from outside (a browser,
schemathesis): the command line, a key, and the server on a free port until the block ends."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(db: str, now: int, log: Path) -> Iterator[str]:
    """``meterkit serve`` of ``db`` on a clock frozen at ``now``: its base URL, once it
    answers ``/healthz``; its output goes to ``log``."""
    port = _free_port()
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "meterkit", "serve", "--db", db, "--port", str(port),
             "--now", str(now), "--freeze-clock", "--log-level", "warning"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(150):
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    break
                time.sleep(0.2)
            else:
                pytest.fail("meterkit serve did not answer: " + log.read_text())
            assert server.poll() is None, log.read_text()
            yield base
        finally:
            server.terminate()
            server.wait(10)
