"""The ``meterkit`` command: serve the HTTP endpoints, manage API keys, run a demo, and work
with the data (:mod:`meterkit.cli.data`).

``meterkit serve`` runs :func:`meterkit.asgi.create_app` under uvicorn; ``meterkit keys``
creates, lists and revokes API keys; ``meterkit demo`` fills a SQLite file with a month of
usage (:mod:`meterkit.cli.demo`), prints a key and calls to try, and serves. See docs/cli.md.

Bad input (a configuration file, a store URL, an organization id) exits with status 2 and a
one-line message naming the field at fault; a store that does not answer exits with 1.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import click

from meterkit.auth import DEFAULT_PREFIX, create_key, get_key, list_keys, revoke_key
from meterkit.cli.common import open_meter, reported, store_options
from meterkit.cli.data import COMMANDS
from meterkit.meter import DEFAULT_URL, Meter

__all__ = ["main"]

DAY = 86_400
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meterkit")
def main() -> None:
    """meterkit: usage metering, usage and costs APIs, quotas."""
    # A store that cannot be reached is one error line from the command, not the pool's own
    # warnings for every retry.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)


# -- serve ------------------------------------------------------------------------------------


def _url(host: str, port: int) -> str:
    """A URL a client on this machine can use (a wildcard address is reached on loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError:
        raise click.ClickException("serving needs uvicorn: pip install 'meterkit[asgi]'") from None
    return uvicorn


def _serve(
    meter: Meter,
    host: str,
    port: int,
    log_level: str,
    *,
    member_usage: bool = False,
    demo_model: bool = False,
) -> None:
    uvicorn = _uvicorn()
    from meterkit.asgi import create_app

    app: Any = create_app(meter, member_usage=member_usage)
    if demo_model:
        from meterkit.cli.demo_model import guarded

        app = guarded(app, meter)
    click.echo(
        f"meterkit: serving {meter.url} on {_url(host, port)}, dashboard at "
        f"{_url(host, port)}/dashboard (press Ctrl-C to stop)",
        err=True,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        meter.close()


_host = click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
_port = click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port."
)
_log_level = click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS),
    help="uvicorn's log level.",
)


_now = click.option(
    "--now",
    type=click.IntRange(0),
    default=None,
    metavar="SECONDS",
    help="Start the clock at this Unix time (it then runs on): reproducible dates.",
)
_freeze = click.option(
    "--freeze-clock", "frozen", is_flag=True, help="Keep the clock at --now instead of running on."
)


@main.command()
@store_options
@_host
@_port
@_now
@_freeze
@_log_level
@click.option(
    "--member-usage",
    is_flag=True,
    help="Let member keys read the organization usage and costs endpoints (admin keys only "
    "by default, as OpenAI's).",
)
@click.option(
    "--demo-model",
    is_flag=True,
    help="Also serve a stand-in model at POST /v1/chat/completions behind the metering "
    "guard: its tokens are recorded and priced, and plan, rate and spend limits refuse it "
    "with a 429.",
)
def serve(
    config: Path | None,
    db: str | None,
    host: str,
    port: int,
    now: int | None,
    frozen: bool,
    log_level: str,
    member_usage: bool,
    demo_model: bool,
) -> None:
    """Serve every HTTP endpoint (usage, costs, plan and account usage, operations, ingest)."""
    _serve(
        open_meter(config, db, now, frozen=frozen),
        host,
        port,
        log_level,
        member_usage=member_usage,
        demo_model=demo_model,
    )


# -- keys -------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.option("--org", "organization_id", required=True, help="The key's organization.")
@click.option("--role", type=click.Choice(["member", "admin"]), default="member", show_default=True)
@click.option(
    "--scopes",
    default="usage:read",
    show_default=True,
    help="Comma-separated: usage:read, usage:write.",
)
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Token prefix.")
@click.option("--name", default=None, help="A label to recognize the key by.")
@store_options
def keys_create(
    organization_id: str,
    role: str,
    scopes: str,
    prefix: str,
    name: str | None,
    config: Path | None,
    db: str | None,
) -> None:
    """Create a key. Prints only the token on stdout (it is shown this once)."""
    with open_meter(config, db) as meter, reported():
        token, key = create_key(meter, organization_id, role, scopes, prefix=prefix, name=name)
    click.echo(token)
    click.echo(
        f"created key {key.id} for {key.organization_id} ({key.role}; "
        f"{', '.join(sorted(key.scopes))}); the token above is not stored and cannot be shown "
        "again",
        err=True,
    )


def _when(ts: int | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@keys.command("list")
@click.option("--org", "organization_id", required=True, help="The organization.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key, per line.")
@store_options
def keys_list(organization_id: str, as_json: bool, config: Path | None, db: str | None) -> None:
    """List an organization's keys, revoked ones included (never their tokens)."""
    with open_meter(config, db, existing=True) as meter, reported():
        found = list_keys(meter, organization_id)
    if as_json:
        for key in found:
            click.echo(
                json.dumps(
                    {
                        "id": key.id,
                        "organization_id": key.organization_id,
                        "role": key.role,
                        "scopes": sorted(key.scopes),
                        "prefix": key.prefix,
                        "name": key.name,
                        "created_at": key.created_at,
                        "revoked_at": key.revoked_at,
                    }
                )
            )
        return
    rows = [("ID", "ROLE", "SCOPES", "NAME", "CREATED", "REVOKED")]
    rows += [
        (
            k.id,
            k.role,
            ",".join(sorted(k.scopes)),
            k.name or "-",
            _when(k.created_at),
            _when(k.revoked_at),
        )
        for k in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@keys.command("revoke")
@click.argument("key_id")
@store_options
def keys_revoke(key_id: str, config: Path | None, db: str | None) -> None:
    """Revoke a key at once (its record stays, marked revoked)."""
    with open_meter(config, db, existing=True) as meter, reported():
        key = get_key(meter, key_id)
        if key is None:
            raise click.ClickException(f"no key {key_id!r}")
        if not revoke_key(meter, key_id):
            raise click.ClickException(
                f"key {key_id} was already revoked at {_when(key.revoked_at)}"
            )
    click.echo(f"revoked key {key_id} of {key.organization_id}", err=True)


# -- rollups ----------------------------------------------------------------------------------


@main.group()
def rollups() -> None:
    """Rebuild the stored rollups from the events, or compare the two."""


_METER_OPTION = click.option(
    "--meter",
    "meters",
    multiple=True,
    help="A meter to work on (repeatable). [default: every meter]",
)


@rollups.command("rebuild")
@_METER_OPTION
@store_options
def rollups_rebuild(meters: tuple[str, ...], config: Path | None, db: str | None) -> None:
    """Fold each meter's rollups anew from its events (one transaction per meter)."""

    def progress(name: str, done: int) -> None:
        if done:
            click.echo(f"{name}: {done:,} events read", err=True)

    with open_meter(config, db, existing=True) as meter, reported():
        read = meter.rebuild_rollups(list(meters) or None, progress=progress)
    if not read:
        click.echo("this store keeps no rollups", err=True)
        return
    for name, count in sorted(read.items()):
        if count or meters:
            click.echo(f"rebuilt {name}: {count:,} events")


@rollups.command("verify")
@_METER_OPTION
@store_options
def rollups_verify(meters: tuple[str, ...], config: Path | None, db: str | None) -> None:
    """List every rollup row that differs from what the events give; exit 1 if any does."""
    with open_meter(config, db, existing=True) as meter, reported():
        found = meter.verify_rollups(list(meters) or None)
    for line in found:
        click.echo(line)
    if found:
        raise click.ClickException(
            f"{len(found)} rollup rows differ from the events; `meterkit rollups rebuild` "
            "folds them anew"
        )
    click.echo("rollups agree with the events", err=True)


@main.command("prune")
@_METER_OPTION
@store_options
def prune(meters: tuple[str, ...], config: Path | None, db: str | None) -> None:
    """Drop the raw events (and minute rollups) older than each meter's retention."""
    with open_meter(config, db, existing=True) as meter, reported():
        if not meter.retention:
            click.echo("no meter has a retention: nothing to drop", err=True)
            return
        dropped = meter.prune(list(meters) or None)
        kept = meter.retention
    for name, count in sorted(dropped.items()):
        days = kept.get(name)
        if days is None:
            click.echo(f"{name}: no retention, nothing dropped")
        else:
            click.echo(f"{name}: {count:,} events dropped (retention {days} days)")


# -- demo -------------------------------------------------------------------------------------


def _instructions(token: str, organization_id: str, base: str, start: int) -> str:
    """What to try against the demo server: curl calls and an openai SDK snippet."""
    auth = '-H "Authorization: Bearer $METERKIT_KEY"'
    usage = f"{base}/v1/organization/usage"
    return f"""
API key for {organization_id} (admin; usage:read, usage:write), shown only once:

    {token}

Try it while the server runs. The usage dashboard is at {base}/dashboard (sign in with the
key above); or:

    export METERKIT_KEY={token}
    curl -s "{usage}/completions?start_time={start}&bucket_width=1d&group_by[]=model&limit=7" \\
      {auth}
    curl -s "{base}/v1/organization/costs?start_time={start}&group_by[]=line_item&limit=7" \\
      {auth}
    curl -s "{base}/api/v1/usage" {auth}
    curl -s "{base}/v1/usage" {auth}
    curl -s -X POST "{base}/v1/usage/history" {auth} -H "Content-Type: application/json" \\
      -d '{{"organization_id": "{organization_id}", "months": 2}}'
    curl -s "{base}/v1/organization/spend_limit" {auth}

Costs include vector-store storage, billed over time: its line item, "vector stores",
reports gibibyte_hours (each store's size held until its next snapshot).

The spend limit is the operator's cap, a cent or two above this month's spend: the key
above may set a lower limit (POST /v1/organization/spend_limit), never lift it. Each call to
the demo model spends about 0.02 cents; once the limit is reached it answers 429
insufficient_quota:

    for i in $(seq 150); do curl -s -o /dev/null -w "%{{http_code}}\\n" \\
      -X POST "{base}/v1/chat/completions" {auth} -H "Content-Type: application/json" \\
      -d '{{"model": "gpt-4o", "messages": [{{"role": "user", "content": "Hello"}}]}}'; \\
    done | uniq -c

Or with the official openai SDK (pip install openai); its admin endpoints take the key
as admin_api_key:

from openai import OpenAI
client = OpenAI(admin_api_key="{token}", base_url="{base}/v1")
page = client.admin.organization.usage.completions(start_time={start}, bucket_width="1d", limit=7)
print(page)
"""


@main.command()
@click.option("--db", default=DEFAULT_URL, show_default=True, metavar="URL", help="Store URL.")
@_host
@_port
@click.option("--no-serve", is_flag=True, help="Fill the store and print the key, then exit.")
@click.option(
    "--days",
    default=30,
    show_default=True,
    type=click.IntRange(1, 366),
    help="Days of usage to generate.",
)
@click.option(
    "--now",
    type=click.IntRange(0),
    default=None,
    metavar="SECONDS",
    help="Generate and serve as if it were this Unix time (the clock then runs on from there; "
    "default: the real clock); same value, same data.",
)
@_log_level
def demo(
    db: str, host: str, port: int, no_serve: bool, days: int, now: int | None, log_level: str
) -> None:
    """Fill a store with a month of usage for three organizations, print a key, and serve."""
    from meterkit.cli.demo import create_demo_key, populate

    if not no_serve:
        _uvicorn()  # before anything is written or a key is shown: fail early without it
    meter = open_meter(None, db, now)
    try:
        with reported():
            summary = populate(meter, days=days, now=now)
            token, key = create_demo_key(meter)
    except BaseException:
        meter.close()
        raise
    first = dt.datetime.fromtimestamp(summary.start_time, dt.timezone.utc).date()
    click.echo(
        f"meterkit demo: {meter.url}: {len(summary.organizations)} organizations "
        f"({', '.join(summary.organizations)}), {days} days from {first} and today so far: "
        f"{summary.events} events ({summary.accepted} new, {summary.duplicates} already there)"
    )
    # The example asks for the last seven days, today included.
    reference = summary.end_time - 1
    start = reference - reference % DAY - 6 * DAY
    click.echo(_instructions(token, key.organization_id, _url(host, port), start))
    if no_serve:
        meter.close()
        return
    _serve(meter, host, port, log_level, demo_model=True)


# The data commands (record, import, export, usage, costs, quota, plans, metrics, prices, doctor,
# completion) live in meterkit.cli.data.
for _command in COMMANDS:
    main.add_command(_command)
