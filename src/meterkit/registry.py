"""The meters and plan metrics one :class:`~meterkit.Meter` knows, and their tables."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from meterkit.catalog import builtin_meters
from meterkit.errors import ValidationError
from meterkit.models import NAME_RE, Event, Measure, MeterSpec
from meterkit.planmetrics import Metric, check_metric
from meterkit.stores.base import Store

__all__ = ["Registry"]


class Registry:
    """Meter specs (the built-in ones first) and plan metric definitions, by name.

    ``specs`` and ``metrics`` are live read-only views. Whatever depends on them (compiled
    quota limits know which metrics are gauges) listens with :meth:`on_change`.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._specs = builtin_meters()
        self._metrics: dict[str, Metric] = {}
        self.specs: Mapping[str, MeterSpec] = MappingProxyType(self._specs)
        self.metrics: Mapping[str, Metric] = MappingProxyType(self._metrics)
        # Meters whose tables this process made sure of: their shape may grow, not shrink.
        self._ready: set[str] = set()
        self._listeners: list[Callable[[], object]] = []

    def on_change(self, call: Callable[[], object]) -> None:
        """Call ``call()`` after every meter or metric (re)definition."""
        self._listeners.append(call)

    def _changed(self) -> None:
        for call in self._listeners:
            call()

    def register(self, spec: MeterSpec) -> MeterSpec:
        """Add a meter. Re-registering the same spec is a no-op; a meter the store may hold
        events of can gain measures and dimensions, never lose one."""
        if not isinstance(spec, MeterSpec):
            raise ValidationError("spec", "must be a MeterSpec")
        with self._lock:
            known = self._specs.get(spec.name)
            if known is not None and known != spec and spec.name in self._ready:
                missing = set(known.measure_names) - set(spec.measure_names)
                missing |= set(known.dimension_names) - set(spec.dimension_names)
                if missing:
                    raise ValidationError(
                        "spec", f"cannot drop {sorted(missing)} from {spec.name!r}"
                    )
                self._ready.discard(spec.name)
            self._specs[spec.name] = spec
        self._changed()
        return spec

    def spec(self, name: object, field: str = "meter") -> MeterSpec:
        """The meter called ``name``, or a ValidationError naming ``field``."""
        spec = self._specs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise ValidationError(field, f"unknown meter {name!r}")
        return spec

    def ensure(self, spec: MeterSpec) -> None:
        """Make sure the store has the meter's tables."""
        # Every time: the store remembers what it created, and forgets it if the transaction
        # that created it rolled back.
        self.store.ensure_meter(spec)
        self._ready.add(spec.name)

    def ensure_of(self, events: Iterable[Event]) -> None:
        """:meth:`ensure` every meter ``events`` belong to."""
        for name in {e.meter for e in events}:
            self.ensure(self._specs[name])

    def define_metric(self, metric: Metric) -> Metric:
        """Check and keep a plan metric; a metric without a meter of its name gets one (a
        plain counter), where decisions record what they admit."""
        if not isinstance(metric, Metric):
            raise ValidationError("metric", "must be a meterkit.Metric")
        if not isinstance(metric.name, str) or not NAME_RE.match(metric.name):
            raise ValidationError("metric.name", f"must match {NAME_RE.pattern}")
        if metric.name not in self._specs:
            self.register(MeterSpec(metric.name, (Measure(metric.name),)))
        check_metric(metric, self._specs)
        self._metrics[metric.name] = metric
        self._changed()
        return metric
