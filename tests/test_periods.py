"""Billing periods: calendar months, months anchored on a day, days — all UTC.

Expected dates are written out by hand, or computed here with a leap-year rule and a
neighbouring-months search that share nothing with :mod:`meterkit.periods`.
"""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterkit import BillingCycle, Period, ValidationError

UTC = dt.timezone.utc
LAST_TIME = int(dt.datetime(2200, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())
DAY = 86400


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(dt.datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())


def is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def days_in(year: int, month: int) -> int:
    if month == 2:
        return 29 if is_leap(year) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def expected_period(anchor: int, t: int) -> tuple[int, int]:
    """The anchored month containing ``t``, by searching the starts of nearby months."""
    when = dt.datetime.fromtimestamp(t, UTC)
    starts = []
    for offset in range(-2, 3):
        index = when.year * 12 + when.month - 1 + offset
        year, month = divmod(index, 12)
        month += 1
        starts.append(ts(year, month, min(anchor, days_in(year, month))))
    start = max(s for s in starts if s <= t)
    end = min(s for s in starts if s > t)
    return start, end


# -- the hand-written leap-year rule is right ------------------------------------------------


@pytest.mark.parametrize(
    ("year", "leap"), [(2023, False), (2024, True), (2100, False), (2000, True), (1900, False)]
)
def test_leap_rule_used_by_these_tests(year: int, leap: bool) -> None:
    assert is_leap(year) is leap
    # 1 March minus one day is 29 February exactly in leap years.
    last_of_feb = dt.date(year, 3, 1) - dt.timedelta(days=1)
    assert last_of_feb.day == (29 if leap else 28)


# -- calendar months -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "start", "end"),
    [
        (ts(2024, 2, 10, 12), ts(2024, 2, 1), ts(2024, 3, 1)),
        (ts(2024, 2, 29, 23, 59, 59), ts(2024, 2, 1), ts(2024, 3, 1)),
        (ts(2024, 3, 1), ts(2024, 3, 1), ts(2024, 4, 1)),
        (ts(2023, 2, 28, 23, 59, 59), ts(2023, 2, 1), ts(2023, 3, 1)),
        (ts(2023, 12, 31, 23, 59, 59), ts(2023, 12, 1), ts(2024, 1, 1)),
        (ts(2024, 1, 1), ts(2024, 1, 1), ts(2024, 2, 1)),
        (ts(2100, 2, 15), ts(2100, 2, 1), ts(2100, 3, 1)),
        (ts(1970, 1, 1), ts(1970, 1, 1), ts(1970, 2, 1)),
    ],
)
def test_monthly_is_the_calendar_month(at: int, start: int, end: int) -> None:
    for cycle in (BillingCycle(), BillingCycle("monthly", 1)):
        assert cycle.period_at(at) == Period(start, end)


def test_calendar_month_lengths_in_a_leap_and_a_common_year() -> None:
    cycle = BillingCycle("monthly")
    lengths_2024 = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    lengths_2023 = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    for year, lengths in ((2024, lengths_2024), (2023, lengths_2023)):
        for month, days in enumerate(lengths, start=1):
            period = cycle.period_at(ts(year, month, 15))
            assert (period.end - period.start) // DAY == days, (year, month)


# -- months anchored on a day ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "at", "start", "end"),
    [
        # anchor 31, leap year 2024: January 31 -> February 29 -> March 31
        (31, ts(2024, 2, 15), ts(2024, 1, 31), ts(2024, 2, 29)),
        (31, ts(2024, 2, 28, 23, 59, 59), ts(2024, 1, 31), ts(2024, 2, 29)),
        (31, ts(2024, 2, 29), ts(2024, 2, 29), ts(2024, 3, 31)),
        (31, ts(2024, 3, 30, 23, 59, 59), ts(2024, 2, 29), ts(2024, 3, 31)),
        (31, ts(2024, 3, 31), ts(2024, 3, 31), ts(2024, 4, 30)),
        (31, ts(2024, 4, 30), ts(2024, 4, 30), ts(2024, 5, 31)),
        # anchor 31, common year 2023: February 28 is the anchor day
        (31, ts(2023, 2, 27, 23, 59, 59), ts(2023, 1, 31), ts(2023, 2, 28)),
        (31, ts(2023, 2, 28), ts(2023, 2, 28), ts(2023, 3, 31)),
        (31, ts(2023, 3, 1), ts(2023, 2, 28), ts(2023, 3, 31)),
        # anchor 31 across a year end
        (31, ts(2023, 12, 31), ts(2023, 12, 31), ts(2024, 1, 31)),
        (31, ts(2024, 1, 15), ts(2023, 12, 31), ts(2024, 1, 31)),
        (31, ts(2023, 12, 30, 23, 59, 59), ts(2023, 11, 30), ts(2023, 12, 31)),
        # anchor 30
        (30, ts(2024, 2, 28), ts(2024, 1, 30), ts(2024, 2, 29)),
        (30, ts(2024, 2, 29), ts(2024, 2, 29), ts(2024, 3, 30)),
        (30, ts(2023, 2, 28), ts(2023, 2, 28), ts(2023, 3, 30)),
        (30, ts(2023, 2, 27), ts(2023, 1, 30), ts(2023, 2, 28)),
        (30, ts(2023, 3, 29, 23, 59, 59), ts(2023, 2, 28), ts(2023, 3, 30)),
        (30, ts(2000, 2, 29), ts(2000, 2, 29), ts(2000, 3, 30)),
        (30, ts(2000, 2, 28), ts(2000, 1, 30), ts(2000, 2, 29)),
        (30, ts(2100, 2, 28), ts(2100, 2, 28), ts(2100, 3, 30)),
        (30, ts(2100, 2, 27), ts(2100, 1, 30), ts(2100, 2, 28)),
        # anchor 29: an ordinary day in leap years, clipped to the 28th otherwise
        (29, ts(2024, 2, 28, 23, 59, 59), ts(2024, 1, 29), ts(2024, 2, 29)),
        (29, ts(2024, 2, 29), ts(2024, 2, 29), ts(2024, 3, 29)),
        (29, ts(2023, 2, 28), ts(2023, 2, 28), ts(2023, 3, 29)),
        (29, ts(2023, 3, 1), ts(2023, 2, 28), ts(2023, 3, 29)),
        (29, ts(2023, 3, 29), ts(2023, 3, 29), ts(2023, 4, 29)),
        (29, ts(2100, 2, 28), ts(2100, 2, 28), ts(2100, 3, 29)),
        (29, ts(2100, 1, 29), ts(2100, 1, 29), ts(2100, 2, 28)),
        (29, ts(2000, 2, 29), ts(2000, 2, 29), ts(2000, 3, 29)),
        (29, ts(2000, 2, 28), ts(2000, 1, 29), ts(2000, 2, 29)),
        # an anchor every month has
        (15, ts(2024, 2, 14, 23, 59, 59), ts(2024, 1, 15), ts(2024, 2, 15)),
        (15, ts(2024, 2, 15), ts(2024, 2, 15), ts(2024, 3, 15)),
    ],
)
def test_anchored_months(anchor: int, at: int, start: int, end: int) -> None:
    assert BillingCycle("monthly", anchor).period_at(at) == Period(start, end)


@pytest.mark.parametrize("anchor", [29, 30, 31])
@pytest.mark.parametrize("year", [2023, 2024, 2100, 2000])
def test_anchored_february_starts_on_its_last_day_or_the_anchor(anchor: int, year: int) -> None:
    february_start = ts(year, 2, min(anchor, 29 if is_leap(year) else 28))
    cycle = BillingCycle("monthly", anchor)
    period = cycle.period_at(february_start)
    assert period.start == february_start
    assert period.end == ts(year, 3, anchor)
    before = cycle.period_at(february_start - 1)
    assert before == Period(ts(year, 1, anchor), february_start)


@pytest.mark.parametrize(
    ("at", "start", "end"),
    [
        (ts(2024, 2, 29, 12), ts(2024, 2, 29), ts(2024, 3, 1)),
        (ts(2023, 2, 28, 23, 59, 59), ts(2023, 2, 28), ts(2023, 3, 1)),
        (ts(2023, 12, 31, 0, 0, 1), ts(2023, 12, 31), ts(2024, 1, 1)),
        (ts(2024, 1, 1), ts(2024, 1, 1), ts(2024, 1, 2)),
    ],
)
def test_daily(at: int, start: int, end: int) -> None:
    assert BillingCycle("daily").period_at(at) == Period(start, end)


def test_period_is_half_open() -> None:
    period = Period(ts(2024, 2, 1), ts(2024, 3, 1))
    assert period.contains(period.start)
    assert period.contains(period.end - 1)
    assert not period.contains(period.end)
    assert not period.contains(period.start - 1)
    assert period.last_second == ts(2024, 2, 29, 23, 59, 59)


def test_history_of_an_anchored_cycle_by_hand() -> None:
    cycle = BillingCycle("monthly", 31)
    assert cycle.history(ts(2024, 3, 5), 4) == [
        Period(ts(2023, 11, 30), ts(2023, 12, 31)),
        Period(ts(2023, 12, 31), ts(2024, 1, 31)),
        Period(ts(2024, 1, 31), ts(2024, 2, 29)),
        Period(ts(2024, 2, 29), ts(2024, 3, 31)),
    ]
    assert cycle.history(ts(2024, 3, 5), 1) == [Period(ts(2024, 2, 29), ts(2024, 3, 31))]


def test_history_of_no_periods_is_empty() -> None:
    assert BillingCycle().history(ts(2024, 3, 5), 0) == []


def test_previous_period() -> None:
    cycle = BillingCycle("monthly", 30)
    march = cycle.period_at(ts(2023, 3, 10))
    assert cycle.previous(march) == Period(ts(2023, 1, 30), ts(2023, 2, 28))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "weekly"}, "billing_cycle"),
        ({"kind": "monthly", "anchor_day": 0}, "anchor_day"),
        ({"kind": "monthly", "anchor_day": 32}, "anchor_day"),
        ({"kind": "monthly", "anchor_day": True}, "anchor_day"),
        ({"kind": "monthly", "anchor_day": "1"}, "anchor_day"),
        ({"kind": "monthly", "anchor_day": 1.0}, "anchor_day"),
    ],
)
def test_bad_cycle_is_refused_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        BillingCycle(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


# -- properties ------------------------------------------------------------------------------

times = st.integers(min_value=0, max_value=LAST_TIME)
cycles = st.one_of(
    st.just(BillingCycle("daily")),
    st.integers(min_value=1, max_value=31).map(lambda day: BillingCycle("monthly", day)),
)
PROPERTY = settings(max_examples=100, deadline=None)


@PROPERTY
@given(cycle=cycles, t=times)
def test_period_contains_t_and_is_contiguous(cycle: BillingCycle, t: int) -> None:
    period = cycle.period_at(t)
    assert period.contains(t)
    assert cycle.period_at(period.end).start == period.end
    assert cycle.period_at(period.start - 1).end == period.start
    assert cycle.period_at(period.start) == period
    assert cycle.period_at(period.end - 1) == period


@PROPERTY
@given(anchor=st.integers(min_value=1, max_value=31), t=times)
def test_monthly_period_matches_an_independent_computation(anchor: int, t: int) -> None:
    period = BillingCycle("monthly", anchor).period_at(t)
    assert (period.start, period.end) == expected_period(anchor, t)
    assert 28 * DAY <= period.end - period.start <= 31 * DAY
    start = dt.datetime.fromtimestamp(period.start, UTC)
    assert (start.hour, start.minute, start.second) == (0, 0, 0)
    assert start.day == min(anchor, days_in(start.year, start.month))


@PROPERTY
@given(t=times)
def test_daily_period_is_the_utc_day(t: int) -> None:
    period = BillingCycle("daily").period_at(t)
    assert period == Period(t - t % DAY, t - t % DAY + DAY)


@PROPERTY
@given(
    cycle=cycles,
    t=st.integers(min_value=ts(1975, 1, 1), max_value=LAST_TIME),
    count=st.integers(min_value=1, max_value=30),
)
def test_history_is_count_contiguous_periods_ending_now(
    cycle: BillingCycle, t: int, count: int
) -> None:
    periods = cycle.history(t, count)
    assert len(periods) == count
    assert periods[-1].contains(t)
    for earlier, later in itertools.pairwise(periods):
        assert earlier.end == later.start
        assert earlier.start < earlier.end
    for period in periods:
        assert cycle.period_at(period.start) == period
