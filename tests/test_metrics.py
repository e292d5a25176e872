"""Quotas count all usage: plan metrics over meter measures, fed by every recorded event."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clock import Clock
from meterkit import Event, Meter, Metric, Plan, Source, ValidationError
from meterkit.recovery import rebuild_counters

T0 = 1_730_419_200 + 5 * 86400  # 2024-11-06: inside one monthly period
ORG = "org"


TOKENS = Metric.parse("tokens", "completions.input_tokens + completions.output_tokens")


@pytest.fixture(params=["memory", "sqlite"])
def meter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Meter]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'm.db'}"
    with Meter(url, clock=Clock(T0), metrics=[TOKENS]) as m:
        m.set_plan(Plan("p", limits={"tokens": 1000}))
        m.assign_plan(ORG, "p")
        yield m


def completion(i: int, inp: int, out: int, model: str = "gpt-4o", t: int = T0) -> Event:
    return Event(
        f"c{i}",
        "completions",
        ORG,
        t,
        {"input_tokens": inp, "output_tokens": out, "num_model_requests": 1},
        {"model": model},
    )


def test_recorded_usage_counts_against_the_quota(meter: Meter) -> None:
    meter.record_many([completion(1, 300, 200), completion(2, 250, 50)])
    assert meter.quotas.used(ORG, "tokens") == 800
    assert not meter.check(ORG, {"tokens": 201}).allowed
    assert meter.check(ORG, {"tokens": 200}).allowed
    assert meter.quotas.used(ORG, "tokens") == 1000


def test_a_duplicate_counts_once_and_a_conflict_not_at_all(meter: Meter) -> None:
    meter.record_many([completion(1, 100, 0)])
    meter.record_many([completion(1, 100, 0), completion(2, 1, 1)])
    meter.record_many([completion(1, 999, 0)])  # a conflict: stored event kept, nothing counted
    assert meter.quotas.used(ORG, "tokens") == 102


def test_decisions_are_counted_once(meter: Meter) -> None:
    assert meter.check(ORG, {"tokens": 40}).allowed
    with meter.reserve(ORG, {"tokens": 30}) as r:
        r.commit({"tokens": 10})
    meter.debit(ORG, {"tokens": 5})
    meter.flush()
    assert meter.quotas.used(ORG, "tokens") == 55
    # Recorded directly into the metric's own meter: counted too.
    meter.record("tokens", {"tokens": 7}, organization_id=ORG)
    assert meter.quotas.used(ORG, "tokens") == 62


def test_record_later_and_the_middleware_path_count_when_written(meter: Meter) -> None:
    meter.record_later([completion(1, 10, 5)])
    assert meter.quotas.used(ORG, "tokens") == 0, "queued, not written yet"
    meter.flush()
    assert meter.quotas.used(ORG, "tokens") == 15


def test_a_filtered_source_counts_only_what_matches(tmp_path: Path) -> None:
    big = Metric("big_tokens", [Source("completions", "output_tokens", {"model": ["gpt-4o"]})])
    with Meter(f"sqlite:///{tmp_path / 'f.db'}", clock=Clock(T0), metrics=[big]) as m:
        m.record_many([completion(1, 1, 30), completion(2, 1, 40, model="gpt-4o-mini")])
        assert m.quotas.used(ORG, "big_tokens") == 30
        assert "big_tokens" in m.quotas.metrics()
        m.set_plan(Plan("p", limits={"big_tokens": 31}))
        m.assign_plan(ORG, "p")
        assert not m.check(ORG, {"big_tokens": 2}).allowed


def test_a_late_event_counts_in_its_own_period(meter: Meter) -> None:
    meter.record_many([completion(1, 100, 0, t=T0 - 30 * 86400)])  # October
    assert meter.quotas.used(ORG, "tokens") == 0
    assert meter.quotas.used(ORG, "tokens", at=T0 - 30 * 86400) == 100


def test_bad_definitions_name_the_field() -> None:
    with Meter("memory://") as m:
        cases = {
            "metric.sources[0].meter": Metric("x", [Source("nope", "n")]),
            "metric.sources[0].measure": Metric("x", [Source("completions", "nope")]),
            "metric.sources[0].where.nope": Metric(
                "x", [Source("completions", "input_tokens", {"nope": ["a"]})]
            ),
            "metric.name": Metric("storage_bytes"),
        }
        for field, metric in cases.items():
            with pytest.raises(ValidationError) as caught:
                m.define_metric(metric)
            assert caught.value.field == field
        with pytest.raises(ValidationError) as caught:
            Metric.parse("x", "completions")
        assert caught.value.field == "expression"
        with pytest.raises(ValidationError) as caught:
            m.define_metric(Metric("x", [Source("storage_bytes", "storage_bytes")]))
        assert caught.value.field == "metric.sources[0].measure", "a gauge is set, not summed"


EVENTS = st.lists(
    st.tuples(
        st.integers(0, 5),  # id: repeats are duplicates or conflicts
        st.integers(0, 500),
        st.integers(0, 500),
        st.sampled_from(["gpt-4o", "gpt-4o-mini"]),
        st.integers(-40, 20),  # days from T0: last month, this one, the next
    ),
    max_size=12,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(EVENTS, max_size=4), checks=st.lists(st.integers(1, 300), max_size=5))
def test_counters_are_the_rebuild_of_the_events(
    tmp_path: Path, batches: list[list[tuple[int, int, int, str, int]]], checks: list[int]
) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    Path(url.removeprefix("sqlite:///")).unlink(missing_ok=True)
    clock = Clock(T0 + 20 * 86400)
    with Meter(url, clock=clock, metrics=[TOKENS], max_future_skew=None) as m:
        m.set_plan(Plan("p", limits={"tokens": 10**9}))
        m.assign_plan(ORG, "p")
        period = m.quotas.period(ORG)
        first: dict[int, tuple[int, int]] = {}  # the oracle: an id's first event is the one kept
        admitted = 0
        for batch in batches:
            m.record_many(
                [completion(i, a, b, model, T0 + d * 86400) for i, a, b, model, d in batch]
            )
            for i, a, b, _model, d in batch:
                first.setdefault(i, (a + b, T0 + d * 86400))
            for amount in checks:
                admitted += amount if m.check(ORG, {"tokens": amount}).allowed else 0
        m.flush(release_leases=True)
        fed = m.quotas.used(ORG, "tokens")
        in_period = sum(n for n, t in first.values() if period.start <= t < period.end)
        assert fed == in_period + admitted
        assert rebuild_counters(m, ORG)[ORG]["tokens"] == fed
        assert m.quotas.used(ORG, "tokens") == fed


class _NoTransactions:
    """A store with no transaction across calls (as PostgreSQL): a memory store, less that."""

    def __init__(self) -> None:
        from meterkit.stores.memory import MemoryStore

        self._inner = MemoryStore()
        self.url = "memory://"

    def __getattr__(self, name: str) -> object:
        if name == "transaction":
            raise AttributeError(name)
        return getattr(self._inner, name)


class _DownCounters:
    """Counters elsewhere (as Redis) that stop answering when ``down``."""

    def __init__(self) -> None:
        from meterkit.stores.memory import MemoryStore

        self._inner = MemoryStore()
        self.url = "memory://counters"
        self.down = False

    def __getattr__(self, name: str) -> object:
        found = getattr(self._inner, name)
        if not name.startswith("counters_"):
            return found

        def call(*args: object, **kwargs: object) -> object:
            if self.down:
                from meterkit import StoreUnavailable

                raise StoreUnavailable("counters are not answering")
            return found(*args, **kwargs)

        return call


def test_events_are_stored_when_only_counting_them_fails() -> None:
    counters = _DownCounters()
    with Meter(
        store=_NoTransactions(),  # type: ignore[arg-type]
        counters=counters,  # type: ignore[arg-type]
        clock=Clock(T0),
        metrics=[TOKENS],
    ) as m:
        counters.down = True
        assert m.record_many([completion(1, 30, 20)]).accepted == 1, "stored, and said so"
        assert m.record_many([completion(1, 30, 20)]).duplicates == 1
        counters.down = False
        assert m.quotas.used(ORG, "tokens") == 0, "not counted while the counters were down"
        assert rebuild_counters(m, ORG)[ORG]["tokens"] == 50
