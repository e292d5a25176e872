"""The conformance suite on the built-in stores, and the Meter facade on top of each of them."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import meterkit
from meterkit import AppendResult, Event, Meter, ValidationError
from meterkit.errors import EventConflict
from meterkit.meter import open_store
from meterkit.stores.base import Store
from meterkit.stores.memory import MemoryStore
from meterkit.stores.sqlite import SQLiteStore
from meterkit.testing import T0, StoreConformance
from meterkit.validate import MAX_TIME

DAY = 86400


class TestMemoryStore(StoreConformance):
    persistent = False

    def make_store(self, location: Path) -> Store:
        store = open_store("memory://")
        assert isinstance(store, MemoryStore)
        return store


class TestSQLiteStore(StoreConformance):
    def make_store(self, location: Path) -> Store:
        store = open_store(f"sqlite:///{location / 'x.db'}")
        assert isinstance(store, SQLiteStore)
        return store

    def test_file_is_in_wal_mode(self, tmp_path: Path) -> None:
        store = self.make_store(tmp_path)
        try:
            # Asked through a separate connection: WAL is a property of the file.
            with sqlite3.connect(tmp_path / "x.db") as other:
                assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            store.close()


# -- the Meter facade -------------------------------------------------------------------------


def completion(
    id: str, tokens: int = 10, *, time: int = T0, org: str = "org_1", **dims: Any
) -> Event:
    return Event(
        id=id,
        meter="completions",
        organization_id=org,
        time=time,
        values={"input_tokens": tokens, "num_model_requests": 1},
        dimensions=dims,
    )


def stored_ids(meter: Meter, org: str = "org_1") -> list[str]:
    # A store reads a meter's events once the meter is ensured (Meter does it on first use).
    meter.store.ensure_meter(meter.spec("completions"))
    return sorted(e.id for e in meter.store.scan("completions", org, 0, MAX_TIME + 1))


def total_tokens(meter: Meter, org: str = "org_1") -> int:
    """input_tokens summed over the first three days after T0, through the public query API."""
    page = meter.usage(
        "completions", organization_id=org, start_time=T0, end_time=T0 + 3 * DAY, bucket_width="1d"
    )
    return sum(int(r.values["input_tokens"] or 0) for b in page.data for r in b.results)


def test_record_reports_new_then_duplicate(store_url: str) -> None:
    with Meter(store_url) as m:
        kwargs: dict[str, Any] = {
            "organization_id": "org_1",
            "time": T0 + 5,
            "id": "evt_1",
            "dimensions": {"model": "gpt-4o", "batch": False},
        }
        assert m.record("completions", {"input_tokens": 120}, **kwargs) is True
        assert m.record("completions", {"input_tokens": 120}, **kwargs) is False
        # The same id with other data is a conflict: refused, the stored event kept.
        with pytest.raises(EventConflict) as caught:
            m.record("completions", {"input_tokens": 999}, **kwargs)
        assert caught.value.field == "id" and caught.value.ids == ("evt_1",)
        assert total_tokens(m) == 120
        # Another organization's event of the same id is its own.
        assert m.record("completions", {"input_tokens": 7}, **{**kwargs, "organization_id": "o2"})
        assert total_tokens(m) == 120


def test_record_many_counts_accepted_and_duplicates(store_url: str) -> None:
    with Meter(store_url) as m:
        assert m.record_many([completion("a"), completion("b")]) == AppendResult(2, 0)
        # "a" is already stored, "c" repeats inside the batch: 2 new, 2 duplicates.
        batch = [completion("a"), completion("c"), completion("c"), completion("d")]
        assert m.record_many(batch) == AppendResult(2, 2)
        assert m.record_many([]) == AppendResult(0, 0)
        assert stored_ids(m) == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (completion("bad", tokens=-1), "events[2].values.input_tokens"),
        (completion("bad", batch="yes"), "events[2].dimensions.batch"),
        (
            Event("bad", "completions", "org_1", T0, {"input_tokens": True}),
            "events[2].values.input_tokens",
        ),
        (Event("bad", "no_such_meter", "org_1", T0, {"x": 1}), "events[2].meter"),
    ],
)
def test_invalid_event_rejects_the_whole_batch(store_url: str, bad: Event, field: str) -> None:
    with Meter(store_url) as m:
        assert m.record_many([completion("before")]) == AppendResult(1, 0)
        good = [completion("g0", time=T0 + 1), completion("g1", time=T0 + 2)]
        with pytest.raises(ValidationError) as info:
            m.record_many([*good, bad, completion("g3")])
        assert info.value.field == field
        assert field in str(info.value)
        assert stored_ids(m) == ["before"]
        # Nothing of the rejected batch was kept: every good event is still new.
        assert m.record_many([*good, completion("g3")]) == AppendResult(3, 0)


class Recorder:
    """A plugin observing recorded events."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Event, ...]]] = []

    @meterkit.hookimpl
    def meterkit_events_recorded(self, meter: Any, events: tuple[Event, ...]) -> None:
        self.calls.append((meter, events))


def test_observers_receive_exactly_the_new_events(store_url: str) -> None:
    recorder = Recorder()
    with Meter(store_url, plugins=[recorder]) as m:
        m.record("completions", {"input_tokens": 1}, organization_id="org_1", time=T0, id="a")
        assert len(recorder.calls) == 1
        meter, events = recorder.calls[0]
        assert meter is m
        assert [(e.id, dict(e.values)) for e in events] == [("a", {"input_tokens": 1})]

        m.record("completions", {"input_tokens": 1}, organization_id="org_1", time=T0, id="a")
        assert len(recorder.calls) == 1, "a duplicate is not news"

        batch = [completion("a"), completion("b"), completion("c"), completion("b")]
        m.record_many(batch)
        assert len(recorder.calls) == 2
        assert [e.id for e in recorder.calls[1][1]] == ["b", "c"]
        assert recorder.calls[1][1] == (batch[1], batch[2])

        with pytest.raises(ValidationError):
            m.record_many([completion("d"), completion("e", tokens=-5)])
        assert len(recorder.calls) == 2, "a rejected batch is not reported"


def test_sqlite_meter_is_idempotent_across_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    batch = [completion(f"e{i}", tokens=i, time=T0 + i * 997) for i in range(50)]
    with Meter(url) as m:
        assert m.record_many(batch) == AppendResult(50, 0)
    with Meter(url) as m:
        assert m.record_many(batch) == AppendResult(0, 50)
        with pytest.raises(EventConflict):
            m.record("completions", {"input_tokens": 5}, organization_id="org_1", time=T0, id="e7")
        assert m.record_many([*batch[:3], completion("e50", tokens=50)]) == AppendResult(1, 3)
    with Meter(url) as m:
        assert total_tokens(m) == sum(range(51))
        assert stored_ids(m) == sorted(f"e{i}" for i in range(51))


def test_two_meters_on_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with Meter(url) as m1, Meter(url) as m2:
        assert (
            m1.record("completions", {"input_tokens": 3}, organization_id="org_1", time=T0, id="x")
            is True
        )
        assert (
            m2.record("completions", {"input_tokens": 3}, organization_id="org_1", time=T0, id="x")
            is False
        )
        # "x" was recorded with other data by the other process: a conflict.
        assert m2.record_many([completion("x"), completion("y", tokens=4)]) == AppendResult(
            1, 0, ("x",)
        )
        assert m1.record_many([completion("y", tokens=4), completion("z", tokens=5)]) == (
            AppendResult(1, 1)
        )
        # Each sees what the other wrote, including a page cursor signed by the other.
        assert total_tokens(m1) == total_tokens(m2) == 3 + 4 + 5
        page = m1.usage(
            "completions",
            organization_id="org_1",
            start_time=T0,
            end_time=T0 + 3 * DAY,
            bucket_width="1d",
            limit=1,
        )
        assert page.next_page is not None
        m2.usage(
            "completions",
            organization_id="org_1",
            start_time=T0,
            end_time=T0 + 3 * DAY,
            bucket_width="1d",
            limit=1,
            page=page.next_page,
        )


def test_threads_racing_one_meter_store_each_id_once(store_url: str) -> None:
    n_threads, per_thread, stride = 6, 120, 40
    results: list[AppendResult] = []
    lock = threading.Lock()
    with Meter(store_url) as m:
        barrier = threading.Barrier(n_threads)

        def work(k: int) -> None:
            ids = list(range(k * stride, k * stride + per_thread))
            random.Random(k).shuffle(ids)
            barrier.wait()
            total = AppendResult(0, 0)
            for i in range(0, len(ids), 15):
                total += m.record_many([completion(f"t{n}", tokens=n) for n in ids[i : i + 15]])
            with lock:
                results.append(total)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        distinct = set(range((n_threads - 1) * stride + per_thread))
        assert len(results) == n_threads
        assert sum(r.accepted for r in results) == len(distinct)
        assert sum(r.duplicates for r in results) == n_threads * per_thread - len(distinct)
        assert stored_ids(m) == sorted(f"t{n}" for n in distinct)
        assert total_tokens(m) == sum(distinct)


def _append_from_process(url: str, ids: Sequence[int], barrier: Any, results: Any) -> None:
    with Meter(url) as m:
        barrier.wait()
        total = AppendResult(0, 0)
        for i in range(0, len(ids), 25):
            # Each id always carries the same value, whichever process gets to store it.
            total += m.record_many([completion(f"p{n}", tokens=n) for n in ids[i : i + 25]])
        results.put((total.accepted, total.duplicates))


@pytest.mark.slow
def test_processes_racing_one_sqlite_file_store_each_id_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    n_procs, per_proc, stride = 4, 250, 100
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n_procs)
    results = ctx.Queue()
    procs = []
    for k in range(n_procs):
        ids = list(range(k * stride, k * stride + per_proc))
        random.Random(k).shuffle(ids)
        proc = ctx.Process(target=_append_from_process, args=(url, ids, barrier, results))
        proc.start()
        procs.append(proc)
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    distinct = set(range((n_procs - 1) * stride + per_proc))
    assert sum(a for a, _ in outcomes) == len(distinct)
    assert sum(d for _, d in outcomes) == n_procs * per_proc - len(distinct)
    with Meter(url) as m:
        m.store.ensure_meter(m.spec("completions"))
        events = list(m.store.scan("completions", "org_1", 0, MAX_TIME + 1))
        assert len(events) == len(distinct)
        assert sorted(e.id for e in events) == sorted(f"p{n}" for n in distinct)
        assert total_tokens(m) == sum(distinct)
