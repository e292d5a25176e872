"""What test_asgi.py and test_flask.py share: a seeded meter, an adapter-neutral client, and the
checks each adapter must pass — every endpoint of ``HttpApp``, and the metering guard.

Each adapter's test module wraps its framework's test client in a :class:`Client` and builds a
guarded application with the same endpoints (:class:`Guarded`); the checks here then drive both
in exactly the same way, so the two adapters are held to one contract.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol

import attrs

from meterkit import Meter, Plan, StoreUnavailable, hookimpl
from meterkit.auth import create_key, revoke_key
from meterkit.catalog import OPENAI_KINDS
from meterkit.pricing import Price
from openai_types import consistent_values

DAY = 86400
T0 = int(dt.datetime(2024, 11, 1, tzinfo=dt.timezone.utc).timestamp())
NOW = T0 + 10 * DAY + 12 * 3600  # 2024-11-11T12:00:00Z: the start of a minute
MONTH_END = int(dt.datetime(2024, 12, 1, tzinfo=dt.timezone.utc).timestamp())
USAGE = "/v1/organization/usage"
SPECS = {spec.name: spec for spec in OPENAI_KINDS}
KINDS = list(SPECS)

# Key name -> (organization, role, scopes).
KEYS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "admin": ("org_a", "admin", ("usage:read", "usage:write")),
    "member": ("org_a", "member", ("usage:read",)),
    "member_rw": ("org_a", "member", ("usage:read", "usage:write")),
    "other": ("org_b", "admin", ("usage:read", "usage:write")),
    "tight": ("org_t", "admin", ("usage:read", "usage:write")),
}

Query = Sequence[tuple[str, str]]


# -- replies and clients -----------------------------------------------------------------------


@attrs.frozen
class Reply:
    """One answer, whichever adapter gave it; header names are lower-case."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        text = self.body.decode()
        assert text.endswith("\n"), text
        return [json.loads(line) for line in text.splitlines()]

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def text(self, name: str) -> str:
        """A header that must be there."""
        value = self.header(name)
        assert value is not None, f"no {name} header"
        return value


class Client(Protocol):
    """A framework's test client: ``path`` is below the client's own prefix (if any)."""

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Query = (),
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> Reply: ...


def send(
    client: Client,
    method: str,
    path: str,
    query: Query = (),
    *,
    token: str | None = None,
    body: Any = None,
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["authorization"] = f"Bearer {token}"
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    if body is not None and content_type is None and not isinstance(body, bytes):
        content_type = "application/json"
    if content_type is not None:
        hdrs["content-type"] = content_type
    return client.request(method, path, query=query, headers=hdrs, body=raw)


def join_headers(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


# -- a seeded meter ----------------------------------------------------------------------------


@attrs.define
class Clock:
    t: float = NOW

    def __call__(self) -> float:
        return self.t


class Assets:
    """Reports stored assets, so the storage recalculation operation has something to count."""

    @hookimpl
    def meterkit_stored_assets(self, organization_id: str) -> dict[str, int]:
        return {"tiles/base": 300, "tiles/overlay": 200}


def make_meter(url: str = "memory://", **kwargs: Any) -> tuple[Meter, dict[str, str]]:
    """A meter frozen at :data:`NOW` with keys for :data:`KEYS` and usage to read back."""
    meter = Meter(url, clock=Clock(), plugins=[Assets()], **kwargs)
    tokens = {name: create_key(meter, *spec, name=name)[0] for name, spec in KEYS.items()}
    seed(meter)
    return meter, tokens


def seed(meter: Meter) -> None:
    """Ten days of completions for org_a (and org_b), one event of every other kind, prices."""
    for day in range(10):
        for i, model in enumerate(["gpt-4o", "gpt-4o-mini"]):
            meter.record(
                "completions",
                {"input_tokens": 100 * (i + 1), "num_model_requests": 1},
                organization_id="org_a",
                time=T0 + day * DAY + 3600 * i,
                id=f"a-{day}-{i}",
                dimensions={"model": model, "project_id": f"p{i + 1}"},
            )
        meter.record(
            "completions",
            {"input_tokens": 10_000, "num_model_requests": 1},
            organization_id="org_b",
            time=T0 + day * DAY,
            id=f"b-{day}",
            dimensions={"model": "gpt-4o"},
        )
    for spec in OPENAI_KINDS:
        if spec.name == "completions":
            continue
        dims: dict[str, Any] = {"project_id": "p1"}
        if spec.name == "images":
            dims.update(source="image.generation", size="1024x1024", model="dall-e-3")
        meter.record(
            spec.name,
            consistent_values(spec, 7, step=0),
            organization_id="org_a",
            time=T0 + 60,
            id=f"one-{spec.name}",
            dimensions=dims,
        )
    for model, price in (("gpt-4o", "2.50"), ("gpt-4o-mini", "0.15")):
        meter.set_price(
            Price(
                "completions",
                "input_tokens",
                price,
                per=1_000_000,
                line_item=f"{model}, input",
                quantity_unit="tokens",
                where={"model": model},
            )
        )


# -- every endpoint ----------------------------------------------------------------------------


@attrs.frozen
class Served:
    """meterkit's endpoints served by one adapter, one way (at the root, under a prefix, ...)."""

    client: Client
    meter: Meter
    tokens: Mapping[str, str]


def total(page: Mapping[str, Any], measure: str) -> int:
    return sum(r[measure] for b in page["data"] for r in b["results"])


def assert_openai_error(reply: Reply, status: int, code: str | None = None) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.header("content-type") == "application/json"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code


def check_every_usage_kind(s: Served) -> None:
    for kind in KINDS:
        query = [("start_time", str(T0)), ("end_time", str(T0 + 7 * DAY))]
        # Organization usage takes an admin key, as OpenAI's does.
        r = send(s.client, "GET", f"{USAGE}/{kind}", query, token=s.tokens["member"])
        assert_openai_error(r, 403, "admin_required")
        r = send(s.client, "GET", f"{USAGE}/{kind}", query, token=s.tokens["admin"])
        assert r.status == 200, (kind, r.body)
        assert r.header("content-type") == "application/json"
        page = r.json()
        assert page["object"] == "page" and page["has_more"] is False
        assert [b["start_time"] for b in page["data"]] == [T0 + d * DAY for d in range(7)]
        results = [res for b in page["data"] for res in b["results"]]
        assert {res["object"] for res in results} == {SPECS[kind].result_object}
        measure = SPECS[kind].measures[0].name
        # org_b's far bigger numbers never show.
        once = consistent_values(SPECS[kind], 7, step=0)[measure]
        assert total(page, measure) == (7 * 300 if kind == "completions" else once)


def check_usage_paging_in_both_array_forms(s: Served) -> None:
    for group_key in ("group_by", "group_by[]"):
        query = [
            ("start_time", str(T0)),
            ("end_time", str(T0 + 10 * DAY)),
            ("limit", "3"),
            (group_key, "model"),
        ]
        starts: list[int] = []
        by_model: Counter[str] = Counter()
        page_token: str | None = None
        pages = 0
        while True:
            extra = [("page", page_token)] if page_token else []
            r = send(
                s.client, "GET", f"{USAGE}/completions", [*query, *extra], token=s.tokens["admin"]
            )
            assert r.status == 200, r.body
            page = r.json()
            pages += 1
            starts += [b["start_time"] for b in page["data"]]
            for b in page["data"]:
                for res in b["results"]:
                    by_model[res["model"]] += res["input_tokens"]
            assert page["has_more"] is (page["next_page"] is not None)
            page_token = page["next_page"]
            if page_token is None:
                break
        assert pages == 4
        assert starts == [T0 + d * DAY for d in range(10)]
        assert by_model == {"gpt-4o": 1000, "gpt-4o-mini": 2000}


def check_costs_with_paging(s: Served) -> None:
    starts: list[int] = []
    amounts: dict[str, Decimal] = {}
    cursor: str | None = None
    while True:
        query = [
            ("start_time", str(T0)),
            ("end_time", str(T0 + 10 * DAY)),
            ("limit", "4"),
            ("group_by", "line_item"),
        ]
        r = send(
            s.client,
            "GET",
            "/v1/organization/costs",
            [*query, *([("page", cursor)] if cursor else [])],
            token=s.tokens["admin"],
        )
        assert r.status == 200, r.body
        page = r.json()
        starts += [b["start_time"] for b in page["data"]]
        for b in page["data"]:
            for res in b["results"]:
                assert res["object"] == "organization.costs.result"
                assert res["amount"]["currency"] == "usd"
                amounts[res["line_item"]] = amounts.get(res["line_item"], Decimal(0)) + Decimal(
                    str(res["amount"]["value"])
                )
        cursor = page["next_page"]
        if cursor is None:
            break
    assert starts == [T0 + d * DAY for d in range(10)]
    # 10 days x 100 tokens at $2.50 / 1M, and 10 x 200 at $0.15 / 1M.
    assert amounts == {"gpt-4o, input": Decimal("0.0025"), "gpt-4o-mini, input": Decimal("0.0003")}


def check_plan_usage(s: Served) -> None:
    s.meter.set_plan(
        Plan(
            "pro",
            "Professional",
            limits={"tokens": 100_000, "queries": -1},
            rate_limit_rpm=60,
            rate_limit_per_day=10_000,
        )
    )
    s.meter.assign_plan("org_a", "pro")
    s.meter.record("tokens", {"tokens": 1200}, organization_id="org_a", time=T0 + DAY, id="pt1")
    r = send(s.client, "GET", "/api/v1/usage", token=s.tokens["member"])
    assert r.status == 200, r.body
    body = r.json()
    assert body["plan"] == "pro" and body["period_start"] == "2024-11-01"
    assert body["tokens"] == {"used": 1200, "limit": 100_000, "remaining": 98_800}
    assert body["rate_limit_rpm"] == 60
    r = send(
        s.client, "GET", "/api/v1/usage", [("start_date", "yesterday")], token=s.tokens["member"]
    )
    assert r.status == 422
    assert r.json()["detail"][0]["loc"] == ["query", "start_date"]
    r = send(s.client, "GET", "/api/v1/usage")
    assert (r.status, r.json()) == (401, {"detail": "Not authenticated"})


def check_account_usage(s: Served) -> None:
    s.meter.set_plan(
        Plan("pro", "Professional", limits={"storage_bytes": 1 << 30}, credits_per_seat=10_000)
    )
    s.meter.assign_plan("org_a", "pro", seats=2)
    member = send(s.client, "GET", "/v1/usage", token=s.tokens["member"])
    admin = send(s.client, "GET", "/v1/usage", token=s.tokens["admin"])
    assert member.status == admin.status == 200
    assert member.json()["credits"]["limit"] == 20_000
    assert member.json()["plan"] == {
        "tier": "pro",
        "name": "Professional",
        "billingCycle": "monthly",
    }
    assert "seats" not in member.json()
    assert admin.json()["seats"] == {"count": 2, "creditsPerSeat": 10_000}


def check_operations_ndjson_at_both_paths(s: Served) -> None:
    s.meter.record("tiles", {"tiles": 42}, organization_id="org_a", time=NOW - 10, id="tl1")
    for path in ("/v1/op/usage.history", "/v1/usage/history"):
        r = send(
            s.client,
            "POST",
            path,
            body={"organization_id": "org_a", "months": 3},
            token=s.tokens["member"],
        )
        assert r.status == 200, r.body
        assert r.header("content-type") == "application/x-ndjson"
        rows = r.lines()
        assert [row["month"] for row in rows] == ["2024-09", "2024-10", "2024-11"]
        assert rows[-1]["tile_requests"] == 42
    for path in ("/v1/op/usage.current", "/v1/usage/current"):
        r = send(
            s.client, "POST", path, body={"organization_id": "org_a"}, token=s.tokens["member"]
        )
        assert r.status == 200 and r.header("content-type") == "application/x-ndjson"
        [row] = r.lines()
        assert row["organization_id"] == "org_a" and row["tiles"]["used"] == 42
    for path in ("/v1/op/usage.recalculate_storage", "/v1/usage/recalculate_storage"):
        r = send(s.client, "POST", path, body={"organization_id": "org_a"}, token=s.tokens["admin"])
        assert r.status == 200 and r.header("content-type") == "application/x-ndjson"
        [row] = r.lines()
        assert (row["storage_bytes"], row["resources"]) == (500, 2)
        r = send(
            s.client, "POST", path, body={"organization_id": "org_a"}, token=s.tokens["member_rw"]
        )
        assert_openai_error(r, 403, "admin_required")
    r = send(
        s.client,
        "POST",
        "/v1/op/usage.current",
        body={"organization_id": "org_b"},
        token=s.tokens["member"],
    )
    assert r.status == 403
    r = send(s.client, "POST", "/v1/op/usage.nothing", body={}, token=s.tokens["member"])
    assert_openai_error(r, 404)


def ingested(body: Mapping[str, Any]) -> dict[str, int]:
    """An ingest answer's totals, once checked against its per-event statuses."""
    statuses = [e["status"] for e in body["events"]]
    for total, status in (
        ("accepted", "accepted"),
        ("duplicates", "duplicate"),
        ("conflicts", "conflict"),
    ):
        assert body[total] == statuses.count(status), body
    return {"accepted": body["accepted"], "duplicates": body["duplicates"]}


def check_event_ingest(s: Served) -> None:
    event = {"id": "e1", "meter": "tokens", "time": T0 + 3 * DAY, "values": {"tokens": 5}}
    r = send(
        s.client,
        "POST",
        "/v1/events",
        body=[event, {**event, "id": "e2"}, event],
        token=s.tokens["admin"],
    )
    assert r.status == 200
    assert {k: r.json()[k] for k in ("accepted", "duplicates", "conflicts")} == {
        "accepted": 2,
        "duplicates": 1,
        "conflicts": 0,
    }
    assert [e["status"] for e in r.json()["events"]] == ["accepted", "accepted", "duplicate"]
    ndjson = json.dumps({**event, "id": "e3"}) + "\n"
    r = send(
        s.client,
        "POST",
        "/v1/events",
        body=ndjson.encode(),
        content_type="application/x-ndjson",
        token=s.tokens["admin"],
    )
    assert (r.status, ingested(r.json())) == (200, {"accepted": 1, "duplicates": 0})
    assert (
        s.meter.total("tokens", "tokens", organization_id="org_a", start_time=T0, end_time=NOW)
        == 15
    )
    r = send(s.client, "POST", "/v1/events", body=[{**event, "id": "e4"}], token=s.tokens["member"])
    assert_openai_error(r, 403, "insufficient_scope")


def check_openapi_and_healthz(s: Served) -> None:
    r = send(s.client, "GET", "/openapi.json")
    assert r.status == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    assert {f"{USAGE}/{k}" for k in KINDS} | {"/v1/events", "/healthz"} <= set(doc["paths"])
    r = send(s.client, "GET", "/healthz")
    assert (r.status, r.json()) == (200, {"status": "ok"})


def check_dashboard_and_quota(s: Served) -> None:
    r = send(s.client, "GET", "/dashboard")
    assert r.status == 200 and r.text("content-type").startswith("text/html")
    assert b"meterkit usage" in r.body and "script-src 'self'" in r.text("content-security-policy")
    for name, media in (
        ("dashboard.js", "text/javascript"),
        ("chart.umd.min.js", "text/javascript"),
    ):
        r = send(s.client, "GET", f"/dashboard/{name}")
        assert r.status == 200 and r.text("content-type").startswith(media) and r.body
    r = send(s.client, "GET", "/dashboard/chart.js-LICENSE.md")
    assert r.status == 200 and b"MIT License" in r.body
    assert_openai_error(send(s.client, "GET", "/dashboard/meter.py"), 404)
    sneaky = send(s.client, "GET", "/dashboard/..%2Fmeter.py")
    assert sneaky.status >= 400 and b"import" not in sneaky.body  # never a file outside
    assert_openai_error(send(s.client, "GET", "/v1/organization/quota"), 401, "missing_api_key")
    r = send(s.client, "GET", "/v1/organization/quota", token=s.tokens["admin"])
    assert r.status == 200
    status = r.json()
    assert (status["object"], status["organization_id"]) == ("organization.quota", "org_a")
    assert status == s.meter.quota_status("org_a")


def check_errors_keep_their_shape(s: Served) -> None:
    r = send(s.client, "GET", f"{USAGE}/completions", [("start_time", str(T0))])
    assert_openai_error(r, 401, "missing_api_key")
    assert r.header("www-authenticate") == "Bearer"
    r = send(
        s.client, "GET", f"{USAGE}/completions", [("start_time", "soon")], token=s.tokens["admin"]
    )
    assert_openai_error(r, 400)
    assert r.json()["error"]["param"] == "start_time"
    r = send(s.client, "POST", "/v1/usage", token=s.tokens["member"])
    assert_openai_error(r, 405, "method_not_allowed")
    assert r.header("allow") == "GET"


ENDPOINT_CHECKS: list[Callable[[Served], None]] = [
    check_every_usage_kind,
    check_usage_paging_in_both_array_forms,
    check_costs_with_paging,
    check_plan_usage,
    check_account_usage,
    check_operations_ndjson_at_both_paths,
    check_event_ingest,
    check_openapi_and_healthz,
    check_dashboard_and_quota,
    check_errors_keep_their_shape,
]


# -- the metering guard ------------------------------------------------------------------------

QUOTA = 5


def guard_meter(url: str = "memory://", **kwargs: Any) -> tuple[Meter, dict[str, str]]:
    """org_a on a plan of :data:`QUOTA` queries and 1000 tokens a month; org_t may make two
    requests a minute."""
    meter, tokens = make_meter(url, **kwargs)
    meter.set_plan(
        Plan(
            "pro",
            "Pro",
            limits={"queries": QUOTA, "tokens": 1000},
            rate_limit_rpm=100,
            rate_limit_per_day=1000,
        )
    )
    meter.set_plan(Plan("tight", "Tight", rate_limit_rpm=2, rate_limit_per_day=1000))
    meter.assign_plan("org_a", "pro")
    meter.assign_plan("org_t", "tight")
    return meter, tokens


class Guarded(Protocol):
    """An application behind the guard, with these endpoints (``n`` a whole number):

    * ``GET /work/{n}``: reports ``tokens=n`` on the usage handle (nothing when 0), answers 200
      ``{"organization_id": ..., "reported": {...}}``;
    * ``GET /boom/{n}``: reports ``tokens=n`` then raises;
    * ``GET /fail``: answers 500;
    * ``GET /healthz``: answers 200.

    ``calls`` counts the calls each endpoint got (``"work"``, ``"boom"``, ``"fail"``,
    ``"healthz"``); ``work_route`` is the route the framework names ``/work/{n}`` by.
    """

    calls: Counter[str]
    work_route: str

    def client(self) -> Client: ...


MakeGuarded = Callable[..., Guarded]
"""``make(meter, **options)``: options go to the adapter, except ``identify_header`` (identify
the caller by that header's value, an organization id) and ``skip_path`` (leave requests to that
path unmetered)."""


def requests_recorded(meter: Meter, org: str = "org_a") -> dict[tuple[Any, ...], int]:
    page = meter.usage(
        "requests",
        organization_id=org,
        start_time=NOW - NOW % DAY,
        end_time=NOW + 1,
        group_by=["method", "route", "status", "api_key_id"],
    )
    out: dict[tuple[Any, ...], int] = {}
    for bucket in page.data:
        for row in bucket.results:
            key = (
                row.group["method"],
                row.group["route"],
                row.group["status"],
                row.group["api_key_id"],
            )
            out[key] = out.get(key, 0) + int(row.values["requests"] or 0)
    return out


def key_id(token: str) -> str:
    """The key id inside a token: ``<prefix><16 hex>_<43-character secret>``."""
    return token[-60:-44]


def used(meter: Meter, metric: str, org: str = "org_a") -> int:
    return meter.quotas.used(org, metric)


def check_admitted_gets_headers_and_is_recorded(make: MakeGuarded) -> None:
    meter, tokens = guard_meter()
    app = make(meter)
    r = send(app.client(), "GET", "/work/0", token=tokens["admin"])
    assert r.status == 200 and r.json()["organization_id"] == "org_a"
    assert r.header("x-ratelimit-limit") == str(QUOTA)
    assert r.header("x-ratelimit-remaining") == str(QUOTA - 1)
    assert r.header("x-ratelimit-reset") == str(MONTH_END)
    assert r.header("retry-after") is None
    assert r.header("ratelimit-policy") == (
        '"queries";q=5;qu="queries";w=2592000, '
        '"rate_limit_rpm";q=100;qu="requests";w=60, '
        '"rate_limit_per_day";q=1000;qu="requests";w=86400'
    )
    assert r.header("ratelimit") == (
        f'"queries";r=4;t={MONTH_END - NOW}, "rate_limit_rpm";r=99;t=60, '
        '"rate_limit_per_day";r=999;t=43200'
    )
    assert app.calls["work"] == 1
    assert used(meter, "queries") == 1
    assert requests_recorded(meter) == {("GET", app.work_route, "200", key_id(tokens["admin"])): 1}


def check_quota_refusal(make: MakeGuarded) -> None:
    meter, tokens = guard_meter()
    app = make(meter)
    client = app.client()
    for _ in range(QUOTA):
        assert send(client, "GET", "/work/0", token=tokens["admin"]).status == 200
    r = send(client, "GET", "/work/0", token=tokens["admin"])
    assert r.status == 429
    assert app.calls["work"] == QUOTA  # the endpoint was not called
    assert r.header("retry-after") == str(MONTH_END - NOW)
    assert r.header("x-ratelimit-limit") == str(QUOTA)
    assert r.header("x-ratelimit-remaining") == "0"
    assert r.header("x-ratelimit-reset") == str(MONTH_END)
    assert r.text("ratelimit-policy").startswith('"queries";q=5;qu="queries";w=2592000, ')
    assert r.text("ratelimit").startswith(f'"queries";r=0;t={MONTH_END - NOW}, ')
    assert r.header("content-type") == "application/json"
    error = r.json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert "queries" in error["message"] and error["param"] is None
    assert used(meter, "queries") == QUOTA  # a refusal debits nothing
    assert sum(requests_recorded(meter).values()) == QUOTA  # nor is it recorded by default


def check_rate_limit_refusal(make: MakeGuarded) -> None:
    meter, tokens = guard_meter()
    app = make(meter, cost=None)
    client = app.client()
    assert [send(client, "GET", "/work/0", token=tokens["tight"]).status for _ in range(2)] == [
        200,
        200,
    ]
    r = send(client, "GET", "/work/0", token=tokens["tight"])
    assert r.status == 429 and app.calls["work"] == 2
    # At the start of a minute with 2 of 2 used, the sliding window has room again one second
    # into the next minute, when floor(2 x 59/60) + 1 <= 2.
    assert r.header("retry-after") == "61"
    assert r.header("x-ratelimit-limit") == "2"
    assert r.header("x-ratelimit-remaining") == "0"
    assert r.header("x-ratelimit-reset") == str(NOW + 61)
    assert r.header("ratelimit-policy") == (
        '"rate_limit_rpm";q=2;qu="requests";w=60, "rate_limit_per_day";q=1000;qu="requests";w=86400'
    )
    assert r.header("ratelimit") == '"rate_limit_rpm";r=0;t=61, "rate_limit_per_day";r=998;t=43200'
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "Try again in 61s" in error["message"]


def check_reported_usage_is_committed(make: MakeGuarded) -> None:
    meter, tokens = guard_meter()
    app = make(meter, cost={"queries": 1, "tokens": 400})
    client = app.client()
    r = send(client, "GET", "/work/30", token=tokens["admin"])
    assert r.status == 200 and r.json()["reported"] == {"tokens": 30}
    # Admitted with 400 held: the headers say what the hold left.
    assert r.text("ratelimit").startswith('"queries";r=4;t=1684800, "tokens";r=600;')
    assert used(meter, "tokens") == 30  # settled to the real amount, not the 400 held
    assert used(meter, "queries") == 1  # not reported: committed as held
    assert (
        meter.total(
            "tokens", "tokens", organization_id="org_a", start_time=NOW - 1, end_time=NOW + 1
        )
        == 30
    )
    # Without a reservation for tokens, what the endpoint reports is debited on top.
    plain = make(meter)
    assert send(plain.client(), "GET", "/work/7", token=tokens["admin"]).status == 200
    assert used(meter, "tokens") == 37 and used(meter, "queries") == 2


def check_exception_and_5xx_release(make: MakeGuarded) -> None:
    meter, tokens = guard_meter()
    app = make(meter, cost={"queries": 1, "tokens": 400})
    client = app.client()
    r = send(client, "GET", "/boom/0", token=tokens["admin"])
    assert r.status == 500 and app.calls["boom"] == 1
    assert used(meter, "tokens") == 0 and used(meter, "queries") == 0  # released
    r = send(client, "GET", "/fail", token=tokens["admin"])
    assert r.status == 500 and app.calls["fail"] == 1
    assert used(meter, "tokens") == 0 and used(meter, "queries") == 0
    # What the endpoint reported before failing happened, and is counted.
    send(client, "GET", "/boom/25", token=tokens["admin"])
    assert used(meter, "tokens") == 25 and used(meter, "queries") == 0
    statuses: Counter[str] = Counter()
    for (_, _, status, _), count in requests_recorded(meter).items():
        statuses[status] += count
    assert statuses == {"500": 3}


def check_unidentified_callers(make: MakeGuarded) -> None:
    meter, tokens = guard_meter()
    revoked, key = create_key(meter, "org_a", "admin", ["usage:read"])
    assert revoke_key(meter, key.id)
    lenient = make(meter, unidentified="pass")
    # Without credentials, "pass" lets the caller through unmetered ...
    r = send(lenient.client(), "GET", "/work/3")
    assert r.status == 200 and r.json()["organization_id"] is None
    assert r.header("x-ratelimit-limit") is None
    assert lenient.calls["work"] == 1 and requests_recorded(meter) == {}
    assert used(meter, "tokens") == 0  # an unmetered report goes nowhere
    # ... but presented credentials that identify nobody are a 401, always.
    for headers in (
        {"authorization": "Bearer mk_not_a_key"},
        {"authorization": "Basic x"},
        {"authorization": f"Bearer {revoked}"},
    ):
        r = send(lenient.client(), "GET", "/work/3", headers=headers)
        assert_openai_error(r, 401, "invalid_api_key")
    assert lenient.calls["work"] == 1
    strict = make(meter)  # the default refuses callers without credentials
    r = send(strict.client(), "GET", "/work/0", headers={"authorization": "Bearer nope"})
    assert_openai_error(r, 401, "invalid_api_key")
    assert r.header("www-authenticate") == "Bearer"
    r = send(strict.client(), "GET", "/work/0")
    assert_openai_error(r, 401, "missing_api_key")
    assert strict.calls["work"] == 0
    r = send(strict.client(), "GET", "/work/0", token=tokens["admin"])
    assert r.status == 200 and strict.calls["work"] == 1


def check_custom_identify_and_skip(make: MakeGuarded) -> None:
    meter, _ = guard_meter()
    app = make(meter, identify_header="x-org", unidentified="refuse", skip_path="/healthz")
    r = send(app.client(), "GET", "/work/0", headers={"x-org": "org_a"})
    assert r.status == 200 and r.json()["organization_id"] == "org_a"
    assert r.header("x-ratelimit-remaining") == str(QUOTA - 1)
    [(method, route, status, api_key)] = requests_recorded(meter)
    assert (method, route, status, api_key) == ("GET", app.work_route, "200", None)
    r = send(app.client(), "GET", "/work/0")
    assert_openai_error(r, 401, "unidentified")
    assert r.header("www-authenticate") is None and app.calls["work"] == 1
    # Skipped: neither identified (it would be refused) nor metered.
    r = send(app.client(), "GET", "/healthz")
    assert r.status == 200 and app.calls["healthz"] == 1 and r.header("x-ratelimit-limit") is None
    assert used(meter, "queries") == 1


def check_custom_refusal_shape(make: MakeGuarded) -> None:
    meter, tokens = guard_meter()

    def on_refused(decision: Any) -> tuple[int, list[tuple[str, str]], str]:
        return (
            402,
            [("Content-Type", "text/plain"), ("Retry-After", "5")],
            (f"refused by {decision.refused_by}"),
        )

    app = make(meter, on_refused=on_refused, cost={"tokens": 5000})
    r = send(app.client(), "GET", "/work/0", token=tokens["admin"])
    assert (r.status, r.body) == (402, b"refused by tokens")
    assert r.header("content-type") == "text/plain"
    assert r.header("retry-after") == "5"  # the application's own wins
    assert r.header("x-ratelimit-limit") == "1000" and app.calls["work"] == 0


def check_store_unavailable(make: MakeGuarded, monkeypatch: Any) -> None:
    meter, tokens = guard_meter()
    app = make(meter)

    def down(*_: Any, **__: Any) -> Any:
        raise StoreUnavailable("connection refused")

    monkeypatch.setattr(meter.counters, "counters_apply", down)
    r = send(app.client(), "GET", "/work/0", token=tokens["admin"])
    assert_openai_error(r, 503, "store_unavailable")
    assert r.header("retry-after") == "1" and app.calls["work"] == 0
    # Fail open: the request goes ahead, unmetered.
    meter.quotas.policy = "open"
    r = send(app.client(), "GET", "/work/0", token=tokens["admin"])
    assert r.status == 200 and app.calls["work"] == 1 and r.header("x-ratelimit-limit") is None
    # ... but only for a caller the store has identified: with the keys unreadable too, a
    # token it cannot check (unknown, or not checked within the last second) is never
    # admitted, whatever the policy.
    monkeypatch.setattr(meter.store, "get_record", down)
    fresh = create_key(meter, "org_a", "admin", ["usage:read"])[0]  # valid, never checked
    for token in (fresh, "mk_0000000000000000_" + "A" * 43):
        r = send(app.client(), "GET", "/work/0", token=token)
        assert_openai_error(r, 503, "store_unavailable")
    # A token that is not even well-formed is refused without asking the store.
    assert_openai_error(send(app.client(), "GET", "/work/0", token="junk"), 401, "invalid_api_key")
    assert app.calls["work"] == 1


def check_own_endpoints_are_never_metered(make: MakeGuarded) -> None:
    """meterkit's endpoints, served from the guarded app under /meterkit, are exempt: exactly
    those, not the application's own routes that happen to share a path (/healthz)."""
    meter, tokens = guard_meter()
    app = make(meter, record_refused=True)
    client = app.client()
    tight = tokens["tight"]
    assert [send(client, "GET", "/work/0", token=tight).status for _ in range(3)] == [200, 200, 429]
    for _ in range(3):
        r = send(
            client, "GET", f"/meterkit{USAGE}/completions", [("start_time", str(T0))], token=tight
        )
        assert r.status == 200 and r.header("x-ratelimit-limit") is None
        assert send(client, "GET", "/meterkit/v1/usage", token=tight).status == 200
        assert send(client, "GET", "/meterkit/healthz").status == 200
        assert send(client, "GET", "/meterkit/openapi.json").status == 200
    # The application's own /healthz is the application's: still guarded.
    assert send(client, "GET", "/healthz", token=tight).status == 429
    assert app.calls["healthz"] == 0
    kid = key_id(tight)
    assert requests_recorded(meter, "org_t") == {
        ("GET", app.work_route, "200", kid): 2,
        ("GET", "/work/0", "429", kid): 1,  # refused before routing: the path
        ("GET", "/healthz", "429", kid): 1,
    }


def spend_limited_meter() -> tuple[Meter, dict[str, str], Callable[[], Decimal]]:
    """The guard's meter with tokens at $2 per 1,000 and a $1 spend limit on ``org_a``, and
    what ``org_a``'s month has been billed so far."""
    meter, tokens = guard_meter()
    meter.set_price(
        {
            "meter": "tokens",
            "measure": "tokens",
            "unit_price": "2",
            "per": 1000,
            "line_item": "tokens",
            "quantity_unit": "tokens",
        }
    )
    meter.set_spend_limit("org_a", 100)
    month = meter.spend("org_a")

    def billed() -> Decimal:
        page = meter.costs(
            organization_id="org_a", start_time=month.period_start, end_time=NOW + 1, limit=31
        )
        return page.totals().get("usd", Decimal(0))

    return meter, tokens, billed


def check_settles_with_a_spend_limit(make: MakeGuarded) -> None:
    """Every request of an organization with a spend limit is settled to what it reported
    and recorded, and its usage is spent as it is billed (one ledger)."""
    meter, tokens, billed = spend_limited_meter()

    before = (meter.spend("org_a").counted, billed())  # the seed was priced after it was recorded
    app = make(meter, cost={"queries": 1, "tokens": 400})
    r = send(app.client(), "GET", "/work/123", token=tokens["admin"])
    assert r.status == 200 and r.json()["reported"] == {"tokens": 123}
    meter.flush()
    assert used(meter, "tokens") == 123  # settled, not the 400 held
    assert sum(requests_recorded(meter).values()) == 1
    grew = (meter.spend("org_a").counted - before[0], billed() - before[1])
    assert grew == (Decimal("0.246"), Decimal("0.246")), grew


def check_estimates_spend_and_settles_to_the_priced_usage(make: MakeGuarded) -> None:
    """``price=`` holds a request's estimated usage against the spend limit before it runs;
    the handler reports what it really priced, and spend and costs grow by exactly that."""
    meter, tokens, billed = spend_limited_meter()

    before = (meter.spend("org_a").counted, billed())
    app = make(meter, cost={"queries": 1}, price={"tokens": {"tokens": 300}})
    priced = {"x-priced": "1"}
    r = send(app.client(), "GET", "/work/123", token=tokens["admin"], headers=priced)
    assert r.status == 200
    meter.flush()
    grew = (meter.spend("org_a").counted - before[0], billed() - before[1])
    assert grew == (Decimal("0.246"), Decimal("0.246")), grew  # the 123 priced, not the 300
    assert sum(requests_recorded(meter).values()) == 1
    # An estimate the month's budget cannot hold is refused before the endpoint runs.
    dear = make(meter, cost={"queries": 1}, price={"tokens": {"tokens": 10**6}})
    r = send(dear.client(), "GET", "/work/5", token=tokens["admin"], headers=priced)
    assert r.status == 429
    meter.flush()
    assert (meter.spend("org_a").counted - before[0], billed() - before[1]) == grew


GUARD_CHECKS: list[Callable[[MakeGuarded], None]] = [
    check_admitted_gets_headers_and_is_recorded,
    check_quota_refusal,
    check_rate_limit_refusal,
    check_reported_usage_is_committed,
    check_settles_with_a_spend_limit,
    check_estimates_spend_and_settles_to_the_priced_usage,
    check_exception_and_5xx_release,
    check_unidentified_callers,
    check_custom_identify_and_skip,
    check_custom_refusal_shape,
    check_own_endpoints_are_never_metered,
]


def race(make: MakeGuarded, url: str, threads: int = 8, per_thread: int = 6) -> None:
    """``threads`` threads, each with its own client, race ``per_thread`` requests each against
    a quota of :data:`QUOTA`: exactly the quota is admitted, and counted."""
    meter, tokens = guard_meter(url)
    try:
        app = make(meter)
        barrier = threading.Barrier(threads)
        statuses: list[int] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def run() -> None:
            try:
                client = app.client()
                barrier.wait()
                for _ in range(per_thread):
                    status = send(client, "GET", "/work/1", token=tokens["admin"]).status
                    with lock:
                        statuses.append(status)
            except BaseException as exc:  # re-raised in the test's thread below
                errors.append(exc)

        workers = [threading.Thread(target=run) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert not errors, errors
        assert Counter(statuses) == {200: QUOTA, 429: threads * per_thread - QUOTA}
        assert app.calls["work"] == QUOTA
        assert used(meter, "queries") == QUOTA and used(meter, "tokens") == QUOTA
        assert sum(requests_recorded(meter).values()) == QUOTA
    finally:
        meter.close()
