"""The queries capability: native aggregates and rollups equal to the engine over the events."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterkit import engine, integrals
from meterkit.engine import rollup, timeweighted
from meterkit.models import Event
from meterkit.stores.base import RollupStore, Store
from meterkit.testing.base import Conformance
from meterkit.testing.support import (
    AGGREGATE_SHAPES,
    COMPLETIONS,
    DAY,
    ROLLED_METER,
    SUITE_METER,
    SUITE_METERS,
    T0,
    VECTOR_STORES,
    WEIGHTED_METER,
    Scenario,
    StoreFactory,
    any_kept_query,
    any_query,
    any_scenario,
    append_scenario,
    assert_rows_match,
    deterministic_events,
    make_query,
    scan_all,
    sorted_norm,
    store_property,
    store_rows,
)

__all__ = ["QueryConformance"]


class QueryConformance(Conformance):
    """Every store: ``aggregate`` (and ``latest_before``) answer as the pure engine does."""

    @pytest.mark.parametrize("width", ["1m", "1h", "1d"])
    @pytest.mark.parametrize("shape", sorted(AGGREGATE_SHAPES))
    def test_aggregate_equals_the_engine(self, store: Store, width: str, shape: str) -> None:
        events = deterministic_events()
        store.append(events)
        params = dict(AGGREGATE_SHAPES[shape])
        if isinstance(params.get("limit"), dict):
            params["limit"] = params["limit"][width]
        # Starts 30 s into a minute: the first bucket of every width is partial.
        query = make_query(
            SUITE_METER, org="org_a", start=T0 + 30, end=T0 + 2 * DAY + 100, width=width, **params
        )
        want = self.check_query(store, SUITE_METER, query, events, f"{shape} {width}")
        assert want, "the data set should put events in this window"

    @pytest.mark.parametrize("width", ["1m", "1h", "1d"])
    @pytest.mark.parametrize("shape", sorted(AGGREGATE_SHAPES))
    def test_rollable_meter_equals_the_engine(self, store: Store, width: str, shape: str) -> None:
        # The same data on a meter without unique_count: a store with rollups answers it from
        # them, reading events only at the unaligned edges of the window.
        events = [
            attrs.evolve(
                e,
                meter=ROLLED_METER.name,
                values={k: v for k, v in e.values.items() if k != "distinct"},
            )
            for e in deterministic_events()
        ]
        # Late: half the events arrive after the rest, into buckets that already have rows.
        store.append(events[1::2])
        store.append(events[::2])
        store.append(events[:40])  # and again: duplicates change nothing
        params = dict(AGGREGATE_SHAPES[shape])
        if isinstance(params.get("limit"), dict):
            params["limit"] = params["limit"][width]
        for start, end in ((T0 + 30, T0 + 2 * DAY + 100), (T0 - 90, T0 + 3 * DAY)):
            query = make_query(
                ROLLED_METER, org="org_a", start=start, end=end, width=width, **params
            )
            want = self.check_query(store, ROLLED_METER, query, events, f"{shape} {width}")
            assert want, "the data set should put events in this window"

    def test_replaced_events_are_answered_as_the_engine_over_them(self, store: Store) -> None:
        # A correction (meterkit.corrections) puts an event in the place of another of its id:
        # rollups from that day on answer as the engine over the corrected events.
        replace = getattr(store, "replace_event", None)
        if replace is None:
            pytest.skip("this store cannot correct events")
        events = [
            attrs.evolve(
                e,
                meter=ROLLED_METER.name,
                values={k: v for k, v in e.values.items() if k != "distinct"},
            )
            for e in deterministic_events()
        ]
        store.append(events)
        corrected = list(events)
        # The first events of both organizations, and one of each further on: each
        # correction refolds its own organization only, and the other's answers stay.
        orgs = ("org_a", "org_b")
        firsts = [next(i for i, e in enumerate(events) if e.organization_id == o) for o in orgs]
        for i in sorted({*firsts, 7, 40, 99}):
            old = corrected[i]
            new = attrs.evolve(
                old,
                values={} if i % 2 else {"total": 3, "peak": 1000.5, "last": 7},
                dimensions={**old.dimensions, "region": "c"} if i == 40 else old.dimensions,
            )
            got = replace(ROLLED_METER, new)
            assert got is not None and got.id == old.id and dict(got.values) == dict(old.values)
            corrected[i] = new
        missing = attrs.evolve(events[0], id="never-stored")
        assert replace(ROLLED_METER, missing) is None
        for width in ("1m", "1h", "1d"):
            limit = {"1m": 1440, "1h": 168, "1d": 31}[width]
            for org, group_by in itertools.product(("org_a", "org_b"), ((), ("region",))):
                query = make_query(
                    ROLLED_METER,
                    org=org,
                    start=T0,
                    end=T0 + (DAY if width == "1m" else 3 * DAY),
                    width=width,
                    group_by=group_by,
                    limit=limit,
                )
                self.check_query(store, ROLLED_METER, query, corrected, f"replaced {width}")

    def test_aggregate_of_an_empty_window_is_empty(self, store: Store) -> None:
        store.append(deterministic_events())
        query = make_query(
            SUITE_METER, org="org_a", start=T0 + 10 * DAY, end=T0 + 11 * DAY, width="1h"
        )
        assert store_rows(store, SUITE_METER, query) == {}
        query = make_query(SUITE_METER, org="org_zzz", start=T0, end=T0 + DAY, width="1h")
        assert store_rows(store, SUITE_METER, query) == {}

    def test_aggregate_completions_with_bool_batch(self, store: Store) -> None:
        events = []
        for i in range(60):
            events.append(
                Event(
                    f"c{i}",
                    COMPLETIONS.name,
                    "org_a",
                    T0 + i * 1777,
                    {"input_tokens": 100 + i, "output_tokens": i % 9, "num_model_requests": 1},
                    {
                        "batch": (True, False, None)[i % 3],
                        "model": ("gpt-4o", "o1")[i % 2],
                        "project_id": "proj_a" if i % 4 else None,
                    },
                )
            )
        store.append(events)
        cases: list[dict[str, Any]] = [
            {"filters": {"batch": [False]}, "group_by": ("model", "project_id")},
            {"filters": {"batch": [True]}},
            {"group_by": ("batch",)},
            {"filters": {"batch": [None, True], "project_id": ["proj_a"]}, "group_by": ("model",)},
        ]
        for width in ("1h", "1d"):
            for params in cases:
                query = make_query(
                    COMPLETIONS, org="org_a", start=T0 + 7, end=T0 + 2 * DAY, width=width, **params
                )
                want = self.check_query(store, COMPLETIONS, query, events, f"{params} {width}")
                assert want
        # Independent check of one number: non-batch input tokens over the whole range.
        query = make_query(
            COMPLETIONS,
            org="org_a",
            start=T0,
            end=T0 + 3 * DAY,
            width="1d",
            filters={"batch": [False]},
        )
        rows = store_rows(store, COMPLETIONS, query)
        total = sum(v["input_tokens"] or 0 for v in rows.values())
        assert total == sum(100 + i for i in range(60) if i % 3 == 1)

    def test_aggregate_vector_stores_gauge(self, store: Store) -> None:
        # Two projects, each reporting its size several times a day: a day's figure is the
        # sum of each project's latest report in that day, not the sum of all reports.
        reports = [
            ("p1", T0 + 100, 10),
            ("p1", T0 + 5000, 30),
            ("p2", T0 + 200, 7),
            ("p1", T0 + DAY + 1, 5),
            ("p2", T0 + DAY + 50, 8),
            ("p2", T0 + 2 * DAY - 1, 2),
        ]
        events = [
            Event(f"v{i}", VECTOR_STORES.name, "org_a", t, {"usage_bytes": b}, {"project_id": p})
            for i, (p, t, b) in enumerate(reports)
        ]
        store.append(events)
        query = make_query(VECTOR_STORES, org="org_a", start=T0, end=T0 + 2 * DAY, width="1d")
        rows = self.check_query(store, VECTOR_STORES, query, events, "vector_stores 1d")
        assert rows == {(T0, ()): {"usage_bytes": 37}, (T0 + DAY, ()): {"usage_bytes": 7}}
        got = store_rows(store, VECTOR_STORES, query)
        assert {k: v["usage_bytes"] for k, v in got.items()} == {(T0, ()): 37, (T0 + DAY, ()): 7}

    def test_time_weighted_gauge_integrates_across_buckets_and_windows(self, store: Store) -> None:
        # Series a: 10 from T0+600, 40 from T0+DAY+3600 (a later day, so it carries across).
        # Series b: 7 from T0+DAY-60, with an earlier event of the same second and a smaller
        # id that the later one overrides. Integrals are value x seconds.
        spec = WEIGHTED_METER
        reports = [
            ("a1", "eu", T0 + 600, 10),
            ("a2", "eu", T0 + DAY + 3600, 40),
            ("b0", "us", T0 + DAY - 60, 99),
            ("b1", "us", T0 + DAY - 60, 7),
        ]
        events = [
            Event(i, spec.name, "org_a", t, {"held": v}, {"region": r}) for i, r, t, v in reports
        ]
        store.append(events)
        query = make_query(spec, org="org_a", start=T0, end=T0 + 3 * DAY, width="1d")
        rows = self.check_query(store, spec, query, events, "time-weighted 1d")
        day0 = 10 * (DAY - 600) + 7 * 60
        day1 = 10 * 3600 + 40 * (DAY - 3600) + 7 * DAY
        day2 = 40 * DAY + 7 * DAY
        assert {k: v["held"] for k, v in rows.items()} == {
            (T0, ()): day0,
            (T0 + DAY, ()): day1,
            (T0 + 2 * DAY, ()): day2,
        }
        # A window that starts after every event still integrates what was carried into it,
        # and only over the part of its bucket inside the window.
        late = make_query(
            spec,
            org="org_a",
            start=T0 + 2 * DAY + 100,
            end=T0 + 2 * DAY + 400,
            width="1h",
            group_by=["region"],
        )
        got = store_rows(store, spec, late)
        assert {k: v["held"] for k, v in got.items()} == {
            (T0 + 2 * DAY, ("eu",)): 40 * 300,
            (T0 + 2 * DAY, ("us",)): 7 * 300,
        }
        assert got == engine.aggregate(spec, late, events)

    @store_property(80)
    @given(scenario=any_scenario(), data=st.data())
    def test_store_agrees_with_the_engine_on_random_events(
        self, store_factory: StoreFactory, scenario: Scenario, data: st.DataObject
    ) -> None:
        store = store_factory.fresh()
        try:
            appended = append_scenario(store, scenario)
            for _ in range(data.draw(st.integers(1, 3), label="number of queries")):
                spec = data.draw(
                    st.sampled_from((SUITE_METER, ROLLED_METER, *SUITE_METERS)), label="meter"
                )
                query = data.draw(any_query(spec, scenario.hot), label="query")
                want_events = [
                    e
                    for e in appended
                    if e.meter == spec.name
                    and e.organization_id == query.organization_id
                    and query.scan_start <= e.time < query.page_end
                ]
                scanned = store.scan(
                    spec.name, query.organization_id, query.scan_start, query.page_end
                )
                assert sorted_norm(scanned) == sorted_norm(want_events)
                self.check_query(store, spec, query, appended, repr(query))
        finally:
            store_factory.close(store)

    @store_property(40)
    @given(scenario=any_scenario(), data=st.data())
    def test_dropping_old_events_keeps_hour_and_day_answers(
        self, store_factory: StoreFactory, scenario: Scenario, data: st.DataObject
    ) -> None:
        # Retention: events before a day are dropped, with their minute rollups; hour and day
        # buckets, and anything after the day, still equal the engine over every event.
        store = store_factory.fresh()
        try:
            if not isinstance(store, RollupStore):
                pytest.skip(f"{type(store).__name__} keeps no rollups, so it drops no events")
            appended = append_scenario(store, scenario)
            before = T0 + DAY * data.draw(st.integers(0, 3), label="days kept from")
            rolled = [spec for spec in SUITE_METERS if rollup.rollable(spec)]
            for spec in rolled:
                store.ensure_meter(spec)
                old = [e for e in appended if e.meter == spec.name and e.time < before]
                assert store.drop_events_before(spec, before) == len(old)
                assert all(bucket >= before for _, bucket, _ in store.rollup_rows(spec, 60))
                for org in ("org_a", "org_b"):
                    kept = [
                        e
                        for e in appended
                        if e.meter == spec.name and e.organization_id == org and e.time >= before
                    ]
                    assert sorted_norm(scan_all(store, spec.name, org)) == sorted_norm(kept)
            if data.draw(st.booleans(), label="rebuild from the day"):
                for spec in rolled:
                    store.rebuild_rollups(spec, since=before)
            for _ in range(data.draw(st.integers(1, 4), label="number of queries")):
                spec = data.draw(st.sampled_from(rolled), label="meter")
                weighted = bool(timeweighted.names(spec))
                query = data.draw(any_kept_query(spec, before, weighted), label="query")
                want = engine.aggregate(spec, query, appended)
                if weighted:
                    # Values carried from dropped days come from the day rollups.
                    got = integrals.time_weighted_rows(store, spec, query)
                    assert_rows_match(got, want, spec, f"{query!r} after dropping to {before}")
                    continue
                native = store.aggregate(spec, query)
                assert native is not None, "a store with rollups answers from them"
                assert_rows_match(native, want, spec, f"{query!r} after dropping to {before}")
        finally:
            store_factory.close(store)

    @store_property(25)  # each example on keys of its own: the fixture is not shared state
    @given(
        reports=st.lists(
            st.tuples(
                st.integers(0, 3 * DAY),  # when, from T0
                st.sampled_from(("eu", "us", None)),  # the series
                st.one_of(st.none(), st.integers(0, 50)),  # held
                st.one_of(st.none(), st.sampled_from((0.5, 2.25, 9.0))),  # held_f
            ),
            max_size=25,
        ),
        before=st.integers(0, 4 * DAY),
    )
    def test_latest_before_is_what_the_events_carry(
        self,
        store: Store,
        reports: list[tuple[int, str | None, int | None, float | None]],
        before: int,
    ) -> None:
        """``latest_before`` (day rollups for the earlier days, events for the last one)
        equals what every event before ``before`` carries (:func:`timeweighted.carried`)."""
        spec = WEIGHTED_METER
        org = f"org_{uuid.uuid4().hex[:10]}"  # each example on an organization of its own
        events = []
        for i, (offset, region, held, held_f) in enumerate(reports):
            values = {k: v for k, v in (("held", held), ("held_f", held_f)) if v is not None}
            dims = {"region": region} if region is not None else {}
            events.append(Event(f"w{i}", spec.name, org, T0 + offset, values or {"moved": 1}, dims))
        store.append(events)
        if not isinstance(store, RollupStore):
            pytest.skip("this store keeps no rollups: time-weighted queries read its events")
        measures = timeweighted.names(spec)
        got = store.latest_before(spec, org, T0 + before, measures)
        assert got is not None, "a store that keeps rollups answers for a meter it ensured"
        want = timeweighted.carried(spec, org, measures, T0 + before, events)
        assert sorted_norm(got) == sorted_norm(want)
