"""The events capability: append, ids, duplicates and conflicts, scans, types, meters."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest

from meterkit.models import Dimension, Event, Measure, MeterSpec, Number
from meterkit.stores.base import Store
from meterkit.testing.base import Conformance
from meterkit.testing.support import (
    COMPLETIONS,
    DAY,
    END_OF_TIME,
    SUITE_METER,
    T0,
    StoreFactory,
    UnreadableValues,
    UnusableId,
    make_query,
    normalized,
    scan_all,
    sorted_norm,
    suite_event,
)

__all__ = ["EventConformance"]


class EventConformance(Conformance):
    """Every store: what is appended is stored once and read back exactly."""

    def test_implements_the_store_protocol(self, store: Store) -> None:
        assert isinstance(store, Store)
        assert isinstance(store.url, str) and store.url

    def test_fresh_store_is_empty(self, store: Store) -> None:
        for spec in self.meters:
            assert scan_all(store, spec.name, "org_a") == []

    def test_append_returns_exactly_the_new_events(self, store: Store) -> None:
        batch = [
            suite_event("a", time=T0 + 5),
            suite_event("b", time=T0 + 1),
            suite_event("c", org="org_b"),
        ]
        assert sorted_norm(store.append(batch)) == sorted_norm(batch)
        more = [suite_event("a", values={"total": 99}), suite_event("d"), suite_event("b")]
        assert [normalized(e) for e in store.append(more)] == [normalized(more[1])]
        assert store.append([]) == []

    def test_duplicate_in_a_later_batch_is_not_stored_again(self, store: Store) -> None:
        first = [suite_event("a", values={"total": 1}), suite_event("b", values={"total": 2})]
        store.append(first)
        again = [suite_event("a", values={"total": 50}, time=T0 + 9), suite_event("c")]
        assert [e.id for e in store.append(again)] == ["c"]
        # The first write wins: the later copy of "a" changed nothing.
        stored = scan_all(store, SUITE_METER.name, "org_a")
        assert sorted_norm(stored) == sorted_norm([*first, again[1]])

    def test_duplicate_within_one_batch_is_stored_once(self, store: Store) -> None:
        a1 = suite_event("a", values={"total": 1})
        a2 = suite_event("a", values={"total": 7}, time=T0 + 60)
        b = suite_event("b")
        new = store.append([a1, b, a2, b])
        assert [normalized(e) for e in new] == [normalized(a1), normalized(b)]
        assert sorted_norm(scan_all(store, SUITE_METER.name, "org_a")) == sorted_norm([a1, b])

    def test_same_id_in_two_meters_is_two_events(self, store: Store) -> None:
        mine = suite_event("shared", values={"total": 3})
        theirs = suite_event("shared", meter=COMPLETIONS.name, values={"input_tokens": 3})
        assert len(store.append([mine, theirs])) == 2
        assert sorted_norm(scan_all(store, SUITE_METER.name, "org_a")) == [normalized(mine)]
        assert sorted_norm(scan_all(store, COMPLETIONS.name, "org_a")) == [normalized(theirs)]

    def test_ids_are_unique_per_organization_and_meter(self, store: Store) -> None:
        # One organization using an id first must not swallow another's event of that id.
        first = suite_event("x", org="org_a", values={"total": 1})
        theirs = suite_event("x", org="org_b", values={"total": 2})
        assert len(store.append([first])) == 1
        assert [normalized(e) for e in store.append([theirs])] == [normalized(theirs)]
        assert store.append([suite_event("x", org="org_b", values={"total": 2})]) == []
        assert sorted_norm(scan_all(store, SUITE_METER.name, "org_a")) == [normalized(first)]
        assert sorted_norm(scan_all(store, SUITE_METER.name, "org_b")) == [normalized(theirs)]

    def test_same_id_for_two_organizations_in_one_batch(self, store: Store) -> None:
        a, b = suite_event("y", org="org_a"), suite_event("y", org="org_b", values={"total": 5})
        assert sorted_norm(store.append([a, b, a])) == sorted_norm([a, b])

    def test_get_events_reads_stored_copies_of_one_organization(self, store: Store) -> None:
        mine = suite_event("g", values={"total": 3}, dims={"region": "eu"})
        theirs = suite_event("g", org="org_b", values={"total": 4})
        store.append([mine, theirs, suite_event("h")])
        got = store.get_events(SUITE_METER.name, "org_a", ["g", "missing", "g"])
        assert [normalized(e) for e in got] == [normalized(mine)]
        got_b = store.get_events(SUITE_METER.name, "org_b", ["g", "h"])
        assert [normalized(e) for e in got_b] == [normalized(theirs)]
        assert store.get_events(SUITE_METER.name, "org_a", []) == []
        assert store.get_events(COMPLETIONS.name, "org_a", ["g"]) == []

    def test_meter_reports_conflicts_and_keeps_the_stored_event(
        self, store_factory: StoreFactory
    ) -> None:
        from meterkit.errors import EventConflict
        from meterkit.meter import Meter

        meter = Meter(store=store_factory.open(), meters=self.meters, clock=lambda: T0 + DAY)
        kept = suite_event("c1", values={"total": 1, "peak": 2}, dims={"region": "eu"})
        assert meter.record_many([kept]).accepted == 1
        same = attrs.evolve(kept, dimensions={"region": "eu", "tier": None})
        other_time = attrs.evolve(kept, time=kept.time + 1)
        other_value = attrs.evolve(kept, values={"total": 2, "peak": 2})
        other_dim = attrs.evolve(kept, dimensions={"region": "us"})
        other_org = attrs.evolve(kept, organization_id="org_b", values={"total": 9})
        result = meter.record_many([same, other_time, other_value, other_dim, other_org])
        assert result.statuses == ("duplicate", "conflict", "conflict", "conflict", "accepted")
        assert (result.accepted, result.duplicates, result.conflicts) == (1, 1, ("c1",) * 3)
        # In one batch: the first copy is the reference for the later ones.
        batch = [
            suite_event("c2", values={"total": 1}),
            suite_event("c2", values={"total": 1}),
            suite_event("c2", values={"total": 8}),
        ]
        assert meter.record_many(batch).statuses == ("accepted", "duplicate", "conflict")
        with pytest.raises(EventConflict) as caught:
            meter.record(
                SUITE_METER.name,
                {"total": 5},
                organization_id="org_a",
                time=kept.time,
                id="c1",
                dimensions={"region": "eu"},
            )
        assert caught.value.field == "id" and caught.value.ids == ("c1",)
        stored = {e.id: normalized(e) for e in scan_all(meter.store, SUITE_METER.name, "org_a")}
        assert stored == {"c1": normalized(kept), "c2": normalized(batch[0])}

    def test_every_valid_string_round_trips(self, store: Store) -> None:
        # What validation lets through, the store must keep exactly (and find by).
        texts = ["Ω≈ç√", "'; DROP TABLE x; --", "q\"uo'te", "🦄 astral", "\u202eRTL", "x" * 256]
        events = [
            suite_event(t, org=t, values={"total": i + 1}, dims={"region": t})
            for i, t in enumerate(texts)
        ]
        assert sorted_norm(store.append(events)) == sorted_norm(events)
        assert store.append(events) == []
        for e in events:
            assert [
                normalized(g) for g in scan_all(store, SUITE_METER.name, e.organization_id)
            ] == [normalized(e)]
            got = store.get_events(SUITE_METER.name, e.organization_id, [e.id])
            assert [normalized(g) for g in got] == [normalized(e)]

    def test_meter_refuses_unstorable_strings_before_the_store(
        self, store_factory: StoreFactory
    ) -> None:
        from meterkit.errors import ValidationError
        from meterkit.meter import Meter

        meter = Meter(store=store_factory.open(), meters=self.meters, clock=lambda: T0 + DAY)
        for bad in ("a\x00b", "\ud800", "x" * 257, ""):
            for event in (
                suite_event(bad),
                suite_event("ok", org=bad),
                suite_event("ok", dims={"region": bad}),
            ):
                with pytest.raises(ValidationError):
                    meter.record_many([suite_event("fine"), event])
        assert scan_all(meter.store, SUITE_METER.name, "org_a") == []

    def test_records_with_unstorable_text_are_refused_by_every_store(self, store: Store) -> None:
        from meterkit.errors import ValidationError

        store.put_record("plan", "kept", {"name": "Ω 🦄 'quoted'", "nested": [{"a": "b"}]})
        for bad in ({"name": "a\x00b"}, {"name": "\ud800"}, {"n": [{"x\udfff": 1}]}):
            with pytest.raises(ValidationError):
                store.put_record("plan", "bad", bad)
        with pytest.raises(ValidationError):
            store.put_record("plan", "bad\x00key", {})
        assert store.get_record("plan", "bad") is None
        assert [k for k, _ in store.list_records("plan")] == ["kept"]
        assert store.get_record("plan", "kept") == {
            "name": "Ω 🦄 'quoted'",
            "nested": [{"a": "b"}],
        }

    def test_idempotent_across_reopen(self, store_factory: StoreFactory) -> None:
        self.require_persistence()
        store = store_factory.open()
        batch = [suite_event(f"e{i}", time=T0 + i * 611) for i in range(20)]
        assert len(store.append(batch)) == 20
        store = store_factory.reopen(store)
        extra = suite_event("e20")
        assert [e.id for e in store.append([*batch, extra])] == ["e20"]
        store = store_factory.reopen(store)
        assert store.append(batch) == []
        assert sorted_norm(scan_all(store, SUITE_METER.name, "org_a")) == sorted_norm(
            [*batch, extra]
        )

    def assert_all_or_nothing(
        self, store_factory: StoreFactory, make_bad: Callable[[], Event]
    ) -> None:
        store = store_factory.fresh()
        good = [
            suite_event("g1", time=T0 + 1),
            suite_event("g2", meter=COMPLETIONS.name, values={"input_tokens": 4}),
            suite_event("g3", time=T0 + 2),
        ]
        before = suite_event("before")
        store.append([before])
        try:
            store.append([*good, make_bad()])
        except Exception:
            # It failed: nothing of the batch may be visible, and the store must still work.
            # Meters are ensured again first, as Meter does before every append and query: a
            # store may forget what a rolled-back transaction could have created.
            for spec in self.meters:
                store.ensure_meter(spec)
            assert [str(e.id) for e in scan_all(store, SUITE_METER.name, "org_a")] == ["before"]
            assert scan_all(store, COMPLETIONS.name, "org_a") == []
            assert sorted_norm(store.append(good)) == sorted_norm(good)
        else:
            # It succeeded: then all of the good events are stored, not some.
            assert store.append(good) == []
            ids = {str(e.id) for e in scan_all(store, SUITE_METER.name, "org_a")}
            assert {"before", "g1", "g3"} <= ids
            assert [str(e.id) for e in scan_all(store, COMPLETIONS.name, "org_a")] == ["g2"]

    def test_batch_is_all_or_nothing_when_a_meter_was_never_ensured(
        self, store_factory: StoreFactory
    ) -> None:
        self.assert_all_or_nothing(store_factory, lambda: suite_event("bad", meter="never_ensured"))

    def test_batch_is_all_or_nothing_when_an_id_is_unusable(
        self, store_factory: StoreFactory
    ) -> None:
        self.assert_all_or_nothing(store_factory, lambda: suite_event(UnusableId("bad")))

    def test_batch_is_all_or_nothing_when_values_cannot_be_read(
        self, store_factory: StoreFactory
    ) -> None:
        def bad() -> Event:
            return Event("bad", SUITE_METER.name, "org_a", T0 + 3, UnreadableValues(), {})

        self.assert_all_or_nothing(store_factory, bad)

    def test_scan_is_half_open_and_per_organization_and_meter(self, store: Store) -> None:
        start, end = T0 + 3600, T0 + 7200
        times = [start - 1, start, start + 1, end - 1, end, end + 1]
        events = [suite_event(f"t{t}", time=t) for t in times]
        other_org = [suite_event(f"o{t}", org="org_b", time=t) for t in times]
        other_meter = [
            suite_event(f"m{t}", meter=COMPLETIONS.name, values={"input_tokens": 1}, time=t)
            for t in times
        ]
        store.append([*events, *other_org, *other_meter])
        got = list(store.scan(SUITE_METER.name, "org_a", start, end))
        want = [e for e in events if start <= e.time < end]
        assert len(want) == 3
        assert sorted_norm(got) == sorted_norm(want)
        assert list(store.scan(SUITE_METER.name, "org_c", 0, END_OF_TIME)) == []
        assert list(store.scan(SUITE_METER.name, "org_a", start, start)) == []

    def test_dimensions_round_trip(self, store: Store) -> None:
        events = [
            suite_event("t", dims={"flag": True, "region": "north", "tier": "pro"}),
            suite_event("f", dims={"flag": False, "region": None}),
            suite_event("n", dims={"flag": None, "tier": None}),
            suite_event("empty"),
            suite_event(
                "c",
                meter=COMPLETIONS.name,
                values={"input_tokens": 1},
                dims={"batch": False, "model": "gpt-4o", "user_id": None},
            ),
        ]
        store.append(events)
        got = {e.id: e for e in scan_all(store, SUITE_METER.name, "org_a")}
        assert got["t"].dimensions["flag"] is True
        assert got["f"].dimensions["flag"] is False
        assert got["t"].dimensions["region"] == "north"
        for eid, name in (("f", "region"), ("n", "flag"), ("n", "tier"), ("empty", "flag")):
            assert got[eid].dimensions.get(name) is None
        (completion,) = scan_all(store, COMPLETIONS.name, "org_a")
        assert completion.dimensions["batch"] is False
        assert completion.dimensions.get("user_id") is None
        assert sorted_norm(got.values()) == sorted_norm(events[:4])

    def test_numbers_keep_their_type(self, store: Store) -> None:
        values: dict[str, Number] = {
            "total": 3,
            "calls": 3.0,
            "peak": 2**53 - 1,
            "low": 0,
            "last": 0.1,
            "level": 0.0,
        }
        store.append([suite_event("n", values=values)])
        (got,) = scan_all(store, SUITE_METER.name, "org_a")
        assert {k: (type(v), v) for k, v in got.values.items()} == {
            k: (type(v), v) for k, v in values.items()
        }

    def test_secret_is_long_and_stable(self, store_factory: StoreFactory) -> None:
        store = store_factory.open()
        secret = store.secret()
        assert isinstance(secret, bytes) and len(secret) >= 16
        assert store.secret() == secret
        assert store_factory.fresh().secret() != secret, "each store needs its own random key"
        if self.persistent:
            assert store_factory.reopen(store).secret() == secret

    def test_ensure_meter_is_idempotent(self, store: Store) -> None:
        events = [suite_event("a"), suite_event("b", time=T0 + 60)]
        store.append(events)
        for _ in range(3):
            store.ensure_meter(SUITE_METER)
        assert store.append(events) == []
        assert sorted_norm(scan_all(store, SUITE_METER.name, "org_a")) == sorted_norm(events)
        assert len(store.append([suite_event("c")])) == 1

    def test_widening_a_meter_keeps_old_events_readable(self, store_factory: StoreFactory) -> None:
        v1 = MeterSpec("widening", (Measure("a"),), (Dimension("x"),))
        v2 = MeterSpec(
            "widening",
            (Measure("a"), Measure("b", "max")),
            (Dimension("x"), Dimension("y", kind="bool")),
        )
        store = store_factory.open()
        store.ensure_meter(v1)
        old = [
            Event("o1", "widening", "org_a", T0 + 10, {"a": 1}, {"x": "p"}),
            Event("o2", "widening", "org_a", T0 + 20, {"a": 2.5}, {}),
        ]
        store.append(old)
        store.ensure_meter(v2)
        assert sorted_norm(scan_all(store, "widening", "org_a")) == sorted_norm(old)
        new = Event("n1", "widening", "org_a", T0 + 30, {"a": 1, "b": 4}, {"x": "p", "y": True})
        assert [e.id for e in store.append([old[0], new])] == ["n1"]
        everything = [*old, new]
        assert sorted_norm(scan_all(store, "widening", "org_a")) == sorted_norm(everything)
        for group_by in ((), ("y",), ("x", "y")):
            query = make_query(
                v2, org="org_a", start=T0, end=T0 + DAY, width="1h", group_by=group_by
            )
            assert self.check_query(store, v2, query, everything, f"widened {group_by}")
        if self.persistent:
            store = store_factory.reopen(store)
            store.ensure_meter(v2)
            assert sorted_norm(scan_all(store, "widening", "org_a")) == sorted_norm(everything)
