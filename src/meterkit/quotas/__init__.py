"""Quota decisions: plan limits, rate limits and spend limits, checked and debited atomically
before a request.

The rooms, each a module of this package:

- :mod:`~meterkit.quotas.book`: the organization's records (plans, assignments, grants, plan
  metrics, spend limits and alerts, prices), cached;
- :mod:`~meterkit.quotas.limits`: an organization's limits compiled into counter lines;
- :mod:`~meterkit.quotas.decide`: check, reserve, debit;
- :mod:`~meterkit.quotas.leases`: quota leased to this process and decided in memory;
- :mod:`~meterkit.quotas.settle`: decisions' events, reservations settled;
- :mod:`~meterkit.quotas.counting`: the counters fed by what is recorded (the recorder's
  listener);
- :mod:`~meterkit.quotas.thresholds`: thresholds and spend alerts, told once.

:class:`Quotas` composes them for one :class:`~meterkit.Meter`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from meterkit import pricing
from meterkit import spend as spend_module
from meterkit.errors import ValidationError
from meterkit.pricing import Price
from meterkit.quotas.book import Book
from meterkit.quotas.counting import Counting
from meterkit.quotas.decide import Decider
from meterkit.quotas.decision import (
    RATE_WINDOWS,
    Decision,
    LimitState,
    Policy,
    check_amounts,
    check_count,
    check_org,
    check_ttl,
)
from meterkit.quotas.leases import DEFAULT_TTL, Leases
from meterkit.quotas.limits import Limits
from meterkit.quotas.settle import Reservation, Settler
from meterkit.quotas.thresholds import (
    SpendAlertFired,
    ThresholdReached,
    Thresholds,
    ignore_alert,
    ignore_threshold,
)
from meterkit.spend import SpendState
from meterkit.validate import check_id, check_time

if TYPE_CHECKING:
    from meterkit.recorder import Recorder
    from meterkit.registry import Registry
    from meterkit.stores.base import CounterStore

__all__ = [
    "RATE_WINDOWS",
    "Decision",
    "LimitState",
    "Policy",
    "Quotas",
    "Reservation",
    "check_amounts",
    "check_count",
    "check_org",
    "check_ttl",
]


class Quotas:
    """Plans, limits, decisions and settles for one :class:`~meterkit.Meter`.

    Its parts are public: ``book``, ``limits``, ``counting``, ``watch`` (thresholds), ``settler``,
    ``decider``, ``leases``; the calls below are theirs, named once here for the meter.
    """

    period_key = staticmethod(Limits.period_key)
    gauge_key = staticmethod(Limits.gauge_key)

    def __init__(
        self,
        recorder: Recorder,
        registry: Registry,
        counters: CounterStore,
        *,
        threshold_reached: ThresholdReached = ignore_threshold,
        spend_alert_fired: SpendAlertFired = ignore_alert,
        policy: Policy = "closed",
        thresholds: Sequence[float] = (0.8, 1.0),
        cache_seconds: float = 1.0,
        record_debits: bool = True,
        default_plan: str | None = None,
        leases: bool = False,
        lease_ttl: int = DEFAULT_TTL,
    ) -> None:
        if policy not in ("closed", "open"):
            raise ValidationError("policy", "must be 'closed' or 'open'")
        self.recorder = recorder
        self.registry = registry
        self.store = recorder.store
        self.counters: Any = counters
        """Where quota counters live: the store itself, or ``Meter(counters=...)``."""
        self._policy: Policy = policy
        shared = bool(getattr(counters, "shared", True))
        self.all_in_memory = not recorder.capabilities.shared and not shared
        """Plans, counters and events all live in this process (``memory://``): deciding and
        settling never wait on I/O."""
        self.leases: Leases | None = Leases(counters, ttl=lease_ttl) if leases else None
        self.book = Book(recorder, registry, cache_seconds=cache_seconds, default_plan=default_plan)
        self.limits = Limits(self.book, shared=shared)
        self.counting = Counting(recorder, self.book, self.limits, counters, self.leases)
        self.countlog = self.counting.countlog
        self.watch = Thresholds(
            recorder,
            self.book,
            self.limits,
            counters,
            thresholds=thresholds,
            threshold_reached=threshold_reached,
            spend_alert_fired=spend_alert_fired,
        )
        self.counting.thresholds = self.watch
        self.settler = Settler(
            recorder,
            self.book,
            self.limits,
            self.counting,
            self.watch,
            policy=policy,
            record_debits=record_debits,
        )
        self.decider = Decider(
            recorder,
            self.book,
            self.limits,
            self.counting,
            self.watch,
            self.settler,
            policy=policy,
        )
        recorder.counting = self.counting
        registry.on_change(self.book.forget)  # compiled limits know which metrics are gauges

        book, limits, counting, decider, settler = (
            self.book,
            self.limits,
            self.counting,
            self.decider,
            self.settler,
        )
        # The book: plans, assignments, grants, metrics, spend, prices.
        self.metrics = book.metrics
        self.metric_sources = book.metric_sources
        self.meters_counted = book.meters_counted
        self.publish_metric = book.publish_metric
        self.store_metric = book.store_metric
        self.read_metrics = book.read_metrics
        self.check_plan_metrics = book.check_plan_metrics
        self.set_plan = book.set_plan
        self.get_plan = book.get_plan
        self.plans = book.plans
        self.assign = book.assign
        self.grant = book.grant
        self.grants = book.grants
        self.plan_of = book.plan_of
        self.forget = book.forget
        self.spending = book.spending
        self.price_book = book.price_book
        self.estimate = book.estimate
        self.spend_nano = book.spend_nano
        self.cycle = book.cycle
        self.period = book.period
        self.is_gauge = book.is_gauge
        # Compiled limits and their keys.
        self.limit_for = limits.limit_for
        self.compiled = limits.compiled
        self.spend_key = limits.spend_key
        # The counters.
        self.feed = counting.feed
        self.recount = counting.recount
        self.absorbing = counting.absorbing
        self.spend_from = counting.spend_from
        self.reprice = counting.reprice
        self.spent = counting.spent
        # Decisions and settles.
        self.check = decider.check
        self.reserve = decider.reserve
        self.debit = decider.debit
        self.set_gauge = decider.set_gauge
        self.used = decider.used
        self.decide_local = decider.decide_local
        self.no_io = settler.no_io

    def set_price(self, price: Price | Mapping[str, Any]) -> Price:
        """Add or replace a price version (kept by the store); spend follows the new prices."""
        specs = self.registry.specs
        if isinstance(price, Mapping):
            price = pricing.price_from_dict(price, specs)
        self.recorder.flush()  # what was recorded at the old prices is in the events
        before = self.book.stored_book()  # as stored now, not as cached
        saved = pricing.save_price(self.store, price, specs=specs)
        self.book.forget()  # spend is counted at the new prices from now on
        # and this month's events so far are repriced, so spend keeps equal to the costs.
        self.counting.reprice(before, saved.meter)
        return saved

    def spend_state(self, organization_id: str, at: int | None = None) -> SpendState:
        """Month-to-date counted spend (open reservations' estimates included) and the limit."""
        org = check_id("organization_id", organization_id)
        now = self.recorder.now() if at is None else check_time("at", at)
        self.recorder.flush()  # decisions made here and not reported yet count
        month = pricing.default_period_of(now)
        nano = self.counting.spent(org, now)
        limit = spend_module.read_limit(self.store, org)
        return SpendState(org, month.start, month.end, spend_module.nano_to_usd(nano), limit)

    @property
    def cache_seconds(self) -> float:
        """How long plans, limits, spend limits and prices read from the store are kept."""
        return self.book.cache_seconds

    @property
    def default_plan(self) -> str | None:
        """The plan of an organization assigned none."""
        return self.book.default_plan

    @property
    def record_debits(self) -> bool:
        """Whether decisions record what they admit as events."""
        return self.settler.record_debits

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The shares of a limit at which ``meterkit_quota_threshold`` is told."""
        return self.watch.thresholds

    @property
    def policy(self) -> Policy:
        """``"closed"``: refuse when the store cannot answer; ``"open"``: admit, uncounted."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        if policy not in ("closed", "open"):
            raise ValidationError("policy", "must be 'closed' or 'open'")
        self._policy = self.decider.policy = self.settler.policy = policy

    @property
    def in_no_io(self) -> bool:
        """Whether this thread is inside :meth:`no_io` (settling on an event loop)."""
        return self.settler.in_no_io
