"""Rebuild a store's rollups from its events, and compare the two.

Rollups are kept by the store in the transaction that appends the events (see
:mod:`meterkit.engine.rollup`), so they never drift in normal operation. These are for what
normal operation does not cover: rollups suspected damaged, or written by a process that did
not keep them. :func:`rebuild` folds them anew, each meter in one transaction (queries keep
answering from the old rollups until it commits); :func:`verify` folds the events in memory and
lists every row where the store's rollups differ, changing nothing. :func:`prune` drops the raw
events and minute rollups that a meter's retention no longer keeps (see
:mod:`meterkit.retention`); both of the others then start at the day it dropped up to, as the
hour and day rollups before it are all that is left of those events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from meterkit import retention
from meterkit.engine import rollup
from meterkit.models import MeterSpec
from meterkit.stores.base import RollupStore, Store
from meterkit.validate import MAX_TIME

__all__ = ["Progress", "prune", "pruned_before", "rebuild", "verify"]

Progress = Callable[[str, int], None]
"""``progress(meter, events_read)``, called as a rebuild reads each chunk of events."""


class Meter(Protocol):
    """What these functions use of :class:`meterkit.Meter`."""

    store: Store

    def spec(self, name: object, field: str = "meter") -> MeterSpec: ...

    def sync(self) -> None: ...

    def now(self) -> int: ...


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
    meter.sync()
    out: dict[str, int] = {}
    for spec in _specs(meter, names, all_names):
        store.ensure_meter(spec)
        report = (lambda n, name=spec.name: progress(name, n)) if progress else None
        out[spec.name] = store.rebuild_rollups(spec, report, since=pruned_before(store, spec.name))
    return out


def verify(meter: Meter, names: Iterable[str] | None, all_names: Iterable[str]) -> list[str]:
    """Every difference between the stored rollups and the events, one line each (none: they
    agree). Reads each organization's events of each meter into memory in turn."""
    store = meter.store
    if not isinstance(store, RollupStore):
        return []
    meter.sync()
    out: list[str] = []
    for spec in _specs(meter, names, all_names):
        if not rollup.rollable(spec):
            continue
        store.ensure_meter(spec)
        since = pruned_before(store, spec.name)
        stored = {
            grain: {k: v for k, v in store.rollup_rows(spec, grain).items() if k[1] >= since}
            for grain in rollup.GRAINS
        }
        orgs = set(store.organizations(spec.name))
        orgs |= {key[0] for rows in stored.values() for key in rows}
        for org in sorted(orgs):
            folded = rollup.fold_grains(spec, store.scan(spec.name, org, since, MAX_TIME + 1))
            for grain in rollup.GRAINS:
                want = rollup.named(spec, folded[grain])
                got = {k: v for k, v in stored[grain].items() if k[0] == org}
                out += rollup.differences(spec, grain, want, got)
    return out


def pruned_before(store: Store, meter: str) -> int:
    """The day before which ``meter``'s raw events were dropped (0: none were)."""
    found = store.get_record(retention.PRUNED, meter)
    before = found.get("before") if found else None
    return before if isinstance(before, int) and not isinstance(before, bool) else 0


def prune(
    meter: Meter,
    names: Iterable[str] | str | None,
    all_names: Iterable[str],
    days: Mapping[str, int],
) -> dict[str, int]:
    """Drop what the retention of each meter of ``names`` (default: every meter with one) no
    longer keeps; events dropped per meter. A meter without rollups (a ``unique_count``
    measure) keeps its events: only they answer its queries, which before the retained window
    fail anyway. ``{}`` when the store keeps no rollups."""
    store = meter.store
    if not isinstance(store, RollupStore):
        return {}
    meter.sync()
    out: dict[str, int] = {}
    now = meter.now()
    for spec in _specs(meter, names, all_names):
        kept = days.get(spec.name)
        if kept is None or not rollup.rollable(spec):
            out[spec.name] = 0
            continue
        store.ensure_meter(spec)
        before = retention.prune_before(now, kept)
        # Recorded first: verify and rebuild then never read a day that is half dropped.
        if before > pruned_before(store, spec.name):
            store.put_record(retention.PRUNED, spec.name, {"before": before})
        out[spec.name] = store.drop_events_before(spec, before)
    return out
