"""A real ``meterkit serve`` on a loopback port, driven by httpx and by the official openai SDK.

The server is a subprocess over a temporary SQLite file filled by :mod:`meterkit.cli.demo`. Every
answer is checked against the same file read in-process through :class:`meterkit.Meter` (an
independent path: no HTTP, no JSON), paging followed to the end on both sides.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest

from clock import TEST_NOW
from http_helpers import ingested
from meterkit import Meter
from meterkit.auth import create_key
from meterkit.catalog import OPENAI_KINDS
from meterkit.cli.demo import DemoSummary, populate

DAY = 86_400
# Everything here follows TEST_NOW (the served process too): .ci/run repeats it at the edges.
pytestmark = pytest.mark.clock_edges
HOST = "127.0.0.1"
STARTUP_SECONDS = 30.0
TIMEOUT = httpx.Timeout(30.0)

# What each kind is grouped by here: enough to make many result rows per bucket.
GROUP_BY: dict[str, list[str]] = {
    "completions": ["model", "batch"],
    "embeddings": ["model", "project_id"],
    "moderations": ["user_id", "api_key_id"],
    "images": ["source", "size"],
    "audio_speeches": ["model"],
    "audio_transcriptions": ["user_id"],
    "vector_stores": ["project_id"],
    "code_interpreter_sessions": ["project_id"],
    "decisions": ["model", "api_source"],
    "file_search_calls": ["vector_store_id"],
    "web_search_calls": ["context_level", "api_source"],
}
KINDS = tuple(spec.name for spec in OPENAI_KINDS)
# No demo model makes images in chat, and decisions are text only.
DEMO_ZEROS: dict[str, set[str]] = {
    "completions": {"output_image_tokens"},
    "decisions": {
        "output_image_tokens",
        "input_audio_tokens",
        "output_audio_tokens",
        "input_cached_audio_tokens",
    },
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define
class Server:
    """A running server process and what the tests need to talk to it."""

    process: subprocess.Popen[bytes]
    base: str
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start(args: list[str], log: Path, port: int, cwd: Path) -> Server:
    """Start ``python -m meterkit ARGS`` and wait until ``/healthz`` answers (bounded)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "meterkit", *args, "--host", HOST, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
        )
    server = Server(process, f"http://{HOST}:{port}", log)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.logs()}")
        try:
            if httpx.get(f"{server.base}/healthz", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop(server)
    raise RuntimeError(
        f"no answer from {server.base}/healthz in {STARTUP_SECONDS} s:\n{server.logs()}"
    )


def stop(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)


def start_with_retry(args: list[str], log: Path, cwd: Path) -> Server:
    # The free port is found before the server binds it; another process could take it in
    # between, so a failed start is tried again on another port.
    for attempt in range(3):
        try:
            return start(args, log, free_port(), cwd)
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@attrs.define
class Env:
    server: Server
    meter: Meter
    summary: DemoSummary
    tokens: dict[str, str]
    http: httpx.Client

    @property
    def start(self) -> int:
        return self.summary.start_time

    @property
    def end(self) -> int:
        return self.summary.end_time

    def get(self, path: str, key: str = "admin", **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[key]}"} if key else {}
        return self.http.get(path, headers=headers, **kwargs)

    def post(self, path: str, key: str = "admin", **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[key]}", **kwargs.pop("headers", {})}
        return self.http.post(path, headers=headers, **kwargs)

    def sdk(self, key: str = "admin") -> openai.OpenAI:
        return openai.OpenAI(
            admin_api_key=self.tokens[key],
            base_url=f"{self.server.base}/v1",
            max_retries=0,
            timeout=30.0,
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("server")
    db = f"sqlite:///{tmp / 'served.db'}"
    meter = Meter(db, clock=lambda: TEST_NOW)
    summary = populate(meter, now=TEST_NOW)
    tokens = {
        "admin": create_key(meter, "org_acme", "admin", ["usage:read", "usage:write"])[0],
        "member": create_key(meter, "org_acme", "member", ["usage:read"])[0],
        "writer": create_key(meter, "org_acme", "member", ["usage:write"])[0],
        "globex": create_key(meter, "org_globex", "admin", ["usage:read"])[0],
    }
    server = start_with_retry(
        ["serve", "--db", db, "--now", str(TEST_NOW), "--freeze-clock", "--log-level", "warning"],
        tmp / "serve.log",
        tmp,
    )
    http = httpx.Client(base_url=server.base, timeout=TIMEOUT)
    try:
        yield Env(server, meter, summary, tokens, http)
    finally:
        http.close()
        stop(server)
        meter.close()


# -- the in-process oracle ----------------------------------------------------------------------


def oracle_usage(meter: Meter, kind: str, org: str, **query: Any) -> list[dict[str, Any]]:
    """Every bucket of a usage query, paged to the end in-process."""
    buckets: list[dict[str, Any]] = []
    page: str | None = None
    while True:
        result: dict[str, Any] = meter.usage(
            kind, organization_id=org, page=page, **query
        ).to_dict()
        buckets += result["data"]
        if not result["has_more"]:
            return buckets
        page = result["next_page"]


def oracle_costs(meter: Meter, org: str, **query: Any) -> list[dict[str, Any]]:
    buckets: list[dict[str, Any]] = []
    page: str | None = None
    while True:
        result = meter.costs(organization_id=org, page=page, **query).to_dict()
        buckets += result["data"]
        if not result["has_more"]:
            return buckets
        page = result["next_page"]


def sums(buckets: list[dict[str, Any]], measures: tuple[str, ...]) -> dict[str, float]:
    return {m: sum(r[m] for b in buckets for r in b["results"]) for m in measures}


def expected_buckets(env: Env, width: int = DAY) -> int:
    first = env.start - env.start % width
    return -(-(env.end - first) // width)


# -- httpx: the nine OpenAI-shaped endpoints ---------------------------------------------------


def http_pages(
    env: Env, path: str, params: list[tuple[str, str]], key: str = "admin"
) -> tuple[list[dict[str, Any]], int]:
    """Every bucket, following ``next_page`` to the end; and how many pages that took."""
    buckets: list[dict[str, Any]] = []
    pages = 0
    cursor: str | None = None
    while True:
        query = params + ([("page", cursor)] if cursor else [])
        response = env.get(path, key, params=query)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["object"] == "page"
        buckets += body["data"]
        pages += 1
        assert pages < 100
        if not body["has_more"]:
            assert body["next_page"] is None
            return buckets, pages
        cursor = body["next_page"]


@pytest.mark.parametrize("bracket", [True, False], ids=["bracket", "repeated"])
@pytest.mark.parametrize("kind", KINDS)
def test_http_usage_matches_in_process(env: Env, kind: str, bracket: bool) -> None:
    name = "group_by[]" if bracket else "group_by"
    params = [
        ("start_time", str(env.start)),
        ("end_time", str(env.end)),
        ("bucket_width", "1d"),
        ("limit", "7"),
    ]
    params += [(name, g) for g in GROUP_BY[kind]]
    buckets, pages = http_pages(env, f"/v1/organization/usage/{kind}", params)
    expected = oracle_usage(
        env.meter,
        kind,
        "org_acme",
        start_time=env.start,
        end_time=env.end,
        bucket_width="1d",
        group_by=GROUP_BY[kind],
        limit=7,
    )
    assert buckets == expected
    assert len(buckets) == expected_buckets(env) and pages == -(-len(buckets) // 7)
    assert sum(len(b["results"]) for b in buckets) > len(buckets)  # grouped: several rows a day


def test_http_usage_hourly_with_filters(env: Env) -> None:
    start = env.end - 3 * DAY
    params = [
        ("start_time", str(start)),
        ("end_time", str(env.end)),
        ("bucket_width", "1h"),
        ("models[]", "gpt-4o-mini"),
        ("batch", "false"),
        ("group_by[]", "project_id"),
    ]
    buckets, pages = http_pages(env, "/v1/organization/usage/completions", params)
    assert len(buckets) == 72 and pages == 3  # default limit for 1h is 24
    expected = oracle_usage(
        env.meter,
        "completions",
        "org_acme",
        start_time=start,
        end_time=env.end,
        bucket_width="1h",
        group_by=["project_id"],
        filters={"model": ["gpt-4o-mini"], "batch": [False]},
    )
    assert buckets == expected
    assert {r["model"] for b in buckets for r in b["results"]} == {None}


def test_http_costs_match_in_process(env: Env) -> None:
    params = [
        ("start_time", str(env.start)),
        ("end_time", str(env.end)),
        ("limit", "7"),
        ("group_by[]", "line_item"),
        ("group_by[]", "project_id"),
    ]
    buckets, _ = http_pages(env, "/v1/organization/costs", params)
    expected = oracle_costs(
        env.meter,
        "org_acme",
        start_time=env.start,
        end_time=env.end,
        group_by=["line_item", "project_id"],
        limit=7,
    )
    assert buckets == expected
    assert sum(r["amount"]["value"] for b in buckets for r in b["results"]) > 0
    assert {r["amount"]["currency"] for b in buckets for r in b["results"]} == {"usd"}


def test_http_each_key_sees_its_own_organization(env: Env) -> None:
    params = [("start_time", str(env.start)), ("end_time", str(env.end)), ("limit", "31")]
    acme, _ = http_pages(env, "/v1/organization/usage/embeddings", params)
    globex, _ = http_pages(env, "/v1/organization/usage/embeddings", params, key="globex")
    query = {"start_time": env.start, "end_time": env.end, "limit": 31}
    assert acme == oracle_usage(env.meter, "embeddings", "org_acme", **query)
    assert globex == oracle_usage(env.meter, "embeddings", "org_globex", **query)
    assert acme != globex


def test_http_errors(env: Env) -> None:
    path = "/v1/organization/usage/completions"
    missing = env.get(path, key="", params={"start_time": env.start})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "missing_api_key"
    bad = env.http.get(
        path,
        params={"start_time": env.start},
        headers={"Authorization": "Bearer mk_0123456789abcdef_" + "x" * 43},
    )
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    scope = env.get(path, key="writer", params={"start_time": env.start})
    assert scope.status_code == 403 and scope.json()["error"]["code"] == "insufficient_scope"
    limit = env.get(path, params={"start_time": env.start, "limit": "0"})
    assert limit.status_code == 400
    assert limit.json()["error"]["param"] == "limit"
    assert limit.json()["error"]["type"] == "invalid_request_error"
    wrong_filter = env.get(
        "/v1/organization/usage/vector_stores", params={"start_time": env.start, "models": "gpt-4o"}
    )
    assert wrong_filter.status_code == 400 and wrong_filter.json()["error"]["param"] == "models"
    assert env.get("/v1/nowhere").status_code == 404


# -- httpx: the other surfaces -----------------------------------------------------------------


def test_healthz_and_openapi(env: Env) -> None:
    assert env.http.get("/healthz").json() == {"status": "ok"}
    document = env.http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    for path in (
        "/v1/organization/costs",
        "/api/v1/usage",
        "/v1/usage",
        "/v1/events",
        *(f"/v1/organization/usage/{kind}" for kind in KINDS),
    ):
        assert path in document["paths"], path


def test_plan_usage(env: Env) -> None:
    day = time.strftime("%Y-%m-%d", time.gmtime(env.end - 1))
    first = time.strftime("%Y-%m-01", time.gmtime(env.end - 1))
    for org, key in (("org_acme", "member"), ("org_globex", "globex")):
        response = env.get("/api/v1/usage", key, params={"start_date": first, "end_date": day})
        assert response.status_code == 200, response.text
        assert response.json() == env.meter.plan_usage(org, first, day)
    body = env.get("/api/v1/usage", params={"start_date": first, "end_date": day}).json()
    assert body["plan"] == "pro" and body["tokens"]["used"] > 0
    assert body["spaces"]["used"] >= 1 and body["queries"]["limit"] == -1
    bad = env.get("/api/v1/usage", params={"start_date": "2024-13-01"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["query", "start_date"]
    assert env.get("/api/v1/usage", key="").json() == {"detail": "Not authenticated"}


def period_has_ended_days(meter: Meter, org: str) -> bool:
    """Whether a whole demo day lies in the current billing period (so it has usage)."""
    return TEST_NOW - meter.quotas.period(org, TEST_NOW).start >= 2 * DAY


def test_account_usage(env: Env) -> None:
    admin = env.get("/v1/usage").json()
    member = env.get("/v1/usage", "member").json()
    assert admin == env.meter.account_usage("org_acme", "admin")
    assert member == env.meter.account_usage("org_acme", "member")
    assert admin["seats"] == {"count": 5, "creditsPerSeat": 10_000}
    assert "purchasedBalance" in admin["credits"] and "seats" not in member
    assert "purchasedBalance" not in member["credits"]
    assert admin["storage"]["used"] > 0
    if period_has_ended_days(env.meter, "org_acme"):
        assert admin["credits"]["used"] > 0


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line]


def test_operations_both_paths(env: Env) -> None:
    body = {"organization_id": "org_acme"}
    current = ndjson(env.post("/v1/op/usage.current", json=body))
    assert current == ndjson(env.post("/v1/usage/current", "member", json=body))
    assert current == [env.meter.current_usage("org_acme")]
    if period_has_ended_days(env.meter, "org_acme"):
        assert current[0]["tiles"]["used"] > 0 and current[0]["jobs"]["used"] > 0

    months = {**body, "months": 3}
    history = ndjson(env.post("/v1/op/usage.history", json=months))
    assert history == ndjson(env.post("/v1/usage/history", json=months))
    assert history == env.meter.usage_history("org_acme", 3) and len(history) == 3
    assert sum(m["tile_requests"] for m in history) > 0

    other = env.post("/v1/op/usage.current", json={"organization_id": "org_globex"})
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "forbidden_organization"
    member = env.post("/v1/usage/recalculate_storage", "member", json=body)
    assert member.status_code == 403 and member.json()["error"]["code"] in (
        "insufficient_scope",
        "admin_required",
    )
    # No plugin reports stored assets on this server: the asset registry is the source.
    put = env.post("/v1/op/assets.put", json={**body, "resource": "a", "bytes": 1234})
    assert put.status_code == 200
    registered = ndjson(env.post("/v1/assets/list", json=body))
    assert ("a", 1234) in {(a["resource"], a["bytes"]) for a in registered}
    admin = env.post("/v1/op/usage.recalculate_storage", json=body)
    assert admin.status_code == 200
    assert ndjson(admin)[0]["storage_bytes"] == sum(a["bytes"] for a in registered)


def test_event_ingest_all_formats(env: Env) -> None:
    t = 1_704_067_200  # 2024-01-01, before any demo data
    native = [
        {
            "id": "ingest_1",
            "meter": "completions",
            "time": t + 60,
            "values": {"input_tokens": 100, "num_model_requests": 1},
            "dimensions": {"model": "gpt-4o"},
        }
    ]
    first = env.post("/v1/events", "writer", json=native)
    assert first.status_code == 200, first.text
    assert ingested(first.json()) == {"accepted": 1, "duplicates": 0}
    again = env.post("/v1/events", "writer", json=native).json()
    assert ingested(again) == {"accepted": 0, "duplicates": 1}

    lines = "\n".join(
        json.dumps({**native[0], "id": f"ingest_nd_{i}", "time": t + DAY + i}) for i in range(3)
    )
    nd = env.post(
        "/v1/events", "writer", content=lines, headers={"Content-Type": "application/x-ndjson"}
    )
    assert ingested(nd.json()) == {"accepted": 3, "duplicates": 0}

    cloud = [
        {
            "specversion": "1.0",
            "id": "ingest_ce_1",
            "source": "/tests",
            "type": "completions",
            "time": "2024-01-03T10:00:00Z",
            "data": {
                "values": {"input_tokens": 7, "num_model_requests": 1},
                "dimensions": {"model": "gpt-4o-mini"},
            },
        }
    ]
    ce = env.post(
        "/v1/events",
        "admin",
        content=json.dumps(cloud),
        headers={"Content-Type": "application/cloudevents-batch+json"},
    )
    assert ingested(ce.json()) == {"accepted": 1, "duplicates": 0}

    buckets, _ = http_pages(
        env,
        "/v1/organization/usage/completions",
        [("start_time", str(t)), ("end_time", str(t + 3 * DAY))],
    )
    assert [sums([b], ("input_tokens",))["input_tokens"] for b in buckets] == [100, 300, 7]
    assert buckets == oracle_usage(
        env.meter, "completions", "org_acme", start_time=t, end_time=t + 3 * DAY
    )

    foreign = env.post(
        "/v1/events",
        "writer",
        json=[{**native[0], "id": "ingest_x", "organization_id": "org_globex"}],
    )
    assert foreign.status_code == 403
    reader = env.post("/v1/events", "member", json=native)
    assert reader.status_code == 403


# -- the official openai SDK -------------------------------------------------------------------


def sdk_pages(call: Any, **query: Any) -> tuple[list[dict[str, Any]], int]:
    """Every bucket through the SDK, following ``next_page`` while ``has_more``."""
    buckets: list[dict[str, Any]] = []
    pages = 0
    page = call(**query)
    while True:
        pages += 1
        assert page.object == "page"
        buckets += [bucket.to_dict() for bucket in page.data]
        if not page.has_more:
            assert page.next_page is None
            return buckets, pages
        assert pages < 100
        page = call(**query, page=page.next_page)


@pytest.mark.parametrize("kind", KINDS)
def test_sdk_usage_matches_in_process(env: Env, kind: str) -> None:
    client = env.sdk()
    call = getattr(client.admin.organization.usage, kind)
    buckets, pages = sdk_pages(
        call,
        start_time=env.start,
        end_time=env.end,
        bucket_width="1d",
        group_by=GROUP_BY[kind],
        limit=7,
    )
    expected = oracle_usage(
        env.meter,
        kind,
        "org_acme",
        start_time=env.start,
        end_time=env.end,
        bucket_width="1d",
        group_by=GROUP_BY[kind],
        limit=7,
    )
    assert buckets == expected
    assert len(buckets) == expected_buckets(env) and pages == -(-len(buckets) // 7)

    # The totals, against the in-process totals (no paging, no grouping).
    spec = env.meter.spec(kind)
    for measure in spec.measure_names:
        spec_measure = spec.measure(measure)
        if spec_measure is None or spec_measure.gauge:
            continue
        total = env.meter.total(
            kind, measure, organization_id="org_acme", start_time=env.start, end_time=env.end
        )
        assert sums(buckets, (measure,))[measure] == total, measure
        # Every measure shows usage, but those no demo model produces.
        assert (total > 0) is (measure not in DEMO_ZEROS.get(kind, ())), measure
    client.close()


def test_sdk_vector_store_gauge(env: Env) -> None:
    """A gauge is not summed over time: each day is the latest reading of each project."""
    client = env.sdk()
    buckets, _ = sdk_pages(
        client.admin.organization.usage.vector_stores,
        start_time=env.start,
        end_time=env.end,
        limit=31,
    )
    daily = [b["results"][0]["usage_bytes"] for b in buckets if b["results"]]
    assert daily == sorted(daily) and daily[0] > 0  # the demo's stores only grow
    rows = env.meter.totals(
        "vector_stores", organization_id="org_acme", start_time=env.start, end_time=env.end
    )
    assert daily == [v["usage_bytes"] for _, v in rows if v.get("usage_bytes")]
    client.close()


def test_sdk_costs_match_in_process(env: Env) -> None:
    client = env.sdk()
    buckets, pages = sdk_pages(
        client.admin.organization.usage.costs,
        start_time=env.start,
        end_time=env.end,
        group_by=["line_item"],
        limit=7,
    )
    expected = oracle_costs(
        env.meter,
        "org_acme",
        start_time=env.start,
        end_time=env.end,
        group_by=["line_item"],
        limit=7,
    )
    assert buckets == expected and pages == -(-len(buckets) // 7)
    line_items = {r["line_item"] for b in buckets for r in b["results"]}
    assert {"gpt-4o, input", "gpt-4o-mini, output", "whisper-1"} <= line_items
    # Vector-store storage, priced over time, parsed by the SDK in gibibyte-hours.
    storage = [r for b in buckets for r in b["results"] if r["line_item"] == "vector stores"]
    assert storage and all(r["quantity_unit"] == "gibibyte_hours" for r in storage)
    assert all(r["quantity"] > 0 and r["amount"]["value"] > 0 for r in storage)
    total = sum(r["amount"]["value"] for b in buckets for r in b["results"])
    assert total == pytest.approx(sum(r["amount"]["value"] for b in expected for r in b["results"]))
    assert total > 0
    client.close()


def test_sdk_errors(env: Env) -> None:
    bad = openai.OpenAI(
        admin_api_key="mk_0123456789abcdef_" + "A" * 43,
        base_url=f"{env.server.base}/v1",
        max_retries=0,
        timeout=30.0,
    )
    with pytest.raises(openai.AuthenticationError) as auth:
        bad.admin.organization.usage.completions(start_time=env.start)
    assert auth.value.status_code == 401
    bad.close()

    client = env.sdk()
    with pytest.raises(openai.BadRequestError) as invalid:
        client.admin.organization.usage.completions(start_time=env.start, limit=1000)
    assert invalid.value.status_code == 400
    assert isinstance(invalid.value.body, Mapping) and invalid.value.body["param"] == "limit"
    with pytest.raises(openai.BadRequestError):
        client.admin.organization.usage.costs(start_time=env.start, bucket_width="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.PermissionDeniedError):
        env.sdk("writer").admin.organization.usage.embeddings(start_time=env.start)
    client.close()


# -- the demo itself, as a new user runs it ----------------------------------------------------


def test_demo_serves_and_its_printed_sdk_snippet_works(tmp_path: Path) -> None:
    """``meterkit demo`` fills the store, prints a snippet, and serves: the snippet, pasted into
    a fresh interpreter, gets real buckets back."""
    server = start_with_retry(
        [
            "demo",
            "--db",
            f"sqlite:///{tmp_path / 'demo.db'}",
            "--days",
            "8",
            "--log-level",
            "warning",
        ],
        tmp_path / "demo.log",
        tmp_path,
    )
    try:
        printed = server.logs()
        lines = printed.splitlines()
        begin = lines.index("from openai import OpenAI")
        snippet = "\n".join(lines[begin : begin + 4])
        assert server.base + "/v1" in snippet
        result = subprocess.run(
            [sys.executable, "-c", snippet],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert "organization.usage.completions.result" in result.stdout
        assert "input_tokens=" in result.stdout

        token = next(w for w in printed.split() if w.startswith("mk_"))
        curl = next(line for line in lines if "usage/completions?start_time=" in line)
        url = curl.split('"')[1]
        response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT)
        assert response.status_code == 200
        assert any(b["results"] for b in response.json()["data"])
    finally:
        stop(server)
    assert server.process.returncode is not None
