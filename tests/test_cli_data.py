"""The data commands: record, import, export, usage, costs, quota, plans, prices, doctor and
completion, through click's runner, plus one real subprocess per command family.

Every clock is injected with ``--now``; every time is given.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterkit import Event, Meter
from meterkit.cli.eventfiles import derived_id

NOW = 1_764_590_400  # 2025-12-01T12:00:00Z
DAY = 86_400
MONTH = 1_764_547_200  # 2025-12-01


def run(*args: str, input: str | None = None) -> Result:
    """The command in process, its clock at NOW unless it says otherwise."""
    from meterkit.cli import main

    given = list(args)
    if given[0] != "completion" and "--now" not in given:
        given += ["--now", str(NOW)]
    return CliRunner().invoke(main, given, input=input, catch_exceptions=False)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data.db'}"


def native(i: int, **over: Any) -> dict[str, Any]:
    event = {
        "id": f"e{i}",
        "meter": "tokens",
        "organization_id": "org_1",
        "time": MONTH + 60 * i,
        "values": {"tokens": 10 + i},
        "dimensions": {"model": "gpt-4o" if i % 2 else "gpt-4o-mini"},
    }
    event.update(over)
    return event


def stored(db: str, meter: str = "tokens", org: str = "org_1") -> list[Event]:
    with Meter(db, clock=lambda: NOW) as m:
        m.store.ensure_meter(m.spec(meter))
        return sorted(m.store.scan(meter, org, 0, 2**40), key=lambda e: e.id)


# -- record -------------------------------------------------------------------------------------


def test_record_stores_one_event_and_a_retry_is_a_duplicate(db: str) -> None:
    args = ("record", "tokens", "--org", "org_1", "-v", "tokens=120", "-d", "model=gpt-4o")
    args += ("--time", "2025-12-01T10:00:00Z", "--id", "t1", "--db", db)
    first = run(*args)
    assert (first.exit_code, first.stdout) == (0, "recorded\n"), first.output
    again = run(*args)
    assert again.exit_code == 0 and "duplicate" in again.stdout
    (event,) = stored(db)
    assert (event.id, event.time, dict(event.values), dict(event.dimensions)) == (
        "t1",
        MONTH + 10 * 3600,
        {"tokens": 120},
        {"model": "gpt-4o"},
    )
    # Same id, other data: a conflict, and the stored event is kept.
    other = run(*args[:5], "tokens=121", *args[6:])
    assert other.exit_code == 2 and "--id" in other.stderr
    assert [dict(e.values) for e in stored(db)] == [{"tokens": 120}]


def test_record_bool_dimensions_and_now(db: str) -> None:
    result = run(
        "record",
        "completions",
        "--org",
        "org_1",
        "-v",
        "input_tokens=5",
        "-d",
        "batch=true",
        "--db",
        db,
        "--now",
        str(NOW),
    )
    assert result.exit_code == 0, result.output
    (event,) = stored(db, "completions")
    assert event.dimensions["batch"] is True and event.time == NOW


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("-v", "tokens=x"), "--value"),
        (("-v", "nope=1"), "--value"),
        (("-v", "tokens"), "--value"),
        (("-v", "tokens=1", "-d", "colour=red"), "--dim"),
        (("-v", "tokens=1", "--time", "yesterday"), "--time"),
        (("-v", "tokens=1", "--id", "x" * 300), "--id"),
        ((), "--value"),
    ],
)
def test_record_refuses_bad_input_naming_the_option(
    db: str, args: tuple[str, ...], option: str
) -> None:
    result = run("record", "tokens", "--org", "org_1", *args, "--db", db, "--now", str(NOW))
    assert result.exit_code == 2
    assert option in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_an_unknown_meter_is_refused(db: str) -> None:
    result = run("record", "nope", "--org", "o", "-v", "x=1", "--db", db)
    assert result.exit_code == 2 and "METER" in result.stderr


# -- import and export ----------------------------------------------------------------------------


def test_import_ndjson_is_idempotent_and_reports_duplicates_and_conflicts(
    db: str, tmp_path: Path
) -> None:
    path = tmp_path / "events.ndjson"
    path.write_text("".join(json.dumps(native(i)) + "\n" for i in range(10)))
    first = run("import", str(path), "--db", db, "--batch-size", "3")
    assert first.exit_code == 0, first.output
    assert "10 events read: 10 new, 0 duplicates, 0 conflicts" in first.stderr
    changed = [native(i) for i in range(10)]
    changed[4]["values"] = {"tokens": 999}
    path.write_text("".join(json.dumps(e) + "\n" for e in changed))
    again = run("import", str(path), "--db", db)
    assert "0 new, 9 duplicates, 1 conflicts" in again.stderr
    assert "e4" in again.stderr
    assert stored(db)[4].values == {"tokens": 14}  # the stored event is kept


def test_a_bad_line_is_reported_with_its_line_and_its_batch_stores_nothing(
    db: str, tmp_path: Path
) -> None:
    lines = [json.dumps(native(i)) for i in range(9)]
    lines[4] = "{not json"
    lines[7] = json.dumps(native(7, values={"tokens": "many"}))
    path = tmp_path / "bad.ndjson"
    path.write_text("\n".join(lines) + "\n")
    result = run("import", str(path), "--db", db, "--batch-size", "3")
    assert result.exit_code == 2
    assert f"{path}:5: is not valid JSON" in result.stderr and "batch 2, lines 4-6" in result.stderr
    assert f"{path}:8:" in result.stderr and "batch 3, lines 7-9" in result.stderr
    # Only the first batch (lines 1-3) is stored.
    assert [e.id for e in stored(db)] == ["e0", "e1", "e2"]


def test_import_json_arrays_cloudevents_csv_and_stdin(db: str, tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([native(0), native(1)]))
    cloud = [
        {
            "specversion": "1.0",
            "id": "ce1",
            "source": "test",
            "type": "meterkit.tokens",
            "subject": "org_1",
            "time": "2025-12-01T00:05:00Z",
            "data": {"values": {"tokens": 3}, "dimensions": {"model": "o3"}},
        }
    ]
    (tmp_path / "b.json").write_text(json.dumps(cloud))
    (tmp_path / "c.csv").write_text(
        "ts,customer,used,model\n2025-12-01T00:10:00Z,org_1,4,gpt-4o\n1764547800,org_1,5,\n"
    )
    result = run(
        "import",
        str(tmp_path / "a.json"),
        str(tmp_path / "b.json"),
        str(tmp_path / "c.csv"),
        "--map",
        "ts=time",
        "--map",
        "customer=organization_id",
        "--map",
        "used=value.tokens",
        "--map",
        "model=dim.model",
        "--meter",
        "tokens",
        "--db",
        db,
    )
    assert result.exit_code == 0, result.output
    piped = run("import", "-", "--db", db, input=json.dumps(native(5)) + "\n")
    assert piped.exit_code == 0 and "1 new" in piped.stderr
    events = {e.id: e for e in stored(db)}
    assert events["ce1"].time == MONTH + 300 and events["ce1"].dimensions == {"model": "o3"}
    csv_ids = sorted(i for i in events if i.startswith("imp_"))
    assert len(csv_ids) == 2  # ids derived from content: a second import finds duplicates
    assert sorted(events[i].values["tokens"] for i in csv_ids) == [4, 5]
    assert {"e0", "e1", "e5"} <= set(events)
    again = run(
        "import",
        str(tmp_path / "c.csv"),
        "--map",
        "ts=time",
        "--map",
        "customer=organization_id",
        "--map",
        "used=value.tokens",
        "--map",
        "model=dim.model",
        "--meter",
        "tokens",
        "--db",
        db,
    )
    assert "0 new, 2 duplicates" in again.stderr


def test_progress_shows_on_request_and_not_when_piped(db: str, tmp_path: Path) -> None:
    path = tmp_path / "p.ndjson"
    path.write_text("".join(json.dumps(native(i)) + "\n" for i in range(50)))
    quiet = run("import", str(path), "--db", db)
    assert "/s" not in quiet.stderr and "━" not in quiet.stderr  # piped: no bar
    shown = run("import", str(path), "--db", db, "--progress")
    assert "events" in shown.stderr and "/s" in shown.stderr and "100%" in shown.stderr


_ROUND_TRIP_EVENTS = st.lists(
    st.builds(
        lambda i, t, tokens, model, project: Event(
            f"ev{i}",
            "tokens",
            "org_1" if i % 3 else "org_2",
            MONTH + t,
            {"tokens": tokens},
            {k: v for k, v in (("model", model), ("project_id", project)) if v is not None},
        ),
        st.integers(0, 10**6),
        st.integers(0, 30 * DAY),
        st.integers(0, 2**40),
        st.sampled_from([None, "gpt-4o", "a,b", 'q"uote', "ünï"]),
        st.sampled_from([None, "p1"]),
    ),
    max_size=20,
    unique_by=lambda e: e.id,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=_ROUND_TRIP_EVENTS, fmt=st.sampled_from(["ndjson", "csv"]))
def test_export_then_import_round_trips_losslessly(
    tmp_path: Path, events: list[Event], fmt: str
) -> None:
    src = tmp_path / f"src-{fmt}-{abs(hash(tuple(e.id for e in events)))}.db"
    dst = src.with_suffix(".copy.db")
    for path in (src, dst):
        path.unlink(missing_ok=True)
    with Meter(f"sqlite:///{src}", clock=lambda: NOW + 60 * DAY) as m:
        m.record_many(events)
    out = tmp_path / f"out.{fmt}"
    exported = run("export", "--format", fmt, "-o", str(out), "--db", f"sqlite:///{src}")
    assert exported.exit_code == 0, exported.output
    imported = run("import", str(out), "--db", f"sqlite:///{dst}", "--now", str(NOW + 60 * DAY))
    assert imported.exit_code == 0, imported.output
    for org in ("org_1", "org_2"):
        assert stored(f"sqlite:///{dst}", org=org) == stored(f"sqlite:///{src}", org=org)


def test_export_filters_by_meter_org_and_time(db: str) -> None:
    with Meter(db, clock=lambda: NOW) as m:
        m.record_many([Event(**native(i)) for i in range(6)])
        m.record("queries", {"queries": 1}, organization_id="org_2", time=MONTH, id="q")
    out = run(
        "export",
        "--meter",
        "tokens",
        "--org",
        "org_1",
        "--start-time",
        str(MONTH + 60),
        "--end-time",
        str(MONTH + 240),
        "--db",
        db,
    )
    assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == ["e1", "e2", "e3"]
    everything = run("export", "--format", "csv", "--db", db)
    rows = list(csv.DictReader(io.StringIO(everything.stdout)))
    assert len(rows) == 7 and {"value.tokens", "value.queries"} <= set(rows[0])
    assert "value.input_tokens" not in rows[0]  # only meters with events


def test_read_commands_never_create_a_store(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    for args in (
        ("export",),
        ("usage", "tokens", "--org", "o", "--start-time", "0"),
        ("costs", "--org", "o", "--start-time", "0"),
        ("quota", "o"),
        ("plans", "list"),
        ("prices", "list"),
        ("doctor",),
    ):
        result = run(*args, "--db", f"sqlite:///{missing}")
        assert result.exit_code == 2 and "--db" in result.stderr, args
        assert not missing.exists()


def test_a_store_that_does_not_answer_exits_1() -> None:
    url = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    result = run("usage", "tokens", "--org", "o", "--start-time", "0", "--db", url)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1


# -- usage and costs ------------------------------------------------------------------------------


@pytest.fixture
def filled(db: str) -> str:
    with Meter(db, clock=lambda: NOW) as m:
        m.record_many([Event(**native(i)) for i in range(12)])
        m.set_price(
            {
                "meter": "tokens",
                "measure": "tokens",
                "unit_price": "2.50",
                "per": 1_000_000,
                "line_item": "tokens",
                "quantity_unit": "tokens",
            }
        )
    return db


def test_usage_json_is_exactly_the_api_page(filled: str) -> None:
    args = ("--org", "org_1", "--start-time", str(MONTH), "--end-time", str(MONTH + 3600))
    result = run(
        "usage",
        "tokens",
        *args,
        "--bucket-width",
        "1m",
        "--group-by",
        "model",
        "--models",
        "gpt-4o",
        "--limit",
        "5",
        "--format",
        "json",
        "--db",
        filled,
    )
    assert result.exit_code == 0, result.output
    with Meter(filled, clock=lambda: NOW) as m:
        want = m.usage(
            "tokens",
            organization_id="org_1",
            start_time=MONTH,
            end_time=MONTH + 3600,
            bucket_width="1m",
            group_by=["model"],
            filters={"model": ["gpt-4o"]},
            limit=5,
        ).to_dict()
    assert json.loads(result.stdout) == want and want["has_more"] is True
    nxt = run(
        "usage",
        "tokens",
        *args,
        "--bucket-width",
        "1m",
        "--group-by",
        "model",
        "--models",
        "gpt-4o",
        "--limit",
        "5",
        "--page",
        want["next_page"],
        "--format",
        "json",
        "--db",
        filled,
    )
    assert json.loads(nxt.stdout)["data"][0]["start_time"] == MONTH + 300


def test_usage_table_aligns_numbers_and_csv_is_plain(filled: str) -> None:
    args = ("--org", "org_1", "--start-time", str(MONTH), "--end-time", str(MONTH + DAY))
    table = run("usage", "tokens", *args, "--group-by", "model", "--db", filled)
    lines = [line.rstrip() for line in table.stdout.splitlines() if "gpt-4o" in line]
    odd, even = sum(10 + i for i in range(12) if i % 2), sum(10 + i for i in range(12) if not i % 2)
    assert len(lines) == 2 and {line.split()[-1] for line in lines} == {str(odd), str(even)}
    assert len({len(line) for line in lines}) == 1  # numbers end in one column
    rows = list(
        csv.reader(
            io.StringIO(
                run(
                    "usage",
                    "tokens",
                    *args,
                    "--group-by",
                    "model",
                    "--format",
                    "csv",
                    "--db",
                    filled,
                ).stdout
            )
        )
    )
    assert rows[0] == ["start_time", "model", "tokens"]
    assert sorted(rows[1:]) == [
        ["2025-12-01T00:00:00Z", "gpt-4o", str(sum(10 + i for i in range(12) if i % 2))],
        ["2025-12-01T00:00:00Z", "gpt-4o-mini", str(sum(10 + i for i in range(12) if not i % 2))],
    ]


def test_usage_refuses_bad_parameters_naming_them(filled: str) -> None:
    base = ("usage", "tokens", "--org", "org_1", "--db", filled)
    for args, option in (
        (("--start-time", "soon"), "--start-time"),
        (("--start-time", str(MONTH), "--group-by", "colour"), "--group-by"),
        (("--start-time", str(MONTH), "--end-time", str(MONTH - 5)), "--end-time"),
        (("--start-time", str(MONTH), "--sizes", "1024x1024"), "filter"),
    ):
        result = run(*base, *args)
        assert result.exit_code == 2 and option in result.stderr, (args, result.stderr)
    assert run("usage", "nope", "--org", "o", "--start-time", "0", "--db", filled).exit_code == 2


def test_costs_json_table_and_filters(filled: str) -> None:
    args = ("--org", "org_1", "--start-time", str(MONTH), "--end-time", str(MONTH + DAY))
    result = run("costs", *args, "--group-by", "line_item", "--format", "json", "--db", filled)
    with Meter(filled, clock=lambda: NOW) as m:
        want = m.costs(
            organization_id="org_1", start_time=MONTH, end_time=MONTH + DAY, group_by=["line_item"]
        ).to_dict()
    assert json.loads(result.stdout) == want
    table = run("costs", *args, "--group-by", "line_item", "--db", filled)
    total = sum(10 + i for i in range(12))
    assert f"{total:,}" in table.stdout and "tokens" in table.stdout
    none = run("costs", *args, "--line-items", "other", "--format", "json", "--db", filled)
    assert all(not b["results"] for b in json.loads(none.stdout)["data"])


# -- quota, plans, prices -------------------------------------------------------------------------


def test_plans_set_assign_and_quota(filled: str) -> None:
    assert (
        run(
            "plans",
            "set",
            "pro",
            "--limit",
            "tokens=1000",
            "--rpm",
            "60",
            "--name",
            "Pro",
            "--db",
            filled,
        ).exit_code
        == 0
    )
    assert run("plans", "set", "pro", "--limit", "queries=5", "--db", filled).exit_code == 0
    shown = json.loads(run("plans", "show", "pro", "--db", filled).stdout)
    assert shown["limits"] == {"tokens": 1000, "queries": 5} and shown["name"] == "Pro"
    assert "pro" in run("plans", "list", "--db", filled).stdout
    assert (
        json.loads(run("plans", "list", "--format", "json", "--db", filled).stdout)[0]["id"]
        == "pro"
    )
    assert run("plans", "assign", "org_1", "pro", "--db", filled).exit_code == 0
    with Meter(filled, clock=lambda: NOW) as m:
        m.check("org_1", {"tokens": 100})
    q = json.loads(
        run("quota", "org_1", "--format", "json", "--now", str(NOW), "--db", filled).stdout
    )
    tokens = next(line for line in q["limits"] if line["metric"] == "tokens")
    used = 100 + sum(10 + i for i in range(12))  # the check and the recorded tokens
    assert (tokens["used"], tokens["limit"], tokens["remaining"]) == (used, 1000, 1000 - used)
    assert tokens["reset_at"] == 1_767_225_600  # 2026-01-01
    assert q == json.loads(run("quota", "org_1", "--format", "json", "--db", filled).stdout)
    table = run("quota", "org_1", "--now", str(NOW), "--db", filled).stdout
    assert "tokens" in table and str(1000 - used) in table and "requests per minute" in table
    bad = run("plans", "assign", "org_1", "nope", "--db", filled)
    assert bad.exit_code == 2 and "PLAN" in bad.stderr
    bad = run("plans", "set", "pro", "--limit", "tokens=lots", "--db", filled)
    assert bad.exit_code == 2 and "--limit" in bad.stderr


def test_usage_shows_the_measures_with_values_or_those_asked(db: str) -> None:
    completions(db, 300, 200)
    args = ("--org", "org_1", "--start-time", str(MONTH), "--format", "csv", "--db", db)
    rows = list(csv.reader(io.StringIO(run("usage", "completions", *args).stdout)))
    # 17 measures in the meter; the page has values for this one only.
    assert rows[0] == ["start_time", "output_tokens"]
    assert rows[1][1] == "500"
    asked = run("usage", "completions", *args, "--measures", "input_tokens,output_tokens")
    assert next(csv.reader(io.StringIO(asked.stdout))) == [
        "start_time",
        "input_tokens",
        "output_tokens",
    ]
    bad = run("usage", "completions", *args, "--measures", "tokenz")
    assert bad.exit_code == 2 and "--measures" in bad.stderr and "tokenz" in bad.stderr
    query = ("--org", "org_1", "--start-time", str(MONTH), "--db", db)
    page = json.loads(run("usage", "completions", *query, "--format", "json").stdout)
    assert "input_tokens" in page["data"][0]["results"][0]  # the API's shape stays whole


def completions(db: str, *outputs: int) -> None:
    with Meter(db, clock=lambda: NOW) as m:
        m.record_many(
            [
                Event(
                    f"c{i}",
                    "completions",
                    "org_1",
                    NOW - 60,
                    {"output_tokens": out},
                    {"model": "gpt-4o"},
                )
                for i, out in enumerate(outputs)
            ]
        )


def test_metrics_set_list_and_every_process_counts_them(filled: str) -> None:
    completions(filled, 300, 200)  # before the metric exists: the period is counted again
    sources = "completions.input_tokens + completions.output_tokens"
    saved = run("metrics", "set", "llm_tokens", "--sources", sources, "--db", filled)
    assert saved.exit_code == 0, saved.output
    run("plans", "set", "pro", "--limit", "llm_tokens=1000", "--db", filled)
    run("plans", "assign", "org_1", "pro", "--db", filled)
    with Meter(filled, clock=lambda: NOW) as m:  # another process, naming no metric
        m.record("completions", {"output_tokens": 100}, organization_id="org_1", id="c9")
        assert not m.check("org_1", {"llm_tokens": 401}).allowed
    listed = json.loads(run("metrics", "list", "--format", "json", "--db", filled).stdout)
    found = next(x for x in listed if x["name"] == "llm_tokens")
    assert [f"{s['meter']}.{s['measure']}" for s in found["sources"]] == sources.split(" + ")
    assert "llm_tokens" in run("metrics", "list", "--db", filled).stdout
    q = json.loads(run("quota", "org_1", "--format", "json", "--db", filled).stdout)
    line = next(x for x in q["limits"] if x["metric"] == "llm_tokens")
    assert (line["used"], line["limit"]) == (600, 1000)
    doctor = run("doctor", "--db", filled)
    assert doctor.exit_code == 0, doctor.output
    assert f"llm_tokens = {sources}" in doctor.stdout
    narrower = run(
        "metrics",
        "set",
        "llm_tokens",
        "--sources",
        "completions.output_tokens",
        "--where",
        "model=gpt-4o-mini",
        "--db",
        filled,
    )
    assert narrower.exit_code == 0, narrower.output
    q = json.loads(run("quota", "org_1", "--format", "json", "--db", filled).stdout)
    assert next(x for x in q["limits"] if x["metric"] == "llm_tokens")["used"] == 0


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["b d", "--sources", "completions.output_tokens"], "METRIC"),
        (["m", "--sources", "completions"], "--sources"),
        (["m", "--sources", "completions.nope"], "--sources"),
        (["m", "--sources", "completions.output_tokens", "--where", "nodim=1"], "--where"),
        (["m", "--sources", "completions.output_tokens", "--where", "model"], "--where"),
    ],
)
def test_metrics_set_names_what_is_wrong_and_stores_nothing(
    db: str, args: list[str], named: str
) -> None:
    bad = run("metrics", "set", *args, "--db", db)
    assert bad.exit_code == 2 and named in bad.stderr and "Traceback" not in bad.output
    with Meter(db, clock=lambda: NOW) as m:
        assert m.store.list_records("metric") == []


def test_doctor_names_a_plan_limit_nothing_counts(filled: str) -> None:
    with Meter(filled, clock=lambda: NOW) as m:
        from meterkit import Plan

        m.store.put_record("plan", "ghostly", Plan("ghostly", limits={"ghost": 5}).to_record())
    sick = run("doctor", "--db", filled)
    assert sick.exit_code == 1 and "plan ghostly limits 'ghost'" in sick.stdout


def test_spend_cap_set_show_and_delete(db: str) -> None:
    assert run("spend-cap", "org_1", "--db", db).exit_code == 2  # reading creates no store
    set_ = run("spend-cap", "org_1", "--cents", "500", "--db", db)
    assert set_.exit_code == 0 and "cap 500 cents; limit in force 500 cents" in set_.stdout
    with Meter(db, clock=lambda: NOW) as m:
        m.set_spend_limit("org_1", 200)  # the organization's own, under the cap
    assert "limit in force 200 cents" in run("spend-cap", "org_1", "--db", db).stdout
    bad = run("spend-cap", "org_1", "--cents", "0", "--db", db)
    assert bad.exit_code == 2 and "--cents" in bad.stderr
    assert run("spend-cap", "org_1", "--delete", "--db", db).stdout.strip() == "org_1: cap removed"
    assert "cap none; limit in force 200 cents" in run("spend-cap", "org_1", "--db", db).stdout


def test_prices_set_and_list(filled: str) -> None:
    result = run(
        "prices",
        "set",
        "--meter",
        "tokens",
        "--measure",
        "tokens",
        "--unit-price",
        "5.00",
        "--per",
        "1000000",
        "--line-item",
        "tokens (gpt-4o)",
        "--quantity-unit",
        "tokens",
        "--where",
        "model=gpt-4o",
        "--effective-from",
        "2025-12-01",
        "--db",
        filled,
    )
    assert result.exit_code == 0, result.output
    listed = json.loads(run("prices", "list", "--format", "json", "--db", filled).stdout)
    assert {(p["line_item"], p["unit_price"]) for p in listed} == {
        ("tokens", "2.50"),
        ("tokens (gpt-4o)", "5.00"),
    }
    bad = run(
        "prices",
        "set",
        "--meter",
        "tokens",
        "--measure",
        "tokens",
        "--unit-price",
        "0.1",
        "--line-item",
        "x",
        "--quantity-unit",
        "t",
        "--per",
        "0",
        "--db",
        filled,
    )
    assert bad.exit_code == 2 and "--per" in bad.stderr
    bad = run(
        "prices",
        "set",
        "--meter",
        "tokens",
        "--measure",
        "nope",
        "--unit-price",
        "1",
        "--line-item",
        "x",
        "--quantity-unit",
        "t",
        "--db",
        filled,
    )
    assert bad.exit_code == 2 and "--measure" in bad.stderr


# -- doctor and completion ------------------------------------------------------------------------


def test_doctor_finds_counters_and_rollups_out_of_step(filled: str) -> None:
    run("plans", "set", "pro", "--limit", "tokens=1000", "--db", filled)
    run("plans", "assign", "org_1", "pro", "--db", filled)
    healthy = run("doctor", "--now", str(NOW), "--db", filled)
    assert healthy.exit_code == 0, healthy.output
    assert "rollups agree" in healthy.stdout and "quota counters agree" in healthy.stdout
    with Meter(filled, clock=lambda: NOW) as m:
        period = m.quotas.period("org_1", NOW)
        m.store.counters_add([(m.quotas.period_key("org_1", "tokens", period), 7)], now=NOW)
        m.store.conn.execute("UPDATE [rollup_tokens_1d] SET [s_tokens] = [s_tokens] + 1")
    sick = run("doctor", "--now", str(NOW), "--db", filled)
    assert sick.exit_code == 1
    assert "FAIL" in sick.stdout and "quota counter org_1 tokens" in sick.stdout
    assert "rollup tokens" in sick.stdout


def test_completion_scripts() -> None:
    for shell, marker in (("bash", "complete"), ("zsh", "compdef"), ("fish", "complete")):
        result = run("completion", shell)
        assert (
            result.exit_code == 0
            and marker in result.stdout
            and "_METERKIT_COMPLETE" in result.stdout
        )


# -- one real process per command family ----------------------------------------------------------


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m meterkit ARGS``, its clock at NOW unless the command takes none."""
    given = list(args)
    if given[0] != "completion" and "--now" not in given:
        given += ["--now", str(NOW)]
    return subprocess.run(
        [sys.executable, "-m", "meterkit", *given],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_every_command_family_runs_as_a_process(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'proc.db'}"
    data = "".join(json.dumps(native(i)) + "\n" for i in range(5))
    assert (
        cli(
            "record",
            "tokens",
            "--org",
            "org_1",
            "-v",
            "tokens=1",
            "--time",
            str(MONTH),
            "--id",
            "r1",
            "--db",
            db,
        ).returncode
        == 0
    )
    imported = cli("import", "-", "--db", db, stdin=data)
    assert imported.returncode == 0 and "5 new" in imported.stderr and "━" not in imported.stderr
    exported = cli("export", "--db", db)
    assert len(exported.stdout.splitlines()) == 6
    usage = cli(
        "usage",
        "tokens",
        "--org",
        "org_1",
        "--start-time",
        str(MONTH),
        "--end-time",
        str(MONTH + DAY),
        "--format",
        "json",
        "--db",
        db,
    )
    assert json.loads(usage.stdout)["data"][0]["results"][0]["tokens"] == 1 + sum(
        10 + i for i in range(5)
    )
    assert (
        cli(
            "prices",
            "set",
            "--meter",
            "tokens",
            "--measure",
            "tokens",
            "--unit-price",
            "1",
            "--line-item",
            "t",
            "--quantity-unit",
            "tokens",
            "--db",
            db,
        ).returncode
        == 0
    )
    assert "tokens" in cli("prices", "list", "--db", db).stdout
    costs = cli(
        "costs",
        "--org",
        "org_1",
        "--start-time",
        str(MONTH),
        "--end-time",
        str(MONTH + DAY),
        "--format",
        "csv",
        "--db",
        db,
    )
    assert costs.stdout.splitlines()[1].startswith("2025-12-01T00:00:00Z,")
    assert cli("plans", "set", "pro", "--limit", "tokens=10", "--db", db).returncode == 0
    assert cli("plans", "assign", "org_1", "pro", "--db", db).returncode == 0
    assert "tokens" in cli("quota", "org_1", "--now", str(NOW), "--db", db).stdout
    assert cli("doctor", "--now", str(NOW), "--db", db).returncode == 0
    assert "_METERKIT_COMPLETE" in cli("completion", "bash").stdout
    bad = cli("record", "tokens", "--org", "org_1", "-v", "tokens=x", "--db", db)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0


def test_derived_ids_depend_only_on_content() -> None:
    a = Event("", "tokens", "o", 1, {"tokens": 1}, {"model": "m"})
    assert derived_id(a) == derived_id(Event("", "tokens", "o", 1, {"tokens": 1}, {"model": "m"}))
    assert derived_id(a) != derived_id(Event("", "tokens", "o", 2, {"tokens": 1}, {"model": "m"}))


def test_an_unreachable_postgresql_url_is_one_line_and_exit_1() -> None:
    for url in (
        "postgresql://postgres@127.0.0.1:1/test",  # nothing listens on port 1
        "postgresql://postgres@nohost.invalid:5432/test",  # does not resolve
    ):
        result = run("quota", "org_1", "--db", url)
        assert result.exit_code == 1, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        host = url.split("@", 1)[1].split(":", 1)[0]
        assert host in lines[0] and "Traceback" not in result.stderr


# -- top ------------------------------------------------------------------------------------------


@pytest.fixture
def customers(db: str) -> str:
    """Three organizations on a plan: tokens priced, a storage gauge read daily."""
    from meterkit import Plan

    with Meter(db, clock=lambda: NOW) as m:
        m.set_price(
            {
                "meter": "tokens",
                "measure": "tokens",
                "unit_price": "3",
                "per": 1_000,
                "line_item": "tokens",
                "quantity_unit": "tokens",
            }
        )
        m.set_plan(Plan("small", limits={"tokens": 10_000, "storage_bytes": 2**30}))
        for org in ("org_a", "org_b", "org_c"):
            m.assign_plan(org, "small")
        events = []
        for org, tokens in (("org_a", 9_000), ("org_b", 300), ("org_c", 4_000)):
            events += [
                Event(f"{org}-t{i}", "tokens", org, MONTH + 60 * i, {"tokens": tokens // 3})
                for i in range(3)
            ]
        # Storage read once a day, growing: the column is the level at the end, not a sum.
        for day, size in enumerate((100, 200, 700)):
            events.append(
                Event(
                    f"s{day}", "storage_bytes", "org_b", MONTH - (3 - day) * DAY,
                    {"storage_bytes": size}, {"resource": "bucket"},
                )
            )  # fmt: skip
        m.record_many(events)
    return db


def top_json(db: str, *args: str) -> dict[str, Any]:
    result = run("top", "--start-time", str(MONTH - 5 * DAY), "--db", db, "--format", "json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_top_shows_every_organization_by_cost(customers: str) -> None:
    body = top_json(customers)
    assert body["columns"] == ["tokens", "storage_bytes"]
    rows = body["data"]
    assert [r["organization_id"] for r in rows] == ["org_a", "org_c", "org_b"]
    a, c, b = rows
    # $3 per 1,000 tokens, exact, as strings to the nano-dollar.
    assert (a["cost"], c["cost"], b["cost"]) == ("27.000000000", "11.997000000", "0.900000000")
    assert a["usage"] == {"tokens": 9_000, "storage_bytes": None}
    assert b["usage"] == {"tokens": 300, "storage_bytes": 700}  # the level now, not 1,000
    assert (a["quota_used"], a["quota_metric"]) == (0.9, "tokens")
    assert a["plan"] == "small" and a["spend"] == "27.000000000" and a["spend_limit"] is None
    with Meter(customers, clock=lambda: NOW) as m:
        costs = m.costs(organization_id="org_c", start_time=MONTH - 5 * DAY, end_time=NOW + 1)
        assert str(sum(r.amount for bucket in costs.data for r in bucket.results)) == "11.997"


def test_top_sorts_by_any_column_either_way_and_limits(customers: str) -> None:
    by_tokens = top_json(customers, "--sort", "tokens", "--ascending")["data"]
    assert [r["organization_id"] for r in by_tokens] == ["org_b", "org_c", "org_a"]
    # An organization without a value comes last either way.
    stored = top_json(customers, "--sort", "storage_bytes")["data"]
    assert stored[0]["organization_id"] == "org_b"
    assert (
        top_json(customers, "--sort", "organization", "--ascending", "--limit", "2")["data"]
        == top_json(customers, "--sort", "organization", "--ascending")["data"][:2]
    )
    chosen = top_json(customers, "--usage", "tokens.tokens", "--sort", "tokens")
    assert chosen["columns"] == ["tokens"]


def test_top_table_and_csv(customers: str) -> None:
    table = run("top", "--start-time", str(MONTH - 5 * DAY), "--db", customers)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert "organization" in lines[0] and "quota_used" in lines[0]
    assert "org_a" in lines[2] and "90.0%" in lines[2] and "27" in lines[2]
    text = run("top", "--start-time", str(MONTH - 5 * DAY), "--db", customers, "--format", "csv")
    rows = list(csv.reader(io.StringIO(text.stdout)))
    assert rows[0] == [
        "organization", "plan", "tokens", "storage_bytes", "cost", "spend", "spend_limit",
        "quota_used", "quota_metric",
    ]  # fmt: skip
    assert rows[1][:5] == ["org_a", "small", "9000", "", "27.000000000"]
    assert rows[1][7:] == ["0.9", "tokens"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--sort", "nothing"), "--sort: no column 'nothing'"),
        (("--usage", "nope"), "--usage: unknown meter 'nope'"),
        (("--usage", "tokens.x"), "--usage: tokens has no measure 'x'"),
        (("--end-time", str(MONTH - 9 * DAY)), "--end-time"),
        (("--start-time", "yesterday"), "--start-time"),
    ],
)
def test_top_refuses_bad_options_in_one_line(
    customers: str, args: tuple[str, ...], message: str
) -> None:
    result = run("top", "--db", customers, *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert result.stderr.count("\n") == 1
