"""Reading usage (``meterkit usage``, ``costs``, ``quota``, ``top``)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from meterkit import overview
from meterkit.cli.common import BadInput, reported
from meterkit.cli.options import (
    FORMATS,
    data_store_options,
    emit,
    fields_named,
    iso,
    meter_for,
    parse_time,
)
from meterkit.http.openai import FILTERS
from meterkit.models import UsagePage
from meterkit.plans import UNLIMITED

__all__ = ["costs", "quota", "top", "usage"]


def _filter_options(func: Any) -> Any:
    for name, spec in reversed(list(FILTERS.items())):
        flag = "--" + name.replace("_", "-")
        if spec.boolean:
            func = click.option(
                f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=spec.description
            )(func)
        else:
            func = click.option(flag, name, multiple=True, help=spec.description)(func)
    return func


def _query_options(func: Any) -> Any:
    func = click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True
    )(func)
    func = click.option("--page", default=None, help="The next_page cursor of a page.")(func)
    func = click.option("--limit", type=click.IntRange(1), default=None, help="Buckets per page.")(
        func
    )
    func = click.option("--group-by", "group_by", multiple=True, help="A field to group by.")(func)
    func = click.option("--end-time", metavar="T", help="End (exclusive; default: now).")(func)
    func = click.option("--start-time", metavar="T", required=True, help="Start (inclusive).")(func)
    func = click.option("--org", "organization_id", required=True, help="The organization.")(func)
    return func


def _filters(given: Mapping[str, Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, value in given.items():
        spec = FILTERS[name]
        if spec.boolean:
            if value is not None:
                out[spec.dimension] = [True] if value else [False, None]
        elif value:
            out[spec.dimension] = list(value)
    return out


_QUERY_FIELDS = {
    "start_time": "--start-time",
    "end_time": "--end-time",
    "group_by": "--group-by",
    "limit": "--limit",
    "page": "--page",
    "bucket_width": "--bucket-width",
    "organization_id": "--org",
    "filters": "a filter",
}


@click.command("usage")
@click.argument("kind")
@_query_options
@click.option(
    "--bucket-width", type=click.Choice(["1m", "1h", "1d"]), default="1d", show_default=True
)
@click.option(
    "--measures",
    "measures",
    multiple=True,
    metavar="M[,M...]",
    help="Measures to show in a table or CSV (default: those with values on the page).",
)
@_filter_options
@data_store_options
def usage(
    kind: str,
    organization_id: str,
    start_time: str,
    end_time: str | None,
    group_by: tuple[str, ...],
    limit: int | None,
    page: str | None,
    fmt: str,
    bucket_width: str,
    measures: tuple[str, ...],
    config: Path | None,
    db: str | None,
    **filter_values: Any,
) -> None:
    """One page of usage of a meter (an OpenAI usage kind or your own), as the API answers."""
    m = meter_for(config, db, existing=True)
    try:
        if kind not in m.meters:
            raise BadInput(f"KIND: unknown meter {kind!r} (known: {', '.join(sorted(m.meters))})")
        filters = _filters(filter_values)
        spec = m.meters[kind]
        shown = [name for given in measures for name in given.split(",") if name]
        for name in shown:
            if name not in spec.measure_names:
                raise BadInput(
                    f"--measures: {kind} has no measure {name!r} "
                    f"(known: {', '.join(spec.measure_names)})"
                )
        for dim in filters:
            if spec.dimension(dim) is None:
                raise BadInput(f"a filter: {kind} has no dimension {dim!r}")
        with reported(), fields_named(_QUERY_FIELDS):
            result = m.usage(
                kind,
                organization_id=organization_id,
                start_time=parse_time("--start-time", start_time),
                end_time=parse_time("--end-time", end_time),
                bucket_width=bucket_width,
                group_by=list(group_by) or None,
                filters=filters or None,
                limit=limit,
                page=page,
            )
        _print_usage(result, shown or _with_values(result, spec.measure_names), list(group_by), fmt)
    finally:
        m.close()


@click.command("costs")
@_query_options
@click.option("--project-ids", "project_ids", multiple=True, help="Only these projects.")
@click.option("--api-key-ids", "api_key_ids", multiple=True, help="Only these API keys.")
@click.option("--line-items", "line_items", multiple=True, help="Only these line items.")
@data_store_options
def costs(
    organization_id: str,
    start_time: str,
    end_time: str | None,
    group_by: tuple[str, ...],
    limit: int | None,
    page: str | None,
    fmt: str,
    project_ids: tuple[str, ...],
    api_key_ids: tuple[str, ...],
    line_items: tuple[str, ...],
    config: Path | None,
    db: str | None,
) -> None:
    """One page of daily costs, as the API's costs endpoint answers."""
    filters = {
        dim: list(values)
        for dim, values in (
            ("project_id", project_ids),
            ("api_key_id", api_key_ids),
            ("line_item", line_items),
        )
        if values
    }
    m = meter_for(config, db, existing=True)
    try:
        with reported(), fields_named(_QUERY_FIELDS):
            result = m.costs(
                organization_id=organization_id,
                start_time=parse_time("--start-time", start_time),
                end_time=parse_time("--end-time", end_time),
                group_by=list(group_by) or None,
                filters=filters or None,
                limit=limit,
                page=page,
            )
        data = result.to_dict()
        if fmt == "json":
            click.echo(json.dumps(data, indent=2))
            return
        header = ["start_time", *group_by, "amount", "currency"]
        if "line_item" in group_by:
            header += ["quantity", "quantity_unit"]
        rows = []
        for bucket in result.data:
            for r in bucket.results:
                row: list[Any] = [iso(bucket.start_time)]
                row += [getattr(r, g) for g in group_by]
                row += [r.amount, r.currency]
                if "line_item" in group_by:
                    row += [r.quantity, r.quantity_unit]
                rows.append(row)
        emit(header, rows, fmt, numeric={"amount", "quantity"}, more=result.next_page)
    finally:
        m.close()


def _with_values(page: UsagePage, measures: Sequence[str]) -> list[str]:
    """The measures with a value other than zero on the page (the first one if none has):
    a meter of many measures stays a readable table."""
    found = {
        name for bucket in page.data for r in bucket.results for name, v in r.values.items() if v
    }
    return [name for name in measures if name in found] or list(measures[:1])


def _print_usage(page: UsagePage, measures: Sequence[str], group_by: list[str], fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(page.to_dict(), indent=2))
        return
    header = ["start_time", *group_by, *measures]
    rows: list[list[Any]] = []
    for bucket in page.data:
        for r in bucket.results:
            rows.append(
                [iso(bucket.start_time), *(r.group.get(g) for g in group_by)]
                + [r.values.get(m) for m in measures]
            )
    emit(header, rows, fmt, numeric=set(measures), more=page.next_page)


@click.command("quota")
@click.argument("organization_id", metavar="ORG")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@data_store_options
def quota(organization_id: str, fmt: str, config: Path | None, db: str | None) -> None:
    """Every limit of an organization: used, limit, remaining, when it resets.

    `--format json` is what `GET /v1/organization/quota` answers."""
    m = meter_for(config, db, existing=True)
    try:
        with reported(), fields_named({"organization_id": "ORG"}):
            status = m.quota_status(organization_id)
    finally:
        m.close()
    if fmt == "json":
        click.echo(json.dumps(status, indent=2))
        return

    def amount(n: int) -> Any:
        return "unlimited" if n == UNLIMITED else n

    rows: list[list[Any]] = [
        [
            line["metric"],
            line["used"],
            amount(line["limit"]),
            amount(line["remaining"]),
            iso(line["reset_at"]) if line["reset_at"] else "never (a level)",
        ]
        for line in status["limits"]
    ]
    rows += [
        [f"requests per {r['window']}", None, r["limit"], None, None] for r in status["rate_limits"]
    ]
    spend = status["spend_limit"]
    if spend:
        rows.append(
            [
                f"spend ({spend['currency']})",
                spend["used"],
                spend["limit"],
                spend["remaining"],
                iso(spend["reset_at"]),
            ]
        )
    if not rows:
        click.echo(f"{organization_id} has no plan and no spend limit: nothing is limited")
        return
    emit(
        ["metric", "used", "limit", "remaining", "resets"],
        rows,
        "table",
        numeric={"used", "limit", "remaining"},
    )


_TOP_FIXED = ("cost", "spend", "spend_limit", "quota_used", "quota_metric", "plan", "organization")


@click.command("top")
@click.option(
    "--start-time", metavar="T", help="Start (inclusive; default: the 1st of this month)."
)
@click.option("--end-time", metavar="T", help="End (exclusive; default: now).")
@click.option(
    "--usage",
    "usage_columns",
    multiple=True,
    metavar="METER[.MEASURE]",
    help="A usage column (repeatable; default: each meter's main measure that has usage).",
)
@click.option(
    "--sort",
    default="cost",
    show_default=True,
    metavar="COLUMN",
    help="The column to sort by: cost, spend, spend_limit, quota_used, quota_metric, plan, "
    "organization or a usage column.",
)
@click.option("--ascending", is_flag=True, help="Smallest first (default: largest first).")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many rows.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@data_store_options
def top(
    start_time: str | None,
    end_time: str | None,
    usage_columns: tuple[str, ...],
    sort: str,
    ascending: bool,
    limit: int | None,
    fmt: str,
    config: Path | None,
    db: str | None,
) -> None:
    """Every organization side by side: usage and costs over a range, spend this month and
    the plan limit each is nearest to. Money is in dollars, exact."""
    m = meter_for(config, db, existing=True)
    try:
        now = m.now()
        start = parse_time("--start-time", start_time)
        end = parse_time("--end-time", end_time)
        if start is None:
            month = dt.datetime.fromtimestamp(now, dt.timezone.utc)
            start = int(month.replace(day=1, hour=0, minute=0, second=0).timestamp())
        end = now + 1 if end is None else end
        with reported(), fields_named({"end_time": "--end-time"}):
            specs = dict(m.meters)
            columns = [overview.UsageColumn.parse(specs, text) for text in usage_columns]
            known = [*_TOP_FIXED, *(c.name for c in columns)]
            if usage_columns and sort not in known:
                raise BadInput(f"--sort: no column {sort!r} (known: {', '.join(known)})")
            shown, lines = overview.organizations_overview(
                m, start_time=start, end_time=end, columns=columns or None
            )
    finally:
        m.close()
    names = [c.name for c in shown]
    if sort not in (*_TOP_FIXED, *names):
        raise BadInput(f"--sort: no column {sort!r} (known: {', '.join([*_TOP_FIXED, *names])})")

    def cell(line: overview.OrganizationLine) -> Any:
        if sort in names:
            return line.usage.get(sort)
        return getattr(line, "organization_id" if sort == "organization" else sort)

    ranked = sorted(lines, key=lambda line: line.organization_id)
    present = [line for line in ranked if cell(line) is not None]
    absent = [line for line in ranked if cell(line) is None]  # last either way
    present.sort(key=cell, reverse=not ascending)
    ranked = (present + absent)[:limit]
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "start_time": start,
                    "end_time": end,
                    "columns": names,
                    "data": [line.to_dict() for line in ranked],
                },
                indent=2,
            )
        )
        return
    header = ["organization", "plan", *names, "cost", "spend", "spend_limit", "quota_used",
              "quota_metric"]  # fmt: skip
    rows = [
        [
            line.organization_id,
            line.plan,
            *(line.usage.get(n) for n in names),
            line.cost,
            line.spend,
            line.spend_limit,
            _share(line.quota_used, fmt),
            line.quota_metric,
        ]
        for line in ranked
    ]
    emit(header, rows, fmt, numeric={*names, "cost", "spend", "spend_limit", "quota_used"})


def _share(value: float | None, fmt: str) -> Any:
    """A share of a limit: a percentage in a table, a fraction (4 places) in CSV."""
    if value is None:
        return None
    return f"{value:.1%}" if fmt == "table" else round(value, 4)
