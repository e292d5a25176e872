"""Thresholds: told once when usage reaches a share of a limit, and spend alerts.

A threshold of a period quota is claimed once for ever (a marker counter, ``claim_once``) by
whichever process reaches it first; a gauge's marker may expire. Observers are told after the
decision's transaction commits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from meterkit.models import CounterResult
from meterkit.periods import Period
from meterkit.quotas.book import Book
from meterkit.quotas.limits import Limits, Line
from meterkit.spend import SPEND, SpendAlert

if TYPE_CHECKING:
    from meterkit.recorder import Recorder
    from meterkit.stores.base import CounterStore

__all__ = ["SpendAlertFired", "ThresholdReached", "Thresholds"]


class ThresholdReached(Protocol):
    """Told once when usage reaches a threshold of a limit (the threshold hook)."""

    def __call__(
        self,
        *,
        organization_id: str,
        metric: str,
        threshold: float,
        used: int,
        limit: int,
        period_start: int | None,
        alert: SpendAlert | None,
    ) -> object: ...


SpendAlertFired = Callable[[SpendAlert, int, int], object]
"""Told once when a spend alert fires: ``(alert, used nano-dollars, month start)``."""


def ignore_threshold(**_: object) -> None:
    return None


def ignore_alert(alert: SpendAlert, used: int, period_start: int) -> None:
    return None


class Thresholds:
    """Claims each threshold once and tells ``threshold_reached`` / ``spend_alert_fired``."""

    def __init__(
        self,
        recorder: Recorder,
        book: Book,
        limits: Limits,
        counters: CounterStore,
        *,
        thresholds: Sequence[float] = (0.8, 1.0),
        threshold_reached: ThresholdReached = ignore_threshold,
        spend_alert_fired: SpendAlertFired = ignore_alert,
    ) -> None:
        self.recorder = recorder
        self.book = book
        self.limits = limits
        self.counters = counters
        self.thresholds = tuple(sorted(thresholds))
        self.threshold_reached = threshold_reached
        self.spend_alert_fired = spend_alert_fired
        # Threshold markers this process has claimed (or seen claimed): asked of the store once.
        self._claimed: set[str] = set()

    def soon(self, org: str, lines: Sequence[Line], used: Mapping[str, int], local: bool) -> None:
        """Thresholds now, or (``local``, on an event loop) at the next flush, and only when
        one can be reached: claiming a threshold asks the store."""
        if not local:
            self.reached(org, lines, used)
        elif self.near(org, lines, used):
            self.recorder.defer(lambda: self.reached(org, lines, used))

    def near(self, org: str, lines: Sequence[Line], used: Mapping[str, int]) -> bool:
        """Whether any limited line reached the lowest threshold (only then can one fire)."""
        compiled = self.limits.cached(org)
        alerts = compiled.alerts if compiled is not None else ()
        if alerts and used.get(SPEND, -1) >= alerts[0].threshold_nano:
            return True
        if not self.thresholds:
            return False
        lowest = self.thresholds[0]
        for line in lines:
            limit = line.counter.limit
            if not line.window and limit and used.get(line.metric, 0) >= lowest * limit:
                return True
        return False

    def from_result(self, org: str, lines: Sequence[Line], result: CounterResult) -> None:
        self.reached(org, lines, {ln.metric: u for ln, u in zip(lines, result.used)})

    def reached(self, org: str, lines: Sequence[Line], used: Mapping[str, int]) -> None:
        for line in lines:
            if line.metric == SPEND and line.period is not None:
                compiled = self.limits.cached(org)
                alerts = compiled.alerts if compiled is not None else self.book.spending(org)[1]
                spent = used.get(SPEND, 0)
                if alerts and spent >= alerts[0].threshold_nano:
                    self.alert(org, alerts, spent, line.period)
            limit = line.counter.limit
            if line.window or limit is None or limit <= 0:
                continue
            value = used.get(line.metric, 0)
            for threshold in self.thresholds:
                if value < threshold * limit:
                    break
                scope = line.period.start if line.period else "gauge"
                marker = f"t\x1f{org}\x1f{line.metric}\x1f{scope}\x1f{threshold}"
                if line.period is not None and marker in self._claimed:
                    continue  # a period's marker is claimed once for ever; a gauge's may expire
                claimed = self.counters.claim_once(
                    marker,
                    now=self.recorder.now(),
                    expires_at=line.period.end if line.period else None,
                )
                if line.period is not None:
                    # Ours once the claim commits (a rolled-back one may be made again);
                    # another process's at once.
                    if claimed:
                        self.recorder.notify(functools.partial(self.remember_claim, marker))
                    else:
                        self.remember_claim(marker)
                if claimed:
                    self.recorder.notify(
                        functools.partial(
                            self.threshold_reached,
                            organization_id=org,
                            metric=line.metric,
                            threshold=threshold,
                            used=value,
                            limit=limit,
                            period_start=line.period.start if line.period else None,
                            alert=None,
                        )
                    )

    def alert(self, org: str, alerts: Sequence[SpendAlert], used: int, month: Period) -> None:
        """Fire each alert reached by ``used`` nano-dollars, once per alert and month."""
        for alert in alerts:
            if used < alert.threshold_nano:
                break
            # An alert whose threshold is changed may fire again at the new one.
            marker = f"sa\x1f{org}\x1f{alert.id}\x1f{alert.threshold_amount}\x1f{month.start}"
            if marker in self._claimed:
                continue
            claimed = self.counters.claim_once(marker, now=self.recorder.now(), expires_at=None)
            if not claimed:
                self.remember_claim(marker)  # another process's: never ours to fire
                continue
            # Remembered once the claim commits: a rolled-back claim may be made again.
            self.recorder.notify(functools.partial(self.remember_claim, marker))
            self.recorder.notify(
                functools.partial(self.spend_alert_fired, alert, used, month.start)
            )

    def remember_claim(self, marker: str) -> None:
        if len(self._claimed) > 100_000:
            self._claimed.clear()
        self._claimed.add(marker)
