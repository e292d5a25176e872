"""Plugin hook specifications. Every hook here has a docstring and a test (tests/test_hooks.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from meterkit.models import Event, MeterSpec

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("meterkit")
hookimpl = pluggy.HookimplMarker("meterkit")


@hookspec(firstresult=True)
def meterkit_open_store(url: str, scheme: str) -> Any:
    """Open a store for ``url`` and return it, or return ``None`` if ``scheme`` is not yours.

    ``scheme`` is the part of ``url`` before ``://`` (``sqlite``, ``memory``, ``postgresql``).
    The first plugin to return a store wins. The store implements
    :class:`meterkit.stores.Store`; run :mod:`meterkit.testing` against it.
    """


@hookspec(firstresult=True)
def meterkit_open_counters(url: str, scheme: str) -> Any:
    """Open a counters-only backend for ``url`` (``Meter(..., counters=url)``), or ``None``.

    The backend implements :class:`meterkit.stores.base.CounterStore`: the atomic quota
    counters, kept apart from the event store (Redis, for hot counters). When no plugin
    answers, any store URL is opened with :func:`meterkit_open_store` and its counters used.
    """


@hookspec
def meterkit_store_schemes() -> list[str]:  # type: ignore[empty-body]
    """Return the URL schemes your stores answer to, so errors can list what is available."""


@hookspec
def meterkit_register_meters() -> list[MeterSpec]:  # type: ignore[empty-body]
    """Return :class:`~meterkit.MeterSpec` objects to add to every :class:`~meterkit.Meter`."""


@hookspec
def meterkit_events_recorded(meter: Any, events: tuple[Event, ...]) -> None:
    """Observe events once they are durably stored.

    Called after each successful ``record`` / ``record_many`` with only the *new* events
    (duplicates are left out), in the order given. ``meter`` is the :class:`~meterkit.Meter`.
    An exception raised here propagates to the caller, but the events stay stored.
    """


@hookspec
def meterkit_quota_threshold(
    meter: Any,
    organization_id: str,
    metric: str,
    threshold: float,
    used: int,
    limit: int,
    period_start: int | None,
    alert: Any,
) -> None:
    """Be told that an organization's usage of ``metric`` reached ``threshold`` of its limit.

    Thresholds are fractions (``0.8`` and ``1.0`` by default; ``Meter(thresholds=...)``).
    Each fires at most once per organization, metric and billing period (``period_start``;
    ``None`` for gauges such as ``storage_bytes``), even with many processes sharing a store.

    A spend alert (:mod:`meterkit.spend`) fires it too, once per alert and month: ``metric``
    is ``"spend"``, ``threshold`` ``1.0``, ``used`` and ``limit`` are nano-dollars (the
    month's counted spend and the alert's amount) and ``alert`` is the
    :class:`~meterkit.spend.SpendAlert`; ``alert`` is ``None`` for every other threshold.
    """


@hookspec(firstresult=True)
def meterkit_stored_assets(meter: Any, organization_id: str) -> Any:
    """Return the organization's real stored assets as ``{resource: bytes}``, or ``None``.

    Used by storage recalculation (``Meter.recalculate_storage`` and the operation
    ``usage.recalculate_storage``) to replace the counted ``storage_bytes`` with the truth.
    The first plugin that returns a mapping wins; when none does, the asset registry
    (:mod:`meterkit.assets`) answers.
    """


@hookspec(firstresult=True)
def meterkit_authenticate(meter: Any, token: str) -> Any:
    """Return a :class:`meterkit.auth.Principal` for a bearer ``token`` you recognise, or ``None``.

    Asked by :func:`meterkit.auth.authenticate` (and so by every HTTP surface) before
    meterkit's own API keys are checked, so an application can let its own sessions or tokens
    read usage. The first plugin to return a principal wins; return ``None`` to leave the
    token to other plugins and to meterkit's keys. ``meter`` is the :class:`~meterkit.Meter`.
    """
