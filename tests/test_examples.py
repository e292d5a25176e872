"""Every script in examples/ runs to the end, twice (the second run sees the first's files)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip(), "an example says what it did"


def test_the_fastapi_example_meters_and_refuses() -> None:
    script = next(p for p in EXAMPLES if p.name == "fastapi_app.py")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert "statuses: [200, 200, 200, 200, 429, 429]" in done.stdout, done.stderr
    assert "tokens used: 4,280 of 8,000" in done.stdout
