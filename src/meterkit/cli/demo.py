"""Demo data: a month of realistic usage for a few organizations, the same on every run.

:func:`populate` fills a meter's store with every built-in kind of usage (the eight OpenAI
kinds, the vector-store gauge included, and the generic meters), plans, plan assignments and
prices, so every HTTP surface has something to show. ``meterkit demo`` uses it; tests and
benchmarks can too.

Every number comes from a random generator seeded with the organization, the meter and the
day, and every event id is derived from the same, so running it again over the same window
records nothing new (all duplicates), and a window that moved on by a day adds only that day.
Only hours that have ended by ``now`` are filled, so no event lies in the future.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING

import attrs

from meterkit.auth import ApiKey, create_key, list_keys, revoke_key
from meterkit.errors import ValidationError
from meterkit.models import DimValue, Event
from meterkit.periods import BillingCycle
from meterkit.plans import Plan
from meterkit.pricing import GIBIBYTE_HOUR, Price
from meterkit.quotas import Quotas

if TYPE_CHECKING:
    from meterkit.meter import Meter

__all__ = [
    "DEMO_KEY_NAME",
    "ORGANIZATIONS",
    "PLANS",
    "DemoOrg",
    "DemoSummary",
    "create_demo_key",
    "demo_events",
    "demo_prices",
    "populate",
]

DAY = 86_400
HOUR = 3_600
DEMO_KEY_NAME = "demo"

# Relative traffic per UTC hour: quiet nights, busy working hours.
_HOURLY = (2, 1, 1, 1, 1, 2, 4, 7, 10, 12, 12, 11, 10, 11, 12, 12, 11, 9, 7, 6, 5, 4, 3, 2)
# The generic counter meters whose quota ledger is brought in line with their events.
_LEDGER_COUNTERS = ("requests", "tokens", "queries", "credits", "tiles", "jobs")


@attrs.frozen
class DemoOrg:
    """One demo organization: its plan, its size, and the names its usage carries."""

    id: str
    plan: str
    seats: int
    scale: float
    projects: tuple[str, ...]
    users: tuple[str, ...]
    api_keys: tuple[str, ...]


ORGANIZATIONS: tuple[DemoOrg, ...] = (
    DemoOrg(
        "org_acme",
        plan="pro",
        seats=5,
        scale=1.0,
        projects=("proj_search", "proj_support", "proj_internal"),
        users=("user_ada", "user_grace", "user_linus", "user_margaret"),
        api_keys=("key_prod", "key_staging"),
    ),
    DemoOrg(
        "org_globex",
        plan="enterprise",
        seats=20,
        scale=3.0,
        projects=("proj_assistant", "proj_analytics"),
        users=("user_hank", "user_dana", "user_scorpio"),
        api_keys=("key_backend", "key_batch", "key_ci"),
    ),
    DemoOrg(
        "org_initech",
        plan="free",
        seats=1,
        scale=0.15,
        projects=("proj_tps",),
        users=("user_peter", "user_milton"),
        api_keys=("key_default",),
    ),
)

GIB = 1024**3
PLANS: tuple[Plan, ...] = (
    Plan(
        "free",
        "Free",
        BillingCycle("monthly"),
        limits={
            "tokens": 2_000_000,
            "queries": 5_000,
            "spaces": 3,
            "credits": 1_000,
            "storage_bytes": GIB,
            "tiles": 20_000,
            "jobs": 100,
        },
        rate_limit_rpm=20,
        rate_limit_per_day=2_000,
    ),
    Plan(
        "pro",
        "Professional",
        BillingCycle("monthly"),
        limits={
            "tokens": 50_000_000,
            "queries": -1,
            "spaces": 10,
            "storage_bytes": 100 * GIB,
            "tiles": 1_000_000,
            "jobs": 5_000,
        },
        rate_limit_rpm=600,
        rate_limit_per_day=200_000,
        credits_per_seat=10_000,
    ),
    Plan(
        "enterprise",
        "Enterprise",
        BillingCycle("monthly"),
        limits={
            "tokens": -1,
            "queries": -1,
            "spaces": -1,
            "storage_bytes": -1,
            "tiles": -1,
            "jobs": -1,
        },
        credits_per_seat=50_000,
    ),
)


def _per_million(
    meter: str, measure: str, price: str | Decimal, model: str, label: str, *, batch: bool = False
) -> Price:
    where: dict[str, DimValue] = {"model": model}
    if batch:
        where["batch"] = True
    return Price(
        meter,
        measure,
        price,
        per=1_000_000,
        line_item=f"{model}, {label}{' (batch)' if batch else ''}",
        quantity_unit="tokens",
        where=where,
    )


# OpenAI's published prices per million tokens: input, cached input, output, and audio input
# and output where the model hears and speaks. The Batch API halves them (no audio model runs
# in batch).
_TOKEN_PRICES = (
    ("gpt-4o", "2.50", "1.25", "10.00", None, None),
    ("gpt-4o-mini", "0.15", "0.075", "0.60", None, None),
    ("gpt-4o-audio-preview", "2.50", "2.50", "10.00", "40.00", "80.00"),
)


def _completion_prices() -> list[Price]:
    """Each part of the input and output at its own rate: the parts add up to
    ``input_tokens`` and ``output_tokens``, so nothing is charged twice."""
    out = []
    for model, inp, cached, output, audio_in, audio_out in _TOKEN_PRICES:
        for batch in (False,) if audio_in else (False, True):
            rate = (lambda p: Decimal(p) / 2) if batch else Decimal
            lines = [
                ("input_text_tokens", inp, "input"),
                ("input_image_tokens", inp, "input"),
                ("input_cache_write_tokens", inp, "input"),
                ("input_cached_text_tokens", cached, "cached input"),
                ("input_cached_image_tokens", cached, "cached input"),
                ("output_text_tokens", output, "output"),
            ]
            if audio_in and audio_out:
                lines += [
                    ("input_audio_tokens", audio_in, "audio input"),
                    ("input_cached_audio_tokens", audio_in, "audio input"),
                    ("output_audio_tokens", audio_out, "audio output"),
                ]
            out += [
                _per_million("completions", measure, rate(price), model, label, batch=batch)
                for measure, price, label in lines
            ]
    return out


def demo_prices() -> list[Price]:
    """List prices for the demo's models, so the costs endpoint has amounts to show.

    Completions are priced part by part (text, image, audio; uncached, cached and cache-write
    input), batch jobs at half price. Moderations are free. Vector-store bytes are a gauge,
    priced over time: $0.10 per GiB-day, reported in gibibyte-hours.
    """
    prices = _completion_prices()
    for model, inp in (("text-embedding-3-small", "0.02"), ("text-embedding-3-large", "0.13")):
        prices.append(_per_million("embeddings", "input_tokens", inp, model, "input"))
    for model, size, each in (
        ("dall-e-3", "1024x1024", "0.04"),
        ("dall-e-3", "1024x1792", "0.08"),
        ("dall-e-2", "512x512", "0.018"),
        ("dall-e-2", "1024x1024", "0.02"),
    ):
        prices.append(
            Price(
                "images",
                "images",
                each,
                line_item=f"{model}, {size}",
                quantity_unit="images",
                where={"model": model, "size": size},
            )
        )
    for model, per_million in (("tts-1", "15.00"), ("tts-1-hd", "30.00")):
        prices.append(
            Price(
                "audio_speeches",
                "characters",
                per_million,
                per=1_000_000,
                line_item=model,
                quantity_unit="characters",
                where={"model": model},
            )
        )
    prices.append(
        Price(
            "audio_transcriptions",
            "seconds",
            "0.006",
            per=60,
            line_item="whisper-1",
            quantity_unit="duration_seconds",
            where={"model": "whisper-1"},
        )
    )
    prices.append(
        Price(
            "vector_stores",
            "usage_bytes",
            "0.10",
            per=GIBIBYTE_HOUR * 24,
            quantity_per=GIBIBYTE_HOUR,
            line_item="vector stores",
            quantity_unit="gibibyte_hours",
        )
    )
    prices.append(
        Price(
            "code_interpreter_sessions",
            "num_sessions",
            "0.03",
            line_item="code interpreter",
            quantity_unit="sessions",
        )
    )
    return prices


@attrs.frozen
class DemoSummary:
    """What :func:`populate` did. ``events`` counts every event of the window."""

    organizations: tuple[str, ...]
    start_time: int
    end_time: int
    events: int
    accepted: int
    duplicates: int


class _Day:
    """Builds one organization's events for one day, with ids that depend only on their place."""

    def __init__(self, org: DemoOrg, day: int, level: float) -> None:
        self.org = org
        self.day = day
        self.level = level * org.scale
        self.stamp = dt.datetime.fromtimestamp(day, dt.timezone.utc).strftime("%Y%m%d")
        self.events: list[Event] = []

    def rng(self, meter: str) -> random.Random:
        # One generator per meter: adding a meter later leaves the others' numbers alone.
        return random.Random(f"meterkit-demo:{self.org.id}:{meter}:{self.stamp}")

    def times(self, rng: random.Random, count: int) -> list[int]:
        hours = rng.choices(range(24), weights=_HOURLY, k=count)
        return sorted(self.day + h * HOUR + rng.randrange(HOUR) for h in hours)

    def scaled(self, rng: random.Random, low: int, high: int) -> int:
        return max(1, round(rng.randint(low, high) * self.level))

    def add(
        self, meter: str, n: int, time: int, values: dict[str, int], dims: dict[str, DimValue]
    ) -> None:
        self.events.append(
            Event(
                id=f"demo_{self.org.id}_{meter}_{self.stamp}_{n:03d}",
                meter=meter,
                organization_id=self.org.id,
                time=time,
                values=values,
                dimensions=dims,
            )
        )

    def people(self, rng: random.Random, project: str) -> dict[str, DimValue]:
        return {
            "project_id": project,
            "user_id": rng.choice(self.org.users),
            "api_key_id": rng.choice(self.org.api_keys),
        }


def _cache_writes(rng: random.Random, values: dict[str, int]) -> None:
    """Split part of the uncached input into cache writes (30-minute and 12-hour), so that
    input = cached + cache writes + uncached, as the OpenAI types document."""
    uncached = values["input_tokens"] - values["input_cached_tokens"]
    writes = int(uncached * rng.uniform(0, 0.25))
    short = int(writes * rng.uniform(0.3, 1))
    values["input_cache_write_tokens"] = writes
    values["input_cache_write_30m_tokens"] = short
    values["input_cache_write_12h_tokens"] = writes - short
    values["input_uncached_tokens"] = uncached - writes


def _modalities(rng: random.Random, values: dict[str, int]) -> None:
    """Split uncached and cached input, and output, into text, audio and image tokens, so each
    total is the sum of its parts. No demo model outputs images."""
    image = int(values["input_uncached_tokens"] * rng.uniform(0, 0.1)) if rng.random() < 0.3 else 0
    audio = min(values["input_audio_tokens"], values["input_uncached_tokens"] - image)
    values["input_audio_tokens"] = audio
    values["input_image_tokens"] = image
    values["input_text_tokens"] = values["input_uncached_tokens"] - audio - image
    cached = values["input_cached_tokens"]
    cached_audio = cached // 10 if audio else 0
    cached_image = cached // 20 if image else 0
    values["input_cached_audio_tokens"] = cached_audio
    values["input_cached_image_tokens"] = cached_image
    values["input_cached_text_tokens"] = cached - cached_audio - cached_image
    out_audio = min(values["output_audio_tokens"], values["output_tokens"])
    values["output_audio_tokens"] = out_audio
    values["output_image_tokens"] = 0
    values["output_text_tokens"] = values["output_tokens"] - out_audio


def _openai_kinds(d: _Day) -> None:
    org = d.org
    rng = d.rng("completions")
    cache, labels = d.rng("completions.cache"), d.rng("completions.source")
    models = ("gpt-4o", "gpt-4o-mini", "gpt-4o-mini", "gpt-4o-audio-preview")
    for n, t in enumerate(d.times(rng, 18)):
        model = rng.choice(models)
        requests = d.scaled(rng, 5, 60)
        inp = requests * rng.randint(300, 1800)
        audio = model.endswith("audio-preview")
        batch = not audio and rng.random() < 0.15
        values = {
            "input_tokens": inp,
            "output_tokens": requests * rng.randint(80, 600),
            "input_cached_tokens": int(inp * rng.uniform(0.05, 0.5)),
            "input_audio_tokens": requests * rng.randint(50, 400) if audio else 0,
            "output_audio_tokens": requests * rng.randint(100, 800) if audio else 0,
            "num_model_requests": requests,
        }
        dims: dict[str, DimValue] = {
            **d.people(rng, rng.choice(org.projects)),
            "model": model,
            "batch": batch,
            "service_tier": "flex" if batch else rng.choice(("default", "default", "priority")),
        }
        # Cache writes and the source come from generators of their own, so the numbers
        # above are what they were before these fields existed.
        _cache_writes(cache, values)
        _modalities(cache, values)
        if labels.random() < 0.2:
            dims["api_source"] = "agents_api"
        d.add("completions", n, t, values, dims)

    rng = d.rng("embeddings")
    for n, t in enumerate(d.times(rng, 6)):
        requests = d.scaled(rng, 10, 120)
        model = rng.choice(
            ("text-embedding-3-small", "text-embedding-3-small", "text-embedding-3-large")
        )
        d.add(
            "embeddings",
            n,
            t,
            {"input_tokens": requests * rng.randint(200, 900), "num_model_requests": requests},
            {**d.people(rng, rng.choice(org.projects)), "model": model},
        )

    rng = d.rng("moderations")
    for n, t in enumerate(d.times(rng, 4)):
        requests = d.scaled(rng, 5, 80)
        d.add(
            "moderations",
            n,
            t,
            {"input_tokens": requests * rng.randint(40, 300), "num_model_requests": requests},
            {**d.people(rng, org.projects[0]), "model": "omni-moderation-latest"},
        )

    rng = d.rng("images")
    for n, t in enumerate(d.times(rng, 4)):
        requests = d.scaled(rng, 1, 8)
        if rng.random() < 0.7:
            model, source = "dall-e-3", "image.generation"
            size = rng.choice(("1024x1024", "1024x1024", "1024x1792"))
        else:
            model = "dall-e-2"
            source = rng.choice(("image.edit", "image.variation"))
            size = rng.choice(("512x512", "1024x1024"))
        d.add(
            "images",
            n,
            t,
            {"images": requests * rng.randint(1, 4), "num_model_requests": requests},
            {
                **d.people(rng, rng.choice(org.projects)),
                "model": model,
                "source": source,
                "size": size,
            },
        )

    rng = d.rng("audio_speeches")
    for n, t in enumerate(d.times(rng, 3)):
        requests = d.scaled(rng, 2, 20)
        d.add(
            "audio_speeches",
            n,
            t,
            {"characters": requests * rng.randint(200, 2500), "num_model_requests": requests},
            {**d.people(rng, org.projects[-1]), "model": rng.choice(("tts-1", "tts-1-hd"))},
        )

    rng = d.rng("audio_transcriptions")
    for n, t in enumerate(d.times(rng, 3)):
        requests = d.scaled(rng, 1, 12)
        d.add(
            "audio_transcriptions",
            n,
            t,
            {"seconds": requests * rng.randint(20, 600), "num_model_requests": requests},
            {**d.people(rng, org.projects[-1]), "model": "whisper-1"},
        )

    rng = d.rng("code_interpreter_sessions")
    for n, t in enumerate(d.times(rng, 3)):
        d.add(
            "code_interpreter_sessions",
            n,
            t,
            {"num_sessions": d.scaled(rng, 1, 10)},
            {"project_id": rng.choice(org.projects)},
        )


def _newer_kinds(d: _Day) -> None:
    """Decisions, file searches and web searches."""
    org = d.org
    rng = d.rng("decisions")
    for n, t in enumerate(d.times(rng, 4)):
        requests = d.scaled(rng, 2, 30)
        values = {
            "input_tokens": requests * rng.randint(400, 1500),
            "output_tokens": requests * rng.randint(20, 120),
            "num_model_requests": requests,
        }
        values["input_cached_tokens"] = int(values["input_tokens"] * rng.uniform(0.1, 0.6))
        values["input_audio_tokens"] = values["output_audio_tokens"] = 0
        _cache_writes(rng, values)
        _modalities(rng, values)
        dims: dict[str, DimValue] = {
            **d.people(rng, rng.choice(org.projects)),
            "model": rng.choice(("gpt-4o-mini", "gpt-4o-mini", "gpt-4o")),
        }
        if rng.random() < 0.25:
            dims["api_source"] = "agents_api"
        d.add("decisions", n, t, values, dims)

    rng = d.rng("file_search_calls")
    stores = [f"vs_{org.id.removeprefix('org_')}_{i}" for i in range(1, 4)]
    for n, t in enumerate(d.times(rng, 5)):
        d.add(
            "file_search_calls",
            n,
            t,
            {"num_requests": d.scaled(rng, 3, 40)},
            {**d.people(rng, rng.choice(org.projects)), "vector_store_id": rng.choice(stores)},
        )

    rng = d.rng("web_search_calls")
    for n, t in enumerate(d.times(rng, 4)):
        calls = d.scaled(rng, 2, 25)
        dims = {
            **d.people(rng, rng.choice(org.projects)),
            "model": rng.choice(("gpt-4o", "gpt-4o-mini")),
            "context_level": rng.choice(("low", "medium", "medium", "high")),
        }
        if rng.random() < 0.3:
            dims["api_source"] = "agents_api"
        d.add(
            "web_search_calls",
            n,
            t,
            {"num_requests": calls, "num_model_requests": max(1, calls // 2)},
            dims,
        )


def _gauges(d: _Day, index: int, days: int) -> None:
    """Gauges get one reading per series a day (shortly after midnight), growing over time."""
    org = d.org
    at = d.day + 60
    for n, project in enumerate(org.projects):
        base = (n + 1) * 40 * 1024**2 * org.scale
        d.add(
            "vector_stores",
            n,
            at,
            {"usage_bytes": int(base * (1 + 0.03 * index))},
            {"project_id": project},
        )
    resources = ("uploads", "exports", "tiles/base")
    for n, resource in enumerate(resources):
        base = (n + 2) * 150 * 1024**2 * org.scale
        d.add(
            "storage_bytes",
            n,
            at,
            {"storage_bytes": int(base * (1 + 0.02 * index))},
            {"resource": resource, "project_id": org.projects[n % len(org.projects)]},
        )
    # Spaces appear over the month: one at the start, more as it goes on.
    count = 1 + (index * max(1, round(3 * org.scale))) // max(days, 1)
    for n in range(min(count, 8)):
        d.add("spaces", n, at, {"spaces": 1}, {"resource": f"space_{n + 1}"})


def _generic(d: _Day) -> None:
    org = d.org
    rng = d.rng("requests")
    routes = (
        ("GET", "/v1/search"),
        ("POST", "/v1/chat"),
        ("GET", "/v1/tiles"),
        ("POST", "/v1/jobs"),
    )
    for n, t in enumerate(d.times(rng, 12)):
        method, route = rng.choice(routes)
        status = rng.choices(("200", "400", "429", "500"), weights=(93, 4, 2, 1))[0]
        d.add(
            "requests",
            n,
            t,
            {"requests": d.scaled(rng, 20, 400)},
            {
                **d.people(rng, rng.choice(org.projects)),
                "method": method,
                "route": route,
                "status": status,
            },
        )
    for meter, per_day, (low, high), dimension, choices in _COUNTED:
        rng = d.rng(meter)
        for n, t in enumerate(d.times(rng, per_day)):
            values = {meter: d.scaled(rng, low, high)}
            dims = d.people(rng, rng.choice(org.projects))
            if dimension is not None:
                dims[dimension] = rng.choice(choices)
            d.add(meter, n, t, values, dims)
    # A charge in dollars (what debit(cost=...) records): a daily platform fee of 5 cents.
    rng = d.rng("charges")
    fee = {"nano_usd": 50_000_000}
    d.add("charges", 0, d.day + 12 * HOUR, fee, {"project_id": rng.choice(org.projects)})


# Generic counter meters: events per day, value range, and the one extra dimension they vary.
_COUNTED: tuple[tuple[str, int, tuple[int, int], str | None, tuple[str, ...]], ...] = (
    ("tokens", 8, (2_000, 40_000), "model", ("gpt-4o", "gpt-4o-mini")),
    ("queries", 6, (5, 40), None, ()),
    ("credits", 4, (2, 12), "reason", ("export", "render", "analysis")),
    ("tiles", 8, (50, 600), "layer", ("base", "satellite", "overlay")),
    ("jobs", 3, (1, 5), "kind", ("import", "export", "reindex")),
)


def _window(days: int, now: int) -> tuple[int, int]:
    """``[start, end)``: ``days`` whole UTC days up to today, today's ended hours included."""
    end = now - now % HOUR
    today = now - now % DAY
    return today - days * DAY, end


def demo_events(
    *, days: int = 30, now: int, organizations: Sequence[DemoOrg] = ORGANIZATIONS
) -> Iterator[Event]:
    """Every demo event of ``days`` whole days before ``now``'s day and of its ended hours."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 366:
        raise ValidationError("days", "must be an integer from 1 to 366")
    start, end = _window(days, now)
    for index, day in enumerate(range(start, end, DAY)):
        # Weekends are quieter, and traffic grows a little over the month.
        weekday = dt.datetime.fromtimestamp(day, dt.timezone.utc).weekday()
        level = (0.45 if weekday >= 5 else 1.0) * (0.8 + 0.4 * index / days)
        for org in organizations:
            d = _Day(org, day, level)
            _openai_kinds(d)
            _newer_kinds(d)
            _gauges(d, index, days)
            _generic(d)
            yield from (e for e in d.events if e.time < end)


def _sync_ledger(meter: Meter, organizations: Sequence[DemoOrg], now: int) -> None:
    """Bring the quota ledger in line with the recorded events, so quota checks, plan usage
    and account usage agree with the usage pages.

    The counters are *set* (not debited): that is what keeps a second run from doubling them.
    Counters hold this billing period's sums; gauges the latest reading of each series.
    """
    quotas = meter.quotas
    for org in organizations:
        period = quotas.period(org.id, now)
        for metric in _LEDGER_COUNTERS:
            used = meter.total(
                metric, metric, organization_id=org.id, start_time=period.start, end_time=now + 1
            )
            meter.counters.counters_set(
                Quotas.period_key(org.id, metric, period), int(used), now=now
            )
        for metric in ("storage_bytes", "spaces"):
            rows = meter.totals(
                metric, organization_id=org.id, start_time=now - now % DAY - DAY, end_time=now + 1
            )
            latest = next((v.get(metric) for _, v in reversed(rows) if v.get(metric)), 0)
            quotas.set_gauge(org.id, metric, int(latest or 0))


def populate(
    meter: Meter,
    *,
    days: int = 30,
    now: int | None = None,
    organizations: Sequence[DemoOrg] = ORGANIZATIONS,
) -> DemoSummary:
    """Fill ``meter``'s store with the demo: plans, assignments, prices and events.

    Safe to run again: plans, assignments and prices are upserted, events are idempotent by
    id, and the quota ledger is set rather than added to.
    """
    now = meter.now() if now is None else now
    for plan in PLANS:
        meter.set_plan(plan)
    for org in organizations:
        meter.assign_plan(org.id, org.plan, seats=org.seats)
    for price in demo_prices():
        meter.set_price(price)
    start, end = _window(days, now)
    events = accepted = duplicates = 0
    batch: list[Event] = []
    for event in demo_events(days=days, now=now, organizations=organizations):
        batch.append(event)
        if len(batch) >= 2_000:
            result = meter.record_many(batch)
            events, accepted = events + len(batch), accepted + result.accepted
            # A corrected event sent again conflicts with its correction: it is there.
            duplicates += result.duplicates + len(result.conflicts)
            batch = []
    if batch:
        result = meter.record_many(batch)
        events, accepted = events + len(batch), accepted + result.accepted
        duplicates += result.duplicates + len(result.conflicts)
    _sync_ledger(meter, organizations, now)
    _register_assets(meter, organizations, now, days)
    if organizations:
        _spend_near_its_limit(meter, organizations[0].id, now)
        _a_corrected_event(meter, organizations[0].id, now)
    return DemoSummary(tuple(o.id for o in organizations), start, end, events, accepted, duplicates)


SPEND_ALERT_ID = "spalert_demo"


def _spend_near_its_limit(meter: Meter, org: str, now: int) -> None:
    """A spend alert at three quarters of the month's spend so far, crossed by one more
    request (so it fires, once), and a hard spend limit a cent or two above the spend."""
    cents = meter.spend(org).counted * 100
    alert = max(1, int(cents * 3 / 4))
    meter.put_spend_alert(
        org,
        SPEND_ALERT_ID,
        {
            "currency": "USD",
            "interval": "month",
            "threshold_amount": alert,
            "notification_channel": {
                "type": "email",
                "recipients": [f"billing@{org.removeprefix('org_')}.example"],
                "subject_prefix": "[meterkit demo]",
            },
        },
    )
    crossing = Event(
        "demo-spend-alert-crossing",
        "completions",
        org,
        now - 1,
        {
            "input_tokens": 1200,
            "input_text_tokens": 1200,
            "output_tokens": 300,
            "output_text_tokens": 300,
            "num_model_requests": 1,
        },
        {"model": "gpt-4o", "batch": False},
    )
    # A second run keeps the first run's crossing (its time was another "now").
    meter.record_many([crossing])
    # One to two cents above the month's spend, the crossing included: the demo model's calls
    # reach it soon, and none is refused before the first.
    spent_cents = meter.spend(org).counted * 100
    limit = max(alert + 1, math.ceil(spent_cents) + 1)
    meter.set_spend_cap(org, limit)  # the operator's: the demo's admin key cannot lift it


def _a_corrected_event(meter: Meter, org: str, now: int) -> None:
    """Void one of today's requests (a health check counted as usage), once: the audit trail
    then has a correction to show."""
    if meter.corrections(org, meter="requests"):
        return
    today = now - now % 86400
    first = next(iter(meter.store.scan("requests", org, today, now + 1)), None)
    if first is not None:
        meter.void(
            "requests",
            org,
            first.id,
            reason="a health check counted as usage",
            actor=f"billing@{org.removeprefix('org_')}.example",
        )


def _register_assets(meter: Meter, organizations: Sequence[DemoOrg], now: int, days: int) -> None:
    """Register each organization's stored assets at today's sizes (the last storage_bytes
    readings), so storage recalculation has a registry to read."""
    start, end = _window(days, now)
    for org in organizations:
        latest: dict[str, tuple[int, int]] = {}
        for event in meter.store.scan("storage_bytes", org.id, start, end):
            resource = event.dimensions.get("resource")
            if isinstance(resource, str) and (
                resource not in latest or event.time >= latest[resource][0]
            ):
                latest[resource] = (event.time, int(event.values.get("storage_bytes", 0)))
        for resource, (_time, size) in sorted(latest.items()):
            meter.put_asset(org.id, resource, size)


def create_demo_key(meter: Meter, organization_id: str | None = None) -> tuple[str, ApiKey]:
    """A fresh admin key (read and write) for the first demo organization.

    A token is shown only once, so each run makes a new key; earlier demo keys of that
    organization are revoked so that only the one just printed works.
    """
    org = organization_id or ORGANIZATIONS[0].id
    for key in list_keys(meter, org):
        if key.name == DEMO_KEY_NAME and key.active:
            revoke_key(meter, key.id)
    return create_key(meter, org, "admin", ["usage:read", "usage:write"], name=DEMO_KEY_NAME)
