"""The price book: Decimal arithmetic against exact fractions, tiers against a unit-by-unit oracle,
versions, matching, validation and persistence."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterkit import Event, Meter, ValidationError
from meterkit.catalog import builtin_meters
from meterkit.costs import costs_page
from meterkit.periods import BillingCycle
from meterkit.pricing import (
    Price,
    PriceBook,
    Tally,
    Tier,
    amount,
    delete_price,
    load_book,
    price_from_dict,
    price_to_dict,
    rate,
    save_price,
)

SPECS = builtin_meters()
DAY = 86400


def ts(year: int, month: int, day: int) -> int:
    return int(dt.datetime(year, month, day, tzinfo=dt.timezone.utc).timestamp())


NOV = ts(2024, 11, 1)  # a 30-day month
DEC = ts(2024, 12, 1)

# ``per`` values whose only prime factors are 2 and 5: amounts are exact decimals.
EXACT_PERS = [1, 2, 4, 5, 8, 10, 25, 1000, 1_000_000]
# Others: one rounding, at 50 significant digits.
ROUNDED_PERS = [3, 7, 60, 3600, 1_000_003]

SETTINGS = settings(max_examples=100, deadline=None)

# Decimal strings as a price sheet would write them, sometimes in exponent form ("1E-7").
price_strings = st.builds(
    lambda digits, places: str(Decimal(digits).scaleb(-places)),
    st.integers(0, 10**12),
    st.integers(0, 12),
)


def tokens_price(**kw: Any) -> Price:
    base: dict[str, Any] = {
        "meter": "tokens",
        "measure": "tokens",
        "line_item": "tokens",
        "quantity_unit": "tokens",
    }
    base.update(kw)
    return Price(**base)


def event(time: int, units: Any, eid: str, **dims: Any) -> Event:
    return Event(eid, "tokens", "org_1", time, {"tokens": units}, dims)


def total(charges: Sequence[Any]) -> Decimal:
    tally = Tally()
    for charge in charges:
        tally.add(charge.numerator, charge.per)
    return tally.value()


# -- arithmetic ------------------------------------------------------------------------------


@SETTINGS
@given(price=price_strings, units=st.integers(0, 2**53 - 1), per=st.sampled_from(EXACT_PERS))
def test_amount_is_exact(price: str, units: int, per: int) -> None:
    got = amount(units, Decimal(price), per)
    assert isinstance(got, Decimal)
    assert Fraction(got) == Fraction(units) * Fraction(price) / per


@SETTINGS
@given(price=price_strings, units=st.integers(0, 2**53 - 1), per=st.sampled_from(ROUNDED_PERS))
def test_amount_rounds_once_far_below_a_cent(price: str, units: int, per: int) -> None:
    exact = Fraction(units) * Fraction(price) / per
    got = Fraction(amount(units, Decimal(price), per))
    assert abs(got - exact) <= exact * Fraction(1, 10**48)


@SETTINGS
@given(
    parts=st.lists(
        st.tuples(price_strings, st.integers(0, 10**9), st.sampled_from(EXACT_PERS + ROUNDED_PERS)),
        max_size=12,
    )
)
def test_tally_sums_without_rounding_until_one_division(
    parts: list[tuple[str, int, int]],
) -> None:
    tally = Tally()
    exact = Fraction(0)
    for price, units, per in parts:
        tally.add(Decimal(units) * Decimal(price), per)
        exact += Fraction(units) * Fraction(price) / per
    got = Fraction(tally.value())
    if all(per in EXACT_PERS for _p, _u, per in parts):
        assert got == exact
    else:
        assert abs(got - exact) <= exact * Fraction(1, 10**48)


def test_float_measure_values_count_as_their_shortest_repr() -> None:
    book = PriceBook([tokens_price(unit_price="3")])
    charges = rate(book, [event(NOV, 0.1, "a"), event(NOV + 1, 0.2, "b")])
    assert total(charges) == Decimal("0.9")  # 0.1 + 0.2 is 0.30000000000000004 in floats


# -- tiers against an oracle -----------------------------------------------------------------


@st.composite
def tier_sheets(draw: st.DrawFn) -> list[tuple[int | None, str, str]]:
    bounds = sorted(draw(st.sets(st.integers(1, 60), max_size=3)))
    tiers: list[tuple[int | None, str, str]] = []
    for bound in [*bounds, None]:
        fee = draw(st.one_of(st.just("0"), price_strings))
        tiers.append((bound, draw(price_strings), fee))
    return tiers


def oracle_graduated(tiers: list[tuple[int | None, str, str]], units: int, per: int) -> Fraction:
    """Unit by unit: each unit at the tier it falls in; a tier's fee when its first unit comes."""
    out = Fraction(0)
    entered: set[int] = set()
    for k in range(1, units + 1):
        index = next(i for i, (up, _p, _f) in enumerate(tiers) if up is None or k <= up)
        out += Fraction(tiers[index][1]) / per
        if index not in entered:
            entered.add(index)
            out += Fraction(tiers[index][2])
    return out


def oracle_volume(tiers: list[tuple[int | None, str, str]], units: int, per: int) -> Fraction:
    if units == 0:
        return Fraction(0)
    index = next(i for i, (up, _p, _f) in enumerate(tiers) if up is None or units <= up)
    return Fraction(units) * Fraction(tiers[index][1]) / per + Fraction(tiers[index][2])


def tiered(tiers: list[tuple[int | None, str, str]], mode: str, per: int) -> Price:
    return tokens_price(
        tiers=[Tier(up, price, fee) for up, price, fee in tiers], tier_mode=mode, per=per
    )


def month_costs(m: Meter, price: Price) -> Decimal:
    book = PriceBook([price], m.meters)
    page = costs_page(
        m.store,
        m.meters,
        book,
        organization_id="org_1",
        start_time=NOV,
        end_time=DEC,
        limit=31,
        secret=b"k",
    )
    return page.totals().get("usd", Decimal(0))


@SETTINGS
@given(
    tiers=tier_sheets(),
    mode=st.sampled_from(["graduated", "volume"]),
    per=st.sampled_from(EXACT_PERS),
    split=st.lists(
        st.tuples(st.integers(0, 25), st.integers(0, 29), st.integers(0, DAY - 1)),
        min_size=1,
        max_size=8,
    ),
)
def test_tiered_month_total_matches_oracle_however_events_are_split(
    tiers: list[tuple[int | None, str, str]],
    mode: str,
    per: int,
    split: list[tuple[int, int, int]],
) -> None:
    price = tiered(tiers, mode, per)
    units = sum(q for q, _d, _s in split)
    oracle = oracle_graduated if mode == "graduated" else oracle_volume
    expected = oracle(tiers, units, per)

    spread = Meter("memory://", max_future_skew=None)
    for i, (quantity, day, second) in enumerate(split):
        spread.record(
            "tokens",
            {"tokens": quantity},
            organization_id="org_1",
            time=NOV + day * DAY + second,
            id=f"e{i}",
        )
    whole = Meter("memory://", max_future_skew=None)
    whole.record("tokens", {"tokens": units}, organization_id="org_1", time=NOV + 5, id="all")

    got = month_costs(spread, price)
    assert Fraction(got) == expected
    assert got == month_costs(whole, price)


# -- tier boundaries -------------------------------------------------------------------------


GRADUATED = tokens_price(
    tiers=[Tier(100, "0.10"), Tier(None, "0.05", flat_fee="1.00")], tier_mode="graduated"
)
VOLUME = tokens_price(
    tiers=[Tier(100, "0.10", flat_fee="0.50"), Tier(None, "0.05", flat_fee="2")],
    tier_mode="volume",
)


@pytest.mark.parametrize(
    ("price", "quantities", "expected"),
    [
        # graduated: 0.10 each up to 100, then 0.05 each plus 1.00 on entering tier 2
        (GRADUATED, [99], "9.90"),
        (GRADUATED, [100], "10.00"),
        (GRADUATED, [101], "11.05"),  # 10.00 + 0.05 + 1.00
        (GRADUATED, [100, 1], "11.05"),  # the boundary between two events
        (GRADUATED, [99, 2], "11.05"),  # one event straddling it
        (GRADUATED, [150, 50], "16.00"),  # 10.00 + 100 * 0.05 + 1.00 once
        # volume: every unit at the tier the total reaches, plus that tier's fee once
        (VOLUME, [99], "10.40"),  # 99 * 0.10 + 0.50
        (VOLUME, [100], "10.50"),
        (VOLUME, [101], "7.05"),  # 101 * 0.05 + 2
        (VOLUME, [60, 41], "7.05"),
        (VOLUME, [100, 1], "7.05"),
    ],
)
def test_tier_boundaries(price: Price, quantities: list[int], expected: str) -> None:
    events = [event(NOV + i, q, f"e{i}") for i, q in enumerate(quantities)]
    assert total(rate(PriceBook([price]), events)) == Decimal(expected)


def test_flat_fee_is_charged_with_the_event_that_enters_the_tier() -> None:
    events = [
        event(NOV + 10, 60, "a"),
        event(NOV + DAY + 10, 60, "b"),
        event(NOV + 2 * DAY + 10, 60, "c"),
    ]
    fees = [c for c in rate(PriceBook([GRADUATED]), events) if c.flat_fee]
    assert [(c.event.id, c.amount, c.tier) for c in fees] == [("b", Decimal("1.00"), 1)]
    fees = [c for c in rate(PriceBook([VOLUME]), events) if c.flat_fee]
    # The total (180) reaches tier 2, first entered by event "b" (units 61..120).
    assert [(c.event.id, c.amount) for c in fees] == [("b", Decimal("2"))]


def test_tiers_restart_each_billing_period() -> None:
    events = [event(NOV + 5, 100, "nov"), event(DEC + 5, 1, "dec")]
    charges = rate(PriceBook([GRADUATED]), events)
    assert [(c.event.id, c.tier) for c in charges] == [("nov", 0), ("dec", 0)]
    daily = BillingCycle("daily").period_at
    charges = rate(
        PriceBook([GRADUATED]), [event(NOV + 5, 100, "a"), event(NOV + DAY, 1, "b")], daily
    )
    assert total(charges) == Decimal("10.10")


def test_tiers_count_per_organization() -> None:
    events = [event(NOV + 1, 100, "a"), Event("b", "tokens", "org_2", NOV + 2, {"tokens": 1})]
    assert total(rate(PriceBook([GRADUATED]), events)) == Decimal("10.10")


def test_units_of_one_second_are_ordered_by_event_id() -> None:
    events = [event(NOV, 1, "b"), event(NOV, 100, "a")]
    charges = rate(PriceBook([GRADUATED]), events)
    # "a" comes first: its 100 units fill tier 1, so "b" enters tier 2 and pays the fee.
    assert [(c.event.id, c.tier, c.flat_fee) for c in charges] == [
        ("a", 0, False),
        ("b", 1, True),
        ("b", 1, False),
    ]


# -- versions --------------------------------------------------------------------------------


NOON = NOV + 12 * 3600


def test_versions_switch_mid_day_to_the_second() -> None:
    v1 = tokens_price(unit_price="1.00")
    v2 = tokens_price(unit_price="2.00", effective_from=NOON)
    book = PriceBook([v2, v1])
    assert book.match("tokens", "tokens", {}, NOON - 1) == v1
    assert book.match("tokens", "tokens", {}, NOON) == v2
    assert book.match("tokens", "tokens", {}, DEC) == v2
    m = Meter("memory://")
    for i, (t, q) in enumerate([(NOON - 1, 3), (NOON, 5), (NOON + 3600, 7), (NOV + 1, 11)]):
        m.record("tokens", {"tokens": q}, organization_id="org_1", time=t, id=f"e{i}")
    page = costs_page(
        m.store,
        m.meters,
        book,
        organization_id="org_1",
        start_time=NOV,
        end_time=NOV + DAY,
        secret=b"k",
    )
    (bucket,) = page.data
    # (3 + 11) at 1.00, then (5 + 7) at 2.00: one day bucket holding both versions.
    assert [r.amount for r in bucket.results] == [Decimal("38.00")]


def test_no_price_before_the_first_version() -> None:
    book = PriceBook([tokens_price(unit_price="1", effective_from=NOON)])
    assert book.match("tokens", "tokens", {}, NOON - 1) is None


def test_tier_counting_runs_across_versions_of_a_line() -> None:
    v1 = tokens_price(tiers=[Tier(10, "1"), Tier(None, "0.5")], tier_mode="graduated")
    v2 = tokens_price(
        tiers=[Tier(10, "2"), Tier(None, "0.25")], tier_mode="graduated", effective_from=NOON
    )
    events = [event(NOON - 5, 8, "a"), event(NOON + 5, 4, "b")]
    # a: 8 units of tier 1 at v1 (8); b: 2 more of tier 1 and 2 of tier 2, at v2 (4 + 0.5).
    assert total(rate(PriceBook([v1, v2]), events)) == Decimal("12.50")


# -- matching --------------------------------------------------------------------------------


def completions_price(unit_price: str, where: dict[str, Any], **kw: Any) -> Price:
    return Price(
        "completions",
        "input_tokens",
        unit_price,
        line_item=f"in {unit_price}",
        quantity_unit="tokens",
        where=where,
        **kw,
    )


def test_most_specific_match_wins() -> None:
    base = completions_price("1", {})
    model = completions_price("2", {"model": "gpt-4o"})
    batch = completions_price("3", {"model": "gpt-4o", "batch": True})
    book = PriceBook([base, batch, model], SPECS)
    match = book.match
    assert match("completions", "input_tokens", {"model": "gpt-4o", "batch": True}, 0) == batch
    assert match("completions", "input_tokens", {"model": "gpt-4o", "batch": False}, 0) == model
    assert match("completions", "input_tokens", {"model": "gpt-4o"}, 0) == model
    assert match("completions", "input_tokens", {"model": "gpt-5", "batch": True}, 0) == base
    assert match("completions", "input_tokens", {}, 0) == base
    assert match("completions", "output_tokens", {"model": "gpt-4o"}, 0) is None
    assert match("embeddings", "input_tokens", {"model": "gpt-4o"}, 0) is None


def test_a_line_not_yet_in_effect_falls_back_to_a_broader_one() -> None:
    base = completions_price("1", {})
    later = completions_price("2", {"model": "gpt-4o"}, effective_from=NOON)
    book = PriceBook([base, later])
    assert book.match("completions", "input_tokens", {"model": "gpt-4o"}, NOON - 1) == base
    assert book.match("completions", "input_tokens", {"model": "gpt-4o"}, NOON) == later


def test_equally_specific_lines_tie_break_on_their_where_not_on_order() -> None:
    by_model = completions_price("2", {"model": "gpt-4o"})
    by_project = completions_price("3", {"project_id": "p1"})
    dims = {"model": "gpt-4o", "project_id": "p1"}
    for prices in ([by_model, by_project], [by_project, by_model]):
        # Documented: the where whose sorted [name, value] JSON sorts first ("model" < "project").
        assert PriceBook(prices).match("completions", "input_tokens", dims, 0) == by_model
    assert (
        PriceBook([by_project, by_model]).match(
            "completions", "input_tokens", {"project_id": "p1"}, 0
        )
        == by_project
    )


def test_a_bool_where_does_not_match_a_string() -> None:
    book = PriceBook([completions_price("3", {"batch": True})])
    assert book.match("completions", "input_tokens", {"batch": "True"}, 0) is None
    assert book.match("completions", "input_tokens", {"batch": True}, 0) is not None


# -- ids and the wire format -----------------------------------------------------------------


def test_ids_derive_from_line_and_start() -> None:
    a = completions_price("1", {"model": "x", "batch": True})
    b = completions_price("9", {"batch": True, "model": "x"})
    assert a.id == b.id and a.id.startswith("price_")
    assert completions_price("1", {"model": "x", "batch": True}, effective_from=5).id != a.id
    assert completions_price("1", {"model": "y", "batch": True}).id != a.id
    assert completions_price("1", {}, id="custom").id == "custom"
    # Hashable although ``where`` is a dict; equal prices hash alike.
    assert len({a, completions_price("1", {"batch": True, "model": "x"}), b}) == 2


def test_round_trip_keeps_decimals_as_strings() -> None:
    price = tokens_price(
        per=1000,
        where={"model": "m"},
        effective_from=NOV,
        tiers=[Tier(10, "0.10", "1.5"), Tier(None, "0.0500")],
        tier_mode="volume",
    )
    data = price_to_dict(price)
    assert data["tiers"][1] == {"up_to": None, "unit_price": "0.0500", "flat_fee": "0"}
    assert data["unit_price"] is None
    assert price_from_dict(data) == price


def test_config_tables_convert() -> None:
    # What a TOML [[prices]] table parses to: a string price and an aware datetime.
    table = {
        "meter": "completions",
        "measure": "input_tokens",
        "where": {"model": "gpt-4o"},
        "unit_price": "2.50",
        "per": 1000000,
        "currency": "USD",
        "line_item": "gpt-4o, input",
        "quantity_unit": "tokens",
        "effective_from": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    }
    price = price_from_dict(table)
    assert price.unit_price == Decimal("2.50") and price.currency == "usd"
    assert price.effective_from == ts(2024, 1, 1)


# -- validation ------------------------------------------------------------------------------


GOOD: dict[str, Any] = {
    "meter": "completions",
    "measure": "input_tokens",
    "unit_price": "1",
    "line_item": "x",
    "quantity_unit": "tokens",
}
TIERS = [{"up_to": 10, "unit_price": "1"}, {"up_to": None, "unit_price": "0.5"}]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"unit_price": 2.5}, "unit_price"),
        ({"unit_price": "-1"}, "unit_price"),
        ({"unit_price": "abc"}, "unit_price"),
        ({"unit_price": "NaN"}, "unit_price"),
        ({"unit_price": True}, "unit_price"),
        ({"unit_price": "1e-40"}, "unit_price"),
        ({"unit_price": None}, "unit_price"),
        ({"per": 0}, "per"),
        ({"per": 1.0}, "per"),
        ({"currency": "dollars"}, "currency"),
        ({"line_item": ""}, "line_item"),
        ({"effective_from": dt.datetime(2024, 1, 1)}, "effective_from"),
        ({"where": {"model": 4}}, "where.model"),
        ({"tier_mode": "volume"}, "tier_mode"),
        ({"unit_price": None, "tiers": TIERS}, "tier_mode"),
        ({"tiers": TIERS, "tier_mode": "graduated"}, "unit_price"),
        ({"unit_price": None, "tier_mode": "stairs", "tiers": TIERS}, "tier_mode"),
        (
            {
                "unit_price": None,
                "tier_mode": "volume",
                "tiers": [{"up_to": 10, "unit_price": "1"}, {"up_to": 20, "unit_price": "1"}],
            },
            "tiers",
        ),
        (
            {
                "unit_price": None,
                "tier_mode": "volume",
                "tiers": [
                    {"up_to": 10, "unit_price": "1"},
                    {"up_to": 10, "unit_price": "1"},
                    {"up_to": None, "unit_price": "1"},
                ],
            },
            "tiers[1].up_to",
        ),
        (
            {
                "unit_price": None,
                "tier_mode": "volume",
                "tiers": [{"up_to": None, "unit_price": "1"}, {"up_to": None, "unit_price": "1"}],
            },
            "tiers[0].up_to",
        ),
        (
            {
                "unit_price": None,
                "tier_mode": "volume",
                "tiers": [{"up_to": 0, "unit_price": "1"}, {"up_to": None, "unit_price": "1"}],
            },
            "tiers[0].up_to",
        ),
        (
            {
                "unit_price": None,
                "tier_mode": "volume",
                "tiers": [{"up_to": 5, "unit_price": 0.5}, {"up_to": None, "unit_price": "1"}],
            },
            "tiers[0].unit_price",
        ),
        (
            {
                "unit_price": None,
                "tier_mode": "volume",
                "tiers": [
                    {"up_to": 5, "unit_price": "1"},
                    {"up_to": None, "unit_price": "1", "flat_fee": "-2"},
                ],
            },
            "tiers[1].flat_fee",
        ),
        ({"colour": "red"}, "colour"),
        ({"id": " padded "}, "id"),
    ],
)
def test_bad_prices_name_the_field(change: dict[str, Any], field: str) -> None:
    data = {**GOOD, **change}
    data = {k: v for k, v in data.items() if not (k == "unit_price" and v is None)}
    with pytest.raises(ValidationError) as info:
        price_from_dict(data)
    assert info.value.field == field


def test_missing_required_fields() -> None:
    for name in ("meter", "measure", "line_item", "quantity_unit"):
        with pytest.raises(ValidationError) as info:
            price_from_dict({k: v for k, v in GOOD.items() if k != name})
        assert info.value.field == name


def test_a_float_is_refused_even_when_it_looks_exact() -> None:
    with pytest.raises(ValidationError, match="inexact"):
        Tier(None, 0.5)
    assert Tier(None, 2).unit_price == Decimal(2)  # ints are exact


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"meter": "nope"}, "meter"),
        ({"measure": "nope"}, "measure"),
        # A gauge is priced over time, never in tiers.
        (
            {
                "meter": "vector_stores",
                "measure": "usage_bytes",
                "unit_price": None,
                "tiers": [{"up_to": None, "unit_price": "1"}],
                "tier_mode": "graduated",
            },
            "tiers",
        ),
        ({"where": {"colour": "red"}}, "where.colour"),
        ({"where": {"batch": "yes"}}, "where.batch"),
        ({"meter": "images", "measure": "images", "where": {"size": "3x3"}}, "where.size"),
    ],
)
def test_prices_are_checked_against_the_meters(change: dict[str, Any], field: str) -> None:
    price = price_from_dict({**GOOD, **change})
    with pytest.raises(ValidationError) as info:
        PriceBook([price], SPECS)
    assert info.value.field == field
    with pytest.raises(ValidationError):
        save_price(Meter("memory://").store, price, specs=SPECS)
    with pytest.raises(ValidationError) as info:
        price_from_dict({**GOOD, **change}, SPECS)
    assert info.value.field == field


def test_two_versions_with_one_start_are_refused() -> None:
    a = completions_price("1", {}, id="a")
    b = completions_price("2", {}, id="b")
    with pytest.raises(ValidationError) as info:
        PriceBook([a, b])
    assert info.value.field == "effective_from"
    assert list(PriceBook([a]).with_price(b)) == [b]


# -- persistence -----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def meter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Meter]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'p.db'}"
    m = Meter(url)
    yield m
    m.close()


def test_prices_persist_in_the_store(meter: Meter, tmp_path: Path) -> None:
    v1 = completions_price("2.50", {"model": "gpt-4o"}, per=1_000_000)
    v2 = completions_price("1.25", {"model": "gpt-4o"}, per=1_000_000, effective_from=NOV)
    tiers = tokens_price(tiers=[Tier(5, "0.1", "3"), Tier(None, "0")], tier_mode="graduated")
    for price in (v1, v2, tiers):
        assert save_price(meter.store, price, specs=meter.meters) == price
    record = meter.store.get_record("price", v1.id)
    assert record is not None and record["unit_price"] == "2.50"
    book = load_book(meter.store, meter.meters)
    assert sorted(book, key=lambda p: p.id) == sorted([v1, v2, tiers], key=lambda p: p.id)
    assert book.match("completions", "input_tokens", {"model": "gpt-4o"}, NOV) == v2

    # The same line and start under another id replaces the stored version.
    again = completions_price("9", {"model": "gpt-4o"}, per=1_000_000, id="renamed")
    save_price(meter.store, again, specs=meter.meters)
    book = load_book(meter.store)
    assert {p.id for p in book} == {"renamed", v2.id, tiers.id}
    assert delete_price(meter.store, "renamed")
    assert not delete_price(meter.store, "renamed")
    assert len(load_book(meter.store)) == 2

    if meter.url.startswith("sqlite"):
        meter.close()
        reopened = Meter(meter.url)
        assert {p.id for p in load_book(reopened.store)} == {v2.id, tiers.id}
        reopened.close()
