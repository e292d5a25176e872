"""The asset registry: storage recalculation's source when no plugin reports assets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import services
from meterkit import Meter, ValidationError, hookimpl

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from services.store_urls(request.param, tmp_path, "a")


def test_put_list_delete_and_recalculate(url: str) -> None:
    with Meter(url, clock=lambda: NOW) as m:
        assert m.assets("org_a") == []
        m.put_asset("org_a", "maps/base", 300)
        m.put_asset("org_a", "maps/overlay", 200)
        m.put_asset("org_a", "maps/base", 350)  # resized
        m.put_asset("org_b", "other", 9)
        got = [(a.resource, a.bytes, a.updated_at) for a in m.assets("org_a")]
        assert got == [("maps/base", 350, NOW), ("maps/overlay", 200, NOW)]
        done = m.recalculate_storage("org_a")
        assert (done["storage_bytes"], done["resources"]) == (550, 2)
        assert m.quotas.used("org_a", "storage_bytes") == 550
        assert m.delete_asset("org_a", "maps/overlay") is True
        assert m.delete_asset("org_a", "maps/overlay") is False
        assert m.recalculate_storage("org_a")["storage_bytes"] == 350
        # A fresh organization has no assets: nothing is stored.
        assert m.recalculate_storage("org_new")["storage_bytes"] == 0


@pytest.mark.parametrize(
    ("org", "resource", "size", "field"),
    [
        ("org_a", "x", -1, "bytes"),
        ("org_a", "x", 1.5, "bytes"),
        ("org_a", "x", True, "bytes"),
        ("org_a", "x", 2**60, "bytes"),
        ("org_a", "", 1, "resource"),
        ("", "x", 1, "organization_id"),
    ],
)
def test_bad_assets_are_refused_and_change_nothing(
    org: str, resource: str, size: object, field: str
) -> None:
    with Meter("memory://", clock=lambda: NOW) as m:
        with pytest.raises(ValidationError) as err:
            m.put_asset(org, resource, size)  # type: ignore[arg-type]
        assert err.value.field == field
        assert m.assets("org_a") == []


class Reporter:
    @hookimpl
    def meterkit_stored_assets(self, organization_id: str) -> dict[str, int] | None:
        return {"from/plugin": 42} if organization_id == "org_p" else None


def test_a_plugin_that_answers_overrides_the_registry() -> None:
    with Meter("memory://", clock=lambda: NOW, plugins=[Reporter()]) as m:
        m.put_asset("org_p", "registered", 1000)
        m.put_asset("org_r", "registered", 1000)
        assert m.recalculate_storage("org_p")["storage_bytes"] == 42
        # Where the plugin has nothing to say, the registry answers.
        assert m.recalculate_storage("org_r")["storage_bytes"] == 1000
