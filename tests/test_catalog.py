"""The built-in meters match the OpenAI usage API's kinds (docs/python-api.md); applications
add their own."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meterkit import Dimension, Measure, Meter, MeterSpec, ValidationError, hookimpl
from meterkit.catalog import GENERIC_METERS, OPENAI_KINDS, builtin_meters
from openai_types import consistent_values, fields_of, page_type, result_types

T0 = int(dt.datetime(2024, 11, 1, tzinfo=dt.timezone.utc).timestamp())
DAY = 86400

# The official SDK's result types are the contract: kind -> (numbers, grouping fields).
OPENAI_RESULTS = {
    "completions": "organization.usage.completions.result",
    "embeddings": "organization.usage.embeddings.result",
    "moderations": "organization.usage.moderations.result",
    "images": "organization.usage.images.result",
    "audio_speeches": "organization.usage.audio_speeches.result",
    "audio_transcriptions": "organization.usage.audio_transcriptions.result",
    "vector_stores": "organization.usage.vector_stores.result",
    "code_interpreter_sessions": "organization.usage.code_interpreter_sessions.result",
    "decisions": "organization.usage.decisions.result",
    "file_search_calls": "organization.usage.file_searches.result",
    "web_search_calls": "organization.usage.web_searches.result",
}
_TYPES = result_types()
OPENAI_TABLE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    kind: (
        tuple(sorted(fields_of(_TYPES[obj])[0])),
        tuple(sorted(fields_of(_TYPES[obj])[2])),
    )
    for kind, obj in OPENAI_RESULTS.items()
}
IMAGE_SOURCES = {"image.generation", "image.edit", "image.variation"}
IMAGE_SIZES = {"256x256", "512x512", "1024x1024", "1792x1792", "1024x1792"}
GENERIC = ("requests", "tokens", "queries", "spaces", "storage_bytes", "tiles", "credits", "jobs")
# DESIGN.md: storage bytes, vector-store bytes and spaces are gauges; the rest are counters.
GAUGES = {"vector_stores", "spaces", "storage_bytes"}


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'c.db'}"


@pytest.fixture
def meter(url: str) -> Iterator[Meter]:
    with Meter(url) as m:
        yield m


def test_openai_kinds_are_exactly_the_eleven() -> None:
    assert [spec.name for spec in OPENAI_KINDS] == list(OPENAI_TABLE)
    # Every usage result type of the SDK has its meter.
    usage = {obj for obj in _TYPES if obj.startswith("organization.usage.")}
    assert usage == set(OPENAI_RESULTS.values())


@pytest.mark.parametrize("kind", list(OPENAI_TABLE))
def test_openai_kind_shape(kind: str) -> None:
    spec = builtin_meters()[kind]
    numbers, groups = OPENAI_TABLE[kind]
    assert set(spec.measure_names) == set(numbers)
    assert len(spec.measure_names) == len(numbers)
    assert set(spec.dimension_names) == set(groups)
    assert len(spec.dimension_names) == len(groups)
    assert spec.result_object == OPENAI_RESULTS[kind]
    for measure in spec.measures:
        assert measure.aggregation == "sum"
        assert measure.gauge is (kind in GAUGES)
    bools = {d.name for d in spec.dimensions if d.kind == "bool"}
    assert bools == ({"batch"} if kind in ("completions", "decisions") else set())


def test_image_dimensions_have_their_allowed_values() -> None:
    spec = builtin_meters()["images"]
    assert spec.dimension("source").allowed == IMAGE_SOURCES  # type: ignore[union-attr]
    assert spec.dimension("size").allowed == IMAGE_SIZES  # type: ignore[union-attr]
    others = [d for d in spec.dimensions if d.name not in ("source", "size")]
    assert all(d.allowed is None for d in others)


@pytest.mark.parametrize("kind", list(OPENAI_TABLE))
def test_openai_result_objects_through_a_meter(meter: Meter, kind: str) -> None:
    numbers, groups = OPENAI_TABLE[kind]
    dims: dict[str, Any] = {"project_id": "proj_a"}
    if kind == "images":
        dims.update(size="1024x1024", source="image.generation")
    values = consistent_values(builtin_meters()[kind])
    meter.record(kind, values, organization_id="org_1", time=T0 + 1, id="e1", dimensions=dims)
    body = meter.usage(
        kind, organization_id="org_1", start_time=T0, end_time=T0 + DAY, group_by=["project_id"]
    ).to_dict()
    (bucket,) = body["data"]  # type: ignore[misc]
    (result,) = bucket["results"]
    assert result["object"] == OPENAI_RESULTS[kind]
    assert set(result) == {"object", *numbers, *groups}
    # The page parses as the SDK's own type, strictly.
    page_type(kind).model_validate(body, strict=True)  # type: ignore[attr-defined]
    assert result["project_id"] == "proj_a"
    # Grouped by project only: every other grouping field is present and null.
    assert all(result[g] is None for g in groups if g != "project_id")
    assert {n: result[n] for n in numbers} == values


def test_generic_meters_exist() -> None:
    names = {spec.name for spec in GENERIC_METERS}
    assert names == set(GENERIC)
    with Meter("memory://") as meter:
        assert set(meter.meters) >= set(GENERIC) | set(OPENAI_TABLE)


@pytest.mark.parametrize("name", GENERIC)
def test_generic_meter_records(meter: Meter, name: str) -> None:
    spec = builtin_meters()[name]
    assert spec.measure(name) is not None, "a generic meter's main measure has its name"
    assert spec.measure(name).gauge is (name in GAUGES)  # type: ignore[union-attr]
    # Two events in one project, two resources: a counter adds all three values; a gauge
    # keeps each series' latest value (20, and 5 for the other series) and sums those.
    dim = "resource" if name in GAUGES else "project_id"
    events = [(1, 10, "r1"), (2, 20, "r1"), (3, 5, "r2")]
    for i, (t, v, series) in enumerate(events):
        meter.record(
            name,
            {name: v},
            organization_id="org_1",
            time=T0 + t,
            id=f"g{i}",
            dimensions={dim: series},
        )
    page = meter.usage(name, organization_id="org_1", start_time=T0, end_time=T0 + DAY)
    (result,) = page.data[0].results
    assert result.values[name] == (25 if name in GAUGES else 35)
    assert result.object == f"usage.{name}.result"


def test_builtin_meters_is_a_fresh_dict() -> None:
    first = builtin_meters()
    first["mine"] = MeterSpec("mine", (Measure("n"),))
    assert "mine" not in builtin_meters()


APP = MeterSpec(
    "renders",
    (Measure("frames"), Measure("peak_ms", "max"), Measure("formats", "unique_count")),
    (
        Dimension("project_id"),
        Dimension("codec", allowed={"h264", "av1"}),
        Dimension("hdr", kind="bool"),
    ),
)


def record_renders(meter: Meter) -> None:
    for i, (frames, ms, fmt, codec) in enumerate(
        [(10, 40, 1, "h264"), (5, 90, 2, "av1"), (1, 15, 1, "h264")]
    ):
        meter.record(
            "renders",
            {"frames": frames, "peak_ms": ms, "formats": fmt},
            organization_id="org_1",
            time=T0 + i,
            id=f"r{i}",
            dimensions={"codec": codec, "hdr": i == 1},
        )


def test_application_meter_at_construction(url: str) -> None:
    with Meter(url, meters=[APP]) as meter:
        assert meter.meters["renders"] is APP
        record_renders(meter)
        page = meter.usage(
            "renders", organization_id="org_1", start_time=T0, end_time=T0 + DAY, group_by=["hdr"]
        )
        rows = {r.group["hdr"]: dict(r.values) for r in page.data[0].results}
        assert rows == {
            False: {"frames": 11, "peak_ms": 40, "formats": 1},
            True: {"frames": 5, "peak_ms": 90, "formats": 1},
        }
        assert page.to_dict()["data"][0]["results"][0]["object"] == "usage.renders.result"  # type: ignore[index]
        with pytest.raises(ValidationError) as err:
            meter.record(
                "renders",
                {"frames": 1},
                organization_id="org_1",
                time=T0,
                dimensions={"codec": "vp9"},
            )
        assert err.value.field == "event.dimensions.codec"


def test_application_meter_registered_later(meter: Meter) -> None:
    with pytest.raises(ValidationError):
        record_renders(meter)
    assert meter.register(APP) is APP
    assert meter.register(APP) is APP  # the same spec again is a no-op
    record_renders(meter)
    page = meter.usage("renders", organization_id="org_1", start_time=T0, end_time=T0 + DAY)
    assert dict(page.data[0].results[0].values) == {"frames": 16, "peak_ms": 90, "formats": 2}


def test_application_meter_may_grow_but_not_shrink(meter: Meter) -> None:
    meter.register(APP)
    record_renders(meter)
    grown = MeterSpec(
        "renders", (*APP.measures, Measure("bytes")), (*APP.dimensions, Dimension("region"))
    )
    meter.register(grown)
    meter.record(
        "renders",
        {"frames": 2, "bytes": 7},
        organization_id="org_1",
        time=T0 + 9,
        id="r9",
        dimensions={"region": "eu"},
    )
    page = meter.usage(
        "renders", organization_id="org_1", start_time=T0, end_time=T0 + DAY, group_by=["region"]
    )
    rows = {r.group["region"]: r.values for r in page.data[0].results}
    assert rows["eu"]["frames"] == 2 and rows["eu"]["bytes"] == 7
    assert rows[None]["frames"] == 16 and rows[None]["bytes"] == 0
    shrunk = MeterSpec("renders", (Measure("frames"),), APP.dimensions)
    with pytest.raises(ValidationError) as err:
        meter.register(shrunk)
    assert err.value.field == "spec"
    assert meter.meters["renders"] == grown


class AppMeters:
    """A plugin contributing a meter to every Meter it is registered with."""

    @hookimpl
    def meterkit_register_meters(self) -> list[MeterSpec]:
        return [APP]


def test_register_meters_hook(url: str) -> None:
    with Meter(url, plugins=[AppMeters()]) as meter:
        assert meter.meters["renders"] == APP
        record_renders(meter)
        page = meter.usage("renders", organization_id="org_1", start_time=T0, end_time=T0 + DAY)
        assert page.data[0].results[0].values["frames"] == 16
    # The plugin was registered on that meter's own plugin manager only.
    with Meter("memory://") as plain:
        assert "renders" not in plain.meters
