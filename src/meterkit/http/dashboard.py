"""The usage dashboard, ``GET /dashboard``: one page and its scripts, served from the package.

The page signs in with an API key (kept in the browser tab's ``sessionStorage``) and draws
everything from meterkit's own endpoints: usage, costs, ``/v1/organization/quota``. The
charting library (Chart.js, MIT) is vendored beside it with its license, so the dashboard works
offline and nothing is built to install it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from meterkit.http.core import Response
from meterkit.http.errors import METERKIT, HttpError
from meterkit.http.routing import Call, Param, Reply, Route, Surface, json_schema_ref

__all__ = ["ASSETS", "SURFACE"]

ASSETS: dict[str, tuple[str, str]] = {
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "chart.umd.min.js": ("vendor/chart.umd.min.js", "text/javascript; charset=utf-8"),
    "chart.js-LICENSE.md": ("vendor/chart.js-LICENSE.md", "text/plain; charset=utf-8"),
    "favicon.ico": ("favicon.ico", "image/x-icon"),
}
"""Asset name -> (file under ``meterkit/dashboard``, media type): nothing else is served."""

_HEADERS = (
    # Only this origin's scripts run; the page talks only to this origin.
    (
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-cache"),
)


@cache
def _read(path: str) -> bytes:
    return (resources.files("meterkit") / "dashboard" / path).read_bytes()


def _file(path: str, media: str) -> Response:
    return Response(200, (("content-type", media), *_HEADERS), _read(path))


def _page(call: Call) -> Response:
    return _file("index.html", "text/html; charset=utf-8")


def _favicon(call: Call) -> Response:
    # Browsers ask every origin for it: answered, it logs no error in the dashboard's console.
    return _file(*ASSETS["favicon.ico"])


def _asset(call: Call) -> Response:
    found = ASSETS.get(call.path_params["asset"])
    if found is None:
        raise HttpError(404, "No such dashboard file.", code="not_found")
    return _file(*found)


SURFACE = Surface(
    "dashboard",
    (
        Route(
            method="GET",
            path="/dashboard",
            handler=_page,
            errors=METERKIT,
            operation_id="dashboard",
            summary="The usage dashboard (HTML).",
            tags=("dashboard",),
            auth=False,
            replies=(Reply(200, "The dashboard page.", {"type": "string"}, "text/html"),),
        ),
        Route(
            method="GET",
            path="/favicon.ico",
            handler=_favicon,
            errors=METERKIT,
            operation_id="favicon",
            summary="The dashboard's icon.",
            tags=("dashboard",),
            auth=False,
            replies=(Reply(200, "The icon.", {"type": "string"}, "image/x-icon"),),
        ),
        Route(
            method="GET",
            path="/dashboard/{asset}",
            handler=_asset,
            errors=METERKIT,
            operation_id="dashboard_asset",
            summary="A script, style sheet or license of the dashboard.",
            tags=("dashboard",),
            auth=False,
            params=(Param("asset", {"type": "string"}, "The file's name.", location="path"),),
            replies=(
                Reply(200, "The file.", {"type": "string"}, "text/javascript"),
                Reply(404, "No such file.", json_schema_ref("Error")),
            ),
        ),
    ),
)
