"""Framework-neutral HTTP: a parsed :class:`Request` in, a :class:`Response` out.

Nothing here imports a web framework; :mod:`meterkit.asgi` and :mod:`meterkit.flask` only
translate to and from these two classes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

__all__ = ["Request", "Response", "json_response", "ndjson_response"]


def _indexed(key: str, name: str) -> bool:
    """``name[]`` or ``name[<digits>]``."""
    if not (key.startswith(name) and key.endswith("]") and key[len(name) : len(name) + 1] == "["):
        return False
    index = key[len(name) + 1 : -1]
    return index == "" or (index.isascii() and index.isdigit())


@attrs.frozen
class Request:
    """A parsed request. ``headers`` keys are lower-case; ``query`` keeps repeated keys."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...] = ()
    headers: Mapping[str, str] = attrs.field(factory=dict)
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def query_all(self, name: str) -> list[str]:
        """Every value of ``name``, in the order sent: from ``name=a&name=b``, ``name[]=a`` and
        the indexed ``name[0]=a&name[1]=b`` alike (never silently ignored)."""
        return [v for k, v in self.query if k == name or _indexed(k, name)]

    def query_one(self, name: str) -> str | None:
        values = self.query_all(name)
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None


@attrs.frozen
class Response:
    """``body`` for a whole answer, or ``stream`` for NDJSON lines produced one by one."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    stream: Iterable[bytes] | None = None

    def with_headers(self, extra: Sequence[tuple[str, str]]) -> Response:
        return attrs.evolve(self, headers=(*self.headers, *extra))

    def iter_body(self) -> Iterator[bytes]:
        if self.stream is None:
            yield self.body
        else:
            yield from self.stream


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), default=_default).encode("utf-8")


def _default(value: Any) -> Any:
    from decimal import Decimal

    if isinstance(value, Decimal):
        # JSON numbers for money; the exact Decimal stays available in Python.
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def json_response(
    data: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    return Response(status, (("content-type", "application/json"), *headers), _dumps(data))


def ndjson_response(rows: Iterable[Any], status: int = 200) -> Response:
    return Response(
        status,
        (("content-type", "application/x-ndjson"),),
        stream=(_dumps(row) + b"\n" for row in rows),
    )
