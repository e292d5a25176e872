"""What a newcomer trips over first: the default end of a query, a meter's repr, docs that
stand on their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterkit import Measure, Meter, MeterSpec, ValidationError

NOW = 1_764_590_400  # 2025-12-01T12:00:00Z
ROOT = Path(__file__).resolve().parent.parent


def test_usage_right_after_record_sees_the_event_with_the_default_end() -> None:
    with Meter("memory://", clock=lambda: NOW + 0.25) as m:
        m.record("tokens", {"tokens": 7}, organization_id="org_1")  # time: now
        page = m.usage("tokens", organization_id="org_1", start_time=NOW - 3600, bucket_width="1h")
        assert [r.values["tokens"] for b in page.data for r in b.results] == [7]
        assert page.data[-1].end_time == NOW - NOW % 3600 + 3600
        costs = m.costs(organization_id="org_1", start_time=NOW - 60)
        assert costs.data  # the current day is in range
        # A start at this very second is fine; one after it is not.
        assert m.usage("tokens", organization_id="org_1", start_time=NOW, bucket_width="1m").data
        with pytest.raises(ValidationError) as info:
            m.usage("tokens", organization_id="org_1", start_time=NOW + 1)
        assert info.value.field == "start_time"


def test_a_meter_says_what_it_is() -> None:
    with Meter("memory://", meters=[MeterSpec("widgets", [Measure("widgets")])]) as m:
        text = repr(m)
        assert text.startswith("<Meter 'memory://'") and "own meters=['widgets']" in text
        assert "closed" not in text
    assert repr(m).endswith(" closed>")


def test_the_docs_stand_on_their_own() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        for outside in ("ENDPOINTS.md", "shared/spec", "shared/seeds", "§"):
            assert outside not in text, f"{page.name} cites {outside}, which is not in the repo"
