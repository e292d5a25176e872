"""The official ``openai`` SDK's usage types, read as the contract of the OpenAI surface."""

from __future__ import annotations

import importlib
import pkgutil
import types
import typing
from collections.abc import Mapping
from typing import Any

from meterkit.models import MeterSpec

__all__ = ["consistent_values", "fields_of", "page_type", "result_types"]


def _modules() -> list[Any]:
    package = importlib.import_module("openai.types.admin.organization")
    return [
        importlib.import_module(f"{package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(package.__path__)
        if info.name.startswith("usage_") and info.name.endswith("_response")
    ]


def result_types() -> dict[str, type]:
    """Every usage and costs result model of the SDK, by its ``object`` value."""
    from pydantic import BaseModel

    out: dict[str, type] = {}
    for module in _modules():
        for obj in vars(module).values():
            if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
                continue
            field = obj.model_fields.get("object")
            if field is None:
                continue
            args = typing.get_args(field.annotation)
            if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("organization."):
                out[args[0]] = obj
    return out


def page_type(kind: str) -> type:
    """The SDK's page model of a usage kind (``costs`` too)."""
    module = importlib.import_module(f"openai.types.admin.organization.usage_{kind}_response")
    name = "Usage" + "".join(part.title() for part in kind.split("_")) + "Response"
    found: type = getattr(module, name)
    return found


def _plain(annotation: Any) -> Any:
    """``Optional[X]`` -> ``X``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def fields_of(model: type) -> tuple[set[str], set[str], set[str]]:
    """(integer fields, required integer fields, grouping fields) of a result model."""
    numbers, required, groups = set(), set(), set()
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        if name == "object":
            continue
        if _plain(field.annotation) is int:
            numbers.add(name)
            if field.is_required():
                required.add(name)
        else:
            groups.add(name)
    return numbers, required, groups


def consistent_values(spec: MeterSpec, start: int = 1, step: int = 1) -> dict[str, int]:
    """A value for every measure of ``spec``: ``start``, ``start + step``, … where free, and
    each of its sums the total of its parts."""
    totals: Mapping[str, tuple[str, ...]] = dict(spec.sums)
    values: dict[str, int] = {}
    free = [m for m in spec.measure_names if m not in totals]
    for i, name in enumerate(free):
        values[name] = start + i * step
    pending = dict(totals)
    while pending:
        for total, parts in list(pending.items()):
            if all(p in values for p in parts):
                values[total] = sum(values[p] for p in parts)
                del pending[total]
    return {m: values[m] for m in spec.measure_names}
