"""The costs query: pages equal hand-computed Decimal totals, in the OpenAI envelope, on every
store; grouping, filters, paging, currencies, tiers across the window, unpriced usage, bad input."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterkit import Meter, ValidationError
from meterkit.costs import CostsPage, costs_page, unpriced
from meterkit.periods import BillingCycle
from meterkit.pricing import Price, PriceBook, Tier, load_book, save_price

DAY = 86400
T0 = int(dt.datetime(2024, 11, 1, tzinfo=dt.timezone.utc).timestamp())
START = T0 + 50  # not aligned: the first bucket still starts at T0
END = T0 + 4 * DAY


def price(meter: str, measure: str, unit_price: str, line_item: str, unit: str, **kw: Any) -> Price:
    return Price(meter, measure, unit_price, line_item=line_item, quantity_unit=unit, **kw)


PRICES = [
    price(
        "completions",
        "input_tokens",
        "2.50",
        "gpt-4o, input",
        "tokens",
        per=1_000_000,
        where={"model": "gpt-4o"},
    ),
    price(
        "completions",
        "output_tokens",
        "10.00",
        "gpt-4o, output",
        "tokens",
        per=1_000_000,
        where={"model": "gpt-4o"},
    ),
    price(
        "completions",
        "input_tokens",
        "0.15",
        "gpt-4o-mini, input",
        "tokens",
        per=1_000_000,
        where={"model": "gpt-4o-mini"},
    ),
    price("images", "images", "0.04", "dall-e-3", "images", where={"model": "dall-e-3"}),
]


@pytest.fixture(params=["memory", "sqlite"])
def m(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Meter]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'c.db'}"
    meter = Meter(url, max_future_skew=None)  # prices over fixed 2024 dates, whatever "now" is
    yield meter
    meter.close()


def record(m: Meter, meter: str, time: int, values: dict[str, int], eid: str, **dims: Any) -> None:
    assert m.record(meter, values, organization_id="org_1", time=time, id=eid, dimensions=dims)


@pytest.fixture
def usage(m: Meter) -> Meter:
    for p in PRICES:
        save_price(m.store, p, specs=m.meters)
    # Hand-computed charges in the comments.
    record(
        m,
        "completions",
        T0 + 10,
        {"input_tokens": 1_000_000},
        "before_start",
        model="gpt-4o",
        project_id="p1",
        api_key_id="k1",
    )  # before start_time: left out
    record(
        m,
        "completions",
        T0 + 100,
        {"input_tokens": 1_000_000, "output_tokens": 200_000, "num_model_requests": 1},
        "e1",
        model="gpt-4o",
        project_id="p1",
        api_key_id="k1",
    )  # 2.50 + 2.00
    record(
        m,
        "completions",
        T0 + 3600,
        {"input_tokens": 2_000_000},
        "e2",
        model="gpt-4o-mini",
        project_id="p2",
        api_key_id="k2",
    )  # 0.30
    record(
        m,
        "images",
        T0 + 7200,
        {"images": 3, "num_model_requests": 1},
        "e3",
        model="dall-e-3",
        project_id="p1",
        api_key_id="k2",
    )  # 0.12
    record(
        m,
        "completions",
        T0 + DAY + 5,
        {"input_tokens": 400_000},
        "e4",
        model="gpt-4o",
        project_id="p2",
        api_key_id="k1",
    )  # 1.00
    record(
        m,
        "completions",
        T0 + 3 * DAY + DAY - 1,
        {"output_tokens": 50_000},
        "e5",
        model="gpt-4o",
        project_id="p1",
        api_key_id="k1",
    )  # 0.50
    record(
        m,
        "completions",
        END,
        {"input_tokens": 1_000_000},
        "at_end",
        model="gpt-4o",
        project_id="p1",
    )  # end_time is exclusive: left out
    return m


def query(m: Meter, **kw: Any) -> CostsPage:
    """The costs page priced from aggregated usage, checked against pricing every event."""
    args: dict[str, Any] = {"organization_id": "org_1", "start_time": START, "end_time": END}
    args.update(kw)
    book = load_book(m.store, m.meters)
    by_event = costs_page(m.store, m.meters, book, **args)
    aggregated = costs_page(m.store, m.meters, book, reader=m.reader, **args)
    assert aggregated == by_event
    return aggregated


def amounts(page: CostsPage) -> list[list[tuple[Any, ...]]]:
    """Per bucket: (line_item, project_id, api_key_id, amount, quantity, unit) of each result."""
    return [
        [
            (r.line_item, r.project_id, r.api_key_id, r.amount, r.quantity, r.quantity_unit)
            for r in b.results
        ]
        for b in page.data
    ]


D = Decimal


def test_ungrouped_page_equals_the_hand_computed_total(usage: Meter) -> None:
    page = query(usage)
    assert [b.start_time for b in page.data] == [T0, T0 + DAY, T0 + 2 * DAY, T0 + 3 * DAY]
    assert amounts(page) == [
        [(None, None, None, D("4.92"), None, None)],
        [(None, None, None, D("1.00"), None, None)],
        [],
        [(None, None, None, D("0.50"), None, None)],
    ]
    assert page.totals() == {"usd": D("6.42")}
    assert not page.has_more and page.next_page is None


def test_to_dict_is_the_openai_costs_envelope(usage: Meter) -> None:
    out = query(usage, end_time=T0 + 3 * DAY).to_dict()
    assert out == {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": T0,
                "end_time": T0 + DAY,
                "results": [
                    {
                        "object": "organization.costs.result",
                        "amount": {"value": 4.92, "currency": "usd"},
                        "line_item": None,
                        "project_id": None,
                        "user_id": None,
                        "api_key_id": None,
                        "api_source": None,
                        # Ungrouped by line item, as in the official example: null.
                        "quantity": None,
                        "quantity_unit": None,
                    }
                ],
            },
            {
                "object": "bucket",
                "start_time": T0 + DAY,
                "end_time": T0 + 2 * DAY,
                "results": [
                    {
                        "object": "organization.costs.result",
                        "amount": {"value": 1.0, "currency": "usd"},
                        "line_item": None,
                        "project_id": None,
                        "user_id": None,
                        "api_key_id": None,
                        "api_source": None,
                        # Ungrouped by line item, as in the official example: null.
                        "quantity": None,
                        "quantity_unit": None,
                    }
                ],
            },
            {
                "object": "bucket",
                "start_time": T0 + 2 * DAY,
                "end_time": T0 + 3 * DAY,
                "results": [],
            },
        ],
        "has_more": False,
        "next_page": None,
    }
    assert isinstance(out["data"][0]["results"][0]["amount"]["value"], float)
    json.dumps(out)


def test_group_by_line_item_adds_quantity_and_unit(usage: Meter) -> None:
    page = query(usage, group_by=["line_item"], limit=2)
    assert amounts(page) == [
        [
            ("dall-e-3", None, None, D("0.12"), D(3), "images"),
            ("gpt-4o, input", None, None, D("2.50"), D(1_000_000), "tokens"),
            ("gpt-4o, output", None, None, D("2.00"), D(200_000), "tokens"),
            ("gpt-4o-mini, input", None, None, D("0.30"), D(2_000_000), "tokens"),
        ],
        [("gpt-4o, input", None, None, D("1.00"), D(400_000), "tokens")],
    ]
    result = page.to_dict()["data"][0]["results"][1]
    assert result == {
        "object": "organization.costs.result",
        "amount": {"value": 2.5, "currency": "usd"},
        "line_item": "gpt-4o, input",
        "project_id": None,
        "user_id": None,
        "api_key_id": None,
        "api_source": None,
        "quantity": 1_000_000,
        "quantity_unit": "tokens",
    }
    # Without line_item grouping the units of different lines are not added up: null.
    result = query(usage, group_by=["project_id"]).to_dict()["data"][0]["results"][0]
    assert result["quantity"] is None and result["quantity_unit"] is None


def test_group_by_project_and_key(usage: Meter) -> None:
    page = query(usage, group_by=["project_id", "api_key_id", "project_id"])
    assert amounts(page) == [
        [
            (None, "p1", "k1", D("4.50"), None, None),
            (None, "p1", "k2", D("0.12"), None, None),
            (None, "p2", "k2", D("0.30"), None, None),
        ],
        [(None, "p2", "k1", D("1.00"), None, None)],
        [],
        [(None, "p1", "k1", D("0.50"), None, None)],
    ]


def test_group_by_user_and_api_source(m: Meter) -> None:
    for p in PRICES:
        save_price(m.store, p, specs=m.meters)
    # gpt-4o input, $2.50 per million: 0.25, 0.50 and 1.00.
    for i, (user, source) in enumerate([("u1", "agents_api"), ("u1", None), ("u2", "unlabeled")]):
        dims: dict[str, Any] = {"model": "gpt-4o", "user_id": user}
        if source:
            dims["api_source"] = source
        record(m, "completions", T0 + 100 + i, {"input_tokens": 100_000 * 2**i}, f"s{i}", **dims)
    page = query(m, group_by=["user_id", "api_source"])
    got = [(r.user_id, r.api_source, r.amount) for r in page.data[0].results]
    # Usage without a source and usage that says "unlabeled" are one group, "unlabeled".
    assert got == [
        ("u1", "agents_api", D("0.25")),
        ("u1", "unlabeled", D("0.50")),
        ("u2", "unlabeled", D("1.00")),
    ]
    unlabeled = query(m, group_by=["user_id"], filters={"api_source": ["unlabeled"]})
    assert [(r.user_id, r.amount) for r in unlabeled.data[0].results] == [
        ("u1", D("0.50")),
        ("u2", D("1.00")),
    ]
    result = page.to_dict()["data"][0]["results"][0]
    assert (result["user_id"], result["api_source"]) == ("u1", "agents_api")
    assert result["quantity"] is None and result["project_id"] is None


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"project_id": ["p1"]}, ["4.62", None, None, "0.50"]),
        ({"api_key_id": ["k2"]}, ["0.42", None, None, None]),
        ({"line_item": ["gpt-4o, input", "dall-e-3"]}, ["2.62", "1.00", None, None]),
        ({"project_id": ["p1", "p2"], "api_key_id": ["k1"]}, ["4.50", "1.00", None, "0.50"]),
        ({"project_id": ["nobody"]}, [None, None, None, None]),
    ],
)
def test_filters(usage: Meter, filters: dict[str, list[str]], expected: list[str | None]) -> None:
    page = query(usage, filters=filters)
    got = [b.results[0].amount if b.results else None for b in page.data]
    assert got == [None if e is None else D(e) for e in expected]


def test_paging_to_the_end(usage: Meter) -> None:
    whole = query(usage, group_by=["line_item"], limit=180)
    seen: list[Any] = []
    page = query(usage, group_by=["line_item"], limit=1)
    pages = 1
    while True:
        seen.extend(page.data)
        if page.next_page is None:
            break
        assert page.has_more
        page = query(usage, group_by=["line_item"], limit=1, page=page.next_page)
        pages += 1
    assert pages == 4
    assert tuple(seen) == whole.data
    # A cursor belongs to its query.
    cursor = query(usage, limit=1).next_page
    with pytest.raises(ValidationError) as info:
        query(usage, limit=1, group_by=["project_id"], page=cursor)
    assert info.value.field == "page"


def test_each_currency_is_its_own_result(m: Meter) -> None:
    save_price(
        m.store,
        price("embeddings", "input_tokens", "0.02", "embed", "tokens", per=1000, currency="EUR"),
        specs=m.meters,
    )
    save_price(
        m.store,
        price("completions", "input_tokens", "1", "chat", "tokens", per=1000),
        specs=m.meters,
    )
    record(m, "embeddings", T0 + 1, {"input_tokens": 3000}, "a")
    record(m, "completions", T0 + 2, {"input_tokens": 500}, "b")
    page = query(m, start_time=T0, end_time=T0 + DAY)
    assert [(r.currency, r.amount) for r in page.data[0].results] == [
        ("eur", D("0.06")),
        ("usd", D("0.5")),
    ]
    assert page.totals() == {"eur": D("0.06"), "usd": D("0.5")}


def test_tiers_count_from_the_period_start_and_ignore_filters(m: Meter) -> None:
    tiered = Price(
        "tokens",
        "tokens",
        line_item="tokens",
        quantity_unit="tokens",
        tiers=[Tier(100, "0.10"), Tier(None, "0.01")],
        tier_mode="graduated",
    )
    save_price(m.store, tiered, specs=m.meters)
    record(m, "tokens", T0 + 5, {"tokens": 90}, "a", project_id="p1")  # 9.00, before the window
    record(m, "tokens", T0 + 9 * DAY, {"tokens": 20}, "b", project_id="p2")  # 1.00 + 0.10
    record(m, "tokens", T0 + 9 * DAY + 1, {"tokens": 30}, "c", project_id="p1")  # 0.30
    window = {"start_time": T0 + 9 * DAY, "end_time": T0 + 10 * DAY}
    assert query(m, **window).totals() == {"usd": D("1.40")}
    by_project = amounts(query(m, group_by=["project_id"], **window))
    assert by_project == [
        [(None, "p1", None, D("0.30"), None, None), (None, "p2", None, D("1.10"), None, None)]
    ]
    only_p1 = query(m, filters={"project_id": ["p1"]}, **window)
    assert only_p1.totals() == {"usd": D("0.30")}
    # With daily billing periods the November 1 usage no longer counts towards the tiers.
    daily = query(m, period_of=BillingCycle("daily").period_at, **window)
    assert daily.totals() == {"usd": D("5.00")}  # (20 + 30) * 0.10, all in the first tier


def test_volume_tiers_use_the_whole_period_total(m: Meter) -> None:
    volume = Price(
        "tokens",
        "tokens",
        line_item="tokens",
        quantity_unit="tokens",
        tiers=[Tier(100, "0.10"), Tier(None, "0.05", flat_fee="1")],
        tier_mode="volume",
    )
    save_price(m.store, volume, specs=m.meters)
    record(m, "tokens", T0 + 5, {"tokens": 80}, "a")
    window = {"start_time": T0, "end_time": T0 + DAY}
    assert query(m, **window).totals() == {"usd": D("8.00")}  # 80 * 0.10
    # Later usage in the same month moves the whole month to the second tier, this day too.
    record(m, "tokens", T0 + 20 * DAY, {"tokens": 40}, "b")
    assert query(m, **window).totals() == {"usd": D("4.00")}  # 80 * 0.05
    month = query(m, start_time=T0, end_time=T0 + 30 * DAY, limit=30)
    assert month.totals() == {"usd": D("7.00")}  # 120 * 0.05 + 1 (fee with "b", day 20)
    assert month.data[20].results[0].amount == D("3.00")


price_strings = st.builds(
    lambda digits, places: str(Decimal(digits).scaleb(-places)),
    st.integers(0, 10**9),
    st.integers(0, 9),
)


@settings(max_examples=60, deadline=None)
@given(
    prices=st.tuples(price_strings, price_strings),
    per=st.sampled_from([1, 1000, 1_000_000]),
    events=st.lists(
        st.tuples(
            st.integers(0, 5 * DAY - 1),
            st.integers(0, 10**7),
            st.sampled_from(["gpt-4o", "gpt-4o-mini"]),
            st.sampled_from(["p1", "p2"]),
        ),
        max_size=15,
    ),
)
def test_random_usage_prices_to_the_exact_sum(
    prices: tuple[str, str], per: int, events: list[tuple[int, int, str, str]]
) -> None:
    m = Meter("memory://")
    unit = dict(zip(["gpt-4o", "gpt-4o-mini"], prices, strict=True))
    for model, unit_price in unit.items():
        save_price(
            m.store,
            price(
                "completions",
                "input_tokens",
                unit_price,
                model,
                "tokens",
                per=per,
                where={"model": model},
            ),
            specs=m.meters,
        )
    expected: dict[tuple[int, str], Fraction] = {}
    for i, (offset, tokens, model, project) in enumerate(events):
        record(
            m,
            "completions",
            T0 + offset,
            {"input_tokens": tokens},
            f"e{i}",
            model=model,
            project_id=project,
        )
        if not tokens:
            continue  # a zero value is no usage: it makes no result row
        key = (offset // DAY, project)
        expected[key] = (
            expected.get(key, Fraction(0)) + Fraction(tokens) * Fraction(unit[model]) / per
        )
    page = query(m, start_time=T0, end_time=T0 + 5 * DAY, group_by=["project_id"])
    got = {
        (day, r.project_id): Fraction(r.amount)
        for day, b in enumerate(page.data)
        for r in b.results
    }
    assert got == expected


MODELS = ("gpt-4o", "gpt-4o-mini")
MONTH_AGO = T0 - 35 * DAY


@st.composite
def price_books(draw: st.DrawFn) -> list[Price]:
    """Lines for both token measures: a general one and one for gpt-4o, each in one to three
    versions starting at any second, flat or tiered (graduated or volume, with flat fees)."""
    out = []
    for measure in ("input_tokens", "output_tokens"):
        for where in ({}, {"model": "gpt-4o"}):
            if not where and draw(st.booleans()):
                continue  # gpt-4o-mini then goes unpriced
            # Some versions start among the events that cluster around T0, inside a day.
            when = st.one_of(st.integers(MONTH_AGO, T0 + 4 * DAY), st.integers(T0 - 90, T0 + 90))
            starts = draw(st.lists(when, min_size=1, max_size=3))
            for start in sorted(set(starts)):
                mode = draw(st.sampled_from([None, "graduated", "volume"]))
                kw: dict[str, Any] = {
                    "where": where,
                    "effective_from": start,
                    "per": draw(st.sampled_from([1, 1000])),
                }
                if mode is None:
                    kw["unit_price"] = draw(price_strings)
                else:
                    bound = draw(st.integers(1, 400))
                    kw["tier_mode"] = mode
                    kw["tiers"] = [
                        Tier(bound, draw(price_strings), draw(st.sampled_from(["0", "0", "2.5"]))),
                        Tier(None, draw(price_strings), draw(st.sampled_from(["0", "1"]))),
                    ]
                out.append(
                    Price(
                        "completions",
                        measure,
                        line_item=f"{measure} {where}",
                        quantity_unit="tokens",
                        **kw,
                    )
                )
    return out


@settings(max_examples=200, deadline=None)
@given(
    prices=price_books(),
    events=st.lists(
        st.tuples(
            st.one_of(
                st.integers(T0 - 90, T0 + 90),  # around midnight: versions start there too
                st.integers(T0 - 3 * DAY, T0 + 3 * DAY),
                st.integers(MONTH_AGO, T0),  # earlier in the period: tiers count it
            ),
            st.integers(0, 150),
            st.integers(0, 150),
            st.sampled_from(MODELS),
            st.sampled_from(["p1", "p2", None]),
            st.sampled_from(["k1", None]),
        ),
        max_size=40,
    ),
    start=st.integers(T0 - DAY, T0),
    length=st.integers(1, 3 * DAY),
    group_by=st.lists(st.sampled_from(["project_id", "line_item", "api_key_id"]), unique=True),
    only_p1=st.booleans(),
    daily=st.booleans(),
    store=st.sampled_from(["memory", "sqlite"]),
)
def test_aggregated_usage_prices_exactly_as_every_event(
    tmp_path_factory: pytest.TempPathFactory,
    prices: list[Price],
    events: list[tuple[int, int, int, str, str | None, str | None]],
    start: int,
    length: int,
    group_by: list[str],
    only_p1: bool,
    daily: bool,
    store: str,
) -> None:
    url = "memory://" if store == "memory" else f"sqlite:///{tmp_path_factory.mktemp('c')}/c.db"
    with Meter(url, max_future_skew=None) as m:
        for p in prices:
            save_price(m.store, p, specs=m.meters)
        m.record_many(
            [
                meterkit_event(i, t, {"input_tokens": a, "output_tokens": b}, model, project, key)
                for i, (t, a, b, model, project, key) in enumerate(events)
            ]
        )
        query(
            m,
            start_time=start,
            end_time=start + length,
            group_by=group_by,
            filters={"project_id": ["p1"]} if only_p1 else None,
            limit=180,
            period_of=BillingCycle("daily").period_at if daily else None,
        )


def meterkit_event(
    i: int, t: int, values: dict[str, int], model: str, project: str | None, key: str | None
) -> Any:
    from meterkit import Event

    dims = {"model": model, "project_id": project, "api_key_id": key}
    return Event(f"e{i}", "completions", "org_1", t, values, {k: v for k, v in dims.items() if v})


def test_unpriced_usage_is_listed_never_free(usage: Meter) -> None:
    record(
        usage, "completions", T0 + 500, {"input_tokens": 70}, "u1", model="gpt-5", project_id="p1"
    )
    record(
        usage,
        "completions",
        T0 + 900,
        {"input_tokens": 30, "output_tokens": 0},
        "u2",
        model="gpt-5",
        project_id="p1",
    )
    record(usage, "completions", T0 + DAY, {"input_tokens": 5}, "u3")  # no model at all
    book = load_book(usage.store, usage.meters)
    found = unpriced(
        usage.store,
        usage.meters,
        book,
        organization_id="org_1",
        start_time=START,
        end_time=END,
        meters=["completions"],
    )
    assert [
        (u.measure, dict(u.dimensions), u.quantity, u.first_time, u.last_time) for u in found
    ] == [
        ("input_tokens", {}, D(5), T0 + DAY, T0 + DAY),
        ("input_tokens", {"model": "gpt-5", "project_id": "p1"}, D(100), T0 + 500, T0 + 900),
        (
            "num_model_requests",
            {"api_key_id": "k1", "model": "gpt-4o", "project_id": "p1"},
            D(1),
            T0 + 100,
            T0 + 100,
        ),
    ]
    # The costs page leaves that usage out; unpriced() is where it shows.
    assert query(usage).totals() == {"usd": D("6.42")}
    everything = unpriced(
        usage.store, usage.meters, book, organization_id="org_1", start_time=START, end_time=END
    )
    assert {(u.meter, u.measure) for u in everything} == {
        ("completions", "input_tokens"),
        ("completions", "num_model_requests"),
        ("images", "num_model_requests"),
    }


def test_an_empty_book_costs_nothing(m: Meter) -> None:
    record(m, "tokens", T0, {"tokens": 5}, "a")
    page = costs_page(
        m.store,
        m.meters,
        PriceBook(),
        organization_id="org_1",
        start_time=T0,
        end_time=T0 + 2 * DAY,
    )
    assert [b.results for b in page.data] == [(), ()]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bucket_width": "1h"}, "bucket_width"),
        ({"limit": 0}, "limit"),
        ({"limit": 181}, "limit"),
        ({"limit": True}, "limit"),
        ({"limit": "7"}, "limit"),
        ({"group_by": ["model"]}, "group_by"),
        ({"group_by": "project_id"}, "group_by"),
        ({"filters": {"model": ["gpt-4o"]}}, "filters.model"),
        ({"filters": {"project_id": "p1"}}, "filters.project_id"),
        ({"filters": {"project_id": []}}, "filters.project_id"),
        ({"filters": {"project_id": [7]}}, "filters.project_id"),
        ({"filters": ["project_id"]}, "filters"),
        ({"end_time": START}, "end_time"),
        ({"start_time": -1}, "start_time"),
        ({"start_time": 1.5}, "start_time"),
        ({"organization_id": ""}, "organization_id"),
        ({"page": "page_bogus"}, "page"),
    ],
)
def test_bad_input_names_the_field(usage: Meter, change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        query(usage, **change)
    assert info.value.field == field


def test_limit_bounds_and_default(usage: Meter) -> None:
    long = {"start_time": T0, "end_time": T0 + 200 * DAY}
    assert len(query(usage, **long).data) == 7
    assert len(query(usage, limit=180, **long).data) == 180
    assert len(query(usage, limit=1, **long).data) == 1


def test_a_priced_meter_that_is_not_registered_is_an_error(m: Meter) -> None:
    book = PriceBook([price("tokens", "tokens", "1", "t", "tokens")])
    specs = {k: v for k, v in m.meters.items() if k != "tokens"}
    with pytest.raises(ValidationError) as info:
        costs_page(m.store, specs, book, organization_id="org_1", start_time=T0, end_time=T0 + DAY)
    assert info.value.field == "meter"
