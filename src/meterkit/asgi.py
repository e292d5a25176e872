"""ASGI: meterkit's endpoints as an ASGI app, and metering middleware for any ASGI app.

:func:`create_app` returns a plain ASGI callable serving every endpoint of
:class:`~meterkit.http.HttpApp`; it mounts under Starlette, FastAPI or any ASGI server, and
honours ``root_path`` when mounted under a prefix. :class:`MeteringMiddleware` wraps any ASGI app
with the quota guard: it identifies the caller, admits (and debits) the request before the app
runs or answers 429, adds the rate-limit headers, and settles and records the request after it.

No web framework is imported here. Every call that may touch the store runs in a worker thread
(``anyio.to_thread.run_sync``), so store I/O never blocks the event loop.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from meterkit.http.app import HttpApp
from meterkit.http.core import Request, Response
from meterkit.http.metering import (
    NEEDS_STORE,
    Metering,
    MeteringOptions,
    Refusal,
    Ticket,
    Usage,
    merge_headers,
    own_endpoint,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from meterkit.http.metering import MeteringKeywords
    from meterkit.meter import Meter

__all__ = [
    "ASGIApp",
    "MeteringMiddleware",
    "MeteringOptions",
    "MeterkitApp",
    "create_app",
    "current_usage",
]

logger = logging.getLogger("meterkit.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_END = object()
_current: contextvars.ContextVar[Usage] = contextvars.ContextVar("meterkit_usage")


def current_usage() -> Usage:
    """The usage handle of the request being served through :class:`MeteringMiddleware`.

    Raises ``LookupError`` outside such a request. Also at ``scope["state"]["meterkit"]``
    (``request.state.meterkit`` in Starlette and FastAPI).
    """
    return _current.get()


def _route_path(scope: Scope) -> str:
    """The path below the mount point: ``path`` without ``root_path``.

    Starlette (and servers started with a root path) put the whole path in ``path`` and the
    mount prefix in ``root_path``; servers that already strip the prefix are left alone.
    """
    path: str = scope.get("path") or "/"
    root: str = scope.get("root_path") or ""
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers") or ():
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        # Repeated fields combine into one, comma-separated (RFC 9110, section 5.3).
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _encode(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def _send_whole(
    send: Send, status: int, headers: Sequence[tuple[str, str]], body: bytes
) -> None:
    headers = merge_headers(headers, (("content-length", str(len(body))),))
    await send({"type": "http.response.start", "status": status, "headers": _encode(headers)})
    await send({"type": "http.response.body", "body": body})


class MeterkitApp:
    """The ASGI app :func:`create_app` returns; ``http`` is the :class:`HttpApp` it serves."""

    def __init__(self, meter: Meter, *, close_meter: bool = False, **httpapp_kwargs: Any) -> None:
        self.meter = meter
        self.http = HttpApp(meter, **httpapp_kwargs)
        self.close_meter = close_meter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # The meter belongs to the application unless it asked the app to close it.
                if self.close_meter:
                    await anyio.to_thread.run_sync(self.meter.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The request body, cut at one byte over the limit (HttpApp then answers 413);
        ``None`` when the client went away."""
        limit = self.http.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                # No need to read a body that will be refused; the server drops the rest.
                return b"".join(chunks)[: limit + 1]
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body(receive)
        if body is None:
            return
        query = scope.get("query_string") or b""
        request = Request(
            method=scope.get("method", "GET"),
            path=_route_path(scope),
            query=_parse_query(query),
            headers=_headers(scope),
            body=body,
        )
        response = await anyio.to_thread.run_sync(self.http.handle, request)
        await _send_response(send, response)


def _parse_query(raw: bytes) -> tuple[tuple[str, str], ...]:
    from urllib.parse import parse_qsl

    text = raw.decode("utf-8", "replace")
    return tuple(parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="replace"))


async def _send_response(send: Send, response: Response) -> None:
    if response.stream is None:
        await _send_whole(send, response.status, response.headers, response.body)
        return
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": _encode(response.headers),
        }
    )
    chunks: Iterator[bytes] = iter(response.stream)
    try:
        while True:
            # Producing a chunk may touch the store: one worker-thread hop per chunk, and each
            # chunk goes out as soon as it exists.
            chunk = await anyio.to_thread.run_sync(next, chunks, _END)
            if chunk is _END:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await anyio.to_thread.run_sync(close)


def create_app(meter: Meter, *, close_meter: bool = False, **httpapp_kwargs: Any) -> MeterkitApp:
    """An ASGI app serving every meterkit endpoint over ``meter``.

    ``httpapp_kwargs`` go to :class:`~meterkit.http.HttpApp` (``surfaces``,
    ``max_body_bytes``). The app answers the lifespan protocol; it closes ``meter`` at shutdown
    only with ``close_meter=True`` (the meter is usually the application's).
    """
    return MeterkitApp(meter, close_meter=close_meter, **httpapp_kwargs)


# -- metering middleware -----------------------------------------------------------------------


def _authorization(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name.lower() == b"authorization":
            text: str = value.decode("latin-1")
            return text
    return None


def _route_template(scope: Scope, child: Scope, path: str) -> str:
    """The route template the app matched (Starlette: ``/items/{id}``), else the path.

    Templates keep the ``route`` dimension small; the path is used when no router said which
    route it matched, or when the match was a mount (whose own path says little).
    """
    route = child.get("route")
    template = getattr(route, "path", None)
    if not isinstance(template, str) or not hasattr(route, "endpoint"):
        return path
    base: str = scope.get("root_path") or ""
    root: str = child.get("root_path") or ""
    prefix = root[len(base) :] if root.startswith(base) else root
    return (prefix + template) or "/"


def _mounted_at(app: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """The prefixes at which a :class:`MeterkitApp` serves inside ``app``.

    Follows Starlette-style routers (``routes``, each ``Mount`` with its ``path`` and ``app``)
    and middleware wrappers (``app``); ``""`` when ``app`` is meterkit's own app at the root.
    """
    if isinstance(app, MeterkitApp):
        return [prefix]
    if depth > 16:
        return []
    found: list[str] = []
    routes = getattr(app, "routes", None)
    if isinstance(routes, (list, tuple)):
        for route in routes:
            sub, path = getattr(route, "app", None), getattr(route, "path", None)
            if sub is not None and isinstance(path, str) and not hasattr(route, "endpoint"):
                found += _mounted_at(sub, prefix + path.rstrip("/"), depth + 1)
    else:
        inner = getattr(app, "app", None)
        if inner is not None and inner is not app:
            found += _mounted_at(inner, prefix, depth + 1)
    return found


class MeteringMiddleware:
    """Meters and guards every HTTP request to ``app``.

    Before the app runs: the caller is identified (``identify(scope)``, default: the bearer key
    through :func:`meterkit.auth.authenticate`), and ``meter.reserve(org, cost(scope))`` admits
    and debits the request, or it is answered 429 with ``Retry-After`` and the rate-limit headers
    (``on_refused(decision)`` chooses the status, headers and body). The app then sees the usage
    handle at ``scope["state"]["meterkit"]`` and :func:`current_usage`. After the response the
    reservation is settled to what the app reported and a ``record_meter`` event is recorded
    (``method``, ``route``, ``status``). See ``docs/adapters.md`` for every option.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        meter: Meter,
        options: MeteringOptions[Scope] | None = None,
        **given: Unpack[MeteringKeywords[Scope]],
    ) -> None:
        self.app = app
        self.meter = meter
        self._own: tuple[str, ...] | None = None
        self.metering: Metering[Scope] = Metering(
            meter, authorization=_authorization, options=options, **given
        )

    def is_own(self, path: str) -> bool:
        """Whether ``path`` (below this app's root) goes to meterkit's own endpoints: a
        :func:`create_app` app that ``app`` is, or mounts (Starlette and FastAPI routers)."""
        if self._own is None:
            self._own = tuple(_mounted_at(self.app))
        for prefix in self._own:
            if prefix == "" and own_endpoint(path):
                return True
            if prefix and (path == prefix or path.startswith(prefix + "/")):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        if self.metering.skip(scope, own=self.is_own(path)):
            await self.app(scope, receive, send)
            return
        method: str = scope.get("method", "GET")
        # On the loop when the key is cached and the lease has room; else in a worker thread.
        outcome = self.metering.begin_local(scope, method=method, path=path)
        if outcome is NEEDS_STORE:
            outcome = await anyio.to_thread.run_sync(
                lambda: self.metering.begin(scope, method=method, path=path)
            )
        if isinstance(outcome, Refusal):
            await _send_whole(send, outcome.status, outcome.headers, outcome.body)
            return
        usage = outcome.usage if isinstance(outcome, Ticket) else Usage()
        # A scope of our own: the app's router writes the matched route into it, and the usage
        # handle goes into a state dict of this request's own.
        child: Scope = {**scope, "state": {**(scope.get("state") or {}), "meterkit": usage}}
        token = _current.set(usage)
        try:
            if isinstance(outcome, Ticket):
                await self._metered(outcome, scope, child, receive, send, method, path)
            else:
                await self.app(child, receive, send)
        finally:
            _current.reset(token)

    async def _metered(
        self,
        ticket: Ticket,
        scope: Scope,
        child: Scope,
        receive: Receive,
        send: Send,
        method: str,
        path: str,
    ) -> None:
        status: int | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                present = [
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in message.get("headers") or ()
                ]
                extra = merge_headers(present, ticket.headers)[len(present) :]
                message = {**message, "headers": [*(message.get("headers") or ()), *_encode(extra)]}
            await send(message)

        failed = True
        try:
            await self.app(child, receive, send_with_headers)
            failed = False
        finally:
            route = _route_template(scope, child, path)
            # Settle even when the request was cancelled (the client went away): the hold
            # would otherwise wait for its ttl.
            done = self.metering.finish_local(
                ticket, status=status, method=method, route=route, failed=failed
            )
            if not done:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(
                        lambda: self.metering.finish(
                            ticket, status=status, method=method, route=route, failed=failed
                        )
                    )
