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
