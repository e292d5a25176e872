"""``/openapi.json`` and the server agree: schemathesis generates requests from the document
against a real ``meterkit serve`` of demo data, and finds none that the document admits and
the server refuses, none that the document refuses and the server takes, and no 5xx.

The rules JSON Schema cannot state (one field against another, against the clock, against
what is stored) are the hooks of ``tests/schemathesis_hooks.py``, named in docs/http.md. The
run is bounded (``MK_CONFORMANCE_EXAMPLES`` per operation, a fixed seed); it uses the
examples and fuzzing phases, whose requests pass through those hooks.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

NOW = 1_764_590_400 + 5 * 3600  # 2025-12-01T17:00:00Z
TOKEN = re.compile(r"\b(mk_[0-9a-f]{16}_[A-Za-z0-9_-]{43})\b")
EXAMPLES = os.environ.get("MK_CONFORMANCE_EXAMPLES", "40")

pytestmark = pytest.mark.slow


def _meterkit(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "meterkit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stdout + done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_openapi_document_admits_what_the_server_admits(tmp_path: Path) -> None:
    runner = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if runner is None:
        if os.environ.get("CI") == "true":
            pytest.fail("schemathesis is not installed (it is in the dev extras)")
        pytest.skip("schemathesis is not installed (it is in the dev extras)")
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    _meterkit("demo", "--db", db, "--no-serve", "--now", str(NOW), "--days", "7")
    # One key that may call every route: an admin of a demo organization, operator too.
    created = _meterkit(
        "keys", "create", "--org", "org_acme", "--role", "admin",
        "--scopes", "usage:read,usage:write,operator", "--db", db,
    )  # fmt: skip
    token = TOKEN.search(created)
    assert token, created
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "meterkit", "serve", "--db", db, "--port", str(port),
         "--now", str(NOW), "--freeze-clock", "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        env = {
            **os.environ,
            "MK_CONFORMANCE_NOW": str(NOW),
            "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
        }
        done = subprocess.run(
            [
                runner, "run", base + "/openapi.json",
                "--header", f"Authorization: Bearer {token.group(1)}",
                "--checks", "not_a_server_error,positive_data_acceptance,negative_data_rejection",
                "--phases", "examples,fuzzing",
                "--max-examples", EXAMPLES,
                "--seed", "1",
                "--workers", "1",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )  # fmt: skip
        report = done.stdout + done.stderr
        assert done.returncode == 0, report[-20_000:]
        # Every operation ran and passed.
        assert re.search(r"(\d+) passed", report) and " failed" not in report.split("SUMMARY")[-1]
    finally:
        server.terminate()
        server.wait(10)
        log.close()
