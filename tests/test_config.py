"""The TOML configuration file: the documented keys work, and bad files change nothing."""

from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

import meterkit
from meterkit.config import load_config

ISSUE_EXAMPLE = """
store = "{store}"

[[prices]]
meter = "completions"
measure = "input_tokens"
where = {{ model = "gpt-4o" }}
unit_price = "2.50"
per = 1000000
currency = "usd"
line_item = "gpt-4o, input"
quantity_unit = "tokens"
effective_from = 2024-01-01T00:00:00Z

[plans.pro]
name = "Professional"
billing_cycle = "monthly"
rate_limit_rpm = 60
rate_limit_per_day = 10000
limits = {{ tokens = 100000, queries = -1, spaces = 5, credits = 50000, \
storage_bytes = 1073741824 }}

[organizations.org_1]
plan = "pro"
"""

NOV_1_2024 = 1730419200


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meterkit.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write(tmp_path, ISSUE_EXAMPLE.format(store=f"sqlite:///{tmp_path}/cfg.db"))


def test_issue_example_opens_and_applies(config_path: Path) -> None:
    with meterkit.Meter.from_config(config_path, clock=lambda: NOV_1_2024 + 3600) as m:
        assert m.url.endswith("cfg.db")
        _, plan = m.quotas.plan_of("org_1")
        assert plan is not None and plan.name == "Professional"
        assert plan.rate_limit_rpm == 60 and plan.rate_limit_per_day == 10000
        assert plan.limit("tokens") == 100000 and plan.limit("queries") == -1
        [price] = list(m.prices())
        assert price.unit_price == Decimal("2.50") and price.per == 1000000
        assert price.effective_from == 1704067200  # 2024-01-01T00:00:00Z
        m.record(
            "completions",
            {"input_tokens": 2_000_000},
            organization_id="org_1",
            time=NOV_1_2024,
            dimensions={"model": "gpt-4o"},
        )
        page = m.costs(organization_id="org_1", start_time=NOV_1_2024, limit=1)
        [result] = page.data[0].results
        assert result.amount == Decimal("5.00")  # 2M tokens at $2.50 per 1M


def test_reopening_the_same_config_is_idempotent(config_path: Path) -> None:
    for _ in range(2):
        with meterkit.Meter.from_config(config_path) as m:
            assert len(list(m.prices())) == 1
            assert [p.id for p in m.quotas.plans()] == ["pro"]


def test_url_override_replaces_store(config_path: Path) -> None:
    with meterkit.Meter.from_config(config_path, url="memory://") as m:
        assert m.url == "memory://"
        assert m.quotas.get_plan("pro") is not None


def test_counters_and_policy_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        store = "memory://"
        counters = "sqlite:///{tmp_path}/counters.db"
        policy = "open"
        default_plan = "free"
        thresholds = [0.5, 1.0]

        [plans.free]
        limits = {{ queries = 2 }}
    """,
    )
    with meterkit.Meter.from_config(path) as m:
        assert m.counters is not m.store and m.counters.url.endswith("counters.db")
        assert m.quotas.policy == "open" and m.quotas.thresholds == (0.5, 1.0)
        # default_plan applies to organizations without an assignment
        assert [m.check("anyone", {"queries": 1}).allowed for _ in range(3)] == [True, True, False]


def test_application_meters(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        store = "memory://"

        [[meters]]
        name = "reports"
        measures = [{ name = "pages" }, { name = "size", aggregation = "max" }]
        dimensions = [{ name = "project_id" }, { name = "draft", kind = "bool" }]
    """,
    )
    with meterkit.Meter.from_config(path) as m:
        spec = m.spec("reports")
        assert spec.measure_names == ("pages", "size")
        assert m.record(
            "reports",
            {"pages": 3, "size": 7},
            organization_id="o",
            time=NOV_1_2024,
            dimensions={"draft": True},
        )


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('store = "nowhere"', "store"),
        ('store = "memory://"\nsurprise = 1', "surprise"),
        ('store = "memory://"\npolicy = "sometimes"', "policy"),
        ('store = "memory://"\n[plans.pro]\nlimits = { tokens = -5 }', "plans.pro.limits.tokens"),
        ('store = "memory://"\n[plans.pro]\nbilling_cycle = "weekly"', "plans.pro.billing_cycle"),
        ('store = "memory://"\n[plans.pro]\nanchor_day = 32', "plans.pro.anchor_day"),
        ('store = "memory://"\n[plans.pro]\nrate_limit_rpm = "60"', "plans.pro.rate_limit_rpm"),
        ('store = "memory://"\n[plans.pro]\ncolour = "red"', "plans.pro.colour"),
        ('store = "memory://"\n[organizations.o]\nplan = "gold"', "organizations.o.plan"),
        ('store = "memory://"\ndefault_plan = "gold"', "default_plan"),
        ('store = "memory://"\nthresholds = [1.5]', "thresholds"),
        ('store = "memory://"\nleases = "yes"', "leases"),
        ('store = "memory://"\nlease_ttl = 1', "lease_ttl"),
        ('store = "memory://"\nflush_interval = 60', "flush_interval"),
        ('store = "memory://"\n[metrics.m]\nsources = "nodot"', "metrics.m.expression"),
        ('store = "memory://"\n[metrics.m]\nsum = "a.b"', "metrics.m.sum"),
        ("store = [", "config"),
    ],
)
def test_bad_files_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(meterkit.ValidationError) as info:
        load_config(write(tmp_path, text))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("price", "field"),
    [
        ('unit_price = "abc"', "prices[0].unit_price"),
        ("unit_price = 2.5", "prices[0].unit_price"),  # a float is inexact money
        ('unit_price = "1"\nper = 0', "prices[0].per"),
    ],
)
def test_bad_prices_write_nothing(tmp_path: Path, price: str, field: str) -> None:
    db = tmp_path / "bad.db"
    path = write(
        tmp_path,
        f"""
        store = "sqlite:///{db}"

        [plans.pro]
        limits = {{ tokens = 5 }}

        [organizations.org_1]
        plan = "pro"

        [[prices]]
        meter = "completions"
        measure = "input_tokens"
        line_item = "in"
        quantity_unit = "tokens"
        {price}
    """,
    )
    with pytest.raises(meterkit.ValidationError) as info:
        meterkit.Meter.from_config(path)
    assert info.value.field == field
    # Nothing from the file reached the store: plans and assignments are written only
    # after every price parsed.
    with meterkit.Meter(f"sqlite:///{db}") as m:
        assert m.quotas.plans() == []
        assert list(m.prices()) == []


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(meterkit.ValidationError) as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.field == "config"


def test_the_documented_example_loads_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # its store is a relative sqlite:///meterkit.db
    path = write(tmp_path, example)
    with meterkit.Meter.from_config(path) as m:
        assert {p.id for p in m.quotas.plans()} == {"free", "pro"}
        assert m.quotas.plan_of("org_1")[1] is not None
        assert m.quotas.plan_of("nobody")[1].id == "free"  # type: ignore[union-attr]
        assert "reports" in m.meters and len(list(m.prices())) == 1


def test_a_mistyped_plan_metric_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "typo.db"
    path = write(
        tmp_path,
        f"""
        store = "sqlite:///{db}"

        [plans.basic]
        limits = {{ tokens = 5 }}

        [plans.pro]
        limits = {{ tokens = 5, querys = 10 }}
    """,
    )
    with pytest.raises(meterkit.ValidationError) as info:
        meterkit.Meter.from_config(path)
    assert info.value.field == "plans.pro.limits.querys"
    assert "queries" in info.value.message and "tokens" in info.value.message
    with meterkit.Meter(f"sqlite:///{db}") as m:
        assert m.quotas.plans() == []
        with pytest.raises(meterkit.ValidationError) as caught:
            m.set_plan(meterkit.Plan("p", limits={"querys": 1}))
        assert caught.value.field == "limits.querys"
        assert m.quotas.plans() == []
        # An application's own meter makes its name a metric.
        m.register(meterkit.MeterSpec("widgets", [meterkit.Measure("widgets")]))
        m.set_plan(meterkit.Plan("p", limits={"widgets": 1}))


@pytest.mark.parametrize(
    "store",
    ["nosuch://x", "sqlite:///{tmp}/no/such/folder/x.db", "sqlite:///{tmp}/x.db?synchronous=bogus"],
)
def test_a_bad_store_url_is_reported_under_store(tmp_path: Path, store: str) -> None:
    path = write(tmp_path, f'store = "{store.format(tmp=tmp_path)}"\n')
    with pytest.raises(meterkit.ValidationError) as info:
        meterkit.Meter.from_config(path)
    assert info.value.field == "store"
    # An override is the caller's own argument, and named as such.
    with pytest.raises(meterkit.ValidationError) as info:
        meterkit.Meter.from_config(write(tmp_path, ""), url=store.format(tmp=tmp_path))
    assert info.value.field == "url"


def test_max_future_skew_key(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/skew.db"
    with meterkit.Meter.from_config(write(tmp_path, f'store = "{db}"\nmax_future_skew = 5\n')) as m:
        assert m.max_future_skew == 5
    with meterkit.Meter.from_config(
        write(tmp_path, f'store = "{db}"\nmax_future_skew = -1\n')
    ) as m:
        assert m.max_future_skew is None
    with pytest.raises(meterkit.ValidationError) as info:
        meterkit.Meter.from_config(write(tmp_path, f'store = "{db}"\nmax_future_skew = "5"\n'))
    assert info.value.field == "max_future_skew"


def test_leases_and_metrics_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        store = "sqlite:///{tmp_path}/l.db"
        leases = false
        lease_ttl = 60
        flush_interval = 0.2

        [metrics.llm]
        sources = "completions.input_tokens + completions.output_tokens"
        where = {{ model = ["gpt-4o"] }}

        [plans.p]
        limits = {{ llm = 100 }}

        [organizations.o]
        plan = "p"
        """,
    )
    with meterkit.Meter.from_config(path, clock=lambda: NOV_1_2024 + 60) as m:
        assert m.quotas.leases is None and m.flush_interval == 0.2
        m.record(
            "completions",
            {"input_tokens": 60, "output_tokens": 30},
            organization_id="o",
            dimensions={"model": "gpt-4o"},
        )
        m.record(
            "completions", {"input_tokens": 500}, organization_id="o", dimensions={"model": "x"}
        )
        assert m.quotas.used("o", "llm") == 90
        assert not m.check("o", {"llm": 11}).allowed


def test_a_metric_over_an_unknown_measure_names_its_table(tmp_path: Path) -> None:
    path = write(tmp_path, 'store = "memory://"\n[metrics.m]\nsources = "completions.nope"')
    with pytest.raises(meterkit.ValidationError) as info:
        meterkit.Meter.from_config(path)
    assert info.value.field == "metrics.m.sources[0].measure"
