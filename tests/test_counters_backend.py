"""Quota counters kept apart from the event store: ``Meter(url, counters=...)``."""

from __future__ import annotations

from pathlib import Path

import pytest

import meterkit
from meterkit import Plan
from meterkit.stores.memory import MemoryStore


class CountersPlugin:
    """Answers ``tally://`` with a counters backend it keeps, so the test can look inside."""

    def __init__(self) -> None:
        self.opened: list[MemoryStore] = []

    @meterkit.hookimpl
    def meterkit_open_counters(self, url: str, scheme: str) -> MemoryStore | None:
        if scheme != "tally":
            return None
        backend = MemoryStore(url)
        self.opened.append(backend)
        return backend


def test_meterkit_open_counters_supplies_the_backend() -> None:
    plugin = CountersPlugin()
    with meterkit.Meter("memory://", counters="tally://one", plugins=[plugin]) as m:
        assert [b.url for b in plugin.opened] == ["tally://one"]
        assert m.counters is plugin.opened[0] and m.counters is not m.store
        m.set_plan(Plan("p", limits={"tokens": 10}))
        m.assign_plan("org", "p")
        assert m.check("org", {"tokens": 6}).allowed
        assert not m.check("org", {"tokens": 6}).allowed
        # The decision was taken on the plugin's counters, not the event store's.
        key = m.quotas.period_key("org", "tokens", m.quotas.period("org"))
        assert plugin.opened[0].counters_read([key], now=m.now()) == [6]
        assert m.store.counters_read([key], now=m.now()) == [0]


def test_any_store_url_serves_as_counters(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/counters.db"
    for expected in (True, False):
        with meterkit.Meter("memory://", counters=url) as m:
            m.set_plan(Plan("p", limits={"queries": 1}))
            m.assign_plan("org", "p")
            # The second meter shares the first one's counters through the SQLite file.
            assert m.check("org", {"queries": 1}).allowed is expected


def test_bad_counters_url() -> None:
    with pytest.raises(meterkit.ValidationError) as info:
        meterkit.Meter("memory://", counters="not a url")
    assert info.value.field == "counters"
