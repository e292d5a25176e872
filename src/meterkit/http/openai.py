"""The OpenAI-shaped organization usage and costs endpoints (docs/http.md).

One table, :data:`ENDPOINTS`, drives all twelve: which filters and ``group_by`` values each
accepts, its bucket widths and page sizes, and its OpenAPI description. The handler is the
same for every usage kind; only costs call :meth:`Meter.costs` instead of :meth:`Meter.usage`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from meterkit.catalog import API_SOURCES, CONTEXT_LEVELS, IMAGE_SIZES, IMAGE_SOURCES, builtin_meters
from meterkit.errors import ValidationError
from meterkit.http.core import Response, json_response
from meterkit.http.errors import OPENAI, ParamError
from meterkit.http.fields import TEXT
from meterkit.http.params import integer, one, strings, truth
from meterkit.http.routing import Call, Param, Reply, Route, Surface, json_schema_ref
from meterkit.models import DimValue
from meterkit.validate import BUCKET_WIDTHS, MAX_TIME

__all__ = ["ENDPOINTS", "FILTERS", "SURFACE", "Endpoint", "Filter"]

READ = "usage:read"


@attrs.frozen
class Filter:
    """A filter query parameter and the dimension it filters on."""

    param: str
    dimension: str
    description: str
    enum: tuple[str, ...] | None = None
    boolean: bool = False

    def to_param(self) -> Param:
        if self.boolean:
            return Param(self.param, {"type": "boolean"}, self.description)
        items: dict[str, Any] = {"type": "string", "enum": list(self.enum)} if self.enum else TEXT
        return Param(self.param, {"type": "array", "items": items}, self.description)


FILTERS: dict[str, Filter] = {
    f.param: f
    for f in (
        Filter("project_ids", "project_id", "Return only usage for these projects."),
        Filter("user_ids", "user_id", "Return only usage for these users."),
        Filter("api_key_ids", "api_key_id", "Return only usage for these API keys."),
        Filter("models", "model", "Return only usage for these models."),
        Filter(
            "batch",
            "batch",
            "true: batch jobs only; false: non-batch jobs only; absent: both.",
            boolean=True,
        ),
        Filter(
            "sources",
            "source",
            "Return only usage for these sources.",
            enum=tuple(sorted(IMAGE_SOURCES)),
        ),
        Filter(
            "sizes",
            "size",
            "Return only usage for these image sizes.",
            enum=tuple(sorted(IMAGE_SIZES)),
        ),
        Filter("line_items", "line_item", "Return only costs for these line items."),
        Filter("vector_store_ids", "vector_store_id", "Return only usage for these vector stores."),
        Filter(
            "context_levels",
            "context_level",
            "Return only usage for these search context levels.",
            enum=tuple(sorted(CONTEXT_LEVELS, key=["low", "medium", "high"].index)),
        ),
    )
}
_PARAM_OF_DIMENSION = {f.dimension: f.param for f in FILTERS.values()}

_USAGE_LIMITS = {width: (default, top) for width, (_s, default, top) in BUCKET_WIDTHS.items()}


@attrs.frozen
class Endpoint:
    """One OpenAI-shaped endpoint: ``name`` is the usage kind (and meter) or ``costs``."""

    name: str
    summary: str
    filters: tuple[str, ...]
    group_by: tuple[str, ...]
    widths: tuple[str, ...] = ("1m", "1h", "1d")
    limits: Mapping[str, tuple[int, int]] = _USAGE_LIMITS
    costs: bool = False

    @property
    def path(self) -> str:
        if self.costs:
            return "/v1/organization/costs"
        return f"/v1/organization/usage/{self.name}"

    @property
    def title(self) -> str:
        return "".join(part.title() for part in self.name.split("_"))


_PEOPLE = ("project_ids", "user_ids", "api_key_ids", "models")
_GROUPS = ("project_id", "user_id", "api_key_id", "model")

_TOKEN_GROUPS = (*_GROUPS, "batch", "service_tier", "api_source")

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "completions", "Completions usage for the organization.", (*_PEOPLE, "batch"), _TOKEN_GROUPS
    ),
    Endpoint("embeddings", "Embeddings usage for the organization.", _PEOPLE, _GROUPS),
    Endpoint("moderations", "Moderations usage for the organization.", _PEOPLE, _GROUPS),
    Endpoint(
        "images",
        "Images usage for the organization.",
        (*_PEOPLE, "sources", "sizes"),
        (*_GROUPS, "size", "source"),
    ),
    Endpoint("audio_speeches", "Audio speeches usage for the organization.", _PEOPLE, _GROUPS),
    Endpoint(
        "audio_transcriptions", "Audio transcriptions usage for the organization.", _PEOPLE, _GROUPS
    ),
    Endpoint(
        "vector_stores",
        "Vector stores usage for the organization.",
        ("project_ids",),
        ("project_id",),
    ),
    Endpoint(
        "code_interpreter_sessions",
        "Code interpreter sessions usage for the organization.",
        ("project_ids",),
        ("project_id",),
    ),
    Endpoint(
        "decisions", "Decisions usage for the organization.", (*_PEOPLE, "batch"), _TOKEN_GROUPS
    ),
    Endpoint(
        "file_search_calls",
        "File search calls usage for the organization.",
        ("project_ids", "user_ids", "api_key_ids", "vector_store_ids"),
        ("project_id", "user_id", "api_key_id", "vector_store_id"),
    ),
    Endpoint(
        "web_search_calls",
        "Web search calls usage for the organization.",
        (*_PEOPLE, "context_levels"),
        (*_GROUPS, "context_level", "api_source"),
    ),
    Endpoint(
        "costs",
        "Costs for the organization, per day and line item.",
        ("project_ids", "api_key_ids", "line_items"),
        ("project_id", "user_id", "line_item", "api_key_id", "api_source"),
        widths=("1d",),
        limits={"1d": (7, 180)},
        costs=True,
    ),
)


def _as_param(field: str) -> str:
    """The query parameter a meter's ValidationError field came from."""
    if field.startswith("filters."):
        dimension = field.split(".", 1)[1]
        return _PARAM_OF_DIMENSION.get(dimension, dimension)
    return field


def _read_query(endpoint: Endpoint, call: Call) -> dict[str, Any]:
    request = call.request
    for name in FILTERS:
        if name not in endpoint.filters and request.query_all(name):
            raise ParamError(
                name, f"is not a filter of {endpoint.name}; allowed: {list(endpoint.filters)}"
            )
    start = integer(request, "start_time", required=True)
    end = integer(request, "end_time")
    width = one(request, "bucket_width")
    width = "1d" if width is None else width
    if width not in endpoint.widths:
        raise ParamError("bucket_width", f"must be one of {list(endpoint.widths)}")
    limit = integer(request, "limit")
    _default, top = endpoint.limits[width]
    if limit is not None and not 1 <= limit <= top:
        raise ParamError("limit", f"must be between 1 and {top} for bucket_width {width}")
    group_by = strings(request, "group_by")
    for name in group_by:
        if name not in endpoint.group_by:
            raise ParamError(
                "group_by",
                f"cannot group {endpoint.name} by {name[:60]!r}; "
                f"allowed: {list(endpoint.group_by)}",
            )
    filters: dict[str, list[DimValue]] = {}
    for name in endpoint.filters:
        spec = FILTERS[name]
        if spec.boolean:
            flag = truth(request, name)
            if flag is not None:
                # An event that never said it was a batch job is a non-batch one.
                filters[spec.dimension] = [True] if flag else [False, None]
        elif values := strings(request, name):
            filters[spec.dimension] = list(values)
    return {
        "organization_id": call.organization_id,
        "start_time": start,
        "end_time": end,  # None: the meter takes now (and blames a future start_time)
        "bucket_width": width,
        "group_by": group_by,
        "filters": filters or None,
        "limit": limit,
        "page": one(request, "page"),
    }


def _handler(endpoint: Endpoint) -> Callable[[Call], Response]:
    def handle(call: Call) -> Response:
        query = _read_query(endpoint, call)
        try:
            if endpoint.costs:
                body = call.meter.costs(**query).to_dict()
            else:
                body = call.meter.usage_dict(endpoint.name, **query)
        except ValidationError as exc:
            raise ValidationError(_as_param(exc.field), exc.message) from exc
        return json_response(body)

    return handle


# -- OpenAPI ------------------------------------------------------------------------------------


_TIME = {"type": "integer", "minimum": 0, "maximum": MAX_TIME}


def _params(endpoint: Endpoint) -> tuple[Param, ...]:
    top = max(t for _d, t in endpoint.limits.values())
    limits = "; ".join(f"{w}: default {d}, max {t}" for w, (d, t) in endpoint.limits.items())
    return (
        Param(
            "start_time",
            _TIME,
            "Start time (Unix seconds) of the query time range, inclusive.",
            required=True,
        ),
        Param(
            "end_time",
            _TIME,
            "End time (Unix seconds) of the query time range, exclusive. Default: now.",
        ),
        Param(
            "bucket_width",
            {"type": "string", "enum": list(endpoint.widths), "default": "1d"},
            "Width of each time bucket in the response.",
        ),
        *(FILTERS[name].to_param() for name in endpoint.filters),
        Param(
            "group_by",
            {"type": "array", "items": {"type": "string", "enum": list(endpoint.group_by)}},
            "Group the usage data by these fields.",
        ),
        Param(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": top},
            f"Number of buckets to return ({limits}).",
        ),
        Param(
            "page",
            {"type": "string"},
            "A cursor for pagination: the next_page of the previous response.",
        ),
    )


def _nullable(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


def _result_schema(endpoint: Endpoint) -> dict[str, Any]:
    if endpoint.costs:
        return {
            "type": "object",
            "properties": {
                "object": {"const": "organization.costs.result"},
                "amount": {
                    "type": "object",
                    "properties": {"value": {"type": "number"}, "currency": {"type": "string"}},
                },
                "quantity": _nullable("number"),
                "quantity_unit": _nullable("string"),
                "line_item": _nullable("string"),
                "project_id": _nullable("string"),
                "user_id": _nullable("string"),
                "api_key_id": _nullable("string"),
                "api_source": {"enum": [*sorted(API_SOURCES), None]},
            },
            "required": [
                "object",
                "amount",
                "quantity",
                "quantity_unit",
                "line_item",
                "project_id",
                "user_id",
                "api_key_id",
                "api_source",
            ],
        }
    spec = builtin_meters()[endpoint.name]
    props: dict[str, Any] = {"object": {"const": spec.result_object}}
    for dim in spec.dimensions:
        if dim.allowed is not None:
            props[dim.name] = {"enum": [*sorted(dim.allowed), None]}
        else:
            props[dim.name] = _nullable("boolean" if dim.kind == "bool" else "string")
    for measure in spec.measures:
        # Sums and counts of whole units: integers, present in every result (0 when none).
        props[measure.name] = {"type": "number" if measure.fractional else "integer"}
    return {"type": "object", "properties": props, "required": list(props)}


def _page_schema(result: str) -> dict[str, Any]:
    bucket = {
        "type": "object",
        "properties": {
            "object": {"const": "bucket"},
            "start_time": {"type": "integer"},
            "end_time": {"type": "integer"},
            "results": {"type": "array", "items": json_schema_ref(result)},
        },
        "required": ["object", "start_time", "end_time", "results"],
    }
    return {
        "type": "object",
        "properties": {
            "object": {"const": "page"},
            "data": {"type": "array", "items": bucket},
            "has_more": {"type": "boolean"},
            "next_page": _nullable("string"),
        },
        "required": ["object", "data", "has_more", "next_page"],
    }


def _route(endpoint: Endpoint) -> Route:
    page = f"{endpoint.title}Page"
    return Route(
        method="GET",
        path=endpoint.path,
        handler=_handler(endpoint),
        errors=OPENAI,
        operation_id=f"usage_{endpoint.name}",
        summary=endpoint.summary,
        tags=("openai",),
        scope=READ,
        # OpenAI secures these with admin keys; an app may let members read them.
        admin=True,
        member_usage=True,
        params=_params(endpoint),
        replies=(
            Reply(200, "A page of time buckets.", json_schema_ref(page)),
            Reply(400, "A bad parameter, named in error.param.", json_schema_ref("Error")),
        ),
    )


def _schemas() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        result = f"{endpoint.title}Result"
        out[result] = _result_schema(endpoint)
        out[f"{endpoint.title}Page"] = _page_schema(result)
    return out


SURFACE = Surface("openai", tuple(_route(e) for e in ENDPOINTS), _schemas())
