"""The 30-day costs query: prices applied to aggregated usage against pricing every event.

Both sides read the same SQLite file (the query part's, 1,550,000 events by default) with the
same price book: per-model input, output and cached-input prices per million tokens, the shape
of OpenAI's own. ``Meter.costs`` prices the usage query's rows (from rollups); the baseline is
the same costs page computed by pricing every event (``costs_page`` without ``rows``), which is
what ``Meter.costs`` did before. Both must give the same page, to the last Decimal digit;
that is checked, not timed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from data import DAY, METER, START

import meterkit
from meterkit.costs import costs_page
from meterkit.pricing import Price

__all__ = ["PRICES", "run_costs"]

DAYS = 30
# (model, input, cached input, output) in dollars per million tokens.
PRICES = (
    ("gpt-4o-mini", "0.15", "0.075", "0.60"),
    ("gpt-4o", "2.50", "1.25", "10.00"),
    ("gpt-4.1", "2.00", "0.50", "8.00"),
    ("o3-mini", "1.10", "0.55", "4.40"),
    ("gpt-4o-audio-preview", "2.50", "1.25", "10.00"),
)


def price_book() -> list[Price]:
    out = []
    for model, given, cached, produced in PRICES:
        for measure, unit_price in (
            ("input_tokens", given),
            ("input_cached_tokens", cached),
            ("output_tokens", produced),
        ):
            out.append(
                Price(
                    METER,
                    measure,
                    unit_price,
                    per=1_000_000,
                    line_item=f"{model}, {measure.removesuffix('_tokens').replace('_', ' ')}",
                    quantity_unit="tokens",
                    where={"model": model},
                    id=f"bench-{model}-{measure}",
                )
            )
    return out


def run_costs(mk_path: Path, organization_id: str, repeat: int) -> dict[str, Any]:
    """Median seconds of each side, and their ratio."""
    args: dict[str, Any] = {
        "organization_id": organization_id,
        "start_time": START,
        "end_time": START + DAYS * DAY,
        "group_by": ["line_item", "project_id"],
        "limit": DAYS,
    }
    with meterkit.Meter(f"sqlite:///{mk_path}") as meter:
        for price in price_book():
            meter.set_price(price)
        period_of = meter._period_of(organization_id)
        fast = meter.costs(**args)  # warm-up
        t0 = time.perf_counter()
        slow = costs_page(meter.store, meter.meters, meter.prices(), period_of=period_of, **args)
        per_event = [time.perf_counter() - t0]
        if fast != slow:
            raise AssertionError("costs from aggregated usage and from every event disagree")
        aggregated = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            page = meter.costs(**args)
            aggregated.append(time.perf_counter() - t0)
            assert page == fast
    agg = sorted(aggregated)[len(aggregated) // 2]
    results = sum(len(b.results) for b in fast.data)
    total = fast.totals()
    return {
        "days": DAYS,
        "results": results,
        "total": {k: str(v) for k, v in total.items()},
        "aggregated_median_s": round(agg, 4),
        "aggregated_runs_s": [round(r, 4) for r in aggregated],
        "per_event_s": round(per_event[0], 3),
        "speedup": round(per_event[0] / agg, 1),
    }
