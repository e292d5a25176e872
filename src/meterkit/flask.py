"""Flask: meterkit's endpoints as a Blueprint, and the quota guard as request hooks.

:func:`init_app` registers a Blueprint that serves every endpoint of
:class:`~meterkit.http.HttpApp` (under ``url_prefix``) and, with ``metering=True``, installs the
quota guard on the application's own views (:func:`init_metering`): ``before_request`` admits
and debits the request or answers 429; ``after_request`` adds the rate-limit headers, settles
the reservation to the usage the view reported (released on a 5xx) and records the request — a
streamed response once its body has been sent; ``teardown_request`` releases the reservation of
a view whose exception propagated. The view reports usage on :func:`current_usage`
(``flask.g``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
from flask import Blueprint, Flask, g, request
from flask import Request as FlaskRequest
from flask import Response as FlaskResponse

from meterkit.http.app import HttpApp
from meterkit.http.core import Request, Response
from meterkit.http.metering import (
    Metering,
    MeteringOptions,
    Refusal,
    Ticket,
    Usage,
    merge_headers,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from meterkit.http.metering import MeteringKeywords
    from meterkit.meter import Meter

__all__ = ["MeteringOptions", "current_usage", "init_app", "init_metering"]

EXTENSION = "meterkit"
# Every method reaches HttpApp, so a wrong method gets its 405 in the surface's own shape.
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_TICKET = "_meterkit_ticket"
_USAGE = "_meterkit_usage"


def current_usage() -> Usage:
    """The usage handle of the request being served (``flask.g``).

    Raises ``LookupError`` outside a request, or when the guard is not installed.
    """
    usage = g.get(_USAGE) if g else None
    if not isinstance(usage, Usage):
        raise LookupError("no meterkit usage handle: is the metering guard installed?")
    return usage


def _flask_template(path: str) -> str:
    """``/v1/op/{operation_id}`` → ``/v1/op/<operation_id>``."""
    return "/".join(
        f"<{part[1:-1]}>" if part.startswith("{") and part.endswith("}") else part
        for part in path.split("/")
    )


def _read_body(limit: int) -> bytes:
    length = request.content_length
    if length is not None and length <= limit:
        return request.get_data()
    # Unknown or too long: read one byte past the limit at most (HttpApp then answers 413).
    return request.stream.read(limit + 1)


def _headers() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _flask_response(
    status: int, headers: Iterable[tuple[str, str]], body: bytes | Iterable[bytes]
) -> FlaskResponse:
    out = FlaskResponse(body, status=status)
    # Drop Flask's default text/html content type: the answer names its own.
    del out.headers["Content-Type"]
    for name, value in headers:
        out.headers.add(name, value)
    return out


def _to_flask(response: Response) -> FlaskResponse:
    # A stream is handed to Flask as an iterator, so the NDJSON lines go out as produced.
    body = response.body if response.stream is None else iter(response.stream)
    return _flask_response(response.status, response.headers, body)


def _blueprint(http: HttpApp, name: str, url_prefix: str) -> Blueprint:
    blueprint = Blueprint(name, __name__, url_prefix=url_prefix or None)

    def serve(**_params: str) -> FlaskResponse:
        path = request.path
        if url_prefix and path.startswith(url_prefix):
            path = path[len(url_prefix) :] or "/"
        query = tuple(request.args.items(multi=True))
        body = _read_body(http.max_body_bytes)
        return _to_flask(http.handle(Request(request.method, path, query, _headers(), body)))

    if url_prefix:
        # Everything under the prefix is meterkit's: unknown paths get its own 404.
        blueprint.add_url_rule("/", "root", serve, methods=_METHODS)
        blueprint.add_url_rule("/<path:_rest>", "any", serve, methods=_METHODS)
        return blueprint
    # At the root, only meterkit's own paths are claimed: the application's 404s and 405s stay
    # its own. Catch-alls that only answer 404 (hidden routes) keep to their own method.
    methods: dict[str, set[str]] = {}
    for route in http.routes:
        allowed = methods.setdefault(route.path, set())
        allowed.update([route.method] if route.hidden else _METHODS)
    for index, (path, allowed) in enumerate(methods.items()):
        blueprint.add_url_rule(
            _flask_template(path), f"route{index}", serve, methods=sorted(allowed)
        )
    return blueprint


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else request.path


def _settler(
    metering: Metering[FlaskRequest], ticket: Ticket, status: int, method: str, route: str
) -> Callable[[bool], None]:
    """``settle(failed)``, which settles ``ticket`` the first time only."""
    settled = False

    def settle(failed: bool) -> None:
        nonlocal settled
        if not settled:
            settled = True
            metering.finish(ticket, status=status, method=method, route=route, failed=failed)

    return settle


def _settle_after(body: Iterable[Any], settle: Callable[[bool], None]) -> Iterator[Any]:
    failed = True
    try:
        yield from body
        failed = False
    finally:
        settle(failed)


def _authorization(req: FlaskRequest) -> str | None:
    return req.headers.get("Authorization")


def init_metering(
    app: Flask,
    meter: Meter,
    *,
    options: MeteringOptions[FlaskRequest] | None = None,
    **given: Unpack[MeteringKeywords[FlaskRequest]],
) -> Metering[FlaskRequest]:
    """Install the quota guard on every view of ``app``; ``options`` (or the same as
    keywords) as for :class:`~meterkit.asgi.MeteringMiddleware` (``identify``, ``cost`` and
    ``skip`` take the ``flask.Request``)."""
    metering: Metering[FlaskRequest] = Metering(
        meter, authorization=_authorization, options=options, **given
    )

    def before() -> FlaskResponse | None:
        blueprint = app.extensions.get(EXTENSION, {}).get("blueprint")
        # meterkit's own endpoints (its blueprint) are never metered, counted or refused.
        own = blueprint is not None and request.blueprint == blueprint
        if metering.skip(request, own=own):
            return None
        outcome = metering.begin(request, method=request.method, path=request.path)
        if isinstance(outcome, Refusal):
            return _flask_response(outcome.status, outcome.headers, outcome.body)
        if isinstance(outcome, Ticket):
            setattr(g, _TICKET, outcome)
            setattr(g, _USAGE, outcome.usage)
        else:
            setattr(g, _USAGE, Usage())
        return None

    def after(response: FlaskResponse) -> FlaskResponse:
        ticket = g.pop(_TICKET, None)
        if not isinstance(ticket, Ticket):
            return response
        present = list(response.headers.items())
        for name, value in merge_headers(present, ticket.headers)[len(present) :]:
            response.headers.add(name, value)
        settle = _settler(metering, ticket, response.status_code, request.method, _route())
        if response.is_streamed:
            # The view's generator runs (and reports usage) only as the body is sent: settle
            # when it ends, or when the server closes a response it did not finish.
            response.response = _settle_after(response.response, settle)
            response.call_on_close(lambda: settle(True))
        else:
            settle(False)
        return response

    def teardown(exc: BaseException | None) -> None:
        # Still here: after_request never ran (the view's exception propagated).
        ticket = g.pop(_TICKET, None)
        if isinstance(ticket, Ticket):
            metering.finish(ticket, status=None, method=request.method, route=_route(), failed=True)

    app.before_request(before)
    app.after_request(after)
    app.teardown_request(teardown)
    return metering


def init_app(
    app: Flask,
    meter: Meter,
    *,
    url_prefix: str = "",
    metering: bool = True,
    name: str = "meterkit",
    options: MeteringOptions[FlaskRequest] | None = None,
    **given: Any,
) -> Blueprint:
    """Serve meterkit's endpoints from ``app`` (a Blueprint named ``name`` under
    ``url_prefix``) and, with ``metering``, guard the application's own views.

    ``options`` (or the same as keywords) configure the guard; the other keywords go to
    :class:`~meterkit.http.HttpApp`. The usage API's own requests are not metered. Returns
    the registered Blueprint; ``app.extensions["meterkit"]`` holds the ``meter``, the
    ``http`` app and the ``metering`` guard (``None`` without metering).
    """
    url_prefix = url_prefix.rstrip("/")
    if url_prefix and not url_prefix.startswith("/"):
        url_prefix = "/" + url_prefix
    guard = {k: v for k, v in given.items() if k in attrs.fields_dict(MeteringOptions)}
    http = HttpApp(meter, **{k: v for k, v in given.items() if k not in guard})
    blueprint = _blueprint(http, name, url_prefix)
    app.register_blueprint(blueprint)
    state: dict[str, Any] = {"meter": meter, "http": http, "blueprint": name, "metering": None}
    app.extensions[EXTENSION] = state
    if metering:
        state["metering"] = init_metering(app, meter, options=options, **guard)
    return blueprint
