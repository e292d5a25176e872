"""One cattrs converter per wire format.

* ``native_converter`` — meterkit's own JSON (events in and out, as stored and ingested).
* ``openai_converter`` — OpenAI's snake_case usage pages (``{"object": "page", ...}``).
* ``camel_converter`` — camelCase bodies (the account usage surface).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

from meterkit.errors import ValidationError
from meterkit.eventio import native_event
from meterkit.models import AppendResult, Event, UsagePage

__all__ = [
    "camel_converter",
    "make_camel_converter",
    "make_native_converter",
    "make_openai_converter",
    "native_converter",
    "openai_converter",
    "openai_page",
]


def make_native_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)

    def structure_event(data: Any, _cls: type) -> Event:
        if not isinstance(data, dict):
            raise TypeError("an event must be a JSON object")
        try:
            return native_event(data, "event")
        except ValidationError as exc:
            raise TypeError(exc.message) from None

    conv.register_structure_hook(Event, structure_event)
    conv.register_unstructure_hook(
        Event,
        lambda e: {
            "id": e.id,
            "meter": e.meter,
            "organization_id": e.organization_id,
            "time": e.time,
            "values": dict(e.values),
            "dimensions": dict(e.dimensions),
        },
    )
    conv.register_unstructure_hook(AppendResult, make_dict_unstructure_fn(AppendResult, conv))
    return conv


Results = Iterable[tuple[str, Mapping[str, Any], Mapping[str, Any]]]
"""A bucket's results as ``(object, group fields, values)``."""


def openai_page(
    buckets: Iterable[tuple[int, int, Results]], has_more: bool, next_page: str | None
) -> dict[str, object]:
    """The OpenAI usage page from ``(start_time, end_time, results)`` buckets: what the
    converter makes of a :class:`~meterkit.models.UsagePage`, and what
    :meth:`meterkit.Meter.usage_dict` makes straight from the rows, with no object per row."""
    return {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": start,
                "end_time": end,
                "results": [{"object": kind, **group, **values} for kind, group, values in results],
            }
            for start, end, results in buckets
        ],
        "has_more": has_more,
        "next_page": next_page,
    }


def make_openai_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    conv.register_unstructure_hook(
        UsagePage,
        lambda p: openai_page(
            (
                (b.start_time, b.end_time, ((r.object, r.group, r.values) for r in b.results))
                for b in p.data
            ),
            p.has_more,
            p.next_page,
        ),
    )
    return conv


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def make_camel_converter() -> cattrs.Converter:
    """Unstructures attrs classes with camelCase keys; ``None`` fields are left out."""
    conv = cattrs.Converter()

    def factory(cls: type) -> Any:
        import attrs

        names = [a.name for a in attrs.fields(cls)]  # type: ignore[misc]
        base: Any = make_dict_unstructure_fn(
            cls,
            conv,
            **{n: override(rename=_camel(n)) for n in names},  # type: ignore[arg-type]
        )

        def unstructure(obj: Any) -> dict[str, Any]:
            return {k: v for k, v in base(obj).items() if v is not None}

        return unstructure

    import attrs

    conv.register_unstructure_hook_factory(attrs.has, factory)
    return conv


native_converter = make_native_converter()
openai_converter = make_openai_converter()
camel_converter = make_camel_converter()


def _register_page_format() -> None:
    from meterkit import models

    def to_openai(page: UsagePage) -> dict[str, object]:
        out: dict[str, object] = openai_converter.unstructure(page)
        return out

    models.use_page_format(to_openai)


_register_page_format()
