"""The ASGI adapter: every endpoint through ``create_app`` (at the root, under a Starlette
``Mount``, behind a server ``root_path``, and through ``httpx.ASGITransport``), and
``MeteringMiddleware`` around a Starlette app: headers, refusals, settling, races.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import anyio.to_thread
import attrs
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from http_helpers import (
    ENDPOINT_CHECKS,
    GUARD_CHECKS,
    MONTH_END,
    NOW,
    QUOTA,
    T0,
    Client,
    MakeGuarded,
    Query,
    Reply,
    Served,
    check_store_unavailable,
    guard_meter,
    join_headers,
    key_id,
    make_meter,
    race,
    requests_recorded,
    send,
    used,
)
from meterkit import Decision, Meter, Plan, ValidationError
from meterkit.asgi import MeteringMiddleware, MeteringOptions, create_app, current_usage
from meterkit.http.metering import Usage, rate_limit_headers, retry_after_seconds
from meterkit.quotas import LimitState

Scope = MutableMapping[str, Any]


class StarletteClient:
    """Starlette's TestClient; server errors come back as 500s, as a real server sends them."""

    def __init__(self, app: Any, prefix: str = "", root_path: str = "") -> None:
        self.client = TestClient(app, raise_server_exceptions=False, root_path=root_path)
        self.prefix = prefix

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Query = (),
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> Reply:
        r = self.client.request(
            method,
            self.prefix + path,
            params=list(query),
            headers=dict(headers or {}),
            content=body,
        )
        return Reply(r.status_code, join_headers(r.headers.multi_items()), r.content)


class HttpxClient:
    """httpx's own ASGI transport, each request on a fresh event loop."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Query = (),
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> Reply:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await c.request(
                    method, path, params=list(query), headers=dict(headers or {}), content=body
                )

        r = asyncio.run(go())
        return Reply(r.status_code, join_headers(r.headers.multi_items()), r.content)


def served(meter: Meter, how: str) -> Client:
    if how == "root":
        return StarletteClient(create_app(meter))
    if how == "mount":
        app = Starlette(routes=[Mount("/meterkit", app=create_app(meter))])
        return StarletteClient(app, prefix="/meterkit")
    if how == "root_path":
        # A server started with a root path: the whole path arrives, the prefix in root_path.
        return StarletteClient(create_app(meter), prefix="/base", root_path="/base")
    assert how == "httpx"
    return HttpxClient(create_app(meter))


@pytest.fixture
def meter_and_tokens() -> Iterator[tuple[Meter, dict[str, str]]]:
    meter, tokens = make_meter()
    yield meter, tokens
    meter.close()


# -- every endpoint ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["root", "mount", "root_path", "httpx"])
@pytest.mark.parametrize("check", ENDPOINT_CHECKS, ids=lambda c: c.__name__[6:])
def test_every_endpoint(
    meter_and_tokens: tuple[Meter, dict[str, str]], how: str, check: Callable[[Served], None]
) -> None:
    meter, tokens = meter_and_tokens
    check(Served(served(meter, how), meter, tokens))


def test_a_path_outside_the_mount_is_not_meterkits(
    meter_and_tokens: tuple[Meter, dict[str, str]],
) -> None:
    meter, _ = meter_and_tokens
    app = Starlette(routes=[Mount("/meterkit", app=create_app(meter))])
    client = StarletteClient(app)
    assert send(client, "GET", "/healthz").status == 404
    r = send(client, "GET", "/meterkit/nothing")
    assert r.status == 404 and r.json()["error"]["code"] == "not_found"


async def call_asgi(
    app: Any,
    method: str,
    path: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    pieces: tuple[bytes, ...] = (b"",),
    disconnect: bool = False,
) -> list[dict[str, Any]]:
    """Drive an ASGI app by hand, the body arriving in ``pieces`` (and the client leaving
    before the end when ``disconnect``); returns every message the app sent."""
    incoming = [
        {"type": "http.request", "body": piece, "more_body": disconnect or i < len(pieces) - 1}
        for i, piece in enumerate(pieces)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send_(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": headers or [],
    }
    await app(scope, receive, send_)
    return sent


def test_ndjson_is_streamed_line_by_line_off_the_event_loop(
    meter_and_tokens: tuple[Meter, dict[str, str]],
) -> None:
    meter, tokens = meter_and_tokens
    app = create_app(meter)
    threads: list[int] = []
    handle = app.http.handle

    def spy(request: Any) -> Any:
        threads.append(threading.get_ident())
        return handle(request)

    app.http.handle = spy  # type: ignore[method-assign]

    async def go() -> tuple[int, list[dict[str, Any]]]:
        auth = [
            (b"authorization", f"Bearer {tokens['member']}".encode()),
            (b"content-type", b"application/json"),
        ]
        sent = await call_asgi(
            app,
            "POST",
            "/v1/usage/history",
            headers=auth,
            pieces=(b'{"organization_id": "org_a", "months": 4}',),
        )
        return threading.get_ident(), sent

    loop_thread, sent = asyncio.run(go())
    assert threads and loop_thread not in threads
    start, *bodies = sent
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert (b"content-type", b"application/x-ndjson") in start["headers"]
    # One message per line as it is produced, then the end of the body.
    assert [m["more_body"] for m in bodies] == [True] * 4 + [False]
    assert [m["body"].count(b"\n") for m in bodies] == [1, 1, 1, 1, 0]
    assert b'"month":"2024-08"' in bodies[0]["body"]


def test_a_body_arriving_in_pieces_and_the_body_limit(
    meter_and_tokens: tuple[Meter, dict[str, str]],
) -> None:
    meter, tokens = meter_and_tokens
    event = b'[{"id": "big", "meter": "tokens", "time": %d, "values": {"tokens": 9}}]' % (T0 + 1)
    auth = [
        (b"authorization", f"Bearer {tokens['admin']}".encode()),
        (b"content-type", b"application/json"),
    ]
    sent = asyncio.run(
        call_asgi(
            create_app(meter),
            "POST",
            "/v1/events",
            headers=auth,
            pieces=(event[:10], event[10:30], event[30:]),
        )
    )
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"])["accepted"] == 1
    small = StarletteClient(create_app(meter, max_body_bytes=40))
    r = send(
        small,
        "POST",
        "/v1/events",
        body=event,
        token=tokens["admin"],
        content_type="application/json",
    )
    assert r.status == 413 and r.json()["error"]["code"] == "payload_too_large"
    # A client that goes away before its body arrives gets no answer at all.
    left = asyncio.run(
        call_asgi(
            create_app(meter),
            "POST",
            "/v1/events",
            headers=auth,
            pieces=(event[:10],),
            disconnect=True,
        )
    )
    assert left == []


def test_lifespan_closes_the_meter_only_when_asked() -> None:
    class Closable:
        closed = 0

        def close(self) -> None:
            self.closed += 1

    async def lifespan(app: Any) -> list[str]:
        messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent: list[str] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send_(message: dict[str, Any]) -> None:
            sent.append(message["type"])

        await app({"type": "lifespan"}, receive, send_)
        return sent

    for close_meter, closed in ((False, 0), (True, 1)):
        fake = Closable()
        sent = asyncio.run(lifespan(create_app(fake, close_meter=close_meter)))  # type: ignore[arg-type]
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert fake.closed == closed


def test_websockets_are_refused(meter_and_tokens: tuple[Meter, dict[str, str]]) -> None:
    meter, _ = meter_and_tokens
    sent: list[dict[str, Any]] = []

    async def go() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send_(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        await create_app(meter)({"type": "websocket", "path": "/"}, receive, send_)

    asyncio.run(go())
    assert sent == [{"type": "websocket.close", "code": 1008}]


# -- the metering middleware -------------------------------------------------------------------


class Guarded:
    """The endpoints http_helpers.Guarded describes, as a Starlette app behind the middleware."""

    work_route = "/work/{n:int}"

    def __init__(self, meter: Meter, *, as_value: bool = False, **options: Any) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        header = options.pop("identify_header", None)
        if header is not None:
            options["identify"] = lambda scope: _header(scope, header)
        skip_path = options.pop("skip_path", None)
        if skip_path is not None:
            options["skip"] = lambda scope: scope["path"] == skip_path
        routes = [
            Route("/work/{n:int}", self.work),
            Route("/boom/{n:int}", self.boom),
            Route("/fail", self.fail),
            Route("/healthz", self.healthz),
            Mount("/meterkit", app=create_app(meter)),
        ]
        if as_value:  # the same options as one MeteringOptions
            self.app = MeteringMiddleware(
                Starlette(routes=routes), meter=meter, options=MeteringOptions(**options)
            )
        else:
            self.app = MeteringMiddleware(Starlette(routes=routes), meter=meter, **options)

    def count(self, name: str) -> None:
        with self._lock:
            self.calls[name] += 1

    async def work(self, request: StarletteRequest) -> Response:
        self.count("work")
        usage = current_usage()
        assert usage is request.state.meterkit
        n = request.path_params["n"]
        if n and request.headers.get("x-priced"):
            usage.price({"tokens": {"tokens": n}})
        elif n:
            usage.add(tokens=n)
        return JSONResponse({"organization_id": usage.organization_id, "reported": usage.reported})

    async def boom(self, request: StarletteRequest) -> Response:
        self.count("boom")
        n = request.path_params["n"]
        if n:
            current_usage().add(tokens=n)
        raise RuntimeError("the endpoint failed")

    async def fail(self, request: StarletteRequest) -> Response:
        self.count("fail")
        return PlainTextResponse("no", status_code=500)

    async def healthz(self, request: StarletteRequest) -> Response:
        self.count("healthz")
        return PlainTextResponse("ok")

    def client(self) -> Client:
        return StarletteClient(self.app)


def _header(scope: Mapping[str, Any], name: str) -> str | None:
    for key, value in scope["headers"]:
        if key.decode("latin-1").lower() == name:
            text: str = value.decode("latin-1")
            return text
    return None


make_guarded: MakeGuarded = Guarded


@pytest.mark.parametrize("check", GUARD_CHECKS, ids=lambda c: c.__name__[6:])
def test_guard(check: Callable[[MakeGuarded], None]) -> None:
    check(make_guarded)


@pytest.mark.parametrize("check", GUARD_CHECKS, ids=lambda c: c.__name__[6:])
def test_guard_given_its_options_as_one_value(check: Callable[[MakeGuarded], None]) -> None:
    check(functools.partial(Guarded, as_value=True))


def test_options_are_one_value_checked_when_made_and_keywords_go_on_top() -> None:
    with pytest.raises(ValidationError) as bad:
        MeteringOptions(ttl=0)
    assert bad.value.field == "ttl"
    with pytest.raises(ValidationError) as bad:
        MeteringOptions(unidentified="allow")  # type: ignore[arg-type]
    assert bad.value.field == "unidentified"
    options: MeteringOptions[Any] = MeteringOptions(cost={"tokens": 5}, ttl=60)
    assert options.cost == {"tokens": 5} and options.record_meter == "requests"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.ttl = 1  # type: ignore[misc]
    meter, _ = guard_meter()
    app = MeteringMiddleware(Starlette(), meter=meter, options=options, ttl=30)
    assert app.metering.options == attrs.evolve(options, ttl=30)
    assert app.metering.cost == {"tokens": 5} and app.metering.ttl == 30
    with pytest.raises(TypeError, match="'tll'"):
        MeteringMiddleware(Starlette(), meter=meter, tll=30)


def test_guard_answers_503_when_the_store_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    check_store_unavailable(make_guarded, monkeypatch)


def test_threads_race_one_quota(store_url: str) -> None:
    race(make_guarded, store_url)


def test_concurrent_requests_on_one_event_loop_race_one_quota() -> None:
    meter, tokens = guard_meter()
    app = Guarded(meter)

    async def go() -> list[int]:
        transport = httpx.ASGITransport(app=app.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            replies = await asyncio.gather(
                *(
                    client.get("/work/2", headers={"authorization": f"Bearer {tokens['admin']}"})
                    for _ in range(40)
                )
            )
        return [r.status_code for r in replies]

    assert Counter(asyncio.run(go())) == {200: QUOTA, 429: 40 - QUOTA}
    assert app.calls["work"] == QUOTA
    assert used(meter, "queries") == QUOTA and used(meter, "tokens") == 2 * QUOTA


def test_store_io_runs_off_the_event_loop() -> None:
    meter, _ = guard_meter()
    where: dict[str, int] = {}

    def identify(scope: Scope) -> str:
        where["identify"] = threading.get_ident()
        return "org_a"

    async def endpoint(request: StarletteRequest) -> Response:
        where["loop"] = threading.get_ident()
        return PlainTextResponse("ok")

    app = MeteringMiddleware(
        Starlette(routes=[Route("/", endpoint)]), meter=meter, identify=identify
    )
    assert StarletteClient(app).request("GET", "/").status == 200
    assert where["identify"] != where["loop"]


def test_sync_endpoints_streams_and_nested_mounts() -> None:
    meter, tokens = guard_meter()

    def sync_endpoint(request: StarletteRequest) -> Response:
        # Starlette runs this in a worker thread: the handle follows it there.
        current_usage().add(tokens=11)
        return PlainTextResponse("sync")

    async def streamed(request: StarletteRequest) -> Response:
        async def lines() -> AsyncIterator[bytes]:
            for i in range(3):
                current_usage().add(tokens=100)
                yield b"line %d\n" % i

        return StreamingResponse(lines(), media_type="text/plain")

    inner = [Route("/sync/{id}", sync_endpoint), Route("/stream", streamed)]
    app = MeteringMiddleware(Starlette(routes=[Mount("/api", routes=inner)]), meter=meter)
    client = StarletteClient(app)
    r = send(client, "GET", "/api/sync/42", token=tokens["admin"])
    assert r.status == 200 and r.header("x-ratelimit-limit") == str(QUOTA)
    assert used(meter, "tokens") == 11
    r = send(client, "GET", "/api/stream", token=tokens["admin"])
    assert r.body == b"line 0\nline 1\nline 2\n" and r.header("x-ratelimit-remaining") == "3"
    # Usage reported while the body streamed is settled after the last chunk.
    assert used(meter, "tokens") == 311
    kid = key_id(tokens["admin"])
    assert requests_recorded(meter) == {
        ("GET", "/api/sync/{id}", "200", kid): 1,
        ("GET", "/api/stream", "200", kid): 1,
    }


def test_added_as_starlette_middleware() -> None:
    meter, tokens = guard_meter()

    async def item(request: StarletteRequest) -> Response:
        if request.path_params["id"] == "bad":
            current_usage().add(tokens=9)
            raise RuntimeError("no such item")
        return PlainTextResponse("ok")

    # As FastAPI's add_middleware does it: inside Starlette's error handling, outside the router.
    app = Starlette(
        routes=[Route("/items/{id}", item)],
        middleware=[Middleware(MeteringMiddleware, meter=meter, cost={"queries": 1})],
    )
    client = StarletteClient(app)
    r = send(client, "GET", "/items/1", token=tokens["admin"])
    assert r.status == 200 and r.header("x-ratelimit-remaining") == str(QUOTA - 1)
    r = send(client, "GET", "/items/bad", token=tokens["admin"])
    assert r.status == 500
    assert used(meter, "queries") == 1 and used(meter, "tokens") == 9
    kid = key_id(tokens["admin"])
    # The exception passed through before any response started: recorded as a 500.
    assert requests_recorded(meter) == {
        ("GET", "/items/{id}", "200", kid): 1,
        ("GET", "/items/{id}", "500", kid): 1,
    }


def test_cost_from_the_request() -> None:
    meter, tokens = guard_meter()

    def cost(scope: Scope) -> dict[str, int]:
        wanted = _header(scope, "x-max-tokens")
        return {"tokens": int(wanted)} if wanted else {}

    app = Guarded(meter, cost=cost)
    client = app.client()
    r = send(client, "GET", "/work/0", token=tokens["admin"], headers={"x-max-tokens": "900"})
    assert r.status == 200 and used(meter, "tokens") == 900  # nothing reported: the hold stands
    r = send(client, "GET", "/work/0", token=tokens["admin"], headers={"x-max-tokens": "200"})
    assert r.status == 429 and r.json()["error"]["code"] == "insufficient_quota"
    r = send(client, "GET", "/work/0", token=tokens["admin"])  # no cost: rate limits only
    assert r.status == 200 and used(meter, "queries") == 0


def test_current_usage_outside_a_request() -> None:
    with pytest.raises(LookupError):
        current_usage()


def test_bad_options_are_refused_at_once() -> None:
    meter, _ = guard_meter()
    app = Starlette()
    with pytest.raises(ValueError, match="unidentified"):
        MeteringMiddleware(app, meter=meter, unidentified="allow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="record_meter"):
        MeteringMiddleware(app, meter=meter, record_meter="nope")
    with pytest.raises(ValueError, match=r"cost\.rate_limit_rpm"):
        MeteringMiddleware(app, meter=meter, cost={"rate_limit_rpm": 1})
    with pytest.raises(ValueError, match="ttl"):
        MeteringMiddleware(app, meter=meter, ttl=0)
    with pytest.raises(ValidationError) as bad:
        MeteringMiddleware(app, meter=meter, price=["tokens"])  # type: ignore[arg-type]
    assert bad.value.field == "price"
    with pytest.raises(ValidationError) as bad:
        MeteringMiddleware(app, meter=meter, price={"tokens": {"tokens": -1}})
    assert bad.value.field == "price.tokens.tokens"


def test_a_bad_priced_report_is_refused_and_changes_nothing() -> None:
    usage = Usage("org")
    usage.price({"completions": {"input_tokens": 10}})
    for bad in ({"completions": {"input_tokens": -1}}, {"completions": 5}, "completions"):
        with pytest.raises(ValidationError) as refused:
            usage.price(bad)  # type: ignore[arg-type]
        assert refused.value.field.startswith("price")
    assert usage.priced == {"completions": {"input_tokens": 10}}


# -- the framework-neutral pieces --------------------------------------------------------------


def test_headers_of_a_gauge_and_of_no_limit_at_all() -> None:
    unlimited = Decision(True, "org", (LimitState("tokens", 5, 5, -1, -1, MONTH_END),))
    assert rate_limit_headers(unlimited, NOW) == ()
    gauge = Decision(False, "org", (LimitState("spaces", 1, 5, 5, 0, None),), refused_by="spaces")
    # Nothing resets a gauge on its own: the client is told to come back in a minute.
    assert retry_after_seconds(gauge, NOW) == 60
    assert dict(rate_limit_headers(gauge, NOW)) == {
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(NOW + 60),
        "RateLimit-Policy": '"spaces";q=5;qu="spaces"',
        "RateLimit": '"spaces";r=0;t=60',
    }
    odd = Decision(True, "org", (LimitState('a"b\\c\u00e9', 1, 1, 9, 8, None),))
    assert dict(rate_limit_headers(odd, NOW))["RateLimit"] == '"a\\"b\\\\c?";r=8'


@pytest.mark.parametrize("url", ["memory://", "sqlite"])
def test_the_guard_decides_on_the_loop_when_it_can(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = url if url == "memory://" else f"sqlite:///{tmp_path / 'g.db'}"
    meter, tokens = guard_meter(store)
    hops: list[str] = []
    real = anyio.to_thread.run_sync

    async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__qualname__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)

    async def endpoint(request: StarletteRequest) -> Response:
        return PlainTextResponse("ok")

    # Limits with room for blocks (a limit of 5 queries would be leased one by one).
    meter.set_plan(
        Plan("wide", limits={"queries": 10**6}, rate_limit_rpm=10**5, rate_limit_per_day=10**6)
    )
    meter.assign_plan("org_a", "wide")
    app = MeteringMiddleware(Starlette(routes=[Route("/", endpoint)]), meter=meter)
    headers = {"authorization": f"Bearer {tokens['admin']}"}

    async def go(n: int) -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [(await client.get("/", headers=headers)).status_code for _ in range(n)]

    assert asyncio.run(go(1)) == [200]
    # On SQLite the first request read the key and took leases in a worker thread; on
    # memory:// everything is in this process from the start.
    assert bool(hops) == (url != "memory://")
    # Blocks double with each take (16, 32, 64, ...): after a few, the next requests find the
    # key and the room in memory: no thread hop, and every one is counted.
    assert asyncio.run(go(60)) == [200] * 60
    hops.clear()
    assert asyncio.run(go(40)) == [200] * 40
    assert hops == []
    meter.flush()
    assert used(meter, "queries") == 101
    assert (
        meter.total(
            "requests", "requests", organization_id="org_a", start_time=0, end_time=meter.now() + 1
        )
        == 101
    )
    # Limits to read again (a plan changed) are read from the store, off the loop.
    meter.quotas.forget()
    assert asyncio.run(go(1)) == [200]
    assert bool(hops) == (url != "memory://")
