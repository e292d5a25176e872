"""Quotas, periods and default query ends at TEST_NOW: .ci/run repeats these at the edges.

Every time here comes from the injected clock, so the same assertions must hold at the first
second of a month, the last second of a year, on 29 February and on a cycle anchored on the
31st (see ``clock.EDGES``).
"""

from __future__ import annotations

import attrs
import pytest

from clock import EDGES, TEST_NOW, parse_instant
from meterkit import BillingCycle, Meter, Plan
from meterkit.periods import utc

pytestmark = pytest.mark.clock_edges
DAY = 86_400


@attrs.define
class SetClock:
    t: int

    def __call__(self) -> float:
        return float(self.t)


def test_edges_are_the_instants_they_claim() -> None:
    stamps = [utc(parse_instant(e)) for e in EDGES]
    assert (stamps[0].day, stamps[0].hour, stamps[0].minute, stamps[0].second) == (1, 0, 0, 0)
    assert (stamps[1].month, stamps[1].day, stamps[1].hour, stamps[1].second) == (12, 31, 23, 59)
    assert (stamps[2].month, stamps[2].day) == (2, 29)
    assert stamps[3].day == 31
    assert (stamps[4].month, stamps[4].day, stamps[4].second) == (4, 30, 59)


@pytest.mark.parametrize("anchor", [1, 15, 29, 31])
def test_a_period_quota_around_now(store_url: str, anchor: int) -> None:
    clock = SetClock(TEST_NOW)
    with Meter(store_url, clock=clock, record_debits=False) as m:
        m.set_plan(Plan("p", billing_cycle=BillingCycle("monthly", anchor), limits={"tokens": 100}))
        m.assign_plan("org", "p")
        period = m.quotas.period("org")
        assert period.start <= TEST_NOW < period.end
        assert 28 * DAY <= period.end - period.start <= 31 * DAY
        assert m.quotas.period("org", period.start - 1).end == period.start
        assert m.check("org", {"tokens": 60}).allowed
        refused = m.check("org", {"tokens": 41})
        assert not refused.allowed and refused.reset_at == period.end
        assert refused.retry_after == max(1, period.end - TEST_NOW)
        # The last second of the period still counts against it ...
        clock.t = period.end - 1
        assert m.quotas.used("org", "tokens") == 60
        assert not m.check("org", {"tokens": 41}).allowed
        # ... and the next one starts from nothing.
        clock.t = period.end
        assert m.quotas.used("org", "tokens") == 0
        assert m.check("org", {"tokens": 100}).allowed
        assert m.quotas.period("org").start == period.end


def test_usage_up_to_now_includes_this_second(store_url: str) -> None:
    with Meter(store_url, clock=SetClock(TEST_NOW)) as m:
        m.record("tokens", {"tokens": 3}, organization_id="org", id="now", time=TEST_NOW)
        m.record("tokens", {"tokens": 4}, organization_id="org", id="before", time=TEST_NOW - DAY)
        page = m.usage("tokens", organization_id="org", start_time=TEST_NOW - DAY, end_time=None)
        total = sum(r.values["tokens"] or 0 for b in page.data for r in b.results)
        # end_time defaults to the end of this second: the event recorded just now is in.
        assert total == 7
        page = m.usage(
            "tokens", organization_id="org", start_time=TEST_NOW - DAY, end_time=TEST_NOW + 1
        )
        assert sum(r.values["tokens"] or 0 for b in page.data for r in b.results) == 7


def test_plan_usage_of_the_current_period(store_url: str) -> None:
    with Meter(store_url, clock=SetClock(TEST_NOW)) as m:
        m.set_plan(Plan("p", limits={"tokens": 1000}))
        m.assign_plan("org", "p")
        assert m.check("org", {"tokens": 10}).allowed
        today = utc(TEST_NOW).date().isoformat()
        body = m.plan_usage("org", today, today)
        assert body["tokens"]["used"] == 10 and body["tokens"]["limit"] == 1000
        account = m.account_usage("org", "admin")
        start = m.quotas.period("org").start
        assert account["credits"]["periodStart"].startswith(utc(start).date().isoformat())
