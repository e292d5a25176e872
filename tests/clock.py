"""The time every date-sensitive test runs at: ``MK_TEST_NOW``, or a fixed ordinary day.

Tests never read the wall clock. ``.ci/run`` runs the tests marked ``clock_edges`` again with
``MK_TEST_NOW`` at the instants that break metering code (see ``EDGES``).
"""

from __future__ import annotations

import datetime as dt
import os

__all__ = ["EDGES", "TEST_NOW", "Clock", "Monotonic", "parse_instant"]


def parse_instant(text: str) -> int:
    """Unix seconds, or an ISO 8601 UTC time such as ``2025-03-01T00:00:00Z``."""
    if text.isdigit():
        return int(text)
    return int(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


EDGES = (
    "2025-03-01T00:00:00Z",  # the first second of a month (first: .ci/run runs everything here)
    "2025-12-31T23:59:59Z",  # the last second of a year
    "2024-02-29T12:00:00Z",  # a leap day
    "2025-01-31T00:00:00Z",  # the day a cycle anchored on the 31st starts
    "2025-04-30T23:59:59Z",  # the last second of a month without a 31st
)

TEST_NOW: int = parse_instant(os.environ.get("MK_TEST_NOW") or "2024-11-20T12:00:00Z")


class Clock:
    """A frozen clock, in Unix seconds, that a test moves by hand (``clock.t += 60``)."""

    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> float:
        return float(self.t)


class Monotonic:
    """``time.monotonic`` as the quota caches see it (the ``monotonic`` fixture installs
    it), moved by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t
