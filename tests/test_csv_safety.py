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
from meterkit.cli.eventfiles import csv_row, escape_cell, unescape_cell
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
    from meterkit.cli import ingest as clidata

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


# -- a hostile corpus, both ways ------------------------------------------------------------------

CONTROL = "\x01\x07\x1b\x7f\x85\u2028\u2029\x0b\x0c"
_HOSTILE_VALUES = [
    '=HYPERLINK("http://evil.example","x")',
    "+1+1",
    "-2-2",
    "@SUM(A1:A9)",
    "\t=1",
    "\r=1",
    "a\r\nb",
    "'quoted",
    '"',
    "a,b;c",
    "x" + CONTROL + "y",
    "ü" * 256,  # as long as a value may be
    "🙂\u200b\ufeff",
]


def _corpus_lines() -> tuple[list[bytes], list[int]]:
    """Good events with every hostile value, bad lines of every kind among them, and the
    numbers of the bad lines."""
    good = [
        json.dumps(
            native(i, id=f"{prefix}e{i}", organization_id=f"{prefix}org", dimensions={"model": v})
        ).encode()
        for i, (prefix, v) in enumerate(zip(["=", "+", "-", "@", ""] * 3, _HOSTILE_VALUES))
    ]
    bad = [
        b'{"id": "u1", "meter": "tokens", "organization_id": "o", "time": 1, "values": {}, '
        b'"dimensions": {"model": "\xff\xfe"}}',  # not UTF-8
        b"[" * 50_000 + b"]" * 50_000,  # too deep
        json.dumps(native(90, dimensions={"model": "a\x00b"})).encode(),  # NUL
        json.dumps(native(91, dimensions={"model": "\ud800"})).encode(),  # a lone surrogate
        json.dumps(native(92, dimensions={"model": "x" * 300_000})).encode(),  # too long
        b'{"id": ',  # cut short
    ]
    lines = good[:6] + bad[:3] + good[6:] + bad[3:]
    return lines, [n for n, line in enumerate(lines, 1) if line in bad]


def test_a_hostile_corpus_imports_exports_and_imports_again_with_nothing_lost(
    tmp_path: Path,
) -> None:
    lines, bad_numbers = _corpus_lines()
    corpus = tmp_path / "hostile.ndjson"
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    first = f"sqlite:///{tmp_path / 'first.db'}"
    result = _import(first, corpus, "--batch-size", "1")
    # Every bad line is reported by its number, and nothing else is.
    assert result.exit_code == 2
    prefix = f"{corpus}:"
    reported = [
        int(x[len(prefix) :].split(":")[0])
        for x in result.stderr.splitlines()
        if x.startswith(prefix)
    ]
    assert reported == bad_numbers and len(bad_numbers) == 6, result.stderr
    assert f"{corpus}:{bad_numbers[0]}: is not UTF-8 text" in result.stderr
    assert "Traceback" not in result.output
    orgs = {f"{p}org" for p in ["=", "+", "-", "@", ""]}
    kept = [e for org in sorted(orgs) for e in stored(first, org=org)]
    assert sorted(e.dimensions["model"] for e in kept) == sorted(_HOSTILE_VALUES)

    for fmt in ("csv", "ndjson"):
        out = tmp_path / f"out.{fmt}"
        done = run("export", "--format", fmt, "-o", str(out), "--db", first)
        assert done.exit_code == 0, done.output
        if fmt == "csv":
            with out.open(newline="", encoding="utf-8") as handle:
                table = list(csv.reader(handle))
            for row in table[1:]:
                for name, cell in zip(table[0], row):
                    if name != "time" and not name.startswith("value."):
                        assert not cell.startswith(FORMULA), (name, cell)
        again = f"sqlite:///{tmp_path / f'again-{fmt}.db'}"
        back = run("import", str(out), "--db", again)
        assert back.exit_code == 0, back.output
        for org in orgs:
            assert stored(again, org=org) == stored(first, org=org)


def test_a_hostile_csv_reports_each_bad_row_and_keeps_the_rest(tmp_path: Path) -> None:
    lines, _bad = _corpus_lines()
    corpus = tmp_path / "hostile.ndjson"
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    first = f"sqlite:///{tmp_path / 'first.db'}"
    _import(first, corpus, "--batch-size", "1")
    out = tmp_path / "out.csv"
    assert run("export", "--format", "csv", "-o", str(out), "--db", first).exit_code == 0
    header, body = out.read_bytes().split(b"\n", 1)
    broken = [
        b"e\xff1,tokens,org,1764547200,5,m",  # not UTF-8
        b"e\x002,tokens,org,1764547200,5,m",  # a NUL byte
        b"e3,tokens,org,1764547200",  # too few cells
    ]
    unclosed = b'"e4,tokens,org,1764547200,5,m\n'  # a quote open to the end of the file
    hostile = tmp_path / "hostile.csv"
    hostile.write_bytes(b"\n".join([header, *broken, b""]) + body + unclosed)
    again = f"sqlite:///{tmp_path / 'again.db'}"
    result = run("import", str(hostile), "--db", again, "--batch-size", "1")
    assert result.exit_code == 2 and "Traceback" not in result.output
    reported = [x for x in result.stderr.splitlines() if x.startswith(f"{hostile}:")]
    assert [x.split(":")[1] for x in reported[:3]] == ["2", "3", "4"], result.stderr
    assert f"{hostile}:2: is not UTF-8 text" in result.stderr
    assert len(reported) == 4 and "has 1 cells" in reported[3], result.stderr  # the open quote
    for org in {f"{p}org" for p in ["=", "+", "-", "@", ""]}:
        assert stored(again, org=org) == stored(first, org=org)
