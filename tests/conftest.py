"""Fixtures shared by the test modules."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import meterkit.meter
from clock import TEST_NOW, Monotonic

pytest_plugins = ["shared_store"]  # open_shared: one store, several meters

# Detailed assertion messages from the conformance suite, which lives outside tests/.
pytest.register_assert_rewrite("meterkit.testing")


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for each built-in store; the SQLite file lives in this test's tmp_path."""
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path / 'x.db'}"


class _TestTime:
    """``time`` as a meter built without a clock sees it: TEST_NOW, running on from there."""

    def __init__(self, start: float) -> None:
        self.start, self.origin = start, time.monotonic()

    def time(self) -> float:
        return self.start + (time.monotonic() - self.origin)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture(autouse=True)
def _no_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the wall clock through meterkit: a Meter without a clock of its own (and
    a store clock falling back to the local one) follows TEST_NOW instead."""
    fake = _TestTime(TEST_NOW)
    monkeypatch.setattr(meterkit.meter, "_time", fake)


@pytest.fixture
def monotonic(monkeypatch: pytest.MonkeyPatch) -> Monotonic:
    """The quota caches' clock, frozen until the test moves it."""
    fake = Monotonic()
    monkeypatch.setattr("time.monotonic", fake)
    return fake
