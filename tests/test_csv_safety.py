"""Exports safe to open in a spreadsheet, imports that report every bad record.

A tenant controls event ids, organization ids and dimension values through ``POST
/v1/events``; an export must never hand a spreadsheet a formula, and ``import`` must read back
exactly what ``export`` wrote. Hostile files (formula prefixes, control characters, deep and huge
values) are reported line by line, never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterkit import Event, Meter
from meterkit.cliio import csv_row, escape_cell, unescape_cell
from test_cli_data import DAY, MONTH, NOW, native, run, stored

FORMULA = ("=", "+", "-", "@", "\t", "\r")
HOSTILE = "=+-@'\"\t\r\n,;|!aZ0 ü"


@given(st.text(alphabet=st.sampled_from(list(HOSTILE)) | st.characters(), max_size=12))
def test_an_escaped_cell_is_never_a_formula_and_unescapes_exactly(text: str) -> None:
    escaped = escape_cell(text)
    assert not escaped.startswith(FORMULA)
    assert unescape_cell(escaped) == text
    assert escaped in (text, "'" + text)


@given(st.lists(st.text(alphabet=st.sampled_from(list(HOSTILE)), max_size=8), min_size=1))
def test_a_csv_row_reads_back_cell_for_cell(cells: list[str]) -> None:
    line = csv_row(cells)
    assert line.endswith("\n")
    assert list(csv.reader(io.StringIO(line, newline=""))) == [cells]


_ID = st.text(alphabet=st.sampled_from(list("=+-@'\"aZ0_,")), min_size=1, max_size=8).filter(
    lambda s: s.strip() == s
)
_DIM = st.text(alphabet=st.sampled_from(list(HOSTILE)), min_size=1, max_size=10)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(_ID, _ID, _DIM, st.integers(0, 10**6)), max_size=8, unique_by=lambda r: r[:2]
    )
)
def test_a_hostile_export_opens_safely_and_imports_back_losslessly(
    tmp_path: Path, rows: list[tuple[str, str, str, int]]
) -> None:
    events = [
        Event(f"{eid}{i}", "tokens", org, MONTH + i, {"tokens": n}, {"model": model})
        for i, (eid, org, model, n) in enumerate(rows)
    ]
    key = abs(hash(tuple(rows)))
    src, dst = tmp_path / f"s{key}.db", tmp_path / f"d{key}.db"
    with Meter(f"sqlite:///{src}", clock=lambda: NOW) as m:
        m.record_many(events)
    out = tmp_path / f"out{key}.csv"
    assert (
        run("export", "--format", "csv", "-o", str(out), "--db", f"sqlite:///{src}").exit_code == 0
    )
    with out.open(newline="") as handle:
        table = list(csv.reader(handle))
    header = table[0]
    for row in table[1:]:
        for name, cell in zip(header, row):
            if name != "time" and not name.startswith("value."):
                assert not cell.startswith(FORMULA), (name, cell)
    imported = run("import", str(out), "--db", f"sqlite:///{dst}")
    assert imported.exit_code == 0, imported.output
    for org in {e.organization_id for e in events}:
        assert stored(f"sqlite:///{dst}", org=org) == stored(f"sqlite:///{src}", org=org)


def test_usage_and_costs_csv_neutralise_a_tenants_formula(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'f.db'}"
    formula = '=HYPERLINK("http://evil.example","x")'
    with Meter(db, clock=lambda: NOW) as m:
        m.record_many([Event(**native(1, dimensions={"model": formula}))])
        m.set_price(
            {
                "meter": "tokens",
                "measure": "tokens",
                "unit_price": "2.50",
                "per": 1_000_000,
                "line_item": "=1+1",
                "quantity_unit": "tokens",
            }
        )
    usage = _csv_cells(db, "usage", "tokens", "--group-by", "model")
    assert "'" + formula in usage and formula not in usage
    costs = _csv_cells(db, "costs", "--group-by", "line_item")
    assert "'=1+1" in costs and not any(c.startswith(FORMULA) for c in costs if c[:1] != "-")


def _csv_cells(db: str, *command: str) -> list[str]:
    """Every cell of a ``usage`` or ``costs`` page of org_1's month, as CSV."""
    args = ("--org", "org_1", "--start-time", str(MONTH), "--format", "csv", "--db", db)
    result = run(*command, *args)
    assert result.exit_code == 0, result.output
    return [c for row in csv.reader(io.StringIO(result.stdout)) for c in row]


def _import(db: str, path: Path, *extra: str) -> Any:
    return run("import", str(path), "--db", db, "--batch-size", "3", *extra)


def _deep_ndjson() -> list[str]:
    lines = [json.dumps(native(i)) for i in range(6)]
    lines[4] = "[" * 100_000 + "]" * 100_000
    return lines


def _huge_csv() -> list[str]:
    rows = ["id,meter,organization_id,time,value.tokens,dim.model"]
    rows += [f"e{i},tokens,org_1,{MONTH + i},{i + 1},m" for i in range(6)]
    rows[5] = f"e4,tokens,org_1,{MONTH},1," + "x" * 200_000
    return rows


@pytest.mark.parametrize(
    ("name", "lines", "reported"),
    [
        ("deep.ndjson", _deep_ndjson(), ":5: is nested too deeply to read"),
        ("huge.csv", _huge_csv(), ":6: is not valid CSV"),
    ],
)
def test_a_line_too_deep_or_too_big_is_reported_not_a_traceback(
    tmp_path: Path, name: str, lines: list[str], reported: str
) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    result = _import(db, path)
    assert result.exit_code == 2
    assert f"{path}{reported}" in result.stderr
    assert "Traceback" not in result.output
    # Its batch (of three) stored nothing; the first batch is stored.
    assert [e.id for e in stored(db)] == ["e0", "e1", "e2"]


def test_every_bad_record_of_a_batch_is_reported(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'b.db'}"
    path = tmp_path / "bad.ndjson"
    events = [native(i) for i in range(6)]
    events[0]["values"] = {"tokens": -1}
    events[2]["values"] = {"nope": 1}
    events[4]["meter"] = "no_such_meter"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    result = _import(db, path, "--batch-size", "6")
    assert result.exit_code == 2
    for line in (1, 3, 5):
        assert f"{path}:{line}:" in result.stderr, result.stderr
    assert stored(db) == []


def test_bad_records_beyond_the_cap_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meterkit import clidata

    monkeypatch.setattr(clidata, "MAX_REPORTED", 2)
    db = f"sqlite:///{tmp_path / 'c.db'}"
    path = tmp_path / "bad.ndjson"
    path.write_text("not json\n" * 5)
    result = _import(db, path)
    assert result.exit_code == 2
    assert result.stderr.count("is not valid JSON") == 2
    assert "… and 3 more bad records not shown" in result.stderr


def test_numbers_are_written_as_they_are_and_text_like_one_is_escaped() -> None:
    """Numbers are written as they are: a negative-looking number cell is never prefixed."""
    assert escape_cell("-5") == "'-5"  # text that looks like a number is still text
    line = csv_row(["-5", str(DAY)])
    assert line == "-5,86400\n"
