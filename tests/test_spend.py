"""Spend limits and spend alerts: counted spend, enforcement before requests, alerts delivered.

Every store runs the same tests (memory, SQLite, PostgreSQL, and Redis counters beside
SQLite). Spend recorded through events is held to the costs engine: the counter is the exact
cost rounded up to the nano-dollar once per write, never below it.
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import services
from clock import Clock
from meterkit import Event, Meter, QuotaExceeded, ValidationError, hookimpl
from meterkit.config import load_config
from meterkit.notify import (
    AlertNotice,
    DeliveryFailed,
    EmailNotifier,
    WebhookNotifier,
    sign,
    verify_signature,
)
from meterkit.recovery import counter_differences, rebuild_counters
from meterkit.spend import NANO, SpendAlert, to_nano
from notify_helpers import SmtpSink, smtp_server, webhook_server

NOW = 1_764_979_200  # 2025-12-06T00:00:00Z
MONTH_START = 1_764_547_200  # 2025-12-01
NEXT_MONTH = 1_767_225_600  # 2026-01-01
PER_M = 1_000_000


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    kind = request.param
    counters = services.redis_url() if kind == "redis" else None
    for found in services.store_urls("sqlite" if kind == "redis" else kind, tmp_path, "sp"):
        yield found, counters


def open_meter(url: tuple[str, str | None], clock: Clock, **kw: Any) -> Meter:
    return Meter(url[0], counters=url[1], clock=clock, **kw)


def org() -> str:
    # Redis counters outlive a test: each test counts for an organization of its own.
    return f"org_{uuid.uuid4().hex[:12]}"


def price(m: Meter, measure: str = "input_tokens", unit: str = "2.50", **kw: Any) -> None:
    m.set_price(
        {
            "meter": "completions",
            "measure": measure,
            "unit_price": unit,
            "per": PER_M,
            "line_item": f"completions {measure}",
            "quantity_unit": "tokens",
            **kw,
        }
    )


def record(m: Meter, o: str, input_tokens: int, t: int = NOW, model: str = "gpt-4o") -> None:
    m.record(
        "completions",
        {"input_tokens": input_tokens, "output_tokens": 0, "num_model_requests": 1},
        organization_id=o,
        time=t,
        dimensions={"model": model},
    )


# -- the limit ---------------------------------------------------------------------------------


def test_limit_crud_and_its_status(url: tuple[str, str | None]) -> None:
    clock = Clock(NOW)
    with open_meter(url, clock) as m:
        o = org()
        assert m.spend(o).limit is None
        state = m.set_spend_limit(o, 250)
        assert state.to_dict() == {
            "object": "organization.spend_limit",
            "currency": "USD",
            "interval": "month",
            "threshold_amount": 250,
            "enforcement": {"status": "inactive"},
        }
        assert (state.period_start, state.period_end) == (MONTH_START, NEXT_MONTH)
        m.set_spend_limit(o, 100)  # replaced
        assert m.spend(o).limit is not None and m.spend(o).limit.threshold_amount == 100
        assert m.delete_spend_limit(o) is True
        assert m.delete_spend_limit(o) is False
        assert m.spend(o).limit is None


def test_the_lower_of_the_own_limit_and_the_operators_cap_is_enforced(
    url: tuple[str, str | None],
) -> None:
    clock = Clock(NOW)
    with open_meter(url, clock) as m:
        o = org()
        m.set_spend_limit(o, 100)  # $1.00, the organization's own
        m.set_spend_cap(o, 50)  # the operator lowers what may be spent below it
        admitted = [m.check(o, {}, cost=Decimal("0.10")).allowed for _ in range(7)]
        assert admitted == [True] * 5 + [False] * 2
        with pytest.raises(ValidationError) as above:
            m.set_spend_limit(o, 51)
        assert above.value.field == "threshold_amount"
        own = m.spend(o).limit
        assert own is not None and own.threshold_amount == 50  # the cap, in force
        m.set_spend_limit(o, 30)  # at or under the cap: allowed, and it binds
        m.delete_spend_cap(o)
        assert not m.check(o, {}, cost=Decimal("0.01")).allowed  # 50 cents spent of 30
        assert m.delete_spend_limit(o)
        m.set_spend_cap(o, 60)
        assert m.check(o, {}, cost=Decimal("0.10")).allowed  # 60 of 60
        assert not m.check(o, {}, cost=Decimal("0.01")).allowed
        assert m.delete_spend_limit(o) is False  # the cap is not the organization's to delete
        assert m.spend_cap(o) == 60


def test_estimates_are_held_to_the_limit_exactly(url: tuple[str, str | None]) -> None:
    clock = Clock(NOW)
    with open_meter(url, clock) as m:
        o = org()
        m.set_spend_limit(o, 100)  # $1.00
        admitted = [m.check(o, {}, cost=Decimal("0.10")).allowed for _ in range(12)]
        assert admitted == [True] * 10 + [False] * 2
        refused = m.check(o, {}, cost="0.01")
        assert not refused.allowed and refused.refused_by == "spend"
        state = refused.state("spend")
        assert state is not None and (state.used, state.limit) == (NANO, NANO)
        # Reached: a decision without an estimate is refused too, and the status says so.
        assert m.check(o, {}).refused_by == "spend"
        assert m.spend(o).to_dict()["enforcement"] == {"status": "enforcing"}
        assert m.spend(o).counted == Decimal("1")
        # A higher limit lets requests through again; deleting it lifts every refusal.
        m.set_spend_limit(o, 150)
        assert m.check(o, {}, cost="0.49").allowed
        assert not m.check(o, {}, cost="0.02").allowed
        m.delete_spend_limit(o)
        assert m.check(o, {}, cost="5").allowed


def test_a_decision_without_an_estimate_checks_the_limit_and_counts_nothing(
    url: tuple[str, str | None],
) -> None:
    """One ledger: spend is what the usage costs. A decision with no estimate needs one
    nano-dollar of room under a limit, and keeps none of it."""
    with open_meter(url, Clock(NOW)) as m:
        o = org()
        m.set_spend_limit(o, 1)
        for _ in range(3):
            assert m.check(o, {}).allowed
            with m.reserve(o, {}):
                pass
        m.flush()
        assert m.quotas.spent(o) == 0
        m.debit(o, {}, cost="0.01")  # the limit reached: refused from now on, counting nothing
        assert m.check(o, {}).refused_by == "spend"
        m.flush()
        assert m.quotas.spent(o) == NANO // 100
        other = org()  # no limit: nothing is counted without an estimate
        assert m.check(other, {}).allowed and m.quotas.spent(other) == 0


def test_spend_goes_all_or_nothing_with_the_other_limits(url: tuple[str, str | None]) -> None:
    from meterkit import Plan

    with open_meter(url, Clock(NOW)) as m:
        o = org()
        m.set_plan(Plan("p", "P", limits={"queries": 2}))
        m.assign_plan(o, "p")
        m.set_spend_limit(o, 100)
        assert m.check(o, {"queries": 1}, cost="0.90").allowed
        # The spend fits, the queries do not: neither is counted.
        assert m.check(o, {"queries": 5}, cost="0.05").refused_by == "queries"
        assert m.quotas.spent(o) == to_nano(Decimal("0.90"))
        # The queries fit, the spend does not: neither is counted.
        assert m.check(o, {"queries": 1}, cost="0.20").refused_by == "spend"
        assert m.quotas.used(o, "queries") == 1


def test_reservations_hold_and_settle_to_the_actual_cost(url: tuple[str, str | None]) -> None:
    clock = Clock(NOW)
    with open_meter(url, clock) as m:
        o = org()
        m.set_spend_limit(o, 100)
        first = m.reserve(o, {}, cost="0.70")
        with pytest.raises(QuotaExceeded) as refused:
            m.reserve(o, {}, cost="0.40")  # the open reservation's estimate counts
        assert refused.value.decision.refused_by == "spend"
        assert m.spend(o).counted == Decimal("0.7")
        first.commit(cost="0.25")  # settled to what it really cost
        assert m.spend(o).counted == Decimal("0.25")
        second = m.reserve(o, {}, cost="0.70")
        second.release()
        assert m.spend(o).counted == Decimal("0.25")
        with m.reserve(o, {}, cost="0.30"):
            pass  # a context manager commits the estimate
        assert m.spend(o).counted == Decimal("0.55")
        held = m.reserve(o, {}, cost="0.10")
        with pytest.raises(ValidationError) as bad:
            held.commit(cost=0.1)
        assert bad.value.field == "cost" and not held.settled
        held.commit(cost="0.60")  # over the estimate: the real cost is counted
        assert m.spend(o).counted == Decimal("1.15")
        assert m.spend(o).enforcing


def test_recorded_events_count_at_their_price_and_feed_the_limit(
    url: tuple[str, str | None],
) -> None:
    with open_meter(url, Clock(NOW)) as m:
        o = org()
        price(m)  # $2.50 per million input tokens
        m.set_spend_limit(o, 100)
        record(m, o, 200_000)  # $0.50
        record(m, o, 200_000, t=MONTH_START - 10)  # last month: not this month's spend
        assert m.spend(o).counted == Decimal("0.5")
        assert m.check(o, {}, cost="0.50").allowed
        assert not m.check(o, {}, cost="0.01").allowed
        # Recorded usage is never refused: it happened. It takes spend past the limit.
        record(m, o, 4)
        assert m.spend(o).counted == Decimal("1.00001")
        assert m.check(o, {}).refused_by == "spend"


def test_spend_is_the_months_costs_whatever_path_the_usage_took(
    url: tuple[str, str | None],
) -> None:
    """$1 recorded, $1 reserved with a price and committed, $1 debited with a price: $3
    spent and $3 billed (spend was $3 and costs $1)."""
    with open_meter(url, Clock(NOW)) as m:
        o = org()
        price(m)  # $2.50 per million input tokens: $1 is 400,000
        m.set_spend_limit(o, 1000)
        dollar = {"completions": {"input_tokens": 400_000}}
        record(m, o, 400_000)
        m.reserve(o, {}, price=dollar).commit()
        m.debit(o, {}, price=dollar)
        m.flush()
        month = m.spend(o)
        costs = m.costs(
            organization_id=o, start_time=month.period_start, end_time=NOW + 1, limit=31
        )
        assert month.counted == costs.totals()["usd"] == Decimal(3)
        # A released reservation and a refused decision leave both alone.
        m.reserve(o, {}, price=dollar).release()
        assert not m.check(o, {}, price={"completions": {"input_tokens": 10**12}}).allowed
        m.flush()
        assert m.spend(o).counted == Decimal(3)


def test_a_price_set_after_the_usage_reprices_this_months_spend(
    url: tuple[str, str | None],
) -> None:
    """Usage recorded before any price, then a price effective from the start of time, then a
    version effective from mid-month: spend follows the costs each time, and the next
    process's rebuild agrees (spend was $0 while costs said $2)."""
    with open_meter(url, Clock(NOW)) as m:
        o = org()
        m.set_spend_limit(o, 1000)
        record(m, o, 400_000, t=MONTH_START + 60)
        record(m, o, 400_000, t=NOW - 60)
        record(m, o, 400_000, t=MONTH_START - 60)  # last month: not this month's spend
        m.flush()
        assert m.spend(o).counted == 0

        def costs() -> Decimal:
            page = m.costs(organization_id=o, start_time=MONTH_START, end_time=NOW + 1, limit=31)
            return page.totals().get("usd", Decimal(0))

        price(m)  # $2.50 per million, effective from the start of time
        assert m.spend(o).counted == costs() == Decimal(2)
        price(m, unit="5.00", effective_from=NOW - 3600)  # the second event's price doubles
        assert m.spend(o).counted == costs() == Decimal(3)
        record(m, o, 200_000)
        m.flush()
        assert m.spend(o).counted == costs() == Decimal(4)
        assert counter_differences(m, o) == {}
        assert rebuild_counters(m, o)[o]["spend"] == 4 * 10**9


def test_spend_given_in_dollars_is_billed_as_charges(url: tuple[str, str | None]) -> None:
    """``cost=`` in dollars, on every path that takes it: spend and costs agree (they
    disagreed by exactly these dollars), the dollars billed on the built-in charges line."""
    with open_meter(url, Clock(NOW)) as m:
        o = org()
        m.set_spend_limit(o, 1000)
        assert m.check(o, {}, cost=Decimal("0.25")).allowed
        m.reserve(o, {}, cost="0.50").commit(cost=Decimal("0.125"))
        m.reserve(o, {}, cost="0.05").commit()  # settled at the estimate
        m.debit(o, {}, cost=1)
        m.reserve(o, {}, cost="0.40").release()  # nothing happened: nothing billed
        m.flush()
        month = m.spend(o)
        costs = m.costs(
            organization_id=o,
            start_time=month.period_start,
            end_time=NOW + 1,
            limit=31,
            group_by=["line_item"],
        )
        assert month.counted == costs.totals()["usd"] == Decimal("1.425")
        items = {r.line_item for b in costs.data for r in b.results}
        assert items == {"charges"}
        assert [p for p in m.prices() if p.meter == "charges"] == []  # built in, not stored


def test_price_estimates_use_the_price_book(url: tuple[str, str | None]) -> None:
    with open_meter(url, Clock(NOW)) as m:
        o = org()
        price(m)
        price(m, "output_tokens", "10.00")
        m.set_spend_limit(o, 100)
        estimate = {"completions": {"input_tokens": 100_000, "output_tokens": 50_000}}
        decision = m.check(o, {}, price=estimate, dimensions={"model": "gpt-4o"})
        assert decision.allowed and m.spend(o).counted == Decimal("0.75")
        assert m.quotas.estimate(estimate, {}, NOW) == Decimal("0.75")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cost": 0.5}, "cost"),
        ({"cost": "-1"}, "cost"),
        ({"cost": "NaN"}, "cost"),
        ({"cost": Decimal("sNaN")}, "cost"),
        ({"cost": Decimal("Infinity")}, "cost"),
        ({"cost": "lots"}, "cost"),
        ({"cost": [1]}, "cost"),
        ({"cost": "1e30"}, "cost"),
        ({"cost": "1", "price": {"completions": {"input_tokens": 1}}}, "cost"),
        ({"price": {"nope": {"x": 1}}}, "price.nope"),
        ({"price": {"completions": {"nope": 1}}}, "price.completions.nope"),
        ({"price": {"completions": {"input_tokens": -1}}}, "price.completions.input_tokens"),
        ({"price": ["completions"]}, "price"),
    ],
)
def test_bad_estimates_are_refused_and_change_nothing(kwargs: dict[str, Any], field: str) -> None:
    with Meter("memory://", clock=Clock(NOW)) as m:
        m.set_spend_limit("org_a", 100)
        for call in (m.check, m.reserve, m.debit):
            with pytest.raises(ValidationError) as err:
                call("org_a", {"queries": 1}, **kwargs)
            assert err.value.field == field
        assert m.quotas.spent("org_a") == 0 and m.quotas.used("org_a", "queries") == 0
    with Meter("memory://") as m, pytest.raises(ValidationError) as err:
        m.check("org_a", {"spend": 5})
    assert err.value.field == "amounts.spend"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold_amount": 0}, "threshold_amount"),
        ({"threshold_amount": 1.5}, "threshold_amount"),
        ({"threshold_amount": True}, "threshold_amount"),
        ({"threshold_amount": 10**12}, "threshold_amount"),
        ({"threshold_amount": 5, "currency": "EUR"}, "currency"),
        ({"threshold_amount": 5, "interval": "week"}, "interval"),
    ],
)
def test_bad_limits_are_refused_and_change_nothing(kwargs: dict[str, Any], field: str) -> None:
    with Meter("memory://", clock=Clock(NOW)) as m:
        m.set_spend_limit("org_a", 100)
        with pytest.raises(ValidationError) as err:
            m.set_spend_limit("org_a", **kwargs)
        assert err.value.field == field
        limit = m.spend("org_a").limit
        assert limit is not None and limit.threshold_amount == 100


def test_threads_racing_one_limit_admit_exactly_it(url: tuple[str, str | None]) -> None:
    with open_meter(url, Clock(NOW)) as m:
        o = org()
        m.set_spend_limit(o, 100)  # $1.00: exactly 100 reservations of a cent
        admitted: list[int] = []
        lock = threading.Lock()
        barrier = threading.Barrier(8)

        def work() -> None:
            barrier.wait()
            for _ in range(20):
                try:
                    reservation = m.reserve(o, {}, cost="0.01")
                except QuotaExceeded:
                    continue
                reservation.commit()
                with lock:
                    admitted.append(1)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert len(admitted) == 100
        assert m.spend(o).counted == Decimal("1")


# -- spend from events against the costs engine ---------------------------------------------------

UNIT_PRICES = st.decimals(min_value=Decimal("0.001"), max_value=Decimal("50"), places=3)
EVENTS = st.lists(
    st.tuples(
        st.integers(0, 2_000_000),  # input tokens
        st.integers(0, 500_000),  # output tokens
        st.sampled_from(["gpt-4o", "gpt-4o-mini"]),
        st.integers(0, 40 * 86400),  # seconds after the month's start: some in the next one
    ),
    min_size=1,
    max_size=25,
)


@pytest.fixture(scope="module", params=["memory", "sqlite", "postgres"])
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    yield from services.store_urls(request.param, tmp_path_factory.mktemp("spend"), "spq")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prices=st.tuples(UNIT_PRICES, UNIT_PRICES), events=EVENTS, chunk=st.integers(1, 6))
def test_counted_spend_is_the_exact_cost_rounded_up_per_write(
    shared: str,
    prices: tuple[Decimal, Decimal],
    events: list[tuple[int, int, str, int]],
    chunk: int,
) -> None:
    clock = Clock(MONTH_START + 45 * 86400)
    with Meter(shared, clock=clock, max_future_skew=None) as m:
        o = org()
        for model, unit in zip(["gpt-4o", "gpt-4o-mini"], prices, strict=True):
            for measure, factor in (("input_tokens", 1), ("output_tokens", 4)):
                m.set_price(
                    {
                        "meter": "completions",
                        "measure": measure,
                        "unit_price": str(unit * factor),
                        "per": PER_M,
                        "line_item": f"{model} {measure}",
                        "quantity_unit": "tokens",
                        "where": {"model": model},
                    }
                )
        batch = [
            Event(
                f"e{i}",
                "completions",
                o,
                MONTH_START + at,
                {"input_tokens": tokens_in, "output_tokens": tokens_out, "num_model_requests": 1},
                {"model": model},
            )
            for i, (tokens_in, tokens_out, model, at) in enumerate(events)
        ]
        writes = [batch[i : i + chunk] for i in range(0, len(batch), chunk)]
        for write in writes:
            m.record_many(write)
        m.record_many(batch[:3])  # again: duplicates are not counted again
        for month_start, month_end in ((MONTH_START, NEXT_MONTH), (NEXT_MONTH, 1_769_904_000)):
            page = m.costs(organization_id=o, start_time=month_start, end_time=month_end, limit=31)
            exact = sum(page.totals().values(), Decimal(0))
            # Each write rounds its sum of the month up once.
            touched = sum(1 for w in writes if any(month_start <= e.time < month_end for e in w))
            counted = m.quotas.spent(o, month_start)
            assert exact * NANO <= counted <= exact * NANO + touched


# -- alerts ------------------------------------------------------------------------------------


class Fired:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, str | None]] = []

    @hookimpl
    def meterkit_quota_threshold(
        self, organization_id: str, metric: str, used: int, limit: int, alert: Any
    ) -> None:
        if alert is not None:
            self.calls.append((organization_id, used, limit, alert.id))


def test_alerts_fire_once_per_alert_and_month_across_processes(tmp_path: Path) -> None:
    clock = Clock(NOW)
    url = f"sqlite:///{tmp_path / 'a.db'}"
    fired_a, fired_b = Fired(), Fired()
    with (
        Meter(url, clock=clock, plugins=[fired_a]) as a,
        Meter(url, clock=clock, plugins=[fired_b]) as b,
    ):
        price(a)
        low = a.create_spend_alert("org_a", 50, ["ops@example.com"], id="spalert_low")
        high = a.create_spend_alert("org_a", 80, ["ops@example.com"], id="spalert_high")
        record(a, "org_a", 100_000)  # $0.25
        assert fired_a.calls == fired_b.calls == []
        record(b, "org_a", 100_000)  # $0.50: the low alert, in the meter that crossed it
        assert [c[3] for c in fired_b.calls] == ["spalert_low"]
        assert fired_b.calls[0][1:3] == (to_nano(Decimal("0.5")), low.threshold_nano)
        record(a, "org_a", 100_000)
        assert [c[3] for c in fired_a.calls] == []  # $0.75
        a.check("org_a", {}, cost="0.40")  # decisions cross alerts too: $1.15
        assert [c[3] for c in fired_a.calls] == ["spalert_high"]
        record(b, "org_a", 1_000_000)
        assert [c[3] for c in fired_b.calls] == ["spalert_low"]  # each fired once, in all
        # A new threshold may fire again this month; the next month starts over.
        a.put_spend_alert("org_a", high.id, {**_alert_fields(90)})
        record(a, "org_a", 1)
        assert [c[3] for c in fired_a.calls][-1] == "spalert_high"
        clock.t = NEXT_MONTH + 60
        before = len(fired_a.calls + fired_b.calls)
        record(a, "org_a", 400_000, t=NEXT_MONTH + 1)  # $1.00 in January
        assert len(fired_a.calls + fired_b.calls) == before + 2


def _alert_fields(cents: int) -> dict[str, Any]:
    return {
        "threshold_amount": cents,
        "currency": "USD",
        "interval": "month",
        "notification_channel": {"type": "email", "recipients": ["ops@example.com"]},
    }


def test_alert_crud_and_validation() -> None:
    with Meter("memory://", clock=Clock(NOW)) as m:
        alert = m.create_spend_alert("org_a", 500, ["a@example.com"], subject_prefix="[acme]")
        assert m.spend_alert("org_a", alert.id) == alert
        assert m.spend_alert("org_b", alert.id) is None  # another organization's
        assert alert.to_dict()["notification_channel"] == {
            "type": "email",
            "recipients": ["a@example.com"],
            "subject_prefix": "[acme]",
        }
        clock_later = m.put_spend_alert("org_a", alert.id, _alert_fields(700))
        assert clock_later.created_at == alert.created_at
        assert [a.threshold_amount for a in m.spend_alerts("org_a")] == [700]
        bad = [
            ({**_alert_fields(5), "threshold_amount": -5}, "threshold_amount"),
            (
                {**_alert_fields(5), "notification_channel": {"type": "sms"}},
                "notification_channel.type",
            ),
            (
                {**_alert_fields(5), "notification_channel": {"type": "email", "recipients": []}},
                "notification_channel.recipients",
            ),
            (
                {
                    **_alert_fields(5),
                    "notification_channel": {"type": "email", "recipients": ["not-an-address"]},
                },
                "notification_channel.recipients[0]",
            ),
            (
                {
                    **_alert_fields(5),
                    "notification_channel": {
                        "type": "email",
                        "recipients": ["a@example.com"],
                        "subject_prefix": "x\r\nBcc: evil@example.com",
                    },
                },
                "notification_channel.subject_prefix",
            ),
        ]
        for data, field in bad:
            with pytest.raises(ValidationError) as err:
                m.put_spend_alert("org_a", alert.id, data)
            assert err.value.field == field
        assert [a.threshold_amount for a in m.spend_alerts("org_a")] == [700]
        assert m.delete_spend_alert("org_a", alert.id) is True
        assert m.delete_spend_alert("org_a", alert.id) is False


# -- notifiers ---------------------------------------------------------------------------------


@pytest.fixture
def smtp() -> Iterator[tuple[SmtpSink, int]]:
    with smtp_server() as found:
        yield found


@pytest.fixture
def webhook() -> Iterator[Any]:
    with webhook_server() as server:
        yield server


def notice(subject_prefix: str | None = "[acme]") -> AlertNotice:
    alert = SpendAlert.from_record(
        "spalert_1",
        "org_a",
        {
            **_alert_fields(500),
            "notification_channel": {
                "type": "email",
                "recipients": ["a@example.com", "b@example.com"],
                "subject_prefix": subject_prefix,
            },
        },
    )
    return AlertNotice(alert, to_nano(Decimal("5.0312")), MONTH_START, NOW)


def test_email_is_delivered_to_a_real_smtp_server(smtp: tuple[SmtpSink, int]) -> None:
    sink, port = smtp
    EmailNotifier("127.0.0.1", "meterkit@example.com", port=port).deliver(notice())
    assert len(sink.messages) == 1
    envelope = sink.messages[0]
    assert envelope.mail_from == "meterkit@example.com"
    assert envelope.rcpt_tos == ["a@example.com", "b@example.com"]
    mail = email.message_from_bytes(envelope.content, policy=email.policy.default)
    subject = "[acme] Spend alert: org_a reached $5.00 this month ($5.03 so far)"
    assert mail["Subject"].strip() == subject
    assert mail["To"] == "a@example.com, b@example.com"
    assert "has spent $5.0312 USD this month" in mail.get_content()


def test_webhook_retries_with_backoff_and_signs_each_attempt(webhook: Any) -> None:
    webhook.statuses.extend([503, 500, 429])
    waits: list[float] = []
    url = webhook.url
    notifier = WebhookNotifier(
        url, "s3cret", backoff=0.5, clock=lambda: NOW, sleep=waits.append, allow_private=True
    )
    notifier.deliver(notice())
    assert waits == [0.5, 1.0, 2.0]
    assert len(webhook.received) == 4
    for attempt, (headers, body) in enumerate(webhook.received, start=1):
        assert headers["Meterkit-Delivery-Attempt"] == str(attempt)
        assert verify_signature("s3cret", headers["Meterkit-Signature"], body, now=NOW)
        assert not verify_signature("other", headers["Meterkit-Signature"], body, now=NOW)
        assert not verify_signature("s3cret", headers["Meterkit-Signature"], body + b" ", now=NOW)
        assert not verify_signature("s3cret", headers["Meterkit-Signature"], body, now=NOW + 301)
    payload = json.loads(webhook.received[-1][1])
    assert payload["spent"] == "5.0312" and payload["threshold"] == "5.00"
    assert payload["alert"]["id"] == "spalert_1"
    assert sign("k", 1, b"x") == sign("k", 1, b"x") != sign("k", 2, b"x")


def test_webhook_gives_up_after_its_retries_and_on_a_client_error(webhook: Any) -> None:
    url = webhook.url
    waits: list[float] = []
    webhook.statuses.extend([503] * 10)
    notifier = WebhookNotifier(
        url, "k", retries=2, clock=lambda: NOW, sleep=waits.append, allow_private=True
    )
    with pytest.raises(DeliveryFailed, match="3 attempts"):
        notifier.deliver(notice())
    assert waits == [0.5, 1.0]
    webhook.statuses[:] = [404]
    with pytest.raises(DeliveryFailed, match="404"):
        notifier.deliver(notice())
    with pytest.raises(ValidationError) as err:
        WebhookNotifier("ftp://x", "k")
    assert err.value.field == "url"


def test_a_webhook_into_the_servers_own_network_is_refused_unless_allowed(webhook: Any) -> None:
    for url in (
        "http://127.0.0.1:9/x",
        "http://10.1.2.3/x",
        "http://[::1]/x",
        "http://169.254.169.254/",
    ):
        with pytest.raises(ValidationError) as err:
            WebhookNotifier(url, "k")
        assert err.value.field == "url"
    by_name = webhook.url.replace("127.0.0.1", "localhost")
    notifier = WebhookNotifier(by_name, "k", clock=lambda: NOW, sleep=lambda s: None)
    with pytest.raises(DeliveryFailed, match="private address"):
        notifier.deliver(notice())
    assert webhook.received == []  # nothing was sent
    allowed = WebhookNotifier(by_name, "k", clock=lambda: NOW, allow_private=True)
    allowed.deliver(notice())
    assert len(webhook.received) == 1


def test_a_signature_verifies_against_any_secret_of_a_rotation() -> None:
    header = sign("new", NOW, b"body")
    assert verify_signature(["old", "new"], header, b"body", now=NOW)
    assert verify_signature(("new",), header, b"body", now=NOW)
    assert not verify_signature(["old", "older"], header, b"body", now=NOW)
    assert not verify_signature([], header, b"body", now=NOW)


@pytest.mark.parametrize("bad", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\r", "\n"])
def test_a_line_break_of_any_kind_is_refused_in_an_alerts_email_fields(bad: str) -> None:
    with Meter("memory://", clock=lambda: NOW) as m:
        with pytest.raises(ValidationError) as err:
            m.create_spend_alert("org_a", 10, [f"ops{bad}@example.com"])
        assert err.value.field == "notification_channel.recipients[0]"
        with pytest.raises(ValidationError) as err:
            m.create_spend_alert("org_a", 10, ["ops@example.com"], subject_prefix=f"[x{bad}y]")
        assert err.value.field == "notification_channel.subject_prefix"
        assert m.spend_alerts("org_a") == []


def test_an_organizations_alerts_are_capped() -> None:
    from meterkit.spend import MAX_ALERTS

    with Meter("memory://", clock=lambda: NOW) as m:
        for i in range(MAX_ALERTS):
            m.create_spend_alert("org_a", 10 + i, ["ops@example.com"], id=f"a{i}")
        with pytest.raises(ValidationError, match="at most"):
            m.create_spend_alert("org_a", 5, ["ops@example.com"])
        m.create_spend_alert("org_a", 7, ["ops@example.com"], id="a0")  # a replacement is fine
        assert len(m.spend_alerts("org_a")) == MAX_ALERTS


def test_a_fired_alert_reaches_every_notifier(
    smtp: tuple[SmtpSink, int], webhook: Any, tmp_path: Path
) -> None:
    sink, port = smtp
    url = webhook.url
    notifiers = [
        EmailNotifier("127.0.0.1", "meterkit@example.com", port=port),
        WebhookNotifier(url, "k", clock=lambda: NOW, sleep=lambda s: None, allow_private=True),
    ]
    webhook.statuses.append(503)  # the first attempt fails
    with Meter(f"sqlite:///{tmp_path / 'n.db'}", clock=Clock(NOW), notifiers=notifiers) as m:
        price(m)
        m.create_spend_alert("org_a", 10, ["ops@example.com"])
        record(m, "org_a", 40_000)  # $0.10
        record(m, "org_a", 40_000)  # no second alert this month
        assert m.outbox.drain(30)
        assert [n for n, _ in m.outbox.delivered] == ["EmailNotifier", "WebhookNotifier"]
    assert [e.rcpt_tos for e in sink.messages] == [["ops@example.com"]]
    assert len(webhook.received) == 2


def test_notifiers_from_the_configuration_file(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(
        'store = "memory://"\n'
        '[notify.email]\nhost = "127.0.0.1"\nport = 2525\nsender = "m@example.com"\n'
        '[notify.webhook]\nurl = "http://127.0.0.1:9/hook"\nsecret = "k"\nretries = 3\n'
        "allow_private = true\n"
        "[spend_limits]\norg_a = 5000\n"
    )
    config = load_config(path)
    email, hook = config.notifiers
    assert isinstance(email, EmailNotifier) and email.port == 2525
    assert isinstance(hook, WebhookNotifier) and hook.retries == 3
    with Meter.from_config(path, clock=Clock(NOW)) as m:
        limit = m.spend("org_a").limit
        assert limit is not None and limit.threshold_amount == 5000
        assert m.spend_cap("org_a") == 5000  # the file is the operator's: a cap
        assert not m.delete_spend_limit("org_a")  # nothing of the organization's own to lift
    for text, field in [
        ('[notify.email]\nsender = "m@example.com"\n', "notify.email.host"),
        ('[notify.email]\nhost = "h"\nsender = "s"\nport = "25"\n', "notify.email.port"),
        ('[notify.webhook]\nurl = "http://x"\n', "notify.webhook.secret"),
        ('[notify.webhook]\nurl = "http://x"\nsecret = "k"\nextra = 1\n', "notify.webhook.extra"),
        ("[notify.sms]\n", "notify.sms"),
        ("[spend_limits]\norg_a = 0\n", "spend_limits.org_a"),
    ]:
        path.write_text(text)
        with pytest.raises(ValidationError) as err:
            load_config(path)
        assert err.value.field == field


class Recorder:
    """A notifier that keeps what it was given (and fails while ``down``)."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.got: list[AlertNotice] = []

    def deliver(self, notice: AlertNotice) -> None:
        if self.down:
            raise ConnectionError("the receiver is down")
        self.got.append(notice)


class Pager(Recorder):
    pass


def test_undelivered_alerts_are_kept_and_delivered_by_the_next_process(tmp_path: Path) -> None:
    clock = Clock(NOW)
    url = f"sqlite:///{tmp_path / 'o.db'}"
    mail, pager = Recorder(), Pager(down=True)
    with Meter(url, clock=clock, notifiers=[mail, pager]) as a:
        price(a)
        alert = a.create_spend_alert("org_a", 10, ["ops@example.com"])
        record(a, "org_a", 40_000)  # $0.10: fires
        assert a.outbox.drain(30)
        assert len(mail.got) == 1 and pager.got == []
        assert len(a.outbox.pending()) == 1  # kept: the pager has not had it
    # The process is gone; the next one with notifiers finds the notice when it is due.
    mail_b, pager_b = Recorder(), Pager()
    with Meter(url, clock=clock, notifiers=[mail_b, pager_b]) as b:
        b.outbox.sweep()
        assert pager_b.got == []  # not due yet: the retry waits retry_after
        clock.t += 61
        # Due now: this sweep or the meter's own background one (whichever claims the
        # attempt) delivers it.
        b.outbox.sweep()
        deadline = time.monotonic() + 30
        while b.outbox.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.outbox.pending() == []
        assert [n.alert.id for n in pager_b.got] == [alert.id]
        assert mail_b.got == []  # the mail went out already: it is not sent twice
        b.outbox.sweep()
        assert len(pager_b.got) == 1


def test_an_alert_whose_write_rolled_back_is_not_delivered(tmp_path: Path) -> None:
    mail = Recorder()
    with Meter(f"sqlite:///{tmp_path / 'r.db'}", clock=Clock(NOW), notifiers=[mail]) as m:
        price(m)
        m.create_spend_alert("org_a", 10, ["ops@example.com"])
        with pytest.raises(RuntimeError), m.transaction():
            record(m, "org_a", 40_000)
            raise RuntimeError("the request failed")
        assert m.outbox.drain(30) and mail.got == [] and m.outbox.pending() == []
        record(m, "org_a", 40_000)  # the same usage again, for real: the alert fires now
        assert m.outbox.drain(30) and len(mail.got) == 1
