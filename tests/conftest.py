"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

# Detailed assertion messages from the conformance suite, which lives outside tests/.
pytest.register_assert_rewrite("meterkit.testing")


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for each built-in store; the SQLite file lives in this test's tmp_path."""
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path / 'x.db'}"
