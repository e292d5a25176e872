"""Plan metrics: what a quota counts, defined over meter measures.

A metric counts the events of the meter of its own name — where ``check`` / ``reserve`` /
``debit`` record what they admit — and, when defined so, measures of other meters::

    Metric("tokens", [Source("completions", "input_tokens"),
                      Source("completions", "output_tokens")])
    Metric.parse("tokens", "completions.input_tokens + completions.output_tokens")

optionally only for some dimension values (``Source(..., where={"model": ["gpt-4o"]})``).
Every event recorded (``record``, ``record_many``, HTTP ingest, the middleware) adds what it
contributes to the counters of the metrics it belongs to, so a quota enforces all usage, however
it arrives; :func:`meterkit.recovery.rebuild_counters` recomputes the same numbers from the events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from meterkit.errors import ValidationError
from meterkit.models import NAME_RE, DimValue, Event, MeterSpec

__all__ = ["Metric", "Source", "check_metric", "contributions"]

RECORD_KIND = "metric"
"""Where stored metric definitions live (``store.put_record(RECORD_KIND, name, ...)``)."""


def _where(
    value: Mapping[str, Iterable[DimValue]] | None,
) -> tuple[tuple[str, frozenset[DimValue]], ...]:
    if not value:
        return ()
    if not isinstance(value, Mapping):
        raise ValidationError("where", "must map dimension names to lists of values")
    out = []
    for name, allowed in sorted(value.items()):
        if isinstance(allowed, (str, bytes)) or not isinstance(allowed, Iterable):
            raise ValidationError(f"where.{name}", "must be a list of values")
        out.append((name, frozenset(allowed)))
    return tuple(out)


@attrs.frozen
class Source:
    """One measure of one meter that a metric counts, where its dimensions match ``where``."""

    meter: str
    measure: str
    where: tuple[tuple[str, frozenset[DimValue]], ...] = attrs.field(default=(), converter=_where)

    def matches(self, event: Event) -> bool:
        dims = event.dimensions
        return all(dims.get(name) in allowed for name, allowed in self.where)


def _sources(items: Iterable[Source]) -> tuple[Source, ...]:
    return tuple(items)


@attrs.frozen
class Metric:
    """A plan metric: its own meter's events, plus ``sources``."""

    name: str
    sources: tuple[Source, ...] = attrs.field(default=(), converter=_sources)

    def effective(self, specs: Mapping[str, MeterSpec]) -> Metric:
        """With the metric's own meter as its first source, when that meter counts it."""
        own = specs.get(self.name)
        measure = own.measure(self.name) if own is not None else None
        if measure is None or measure.gauge:
            return self
        return Metric(self.name, (Source(self.name, self.name), *self.sources))

    @property
    def expression(self) -> str:
        """The sources as ``"meter.measure + meter.measure ..."`` (without their ``where``)."""
        return " + ".join(f"{s.meter}.{s.measure}" for s in self.sources)

    def to_record(self) -> dict[str, Any]:
        """The stored form: every source with its ``where`` (values sorted, so one definition
        has one record)."""
        return {
            "sources": [
                {
                    "meter": s.meter,
                    "measure": s.measure,
                    "where": {name: sorted(allowed, key=repr) for name, allowed in s.where},
                }
                for s in self.sources
            ]
        }

    @classmethod
    def from_record(cls, name: str, data: Mapping[str, Any]) -> Metric:
        return cls(
            name,
            [
                Source(s["meter"], s["measure"], s.get("where") or None)
                for s in data.get("sources", ())
            ],
        )

    @classmethod
    def parse(
        cls, name: str, expression: str, *, where: Mapping[str, Iterable[DimValue]] | None = None
    ) -> Metric:
        """``"meter.measure + meter.measure ..."``, each term filtered by ``where``."""
        if not isinstance(expression, str) or not expression.strip():
            raise ValidationError("expression", "must be 'meter.measure + meter.measure ...'")
        sources = []
        for term in expression.split("+"):
            meter, dot, measure = term.strip().partition(".")
            if not dot or not meter or not measure:
                raise ValidationError("expression", f"{term.strip()!r} is not 'meter.measure'")
            sources.append(Source(meter, measure, where))  # type: ignore[arg-type]
        return cls(name, sources)


def check_metric(metric: object, specs: Mapping[str, MeterSpec]) -> Metric:
    """A metric whose sources are summed, whole-number measures of known meters."""
    if not isinstance(metric, Metric):
        raise ValidationError("metric", "must be a meterkit.Metric")
    if not isinstance(metric.name, str) or not NAME_RE.match(metric.name):
        raise ValidationError("metric.name", f"must match {NAME_RE.pattern}")
    own = specs.get(metric.name)
    own_measure = own.measure(metric.name) if own is not None else None
    if own_measure is not None and own_measure.gauge:
        raise ValidationError("metric.name", f"{metric.name!r} is a gauge: it is set, not summed")
    for i, source in enumerate(metric.sources):
        field = f"metric.sources[{i}]"
        spec = specs.get(source.meter)
        if spec is None:
            raise ValidationError(f"{field}.meter", f"unknown meter {source.meter!r}")
        measure = spec.measure(source.measure)
        if measure is None:
            raise ValidationError(
                f"{field}.measure", f"meter {source.meter!r} has no measure {source.measure!r}"
            )
        if measure.gauge or measure.fractional or measure.aggregation != "sum":
            raise ValidationError(
                f"{field}.measure",
                "a quota counts summed whole numbers: not a gauge, a "
                "fractional measure or one aggregated otherwise",
            )
        for name, _allowed in source.where:
            if spec.dimension(name) is None:
                raise ValidationError(
                    f"{field}.where.{name}", f"meter {source.meter!r} has no dimension {name!r}"
                )
    return metric


def contributions(
    metrics: Iterable[Metric], events: Iterable[Event]
) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """``{(organization, metric): [(time, amount), ...]}`` from the metrics' sources (give
    them :meth:`Metric.effective`, own meter included)."""
    by_meter: dict[str, list[tuple[str, Source]]] = {}
    for metric in metrics:
        for source in metric.sources:
            by_meter.setdefault(source.meter, []).append((metric.name, source))
    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    if not by_meter:
        return out
    for event in events:
        for metric_name, source in by_meter.get(event.meter, ()):
            value = event.values.get(source.measure)
            if value and source.matches(event):
                assert event.time is not None
                out.setdefault((event.organization_id, metric_name), []).append(
                    (event.time, int(value))
                )
    return out
