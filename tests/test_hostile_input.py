"""Hostile amounts and strings: refused with a ValidationError naming the field, nothing changed.

Every counters backend (memory, SQLite, PostgreSQL, Redis) gets the same inputs. Amounts are
checked before any counter is touched, counters never pass MAX_VALUE (what a Redis Lua double
holds exactly) and never wrap; strings no store can keep (NUL, lone surrogates, too long) are
refused on every path, and the strings that are kept round-trip alike in SQLite and PostgreSQL.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import services
from meterkit import Event, Measure, Meter, MeterSpec, Plan, ValidationError
from meterkit.counters import MAX_COUNTER
from meterkit.validate import MAX_STRING, MAX_VALUE

T0 = 1_730_419_200 + 3600
RUN = uuid.uuid4().hex[:8]
BACKENDS = ["memory", "sqlite", "postgres", "redis"]


@pytest.fixture(scope="module")
def postgres_base() -> Iterator[str]:
    url = services.postgres_url()
    yield url
    services.drop_schemas(url, f"mk_h{RUN}\\_")


def open_meter(backend: str, tmp: Path, request: pytest.FixtureRequest) -> Meter:
    kwargs: dict[str, Any] = {"clock": lambda: T0, "record_debits": False}
    if backend == "memory":
        return Meter("memory://", **kwargs)
    if backend == "sqlite":
        return Meter(f"sqlite:///{tmp / f'{uuid.uuid4().hex}.db'}", **kwargs)
    if backend == "postgres":
        base = request.getfixturevalue("postgres_base")
        schema = f"mk_h{RUN}_{uuid.uuid4().hex[:8]}"
        return Meter(services.with_params(base, schema=schema), **kwargs)
    url = services.with_params(services.redis_url(), prefix=f"mkh{RUN}:{uuid.uuid4().hex[:8]}:")
    return Meter("memory://", counters=url, **kwargs)


@pytest.fixture(params=BACKENDS)
def meter_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Meter]]:
    opened: list[Meter] = []

    def make() -> Meter:
        meter = open_meter(request.param, tmp_path, request)
        opened.append(meter)
        meter.set_plan(Plan("tight", limits={"tokens": 10, "storage_bytes": 100, "credits": 5}))
        meter.assign_plan("org", "tight")
        return meter

    yield make
    for meter in opened:
        meter.close()


def counters_of(m: Meter) -> tuple[int, ...]:
    return tuple(m.quotas.used("org", metric) for metric in ("tokens", "storage_bytes", "credits"))


BAD_AMOUNTS = st.one_of(
    st.integers(min_value=MAX_VALUE + 1, max_value=2**70),
    st.integers(max_value=-1, min_value=-(2**70)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from([math.nan, math.inf, "5", None, [1], 2**64, 2**63, 2**53]),
)

OPERATIONS: dict[str, Callable[[Meter, Any], object]] = {
    "check": lambda m, a: m.check("org", {"tokens": a}),
    "check.requests": lambda m, a: m.check("org", {"tokens": 1}, requests=a),
    "reserve": lambda m, a: m.reserve("org", {"tokens": a}),
    "debit": lambda m, a: m.debit("org", {"tokens": a}),
    "commit": lambda m, a: m.reserve("org", {"tokens": 1}).commit({"tokens": a}),
    "set_gauge": lambda m, a: m.quotas.set_gauge("org", "storage_bytes", a),
    "grant_credits": lambda m, a: m.grant_credits("org", a),
}


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(amount=BAD_AMOUNTS, operation=st.sampled_from(sorted(OPERATIONS)))
def test_bad_amounts_change_no_counter(
    meter_factory: Callable[[], Meter], amount: Any, operation: str
) -> None:
    m = meter_factory()
    assert m.check("org", {"tokens": 4}).allowed
    before = counters_of(m)
    with pytest.raises(ValidationError) as caught:
        OPERATIONS[operation](m, amount)
    assert caught.value.field.split(".")[0] in ("amounts", "actual", "value", "credits", "requests")
    if operation == "commit":
        # The reservation itself held 1 token (still held, as nothing was settled).
        before = (before[0] + 1, *before[1:])
    assert counters_of(m) == before
    # The tight plan still refuses what does not fit, and admits what does.
    assert not m.check("org", {"tokens": 10 - before[0] + 1}).allowed
    assert m.check("org", {"tokens": 10 - before[0]}).allowed
    assert counters_of(m)[0] == 10


def test_the_bound_itself_is_accepted_and_counters_never_wrap(
    meter_factory: Callable[[], Meter],
) -> None:
    m = meter_factory()
    m.set_plan(Plan("open", limits={"tokens": -1}))
    m.assign_plan("org", "open")
    m.quotas.forget()
    assert m.debit("org", {"tokens": MAX_VALUE}).allowed
    assert m.quotas.used("org", "tokens") == MAX_COUNTER
    # Usage that already happened is still counted, saturating instead of wrapping ...
    m.debit("org", {"tokens": MAX_VALUE})
    assert m.quotas.used("org", "tokens") == MAX_COUNTER
    # ... and nothing more is admitted past what the counter can hold, even without a limit.
    refused = m.check("org", {"tokens": 1})
    assert not refused.allowed
    assert m.quotas.used("org", "tokens") == MAX_COUNTER
    assert m.check("org", {"tokens": 0}).allowed


def test_plan_limits_past_the_bound_are_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        Plan("huge", limits={"tokens": MAX_VALUE + 1})
    assert caught.value.field == "plan.limits.tokens"
    with pytest.raises(ValidationError):
        Plan("huge", rate_limit_rpm=2**63)


# -- strings -------------------------------------------------------------------------------------

UNSTORABLE = ["a\x00b", "\ud800", "x\udfffy", "x" * (MAX_STRING + 1), "", 5, None, b"bytes"]
KEEPABLE = ["Ω≈ç√", "'; DROP TABLE x; --", 'quote"s', "emoji 🦄", "\u202eRTL", "x" * MAX_STRING]


def event(id: Any = "e1", org: Any = "org", meter: Any = "tokens", **dims: Any) -> Event:
    return Event(id, meter, org, T0 - 60, {"tokens": 3}, dims)


STRING_PATHS: dict[str, Callable[[Meter, Any], object]] = {
    "record.id": lambda m, s: m.record("tokens", {"tokens": 1}, organization_id="org", id=s),
    "record.organization_id": lambda m, s: m.record("tokens", {"tokens": 1}, organization_id=s),
    "record.dimension": lambda m, s: m.record(
        "tokens", {"tokens": 1}, organization_id="org", dimensions={"model": s}
    ),
    "record_many.id": lambda m, s: m.record_many([event(), event(id=s)]),
    "record_many.organization_id": lambda m, s: m.record_many([event(), event(org=s)]),
    "record_many.meter": lambda m, s: m.record_many([event(), event(meter=s)]),
    "record_many.dimension": lambda m, s: m.record_many([event(), event("e2", model=s)]),
    "usage.organization_id": lambda m, s: m.usage("tokens", organization_id=s, start_time=T0),
    "usage.filter": lambda m, s: m.usage(
        "tokens", organization_id="org", start_time=T0, filters={"model": [s]}
    ),
    "check.organization_id": lambda m, s: m.check(s, {"tokens": 1}),
    "check.metric": lambda m, s: m.check("org", {s: 1}),
    "debit.metric": lambda m, s: m.debit("org", {s: 1}),
    "grant.organization_id": lambda m, s: m.grant_credits(s, 1),
}


NONE_MEANS_SOMETHING = {
    "usage.filter": "None is a real filter value: events without the dimension",
    "record.dimension": "a None dimension is one not given",
    "record_many.dimension": "a None dimension is one not given",
    "record.id": "no id asks record() for a random one",
}


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        # None is left out where it has a meaning of its own (NONE_MEANS_SOMETHING).
        pytest.param(path, bad, id=f"{path}-{bad!r}")
        for path in sorted(STRING_PATHS)
        for bad in UNSTORABLE
        if not (bad is None and path in NONE_MEANS_SOMETHING)
    ],
)
def test_unstorable_strings_are_refused_on_every_path(
    meter_factory: Callable[[], Meter], path: str, bad: Any
) -> None:
    m = meter_factory()
    before = counters_of(m)
    with pytest.raises(ValidationError):
        STRING_PATHS[path](m, bad)
    assert counters_of(m) == before
    assert m.total("tokens", "tokens", organization_id="org", start_time=0, end_time=T0 + 1) == 0


@pytest.mark.parametrize("backend", ["memory", "sqlite", "postgres"])
def test_keepable_strings_round_trip_alike(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with open_meter(backend, tmp_path, request) as m:
        events = [
            Event(
                f"id {s}"[:MAX_STRING],
                "tokens",
                f"org {s}"[:MAX_STRING],
                T0 - 60,
                {"tokens": i},
                {"model": s},
            )
            for i, s in enumerate(KEEPABLE)
        ]
        assert m.record_many(events).accepted == len(events)
        assert m.record_many(events).duplicates == len(events)
        for e in events:
            got = list(m.store.scan("tokens", e.organization_id, 0, T0))
            assert [(g.id, g.organization_id, dict(g.dimensions)) for g in got] == [
                (e.id, e.organization_id, {"model": e.dimensions["model"]})
            ]
            page = m.usage(
                "tokens",
                organization_id=e.organization_id,
                start_time=T0 - 3600,
                end_time=T0,
                bucket_width="1h",
                filters={"model": [e.dimensions["model"]]},
            )
            assert [r.values["tokens"] for b in page.data for r in b.results] == [
                e.values["tokens"]
            ]


# -- numbers and times of events -------------------------------------------------------------


def test_whole_number_measures_refuse_fractions() -> None:
    seconds = MeterSpec("compute", (Measure("seconds", fractional=True), Measure("runs")))
    with Meter("memory://", clock=lambda: T0, meters=[seconds]) as m:
        with pytest.raises(ValidationError) as caught:
            m.record("tokens", {"tokens": 1.5}, organization_id="org")
        assert caught.value.field == "event.values.tokens"
        with pytest.raises(ValidationError):
            m.record_many([event(), Event("e2", "compute", "org", T0, {"runs": 0.25})])
        assert m.record("tokens", {"tokens": 2.0}, organization_id="org", id="whole", time=T0)
        stored = next(iter(m.store.scan("tokens", "org", 0, T0 + 1)))
        assert stored.values["tokens"] == 2 and type(stored.values["tokens"]) is int
        assert m.record("compute", {"seconds": 1.5, "runs": 1}, organization_id="org", time=T0)


def test_events_too_far_in_the_future_are_refused() -> None:
    with Meter("memory://", clock=lambda: T0) as m:
        assert m.record("tokens", {"tokens": 1}, organization_id="org", time=T0 + 300)
        with pytest.raises(ValidationError) as caught:
            m.record_many([event(), Event("late", "tokens", "org", T0 + 301, {"tokens": 1})])
        assert caught.value.field == "events[1].time" and "max_future_skew" in caught.value.message
        assert len(list(m.store.scan("tokens", "org", 0, T0 + 10_000))) == 1
    with Meter("memory://", clock=lambda: T0, max_future_skew=None) as m:
        assert m.record("tokens", {"tokens": 1}, organization_id="org", time=T0 + 86_400)
    with pytest.raises(ValidationError) as caught:
        Meter("memory://", max_future_skew=-1)
    assert caught.value.field == "max_future_skew"
