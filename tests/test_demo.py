"""The demo's data: its spend limit leaves room at any time of day, and it runs twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from clock import TEST_NOW, Clock
from meterkit import Meter
from meterkit.cli.demo import ORGANIZATIONS, populate

DAY = 86400
MIDNIGHT = TEST_NOW - TEST_NOW % DAY


@pytest.mark.parametrize("hour", [0, 3, 7, 9, 12, 15, 18, 23])
def test_the_demo_starts_under_its_spend_limit_at_any_hour(hour: int) -> None:
    """The limit is a cent or two above the month's spend: a demo-model call is admitted
    (in 8 of 12 times of day the demo began over its limit)."""
    now = MIDNIGHT + hour * 3600 + 1234
    with Meter("memory://", clock=Clock(now)) as m:
        populate(m, days=3, now=now)
        org = ORGANIZATIONS[0].id
        state = m.spend(org)
        assert state.limit is not None
        room = state.limit.threshold_amount - state.counted * 100  # in cents
        assert 1 <= room <= 2, (hour, state.counted, state.limit.threshold_amount)
        assert not state.enforcing
        assert m.check(org, {}, cost="0.005").allowed


def test_the_demo_runs_twice_on_one_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    first = MIDNIGHT + 9 * 3600
    with Meter(url, clock=Clock(first)) as m:
        once = populate(m, days=2, now=first)
    later = first + 2 * 3600  # another "now": the crossing event would conflict
    with Meter(url, clock=Clock(later)) as m:
        again = populate(m, days=2, now=later)
        assert again.duplicates == once.accepted  # every event of the first run, once
        state = m.spend(ORGANIZATIONS[0].id)
        assert state.limit is not None and not state.enforcing
