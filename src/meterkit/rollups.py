"""Rebuild a store's rollups from its events, and compare the two.

Rollups are kept by the store in the transaction that appends the events (see
:mod:`meterkit.engine.rollup`), so they never drift in normal operation. These are for what
normal operation does not cover: rollups suspected damaged, or written by a process that did
not keep them. :func:`rebuild` folds them anew, each meter in one transaction (queries keep
answering from the old rollups until it commits); :func:`verify` folds the events in memory and
lists every row where the store's rollups differ, changing nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from meterkit.engine import rollup
from meterkit.models import MeterSpec
from meterkit.stores.base import RollupStore, Store
from meterkit.validate import MAX_TIME

__all__ = ["Progress", "rebuild", "verify"]

Progress = Callable[[str, int], None]
"""``progress(meter, events_read)``, called as a rebuild reads each chunk of events."""


class Meter(Protocol):
    """What these functions use of :class:`meterkit.Meter`."""

    store: Store

    def spec(self, name: object, field: str = "meter") -> MeterSpec: ...

    def _ensure(self, spec: MeterSpec) -> None: ...

    def _sync(self) -> None: ...


def _specs(meter: Meter, names: Iterable[str] | None, all_names: Iterable[str]) -> list[MeterSpec]:
    if isinstance(names, str):
        names = [names]
    chosen = list(all_names) if names is None else list(names)
    return [meter.spec(name, "meters") for name in chosen]


def rebuild(
    meter: Meter,
    names: Iterable[str] | None,
    all_names: Iterable[str],
    progress: Progress | None = None,
) -> dict[str, int]:
    """Rebuild the rollups of the meters ``names`` (default: every meter); events read per
    meter. A meter with a ``unique_count`` measure keeps no rollups and reads 0."""
    store = meter.store
    if not isinstance(store, RollupStore):
        return {}
    meter._sync()
    out: dict[str, int] = {}
    for spec in _specs(meter, names, all_names):
        meter._ensure(spec)
        report = (lambda n, name=spec.name: progress(name, n)) if progress else None
        out[spec.name] = store.rebuild_rollups(spec, report)
    return out


def verify(meter: Meter, names: Iterable[str] | None, all_names: Iterable[str]) -> list[str]:
    """Every difference between the stored rollups and the events, one line each (none: they
    agree). Reads each organization's events of each meter into memory in turn."""
    store = meter.store
    if not isinstance(store, RollupStore):
        return []
    meter._sync()
    out: list[str] = []
    for spec in _specs(meter, names, all_names):
        if not rollup.rollable(spec):
            continue
        meter._ensure(spec)
        stored = {grain: store.rollup_rows(spec, grain) for grain in rollup.GRAINS}
        orgs = set(store.organizations(spec.name))
        orgs |= {key[0] for rows in stored.values() for key in rows}
        for org in sorted(orgs):
            folded = rollup.fold_grains(spec, store.scan(spec.name, org, 0, MAX_TIME + 1))
            for grain in rollup.GRAINS:
                want = rollup.named(spec, folded[grain])
                got = {k: v for k, v in stored[grain].items() if k[0] == org}
                out += rollup.differences(spec, grain, want, got)
    return out
