"""The framework-neutral HTTP surfaces, driven through ``HttpApp.handle`` with ``Request`` objects.

Every documented endpoint, both array-parameter forms, paging to the end, per-kind filters and
group-by, each surface's error shape, the auth matrix, event ingest in all three formats,
NDJSON operations, the OpenAPI document, and random input that must never cause a 5xx.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clock import Monotonic
from meterkit import Meter, Metric, Plan, StoreUnavailable, ValidationError, hookimpl
from meterkit.auth import Principal, create_key, revoke_key
from meterkit.catalog import OPENAI_KINDS
from meterkit.http import HttpApp, Request, Response
from meterkit.http.app import default_surfaces
from meterkit.http.events import parse_rfc3339
from meterkit.http.openai import ENDPOINTS, FILTERS
from meterkit.http.routing import Route
from meterkit.models import MeterSpec
from meterkit.pricing import Price, save_price
from openai_types import consistent_values, fields_of, page_type, result_types

DAY = 86400
T0 = int(dt.datetime(2024, 11, 1, tzinfo=dt.timezone.utc).timestamp())
NOW = T0 + 10 * DAY + 12 * 3600
USAGE = "/v1/organization/usage"

# Key name -> (organization, role, scopes); "revoked" is revoked right after creation.
KEYS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "admin": ("org_a", "admin", ("usage:read", "usage:write")),
    "member": ("org_a", "member", ("usage:read",)),
    "member_rw": ("org_a", "member", ("usage:read", "usage:write")),
    "writer": ("org_a", "member", ("usage:write",)),
    "admin_ro": ("org_a", "admin", ("usage:read",)),
    "other": ("org_b", "admin", ("usage:read", "usage:write")),
    "operator": ("ops", "admin", ("operator",)),
    "revoked": ("org_a", "admin", ("usage:read", "usage:write")),
}

SPECS: dict[str, MeterSpec] = {spec.name: spec for spec in OPENAI_KINDS}


class Assets:
    """Reports stored assets, so storage recalculation has something to count."""

    @hookimpl
    def meterkit_stored_assets(self, organization_id: str) -> dict[str, int]:
        return {"tiles/base": 300, "tiles/overlay": 200}


class Sessions:
    """An application's own session tokens, accepted through ``meterkit_authenticate``."""

    @hookimpl
    def meterkit_authenticate(self, token: str) -> Principal | None:
        if token == "session-of-org-a":
            return Principal("org_a", "member", frozenset({"usage:read"}))
        return None


@attrs.define
class Env:
    meter: Meter
    app: HttpApp
    tokens: dict[str, str]

    def send(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        *,
        key: str | None = "admin",
        token: str | None = None,
        body: Any = None,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        hdrs = dict(headers or {})
        bearer = token if token is not None else (self.tokens[key] if key else None)
        if bearer is not None:
            hdrs["authorization"] = f"Bearer {bearer}"
        if content_type is None and body is not None and not isinstance(body, bytes):
            content_type = "application/json"
        if content_type is not None:
            hdrs["content-type"] = content_type
        raw = (
            body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        )
        return self.app.handle(Request(method, path, tuple(query), hdrs, raw))


def data(response: Response) -> Any:
    return json.loads(b"".join(response.iter_body()))


def lines(response: Response) -> list[Any]:
    text = b"".join(response.iter_body()).decode()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def header(response: Response, name: str) -> str | None:
    return next((v for k, v in response.headers if k.lower() == name), None)


def values_for(kind: str, n: int) -> dict[str, int]:
    """``n`` of every measure, totals the sum of their parts where the meter names sums."""
    return consistent_values(SPECS[kind], n, step=0)


def seed(meter: Meter) -> None:
    """Ten days of completions for org_a (and bigger numbers for org_b), one event per kind."""
    for day in range(10):
        for i, (model, project, batch) in enumerate(
            [("gpt-4o", "p1", True), ("gpt-4o-mini", "p2", False), ("gpt-4o", "p2", None)]
        ):
            dims: dict[str, Any] = {
                "model": model,
                "project_id": project,
                "user_id": "u1",
                "api_key_id": "k1",
                "service_tier": "default",
            }
            if batch is not None:
                dims["batch"] = batch
            meter.record(
                "completions",
                {"input_tokens": 100 * (i + 1), "num_model_requests": 1},
                organization_id="org_a",
                time=T0 + day * DAY + 3600 * i,
                id=f"a-{day}-{i}",
                dimensions=dims,
            )
        meter.record(
            "completions",
            {"input_tokens": 10_000, "num_model_requests": 1},
            organization_id="org_b",
            time=T0 + day * DAY,
            id=f"b-{day}",
            dimensions={"model": "gpt-4o", "project_id": "p1"},
        )
    for kind in SPECS:
        if kind == "completions":
            continue
        dims = {"project_id": "p1"}
        if kind == "images":
            dims.update(source="image.generation", size="1024x1024", model="dall-e-3")
        meter.record(
            kind,
            values_for(kind, 7),
            organization_id="org_a",
            time=T0 + 60,
            id=f"one-{kind}",
            dimensions=dims,
        )


def make_env(url: str = "memory://", *, plugins: Sequence[object] = ()) -> Env:
    meter = Meter(url, clock=lambda: NOW, plugins=[Assets(), Sessions(), *plugins])
    tokens = {}
    for name, (org, role, scopes) in KEYS.items():
        tokens[name], key = create_key(meter, org, role, scopes, name=name)
        if name == "revoked":
            revoke_key(meter, key.id)
    seed(meter)
    return Env(meter, HttpApp(meter), tokens)


@pytest.fixture
def env() -> Iterator[Env]:
    e = make_env()
    yield e
    e.meter.close()


def assert_openai_error(
    response: Response, status: int, param: str | None = None
) -> dict[str, Any]:
    assert response.status == status, data(response)
    assert header(response, "content-type") == "application/json"
    body = data(response)
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if status < 500:
        assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


# -- OpenAI-shaped usage -----------------------------------------------------------------------


def total(page: dict[str, Any], measure: str) -> int:
    return sum(r[measure] for b in page["data"] for r in b["results"])


@pytest.mark.parametrize("kind", list(SPECS))
def test_every_usage_kind_serves_a_page(env: Env, kind: str) -> None:
    r = env.send(
        "GET", f"{USAGE}/{kind}", [("start_time", str(T0)), ("end_time", str(T0 + 7 * DAY))]
    )
    assert r.status == 200
    page = data(r)
    assert page["object"] == "page" and page["has_more"] is False and page["next_page"] is None
    assert [b["start_time"] for b in page["data"]] == [T0 + d * DAY for d in range(7)]
    assert all(
        b["object"] == "bucket" and b["end_time"] - b["start_time"] == DAY for b in page["data"]
    )
    results = [res for b in page["data"] for res in b["results"]]
    assert results and {res["object"] for res in results} == {SPECS[kind].result_object}
    spec = SPECS[kind]
    for res in results:
        assert set(res) == {"object", *spec.measure_names, *spec.dimension_names}
        assert all(res[d] is None for d in spec.dimension_names)  # not grouped
    if kind == "completions":
        assert total(page, "input_tokens") == 7 * 600  # org_b's usage never shows
    else:
        want = values_for(kind, 7)
        assert all(total(page, m) == want[m] for m in spec.measure_names)


def test_array_parameters_in_both_forms(env: Env) -> None:
    base = [("start_time", str(T0)), ("end_time", str(T0 + 3 * DAY))]
    repeated = env.send(
        "GET",
        f"{USAGE}/completions",
        [
            *base,
            ("group_by", "model"),
            ("group_by", "project_id"),
            ("models", "gpt-4o"),
            ("models", "gpt-4o-mini"),
            ("project_ids", "p2"),
        ],
    )
    brackets = env.send(
        "GET",
        f"{USAGE}/completions",
        [
            *base,
            ("group_by[]", "model"),
            ("group_by[]", "project_id"),
            ("models[]", "gpt-4o"),
            ("models[]", "gpt-4o-mini"),
            ("project_ids[]", "p2"),
        ],
    )
    mixed = env.send(
        "GET",
        f"{USAGE}/completions",
        [
            *base,
            ("group_by", "model"),
            ("group_by[]", "project_id"),
            ("models[]", "gpt-4o"),
            ("models", "gpt-4o-mini"),
            ("project_ids", "p2"),
        ],
    )
    assert repeated.status == brackets.status == mixed.status == 200
    assert data(repeated) == data(brackets) == data(mixed)
    rows = {
        (r["model"], r["project_id"]): r["input_tokens"]
        for b in data(repeated)["data"]
        for r in b["results"]
    }
    assert rows == {("gpt-4o", "p2"): 300, ("gpt-4o-mini", "p2"): 200}


@pytest.mark.parametrize("url", ["memory", "sqlite"])
def test_paging_follows_next_page_to_the_end(url: str, tmp_path: Path) -> None:
    e = make_env("memory://" if url == "memory" else f"sqlite:///{tmp_path / 'h.db'}")
    try:
        query = [
            ("start_time", str(T0 + 100)),
            ("end_time", str(T0 + 10 * DAY)),
            ("limit", "3"),
            ("group_by[]", "model"),
        ]
        starts: list[int] = []
        tokens = 0
        page_token: str | None = None
        pages = 0
        while True:
            extra = [("page", page_token)] if page_token else []
            r = e.send("GET", f"{USAGE}/completions", [*query, *extra])
            assert r.status == 200, data(r)
            page = data(r)
            pages += 1
            starts += [b["start_time"] for b in page["data"]]
            tokens += total(page, "input_tokens")
            assert page["has_more"] is (page["next_page"] is not None)
            page_token = page["next_page"]
            if page_token is None:
                break
        assert pages == 4
        assert starts == [T0 + d * DAY for d in range(10)]
        one = e.send("GET", f"{USAGE}/completions", [*query[:2], ("limit", "31")])
        # The first event (T0 + 0s) is before start_time; everything after it counts.
        assert tokens == total(data(one), "input_tokens") == 10 * 600 - 100
    finally:
        e.meter.close()


def test_end_time_defaults_to_now(env: Env) -> None:
    r = env.send("GET", f"{USAGE}/completions", [("start_time", str(T0)), ("limit", "31")])
    page = data(r)
    assert [b["start_time"] for b in page["data"]] == [T0 + d * DAY for d in range(11)]
    assert page["has_more"] is False


def test_minute_and_hour_buckets(env: Env) -> None:
    r = env.send(
        "GET",
        f"{USAGE}/completions",
        [("start_time", str(T0)), ("bucket_width", "1h"), ("limit", "3")],
    )
    page = data(r)
    assert [b["end_time"] - b["start_time"] for b in page["data"]] == [3600] * 3
    assert [total({"data": [b]}, "input_tokens") for b in page["data"]] == [100, 200, 300]
    assert page["has_more"] is True
    r = env.send("GET", f"{USAGE}/completions", [("start_time", str(T0)), ("bucket_width", "1m")])
    assert len(data(r)["data"]) == 60


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if not e.costs], ids=lambda e: e.name)
def test_per_kind_filters_and_group_by(env: Env, endpoint: Any) -> None:
    path = f"{USAGE}/{endpoint.name}"
    base = [("start_time", str(T0)), ("end_time", str(T0 + DAY))]
    for group in endpoint.group_by:
        r = env.send("GET", path, [*base, ("group_by", group)])
        assert r.status == 200, (group, data(r))
    r = env.send("GET", path, [*base, *(("group_by[]", g) for g in endpoint.group_by)])
    assert r.status == 200
    for bad in {
        "project_id",
        "user_id",
        "api_key_id",
        "model",
        "batch",
        "service_tier",
        "size",
        "source",
        "line_item",
        "api_source",
        "context_level",
        "vector_store_id",
    } - set(endpoint.group_by):
        assert_openai_error(env.send("GET", path, [*base, ("group_by", bad)]), 400, "group_by")
    samples = {
        "sources": "image.generation",
        "sizes": "1024x1024",
        "batch": "true",
        "context_levels": "high",
    }
    for name in FILTERS:
        r = env.send("GET", path, [*base, (name, samples.get(name, "p1"))])
        if name in endpoint.filters:
            assert r.status == 200, (name, data(r))
        else:
            assert_openai_error(r, 400, name)


def test_filters_select_what_they_name(env: Env) -> None:
    base = [("start_time", str(T0)), ("end_time", str(T0 + DAY))]

    def tokens(*extra: tuple[str, str]) -> int:
        r = env.send("GET", f"{USAGE}/completions", [*base, *extra])
        assert r.status == 200
        return total(data(r), "input_tokens")

    assert tokens() == 600
    assert tokens(("batch", "true")) == 100
    # Non-batch includes events that never said whether they were batch jobs.
    assert tokens(("batch", "false")) == 500
    assert tokens(("batch", "FALSE"), ("models", "gpt-4o")) == 300
    assert tokens(("project_ids", "p2")) == 500
    assert tokens(("user_ids", "nobody")) == 0
    assert tokens(("api_key_ids[]", "k1")) == 600
    r = env.send(
        "GET",
        f"{USAGE}/images",
        [*base, ("sizes", "1024x1024"), ("sources", "image.generation"), ("group_by", "size")],
    )
    assert [res["size"] for b in data(r)["data"] for res in b["results"]] == ["1024x1024"]


def test_vector_store_bytes_are_a_gauge(env: Env) -> None:
    for i, size in enumerate([100, 400, 250]):
        env.meter.record(
            "vector_stores",
            {"usage_bytes": size},
            organization_id="org_a",
            time=T0 + DAY + i,
            id=f"vs-{i}",
            dimensions={"project_id": "p9"},
        )
    r = env.send(
        "GET",
        f"{USAGE}/vector_stores",
        [("start_time", str(T0 + DAY)), ("limit", "1"), ("project_ids", "p9")],
    )
    assert total(data(r), "usage_bytes") == 250  # the latest value, not the sum


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ([], "start_time"),
        ([("start_time", "")], "start_time"),
        ([("start_time", "abc")], "start_time"),
        ([("start_time", "1.5")], "start_time"),
        ([("start_time", "1e9")], "start_time"),
        ([("start_time", " 1730419200")], "start_time"),
        ([("start_time", "1730419200\n")], "start_time"),
        ([("start_time", "\uff11\uff17\uff13\uff10")], "start_time"),
        ([("start_time", "-5")], "start_time"),
        ([("start_time", "9" * 30)], "start_time"),
        ([("start_time", str(T0)), ("end_time", str(T0))], "end_time"),
        ([("start_time", str(T0)), ("end_time", "soon")], "end_time"),
        ([("start_time", str(T0)), ("bucket_width", "2d")], "bucket_width"),
        ([("start_time", str(T0)), ("bucket_width", "")], "bucket_width"),
        ([("start_time", str(T0)), ("limit", "0")], "limit"),
        ([("start_time", str(T0)), ("limit", "32")], "limit"),
        ([("start_time", str(T0)), ("limit", "169"), ("bucket_width", "1h")], "limit"),
        ([("start_time", str(T0)), ("limit", "1441"), ("bucket_width", "1m")], "limit"),
        ([("start_time", str(T0)), ("limit", "ten")], "limit"),
        ([("start_time", str(T0)), ("group_by", "colour")], "group_by"),
        ([("start_time", str(T0)), ("group_by[]", "")], "group_by"),
        ([("start_time", str(T0)), ("page", "page_bogus")], "page"),
        ([("start_time", str(T0)), ("page", "")], "page"),
        ([("start_time", str(T0)), ("batch", "maybe")], "batch"),
        ([("start_time", str(T0)), ("models", "")], "models"),
        ([("start_time", str(T0)), ("sizes", "1x1")], "sizes"),
        ([("start_time", str(T0)), ("line_items", "x")], "line_items"),
    ],
)
def test_openai_bad_parameters(env: Env, query: list[tuple[str, str]], param: str) -> None:
    kind = "images" if param == "sizes" else "completions"
    error = assert_openai_error(env.send("GET", f"{USAGE}/{kind}", query), 400, param)
    assert error["code"] is not None


def test_a_cursor_from_another_query_or_organization_is_refused(env: Env) -> None:
    query = [("start_time", str(T0)), ("limit", "2")]
    cursor = data(env.send("GET", f"{USAGE}/completions", query))["next_page"]
    assert cursor
    changed = env.send(
        "GET", f"{USAGE}/completions", [*query, ("group_by", "model"), ("page", cursor)]
    )
    assert_openai_error(changed, 400, "page")
    other = env.send("GET", f"{USAGE}/completions", [*query, ("page", cursor)], key="other")
    assert_openai_error(other, 400, "page")


def test_each_organization_reads_only_its_own_usage(env: Env) -> None:
    query = [("start_time", str(T0)), ("end_time", str(T0 + 10 * DAY)), ("limit", "10")]
    mine = data(env.send("GET", f"{USAGE}/completions", query, key="admin"))
    theirs = data(env.send("GET", f"{USAGE}/completions", query, key="other"))
    assert total(mine, "input_tokens") == 6000
    assert total(theirs, "input_tokens") == 100_000
    assert (
        total(data(env.send("GET", f"{USAGE}/embeddings", query, key="other")), "input_tokens") == 0
    )


# -- costs -------------------------------------------------------------------------------------


GPT4O_INPUT = Price(
    "completions",
    "input_tokens",
    "2.50",
    per=1_000_000,
    line_item="gpt-4o, input",
    quantity_unit="tokens",
    where={"model": "gpt-4o"},
)


def test_costs_page(env: Env) -> None:
    save_price(
        env.meter.store,
        GPT4O_INPUT,
        specs=env.meter.meters,
    )
    save_price(
        env.meter.store,
        Price(
            "completions",
            "input_tokens",
            "0.15",
            per=1_000_000,
            line_item="gpt-4o-mini, input",
            quantity_unit="tokens",
            where={"model": "gpt-4o-mini"},
        ),
        specs=env.meter.meters,
    )
    base = [("start_time", str(T0)), ("end_time", str(T0 + 2 * DAY))]
    r = env.send("GET", "/v1/organization/costs", [*base, ("group_by[]", "line_item")])
    assert r.status == 200, data(r)
    page = data(r)
    assert page["object"] == "page" and len(page["data"]) == 2
    results = page["data"][0]["results"]
    assert {res["object"] for res in results} == {"organization.costs.result"}
    by_item = {res["line_item"]: res for res in results}
    assert by_item["gpt-4o, input"]["amount"]["currency"] == "usd"
    assert Decimal(str(by_item["gpt-4o, input"]["amount"]["value"])) == Decimal("0.001")
    filtered = env.send(
        "GET",
        "/v1/organization/costs",
        [*base, ("line_items", "gpt-4o-mini, input"), ("group_by", "line_item")],
    )
    assert {res["line_item"] for b in data(filtered)["data"] for res in b["results"]} == {
        "gpt-4o-mini, input"
    }
    # Paging to the end with a page size of one day.
    starts, cursor = [], None
    while True:
        extra = [("page", cursor)] if cursor else []
        page = data(
            env.send(
                "GET", "/v1/organization/costs", [("start_time", str(T0)), ("limit", "4"), *extra]
            )
        )
        starts += [b["start_time"] for b in page["data"]]
        cursor = page["next_page"]
        if cursor is None:
            break
    assert starts == [T0 + d * DAY for d in range(11)]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ([("bucket_width", "1h")], "bucket_width"),
        ([("limit", "181")], "limit"),
        ([("group_by", "model")], "group_by"),
        ([("models", "gpt-4o")], "models"),
        ([("project_ids", "")], "project_ids"),
    ],
)
def test_costs_bad_parameters(env: Env, query: list[tuple[str, str]], param: str) -> None:
    r = env.send("GET", "/v1/organization/costs", [("start_time", str(T0)), *query])
    assert_openai_error(r, 400, param)


# -- plan usage (FastAPI-shaped) ---------------------------------------------------------------


def test_plan_usage(env: Env) -> None:
    env.meter.set_plan(
        Plan(
            "pro",
            "Professional",
            limits={"tokens": 100_000, "queries": -1, "spaces": 5},
            rate_limit_rpm=60,
            rate_limit_per_day=10_000,
        )
    )
    env.meter.assign_plan("org_a", "pro")
    env.meter.record(
        "tokens", {"tokens": 1200}, organization_id="org_a", time=T0 + 5 * DAY, id="t1"
    )
    env.meter.record("tokens", {"tokens": 99}, organization_id="org_b", time=T0 + 5 * DAY, id="t2")
    r = env.send("GET", "/api/v1/usage", key="member")
    assert r.status == 200
    assert data(r) == {
        "plan": "pro",
        "period_start": "2024-11-01",
        "period_end": "2024-11-11",
        "tokens": {"used": 1200, "limit": 100_000, "remaining": 98_800},
        "queries": {"used": 0, "limit": -1, "remaining": -1},
        "spaces": {"used": 0, "limit": 5, "remaining": 5},
        "rate_limit_rpm": 60,
        "rate_limit_per_day": 10_000,
    }
    r = env.send("GET", "/api/v1/usage", [("start_date", "2024-11-06"), ("end_date", "2024-11-06")])
    assert data(r)["tokens"]["used"] == 1200
    r = env.send("GET", "/api/v1/usage", [("start_date", "2024-11-07")])
    assert data(r)["tokens"]["used"] == 0 and data(r)["period_end"] == "2024-11-11"


def test_plan_usage_shows_a_plan_metric_stored_by_another_process(
    tmp_path: Path, monotonic: Monotonic
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = make_env(url)  # the server: it names no metric
    try:
        with Meter(url, clock=lambda: NOW) as admin:
            admin.set_metric(
                Metric.parse("llm_tokens", "completions.input_tokens + completions.output_tokens")
            )
            admin.set_plan(Plan("pro", limits={"llm_tokens": 20_000, "tokens": 5}))
            admin.assign_plan("org_a", "pro")
        monotonic.t += env.meter.quotas.cache_seconds  # the server's refresh bound
        before = data(env.send("GET", "/api/v1/usage", key="member"))["llm_tokens"]["used"]
        assert before > 0  # the seeded completions, counted by the stored definition
        env.meter.record(
            "completions",
            {"input_tokens": 300, "output_tokens": 700},
            organization_id="org_a",
            time=T0 + 5 * DAY,
            id="c1",
        )
        r = env.send("GET", "/api/v1/usage", key="member")
        assert r.status == 200
        used = before + 1000
        assert data(r)["llm_tokens"] == {"used": used, "limit": 20_000, "remaining": 20_000 - used}
        assert data(r)["tokens"]["limit"] == 5
        r = env.send("GET", "/api/v1/usage", [("start_date", "2024-11-06")], key="member")
        assert data(r)["llm_tokens"]["used"] < used
        # The dashboard's quota panel reads the same numbers.
        r = env.send("GET", "/v1/organization/quota", key="member")
        line = next(x for x in data(r)["limits"] if x["metric"] == "llm_tokens")
        assert (line["used"], line["limit"]) == (used, 20_000)
    finally:
        env.meter.close()


def test_the_meters_an_organization_uses_or_is_limited_on_come_first(env: Env) -> None:
    env.meter.set_metric(Metric.parse("embedded", "embeddings.input_tokens"))
    env.meter.set_plan(Plan("small", limits={"embedded": 1_000, "storage_bytes": 2**30}))
    env.meter.assign_plan("org_b", "small")
    r = env.send("GET", "/v1/organization/meters", key="other")
    assert r.status == 200
    body = data(r)
    assert (body["object"], body["organization_id"], body["days"]) == ("list", "org_b", 30)
    listed = body["data"]
    # org_b used completions only; its plan counts embeddings; the rest in the catalog's order.
    assert [m["name"] for m in listed] == [
        "completions",
        "embeddings",
        *(k for k in SPECS if k not in ("completions", "embeddings")),
    ]
    flags = {m["name"]: (m["in_use"], m["limited"]) for m in listed}
    assert flags["completions"] == (True, False) and flags["embeddings"] == (False, True)
    assert sum(used or limited for used, limited in flags.values()) == 2
    store = next(m for m in listed if m["name"] == "vector_stores")
    assert store["path"] == f"{USAGE}/vector_stores" and store["group_by"] == ["project_id"]
    assert store["measures"] == [{"name": "usage_bytes", "unit": "bytes", "gauge": True}]
    units = {m["name"]: m["unit"] for m in listed[0]["measures"]}
    assert units["input_tokens"] == "tokens" and units["num_model_requests"] == "requests"
    # The quota lines say their unit too.
    quota = data(env.send("GET", "/v1/organization/quota", key="other"))
    assert {x["metric"]: x["unit"] for x in quota["limits"]} == {
        "embedded": "tokens",
        "storage_bytes": "bytes",
    }
    # org_a used every kind in the last 30 days.
    mine = data(env.send("GET", "/v1/organization/meters", key="member"))["data"]
    assert all(m["in_use"] for m in mine)


def test_the_favicon_is_served_without_a_key(env: Env) -> None:
    r = env.send("GET", "/favicon.ico", key=None)
    assert r.status == 200 and header(r, "content-type") == "image/x-icon"
    assert r.body[:4] == b"\x00\x00\x01\x00"  # an ICO file's header
    assert env.send("GET", "/dashboard/favicon.ico", key=None).body == r.body


@pytest.mark.parametrize(
    ("query", "field", "kind"),
    [
        ([("start_date", "yesterday")], "start_date", "date_from_datetime_parsing"),
        ([("start_date", "")], "start_date", "date_from_datetime_parsing"),
        ([("end_date", "2024-02-30")], "end_date", "date_from_datetime_parsing"),
        ([("end_date", "2024-1-1")], "end_date", "date_from_datetime_parsing"),
        ([("end_date", "2024-11-01\n")], "end_date", "date_from_datetime_parsing"),
        ([("start_date", "2024-11-05"), ("end_date", "2024-11-04")], "start_date", "value_error"),
        ([("start_date", "2025-01-01")], "start_date", "value_error"),
        ([("start_date", "1969-12-31")], "start_date", "value_error"),
        ([("start_date", "0001-01-01"), ("end_date", "0001-01-02")], "start_date", "value_error"),
        ([("end_date", "9999-12-31")], "end_date", "value_error"),
        ([("start_date", "9999-12-31"), ("end_date", "9999-12-31")], "start_date", "value_error"),
        # Before the default start (the 1st of this month): end_date's fault, not start_date's.
        ([("end_date", "2024-10-31")], "end_date", "value_error"),
    ],
)
def test_plan_usage_bad_dates_are_fastapi_422(
    env: Env, query: list[tuple[str, str]], field: str, kind: str
) -> None:
    r = env.send("GET", "/api/v1/usage", query)
    assert r.status == 422
    body = data(r)
    assert set(body) == {"detail"} and len(body["detail"]) == 1
    detail = body["detail"][0]
    assert detail["loc"] == ["query", field]
    assert detail["type"] == kind and isinstance(detail["msg"], str) and detail["msg"]
    assert "start_time" not in detail["msg"] and "end_time" not in detail["msg"]
    # The input named is the one at fault, as sent.
    assert detail["input"] == dict(query)[field]


def test_plan_usage_rules_have_one_message_in_python_and_over_http(env: Env) -> None:
    with pytest.raises(ValidationError) as caught:
        env.meter.plan_usage("org_a", "2024-11-05", "2024-11-04")
    r = env.send("GET", "/api/v1/usage", [("start_date", "2024-11-05"), ("end_date", "2024-11-04")])
    assert data(r)["detail"][0]["msg"] == caught.value.message
    for edge in ("1970-01-01", "9999-12-30"):
        assert (
            env.send("GET", "/api/v1/usage", [("start_date", edge), ("end_date", edge)]).status
            == 200
        )


@pytest.mark.parametrize("path", ["/v1/organization/usage/completions", "/v1/organization/costs"])
def test_a_future_start_without_an_end_is_the_starts_fault(env: Env, path: str) -> None:
    r = env.send("GET", path, [("start_time", str(NOW + DAY))])
    error = assert_openai_error(r, 400, "start_time")
    assert "end_time" in error["message"]  # it says what to do: give one
    with pytest.raises(ValidationError) as caught:
        env.meter.usage("completions", organization_id="org_a", start_time=NOW + 1)
    assert caught.value.field == "start_time"
    # The current second itself is in range: the default end includes it.
    assert env.meter.usage("completions", organization_id="org_a", start_time=NOW).data


def test_indexed_array_parameters_are_read_not_ignored(env: Env) -> None:
    plain = [("start_time", str(T0)), ("group_by", "model"), ("group_by", "project_id")]
    indexed = [("start_time", str(T0)), ("group_by[0]", "model"), ("group_by[1]", "project_id")]
    usage = "/v1/organization/usage/completions"
    assert data(env.send("GET", usage, indexed)) == data(env.send("GET", usage, plain))
    bad = [("start_time", str(T0)), ("group_by[0]", "model"), ("group_by[1]", "colour")]
    assert_openai_error(env.send("GET", usage, bad), 400, "group_by")
    filtered = [("start_time", str(T0)), ("models[0]", "no-such-model")]
    buckets = data(env.send("GET", usage, filtered))["data"]
    assert buckets and all(b["results"] == [] for b in buckets)


def test_plan_usage_auth_errors_are_fastapi_shaped(env: Env) -> None:
    r = env.send("GET", "/api/v1/usage", key=None)
    assert (r.status, data(r)) == (401, {"detail": "Not authenticated"})
    assert header(r, "www-authenticate") == "Bearer"
    r = env.send("GET", "/api/v1/usage", token="nope")
    assert (r.status, data(r)) == (401, {"detail": "Invalid authentication credentials"})
    r = env.send("GET", "/api/v1/usage", key="writer")
    assert (r.status, data(r)) == (403, {"detail": "Not enough permissions"})
    r = env.send("GET", "/api/v1/nothing-here")
    assert (r.status, data(r)) == (404, {"detail": "Not Found"})


# -- account usage -----------------------------------------------------------------------------


def test_account_usage_member_and_admin(env: Env) -> None:
    env.meter.set_plan(
        Plan("pro", "Professional", limits={"storage_bytes": 1 << 30}, credits_per_seat=10_000)
    )
    env.meter.assign_plan("org_a", "pro", seats=5)
    env.meter.grant_credits("org_a", 2500)
    env.meter.record("credits", {"credits": 7500}, organization_id="org_a", time=NOW - 60, id="c1")
    member = env.send("GET", "/v1/usage", key="member")
    admin = env.send("GET", "/v1/usage", key="admin_ro")
    assert member.status == admin.status == 200
    m, a = data(member), data(admin)
    assert m["credits"] == {
        "used": 7500,
        "limit": 50_000,
        "available": 45_000,
        "billingPeriod": "monthly",
        "periodStart": "2024-11-01T00:00:00Z",
        "periodEnd": "2024-11-30T23:59:59Z",
    }
    assert m["storage"] == {"used": 0, "limit": 1 << 30}
    assert m["plan"] == {"tier": "pro", "name": "Professional", "billingCycle": "monthly"}
    assert "seats" not in m and "purchasedBalance" not in m["credits"]
    assert a["credits"]["purchasedBalance"] == 2500
    assert a["seats"] == {"count": 5, "creditsPerSeat": 10_000}
    # org_b sees its own (empty) account, never org_a's.
    b = data(env.send("GET", "/v1/usage", key="other"))
    assert b["credits"]["used"] == 0 and b["plan"]["tier"] == "none"


# -- operations --------------------------------------------------------------------------------


OPERATION_PATHS = [
    ("usage.current", "/v1/op/usage.current"),
    ("usage.current", "/v1/usage/current"),
    ("usage.history", "/v1/op/usage.history"),
    ("usage.history", "/v1/usage/history"),
    ("usage.recalculate_storage", "/v1/op/usage.recalculate_storage"),
    ("usage.recalculate_storage", "/v1/usage/recalculate_storage"),
]
CORRECTION_PATHS = [
    ("corrections.void", "/v1/op/corrections.void"),
    ("corrections.void", "/v1/corrections/void"),
    ("corrections.amend", "/v1/op/corrections.amend"),
    ("corrections.amend", "/v1/corrections/amend"),
    ("corrections.list", "/v1/op/corrections.list"),
    ("corrections.list", "/v1/corrections/list"),
]
SPEND_ROUTES = [
    ("GET", "/v1/organization/spend_limit"),
    ("POST", "/v1/organization/spend_limit"),
    ("DELETE", "/v1/organization/spend_limit"),
    ("POST", "/v1/organization/spend_alerts"),
    ("GET", "/v1/organization/spend_alerts"),
    ("GET", "/v1/organization/spend_alerts/{alert_id}"),
    ("POST", "/v1/organization/spend_alerts/{alert_id}"),
    ("DELETE", "/v1/organization/spend_alerts/{alert_id}"),
]
ASSET_PATHS = [
    ("assets.put", "/v1/op/assets.put"),
    ("assets.put", "/v1/assets/put"),
    ("assets.delete", "/v1/op/assets.delete"),
    ("assets.delete", "/v1/assets/delete"),
    ("assets.list", "/v1/op/assets.list"),
    ("assets.list", "/v1/assets/list"),
]


@pytest.mark.parametrize(("op", "path"), OPERATION_PATHS)
def test_operations_answer_ndjson_at_both_paths(env: Env, op: str, path: str) -> None:
    env.meter.record("tiles", {"tiles": 42}, organization_id="org_a", time=NOW - 10, id="tl1")
    r = env.send("POST", path, body={"organization_id": "org_a"})
    assert r.status == 200
    assert header(r, "content-type") == "application/x-ndjson"
    rows = lines(r)
    if op == "usage.current":
        assert len(rows) == 1 and rows[0]["organization_id"] == "org_a"
        assert rows[0]["tiles"]["used"] == 42
        assert set(rows[0]) >= {"storage", "tiles", "credits", "jobs"}
    elif op == "usage.history":
        assert [row["month"] for row in rows] == [
            "2024-06",
            "2024-07",
            "2024-08",
            "2024-09",
            "2024-10",
            "2024-11",
        ]
        assert rows[-1]["tile_requests"] == 42
    else:
        assert len(rows) == 1
        assert rows[0]["storage_bytes"] == 500 and rows[0]["resources"] == 2


def test_operation_history_months(env: Env) -> None:
    r = env.send(
        "POST", "/v1/usage/history", body={"organization_id": "org_a", "months": 2}, key="member"
    )
    rows = lines(r)
    assert [row["month"] for row in rows] == ["2024-10", "2024-11"]
    # JSON has one number type: 2.0 and 2e0 are the integer 2, as the OpenAPI document's
    # "integer" has it.
    for written in (b"2.0", b"2e0"):
        body = b'{"organization_id": "org_a", "months": ' + written + b"}"
        again = env.send(
            "POST", "/v1/usage/history", body=body, key="member", content_type="application/json"
        )
        assert lines(again) == rows


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/usage/current", b"{not json", 400, None),
        ("/v1/usage/current", b"\xff\xfe", 400, None),
        ("/v1/usage/current", [1, 2], 400, None),
        ("/v1/usage/current", b"[" * 100_000, 400, None),
        ("/v1/usage/current", b"NaN", 400, None),
        ("/v1/usage/current", None, 422, "organization_id"),
        ("/v1/usage/current", {"organization_id": 5}, 422, "organization_id"),
        ("/v1/usage/current", {"organization_id": "org_a", "extra": 1}, 422, "extra"),
        ("/v1/usage/history", {"organization_id": "org_a", "months": "six"}, 422, "months"),
        ("/v1/usage/history", {"organization_id": "org_a", "months": 0}, 422, "months"),
        ("/v1/usage/history", {"organization_id": "org_a", "months": 2.5}, 422, "months"),
    ],
)
def test_operation_bad_bodies(
    env: Env, path: str, body: Any, status: int, param: str | None
) -> None:
    r = env.send("POST", path, body=body, content_type=JSON_TYPE if body is not None else None)
    assert_openai_error(r, status, param)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_operations_refuse_bodies_that_are_not_json(env: Env, content_type: str | None) -> None:
    body = json.dumps({"organization_id": "org_a"}).encode()
    for path in ("/v1/op/usage.current", "/v1/usage/history"):
        r = env.send("POST", path, body=body, content_type=content_type)
        error = assert_openai_error(r, 415)
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    ok = env.send("POST", "/v1/usage/current", body=body, content_type="application/json")
    assert ok.status == 200


def test_operations_refuse_other_organizations_scopes_and_members(env: Env) -> None:
    for path in ("/v1/op/usage.current", "/v1/usage/history", "/v1/usage/recalculate_storage"):
        r = env.send("POST", path, body={"organization_id": "org_b"})
        error = assert_openai_error(r, 403, "organization_id")
        assert error["code"] == "forbidden_organization"
        # The same for an organization that does not exist: nothing to tell them apart.
        r = env.send("POST", path, body={"organization_id": "org_zzz"})
        assert assert_openai_error(r, 403)["message"] == error["message"]
    recalc = "/v1/op/usage.recalculate_storage"
    body = {"organization_id": "org_a"}
    assert (
        assert_openai_error(env.send("POST", recalc, body=body, key="member_rw"), 403)["code"]
        == "admin_required"
    )
    assert (
        assert_openai_error(env.send("POST", recalc, body=body, key="admin_ro"), 403)["code"]
        == "insufficient_scope"
    )
    assert (
        assert_openai_error(env.send("POST", "/v1/usage/current", body=body, key="writer"), 403)[
            "code"
        ]
        == "insufficient_scope"
    )


def test_unknown_operations_are_404_after_auth(env: Env) -> None:
    for path in (
        "/v1/op/usage.delete_everything",
        "/v1/op/nothing",
        "/v1/usage/delete",
        "/v1/billing/current",
    ):
        error = assert_openai_error(env.send("POST", path, body={"organization_id": "org_a"}), 404)
        assert error["code"] == "unknown_operation"
        assert_openai_error(env.send("POST", path, key=None), 401)


def test_storage_recalculation_reads_the_asset_registry_without_a_plugin() -> None:
    with Meter("memory://", clock=lambda: NOW) as meter:
        token, _ = create_key(meter, "org_a", "admin", ["usage:read", "usage:write"])
        reader, _ = create_key(meter, "org_a", "member", ["usage:read"])
        app = HttpApp(meter)

        def post(path: str, body: dict[str, Any], key: str = token) -> tuple[int, list[Any]]:
            r = app.handle(
                Request(
                    "POST",
                    path,
                    (),
                    {"authorization": f"Bearer {key}", "content-type": JSON_TYPE},
                    json.dumps(body).encode(),
                )
            )
            text = b"".join(r.iter_body())
            return r.status, [json.loads(line) for line in text.splitlines() if line]

        org = {"organization_id": "org_a"}
        for resource, size in (("tiles/base", 300), ("tiles/overlay", 200), ("tiles/base", 350)):
            status, rows = post("/v1/op/assets.put", {**org, "resource": resource, "bytes": size})
            assert status == 200 and rows[0]["bytes"] == size
        status, rows = post("/v1/assets/put", {**org, "resource": "x", "bytes": -1})
        assert status == 422 and rows[0]["error"]["param"] == "bytes"
        status, _ = post("/v1/op/assets.put", {**org, "resource": "y", "bytes": 1}, reader)
        assert status == 403
        status, listed = post("/v1/assets/list", org, reader)
        assert [(a["resource"], a["bytes"]) for a in listed] == [
            ("tiles/base", 350),
            ("tiles/overlay", 200),
        ]
        status, rows = post("/v1/usage/recalculate_storage", org)
        assert status == 200 and rows[0]["storage_bytes"] == 550
        _, rows = post("/v1/op/assets.delete", {**org, "resource": "tiles/overlay"})
        assert rows[0]["deleted"] is True
        _, rows = post("/v1/op/usage.recalculate_storage", org)
        assert rows[0]["storage_bytes"] == 350
        assert meter.quotas.used("org_a", "storage_bytes") == 350


# -- event ingest ------------------------------------------------------------------------------


def native(eid: str, tokens: int = 5, **extra: Any) -> dict[str, Any]:
    return {
        "id": eid,
        "meter": "tokens",
        "time": T0 + 7 * DAY,
        "values": {"tokens": tokens},
        "dimensions": {"model": "m1"},
        **extra,
    }


def cloud(eid: str, tokens: int = 5, **extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": eid,
        "source": "/billing",
        "type": "meterkit.tokens",
        "time": "2024-11-08T00:00:00Z",
        "datacontenttype": "application/json",
        "data": {"values": {"tokens": tokens}, "dimensions": {"model": "m1"}},
        **extra,
    }


def tokens_on_day7(env: Env, org: str = "org_a") -> int:
    return int(
        env.meter.total(
            "tokens", "tokens", organization_id=org, start_time=T0 + 7 * DAY, end_time=T0 + 8 * DAY
        )
    )


def counts(r: Any) -> dict[str, int]:
    """The totals of an ingest answer, after checking they agree with its per-event statuses."""
    body = data(r)
    statuses = [e["status"] for e in body["events"]]
    assert body["accepted"] == statuses.count("accepted")
    assert body["duplicates"] == statuses.count("duplicate")
    assert body["conflicts"] == statuses.count("conflict")
    return {k: body[k] for k in ("accepted", "duplicates") if k in body} | (
        {"conflicts": body["conflicts"]} if body["conflicts"] else {}
    )


def test_ingest_a_json_array_with_duplicates(env: Env) -> None:
    batch = [native("e1", 5), native("e2", 7, organization_id="org_a"), native("e1", 5)]
    r = env.send("POST", "/v1/events", body=batch, key="writer")
    assert (r.status, counts(r)) == (200, {"accepted": 2, "duplicates": 1})
    assert [e["status"] for e in data(r)["events"]] == ["accepted", "accepted", "duplicate"]
    r = env.send(
        "POST",
        "/v1/events",
        body=batch,
        key="writer",
        content_type="application/json; charset=utf-8",
    )
    assert counts(r) == {"accepted": 0, "duplicates": 3}
    assert tokens_on_day7(env) == 12


def test_ingest_reports_an_id_reused_with_other_data(env: Env) -> None:
    env.send("POST", "/v1/events", body=[native("e1", 5)], key="writer")
    batch = [native("e1", 5), native("e1", 6), native("e2", 1)]
    r = env.send("POST", "/v1/events", body=batch, key="writer")
    assert r.status == 200 and counts(r) == {"accepted": 1, "duplicates": 1, "conflicts": 1}
    assert data(r)["events"] == [
        {"id": "e1", "meter": "tokens", "status": "duplicate"},
        {"id": "e1", "meter": "tokens", "status": "conflict"},
        {"id": "e2", "meter": "tokens", "status": "accepted"},
    ]
    assert tokens_on_day7(env) == 6  # the stored e1 (5) is unchanged, e2 added


def test_ingest_ids_belong_to_the_organization(env: Env) -> None:
    # org_b uses an id first; org_a's own event of that id is still new, not a duplicate.
    r = env.send("POST", "/v1/events", body=[native("shared", 9)], key="other")
    assert counts(r) == {"accepted": 1, "duplicates": 0}
    r = env.send("POST", "/v1/events", body=[native("shared", 5)], key="writer")
    assert counts(r) == {"accepted": 1, "duplicates": 0}
    assert tokens_on_day7(env) == 5 and tokens_on_day7(env, "org_b") == 9


@pytest.mark.parametrize(
    ("event", "param"),
    [
        ({"id": "\ud800"}, "events[0].id"),
        ({"dimensions": {"model": "x\udfffy"}}, "events[0].dimensions.model"),
        ({"dimensions": {"model": "a\u0000b"}}, "events[0].dimensions.model"),
        ({"meter": "tok\ud800ens"}, "events[0].meter"),
        ({"values": {"tokens": 2**53}}, "events[0].values.tokens"),
        ({"values": {"tokens": 1.5}}, "events[0].values.tokens"),
        ({"time": NOW + 301}, "events[0].time"),
    ],
)
def test_hostile_events_over_http_are_422_never_500(
    env: Env, event: dict[str, Any], param: str
) -> None:
    # Escaped in the JSON text, as a client would send them: lone surrogates and NUL included.
    body = json.dumps([{**native("h1", 1), **event}]).encode()
    r = env.send("POST", "/v1/events", body=body, content_type=JSON_TYPE)
    assert_openai_error(r, 422, param)
    assert tokens_on_day7(env) == 0


def test_ingest_needs_a_known_content_type(env: Env) -> None:
    body = json.dumps([native("x")]).encode()
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
        r = env.send("POST", "/v1/events", body=body, content_type=content_type)
        error = assert_openai_error(r, 415)
        assert error["code"] == "unsupported_media_type"
        for media in (
            "application/json",
            "application/x-ndjson",
            "application/cloudevents+json",
            "application/cloudevents-batch+json",
        ):
            assert media in error["message"] and media in (header(r, "accept-post") or "")
    assert tokens_on_day7(env) == 0


def test_ingest_ndjson(env: Env) -> None:
    body = "\n".join(json.dumps(native(f"n{i}", i)) for i in range(1, 5)) + "\n\n"
    r = env.send("POST", "/v1/events", body=body.encode(), content_type="application/x-ndjson")
    assert (r.status, counts(r)) == (200, {"accepted": 4, "duplicates": 0})
    assert tokens_on_day7(env) == 10
    r = env.send("POST", "/v1/events", body=b'{"id": "n1"\n', content_type="application/x-ndjson")
    assert_openai_error(r, 400)


def test_ingest_cloudevents(env: Env) -> None:
    batch = [
        cloud("c1", 3),
        cloud("c2", 4, type="tokens", subject="org_a", time="2024-11-08T01:00:00.75+01:00"),
        {"id": "c3", "type": "meterkit.tokens", "data": {"values": {"tokens": 10}}},
    ]
    r = env.send(
        "POST", "/v1/events", body=batch, content_type="application/cloudevents-batch+json"
    )
    assert (r.status, counts(r)) == (200, {"accepted": 3, "duplicates": 0})
    assert tokens_on_day7(env) == 7  # c2 is at 00:00:00.75Z, c3 (no time) is now (day 10)
    stored = {e.id: e for e in env.meter.store.scan("tokens", "org_a", 0, NOW + 1)}
    assert stored["c2"].time == T0 + 7 * DAY and stored["c3"].time == NOW
    again = env.send(
        "POST", "/v1/events", body=batch[:1], content_type="application/cloudevents-batch+json"
    )
    assert counts(again) == {"accepted": 0, "duplicates": 1}
    single = env.send(
        "POST", "/v1/events", body=cloud("c9", 1), content_type="application/cloudevents+json"
    )
    assert counts(single) == {"accepted": 1, "duplicates": 0}


JSON_TYPE = "application/json"


@pytest.mark.parametrize(
    ("content_type", "batch", "status", "param"),
    [
        (JSON_TYPE, [native("ok"), native("bad", values={"nope": 1})], 422, "events[1].values"),
        (JSON_TYPE, [native("ok"), native("bad", tokens=-1)], 422, "events[1].values.tokens"),
        (
            JSON_TYPE,
            [native("ok"), {"meter": "tokens", "values": {"tokens": 1}}],
            422,
            "events[1].id",
        ),
        (JSON_TYPE, [native("ok"), native("bad", meter="nope")], 422, "events[1].meter"),
        (JSON_TYPE, [native("ok"), native("bad", colour="red")], 422, "events[1]"),
        (JSON_TYPE, [native("ok"), "event"], 422, "events[1]"),
        (JSON_TYPE, [native("ok"), native("bad", time="yesterday")], 422, "events[1].time"),
        (
            JSON_TYPE,
            [native("ok"), native("bad", organization_id="org_b")],
            403,
            "events[1].organization_id",
        ),
        (JSON_TYPE, {"id": "x"}, 400, None),
        (JSON_TYPE, b"[{", 400, None),
        ("text/plain", [native("ok")], 415, None),
        (
            "application/cloudevents-batch+json",
            [cloud("ok"), cloud("bad", subject="org_b")],
            403,
            "events[1].subject",
        ),
        (
            "application/cloudevents-batch+json",
            [cloud("ok"), cloud("bad", time="2024-11-08")],
            422,
            "events[1].time",
        ),
        (
            "application/cloudevents-batch+json",
            [cloud("ok"), cloud("bad", specversion="0.3")],
            422,
            "events[1].specversion",
        ),
        (
            "application/cloudevents-batch+json",
            [cloud("ok"), cloud("bad", data={"tokens": 1})],
            422,
            "events[1].data",
        ),
        (
            "application/cloudevents-batch+json",
            [cloud("ok"), cloud("bad", type="meterkit.x")],
            422,
            "events[1].meter",
        ),
        (
            "application/cloudevents-batch+json",
            [cloud("ok"), cloud("bad", data=None)],
            422,
            "events[1].data",
        ),
    ],
)
def test_a_bad_event_stores_nothing(
    env: Env, content_type: str | None, batch: Any, status: int, param: str | None
) -> None:
    body = batch if isinstance(batch, bytes) else json.dumps(batch).encode()
    r = env.send("POST", "/v1/events", body=body, content_type=content_type)
    assert_openai_error(r, status, param)
    assert tokens_on_day7(env) == 0
    assert tokens_on_day7(env, "org_b") == 0


def test_ingest_limits_and_scope(env: Env) -> None:
    small = HttpApp(env.meter, max_body_bytes=200)
    r = small.handle(
        Request(
            "POST",
            "/v1/events",
            (),
            {"authorization": f"Bearer {env.tokens['admin']}", "content-type": JSON_TYPE},
            json.dumps([native(f"x{i}") for i in range(5)]).encode(),
        )
    )
    assert assert_openai_error(r, 413)["code"] == "payload_too_large"
    assert_openai_error(env.send("POST", "/v1/events", body=[native("e")], key="member"), 403)
    r = env.send("POST", "/v1/events", body=[native("e")], key="other")
    assert counts(r) == {"accepted": 1, "duplicates": 0}  # org_b's own event, defaulted
    assert tokens_on_day7(env, "org_b") == 5 and tokens_on_day7(env) == 0
    assert data(env.send("POST", "/v1/events", body=[]))["accepted"] == 0


def test_an_error_echoes_a_huge_bad_input_cut_short(env: Env) -> None:
    """A 1 MB unknown dimension key, a 1 MB bad date: the reply names the field and stays
    small (it echoed the input whole, twice: a 2 MB 422)."""
    huge = "k" * 1_000_000
    event = {**native("huge"), "dimensions": {huge: "x"}}
    r = env.send("POST", "/v1/events", body=[event])
    error = assert_openai_error(r, 422)
    assert len(r.body) < 2_000
    assert error["param"].startswith("events[0].dimensions") and error["param"].endswith("…")
    r = env.send("GET", "/api/v1/usage", [("start_date", "2" * 1_000_000)])
    assert r.status == 422 and len(r.body) < 2_000


def test_rfc3339() -> None:
    assert parse_rfc3339("2024-11-01T00:00:00Z", "t") == T0
    assert parse_rfc3339("2024-11-01t00:00:00.999z", "t") == T0
    assert parse_rfc3339("2024-11-01T02:00:00+02:00", "t") == T0
    assert parse_rfc3339("2024-10-31T23:59:59.5-00:00", "t") == T0 - 1


# -- auth matrix -------------------------------------------------------------------------------


MATRIX_EVENT = {"organization_id": "org_a", "meter": "requests", "event_id": "matrix"}
MATRIX_ALERT = {
    "currency": "USD",
    "interval": "month",
    "threshold_amount": 500,
    "notification_channel": {"type": "email", "recipients": ["ops@example.com"]},
}


def valid_request(method: str, path: str) -> tuple[list[tuple[str, str]], Any]:
    """A request every route answers 2xx for, given the right key."""
    if path.startswith("/v1/operator/"):
        return [], OPERATOR_BODIES.get((method, path.rsplit("/", 1)[1]))
    if path.endswith("/spend_limit") and method == "POST":
        return [], {"currency": "USD", "interval": "month", "threshold_amount": 1000}
    if "/spend_alerts" in path:
        return [], MATRIX_ALERT if method == "POST" else None
    if path.endswith("/spend_limit"):
        return [], None
    if path.startswith("/v1/organization/"):
        return [("start_time", str(T0))], None
    if path == "/v1/events":
        return [], [native("auth-matrix")]
    if path.endswith(("assets.put", "assets/put")):
        return [], {"organization_id": "org_a", "resource": "matrix", "bytes": 1}
    if path.endswith(("assets.delete", "assets/delete")):
        return [], {"organization_id": "org_a", "resource": "matrix"}
    if path.endswith(("corrections.void", "corrections/void")):
        return [], {**MATRIX_EVENT, "reason": "matrix"}
    if path.endswith(("corrections.amend", "corrections/amend")):
        return [], {**MATRIX_EVENT, "reason": "matrix", "values": {"requests": 2}}
    if method == "POST":
        return [], {"organization_id": "org_a"}
    return [], None


OPERATOR_BODIES: dict[tuple[str, str], Any] = {
    ("PUT", "{plan_id}"): {"limits": {"tokens": 10}},
    ("PUT", "plan"): {"plan": "free"},
    ("POST", "credit_grants"): {"credits": 1},
    ("PUT", "spend_cap"): {"threshold_amount": 1000},
}
OPERATOR_ROUTES = [
    ("GET", "/v1/operator/plans/{plan_id}"),
    ("PUT", "/v1/operator/plans/{plan_id}"),
    *(
        (method, f"/v1/operator/organizations/{{organization_id}}/{tail}")
        for method, tail in [
            ("GET", "plan"),
            ("PUT", "plan"),
            ("POST", "credit_grants"),
            ("GET", "spend_cap"),
            ("PUT", "spend_cap"),
            ("DELETE", "spend_cap"),
        ]
    ),
]


def auth_routes() -> list[Route]:
    return [r for s in default_surfaces() for r in s.routes if r.auth and not r.hidden]


def shape_of(response: Response) -> str:
    body = data(response)
    return "fastapi" if set(body) == {"detail"} else "openai" if set(body) == {"error"} else "?"


@pytest.mark.parametrize("route", auth_routes(), ids=lambda r: f"{r.method} {r.path}")
def test_auth_matrix(env: Env, route: Route) -> None:
    query, body = valid_request(route.method, route.path)
    expected_shape = "fastapi" if route.errors.name == "fastapi" else "openai"
    path = route.path.replace("{alert_id}", "spalert_matrix")
    path = path.replace("{plan_id}", "free").replace("{organization_id}", "org_a")
    env.meter.set_spend_limit("org_a", 1000)  # what the spend routes read and delete
    env.meter.set_spend_cap("org_a", 2000)
    env.meter.put_spend_alert("org_a", "spalert_matrix", MATRIX_ALERT)
    env.meter.record("requests", {"requests": 1}, organization_id="org_a", id="matrix")

    def send(**kw: Any) -> Response:
        return env.send(route.method, path, query, body=body, **kw)

    for kw in (
        {"key": None},
        {"token": "mk_0000000000000000_" + "A" * 43},
        {"token": "junk"},
        {"key": "revoked"},
        {"key": None, "headers": {"authorization": "Basic abc"}},
        {"key": None, "headers": {"authorization": "Bearer "}},
    ):
        r = send(**kw)
        assert r.status == 401, kw
        assert shape_of(r) == expected_shape
        assert header(r, "www-authenticate") == "Bearer"
    operator = route.scope == "operator"
    if operator:  # what the operator routes read
        env.meter.set_plan(Plan("free"))
        env.meter.assign_plan("org_a", "free")
    wrong = "writer" if route.scope == "usage:read" else "admin" if operator else "member"
    r = send(key=wrong)
    assert r.status == 403 and shape_of(r) == expected_shape
    if route.admin:
        r = send(key="member_rw")
        assert r.status == 403 and shape_of(r) == expected_shape
    ok = send(key="operator" if operator else "admin")
    assert 200 <= ok.status < 300, data(ok)


def test_every_authenticated_route_is_in_the_matrix() -> None:
    covered = {(r.method, r.path) for r in auth_routes()}
    documented = {("GET", f"{USAGE}/{k}") for k in SPECS} | {
        ("GET", "/v1/organization/costs"),
        ("GET", "/api/v1/usage"),
        ("GET", "/v1/usage"),
        ("GET", "/v1/organization/quota"),
        ("GET", "/v1/organization/meters"),
        ("POST", "/v1/events"),
        *(("POST", p) for _, p in [*OPERATION_PATHS, *ASSET_PATHS, *CORRECTION_PATHS]),
        *SPEND_ROUTES,
        *OPERATOR_ROUTES,
    }
    assert covered == documented


def test_meterkit_authenticate_hook_over_http(env: Env) -> None:
    r = env.send("GET", "/v1/usage", token="session-of-org-a")
    assert r.status == 200 and "seats" not in data(r)
    r = env.send(
        "POST", "/v1/usage/current", token="session-of-org-a", body={"organization_id": "org_a"}
    )
    assert r.status == 200
    r = env.send("POST", "/v1/events", token="session-of-org-a", body=[native("s")])
    assert r.status == 403  # a member session with only usage:read
    assert env.send("GET", "/v1/usage", token="session-of-org-b").status == 401


def test_a_misbehaving_authenticate_hook_is_a_generic_500() -> None:
    class Broken:
        @hookimpl
        def meterkit_authenticate(self, token: str) -> Any:
            return "org_a"

    with Meter("memory://", plugins=[Broken()]) as meter:
        r = HttpApp(meter).handle(Request("GET", "/v1/usage", (), {"authorization": "Bearer x"}))
        assert assert_openai_error(r, 500)["code"] == "internal_error"


# -- the official openai SDK, through an in-process transport -----------------------------------


def sdk_client(env: Env, key: str | None = "admin") -> Any:
    """An ``openai.OpenAI`` whose HTTP requests go straight to ``HttpApp.handle``."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")

    def transport(request: Any) -> Any:
        response = env.app.handle(
            Request(
                request.method,
                request.url.path,
                tuple(request.url.params.multi_items()),
                {k.lower(): v for k, v in request.headers.items()},
                request.content,
            )
        )
        return httpx.Response(
            response.status, headers=list(response.headers), content=b"".join(response.iter_body())
        )

    token = env.tokens[key] if key else "mk_nope"
    return openai.OpenAI(
        api_key=token,
        admin_api_key=token,
        base_url="http://meterkit.test/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(transport)),
    )


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_openai_sdk_pages_every_endpoint_to_the_end(env: Env, endpoint: Any) -> None:
    usage = sdk_client(env).admin.organization.usage
    call = getattr(usage, endpoint.name)
    starts: list[int] = []
    cursor = None
    while True:
        page = call(
            start_time=T0,
            end_time=T0 + 10 * DAY,
            limit=3,
            group_by=["project_id"],
            project_ids=["p1", "p2"],
            **({"page": cursor} if cursor else {}),
        )
        starts += [bucket.start_time for bucket in page.data]
        if not page.has_more:
            assert page.next_page is None
            break
        cursor = page.next_page
    assert starts == [T0 + d * DAY for d in range(10)]


def _sdk_params(kind: str) -> set[str]:
    """The query parameters the SDK's method for ``kind`` takes."""
    import typing

    module = __import__(f"openai.types.admin.organization.usage_{kind}_params", fromlist=["_"])
    params = next(v for k, v in vars(module).items() if k.endswith("Params"))
    return set(typing.get_type_hints(params))


def _sdk_group_by(kind: str) -> list[str]:
    import typing

    module = __import__(f"openai.types.admin.organization.usage_{kind}_params", fromlist=["_"])
    params = next(v for k, v in vars(module).items() if k.endswith("Params"))
    hint = typing.get_type_hints(params)["group_by"]
    while typing.get_origin(hint) is not typing.Literal:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return list(typing.get_args(hint))


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_endpoint_table_is_the_sdks(endpoint: Any) -> None:
    # Each endpoint's filters and group_by values are exactly those its SDK method takes.
    pytest.importorskip("openai")
    common = {"start_time", "end_time", "bucket_width", "group_by", "limit", "page"}
    assert set(endpoint.filters) == _sdk_params(endpoint.name) - common
    assert set(endpoint.group_by) == set(_sdk_group_by(endpoint.name))


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_openai_sdk_types_parse_every_page_strictly(env: Env, endpoint: Any) -> None:
    # Grouped by every field it allows, each page is the SDK's own type under strict
    # validation (integers where it says int, the literal result object, no missing field).
    raw = getattr(sdk_client(env).admin.organization.usage.with_raw_response, endpoint.name)
    model = page_type(endpoint.name)
    cursor = None
    pages = 0
    while True:
        response = raw(
            start_time=T0,
            end_time=T0 + 10 * DAY,
            limit=4,
            group_by=list(endpoint.group_by),
            **({"page": cursor} if cursor else {}),
        )
        body = response.http_response.json()
        model.model_validate(body, strict=True)  # type: ignore[attr-defined]
        parsed = response.parse()
        pages += 1
        results = [r for b in body["data"] for r in b["results"]]
        if pages == 1 and not endpoint.costs:  # the seed sets no prices
            assert results, "the seed has usage of every kind in its first days"
            assert all(set(r) >= set(endpoint.group_by) for r in results)
        if not parsed.has_more:
            break
        cursor = parsed.next_page
    assert pages == 3


def test_new_kinds_filter_and_group_like_the_sdk(env: Env) -> None:
    meter = env.meter
    for i, (store, level, source) in enumerate(
        [("vs_1", "low", None), ("vs_2", "high", "agents_api"), ("vs_1", "high", "unlabeled")]
    ):
        dims = {"project_id": "p9", "vector_store_id": store}
        meter.record(
            "file_search_calls",
            {"num_requests": 10 + i},
            organization_id="org_a",
            time=T0 + 100 + i,
            id=f"fs{i}",
            dimensions=dims,
        )
        web: dict[str, Any] = {"project_id": "p9", "context_level": level, "model": "gpt-4o"}
        if source:
            web["api_source"] = source
        meter.record(
            "web_search_calls",
            {"num_requests": 3 + i, "num_model_requests": 1},
            organization_id="org_a",
            time=T0 + 100 + i,
            id=f"ws{i}",
            dimensions=web,
        )
    usage = sdk_client(env).admin.organization.usage
    page = usage.file_search_calls(
        start_time=T0, end_time=T0 + DAY, group_by=["vector_store_id"], vector_store_ids=["vs_1"]
    )
    rows = {r.vector_store_id: r.num_requests for r in page.data[0].results}
    assert rows == {"vs_1": 10 + 12}
    page = usage.web_search_calls(
        start_time=T0,
        end_time=T0 + DAY,
        group_by=["context_level", "api_source"],
        context_levels=["high"],
        project_ids=["p9"],
    )
    rows = {(r.context_level, r.api_source): r.num_requests for r in page.data[0].results}
    # No source and "unlabeled" are one group, which reads "unlabeled".
    assert rows == {("high", "agents_api"): 4, ("high", "unlabeled"): 5}
    bad = env.send(
        "GET",
        f"{USAGE}/web_search_calls",
        [("start_time", str(T0)), ("context_levels", "deep")],
    )
    assert_openai_error(bad, 400, "context_levels")


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_organization_usage_takes_admin_keys_unless_members_are_allowed(
    env: Env, endpoint: Any
) -> None:
    import openai

    query = [("start_time", str(T0)), ("end_time", str(T0 + DAY))]
    refused = env.send("GET", endpoint.path, query, key="member")
    assert_openai_error(refused, 403)
    assert data(refused)["error"]["code"] == "admin_required"
    with pytest.raises(openai.PermissionDeniedError):
        getattr(sdk_client(env, "member").admin.organization.usage, endpoint.name)(start_time=T0)
    assert env.send("GET", endpoint.path, query, key="admin").status == 200
    relaxed = HttpApp(env.meter, member_usage=True)
    token = env.tokens["member"]
    allowed = relaxed.handle(
        Request("GET", endpoint.path, tuple(query), {"authorization": f"Bearer {token}"})
    )
    assert allowed.status == 200
    # A member still needs usage:read.
    writer = relaxed.handle(
        Request(
            "GET", endpoint.path, tuple(query), {"authorization": f"Bearer {env.tokens['writer']}"}
        )
    )
    assert writer.status == 403


def test_openapi_types_measures_as_the_official_types(env: Env) -> None:
    schemas = env.app.openapi()["components"]["schemas"]
    types = result_types()
    for endpoint in ENDPOINTS:
        schema = schemas[f"{endpoint.title}Result"]
        obj = schema["properties"]["object"]["const"]
        numbers, _required, groups = fields_of(types[obj])
        if endpoint.costs:
            assert set(schema["required"]) >= {"quantity", "quantity_unit", *groups}
            continue
        for name in numbers:
            assert schema["properties"][name] == {"type": "integer"}, (endpoint.name, name)
        assert set(schema["required"]) == {"object", *numbers, *groups}


def test_openai_sdk_sees_openai_errors(env: Env) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        sdk_client(env).admin.organization.usage.completions(start_time=T0, limit=99)
    assert bad.value.status_code == 400 and bad.value.param == "limit"
    with pytest.raises(openai.AuthenticationError):
        sdk_client(env, None).admin.organization.usage.completions(start_time=T0)
    with pytest.raises(openai.PermissionDeniedError):
        sdk_client(env, "writer").admin.organization.usage.embeddings(start_time=T0)
    page = sdk_client(env).admin.organization.usage.completions(
        start_time=T0,
        end_time=T0 + DAY,
        group_by=["model", "batch"],
        batch=False,
        models=["gpt-4o", "gpt-4o-mini"],
    )
    rows = {(r.model, r.batch): r.input_tokens for r in page.data[0].results}
    assert rows == {("gpt-4o", None): 300, ("gpt-4o-mini", False): 200}


# -- meta, routing and failures ----------------------------------------------------------------


def test_healthz(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    r = env.send("GET", "/healthz", key=None)
    assert (r.status, data(r)) == (200, {"status": "ok"})

    def down(*_: Any) -> Any:
        raise StoreUnavailable("connection refused")

    monkeypatch.setattr(env.meter.store, "get_record", down)
    r = env.send("GET", "/healthz", key=None)
    assert (r.status, data(r)) == (503, {"status": "unavailable"})


def test_not_found_and_method_not_allowed(env: Env) -> None:
    assert assert_openai_error(env.send("GET", "/nothing"), 404)["code"] == "not_found"
    assert_openai_error(
        env.send("GET", "/v1/organization/usage/tokens", [("start_time", "1")]), 404
    )
    assert_openai_error(env.send("GET", f"{USAGE}/completions/", [("start_time", "1")]), 404)
    r = env.send("POST", f"{USAGE}/completions")
    assert_openai_error(r, 405)
    assert header(r, "allow") == "GET"
    r = env.send("POST", "/v1/organization/costs")
    assert (r.status, header(r, "allow")) == (405, "GET")
    r = env.send("GET", "/v1/usage/current")
    assert (r.status, header(r, "allow")) == (405, "POST")
    r = env.send("DELETE", "/api/v1/usage")
    assert (r.status, data(r)) == (405, {"detail": "Method Not Allowed"})


@pytest.mark.parametrize(
    ("method", "path", "query", "body", "target", "shape"),
    [
        ("GET", f"{USAGE}/completions", [("start_time", str(T0))], None, "usage_dict", "openai"),
        ("GET", "/api/v1/usage", [], None, "plan_usage", "fastapi"),
        ("GET", "/v1/usage", [], None, "account_usage", "openai"),
        ("POST", "/v1/usage/current", [], {"organization_id": "org_a"}, "current_usage", "openai"),
        ("POST", "/v1/events", [], [native("u")], "record_many", "openai"),
    ],
)
def test_store_outage_is_503_and_a_bug_is_a_generic_500(
    env: Env,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    query: list[tuple[str, str]],
    body: Any,
    target: str,
    shape: str,
) -> None:
    def down(*_: Any, **__: Any) -> Any:
        raise StoreUnavailable("db is down")

    def bug(*_: Any, **__: Any) -> Any:
        raise KeyError("secret internal detail")

    for fake, status in ((down, 503), (bug, 500)):
        monkeypatch.setattr(env.meter, target, fake)
        r = env.send(method, path, query, body=body)
        assert r.status == status and shape_of(r) == shape
        text = b"".join(r.iter_body()).decode()
        assert "secret internal detail" not in text and "Traceback" not in text
        assert "db is down" not in text
        if status == 503:
            assert header(r, "retry-after") == "1"


# -- OpenAPI -----------------------------------------------------------------------------------


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def test_openapi_lists_every_route(env: Env) -> None:
    r = env.send("GET", "/openapi.json", key=None)
    assert r.status == 200
    doc = data(r)
    assert doc["openapi"].startswith("3.1")
    listed = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = {(route.method, route.path) for route in env.app.routes if not route.hidden}
    contract = {("GET", f"{USAGE}/{k}") for k in SPECS} | {
        ("GET", "/v1/organization/costs"),
        ("GET", "/api/v1/usage"),
        ("GET", "/v1/usage"),
        ("GET", "/v1/organization/quota"),
        ("GET", "/v1/organization/meters"),
        ("POST", "/v1/events"),
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
        ("GET", "/favicon.ico"),
        ("GET", "/dashboard"),
        ("GET", "/dashboard/{asset}"),
        *(("POST", p) for _, p in [*OPERATION_PATHS, *ASSET_PATHS, *CORRECTION_PATHS]),
        *SPEND_ROUTES,
        *OPERATOR_ROUTES,
    }
    assert listed == served == contract
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A meterkit API key (mk_...).",
    }
    for route in env.app.routes:
        if route.hidden:
            continue
        op = doc["paths"][route.path][route.method.lower()]
        assert op["security"] == ([{"bearerAuth": []}] if route.auth else [])
        assert "200" in op["responses"] and "500" in op["responses"]
        if route.auth:
            assert {"401", "403"} <= set(op["responses"])
    schemas = doc["components"]["schemas"]
    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas


def test_openapi_parameters_follow_the_endpoint_table(env: Env) -> None:
    doc = env.app.openapi()
    for endpoint in ENDPOINTS:
        op = doc["paths"][endpoint.path]["get"]
        params = {p["name"]: p for p in op["parameters"]}
        assert set(params) == {
            "start_time",
            "end_time",
            "bucket_width",
            "group_by",
            "limit",
            "page",
            *endpoint.filters,
        }
        assert params["start_time"]["required"] is True
        assert params["group_by"]["schema"]["items"]["enum"] == list(endpoint.group_by)
        assert params["bucket_width"]["schema"]["enum"] == list(endpoint.widths)
    ops = doc["paths"]["/v1/op/usage.history"]["post"]
    assert "months" in ops["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "application/x-ndjson" in ops["responses"]["200"]["content"]
    events = doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]
    assert set(events) == {
        "application/json",
        "application/x-ndjson",
        "application/cloudevents-batch+json",
        "application/cloudevents+json",
    }
    plan = doc["paths"]["/api/v1/usage"]["get"]
    assert plan["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HTTPValidationError"
    }


# -- random input never causes a 5xx ------------------------------------------------------------

_NAMES = [
    "start_time",
    "end_time",
    "bucket_width",
    "limit",
    "page",
    "group_by",
    "start_date",
    "end_date",
    *FILTERS,
]
_KEYS = st.one_of(
    st.sampled_from(_NAMES), st.sampled_from([f"{n}[]" for n in _NAMES]), st.text(max_size=12)
)
_VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "1",
            "-1",
            str(T0),
            str(NOW),
            "1d",
            "1h",
            "1m",
            "true",
            "false",
            "model",
            "project_id",
            "gpt-4o",
            "2024-11-01",
            "2024-13-01",
            "page_abc",
            "9" * 25,
            "1e5",
            "NaN",
            "null",
            "\x00",
        ]
    ),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.text(max_size=40),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_EVENTISH = st.fixed_dictionaries(
    {
        "id": st.one_of(st.text(max_size=8), st.integers()),
        "meter": st.sampled_from(["tokens", "completions", "images", "nope", "meterkit.tokens"]),
    },
    optional={
        "type": st.sampled_from(["tokens", "meterkit.tokens", "x"]),
        "organization_id": st.sampled_from(["org_a", "org_b", "", None]),
        "subject": st.sampled_from(["org_a", "org_b", 3]),
        "time": st.one_of(
            st.integers(),
            st.text(max_size=25),
            st.sampled_from(["2024-11-08T00:00:00Z", "2024-02-30T00:00:00Z"]),
        ),
        "values": st.dictionaries(
            st.sampled_from(["tokens", "images", "x"]),
            st.one_of(st.integers(), st.floats(), st.text(max_size=3)),
            max_size=2,
        ),
        "dimensions": st.dictionaries(
            st.sampled_from(["model", "batch", "size", "zz"]), _JSON, max_size=2
        ),
        "data": _JSON,
        "months": st.one_of(st.integers(), st.text(max_size=3)),
    },
)
_BODIES = st.one_of(
    st.binary(max_size=200),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.lists(_EVENTISH, max_size=4).map(lambda v: json.dumps(v).encode()),
    _EVENTISH.map(lambda v: json.dumps(v).encode()),
    st.lists(_EVENTISH, max_size=4).map(lambda v: "\n".join(map(json.dumps, v)).encode()),
)
_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "application/x-ndjson",
        "application/cloudevents-batch+json",
        "application/cloudevents+json",
        "text/plain",
        "",
        ";;;",
        "application/json; charset=latin-1",
    ]
)

_FUZZ = make_env()
save_price(
    _FUZZ.meter.store,
    GPT4O_INPUT,
    specs=_FUZZ.meter.meters,
)
_ROUTES = [(r.method, r.path) for r in _FUZZ.app.routes if not r.hidden]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    route=st.sampled_from(_ROUTES),
    query=st.lists(st.tuples(_KEYS, _VALUES), max_size=6),
    body=_BODIES,
    content_type=_TYPES,
    key=st.sampled_from(["admin", "member", "other", None]),
)
def test_random_input_never_causes_a_5xx(
    route: tuple[str, str],
    query: list[tuple[str, str]],
    body: bytes,
    content_type: str | None,
    key: str | None,
) -> None:
    method, path = route
    r = _FUZZ.send(method, path, query, key=key, body=body, content_type=content_type)
    assert r.status < 500, (r.status, data(r))
    if header(r, "content-type") == "application/json":
        data(r)
    elif (path.startswith("/dashboard") or path == "/favicon.ico") and r.status == 200:
        assert r.body  # the page, its files and its icon
    else:
        lines(r)


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "get", "", "BREW"]),
    path=st.one_of(
        st.text(max_size=40),
        st.text(max_size=30).map(lambda p: "/v1/" + p),
        st.sampled_from(
            [
                "/v1/op/",
                "/v1//",
                "/v1/op/usage.current/x",
                "//",
                "/v1/organization/usage/",
                "/api/v1/usage/",
                "",
            ]
        ),
    ),
    body=_BODIES,
)
def test_random_paths_never_cause_a_5xx(method: str, path: str, body: bytes) -> None:
    r = _FUZZ.send(method, path, body=body)
    assert r.status < 500
    data(r) if header(r, "content-type") == "application/json" else lines(r)


# -- what the OpenAPI document says, the server does -------------------------------------------


def test_an_empty_order_is_refused_like_any_value_off_its_enum(env: Env) -> None:
    for value in ("", "up", "ASC"):
        r = env.send("GET", "/v1/organization/spend_alerts", [("order", value)])
        assert_openai_error(r, 400, "order")
    assert env.send("GET", "/v1/organization/spend_alerts", [("order", "desc")]).status == 200


def test_a_whole_number_written_with_a_fraction_is_that_number(env: Env) -> None:
    body = b'{"currency": "USD", "interval": "month", "threshold_amount": 2747.0}'
    r = env.send("POST", "/v1/organization/spend_limit", body=body, content_type="application/json")
    assert r.status == 200 and data(r)["threshold_amount"] == 2747
    assert env.meter.spend("org_a").limit.threshold_amount == 2747  # type: ignore[union-attr]
    half = b'{"currency": "USD", "interval": "month", "threshold_amount": 2747.5}'
    r = env.send("POST", "/v1/organization/spend_limit", body=half, content_type="application/json")
    assert_openai_error(r, 400, "threshold_amount")
    assert env.meter.spend("org_a").limit.threshold_amount == 2747  # type: ignore[union-attr]


def test_assets_that_would_hold_more_than_a_counter_holds_are_a_conflict(env: Env) -> None:
    from meterkit.validate import MAX_VALUE

    def put(resource: str, size: int) -> Response:
        body = {"organization_id": "org_a", "resource": resource, "bytes": size}
        return env.send("POST", "/v1/assets/put", body=body)

    assert put("a", MAX_VALUE - 10).status == 200
    r = put("b", 11)
    assert r.status == 409 and data(r)["error"]["code"] == "conflict"
    assert put("b", 10).status == 200
    assert put("a", 5).status == 200  # resizing counts the asset once
    assert {a.resource: a.bytes for a in env.meter.assets("org_a")} == {"a": 5, "b": 10}
    assert data(
        env.send("POST", "/v1/usage/recalculate_storage", body={"organization_id": "org_a"})
    )


def test_an_amendment_that_changes_nothing_is_a_conflict(env: Env) -> None:
    body = {
        "organization_id": "org_a",
        "meter": "completions",
        "event_id": "a-0-0",
        "reason": "r",
        "values": {"input_tokens": 100, "num_model_requests": 1},
    }
    r = env.send("POST", "/v1/corrections/amend", body=body)
    assert r.status == 409 and data(r)["error"]["param"] == "values"
    assert env.meter.corrections("org_a") == []
