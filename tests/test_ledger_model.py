"""The ledger as a model: every way usage arrives, mixed, on every store, default leases.

A hypothesis ``RuleBasedStateMachine`` drives two meters on one store (two processes' views;
one on ``memory://``) through records, batches, ingest over HTTP, checks, reservations
committed or released, debits with a price or in dollars, requests through the guard, voided
and amended events, limit and price changes, flushes and a reopened meter, all at one
organization, and after every step holds the ledger's invariants:

- nothing is admitted past a limit: a decision admitted only while the usage counted so far
  (by the model: every event and debit) plus what it asks fits (the requests in flight are
  none here, each step being done before the next);
- once flushed, the quota counters equal a rebuild from the events (``counter_differences``);
- spend equals the month's costs, to the nano-dollar;
- nothing acknowledged is lost or counted twice: the events' totals are the model's.

``MK_MODEL_EXAMPLES`` sets the examples per store (default 8; the long mode runs thousands).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import services
from clock import TEST_NOW, Clock
from meterkit import Meter, Metric, Plan, QuotaExceeded, ValidationError
from meterkit.recovery import counter_differences

ORG = "org_model"
EXAMPLES = int(os.environ.get("MK_MODEL_EXAMPLES", "8"))
PER_M = 1_000_000
OUTPUT_PRICE = Decimal(10)  # dollars per million output tokens
RUN = uuid.uuid4().hex[:8]


PRICE = {
    "meter": "completions",
    "measure": "output_tokens",
    "unit_price": str(OUTPUT_PRICE),
    "per": PER_M,
    "line_item": "output",
    "quantity_unit": "tokens",
}


def cost_of(tokens: int, price: Decimal = OUTPUT_PRICE) -> Decimal:
    return price * tokens / PER_M


class Ledger(RuleBasedStateMachine):
    """Subclassed per store with ``url`` and ``counters``."""

    url: str = "memory://"
    counters: str | None = None
    processes = 2

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock(TEST_NOW)
        self.meters: list[Meter] = []
        self.tokens = 0  # every token counted by the model: recorded, debited, committed
        self.spent = Decimal(0)  # what those tokens cost
        self.limit = 0
        self.cap = 0  # the spend limit in cents
        self.n = 0
        self.completions: dict[str, int] = {}  # recorded completions events: id -> tokens
        self.price = OUTPUT_PRICE  # dollars per million output tokens, from now on
        self.priced_at: dict[str, Decimal] = {}  # each completions event's price (its time's)
        self.token = ""  # an admin key of the organization, for HTTP ingest

    def open(self) -> Meter:
        metric = Metric.parse("tokens", "completions.output_tokens")
        return Meter(self.url, clock=self.clock, counters=self.counters, metrics=[metric])

    @initialize(limit=st.integers(50, 5_000), cap=st.integers(1, 20))
    def start(self, limit: int, cap: int) -> None:
        n = 1 if self.url == "memory://" else self.processes
        self.meters = [self.open() for _ in range(n)]
        m = self.meters[0]
        m.set_price(PRICE)
        self.limit, self.cap = limit, cap
        m.set_plan(Plan("model", limits={"tokens": limit}))
        m.assign_plan(ORG, "model")
        m.set_spend_limit(ORG, cap)
        from meterkit.auth import create_key

        self.token = create_key(m, ORG, "admin", ["usage:read", "usage:write"])[0]

    def next_id(self) -> str:
        self.n += 1
        return f"e{self.n}"

    def counted(self, tokens: int, event_id: str | None = None) -> None:
        self.tokens += tokens
        self.spent += cost_of(tokens, self.price)
        if event_id is not None:
            self.priced_at[event_id] = self.price

    def fits(self, tokens: int, spend: Decimal) -> bool:
        """Whether a decision asking ``tokens`` (none: no token line) and ``spend`` (at least
        the one nano-dollar every decision needs under a spend limit) fits what is counted."""
        spend = max(spend, Decimal("1e-9"))
        if tokens and self.tokens + tokens > self.limit:
            return False
        return (self.spent + spend) * 100 <= self.cap

    # -- the ways usage arrives ---------------------------------------------------------------

    @rule(i=st.integers(0, 1), tokens=st.integers(1, 400))
    def record(self, i: int, tokens: int) -> None:
        m = self.meters[i % len(self.meters)]
        event_id = self.next_id()
        m.record("completions", {"output_tokens": tokens}, organization_id=ORG, id=event_id)
        self.completions[event_id] = tokens
        self.counted(tokens, event_id)

    @rule(i=st.integers(0, 1), sizes=st.lists(st.integers(1, 200), min_size=1, max_size=3))
    def ingest_over_http(self, i: int, sizes: list[int]) -> None:
        import json

        from meterkit.http.app import HttpApp
        from meterkit.http.core import Request

        m = self.meters[i % len(self.meters)]
        batch = [
            {
                "id": self.next_id(),
                "meter": "completions",
                "time": self.clock.t,
                "values": {"output_tokens": n},
            }
            for n in sizes
        ]
        headers = {"authorization": f"Bearer {self.token}", "content-type": "application/json"}
        body = json.dumps(batch + batch[:1]).encode()
        answer = HttpApp(m).handle(Request("POST", "/v1/events", (), headers, body))
        assert answer.status == 200
        for event, n in zip(batch, sizes):
            self.completions[event["id"]] = n
            self.counted(n, event["id"])

    @precondition(lambda self: self.completions)
    @rule(i=st.integers(0, 1), pick=st.integers(0, 10**6))
    def void_an_event(self, i: int, pick: int) -> None:
        m = self.meters[i % len(self.meters)]
        event_id = sorted(self.completions)[pick % len(self.completions)]
        m.void("completions", ORG, event_id, reason="model", actor="test")
        tokens = self.completions.pop(event_id)
        self.tokens -= tokens
        self.spent -= cost_of(tokens, self.priced_at[event_id])

    @precondition(lambda self: self.completions)
    @rule(i=st.integers(0, 1), pick=st.integers(0, 10**6), tokens=st.integers(1, 300))
    def amend_an_event(self, i: int, pick: int, tokens: int) -> None:
        m = self.meters[i % len(self.meters)]
        event_id = sorted(self.completions)[pick % len(self.completions)]

        def amend() -> None:
            m.amend(
                "completions",
                ORG,
                event_id,
                values={"output_tokens": tokens},
                reason="model",
                actor="test",
            )

        if self.completions[event_id] == tokens:
            with pytest.raises(ValidationError):  # an amendment that changes nothing
                amend()
            return
        amend()
        before = self.completions[event_id]
        self.completions[event_id] = tokens
        self.tokens += tokens - before
        price = self.priced_at[event_id]  # the event keeps its time, and so its price
        self.spent += cost_of(tokens, price) - cost_of(before, price)

    @rule(i=st.integers(0, 1), ask=st.integers(1, 50), used=st.integers(0, 80))
    def a_guarded_request(self, i: int, ask: int, used: int) -> None:
        """The guard's whole path: reserve the request's cost, run it, settle it to what the
        endpoint reported, record the request."""
        from meterkit.http.metering import Metering, Ticket

        m = self.meters[i % len(self.meters)]
        guard: Metering[str] = Metering(
            m, authorization=lambda token: f"Bearer {token}", cost={"tokens": ask}
        )
        fits = self.fits(ask, Decimal(0))
        ticket = guard.begin(self.token, method="GET", path="/work")
        assert isinstance(ticket, Ticket) == fits
        if isinstance(ticket, Ticket):
            if used:
                ticket.usage.add(tokens=used)
            guard.finish(ticket, status=200, method="GET", route="/work")
            self.tokens += used if used else ask

    @rule(i=st.integers(0, 1), sizes=st.lists(st.integers(1, 200), min_size=1, max_size=4))
    def record_many(self, i: int, sizes: list[int]) -> None:
        from meterkit import Event

        m = self.meters[i % len(self.meters)]
        events = [
            Event(self.next_id(), "completions", ORG, self.clock.t, {"output_tokens": n})
            for n in sizes
        ]
        result = m.record_many(events + events[:1])  # one sent twice: a duplicate
        assert result.accepted == len(sizes) and result.duplicates == 1
        for event, n in zip(events, sizes):
            self.completions[event.id] = n
            self.counted(n, event.id)

    @rule(i=st.integers(0, 1), ask=st.integers(1, 50), then=st.integers(0, 300))
    def check_then_record(self, i: int, ask: int, then: int) -> None:
        m = self.meters[i % len(self.meters)]
        decision = m.check(ORG, {"tokens": ask})
        if not decision.allowed:
            return
        # Admitted: what was counted so far plus what it asks fits every limit.
        assert self.fits(ask, Decimal(0)), (self.tokens, ask, self.limit, self.spent)
        self.tokens += ask  # the check debits its tokens: an event no price bills
        if then:
            m.record("completions", {"output_tokens": then}, organization_id=ORG, id=self.next_id())
            self.counted(then)

    @rule(i=st.integers(0, 1), held=st.integers(1, 50), used=st.integers(0, 80))
    def reserve_and_commit(self, i: int, held: int, used: int) -> None:
        from meterkit import QuotaExceeded

        m = self.meters[i % len(self.meters)]
        try:
            reservation = m.reserve(ORG, {"tokens": held})
        except QuotaExceeded:
            return
        assert self.fits(held, Decimal(0))
        reservation.commit({"tokens": used})
        self.tokens += used  # an event of the tokens meter, which no price bills

    @rule(i=st.integers(0, 1), held=st.integers(1, 50))
    def reserve_and_release(self, i: int, held: int) -> None:
        m = self.meters[i % len(self.meters)]
        with contextlib.suppress(QuotaExceeded):
            m.reserve(ORG, {"tokens": held}).release()

    @rule(i=st.integers(0, 1), tokens=st.integers(1, 300))
    def reserve_with_a_price(self, i: int, tokens: int) -> None:
        from meterkit import QuotaExceeded

        m = self.meters[i % len(self.meters)]
        price = {"completions": {"output_tokens": tokens}}
        try:
            reservation = m.reserve(ORG, {}, price=price)
        except QuotaExceeded:
            return
        assert self.fits(0, cost_of(tokens, self.price))
        reservation.commit()
        self.counted(tokens)  # its priced event: spend, and the tokens metric it feeds

    @rule(i=st.integers(0, 1), tokens=st.integers(1, 300))
    def debit_with_a_price(self, i: int, tokens: int) -> None:
        m = self.meters[i % len(self.meters)]
        m.debit(ORG, {}, price={"completions": {"output_tokens": tokens}})
        self.counted(tokens)  # never refused: it happened

    @rule(i=st.integers(0, 1), tokens=st.integers(1, 300))
    def debit_in_dollars(self, i: int, tokens: int) -> None:
        m = self.meters[i % len(self.meters)]
        m.debit(ORG, {}, cost=cost_of(tokens))  # billed as charges, not tokens
        self.spent += cost_of(tokens)

    @rule(i=st.integers(0, 1))
    def check_spend(self, i: int) -> None:
        m = self.meters[i % len(self.meters)]
        if m.check(ORG, {}).allowed:
            assert self.fits(0, Decimal(0))

    # -- changes and restarts -----------------------------------------------------------------

    @rule(limit=st.integers(50, 5_000))
    def change_the_plan(self, limit: int) -> None:
        self.meters[0].set_plan(Plan("model", limits={"tokens": limit}))
        self.limit = limit
        for m in self.meters[1:]:
            m.quotas.forget()  # another process sees it within cache_seconds; here at once

    @rule(price=st.sampled_from([Decimal(3), Decimal(10), Decimal(25)]))
    def change_the_price(self, price: Decimal) -> None:
        """A new version of the output price, from the next second on: what was recorded
        keeps its price, what comes is billed and counted at the new one."""
        if self.clock.t + 1 >= self.meters[0].spend(ORG).period_end:
            return
        self.clock.t += 1
        self.meters[0].set_price(
            {**PRICE, "unit_price": str(price), "effective_from": self.clock.t}
        )
        self.price = price
        for m in self.meters[1:]:
            m.quotas.forget()  # another process sees it within cache_seconds; here at once

    @rule(cap=st.integers(1, 20))
    def change_the_spend_limit(self, cap: int) -> None:
        self.meters[0].set_spend_limit(ORG, cap)
        self.cap = cap
        for m in self.meters[1:]:
            m.quotas.forget()

    @rule(i=st.integers(0, 1))
    def flush(self, i: int) -> None:
        self.meters[i % len(self.meters)].flush()

    @precondition(lambda self: self.url != "memory://")
    @rule(i=st.integers(0, 1))
    def restart(self, i: int) -> None:
        i %= len(self.meters)
        self.meters[i].close()
        self.meters[i] = self.open()

    @rule(seconds=st.integers(1, 120))
    def time_passes(self, seconds: int) -> None:
        # Within the month: the model counts one period.
        if self.clock.t + seconds < self.meters[0].spend(ORG).period_end:
            self.clock.t += seconds

    # -- the ledger ---------------------------------------------------------------------------

    @invariant()
    def counters_are_the_events(self) -> None:
        if not self.meters:
            return
        for m in self.meters:
            m.flush()
        m = self.meters[0]
        assert counter_differences(m, ORG) == {}
        assert m.quotas.used(ORG, "tokens") == self.tokens
        month = m.spend(ORG)
        costs = m.costs(
            organization_id=ORG, start_time=month.period_start, end_time=self.clock.t + 1, limit=31
        )
        assert month.counted == costs.totals().get("usd", Decimal(0)) == self.spent

    def teardown(self) -> None:
        for m in self.meters:
            m.close()


@pytest.fixture(params=["memory", "sqlite", "postgres", "postgres+redis"])
def ledger_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    if request.param == "memory":
        yield "memory://", None
        return
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}", None
        return
    base = services.postgres_url()
    redis = services.redis_url() if request.param == "postgres+redis" else None
    yield base, redis
    services.drop_schemas(base, f"mk_m{RUN}")
    if redis is not None:
        services.clear_redis(redis, f"mkm{RUN}")


def test_the_ledger_holds_for_every_way_usage_arrives(
    ledger_store: tuple[str, Any], tmp_path: Path
) -> None:
    url, counters = ledger_store
    examples = iter(range(10**9))

    class OnStore(Ledger):
        def __init__(self) -> None:
            # A fresh store per example: the model starts from nothing.
            n = next(examples)
            if url.startswith("sqlite"):
                self.url = f"sqlite:///{tmp_path / f'ledger{n}.db'}"
            elif url.startswith("postgresql"):
                self.url = services.with_params(url, schema=f"mk_m{RUN}_{n}")
            else:
                self.url = url
            self.counters = (
                None if counters is None else services.with_params(counters, prefix=f"mkm{RUN}{n}:")
            )
            super().__init__()

    OnStore.TestCase.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    OnStore.TestCase().runTest()
