"""Meter.transaction: debits and the events that record them commit together, or not at all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meterkit
from meterkit import Event, Plan

T = 1_730_419_200


class Observer:
    def __init__(self) -> None:
        self.recorded: list[str] = []
        self.thresholds: list[tuple[str, float]] = []

    @meterkit.hookimpl
    def meterkit_events_recorded(self, meter: Any, events: tuple[Event, ...]) -> None:
        self.recorded.extend(e.id for e in events)

    @meterkit.hookimpl
    def meterkit_quota_threshold(self, metric: str, threshold: float, **_: Any) -> None:
        self.thresholds.append((metric, threshold))


@pytest.fixture
def observer() -> Observer:
    return Observer()


@pytest.fixture
def meter(tmp_path: Path, observer: Observer) -> Iterator[meterkit.Meter]:
    # Decided in the store, one transaction each: what these tests look at. (Leased
    # decisions make no transaction of their own; tests/test_leases.py covers them.)
    m = meterkit.Meter(
        f"sqlite:///{tmp_path}/t.db", plugins=[observer], clock=lambda: T, leases=False
    )
    m.set_plan(Plan("p", limits={"tokens": 100}))
    m.assign_plan("org", "p")
    yield m
    m.close()


def writes(m: meterkit.Meter) -> list[str]:
    """Start tracing the store's statements; the list fills with each BEGIN IMMEDIATE."""
    seen: list[str] = []
    conn = m.store.conn  # type: ignore[attr-defined]
    conn.set_trace_callback(lambda sql: seen.append(sql) if sql == "BEGIN IMMEDIATE" else None)
    return seen


def tokens_recorded(m: meterkit.Meter) -> int:
    return int(m.total("tokens", "tokens", organization_id="org", start_time=0, end_time=T + 1))


def test_a_check_is_one_write_transaction(meter: meterkit.Meter) -> None:
    meter.check("org", {"tokens": 1})  # first use creates the meter's table
    seen = writes(meter)
    assert meter.check("org", {"tokens": 5}).allowed
    assert len(seen) == 1  # the counter and the event that records it
    assert meter.quotas.used("org", "tokens") == 6 and tokens_recorded(meter) == 6


def test_reserve_then_commit_is_two_write_transactions(meter: meterkit.Meter) -> None:
    meter.check("org", {"tokens": 1})
    seen = writes(meter)
    with meter.reserve("org", {"tokens": 10}) as r:
        r.commit({"tokens": 4})
    assert len(seen) == 2
    assert meter.quotas.used("org", "tokens") == 5 and tokens_recorded(meter) == 5


def test_failed_recording_rolls_the_debit_back(
    meter: meterkit.Meter, monkeypatch: pytest.MonkeyPatch, observer: Observer
) -> None:
    def broken(events: Any) -> Any:
        raise RuntimeError("disk full")

    monkeypatch.setattr(meter.store, "append", broken)
    with pytest.raises(RuntimeError):
        meter.check("org", {"tokens": 50})
    monkeypatch.undo()
    assert meter.quotas.used("org", "tokens") == 0  # nothing debited without its event
    assert tokens_recorded(meter) == 0 and observer.recorded == []
    # The meter's table, created inside the rolled-back transaction, is created again.
    assert meter.check("org", {"tokens": 5}).allowed
    assert meter.quotas.used("org", "tokens") == 5 and tokens_recorded(meter) == 5


def test_failed_commit_keeps_the_hold_and_may_be_retried(
    meter: meterkit.Meter, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = meter.reserve("org", {"tokens": 30})
    real = meter.store.append

    def broken(events: Any) -> Any:
        raise RuntimeError("disk full")

    monkeypatch.setattr(meter.store, "append", broken)
    with pytest.raises(RuntimeError):
        r.commit({"tokens": 20})
    assert meter.quotas.used("org", "tokens") == 30  # still held, settle rolled back
    monkeypatch.setattr(meter.store, "append", real)
    r.commit({"tokens": 20})
    assert meter.quotas.used("org", "tokens") == 20 and tokens_recorded(meter) == 20


def test_observers_hear_after_commit_and_not_after_rollback(
    meter: meterkit.Meter, observer: Observer
) -> None:
    with meter.transaction():
        meter.record("tokens", {"tokens": 1}, organization_id="org", time=T, id="a")
        with meter.transaction():  # nested: still one transaction
            meter.record("tokens", {"tokens": 1}, organization_id="org", time=T, id="b")
        assert observer.recorded == []
    assert observer.recorded == ["a", "b"]

    with pytest.raises(KeyError), meter.transaction():
        meter.record("tokens", {"tokens": 1}, organization_id="org", time=T, id="c")
        raise KeyError("abandon")
    assert observer.recorded == ["a", "b"]
    assert tokens_recorded(meter) == 2  # "c" was rolled back


def test_threshold_hook_waits_for_the_commit(meter: meterkit.Meter, observer: Observer) -> None:
    with meter.transaction():
        assert meter.check("org", {"tokens": 85}).allowed
        assert observer.thresholds == []
    assert observer.thresholds == [("tokens", 0.8)]


def test_memory_store_supports_the_same_calls(observer: Observer) -> None:
    with meterkit.Meter("memory://", plugins=[observer], clock=lambda: T) as m:
        m.set_plan(Plan("p", limits={"tokens": 10}))
        m.assign_plan("org", "p")
        with m.transaction():
            assert m.check("org", {"tokens": 10}).allowed
            assert not m.check("org", {"tokens": 1}).allowed
        assert m.quotas.used("org", "tokens") == 10 and len(observer.recorded) == 1
