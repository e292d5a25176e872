"""Deterministic, realistic ``completions`` events for the benchmarks.

Rows are generated once, as plain tuples in the column order of the SQLite store's table
(``id, organization_id, time``, the meter's dimensions, then its measures), so the raw
baseline inserts exactly the rows meterkit stores. :func:`to_event` turns a row into the
:class:`meterkit.Event` an application would record.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import meterkit
from meterkit.catalog import builtin_meters

__all__ = [
    "DAY",
    "DIMENSIONS",
    "FIRST",
    "MEASURES",
    "METER",
    "QUERY_DAYS",
    "QUERY_END",
    "SPAN_DAYS",
    "START",
    "Dataset",
    "batches",
    "generate",
    "to_event",
]

METER = "completions"
DAY = 86400
START = 1730419200  # 2024-11-01T00:00:00Z: the query window is [START, START + 31 days)
QUERY_DAYS = 31
QUERY_END = START + QUERY_DAYS * DAY
SPAN_DAYS = 33  # events run from the day before START to the day after the window
FIRST = START - DAY

_SPEC = builtin_meters()[METER]
# What the generator fills in: the meter has more (cache writes, modality splits, api_source),
# which its events leave out, as an application recording only these would.
DIMENSIONS: tuple[str, ...] = (
    "project_id",
    "user_id",
    "api_key_id",
    "model",
    "batch",
    "service_tier",
)
MEASURES: tuple[str, ...] = (
    "input_tokens",
    "output_tokens",
    "input_cached_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "num_model_requests",
)
assert set(DIMENSIONS) <= set(_SPEC.dimension_names)
assert set(MEASURES) <= set(_SPEC.measure_names)

# (organization, share of traffic, projects, users)
_ORGS = (("org_acme", 0.70, 5, 60), ("org_globex", 0.22, 3, 25), ("org_initech", 0.08, 2, 8))
# (model, share of traffic, speaks audio)
_MODELS = (
    ("gpt-4o-mini", 0.40, False),
    ("gpt-4o", 0.25, False),
    ("gpt-4.1", 0.15, False),
    ("o3-mini", 0.12, False),
    ("gpt-4o-audio-preview", 0.08, True),
)
_TIERS = (("default", 0.80), ("flex", 0.12), ("priority", 0.08))

Row = tuple[Any, ...]
"""``(id, organization_id, time, *dimensions, *measures)``; an absent measure is ``None``."""


@dataclass(frozen=True)
class Dataset:
    rows: list[Row]
    seed: int
    organizations: tuple[str, ...]
    projects: int
    users: int
    api_keys: int

    @property
    def query_organization(self) -> str:
        """The largest tenant: the one the query benchmark reads."""
        return self.organizations[0]


def _hex(rng: random.Random, bits: int) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def _tokens(rng: random.Random, mu: float, sigma: float, cap: int) -> int:
    return max(1, min(cap, int(rng.lognormvariate(mu, sigma))))


def generate(n: int, seed: int = 20241101) -> Dataset:
    """``n`` events, sorted by time, with unique random ids; the same for the same seed."""
    rng = random.Random(seed)
    # Each tenant's projects with their API keys, and its users (each with a home project).
    tenants: list[tuple[str, dict[str, list[str]], list[tuple[str, str]]]] = []
    n_projects = n_users = n_keys = 0
    for org, _share, projects, users in _ORGS:
        project_keys = {
            f"proj_{_hex(rng, 48)}": [f"key_{_hex(rng, 64)}" for _ in range(rng.randint(2, 4))]
            for _ in range(projects)
        }
        names = list(project_keys)
        members = [(f"user_{_hex(rng, 48)}", rng.choice(names)) for _ in range(users)]
        tenants.append((org, project_keys, members))
        n_projects += projects
        n_users += users
        n_keys += sum(len(k) for k in project_keys.values())
    org_weights = [o[1] for o in _ORGS]
    model_weights = [m[1] for m in _MODELS]
    tier_weights = [t[1] for t in _TIERS]
    org_idx = rng.choices(range(len(_ORGS)), weights=org_weights, k=n)
    model_idx = rng.choices(range(len(_MODELS)), weights=model_weights, k=n)
    tier_idx = rng.choices(range(len(_TIERS)), weights=tier_weights, k=n)
    seen: set[str] = set()
    rows: list[Row] = []
    for i in range(n):
        event_id = f"evt_{_hex(rng, 96)}"
        while event_id in seen:  # pragma: no cover - 96 random bits
            event_id = f"evt_{_hex(rng, 96)}"
        seen.add(event_id)
        org, project_keys, members = tenants[org_idx[i]]
        user, project = rng.choice(members)
        if rng.random() < 0.1:  # now and then a user works in another project of the tenant
            project = rng.choice(list(project_keys))
        keys = project_keys[project]
        model, _share, audio = _MODELS[model_idx[i]]
        batch = rng.random() < 0.08
        tier = "default" if batch else _TIERS[tier_idx[i]][0]
        # Busier in working hours (UTC 08-20), quieter at night.
        day = rng.randrange(SPAN_DAYS)
        second = rng.randrange(DAY) if rng.random() < 0.3 else rng.randrange(8 * 3600, 20 * 3600)
        time = FIRST + day * DAY + second
        n_input = _tokens(rng, 6.5, 1.2, 128_000)
        n_output = _tokens(rng, 5.0, 1.0, 16_384)
        cached = (n_input // 128) * 128 if rng.random() < 0.35 and n_input >= 1024 else 0
        in_audio = _tokens(rng, 6.0, 0.8, 50_000) if audio else None
        out_audio = _tokens(rng, 6.5, 0.8, 50_000) if audio else None
        requests = rng.randint(1, 3) if batch else 1
        rows.append(
            (
                event_id,
                org,
                time,
                project,
                user,
                rng.choice(keys),
                model,
                batch,
                tier,
                n_input,
                n_output,
                cached,
                in_audio,
                out_audio,
                requests,
            )
        )
    rows.sort(key=lambda r: (r[2], r[0]))
    return Dataset(
        rows=rows,
        seed=seed,
        organizations=tuple(o[0] for o in _ORGS),
        projects=n_projects,
        users=n_users,
        api_keys=n_keys,
    )


def to_event(row: Row) -> meterkit.Event:
    """The event an application would record for ``row`` (absent measures left out)."""
    return meterkit.Event(
        row[0],
        METER,
        row[1],
        row[2],
        {m: v for m, v in zip(MEASURES, row[9:], strict=True) if v is not None},
        dict(zip(DIMENSIONS, row[3:9], strict=True)),
    )


def batches(rows: Sequence[Row], size: int) -> Iterator[Sequence[Row]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]
