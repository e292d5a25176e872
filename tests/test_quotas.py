"""Quota decisions through ``meterkit.Meter``: limits, periods, rate limits, reservations.

Every test runs on the memory store and on SQLite, with a frozen clock the test moves.
Expected numbers are worked out by hand in the comments next to them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import meterkit
from clock import Clock, Monotonic
from meterkit import (
    BillingCycle,
    Decision,
    Meter,
    Period,
    Plan,
    QuotaExceeded,
    StoreUnavailable,
    ValidationError,
)

UTC = dt.timezone.utc
DAY = 86400
ORG = "org_1"


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(dt.datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())


# 2024-03-10 12:00:00 UTC: the start of a minute, the middle of a day, in March 2024.
T0 = ts(2024, 3, 10, 12)
MARCH = Period(ts(2024, 3, 1), ts(2024, 4, 1))


class Thresholds:
    """A plugin that writes down every threshold notification."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, int, int, int | None]] = []

    @meterkit.hookimpl
    def meterkit_quota_threshold(
        self,
        meter: Any,
        organization_id: str,
        metric: str,
        threshold: float,
        used: int,
        limit: int,
        period_start: int | None,
    ) -> None:
        self.calls.append((organization_id, metric, threshold, used, limit, period_start))


class FlakyCounters:
    """A real store whose quota counters raise ``StoreUnavailable`` while ``down``."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.down = False
        self.records_down = False  # plans, organizations and keys unreadable too

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if (name.startswith("counters_") and self.down) or (
            name.endswith("_record") and self.records_down
        ):

            def unavailable(*_: object, **__: object) -> Any:
                raise StoreUnavailable("counters are not answering")

            return unavailable
        return attr


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path / 'quotas.db'}"


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def open_meter(url: str, clock: Clock) -> Iterator[Callable[..., Meter]]:
    """Open meters on this test's store URL and clock; all are closed afterwards."""
    opened: list[Meter] = []

    def make(**kwargs: Any) -> Meter:
        meter = Meter(url, clock=clock, **kwargs)
        opened.append(meter)
        return meter

    yield make
    for meter in opened:
        meter.close()


@pytest.fixture
def m(open_meter: Callable[..., Meter]) -> Meter:
    return open_meter()


def on_plan(meter: Meter, org: str = ORG, *, seats: int = 1, **plan: Any) -> Plan:
    created = meter.set_plan(Plan("pro", name="Pro", **plan))
    meter.assign_plan(org, "pro", seats=seats)
    return created


def recorded(meter: Meter, metric: str, start: int, end: int, org: str = ORG) -> int:
    """The total of ``metric`` recorded as events in the whole days covering [start, end)."""
    total = 0
    day = start - start % DAY
    while day < end:
        page = meter.usage(
            metric, organization_id=org, start_time=day, end_time=day + DAY, bucket_width="1d"
        )
        for bucket in page.data:
            total += sum(int(r.values[metric] or 0) for r in bucket.results)
        day += DAY
    return total


def tokens_recorded(meter: Meter) -> int:
    return recorded(meter, "tokens", T0 - 40 * DAY, T0 + 40 * DAY)


# -- admission, all or nothing ---------------------------------------------------------------


def test_admitted_request_debits_every_metric(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100, "queries": 3})
    decision = m.check(ORG, {"tokens": 40, "queries": 1})
    assert decision.allowed
    assert decision.organization_id == ORG
    assert decision.refused_by is None
    assert decision.retry_after is None
    assert not decision.degraded
    assert m.quotas.used(ORG, "tokens") == 40
    assert m.quotas.used(ORG, "queries") == 1
    tokens = decision.state("tokens")
    assert tokens is not None
    assert (tokens.requested, tokens.used, tokens.limit, tokens.remaining) == (40, 40, 100, 60)
    queries = decision.state("queries")
    assert queries is not None
    assert (queries.requested, queries.used, queries.limit, queries.remaining) == (1, 1, 3, 2)


@pytest.mark.parametrize("order", ["tokens_first", "queries_first"])
def test_one_limit_refusing_debits_nothing(m: Meter, order: str) -> None:
    on_plan(m, limits={"tokens": 100, "queries": 2})
    assert m.check(ORG, {"tokens": 10, "queries": 2}).allowed
    amounts = {"tokens": 50, "queries": 1}
    if order == "queries_first":
        amounts = {"queries": 1, "tokens": 50}
    decision = m.check(ORG, amounts)
    # 10 + 50 tokens would fit under 100; 2 + 1 queries would not fit under 2.
    assert not decision.allowed
    assert decision.refused_by == "queries"
    assert m.quotas.used(ORG, "tokens") == 10
    assert m.quotas.used(ORG, "queries") == 2
    assert tokens_recorded(m) == 10
    assert recorded(m, "queries", T0, T0 + 1) == 2
    # The tokens were truly not taken: 90 more still fit.
    assert m.check(ORG, {"tokens": 90}).allowed
    assert m.quotas.used(ORG, "tokens") == 100


def test_rate_limit_refusing_debits_the_period_quota_nothing(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100}, rate_limit_rpm=2)
    assert m.check(ORG, {"tokens": 1}).allowed
    assert m.check(ORG, {"tokens": 1}).allowed
    decision = m.check(ORG, {"tokens": 5})
    assert not decision.allowed
    assert decision.refused_by == "rate_limit_rpm"
    assert m.quotas.used(ORG, "tokens") == 2
    assert tokens_recorded(m) == 2


def test_period_quota_refusing_does_not_count_the_request(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"tokens": 10}, rate_limit_rpm=2)
    assert not m.check(ORG, {"tokens": 11}).allowed
    assert not m.check(ORG, {"tokens": 11}).allowed
    # Neither refused request used up the per-minute allowance of 2.
    assert m.check(ORG, {"tokens": 1}).allowed
    assert m.check(ORG, {"tokens": 1}).allowed
    assert m.check(ORG, {"tokens": 1}).refused_by == "rate_limit_rpm"


def test_exactly_the_limit_is_admitted(m: Meter) -> None:
    on_plan(m, limits={"tokens": 10})
    admitted = sum(m.check(ORG, {"tokens": 3}).allowed for _ in range(10))
    assert admitted == 3  # 3 + 3 + 3 = 9; a fourth 3 would make 12
    assert m.check(ORG, {"tokens": 1}).allowed  # 10
    assert not m.check(ORG, {"tokens": 1}).allowed
    assert m.quotas.used(ORG, "tokens") == 10


def test_a_request_larger_than_the_limit_has_no_retry_after(m: Meter) -> None:
    on_plan(m, limits={"tokens": 10})
    decision = m.check(ORG, {"tokens": 11})
    assert not decision.allowed
    assert decision.refused_by == "tokens"
    assert decision.retry_after is None


def test_organizations_have_their_own_counters(m: Meter) -> None:
    on_plan(m, limits={"tokens": 10})
    m.assign_plan("org_2", "pro")
    assert m.check(ORG, {"tokens": 10}).allowed
    assert m.check("org_2", {"tokens": 10}).allowed
    assert not m.check(ORG, {"tokens": 1}).allowed
    assert m.quotas.used("org_2", "tokens") == 10


# -- unlimited -------------------------------------------------------------------------------


def test_minus_one_is_unlimited_and_still_counted(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100, "queries": -1})
    decision = m.check(ORG, {"queries": 10**9, "tokens": 1})
    assert decision.allowed
    queries = decision.state("queries")
    assert queries is not None
    assert (queries.limit, queries.remaining, queries.used) == (-1, -1, 10**9)
    assert m.check(ORG, {"queries": 10**9}).allowed
    assert m.quotas.used(ORG, "queries") == 2 * 10**9
    assert m.quotas.limit_for(ORG, "queries") == -1
    # The limited metric decides the summary fields.
    assert (decision.limit, decision.used, decision.remaining) == (100, 1, 99)


def test_metric_missing_from_the_plan_is_unlimited(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100})
    decision = m.check(ORG, {"tiles": 5000})
    assert decision.allowed
    assert (decision.limit, decision.remaining, decision.reset_at) == (-1, -1, None)
    assert m.quotas.used(ORG, "tiles") == 5000


def test_organization_without_a_plan_is_unlimited_and_counted(m: Meter) -> None:
    decision = m.check("org_free", {"tokens": 10**6})
    assert decision.allowed
    assert decision.limit == -1
    assert decision.remaining == -1
    assert m.quotas.used("org_free", "tokens") == 10**6


def test_default_plan_applies_to_unassigned_organizations(
    open_meter: Callable[..., Meter],
) -> None:
    m = open_meter(default_plan="free")
    m.set_plan(Plan("free", limits={"tokens": 5}))
    assert m.check("org_new", {"tokens": 5}).allowed
    assert m.check("org_new", {"tokens": 1}).refused_by == "tokens"


# -- decision fields -------------------------------------------------------------------------


def test_decision_fields_when_admitted_and_refused(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"tokens": 100, "queries": 30})
    m.check(ORG, {"tokens": 30})
    decision = m.check(ORG, {"tokens": 50, "queries": 3})
    assert decision.allowed
    # tokens have 20 % of their limit left, queries 90 %: tokens are the deciding limit.
    assert (decision.limit, decision.used, decision.remaining) == (100, 80, 20)
    assert decision.reset_at == ts(2024, 4, 1)
    assert decision.retry_after is None
    assert decision.refused_by is None
    assert decision.id

    refused = m.check(ORG, {"tokens": 30, "queries": 1})
    assert not refused.allowed
    assert refused.refused_by == "tokens"
    assert (refused.limit, refused.used, refused.remaining) == (100, 80, 20)
    assert refused.reset_at == ts(2024, 4, 1)
    assert refused.retry_after == ts(2024, 4, 1) - T0
    queries = refused.state("queries")
    assert queries is not None
    assert queries.used == 3  # unchanged: nothing was debited
    assert refused.state("nothing") is None


def test_period_retry_after_is_exact(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"tokens": 100})
    m.check(ORG, {"tokens": 100})
    refused = m.check(ORG, {"tokens": 1})
    assert refused.retry_after is not None and refused.retry_after >= 1
    wait = refused.retry_after
    clock.t = T0 + wait - 1
    assert not m.check(ORG, {"tokens": 1}).allowed
    clock.t = T0 + wait
    assert m.check(ORG, {"tokens": 1}).allowed
    assert clock.t == ts(2024, 4, 1)


def test_check_without_debit_counts_nothing(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100}, rate_limit_rpm=1, rate_limit_per_day=1)
    m.check(ORG, {"tokens": 30}, requests=0)
    for _ in range(3):
        look = m.check(ORG, {"tokens": 70}, debit=False)
        assert look.allowed
        tokens = look.state("tokens")
        assert tokens is not None
        assert (tokens.used, tokens.remaining) == (100, 0)  # 30 counted + 70 asked
    too_much = m.check(ORG, {"tokens": 71}, debit=False)
    assert not too_much.allowed
    assert too_much.refused_by == "tokens"
    assert m.quotas.used(ORG, "tokens") == 30
    assert tokens_recorded(m) == 30
    # The looks did not use the one request per minute and per day either.
    assert m.check(ORG, {"tokens": 70}).allowed
    assert m.quotas.used(ORG, "tokens") == 100


# -- periods ---------------------------------------------------------------------------------


def test_next_period_starts_from_zero(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"tokens": 100})
    assert m.check(ORG, {"tokens": 100}).allowed
    clock.t = ts(2024, 3, 31, 23, 59, 59)
    assert m.check(ORG, {"tokens": 1}).refused_by == "tokens"
    clock.t = ts(2024, 4, 1)
    decision = m.check(ORG, {"tokens": 70})
    assert decision.allowed
    assert (decision.used, decision.remaining) == (70, 30)
    assert decision.reset_at == ts(2024, 5, 1)
    assert m.quotas.used(ORG, "tokens") == 70
    assert m.quotas.used(ORG, "tokens", at=T0) == 100
    assert m.quotas.period(ORG) == Period(ts(2024, 4, 1), ts(2024, 5, 1))


def test_anchored_period_resets_on_the_clipped_anchor_day(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"tokens": 100}, billing_cycle=BillingCycle("monthly", 31))
    clock.t = ts(2023, 2, 27, 23, 59, 0)
    first = m.check(ORG, {"tokens": 100})
    assert first.reset_at == ts(2023, 2, 28)  # February 2023 has no 31st
    assert m.quotas.period(ORG) == Period(ts(2023, 1, 31), ts(2023, 2, 28))
    assert not m.check(ORG, {"tokens": 1}).allowed
    clock.t = ts(2023, 2, 28)
    second = m.check(ORG, {"tokens": 100})
    assert second.allowed
    assert second.reset_at == ts(2023, 3, 31)
    clock.t = ts(2023, 3, 30, 23, 59, 59)
    assert not m.check(ORG, {"tokens": 1}).allowed
    clock.t = ts(2023, 3, 31)
    assert m.check(ORG, {"tokens": 1}).allowed


def test_anchored_period_in_a_leap_february(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"tokens": 10}, billing_cycle=BillingCycle("monthly", 30))
    clock.t = ts(2024, 2, 28, 12)
    decision = m.check(ORG, {"tokens": 10})
    assert decision.reset_at == ts(2024, 2, 29)
    clock.t = ts(2024, 2, 29)
    assert m.check(ORG, {"tokens": 10}).reset_at == ts(2024, 3, 30)


def test_daily_cycle(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"tokens": 10}, billing_cycle=BillingCycle("daily"))
    assert m.check(ORG, {"tokens": 10}).reset_at == ts(2024, 3, 11)
    assert not m.check(ORG, {"tokens": 1}).allowed
    clock.t = ts(2024, 3, 11)
    assert m.check(ORG, {"tokens": 10}).allowed


# -- rate limits -----------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 17, 59])
def test_rpm_admits_exactly_the_rate_in_one_window(m: Meter, clock: Clock, offset: int) -> None:
    on_plan(m, rate_limit_rpm=5)
    clock.t = T0 + offset
    decisions = [m.check(ORG, {}) for _ in range(8)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    refused = decisions[5]
    assert refused.refused_by == "rate_limit_rpm"
    assert (refused.limit, refused.used, refused.remaining) == (5, 5, 0)
    assert refused.reset_at == T0 + 60
    state = refused.state("rate_limit_rpm")
    assert state is not None and state.requested == 1


@pytest.mark.parametrize(
    ("into_next", "admitted"),
    # The previous minute (6 requests) overlaps the last 60 s by 60 - s seconds, so it
    # still weighs floor(6 * (60 - s) / 60); the rest of the 6 are admitted.
    [(0, 0), (1, 1), (30, 3), (40, 4), (50, 5), (59, 6), (60, 6), (600, 6)],
)
def test_previous_minute_decays(m: Meter, clock: Clock, into_next: int, admitted: int) -> None:
    on_plan(m, rate_limit_rpm=6)
    assert all(m.check(ORG, {}).allowed for _ in range(6))
    clock.t = T0 + 60 + into_next
    got = sum(m.check(ORG, {}).allowed for _ in range(10))
    assert got == admitted


@pytest.mark.parametrize("offset", [0, 17, 59])
def test_rpm_retry_after_is_exact(m: Meter, clock: Clock, offset: int) -> None:
    on_plan(m, rate_limit_rpm=5)
    clock.t = T0 + offset
    assert all(m.check(ORG, {}).allowed for _ in range(5))
    refused = m.check(ORG, {})
    assert not refused.allowed
    wait = refused.retry_after
    assert wait is not None and wait >= 1
    # At T0 + 60 + k the full previous minute weighs floor(5 * (60 - k) / 60), which is 4
    # from k = 1: the first second with room is T0 + 61.
    assert wait == 61 - offset
    clock.t = T0 + offset + wait - 1
    assert not m.check(ORG, {}).allowed
    clock.t = T0 + offset + wait
    assert m.check(ORG, {}).allowed


def test_rpm_retry_after_inside_a_decaying_window(m: Meter, clock: Clock) -> None:
    on_plan(m, rate_limit_rpm=6)
    assert all(m.check(ORG, {}).allowed for _ in range(6))
    clock.t = T0 + 60 + 30
    # previous weighs floor(6 * 30 / 60) = 3: three more fit, then the window is full.
    assert sum(m.check(ORG, {}).allowed for _ in range(4)) == 3
    refused = m.check(ORG, {})
    assert not refused.allowed
    wait = refused.retry_after
    assert wait is not None and wait >= 1
    # floor(6 * (60 - s) / 60) + 3 + 1 <= 6 needs floor((60 - s) / 10) <= 2, i.e. s > 30:
    # one second later.
    assert wait == 1
    clock.t = T0 + 90 + wait
    assert m.check(ORG, {}).allowed


def test_rate_limit_per_day(m: Meter, clock: Clock) -> None:
    on_plan(m, rate_limit_per_day=4)
    for minute in range(4):
        clock.t = T0 + 60 * minute
        assert m.check(ORG, {}).allowed
    clock.t = T0 + 3600
    refused = m.check(ORG, {})
    assert refused.refused_by == "rate_limit_per_day"
    assert refused.reset_at == ts(2024, 3, 11)
    # Half-way through the next day yesterday's 4 weigh floor(4 * 0.5) = 2: 2 more fit.
    clock.t = ts(2024, 3, 11, 12)
    assert sum(m.check(ORG, {}).allowed for _ in range(5)) == 2


def test_rate_limit_per_day_retry_after_is_exact(m: Meter, clock: Clock) -> None:
    on_plan(m, rate_limit_per_day=3)
    assert all(m.check(ORG, {}).allowed for _ in range(3))
    refused = m.check(ORG, {})
    wait = refused.retry_after
    assert wait is not None
    # Next day at second k: floor(3 * (86400 - k) / 86400) + 1 <= 3 from k = 1.
    assert wait == ts(2024, 3, 11) + 1 - T0
    clock.t = T0 + wait - 1
    assert not m.check(ORG, {}).allowed
    clock.t = T0 + wait
    assert m.check(ORG, {}).allowed


def test_per_minute_and_per_day_together(m: Meter, clock: Clock) -> None:
    on_plan(m, rate_limit_rpm=100, rate_limit_per_day=3)
    assert all(m.check(ORG, {}).allowed for _ in range(3))
    assert m.check(ORG, {}).refused_by == "rate_limit_per_day"
    on_plan(m, rate_limit_rpm=2, rate_limit_per_day=100)
    clock.t = T0 + 600
    assert all(m.check(ORG, {}).allowed for _ in range(2))
    assert m.check(ORG, {}).refused_by == "rate_limit_rpm"


def test_requests_parameter_counts_several_requests(m: Meter) -> None:
    on_plan(m, rate_limit_rpm=5)
    assert m.check(ORG, {}, requests=3).allowed
    assert not m.check(ORG, {}, requests=3).allowed  # 3 + 3 > 5
    assert m.check(ORG, {}, requests=2).allowed
    assert not m.check(ORG, {}).allowed


def test_rate_limits_are_not_metrics(m: Meter) -> None:
    on_plan(m, rate_limit_rpm=5)
    with pytest.raises(ValidationError) as caught:
        m.check(ORG, {"rate_limit_rpm": 1})
    assert caught.value.field == "amounts.rate_limit_rpm"


# -- reservations ----------------------------------------------------------------------------


def test_reservation_holds_at_once(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100})
    reservation = m.reserve(ORG, {"tokens": 60})
    assert reservation.decision.allowed
    assert reservation.held == {"tokens": 60}
    assert reservation.expires_at == T0 + 300
    assert m.quotas.used(ORG, "tokens") == 60
    assert m.check(ORG, {"tokens": 41}).refused_by == "tokens"
    assert m.check(ORG, {"tokens": 40}).allowed
    with pytest.raises(QuotaExceeded):
        m.reserve(ORG, {"tokens": 1})
    reservation.commit()
    assert m.quotas.used(ORG, "tokens") == 100


@pytest.mark.parametrize("actual", [0, 20, 60, 90, 130])
def test_commit_settles_to_the_actual_amount(m: Meter, actual: int) -> None:
    on_plan(m, limits={"tokens": 100})
    m.check(ORG, {"tokens": 5})
    reservation = m.reserve(ORG, {"tokens": 60})
    reservation.commit({"tokens": actual})
    assert reservation.settled
    assert m.quotas.used(ORG, "tokens") == 5 + actual
    assert tokens_recorded(m) == 5 + actual


def test_commit_without_an_amount_commits_what_was_held(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100})
    m.reserve(ORG, {"tokens": 60, "queries": 2}).commit()
    assert m.quotas.used(ORG, "tokens") == 60
    assert m.quotas.used(ORG, "queries") == 2
    assert tokens_recorded(m) == 60


def test_commit_of_some_metrics_settles_the_others_to_zero(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100})
    m.reserve(ORG, {"tokens": 60, "queries": 2}).commit({"tokens": 10})
    assert m.quotas.used(ORG, "tokens") == 10
    assert m.quotas.used(ORG, "queries") == 0


def test_commit_of_a_metric_not_held_is_refused(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100})
    reservation = m.reserve(ORG, {"tokens": 60})
    with pytest.raises(ValidationError) as caught:
        reservation.commit({"tokens": 10, "queries": 1})
    assert caught.value.field == "actual"
    assert not reservation.settled
    assert m.quotas.used(ORG, "tokens") == 60
    reservation.commit({"tokens": 10})
    assert m.quotas.used(ORG, "tokens") == 10


@pytest.mark.parametrize("bad", [{"tokens": -1}, {"tokens": True}, {"tokens": 2.5}])
def test_commit_with_a_bad_amount_changes_nothing(m: Meter, bad: Mapping[str, Any]) -> None:
    on_plan(m, limits={"tokens": 100})
    reservation = m.reserve(ORG, {"tokens": 60})
    with pytest.raises(ValidationError) as caught:
        reservation.commit(bad)
    assert caught.value.field == "actual.tokens"
    assert not reservation.settled
    assert m.quotas.used(ORG, "tokens") == 60
    reservation.release()
    assert m.quotas.used(ORG, "tokens") == 0


def test_release_gives_everything_back(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100})
    reservation = m.reserve(ORG, {"tokens": 60, "queries": 1})
    reservation.release()
    assert reservation.settled
    assert m.quotas.used(ORG, "tokens") == 0
    assert m.quotas.used(ORG, "queries") == 0
    assert tokens_recorded(m) == 0
    assert m.check(ORG, {"tokens": 100}).allowed


def test_context_manager_commits_on_success(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100})
    with m.reserve(ORG, {"tokens": 60}) as reservation:
        assert m.quotas.used(ORG, "tokens") == 60
    assert reservation.settled
    assert m.quotas.used(ORG, "tokens") == 60
    assert tokens_recorded(m) == 60


def test_context_manager_keeps_a_commit_made_inside(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100})
    with m.reserve(ORG, {"tokens": 60}) as reservation:
        reservation.commit({"tokens": 7})
    assert m.quotas.used(ORG, "tokens") == 7
    assert tokens_recorded(m) == 7


def test_context_manager_releases_on_exception(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100})

    class Boom(Exception):
        pass

    with pytest.raises(Boom), m.reserve(ORG, {"tokens": 60}) as reservation:
        raise Boom
    assert reservation.settled
    assert m.quotas.used(ORG, "tokens") == 0
    assert tokens_recorded(m) == 0


@pytest.mark.parametrize("first", ["commit", "release"])
@pytest.mark.parametrize("second", ["commit", "release"])
def test_settling_twice_is_refused(m: Meter, first: str, second: str) -> None:
    on_plan(m, limits={"tokens": 100})
    reservation = m.reserve(ORG, {"tokens": 60})
    getattr(reservation, first)()
    expected = 60 if first == "commit" else 0
    with pytest.raises(ValidationError) as caught:
        getattr(reservation, second)()
    assert caught.value.field == "reservation"
    assert m.quotas.used(ORG, "tokens") == expected
    assert tokens_recorded(m) == expected


def test_abandoned_reservation_expires_after_its_ttl(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"tokens": 100})
    m.reserve(ORG, {"tokens": 60, "queries": 1}, ttl=30)
    kept = m.reserve(ORG, {"tokens": 10}, ttl=300)
    clock.t = T0 + 29
    assert m.quotas.used(ORG, "tokens") == 70
    assert not m.check(ORG, {"tokens": 31}, debit=False).allowed
    clock.t = T0 + 30
    # The first hold gave its amounts back; the second one still holds.
    assert m.quotas.used(ORG, "tokens") == 10
    assert m.quotas.used(ORG, "queries") == 0
    assert m.check(ORG, {"tokens": 90}, debit=False).allowed
    assert m.check(ORG, {"tokens": 90}).allowed
    assert not m.check(ORG, {"tokens": 1}).allowed
    kept.commit({"tokens": 4})
    assert m.quotas.used(ORG, "tokens") == 94


def test_committing_after_expiry_still_debits_the_actual(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"tokens": 100})
    reservation = m.reserve(ORG, {"tokens": 60}, ttl=10)
    clock.t = T0 + 11
    m.check(ORG, {"tokens": 1})  # someone else's request releases the expired hold
    assert m.quotas.used(ORG, "tokens") == 1
    reservation.commit({"tokens": 25})
    assert m.quotas.used(ORG, "tokens") == 26
    assert tokens_recorded(m) == 26


def test_releasing_after_expiry_gives_nothing_back_twice(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"tokens": 100})
    m.check(ORG, {"tokens": 30})
    reservation = m.reserve(ORG, {"tokens": 60}, ttl=10)
    clock.t = T0 + 10
    reservation.release()
    assert m.quotas.used(ORG, "tokens") == 30


def test_refused_reservation_raises_quota_exceeded_with_the_decision(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100, "queries": 5})
    m.check(ORG, {"tokens": 50})
    with pytest.raises(QuotaExceeded) as caught:
        m.reserve(ORG, {"queries": 1, "tokens": 51})
    decision = caught.value.decision
    assert isinstance(decision, Decision)
    assert not decision.allowed
    assert decision.refused_by == "tokens"
    assert (decision.limit, decision.used, decision.remaining) == (100, 50, 50)
    assert m.quotas.used(ORG, "tokens") == 50
    assert m.quotas.used(ORG, "queries") == 0


def test_refused_reservation_by_rate_limit(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100}, rate_limit_rpm=1)
    m.reserve(ORG, {"tokens": 1}).commit()
    with pytest.raises(QuotaExceeded) as caught:
        m.reserve(ORG, {"tokens": 1})
    assert caught.value.decision.refused_by == "rate_limit_rpm"
    assert caught.value.decision.retry_after is not None


# -- credits ---------------------------------------------------------------------------------


def test_plan_credit_allowance(m: Meter) -> None:
    on_plan(m, limits={"credits": 100})
    assert m.quotas.limit_for(ORG, "credits") == 100
    assert m.check(ORG, {"credits": 100}).allowed
    assert m.check(ORG, {"credits": 1}).refused_by == "credits"
    assert recorded(m, "credits", T0, T0 + 1) == 100


def test_credits_per_seat_times_seats(m: Meter) -> None:
    on_plan(m, seats=3, limits={"credits": 1000}, credits_per_seat=10)
    assert m.quotas.limit_for(ORG, "credits") == 30  # 3 seats x 10, not the 1000
    assert m.check(ORG, {"credits": 30}).allowed
    refused = m.check(ORG, {"credits": 1})
    assert (refused.refused_by, refused.limit) == ("credits", 30)
    m.assign_plan(ORG, "pro", seats=5)
    assert m.quotas.limit_for(ORG, "credits") == 50
    assert m.check(ORG, {"credits": 20}).allowed
    assert not m.check(ORG, {"credits": 1}).allowed


def test_purchased_credits_raise_this_period_only(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"credits": 100})
    assert m.check(ORG, {"credits": 100}).allowed
    grant = m.grant_credits(ORG, 50)
    assert grant.expires_at == ts(2024, 4, 1)
    assert m.quotas.limit_for(ORG, "credits") == 150
    decision = m.check(ORG, {"credits": 50})
    assert decision.allowed
    assert (decision.limit, decision.used, decision.remaining) == (150, 150, 0)
    assert not m.check(ORG, {"credits": 1}).allowed
    clock.t = ts(2024, 4, 1)
    assert m.quotas.limit_for(ORG, "credits") == 100
    assert m.check(ORG, {"credits": 100}).allowed
    assert m.check(ORG, {"credits": 1}).refused_by == "credits"


def test_purchased_credits_with_a_later_expiry_carry_over(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"credits": 100})
    m.grant_credits(ORG, 50, expires_at=ts(2024, 5, 1))
    m.grant_credits(ORG, 7)
    assert m.quotas.limit_for(ORG, "credits") == 157
    clock.t = ts(2024, 4, 15)
    assert m.quotas.limit_for(ORG, "credits") == 150
    assert m.check(ORG, {"credits": 150}).allowed
    assert not m.check(ORG, {"credits": 1}).allowed
    clock.t = ts(2024, 5, 1)
    assert m.quotas.limit_for(ORG, "credits") == 100


def test_grants_do_not_lift_unlimited_or_other_metrics(m: Meter) -> None:
    on_plan(m, limits={"tokens": 10})
    m.grant_credits(ORG, 50)
    assert m.quotas.limit_for(ORG, "credits") == -1
    assert m.quotas.limit_for(ORG, "tokens") == 10


@pytest.mark.parametrize("credits", [0, -5, True, 2.5, "10"])
def test_bad_grant_is_refused(m: Meter, credits: Any) -> None:
    on_plan(m, limits={"credits": 100})
    with pytest.raises(ValidationError) as caught:
        m.grant_credits(ORG, credits)
    assert caught.value.field == "credits"
    assert m.quotas.limit_for(ORG, "credits") == 100
    assert m.quotas.grants(ORG) == []


# -- gauges ----------------------------------------------------------------------------------


def test_gauges_are_not_per_period(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"spaces": 2, "storage_bytes": 1000})
    assert m.check(ORG, {"spaces": 1}).allowed
    assert m.check(ORG, {"spaces": 1, "storage_bytes": 600}).allowed
    refused = m.check(ORG, {"spaces": 1})
    assert refused.refused_by == "spaces"
    assert refused.reset_at is None
    assert refused.retry_after is None  # waiting does not free a space
    clock.t = ts(2024, 4, 2)
    assert m.quotas.used(ORG, "spaces") == 2
    assert m.quotas.used(ORG, "storage_bytes") == 600
    assert m.check(ORG, {"spaces": 1}).refused_by == "spaces"
    assert m.check(ORG, {"storage_bytes": 401}).refused_by == "storage_bytes"
    assert m.check(ORG, {"storage_bytes": 400}).allowed
    m.quotas.set_gauge(ORG, "spaces", 1)
    assert m.check(ORG, {"spaces": 1}).allowed
    assert m.quotas.used(ORG, "spaces") == 2


def test_set_gauge_refuses_counters_and_bad_values(m: Meter) -> None:
    with pytest.raises(ValidationError) as caught:
        m.quotas.set_gauge(ORG, "tokens", 5)
    assert caught.value.field == "metric"
    with pytest.raises(ValidationError) as caught:
        m.quotas.set_gauge(ORG, "spaces", -1)
    assert caught.value.field == "value"
    assert m.quotas.used(ORG, "spaces") == 0


# -- threshold hook --------------------------------------------------------------------------


def test_threshold_hook_fires_once_per_threshold_per_period(
    open_meter: Callable[..., Meter], clock: Clock
) -> None:
    seen = Thresholds()
    m = open_meter(plugins=[seen])
    on_plan(m, limits={"tokens": 100})
    for _ in range(30):
        m.check(ORG, {"tokens": 5})
    march = ts(2024, 3, 1)
    assert seen.calls == [
        (ORG, "tokens", 0.8, 80, 100, march),
        (ORG, "tokens", 1.0, 100, 100, march),
    ]
    clock.t = ts(2024, 4, 3)
    for _ in range(15):
        m.check(ORG, {"tokens": 7})
    april = ts(2024, 4, 1)
    # 7 x 12 = 84 is the first total at or above 80; 7 x 14 = 98 never reaches 100.
    assert seen.calls[2:] == [(ORG, "tokens", 0.8, 84, 100, april)]
    m.check(ORG, {"tokens": 2})
    assert seen.calls[3:] == [(ORG, "tokens", 1.0, 100, 100, april)]
    assert len(seen.calls) == 4


def test_a_threshold_crossed_in_a_rolled_back_transaction_fires_when_crossed_again(
    tmp_path: Path, clock: Clock
) -> None:
    seen = Thresholds()
    with Meter(f"sqlite:///{tmp_path / 't.db'}", clock=clock, plugins=[seen]) as m:
        on_plan(m, limits={"tokens": 100})
        with pytest.raises(RuntimeError), m.transaction():
            m.check(ORG, {"tokens": 90})
            raise RuntimeError("the request failed")
        assert seen.calls == [] and m.quotas.used(ORG, "tokens") == 0
        m.check(ORG, {"tokens": 90})
        assert [c[2] for c in seen.calls] == [0.8]


def test_one_jump_fires_both_thresholds(open_meter: Callable[..., Meter]) -> None:
    seen = Thresholds()
    m = open_meter(plugins=[seen])
    on_plan(m, limits={"tokens": 100})
    m.check(ORG, {"tokens": 79})
    assert seen.calls == []
    m.check(ORG, {"tokens": 21})
    assert [c[2] for c in seen.calls] == [0.8, 1.0]


def test_threshold_from_reservations_and_debits(open_meter: Callable[..., Meter]) -> None:
    seen = Thresholds()
    m = open_meter(plugins=[seen])
    on_plan(m, limits={"tokens": 100, "credits": 10})
    reservation = m.reserve(ORG, {"tokens": 85})
    assert [c[2] for c in seen.calls] == [0.8]
    reservation.release()
    m.reserve(ORG, {"tokens": 90}).commit()
    assert [c[2] for c in seen.calls] == [0.8]  # already told this period
    m.debit(ORG, {"credits": 12})  # usage that happened, over the limit
    assert [(c[1], c[2], c[3]) for c in seen.calls[1:]] == [
        ("credits", 0.8, 12),
        ("credits", 1.0, 12),
    ]


def test_threshold_for_a_gauge_has_no_period(open_meter: Callable[..., Meter]) -> None:
    seen = Thresholds()
    m = open_meter(plugins=[seen])
    on_plan(m, limits={"spaces": 5})
    for _ in range(5):
        m.check(ORG, {"spaces": 1})
    assert seen.calls == [(ORG, "spaces", 0.8, 4, 5, None), (ORG, "spaces", 1.0, 5, 5, None)]


def test_threshold_fires_once_across_meters_sharing_a_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    clock = Clock(T0)
    seen_a, seen_b = Thresholds(), Thresholds()
    with (
        Meter(url, clock=clock, plugins=[seen_a]) as a,
        Meter(url, clock=clock, plugins=[seen_b]) as b,
    ):
        on_plan(a, limits={"tokens": 100})
        for _ in range(10):
            a.check(ORG, {"tokens": 5})
            b.check(ORG, {"tokens": 5})
        a.flush()  # what ``a`` decided reaches the store within a flush interval
        assert b.quotas.used(ORG, "tokens") == 100
    assert sorted(c[2] for c in seen_a.calls + seen_b.calls) == [0.8, 1.0]


def test_custom_thresholds(open_meter: Callable[..., Meter]) -> None:
    seen = Thresholds()
    m = open_meter(plugins=[seen], thresholds=(0.5,))
    on_plan(m, limits={"tokens": 10})
    for _ in range(10):
        m.check(ORG, {"tokens": 1})
    assert [(c[2], c[3]) for c in seen.calls] == [(0.5, 5)]


# -- when the store cannot answer ------------------------------------------------------------


@pytest.fixture
def flaky(url: str) -> Iterator[FlakyCounters]:
    store = FlakyCounters(meterkit.meter.open_store(url))
    yield store
    store.close()


def test_fail_closed_raises(flaky: FlakyCounters, clock: Clock) -> None:
    m = Meter(store=flaky, clock=clock)  # closed is the default
    on_plan(m, limits={"tokens": 100})
    flaky.down = True
    with pytest.raises(StoreUnavailable):
        m.check(ORG, {"tokens": 1})
    with pytest.raises(StoreUnavailable):
        m.check(ORG, {"tokens": 1}, debit=False)
    with pytest.raises(StoreUnavailable):
        m.reserve(ORG, {"tokens": 1})
    flaky.down = False
    assert m.quotas.used(ORG, "tokens") == 0
    assert tokens_recorded(m) == 0
    assert m.check(ORG, {"tokens": 100}).allowed


def test_fail_open_admits_degraded(flaky: FlakyCounters, clock: Clock) -> None:
    m = Meter(store=flaky, clock=clock, policy="open")
    on_plan(m, limits={"tokens": 100})
    m.check(ORG, {"tokens": 100})
    flaky.down = True
    decision = m.check(ORG, {"tokens": 50})
    assert decision.allowed
    assert decision.degraded
    look = m.check(ORG, {"tokens": 50}, debit=False)
    assert look.allowed and look.degraded
    flaky.down = False
    healthy = m.check(ORG, {"tokens": 1})
    assert not healthy.allowed
    assert not healthy.degraded
    assert m.quotas.used(ORG, "tokens") == 100


def test_fail_open_reservation_is_degraded_and_counts_once_settled(
    flaky: FlakyCounters, clock: Clock
) -> None:
    m = Meter(store=flaky, clock=clock, policy="open")
    on_plan(m, limits={"tokens": 100})
    flaky.down = True
    reservation = m.reserve(ORG, {"tokens": 40})
    assert reservation.decision.allowed
    assert reservation.decision.degraded
    flaky.down = False
    reservation.commit({"tokens": 30})
    assert m.quotas.used(ORG, "tokens") == 30
    assert tokens_recorded(m) == 30


def test_commit_that_cannot_reach_the_store_may_be_retried(
    flaky: FlakyCounters, clock: Clock
) -> None:
    m = Meter(store=flaky, clock=clock, leases=False)  # settled in the store
    on_plan(m, limits={"tokens": 100})
    reservation = m.reserve(ORG, {"tokens": 40})
    flaky.down = True
    with pytest.raises(StoreUnavailable):
        reservation.commit({"tokens": 30})
    flaky.down = False
    assert m.quotas.used(ORG, "tokens") == 40  # still held
    reservation.commit({"tokens": 30})
    assert m.quotas.used(ORG, "tokens") == 30
    assert tokens_recorded(m) == 30


def test_a_leased_reservation_settles_without_the_store(flaky: FlakyCounters, clock: Clock) -> None:
    m = Meter(store=flaky, clock=clock)
    on_plan(m, limits={"tokens": 100})
    reservation = m.reserve(ORG, {"tokens": 40})
    flaky.down = True
    if m.quotas.leases is None:  # memory://: decided and settled in the store itself
        with pytest.raises(StoreUnavailable):
            reservation.commit({"tokens": 30})
        flaky.down = False
        reservation.commit({"tokens": 30})
    else:
        reservation.commit({"tokens": 30})  # held in this process's lease: no store call
        flaky.down = False
    assert m.quotas.used(ORG, "tokens") == 30
    assert tokens_recorded(m) == 30


def test_fail_open_settles_and_debits_without_raising_during_an_outage(
    flaky: FlakyCounters, clock: Clock
) -> None:
    m = Meter(store=flaky, clock=clock, policy="open", leases=False)  # settled in the store
    on_plan(m, limits={"tokens": 100})
    held = m.reserve(ORG, {"tokens": 40})
    flaky.down = True
    degraded = m.reserve(ORG, {"tokens": 10})
    assert degraded.decision.degraded
    held.commit({"tokens": 30})  # the store is down: not settled, and not raised either
    degraded.release()
    degraded_too = m.reserve(ORG, {"tokens": 5})
    degraded_too.commit()
    assert m.debit(ORG, {"tokens": 7}).degraded
    flaky.down = False
    # The unsettled hold gives its 40 back when it expires; nothing else was counted.
    assert m.quotas.used(ORG, "tokens") == 40
    clock.t += 301
    assert m.quotas.used(ORG, "tokens") == 0


def test_fail_closed_debit_raises_when_the_plan_cannot_be_read(
    flaky: FlakyCounters, clock: Clock
) -> None:
    m = Meter(store=flaky, clock=clock, policy="closed")
    on_plan(m, limits={"tokens": 100})
    m.quotas.forget()
    flaky.down = True
    flaky.records_down = True
    with pytest.raises(StoreUnavailable):
        m.debit(ORG, {"tokens": 1})
    with pytest.raises(StoreUnavailable):
        m.check(ORG, {"tokens": 1})
    m.quotas.policy = "open"
    assert m.debit(ORG, {"tokens": 1}).degraded
    assert m.check(ORG, {"tokens": 1}).degraded
    flaky.down = flaky.records_down = False
    assert m.quotas.used(ORG, "tokens") == 0


def test_bad_policy_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        Meter("memory://", policy="sometimes")  # type: ignore[arg-type]
    assert caught.value.field == "policy"


# -- bad input -------------------------------------------------------------------------------


BAD_AMOUNTS = [
    ({"tokens": -1}, "amounts.tokens"),
    ({"tokens": True}, "amounts.tokens"),
    ({"tokens": 2.5}, "amounts.tokens"),
    ({"tokens": "5"}, "amounts.tokens"),
    ({"tokens": None}, "amounts.tokens"),
    ({"queries": 1, "tokens": -3}, "amounts.tokens"),
    ({"": 1}, "amounts"),
    ({5: 1}, "amounts"),
    ([("tokens", 1)], "amounts"),
    (None, "amounts"),
    ("tokens", "amounts"),
]


def assert_untouched(m: Meter) -> None:
    assert m.quotas.used(ORG, "tokens") == 10
    assert m.quotas.used(ORG, "queries") == 0
    assert tokens_recorded(m) == 10
    assert recorded(m, "queries", T0, T0 + 1) == 0


@pytest.mark.parametrize(("amounts", "field"), BAD_AMOUNTS)
@pytest.mark.parametrize("call", ["check", "look", "reserve", "debit"])
def test_bad_amounts_are_refused_naming_the_field(
    m: Meter, amounts: Any, field: str, call: str
) -> None:
    on_plan(m, limits={"tokens": 100}, rate_limit_rpm=2)
    m.check(ORG, {"tokens": 10})
    with pytest.raises(ValidationError) as caught:
        if call == "check":
            m.check(ORG, amounts)
        elif call == "look":
            m.check(ORG, amounts, debit=False)
        elif call == "reserve":
            m.reserve(ORG, amounts)
        else:
            m.debit(ORG, amounts)
    assert caught.value.field == field
    assert_untouched(m)
    # The refused call did not use the second request of this minute.
    assert m.check(ORG, {}).allowed


@pytest.mark.parametrize("org", ["", None, " org_1", "org\n1", 7])
def test_bad_organization_is_refused(m: Meter, org: Any) -> None:
    on_plan(m, limits={"tokens": 100})
    m.check(ORG, {"tokens": 10})
    for call in (m.check, m.reserve, m.debit):
        with pytest.raises(ValidationError) as caught:
            call(org, {"tokens": 1})
        assert caught.value.field == "organization_id"
    assert_untouched(m)


@pytest.mark.parametrize("requests", [-1, True, 1.0, "1"])
def test_bad_requests_is_refused(m: Meter, requests: Any) -> None:
    on_plan(m, limits={"tokens": 100})
    m.check(ORG, {"tokens": 10})
    with pytest.raises(ValidationError) as caught:
        m.check(ORG, {"tokens": 1}, requests=requests)
    assert caught.value.field == "requests"
    assert_untouched(m)


@pytest.mark.parametrize("ttl", [0, -30, True, 1.5, "30", None])
def test_bad_ttl_is_refused(m: Meter, ttl: Any) -> None:
    on_plan(m, limits={"tokens": 100})
    m.check(ORG, {"tokens": 10})
    with pytest.raises(ValidationError) as caught:
        m.reserve(ORG, {"tokens": 5}, ttl=ttl)
    assert caught.value.field == "ttl"
    assert_untouched(m)


def test_assigning_an_unknown_plan_is_refused(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100})
    with pytest.raises(ValidationError) as caught:
        m.assign_plan(ORG, "enterprise")
    assert caught.value.field == "plan"
    assignment, plan = m.quotas.plan_of(ORG)
    assert assignment is not None and assignment.plan == "pro"
    assert plan is not None and plan.limits == {"tokens": 100}
    with pytest.raises(ValidationError) as caught:
        m.assign_plan("org_2", "enterprise")
    assert caught.value.field == "plan"
    assert m.quotas.plan_of("org_2") == (None, None)


@pytest.mark.parametrize("seats", [-1, True, 1.5])
def test_bad_seats_are_refused(m: Meter, seats: Any) -> None:
    on_plan(m, limits={"credits": 100}, credits_per_seat=10)
    with pytest.raises(ValidationError) as caught:
        m.assign_plan(ORG, "pro", seats=seats)
    assert caught.value.field == "seats"
    assert m.quotas.limit_for(ORG, "credits") == 10


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limits": {"tokens": -2}}, "plan.limits.tokens"),
        ({"limits": {"tokens": True}}, "plan.limits.tokens"),
        ({"limits": {"tokens": 1.5}}, "plan.limits.tokens"),
        ({"limits": ["tokens"]}, "plan.limits"),
        ({"rate_limit_rpm": -5}, "plan.rate_limit_rpm"),
        ({"rate_limit_per_day": False}, "plan.rate_limit_per_day"),
        ({"credits_per_seat": -3}, "plan.credits_per_seat"),
        ({"billing_cycle": "monthly"}, "plan.billing_cycle"),
    ],
)
def test_bad_plan_is_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Plan("pro", **kwargs)
    assert caught.value.field == field


# -- debits are recorded as events -----------------------------------------------------------


def test_debits_are_recorded_as_events(m: Meter, clock: Clock) -> None:
    on_plan(m, limits={"tokens": 100, "queries": 10})
    m.check(ORG, {"tokens": 40, "queries": 1}, dimensions={"project_id": "proj_a"})
    m.check(ORG, {"tokens": 70})  # refused: not recorded
    m.check(ORG, {"tokens": 60}, debit=False)  # a look: not recorded
    clock.t = T0 + DAY
    m.reserve(ORG, {"tokens": 30}).commit({"tokens": 12})
    m.reserve(ORG, {"tokens": 30}).release()
    m.debit(ORG, {"queries": 3})
    assert recorded(m, "tokens", T0, T0 + 1) == 40
    assert recorded(m, "tokens", T0 + DAY, T0 + DAY + 1) == 12
    assert recorded(m, "queries", T0, T0 + 2 * DAY) == 4
    page = m.usage(
        "tokens",
        organization_id=ORG,
        start_time=T0 - T0 % DAY,
        end_time=T0 - T0 % DAY + DAY,
        group_by=["project_id"],
    )
    groups = {r.group["project_id"]: r.values["tokens"] for b in page.data for r in b.results}
    assert groups == {"proj_a": 40}


def test_debits_are_not_recorded_when_turned_off(open_meter: Callable[..., Meter]) -> None:
    m = open_meter(record_debits=False)
    on_plan(m, limits={"tokens": 100})
    m.check(ORG, {"tokens": 40})
    m.reserve(ORG, {"tokens": 10}).commit()
    assert m.quotas.used(ORG, "tokens") == 50
    assert tokens_recorded(m) == 0


def test_debit_counts_past_the_limit(m: Meter) -> None:
    on_plan(m, limits={"tokens": 100})
    decision = m.debit(ORG, {"tokens": 130})
    assert decision.allowed
    assert m.quotas.used(ORG, "tokens") == 130
    refused = m.check(ORG, {"tokens": 1})
    assert (refused.refused_by, refused.used, refused.remaining) == ("tokens", 130, 0)


# -- compiled limits -----------------------------------------------------------------------------


class CountingStore:
    """A real store that counts the record reads made through it."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name in ("get_record", "list_records"):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.reads += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def test_decisions_read_no_records_between_refreshes(
    url: str, clock: Clock, monotonic: Monotonic
) -> None:
    store = CountingStore(Meter(url).store)
    m = Meter(store=store, clock=clock, record_debits=False)  # type: ignore[arg-type]
    on_plan(m, limits={"tokens": 1000}, rate_limit_rpm=100)
    assert m.check(ORG, {"tokens": 1}).allowed
    store.reads = 0
    for i in range(50):
        clock.t = T0 + i  # the clock moves, within the period and the minute's window ...
        assert m.check(ORG, {"tokens": 1, "queries": 1}).allowed
    assert store.reads == 0  # ... and nothing about the plan is read again
    monotonic.t += m.quotas.cache_seconds
    assert m.check(ORG, {"tokens": 1}).allowed
    assert store.reads > 0  # the refresh reads the plan, assignment and grants once more
    m.close()


def test_a_change_by_another_process_is_seen_within_the_refresh_bound(
    tmp_path: Path, clock: Clock, monotonic: Monotonic
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with Meter(url, clock=clock) as here, Meter(url, clock=clock) as there:
        assert here.quotas.cache_seconds <= 1.0
        on_plan(here, limits={"tokens": 10})
        assert there.check(ORG, {"tokens": 5}).allowed
        here.set_plan(Plan("pro", name="Pro", limits={"tokens": 5}))
        # The process that made the change sees it at once ...
        assert not here.check(ORG, {"tokens": 1}).allowed
        # ... another within the refresh bound: before it, its compiled limit stands.
        assert there.quotas.limit_for(ORG, "tokens") == 10
        monotonic.t += there.quotas.cache_seconds
        refused = there.check(ORG, {"tokens": 1})
        assert not refused.allowed and refused.limit == 5


def test_compiled_limits_follow_grant_and_period_boundaries(
    open_meter: Callable[..., Meter], clock: Clock, monotonic: Monotonic
) -> None:
    m = open_meter(record_debits=False)
    on_plan(m, limits={"credits": 10})
    m.grant_credits(ORG, 5, expires_at=T0 + 100)
    assert m.check(ORG, {"credits": 15}, debit=False).allowed
    clock.t = T0 + 99
    assert m.check(ORG, {"credits": 15}, debit=False).allowed
    clock.t = T0 + 100  # the grant has ended, with no refresh in between
    assert not m.check(ORG, {"credits": 11}, debit=False).allowed
    assert m.check(ORG, {"credits": 10}).allowed
    period = m.quotas.period(ORG)
    clock.t = period.end  # a new period: new counters, the full allowance again
    assert m.check(ORG, {"credits": 10}).allowed
    clock.t = period.end - 1  # and back: the old period's counter is still spent
    assert not m.check(ORG, {"credits": 1}).allowed
