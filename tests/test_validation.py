"""Bad input raises ValidationError naming the field, and stores nothing from that call."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import meterkit
from meterkit import Dimension, Event, Measure, Meter, MeterSpec, ValidationError, hookimpl

T0 = int(dt.datetime(2024, 11, 1, tzinfo=dt.timezone.utc).timestamp())
ORG = "org_1"
GOOD_DIMS: dict[str, Any] = {"project_id": "proj_a", "model": "gpt-4o", "batch": False}
GOOD_VALUES: dict[str, Any] = {"input_tokens": 10, "num_model_requests": 1}
LONG = "x" * 257  # one over the 256-character limit
FAR_FUTURE = 2**62


class Observer:
    """Collects what ``meterkit_events_recorded`` reports."""

    def __init__(self) -> None:
        self.seen: list[Event] = []

    @hookimpl
    def meterkit_events_recorded(self, meter: Any, events: tuple[Event, ...]) -> None:
        assert isinstance(meter, Meter)
        self.seen.extend(events)


@pytest.fixture(params=["memory", "sqlite"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Meter, Observer]]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'v.db'}"
    observer = Observer()
    with Meter(url, plugins=[observer]) as meter:
        # One stored event per meter the tests write to, so later scans see a known baseline.
        meter.record(
            "completions",
            GOOD_VALUES,
            organization_id=ORG,
            time=T0,
            id="witness",
            dimensions=GOOD_DIMS,
        )
        meter.record(
            "images",
            {"images": 1},
            organization_id=ORG,
            time=T0,
            id="witness",
            dimensions={"size": "256x256", "source": "image.edit"},
        )
        observer.seen.clear()
        yield meter, observer


def stored_ids(meter: Meter) -> set[tuple[str, str]]:
    return {
        (name, e.id)
        for name in ("completions", "images")
        for org in (ORG, "", LONG, "org_2")
        for e in meter.store.scan(name, org, 0, FAR_FUTURE)
    }


BASELINE = {("completions", "witness"), ("images", "witness")}


def assert_rejected(env: tuple[Meter, Observer], field: str, call: Any) -> ValidationError:
    meter, observer = env
    with pytest.raises(ValidationError) as err:
        call(meter)
    assert isinstance(err.value, ValueError)
    assert err.value.field == field, str(err.value)
    assert stored_ids(meter) == BASELINE
    assert observer.seen == []
    return err.value


def record_args(**change: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "meter": "completions",
        "values": dict(GOOD_VALUES),
        "organization_id": ORG,
        "time": T0 + 5,
        "id": "evt_new",
        "dimensions": dict(GOOD_DIMS),
    }
    args.update(change)
    return args


def record(**change: Any) -> Any:
    def call(meter: Meter) -> None:
        args = record_args(**change)
        meter.record(args.pop("meter"), args.pop("values"), **args)

    return call


def record_batch(**change: Any) -> Any:
    """A batch of one good event followed by one bad event: neither may be stored."""

    def call(meter: Meter) -> None:
        good = Event("evt_good", "completions", ORG, T0 + 1, dict(GOOD_VALUES), dict(GOOD_DIMS))
        args = record_args(**change)
        bad = Event(
            id=args["id"],
            meter=args["meter"],
            organization_id=args["organization_id"],
            time=args["time"],
            values=args["values"],
            dimensions=args["dimensions"],
        )
        meter.record_many([good, bad])

    return call


# (case id, changes to a good completions event, field suffix after "event." / "events[1].")
BAD_EVENTS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown meter", {"meter": "nope"}, "meter"),
    ("meter not a string", {"meter": 3}, "meter"),
    ("unknown measure", {"values": {"input_tokens": 1, "bogus": 1}}, "values"),
    ("measure name not a string", {"values": {1: 1}}, "values"),
    ("values not a mapping", {"values": [1, 2]}, "values"),
    ("negative value", {"values": {"input_tokens": -1}}, "values.input_tokens"),
    ("negative float", {"values": {"input_tokens": -0.5}}, "values.input_tokens"),
    ("nan", {"values": {"input_tokens": math.nan}}, "values.input_tokens"),
    ("inf", {"values": {"input_tokens": math.inf}}, "values.input_tokens"),
    ("minus inf", {"values": {"input_tokens": -math.inf}}, "values.input_tokens"),
    ("string value", {"values": {"input_tokens": "12"}}, "values.input_tokens"),
    ("none value", {"values": {"input_tokens": None}}, "values.input_tokens"),
    ("complex value", {"values": {"input_tokens": 1j}}, "values.input_tokens"),
    ("bool value true", {"values": {"input_tokens": True}}, "values.input_tokens"),
    ("bool value false", {"values": {"num_model_requests": False}}, "values.num_model_requests"),
    ("unknown dimension", {"dimensions": {"colour": "red"}}, "dimensions.colour"),
    ("dimensions not a mapping", {"dimensions": ["model"]}, "dimensions"),
    ("int dimension", {"dimensions": {"model": 4}}, "dimensions.model"),
    ("float dimension", {"dimensions": {"project_id": 1.5}}, "dimensions.project_id"),
    ("bool in string dimension", {"dimensions": {"model": True}}, "dimensions.model"),
    ("list dimension", {"dimensions": {"user_id": ["u"]}}, "dimensions.user_id"),
    ("string batch", {"dimensions": {"batch": "false"}}, "dimensions.batch"),
    ("int batch", {"dimensions": {"batch": 1}}, "dimensions.batch"),
    ("empty dimension value", {"dimensions": {"model": ""}}, "dimensions.model"),
    ("long dimension value", {"dimensions": {"model": LONG}}, "dimensions.model"),
    ("empty id", {"id": ""}, "id"),
    ("long id", {"id": LONG}, "id"),
    ("id not a string", {"id": 17}, "id"),
    ("id with edge space", {"id": " evt"}, "id"),
    ("id with control character", {"id": "evt\n1"}, "id"),
    ("empty organization", {"organization_id": ""}, "organization_id"),
    ("long organization", {"organization_id": LONG}, "organization_id"),
    ("organization not a string", {"organization_id": None}, "organization_id"),
    ("float time", {"time": T0 + 0.5}, "time"),
    ("whole float time", {"time": float(T0)}, "time"),
    ("string time", {"time": str(T0)}, "time"),
    ("bool time", {"time": True}, "time"),
    ("negative time", {"time": -1}, "time"),
    ("time past year 9999", {"time": 253402300800}, "time"),
    ("naive datetime", {"time": dt.datetime(2024, 11, 1)}, "time"),
    ("date", {"time": dt.date(2024, 11, 1)}, "time"),
]


@pytest.mark.parametrize(
    ("change", "field"), [c[1:] for c in BAD_EVENTS], ids=[c[0] for c in BAD_EVENTS]
)
def test_bad_event_via_record(
    env: tuple[Meter, Observer], change: dict[str, Any], field: str
) -> None:
    assert_rejected(env, f"event.{field}", record(**change))


@pytest.mark.parametrize(
    ("change", "field"), [c[1:] for c in BAD_EVENTS], ids=[c[0] for c in BAD_EVENTS]
)
def test_bad_event_via_record_many(
    env: tuple[Meter, Observer], change: dict[str, Any], field: str
) -> None:
    # The good event before the bad one is not stored either: a batch is all or nothing.
    assert_rejected(env, f"events[1].{field}", record_batch(**change))


@pytest.mark.parametrize(
    ("dimensions", "field"),
    [
        ({"size": "100x100"}, "event.dimensions.size"),
        ({"size": "1024X1024"}, "event.dimensions.size"),
        ({"source": "image.upload"}, "event.dimensions.source"),
        ({"source": ""}, "event.dimensions.source"),
    ],
)
def test_disallowed_image_values(
    env: tuple[Meter, Observer], dimensions: dict[str, Any], field: str
) -> None:
    def call(meter: Meter) -> None:
        meter.record(
            "images",
            {"images": 1},
            organization_id=ORG,
            time=T0,
            id="img_new",
            dimensions=dimensions,
        )

    assert_rejected(env, field, call)


def test_record_many_rejects_non_events(env: tuple[Meter, Observer]) -> None:
    good = Event("evt_good", "completions", ORG, T0, dict(GOOD_VALUES), {})
    assert_rejected(env, "events[1]", lambda m: m.record_many([good, {"id": "x"}]))
    assert_rejected(env, "events", lambda m: m.record_many("evt_good"))
    assert_rejected(env, "events", lambda m: m.record_many({"id": "x"}))
    assert_rejected(env, "events", lambda m: m.record_many(None))


def test_limits_are_inclusive(env: tuple[Meter, Observer]) -> None:
    meter, observer = env
    longest = "y" * 256
    assert meter.record(
        "completions",
        {"input_tokens": 0},
        organization_id=longest,
        time=0,
        id=longest,
        dimensions={"model": longest, "batch": None},
    )
    (event,) = observer.seen
    assert (event.id, event.organization_id, event.time) == (longest, longest, 0)
    assert event.dimensions["model"] == longest


def test_aware_datetime_is_converted(env: tuple[Meter, Observer]) -> None:
    meter, observer = env
    plus_two = dt.timezone(dt.timedelta(hours=2))
    # 02:00:30.9 at UTC+2 is 00:00:30 UTC, counted by its whole second.
    when = dt.datetime(2024, 11, 1, 2, 0, 30, 900_000, tzinfo=plus_two)
    assert meter.record(
        "completions", {"input_tokens": 3}, organization_id=ORG, time=when, id="aware"
    )
    assert [e.time for e in observer.seen] == [T0 + 30]
    page = meter.usage(
        "completions",
        organization_id=ORG,
        bucket_width="1m",
        start_time=dt.datetime(2024, 11, 1, tzinfo=dt.timezone.utc),
        end_time=dt.datetime(2024, 11, 1, 2, 1, tzinfo=plus_two),
    )
    assert [b.start_time for b in page.data] == [T0]
    # The witness (input_tokens 10) and this event share the first minute.
    assert page.data[0].results[0].values["input_tokens"] == 13


# --------------------------------------------------------------------------------------------
# Queries.
# --------------------------------------------------------------------------------------------


def query(**change: Any) -> Any:
    def call(meter: Meter) -> None:
        args: dict[str, Any] = {
            "meter": "completions",
            "organization_id": ORG,
            "start_time": T0,
            "end_time": T0 + 86400,
            "bucket_width": "1d",
        }
        args.update(change)
        meter.usage(args.pop("meter"), **args)

    return call


BAD_QUERIES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown meter", {"meter": "nope"}, "meter"),
    ("empty organization", {"organization_id": ""}, "organization_id"),
    ("long organization", {"organization_id": LONG}, "organization_id"),
    ("float start", {"start_time": T0 + 0.5}, "start_time"),
    ("string start", {"start_time": str(T0)}, "start_time"),
    ("naive start", {"start_time": dt.datetime(2024, 11, 1)}, "start_time"),
    ("bool start", {"start_time": False}, "start_time"),
    ("float end", {"end_time": T0 + 86400.0}, "end_time"),
    ("end equals start", {"end_time": T0}, "end_time"),
    ("end before start", {"end_time": T0 - 1}, "end_time"),
    ("unknown width", {"bucket_width": "1w"}, "bucket_width"),
    ("width in seconds", {"bucket_width": 86400}, "bucket_width"),
    ("empty width", {"bucket_width": ""}, "bucket_width"),
    ("limit zero", {"limit": 0}, "limit"),
    ("limit negative", {"limit": -1}, "limit"),
    ("limit over 1d max", {"limit": 32}, "limit"),
    ("limit over 1h max", {"bucket_width": "1h", "limit": 169}, "limit"),
    ("limit over 1m max", {"bucket_width": "1m", "limit": 1441}, "limit"),
    ("limit string", {"limit": "7"}, "limit"),
    ("limit float", {"limit": 7.0}, "limit"),
    ("limit bool", {"limit": True}, "limit"),
    ("group by unknown", {"group_by": ["colour"]}, "group_by"),
    ("group by a measure", {"group_by": ["input_tokens"]}, "group_by"),
    ("group by other kind's dimension", {"group_by": ["size"]}, "group_by"),
    ("group by bare string", {"group_by": "model"}, "group_by"),
    ("filter unknown dimension", {"filters": {"colour": ["red"]}}, "filters.colour"),
    ("filter batch as string", {"filters": {"batch": ["true"]}}, "filters.batch"),
    ("filter model as int", {"filters": {"model": [4]}}, "filters.model"),
    ("filter bool in string dim", {"filters": {"model": [True]}}, "filters.model"),
    ("filter bare string", {"filters": {"model": "gpt-4o"}}, "filters.model"),
    ("filter bare bool", {"filters": {"batch": True}}, "filters.batch"),
    ("filter empty list", {"filters": {"model": []}}, "filters.model"),
    ("filter long value", {"filters": {"model": [LONG]}}, "filters.model"),
    ("filters not a mapping", {"filters": ["model"]}, "filters"),
    ("image size not allowed", {"meter": "images", "filters": {"size": ["1x1"]}}, "filters.size"),
]


@pytest.mark.parametrize(
    ("change", "field"), [c[1:] for c in BAD_QUERIES], ids=[c[0] for c in BAD_QUERIES]
)
def test_bad_query(env: tuple[Meter, Observer], change: dict[str, Any], field: str) -> None:
    assert_rejected(env, field, query(**change))


def test_good_query_edges_are_accepted(env: tuple[Meter, Observer]) -> None:
    meter, _ = env
    # The extremes of each rule, so the rejections above are not rejecting everything.
    for width, top in (("1d", 31), ("1h", 168), ("1m", 1440)):
        for limit in (1, top):
            query(bucket_width=width, limit=limit)(meter)
    query(end_time=T0 + 1)(meter)
    query(group_by=["batch", "model", "batch"])(meter)
    query(filters={"batch": [False, None], "model": ["gpt-4o"]})(meter)
    page = meter.usage(
        "completions",
        organization_id=ORG,
        start_time=T0,
        end_time=T0 + 86400,
        group_by=("batch",),
        filters={"batch": (False,)},
    )
    assert page.data[0].results[0].group["batch"] is False


# --------------------------------------------------------------------------------------------
# Store URLs and meter specs.
# --------------------------------------------------------------------------------------------


class Elsewhere:
    """A plugin that claims a scheme but opens nothing, to show up in the error's list."""

    @hookimpl
    def meterkit_store_schemes(self) -> list[str]:
        return ["elsewhere"]


def test_unknown_scheme_lists_installed_schemes() -> None:
    with pytest.raises(ValidationError) as err:
        Meter("nosuch://x", plugins=[Elsewhere()])
    assert err.value.field == "url"
    for scheme in ("memory", "sqlite", "elsewhere"):
        assert repr(scheme) in err.value.message
    with pytest.raises(ValidationError) as err:
        Meter("nosuch://x")
    assert "'elsewhere'" not in err.value.message and "'memory'" in err.value.message


@pytest.mark.parametrize("url", ["", "usage.db", None, 5])
def test_malformed_url(url: Any) -> None:
    with pytest.raises(ValidationError) as err:
        Meter(url)
    assert err.value.field == "url"


def _m(*names: str) -> tuple[Measure, ...]:
    return tuple(Measure(n) for n in names)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: MeterSpec("Requests", _m("n")), id="upper-case meter"),
        pytest.param(lambda: MeterSpec("1st", _m("n")), id="leading digit"),
        pytest.param(lambda: MeterSpec("", _m("n")), id="empty name"),
        pytest.param(lambda: MeterSpec("api-calls", _m("n")), id="dash"),
        pytest.param(lambda: MeterSpec("a" * 64, _m("n")), id="64 characters"),
        pytest.param(lambda: MeterSpec(7, _m("n")), id="name not a string"),
        pytest.param(lambda: MeterSpec("m", ()), id="no measures"),
        pytest.param(lambda: MeterSpec("m", _m("n", "n")), id="duplicate measure"),
        pytest.param(
            lambda: MeterSpec("m", _m("n"), (Dimension("d"), Dimension("d"))),
            id="duplicate dimension",
        ),
        pytest.param(
            lambda: MeterSpec("m", _m("model"), (Dimension("model"),)),
            id="measure named like a dimension",
        ),
        pytest.param(lambda: MeterSpec("m", _m("object")), id="measure named object"),
        pytest.param(
            lambda: MeterSpec("m", _m("n"), (Dimension("object"),)), id="dimension named object"
        ),
        pytest.param(lambda: Measure("Tokens"), id="bad measure name"),
        pytest.param(lambda: Dimension("user id"), id="bad dimension name"),
        pytest.param(lambda: Measure("n", "avg"), id="unknown aggregation"),
        pytest.param(lambda: Measure("g", "latest", gauge=True), id="gauge latest"),
        pytest.param(lambda: Measure("g", "count", gauge=True), id="gauge count"),
        pytest.param(lambda: Measure("g", "unique_count", gauge=True), id="gauge unique_count"),
    ],
)
def test_meter_spec_errors(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_meter_spec_good_names() -> None:
    spec = MeterSpec("a" * 63, _m("n_1"), (Dimension("d9"),))
    assert spec.result_object == f"usage.{'a' * 63}.result"
    for aggregation in ("sum", "max", "min"):
        assert Measure("g", aggregation, gauge=True).gauge  # type: ignore[arg-type]


def test_register_rejects_non_specs() -> None:
    with Meter("memory://") as meter, pytest.raises(ValidationError) as err:
        meter.register({"name": "x"})  # type: ignore[arg-type]
    assert err.value.field == "spec"


def test_errors_are_public() -> None:
    assert issubclass(meterkit.ValidationError, ValueError)
    assert issubclass(meterkit.ValidationError, meterkit.MeterkitError)
    err = meterkit.ValidationError("limit", "must be an integer")
    assert (err.field, err.message) == ("limit", "must be an integer")
    assert "limit" in str(err)


# -- documented sums and dimension defaults ----------------------------------------------------


def _tokens(**values: int) -> Event:
    return Event("t1", "completions", ORG, T0, values, {"model": "gpt-4o"})


@pytest.mark.parametrize(
    ("values", "field"),
    [
        (
            {
                "input_tokens": 100,
                "input_cached_tokens": 20,
                "input_cache_write_tokens": 10,
                "input_uncached_tokens": 60,
            },
            "input_tokens",
        ),
        (
            {
                "input_cache_write_tokens": 10,
                "input_cache_write_30m_tokens": 4,
                "input_cache_write_12h_tokens": 5,
            },
            "input_cache_write_tokens",
        ),
        (
            {
                "output_tokens": 9,
                "output_text_tokens": 5,
                "output_audio_tokens": 2,
                "output_image_tokens": 1,
            },
            "output_tokens",
        ),
        (
            {
                "input_uncached_tokens": 7,
                "input_text_tokens": 3,
                "input_audio_tokens": 3,
                "input_image_tokens": 0,
            },
            "input_uncached_tokens",
        ),
    ],
)
def test_a_total_whose_parts_do_not_add_up_is_refused(
    env: tuple[Meter, Observer], values: dict[str, int], field: str
) -> None:
    meter, observer = env
    good = Event("ok", "completions", ORG, T0, {"input_tokens": 5}, {})
    for kind in ("completions", "decisions"):
        event = attrs.evolve(_tokens(**values), meter=kind)
        with pytest.raises(ValidationError) as err:
            meter.record_many([good, event])
        assert err.value.field == f"events[1].values.{field}"
        assert "must add up" in err.value.message
    # Only the fixture's witness event is stored.
    stored = meter.store.scan("completions", ORG, 0, T0 + 60)
    assert [e.id for e in stored] == ["witness"]
    assert observer.seen == []


def test_totals_with_only_some_parts_are_taken_as_given(env: tuple[Meter, Observer]) -> None:
    meter, _ = env
    consistent = {
        "input_tokens": 100,
        "input_cached_tokens": 20,
        "input_cache_write_tokens": 10,
        "input_cache_write_30m_tokens": 4,
        "input_cache_write_12h_tokens": 6,
        "input_uncached_tokens": 70,
    }
    assert meter.record("completions", consistent, organization_id=ORG, time=T0, id="a")
    # A total without all its parts says nothing about them.
    partial = {"input_tokens": 100, "input_cached_tokens": 99, "input_uncached_tokens": 50}
    assert meter.record("completions", partial, organization_id=ORG, time=T0, id="b")


def test_a_dimension_default_is_the_same_as_leaving_it_out(env: tuple[Meter, Observer]) -> None:
    meter, _ = env
    base = {"model": "gpt-4o"}
    assert meter.record(
        "completions",
        {"input_tokens": 1},
        organization_id=ORG,
        time=T0,
        id="same",
        dimensions={**base, "api_source": "unlabeled"},
    )
    # The same event again without the default: a duplicate, not a conflict.
    assert not meter.record(
        "completions",
        {"input_tokens": 1},
        organization_id=ORG,
        time=T0,
        id="same",
        dimensions=base,
    )
    with pytest.raises(ValidationError) as err:
        meter.record(
            "completions",
            {"input_tokens": 1},
            organization_id=ORG,
            time=T0,
            id="x",
            dimensions={"api_source": "chat"},
        )
    assert err.value.field == "event.dimensions.api_source"


def test_sums_and_defaults_are_checked_when_a_meter_is_defined() -> None:
    with pytest.raises(ValueError, match="unknown"):
        MeterSpec("m", (Measure("a"), Measure("b")), sums={"a": ("b", "c")})
    with pytest.raises(ValueError, match="other measures"):
        MeterSpec("m", (Measure("a"), Measure("b")), sums={"a": ("a", "b")})
    with pytest.raises(ValueError, match="not allowed"):
        Dimension("source", allowed={"x", "y"}, default="z")
    with pytest.raises(ValueError, match="str dimension"):
        Dimension("flag", kind="bool", default="yes")
    spec = MeterSpec("m", (Measure("a"), Measure("b"), Measure("c")), sums={"a": ["b", "c"]})
    assert spec.sums == (("a", ("b", "c")),)
