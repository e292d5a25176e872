"""The JSON Schema of shared request fields (``meterkit.http.fields``) admits exactly what the
checks behind them admit: for any string, the pattern matches if and only if the check takes
it. And a body's ``2747.0`` is the integer JSON Schema says it is."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterkit.errors import ValidationError
from meterkit.http import fields
from meterkit.http.params import parse_json
from meterkit.spend import NotificationChannel
from meterkit.validate import MAX_VALUE, check_id, check_string

# Characters the checks treat specially, mixed with anything else.
_EDGES = st.sampled_from(
    [" ", "\t", "\x00", "\x01", "\x1f", "\x7f", "\x85", "\xa0", "\u2028", "\u3000", "\ufeff",
     "@", ".", "<", ",", ";", "\r", "\n", "\x0b", "a", "Z", "é", "😀"]
)  # fmt: skip
STRINGS = st.lists(st.one_of(_EDGES, st.characters(codec="utf-8")), max_size=12).map("".join)


def _takes(check: Any, value: str) -> bool:
    try:
        check(value)
    except ValidationError:
        return False
    return True


def _matches(schema: dict[str, Any], value: str) -> bool:
    if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9):
        return False
    # ECMA-262's "$" (JSON Schema's) ends the string; Python's also matches before a final
    # newline, so "\\Z" stands in for it.
    return re.search(schema["pattern"].replace("$", "\\Z"), value) is not None


@settings(max_examples=500)
@given(STRINGS)
def test_the_id_pattern_is_check_id(value: str) -> None:
    assert _matches(fields.ID, value) == _takes(lambda v: check_id("id", v), value)


@settings(max_examples=500)
@given(STRINGS)
def test_the_text_pattern_is_check_string(value: str) -> None:
    assert _matches(fields.TEXT, value) == _takes(lambda v: check_string("text", v), value)


@settings(max_examples=500)
@given(STRINGS)
def test_the_email_pattern_is_what_an_alert_takes(value: str) -> None:
    def check(v: str) -> None:
        NotificationChannel((v,))

    assert _matches(fields.EMAIL, value) == _takes(check, value)


@pytest.mark.parametrize("value", ["a" * 256, "a" * 257, "x@y.z", " x@y.z", "x@y", "@y.z"])
def test_the_patterns_at_their_edges(value: str) -> None:
    assert _matches(fields.ID, value) == _takes(lambda v: check_id("id", v), value)
    assert _matches(fields.EMAIL, value) == _takes(lambda v: NotificationChannel((v,)), value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2747.0", 2747),
        ("2.747e3", 2747),
        ("-0.0", 0),
        ("2.5", 2.5),
        (str(float(MAX_VALUE)), MAX_VALUE),
        ("1e300", 1e300),  # beyond what a counter holds exactly: left a float, refused later
    ],
)
def test_a_whole_number_in_a_body_is_an_int(text: str, expected: Any) -> None:
    found = parse_json(text)
    assert found == expected and type(found) is type(expected)
