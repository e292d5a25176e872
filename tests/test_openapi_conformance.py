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
import subprocess
import sys
from pathlib import Path

import pytest

from served import meterkit, new_key, serve

NOW = 1_764_590_400 + 5 * 3600  # 2025-12-01T17:00:00Z
EXAMPLES = os.environ.get("MK_CONFORMANCE_EXAMPLES", "40")

pytestmark = pytest.mark.slow


def test_the_openapi_document_admits_what_the_server_admits(tmp_path: Path) -> None:
    runner = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if runner is None:
        if os.environ.get("CI") == "true":
            pytest.fail("schemathesis is not installed (it is in the dev extras)")
        pytest.skip("schemathesis is not installed (it is in the dev extras)")
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    meterkit("demo", "--db", db, "--no-serve", "--now", str(NOW), "--days", "7")
    # One key that may call every route: an admin of a demo organization, operator too.
    token = new_key(db, "org_acme", "usage:read,usage:write,operator")
    with serve(db, NOW, tmp_path / "serve.log") as base:
        env = {
            **os.environ,
            "MK_CONFORMANCE_NOW": str(NOW),
            "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
        }
        done = subprocess.run(
            [
                runner, "run", base + "/openapi.json",
                "--header", f"Authorization: Bearer {token}",
                "--checks", "not_a_server_error,positive_data_acceptance,negative_data_rejection",
                "--phases", "examples,fuzzing",
                "--max-examples", EXAMPLES,
                "--seed", "1",
                "--generation-database", "none",  # each run the same, nothing kept between
                "--workers", "1",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,  # what schemathesis keeps of a run stays with this run
            timeout=900,
        )  # fmt: skip
        report = done.stdout + done.stderr
        (tmp_path / "schemathesis.log").write_text(report)
        assert done.returncode == 0, report[-20_000:]
        # Every operation ran and passed.
        assert re.search(r"(\d+) passed", report) and " failed" not in report.split("SUMMARY")[-1]
