"""The ``meterkit`` command, run in-process with click's CliRunner (no server is started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from meterkit import Meter
from meterkit.auth import authenticate, list_keys
from meterkit.catalog import builtin_meters
from meterkit.cli.demo import DEMO_KEY_NAME, ORGANIZATIONS, populate

NOW = 1_730_937_600 + 15 * 3600 + 120  # 2024-11-07T15:02:00Z


def run(*args: str) -> Result:
    from meterkit.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def test_keys_create_prints_only_a_token_that_authenticates(db: str) -> None:
    result = run(
        "keys",
        "create",
        "--org",
        "org_1",
        "--role",
        "admin",
        "--scopes",
        "usage:read,usage:write",
        "--db",
        db,
        "--prefix",
        "acme_",
        "--name",
        "ci",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
    token = result.stdout.strip()
    assert token.startswith("acme_")
    assert token not in result.stderr and "org_1" in result.stderr
    with Meter(db) as meter:
        principal = authenticate(meter, token)
        assert principal is not None
        assert principal.organization_id == "org_1" and principal.role == "admin"
        assert principal.scopes == {"usage:read", "usage:write"}
        assert [k.name for k in list_keys(meter, "org_1")] == ["ci"]


def test_keys_list_and_revoke(db: str) -> None:
    created = run("keys", "create", "--org", "org_1", "--db", db)
    token = created.stdout.strip()
    with Meter(db) as meter:
        principal = authenticate(meter, token)
        assert principal is not None and principal.role == "member"
        assert principal.scopes == {"usage:read"}
        key_id = principal.key_id
    assert key_id is not None

    listed = run("keys", "list", "--org", "org_1", "--db", db)
    assert listed.exit_code == 0
    assert key_id in listed.stdout and token not in listed.stdout

    assert run("keys", "revoke", key_id, "--db", db).exit_code == 0
    with Meter(db) as meter:
        assert authenticate(meter, token) is None
    again = run("keys", "revoke", key_id, "--db", db)
    assert again.exit_code == 1 and "already revoked" in again.stderr
    unknown = run("keys", "revoke", "0123456789abcdef", "--db", db)
    assert unknown.exit_code == 1 and "no key" in unknown.stderr

    as_json = run("keys", "list", "--org", "org_1", "--json", "--db", db)
    assert '"revoked_at": null' not in as_json.stdout and key_id in as_json.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--org", "org_1", "--scopes", "usage:admin"), "scopes"),
        (("--org", "org_1", "--prefix", "bad prefix!"), "prefix"),
        (("--org", " org_1"), "organization_id"),
        (("--org", "org_1", "--role", "owner"), "--role"),
    ],
)
def test_keys_create_refuses_bad_input(db: str, args: tuple[str, ...], message: str) -> None:
    result = run("keys", "create", *args, "--db", db)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == "" and "Traceback" not in result.output


def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "meterkit.toml"
    config.write_text(
        f'store = "sqlite:///{tmp_path / "c.db"}"\n[plans.pro]\nlimits = {{ tokens = "lots" }}\n'
    )
    for args in (
        ("serve", "--config", str(config)),
        ("keys", "list", "--org", "o", "--config", str(config)),
    ):
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert "plans.pro.limits.tokens" in result.stderr
        assert "Traceback" not in result.output


def test_config_store_and_db_override(tmp_path: Path) -> None:
    config = tmp_path / "meterkit.toml"
    config.write_text(
        f'store = "sqlite:///{tmp_path / "from_config.db"}"\n'
        '[plans.pro]\nlimits = { tokens = 1000 }\n[organizations.org_1]\nplan = "pro"\n'
    )
    token = run("keys", "create", "--org", "org_1", "--config", str(config)).stdout.strip()
    with Meter(f"sqlite:///{tmp_path / 'from_config.db'}") as meter:
        assert authenticate(meter, token) is not None
        plan = meter.quotas.get_plan("pro")
        assert plan is not None and plan.limits == {"tokens": 1000}

    other = f"sqlite:///{tmp_path / 'override.db'}"
    created = run("keys", "create", "--org", "org_1", "--config", str(config), "--db", other)
    with Meter(other) as meter:
        assert authenticate(meter, created.stdout.strip()) is not None
        assert meter.quotas.get_plan("pro") is not None  # the config was applied there


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("serve", "--db", "not-a-url"), "--db"),
        (("serve", "--db", "nosuch://x"), "--db"),
        (("serve", "--config", "/nonexistent/meterkit.toml"), "no such file"),
        (("serve", "--port", "70000"), "--port"),
    ],
)
def test_serve_refuses_bad_options(args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_a_store_in_a_missing_folder_is_one_line_naming_db(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/no/such/dir/x.db"
    result = run("keys", "create", "--org", "o", "--db", db)
    assert result.exit_code == 2
    assert "--db" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [("keys", "list", "--org", "o"), ("keys", "revoke", "0" * 16)])
def test_a_mistyped_db_for_a_command_that_creates_nothing_creates_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    typo = tmp_path / "usgae.db"
    result = run(*command, "--db", f"sqlite:///{typo}")
    assert result.exit_code == 2 and "--db" in result.stderr and "does not exist" in result.stderr
    assert not typo.exists() and list(tmp_path.iterdir()) == []


def _counts(db: str) -> dict[str, list[tuple[int, dict[str, float | None]]]]:
    """Per meter and organization, every daily total the demo window holds."""
    out: dict[str, list[tuple[int, dict[str, float | None]]]] = {}
    with Meter(db) as meter:
        for org in ORGANIZATIONS:
            for name in builtin_meters():
                out[f"{org.id}/{name}"] = meter.totals(
                    name, organization_id=org.id, start_time=NOW - 40 * 86400, end_time=NOW
                )
    return out


def test_demo_no_serve_twice_is_idempotent(db: str) -> None:
    first = run("demo", "--db", db, "--no-serve", "--now", str(NOW), "--port", "8123")
    assert first.exit_code == 0, first.output
    counts = _counts(db)
    second = run("demo", "--db", db, "--no-serve", "--now", str(NOW), "--port", "8123")
    assert second.exit_code == 0, second.output
    assert _counts(db) == counts

    line_1, line_2 = first.stdout.splitlines()[0], second.stdout.splitlines()[0]
    total = int(line_1.split(": ")[-1].split()[0])
    assert f"{total} events ({total} new, 0 already there)" in line_1
    assert f"{total} events (0 new, {total} already there)" in line_2
    # Every meter has usage, and a gauge (vector_stores) too.
    assert all(any(v for _, v in rows) for rows in counts.values())

    # Each run prints a fresh admin key; only the latest one still works.
    tokens = [next(w for w in r.stdout.split() if w.startswith("mk_")) for r in (first, second)]
    with Meter(db) as meter:
        assert authenticate(meter, tokens[0]) is None
        principal = authenticate(meter, tokens[1])
        assert principal is not None and principal.organization_id == ORGANIZATIONS[0].id
        assert principal.is_admin and principal.scopes == {"usage:read", "usage:write"}
        demo_keys = [k for k in list_keys(meter, ORGANIZATIONS[0].id) if k.name == DEMO_KEY_NAME]
        assert sum(k.active for k in demo_keys) == 1

    out = second.stdout
    assert "http://127.0.0.1:8123/v1/organization/usage/completions?start_time=" in out
    assert 'OpenAI(admin_api_key="' + tokens[1] + '", base_url="http://127.0.0.1:8123/v1")' in out
    assert "client.admin.organization.usage.completions(start_time=" in out


def test_demo_matches_populate_and_ledger(tmp_path: Path) -> None:
    """The CLI writes exactly what populate() writes, and the quota ledger agrees with it."""
    via_cli = f"sqlite:///{tmp_path / 'a.db'}"
    assert run("demo", "--db", via_cli, "--no-serve", "--now", str(NOW)).exit_code == 0
    direct = f"sqlite:///{tmp_path / 'b.db'}"
    with Meter(direct, clock=lambda: NOW) as meter:
        summary = populate(meter, now=NOW)
        assert summary.accepted == summary.events > 0
        for org in ORGANIZATIONS:
            period = meter.quotas.period(org.id, NOW)
            tokens = meter.total(
                "tokens",
                "tokens",
                organization_id=org.id,
                start_time=period.start,
                end_time=NOW + 1,
            )
            assert meter.quotas.used(org.id, "tokens", NOW) == tokens > 0
            assert meter.quotas.used(org.id, "spaces", NOW) >= 1
            assert meter.quotas.used(org.id, "storage_bytes", NOW) > 0
        costs = meter.costs(
            organization_id="org_acme", start_time=summary.start_time, end_time=NOW, limit=31
        )
        assert sum(r.amount for b in costs.data for r in b.results) > 0
        # Only ended hours are filled: nothing lies after the last full hour before NOW.
        assert summary.end_time == NOW - NOW % 3600
    assert _counts(via_cli) == _counts(direct)


def test_python_dash_m(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meterkit", "keys", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Usage: meterkit keys" in result.stdout


def test_serving_without_uvicorn_fails_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes "import uvicorn" fail
    db = tmp_path / "never.db"
    result = run("demo", "--db", f"sqlite:///{db}")
    assert result.exit_code == 1
    assert "pip install 'meterkit[asgi]'" in result.stderr and "mk_" not in result.stdout
    assert not db.exists()  # nothing was written before the failure
