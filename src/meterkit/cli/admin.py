"""The organization's book and the store: ``meterkit plans``, ``metrics``, ``spend-cap``,
``prices``, ``doctor`` and ``completion``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import click

from meterkit.cli.common import BadInput, reported
from meterkit.cli.options import (
    FORMATS,
    data_store_options,
    emit,
    fields_named,
    iso,
    meter_for,
    parse_pairs,
    parse_time,
)
from meterkit.errors import ValidationError
from meterkit.meter import Meter
from meterkit.periods import BillingCycle
from meterkit.planmetrics import Metric
from meterkit.plans import UNLIMITED, Plan
from meterkit.pricing import price_to_dict
from meterkit.recovery import counted_organizations, counter_differences
from meterkit.stores.base import RollupStore

__all__ = [
    "completion",
    "doctor",
    "metrics",
    "metrics_list",
    "metrics_set",
    "plans",
    "plans_assign",
    "plans_list",
    "plans_set",
    "plans_show",
    "prices",
    "prices_list",
    "prices_set",
    "spend_cap",
]


@click.group("plans")
def plans() -> None:
    """List, show, create or change plans, and put organizations on them."""


@plans.command("list")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@data_store_options
def plans_list(fmt: str, config: Path | None, db: str | None) -> None:
    """Every plan."""
    m = meter_for(config, db, existing=True)
    try:
        found = m.quotas.plans()
    finally:
        m.close()
    if fmt == "json":
        click.echo(json.dumps([{"id": p.id, **p.to_record()} for p in found], indent=2))
        return
    rows = [
        [
            p.id,
            p.name,
            p.billing_cycle.kind,
            ", ".join(f"{k}={v}" for k, v in sorted(p.limits.items())),
            p.rate_limit_rpm,
            p.rate_limit_per_day,
        ]
        for p in found
    ]
    emit(["id", "name", "cycle", "limits", "rpm", "per day"], rows, fmt, numeric={"rpm", "per day"})


@plans.command("show")
@click.argument("plan_id", metavar="PLAN")
@data_store_options
def plans_show(plan_id: str, config: Path | None, db: str | None) -> None:
    """One plan, as JSON."""
    m = meter_for(config, db, existing=True)
    try:
        plan = m.quotas.get_plan(plan_id)
    finally:
        m.close()
    if plan is None:
        raise BadInput(f"PLAN: no plan {plan_id!r}")
    click.echo(json.dumps({"id": plan_id, **plan.to_record()}, indent=2))


@plans.command("set")
@click.argument("plan_id", metavar="PLAN")
@click.option("--name", default=None, help="A display name.")
@click.option("--limit", "limits", multiple=True, metavar="METRIC=N", help="-1: unlimited.")
@click.option("--rpm", type=int, default=None, help="Requests per minute.")
@click.option("--per-day", type=int, default=None, help="Requests per day.")
@click.option("--billing-cycle", type=click.Choice(["monthly", "daily"]), default=None)
@click.option("--anchor-day", type=click.IntRange(1, 31), default=None)
@data_store_options
def plans_set(
    plan_id: str,
    name: str | None,
    limits: tuple[str, ...],
    rpm: int | None,
    per_day: int | None,
    billing_cycle: str | None,
    anchor_day: int | None,
    config: Path | None,
    db: str | None,
) -> None:
    """Create a plan, or change the given fields of one."""
    parsed = {}
    for metric, text in parse_pairs("--limit", limits):
        try:
            parsed[metric] = int(text)
        except ValueError:
            raise BadInput(f"--limit: {metric}={text!r} is not a whole number") from None
    m = meter_for(config, db, existing=False)
    try:
        old = m.quotas.get_plan(plan_id)
        fields = {
            "plan.id": "PLAN",
            "plan.name": "--name",
            "plan.limits": "--limit",
            "plan.rate_limit_rpm": "--rpm",
            "plan.rate_limit_per_day": "--per-day",
        }
        with reported(), fields_named({**fields, "plan": "PLAN"}):
            try:
                cycle = BillingCycle(
                    cast(Any, billing_cycle) or (old.billing_cycle.kind if old else "monthly"),
                    anchor_day or (old.billing_cycle.anchor_day if old else 1),
                )
            except ValidationError as exc:
                raise BadInput(f"--billing-cycle: {exc.message}") from None
            plan = Plan(
                plan_id,
                name if name is not None else (old.name if old else ""),
                cycle,
                {**(dict(old.limits) if old else {}), **parsed},
                rpm if rpm is not None else (old.rate_limit_rpm if old else UNLIMITED),
                per_day if per_day is not None else (old.rate_limit_per_day if old else UNLIMITED),
                old.credits_per_seat if old else None,
            )
            m.set_plan(plan)
    finally:
        m.close()
    click.echo(f"plan {plan_id} saved")


@plans.command("assign")
@click.argument("organization_id", metavar="ORG")
@click.argument("plan_id", metavar="PLAN")
@click.option("--seats", type=click.IntRange(0), default=1, show_default=True)
@data_store_options
def plans_assign(
    organization_id: str, plan_id: str, seats: int, config: Path | None, db: str | None
) -> None:
    """Put an organization on a plan."""
    m = meter_for(config, db, existing=True)
    try:
        if m.quotas.get_plan(plan_id) is None:
            raise BadInput(f"PLAN: no plan {plan_id!r}")
        with (
            reported(),
            fields_named({"organization_id": "ORG", "plan": "PLAN", "seats": "--seats"}),
        ):
            m.assign_plan(organization_id, plan_id, seats=seats)
    finally:
        m.close()
    click.echo(f"{organization_id} is on plan {plan_id}")


@click.group("metrics")
def metrics() -> None:
    """List or define plan metrics: what a plan's limit on them counts."""


@metrics.command("list")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@data_store_options
def metrics_list(fmt: str, config: Path | None, db: str | None) -> None:
    """Every metric a plan may limit: defined ones with their sources, and meters of their
    own name."""
    m = meter_for(config, db, existing=True)
    try:
        defined = {metric.name: metric for metric in m.defined_metrics()}
        names = m.quotas.metrics()
        gauges = {name for name in names if m.quotas.is_gauge(name)}
    finally:
        m.close()
    if fmt == "json":
        out = []
        for name in names:
            found = defined.get(name)
            out.append(
                {
                    "name": name,
                    "kind": "gauge" if name in gauges else "counted",
                    **(found.to_record() if found else {"sources": []}),
                }
            )
        click.echo(json.dumps(out, indent=2))
        return
    rows = []
    for name in names:
        found = defined.get(name)
        sources = found.expression if found else ""
        where = ""
        if found:
            where = "; ".join(
                f"{s.meter}.{n} in {', '.join(sorted(map(str, allowed)))}"
                for s in found.sources
                for n, allowed in s.where
            )
        kind = "gauge" if name in gauges else "defined" if found else "meter"
        rows.append([name, kind, sources or f"{name}.{name}", where])
    emit(["metric", "kind", "counts", "where"], rows, fmt, numeric=set())


@metrics.command("set")
@click.argument("name", metavar="METRIC")
@click.option(
    "--sources",
    required=True,
    metavar="EXPR",
    help="What it counts: 'meter.measure + meter.measure ...'.",
)
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="DIM=VALUE",
    help="Count only events with this dimension value (repeat for more values).",
)
@data_store_options
def metrics_set(
    name: str, sources: str, where: tuple[str, ...], config: Path | None, db: str | None
) -> None:
    """Define a plan metric and store it: every process on the store counts it, and its
    counters of the current period are rebuilt from the events."""
    allowed: dict[str, list[str]] = {}
    for dim, value in parse_pairs("--where", where):
        allowed.setdefault(dim, []).append(value)
    m = meter_for(config, db, existing=False)
    try:
        with reported():
            try:
                metric = Metric.parse(name, sources, where=allowed or None)
                m.set_metric(metric)
            except ValidationError as exc:
                tail = exc.field.removeprefix("metric.")
                option = (
                    "METRIC"
                    if tail == "name"
                    else "--where"
                    if ".where" in tail or tail == "where"
                    else "--sources"
                )
                raise BadInput(f"{option} ({tail}): {exc.message}") from None
    finally:
        m.close()
    click.echo(f"metric {name} saved: {metric.expression}")


@click.command("spend-cap")
@click.argument("organization_id", metavar="ORG")
@click.option("--cents", type=int, default=None, help="Set the cap, in cents per UTC month.")
@click.option("--delete", "delete", is_flag=True, help="Remove the cap.")
@data_store_options
def spend_cap(
    organization_id: str, cents: int | None, delete: bool, config: Path | None, db: str | None
) -> None:
    """Show, set or remove the operator's cap on an organization's spend: its own limit (set
    with its admin key) may be lower, never higher."""
    if cents is not None and delete:
        raise BadInput("--cents and --delete: give one")
    m = meter_for(config, db, existing=cents is None)
    try:
        with reported(), fields_named({"organization_id": "ORG", "threshold_amount": "--cents"}):
            if delete:
                found = m.delete_spend_cap(organization_id)
                click.echo(
                    f"{organization_id}: cap removed" if found else f"{organization_id}: no cap"
                )
                return
            if cents is not None:
                m.set_spend_cap(organization_id, cents)
            cap = m.spend_cap(organization_id)
            state = m.spend(organization_id)
    finally:
        m.close()
    limit = state.limit.threshold_amount if state.limit else None
    click.echo(
        f"{organization_id}: cap {'none' if cap is None else f'{cap} cents'}; "
        f"limit in force {'none' if limit is None else f'{limit} cents'}; "
        f"spent this month ${state.counted:.2f}"
    )


@click.group("prices")
def prices() -> None:
    """List or set prices."""


@prices.command("list")
@click.option("--meter", default=None, help="Only this meter's prices.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@data_store_options
def prices_list(meter: str | None, fmt: str, config: Path | None, db: str | None) -> None:
    """Every price version."""
    m = meter_for(config, db, existing=True)
    try:
        with reported():
            book = list(m.prices())
    finally:
        m.close()
    found = [p for p in book if meter is None or p.meter == meter]
    if fmt == "json":
        click.echo(json.dumps([price_to_dict(p) for p in found], indent=2))
        return
    rows = [
        [
            p.meter,
            p.measure,
            json.dumps(dict(p.where)) if p.where else "",
            p.unit_price if p.unit_price is not None else "tiered",
            p.per,
            p.currency,
            p.line_item,
            p.quantity_unit,
            iso(p.effective_from),
        ]
        for p in found
    ]
    header = [
        "meter",
        "measure",
        "where",
        "unit_price",
        "per",
        "currency",
        "line_item",
        "unit",
        "from",
    ]
    emit(header, rows, fmt, numeric={"unit_price", "per"})


@prices.command("set")
@click.option("--meter", required=True)
@click.option("--measure", required=True)
@click.option("--unit-price", required=True, help="A decimal: the price of --per units.")
@click.option("--per", type=int, default=1, show_default=True)
@click.option("--quantity-per", type=int, default=1, show_default=True)
@click.option("--currency", default="usd", show_default=True)
@click.option("--line-item", required=True)
@click.option("--quantity-unit", required=True)
@click.option("--where", "where", multiple=True, metavar="DIM=VALUE")
@click.option("--effective-from", metavar="T", default=None, help="Default: always.")
@data_store_options
def prices_set(
    meter: str,
    measure: str,
    unit_price: str,
    per: int,
    quantity_per: int,
    currency: str,
    line_item: str,
    quantity_unit: str,
    where: tuple[str, ...],
    effective_from: str | None,
    config: Path | None,
    db: str | None,
) -> None:
    """Add or replace a price version."""
    m = meter_for(config, db, existing=False)
    try:
        spec = m.meters.get(meter)
        conditions: dict[str, Any] = {}
        for name, text in parse_pairs("--where", where):
            dim = spec.dimension(name) if spec else None
            conditions[name] = (text.lower() == "true") if dim and dim.kind == "bool" else text
        names = {
            "meter": "--meter",
            "measure": "--measure",
            "unit_price": "--unit-price",
            "per": "--per",
            "quantity_per": "--quantity-per",
            "currency": "--currency",
            "line_item": "--line-item",
            "quantity_unit": "--quantity-unit",
            "where": "--where",
            "effective_from": "--effective-from",
            "tiers": "--measure",
        }
        with reported(), fields_named(names):
            saved = m.set_price(
                {
                    "meter": meter,
                    "measure": measure,
                    "unit_price": unit_price,
                    "per": per,
                    "quantity_per": quantity_per,
                    "currency": currency,
                    "line_item": line_item,
                    "quantity_unit": quantity_unit,
                    "where": conditions,
                    "effective_from": parse_time("--effective-from", effective_from) or 0,
                }
            )
    finally:
        m.close()
    click.echo(f"price {saved.id} saved")


@click.command("doctor")
@data_store_options
def doctor(config: Path | None, db: str | None) -> None:
    """Check the store: it answers, its schema, rollups and quota counters against the events.

    Exits 1 when something is wrong."""
    before = _schema_before(db) if db else None
    m = meter_for(config, db, existing=True)
    problems = 0

    def say(ok: bool, text: str) -> None:
        nonlocal problems
        problems += not ok
        click.echo(f"{'ok  ' if ok else 'FAIL'}  {text}")

    try:
        with reported():
            started = time.perf_counter()
            m.quotas.plans()
            say(True, f"{m.store.url}: answers ({(time.perf_counter() - started) * 1000:.1f} ms)")
            for line, ok in _schema(m, before):
                say(ok, line)
            if isinstance(m.store, RollupStore):
                differences = m.verify_rollups()
                for text in differences[:20]:
                    say(False, f"rollup {text}")
                if differences:
                    click.echo(f"      {len(differences)} in all: `meterkit rollups rebuild`")
                else:
                    say(True, "rollups agree with the events")
            else:
                say(True, "this store keeps no rollups")
            for line, ok in _plan_metrics(m):
                say(ok, line)
            for line, ok in _counters(m):
                say(ok, line)
    finally:
        m.close()
    if problems:
        raise SystemExit(1)


def _schema_before(url: str) -> int | None:
    """A SQLite file's schema version read before the store is opened (opening migrates)."""
    if not url.startswith("sqlite:///"):
        return None
    import sqlite3

    from meterkit.stores.sqlite import path_from_url

    path = path_from_url(url)
    if path == ":memory:" or not Path(path).exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM mk_meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()
    return int(row[0]) if row else 1


def _schema(m: Meter, before: int | None) -> Iterator[tuple[str, bool]]:
    store = m.store
    if type(store).__name__ == "SQLiteStore":
        from meterkit.stores.sqlite import SCHEMA_VERSION

        found = before if before is not None else SCHEMA_VERSION
        yield f"schema version {found} (this meterkit: {SCHEMA_VERSION})", True
        if found < SCHEMA_VERSION:
            yield f"{SCHEMA_VERSION - found} migration(s) were pending: applied on opening", True
    elif type(store).__name__ == "PostgresStore":
        from meterkit.stores.postgres import MIGRATIONS

        latest = MIGRATIONS[-1][0]
        yield f"schema migrations through version {latest} applied", True
    else:
        yield "schema: this store keeps none (it lives in memory)", True


def _plan_metrics(m: Meter) -> Iterator[tuple[str, bool]]:
    """Every limit of every plan names a metric something counts."""
    defined = m.defined_metrics()
    if defined:
        shown = ", ".join(f"{x.name} = {x.expression}" for x in defined)
        yield f"plan metrics stored: {shown}", True
    known = set(m.quotas.metrics())
    for plan in m.quotas.plans():
        for metric in sorted(plan.limits):
            if metric not in known:
                yield (
                    f"plan {plan.id} limits {metric!r}, which nothing counts "
                    f"(`meterkit metrics set {metric} --sources ...`)",
                    False,
                )


def _counters(m: Meter) -> Iterator[tuple[str, bool]]:
    orgs = counted_organizations(m)
    wrong = []
    for org in orgs:
        for metric, (want, got) in counter_differences(m, org).items():
            wrong.append(f"{org} {metric}: counted {got:,}, the events give {want:,}")
    for line in wrong[:20]:
        yield f"quota counter {line} (meterkit's rebuild_counters fixes it)", False
    if not wrong:
        yield f"quota counters agree with the events ({len(orgs)} organizations)", True


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script: `eval "$(meterkit completion bash)"`."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    root = ctx.find_root().command
    click.echo(cls(root, {}, "meterkit", "_METERKIT_COMPLETE").source())
