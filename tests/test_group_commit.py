"""Group commit: concurrent record() calls share one store transaction, each durable on return.

The store's append is held open by a gate, so which calls end up in one group is decided by the
test, not by timing: while the first write is in flight, the others queue behind it and are
written together by the next leader.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from meterkit import AppendResult, Event, EventConflict, Meter, ValidationError
from meterkit.writer import GroupWriter

T0 = 1_730_419_200


class GatedStore:
    """A real store whose appends wait for the test to open the gate; it counts them."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[str]] = []
        self.fail_on: str | None = None

    def append(self, events: Sequence[Event]) -> list[Event]:
        self.batches.append([e.id for e in events])
        self.entered.set()
        self.gate.wait(timeout=30)
        if self.fail_on is not None and any(e.id == self.fail_on for e in events):
            raise RuntimeError(f"cannot store {self.fail_on}")
        new: list[Event] = self._store.append(events)
        return new

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def event(i: int | str, tokens: int = 1, org: str = "org") -> Event:
    return Event(f"e{i}", "tokens", org, T0 + 60, {"tokens": tokens})


def queued(writer: GroupWriter) -> int:
    with writer._lock:
        return len(writer._pending)


def run_group(meter: Meter, store: GatedStore, first: Any, rest: list[Any]) -> list[Any]:
    """``first()`` enters the store; ``rest`` queue behind it; then the gate opens."""
    outcomes: list[Any] = [None] * (1 + len(rest))

    def call(i: int, fn: Any) -> None:
        try:
            outcomes[i] = fn()
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=call, args=(0, first))]
    threads[0].start()
    assert store.entered.wait(timeout=30)
    for i, fn in enumerate(rest, 1):
        threads.append(threading.Thread(target=call, args=(i, fn)))
        threads[-1].start()
    writer = meter.recorder.writer
    for _ in range(3000):
        if queued(writer) == len(rest):
            break
        threading.Event().wait(0.01)
    assert queued(writer) == len(rest)
    store.gate.set()
    for t in threads:
        t.join(timeout=30)
    return outcomes


@pytest.fixture(params=["memory", "sqlite"])
def gated(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Meter, GatedStore]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'g.db'}"
    store = GatedStore(Meter(url).store)
    return Meter(store=store, clock=lambda: T0 + 3600), store  # type: ignore[arg-type]


def test_waiting_callers_are_written_in_one_transaction(gated: tuple[Meter, GatedStore]) -> None:
    meter, store = gated
    rest = [
        (lambda i=i: meter.record("tokens", {"tokens": i}, organization_id="org", id=f"r{i}"))
        for i in range(1, 9)
    ]
    outcomes = run_group(meter, store, lambda: meter.record_many([event(0)]), rest)
    assert outcomes[0] == AppendResult(1, 0)
    assert outcomes[1:] == [True] * 8
    # One write for the first caller, one for the eight that queued behind it.
    assert len(store.batches) == 2 and sorted(store.batches[1]) == sorted(
        f"r{i}" for i in range(1, 9)
    )
    stored = {e.id: e.values["tokens"] for e in meter.store.scan("tokens", "org", 0, T0 + 3601)}
    assert stored == {"e0": 1, **{f"r{i}": i for i in range(1, 9)}}


def test_one_callers_failure_is_not_anothers(gated: tuple[Meter, GatedStore]) -> None:
    meter, store = gated
    store.fail_on = "e2"
    rest = [
        lambda: meter.record_many([event(1)]),
        lambda: meter.record_many([event(2), event(3)]),
        lambda: meter.record_many([event(4)]),
    ]
    outcomes = run_group(meter, store, lambda: meter.record_many([event(0)]), rest)
    assert outcomes[0] == AppendResult(1, 0)
    assert outcomes[1] == AppendResult(1, 0) and outcomes[3] == AppendResult(1, 0)
    assert isinstance(outcomes[2], RuntimeError)  # its batch, all or nothing
    stored = sorted(e.id for e in meter.store.scan("tokens", "org", 0, T0 + 3600))
    assert stored == ["e0", "e1", "e4"]


def test_the_same_id_from_two_callers_in_one_group(gated: tuple[Meter, GatedStore]) -> None:
    meter, store = gated
    rest = [
        lambda: meter.record_many([event("x", 5)]),
        lambda: meter.record_many([event("x", 5)]),
        lambda: meter.record("tokens", {"tokens": 9}, organization_id="org", id="ex", time=T0 + 60),
        lambda: meter.record_many([event("x", 5, org="other")]),
    ]
    outcomes = run_group(meter, store, lambda: meter.record_many([event(0)]), rest)
    assert len(store.batches) == 2
    # Whichever queued first is new; the same data again is a duplicate, other data a conflict.
    firsts = [o for o in outcomes[1:3] if o == AppendResult(1, 0)]
    again = [o for o in outcomes[1:3] if o == AppendResult(0, 1)]
    assert len(firsts) == 1 and len(again) == 1
    assert isinstance(outcomes[3], EventConflict)
    assert outcomes[4] == AppendResult(1, 0)  # another organization's own "ex"


def test_many_threads_recording_lose_nothing_and_count_nothing_twice(tmp_path: Path) -> None:
    with Meter(f"sqlite:///{tmp_path / 'many.db'}", clock=lambda: T0 + 3600) as meter:
        errors: list[BaseException] = []
        start = threading.Barrier(16)

        def worker(k: int) -> None:
            try:
                start.wait(timeout=30)
                for i in range(25):
                    assert meter.record(
                        "tokens", {"tokens": 1}, organization_id="org", id=f"t{k}-{i}", time=T0 + 60
                    )
                    # Sent again: a duplicate, whether or not it shared a group with the first.
                    assert not meter.record(
                        "tokens", {"tokens": 1}, organization_id="org", id=f"t{k}-{i}", time=T0 + 60
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[0]
        assert (
            meter.total(
                "tokens", "tokens", organization_id="org", start_time=T0, end_time=T0 + 3600
            )
            == 16 * 25
        )
        assert meter.recorder.writer.writes <= 16 * 25 * 2


def test_a_bad_event_is_refused_before_it_joins_a_group() -> None:
    with Meter("memory://", clock=lambda: T0 + 3600) as meter:
        with pytest.raises(ValidationError):
            meter.record_many([event(0), Event("bad", "tokens", "org", T0, {"tokens": -1})])
        assert meter.recorder.writer.writes == 0
