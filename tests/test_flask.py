"""The Flask adapter: every endpoint through ``init_app`` (at the root and under a url_prefix),
and the before/after/teardown-request quota guard: headers, refusals, settling, races.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from flask import Flask, Response, jsonify, request, stream_with_context

from http_helpers import (
    ENDPOINT_CHECKS,
    GUARD_CHECKS,
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
from meterkit import Meter
from meterkit.flask import MeteringOptions, current_usage, init_app, init_metering


class FlaskClient:
    def __init__(self, app: Flask, prefix: str = "") -> None:
        self.client = app.test_client()
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
        r = self.client.open(
            self.prefix + path,
            method=method,
            query_string=list(query),
            headers=dict(headers or {}),
            data=body,
        )
        return Reply(r.status_code, join_headers(list(r.headers.items())), r.get_data())


def served(meter: Meter, prefix: str) -> FlaskClient:
    app = Flask("served")
    init_app(app, meter, url_prefix=prefix)
    return FlaskClient(app, prefix)


@pytest.fixture
def meter_and_tokens() -> Iterator[tuple[Meter, dict[str, str]]]:
    meter, tokens = make_meter()
    yield meter, tokens
    meter.close()


# -- every endpoint ----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/meterkit"])
@pytest.mark.parametrize("check", ENDPOINT_CHECKS, ids=lambda c: c.__name__[6:])
def test_every_endpoint(
    meter_and_tokens: tuple[Meter, dict[str, str]], prefix: str, check: Callable[[Served], None]
) -> None:
    meter, tokens = meter_and_tokens
    check(Served(served(meter, prefix), meter, tokens))


def test_ndjson_is_streamed(meter_and_tokens: tuple[Meter, dict[str, str]]) -> None:
    meter, tokens = meter_and_tokens
    app = Flask("streams")
    init_app(app, meter)
    streamed: list[bool] = []

    @app.after_request
    def spy(response: Response) -> Response:
        streamed.append(response.is_streamed)
        return response

    client = FlaskClient(app)
    r = send(
        client,
        "POST",
        "/v1/op/usage.history",
        body={"organization_id": "org_a"},
        token=tokens["member"],
    )
    assert r.status == 200 and len(r.lines()) == 6
    r = send(client, "GET", "/healthz")
    assert r.header("content-length") == str(len(r.body))
    assert streamed == [True, False]


def test_what_is_meterkits_at_the_root_and_under_a_prefix(
    meter_and_tokens: tuple[Meter, dict[str, str]],
) -> None:
    meter, tokens = meter_and_tokens
    app = Flask("mixed")

    @app.get("/v1/things")
    def things() -> Any:
        return jsonify(things=[])

    init_app(app, meter, unidentified="pass")  # routing is the point here, not the guard
    client = FlaskClient(app)
    assert send(client, "GET", "/v1/things").json() == {"things": []}
    # At the root, the application's own 404s and 405s stay its own...
    assert send(client, "GET", "/nothing").text("content-type").startswith("text/html")
    r = send(client, "POST", "/v1/things")
    assert r.status == 405 and r.text("content-type").startswith("text/html")
    # ...while meterkit's paths answer in their own shape, wrong methods included.
    r = send(client, "DELETE", "/v1/organization/costs", token=tokens["member"])
    assert r.status == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = send(client, "POST", "/v1/op/usage.nothing", body={}, token=tokens["member"])
    assert r.status == 404 and r.json()["error"]["code"] == "unknown_operation"
    # Under a prefix, everything below it is meterkit's.
    prefixed = served(meter, "/usage-api/")
    prefixed.prefix = "/usage-api"
    r = send(prefixed, "GET", "/nothing/here")
    assert r.status == 404 and r.json()["error"]["code"] == "not_found"
    assert send(prefixed, "GET", "/").json()["error"]["code"] == "not_found"
    assert send(prefixed, "GET", "/healthz").json() == {"status": "ok"}


def test_the_body_limit(meter_and_tokens: tuple[Meter, dict[str, str]]) -> None:
    meter, tokens = meter_and_tokens
    app = Flask("small")
    init_app(app, meter, max_body_bytes=40)
    event = b'[{"id": "big", "meter": "tokens", "time": %d, "values": {"tokens": 9}}]' % (T0 + 1)
    r = send(
        FlaskClient(app),
        "POST",
        "/v1/events",
        body=event,
        token=tokens["admin"],
        content_type="application/json",
    )
    assert r.status == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = send(
        FlaskClient(app),
        "POST",
        "/v1/events",
        body=event[:40],
        token=tokens["admin"],
        content_type="application/json",
    )
    assert r.status == 400  # within the limit, but cut short: not JSON


# -- the metering guard ------------------------------------------------------------------------


class Guarded:
    """The endpoints http_helpers.Guarded describes, as a Flask app with ``init_app``."""

    work_route = "/work/<int:n>"

    def __init__(
        self, meter: Meter, *, testing: bool = False, as_value: bool = False, **options: Any
    ) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        header = options.pop("identify_header", None)
        if header is not None:
            options["identify"] = lambda req: req.headers.get(header)
        skip_path = options.pop("skip_path", None)
        if skip_path is not None:
            options["skip"] = lambda req: req.path == skip_path
        app = Flask("guarded")
        app.testing = testing
        self.app = app

        @app.get("/work/<int:n>")
        def work(n: int) -> Any:
            self.count("work")
            usage = current_usage()
            if n and request.headers.get("x-priced"):
                usage.price({"tokens": {"tokens": n}})
            elif n:
                usage.add(tokens=n)
            return jsonify(organization_id=usage.organization_id, reported=usage.reported)

        @app.get("/boom/<int:n>")
        def boom(n: int) -> Any:
            self.count("boom")
            if n:
                current_usage().add({"tokens": n})
            raise RuntimeError("the endpoint failed")

        @app.get("/fail")
        def fail() -> Any:
            self.count("fail")
            return "no", 500

        @app.get("/healthz")
        def healthz() -> Any:
            self.count("healthz")
            return "ok"

        if as_value:  # the same options as one MeteringOptions
            init_app(app, meter, url_prefix="/meterkit", options=MeteringOptions(**options))
        else:
            init_app(app, meter, url_prefix="/meterkit", **options)

    def count(self, name: str) -> None:
        with self._lock:
            self.calls[name] += 1

    def client(self) -> Client:
        return FlaskClient(self.app)


make_guarded: MakeGuarded = Guarded


@pytest.mark.parametrize("check", GUARD_CHECKS, ids=lambda c: c.__name__[6:])
def test_guard(check: Callable[[MakeGuarded], None]) -> None:
    check(make_guarded)


@pytest.mark.parametrize("check", GUARD_CHECKS, ids=lambda c: c.__name__[6:])
def test_guard_given_its_options_as_one_value(check: Callable[[MakeGuarded], None]) -> None:
    check(functools.partial(Guarded, as_value=True))


def test_guard_answers_503_when_the_store_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    check_store_unavailable(make_guarded, monkeypatch)


def test_threads_race_one_quota(store_url: str) -> None:
    race(make_guarded, store_url)


def test_a_propagated_exception_still_releases() -> None:
    meter, tokens = guard_meter()
    app = Guarded(meter, testing=True, cost={"queries": 1, "tokens": 300})
    with pytest.raises(RuntimeError, match="the endpoint failed"):
        send(app.client(), "GET", "/boom/0", token=tokens["admin"])
    assert app.calls["boom"] == 1
    assert used(meter, "queries") == 0 and used(meter, "tokens") == 0
    assert requests_recorded(meter) == {("GET", "/boom/<int:n>", "500", key_id(tokens["admin"])): 1}


def test_the_usage_api_itself_is_not_metered() -> None:
    meter, tokens = guard_meter()
    app = Guarded(meter)
    client = FlaskClient(app.app, "/meterkit")
    for _ in range(QUOTA + 2):
        r = send(client, "GET", "/v1/usage", token=tokens["admin"])
        assert r.status == 200 and r.header("x-ratelimit-limit") is None
    assert used(meter, "queries") == 0 and requests_recorded(meter) == {}


def test_streamed_views_settle_after_the_stream() -> None:
    meter, tokens = guard_meter()
    app = Flask("streams")

    @app.get("/stream")
    def stream() -> Response:
        def lines() -> Iterator[str]:
            for i in range(3):
                current_usage().add(tokens=50)
                yield f"line {i}\n"

        return Response(stream_with_context(lines()), mimetype="text/plain")

    @app.get("/captured")
    def captured() -> Response:
        usage = current_usage()  # taken in the view: the generator runs outside the request

        def lines() -> Iterator[bytes]:
            for _ in range(2):
                usage.add(tokens=5)
                yield b"x\n"

        return Response(lines(), mimetype="text/plain")

    init_app(app, meter, url_prefix="/meterkit")
    r = send(FlaskClient(app), "GET", "/stream", token=tokens["admin"])
    assert r.body == b"line 0\nline 1\nline 2\n" and r.header("x-ratelimit-limit") == str(QUOTA)
    assert used(meter, "tokens") == 150
    r = send(FlaskClient(app), "GET", "/captured", token=tokens["admin"])
    assert r.body == b"x\nx\n" and used(meter, "tokens") == 160
    assert used(meter, "queries") == 2


def test_cost_from_the_request_and_metering_without_the_blueprint() -> None:
    meter, tokens = guard_meter()
    app = Flask("costly")

    @app.post("/generate")
    def generate() -> Any:
        current_usage().add(tokens=int(request.get_json()["used"]))
        return jsonify(ok=True)

    def cost(req: Any) -> dict[str, int]:
        return {"tokens": int(req.headers.get("x-max-tokens", "0"))}

    init_metering(app, meter, cost=cost)
    client = FlaskClient(app)
    r = send(
        client,
        "POST",
        "/generate",
        body={"used": 120},
        token=tokens["admin"],
        headers={"x-max-tokens": "800"},
    )
    assert r.status == 200 and used(meter, "tokens") == 120
    r = send(
        client,
        "POST",
        "/generate",
        body={"used": 1},
        token=tokens["admin"],
        headers={"x-max-tokens": "881"},
    )
    assert r.status == 429 and r.header("x-ratelimit-limit") == "1000"
    assert r.header("retry-after") == r.text("ratelimit").split(";t=")[1].split(",")[0]
    assert "/v1/usage" not in {rule.rule for rule in app.url_map.iter_rules()}
    # No cost at all: rate limits only.
    r = send(
        client,
        "POST",
        "/generate",
        body={"used": 0},
        token=tokens["admin"],
        headers={"x-max-tokens": "0"},
    )
    assert r.status == 200 and used(meter, "queries") == 0


def test_metering_off_serves_the_endpoints_only() -> None:
    meter, tokens = guard_meter()
    app = Flask("plain")

    @app.get("/work")
    def work() -> Any:
        with pytest.raises(LookupError):
            current_usage()
        return "ok"

    blueprint = init_app(app, meter, metering=False)
    assert blueprint.name == "meterkit" and app.extensions["meterkit"]["metering"] is None
    client = FlaskClient(app)
    r = send(client, "GET", "/work", token=tokens["admin"])
    assert r.status == 200 and r.header("x-ratelimit-limit") is None
    assert send(client, "GET", "/healthz").json() == {"status": "ok"}
    assert requests_recorded(meter) == {}


def test_current_usage_outside_a_request() -> None:
    with pytest.raises(LookupError):
        current_usage()
