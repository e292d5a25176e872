"""Every hook is documented and tested; the plugin manager is built the documented way."""

from __future__ import annotations

import datetime as dt
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy
import pytest

import meterkit
from meterkit import Event, Meter, hookimpl, hookspecs
from meterkit.plugins import BUILTIN_PLUGINS, get_plugin_manager, make_plugin_manager
from meterkit.stores.memory import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
T0 = int(dt.datetime(2024, 11, 1, tzinfo=dt.timezone.utc).timestamp())


def _hooks() -> dict[str, Callable[..., Any]]:
    # pluggy marks a hook specification with a "<project>_spec" attribute.
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if callable(fn) and hasattr(fn, "meterkit_spec")
    }


HOOKS = _hooks()


def test_hooks_are_found() -> None:
    # Guards the tests below against passing vacuously.
    assert {
        "meterkit_open_store",
        "meterkit_store_schemes",
        "meterkit_register_meters",
        "meterkit_events_recorded",
    } <= set(HOOKS)
    assert all(name.startswith("meterkit_") for name in HOOKS)
    pm = make_plugin_manager(entry_points=False)
    assert {name for name in vars(pm.hook) if name.startswith("meterkit_")} == set(HOOKS)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_has_docstring(name: str) -> None:
    doc = inspect.getdoc(HOOKS[name])
    assert doc and len(doc.split()) >= 5, f"{name} needs a docstring saying what it is for"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_is_documented(name: str) -> None:
    assert PLUGINS_DOC.exists(), "docs/plugins.md is missing"
    text = PLUGINS_DOC.read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if re.match(r"^#{1,6}\s", line)]
    heading = next((h for h in headings if re.search(rf"\b{name}\(", h)), None)
    assert heading is not None, f"docs/plugins.md has no heading for {name}(...)"
    # The heading gives the signature: every argument, in order.
    params = list(inspect.signature(HOOKS[name]).parameters)
    shown = heading.split(f"{name}(", 1)[1].split(")", 1)[0]
    assert [p.strip() for p in shown.split(",") if p.strip()] == params


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_is_tested(name: str) -> None:
    others = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_hooks.py"]
    users = [p.name for p in others if name in p.read_text(encoding="utf-8")]
    assert users, f"no test module other than test_hooks.py exercises {name}"


# --------------------------------------------------------------------------------------------
# The plugin manager.
# --------------------------------------------------------------------------------------------


def test_builtins_are_registered_by_module_name() -> None:
    pm = make_plugin_manager(entry_points=False)
    assert {"meterkit.stores.memory", "meterkit.stores.sqlite"} <= set(BUILTIN_PLUGINS)
    for name in BUILTIN_PLUGINS:
        plugin = pm.get_plugin(name)
        assert plugin is not None and plugin.__name__ == name
    schemes = {s for group in pm.hook.meterkit_store_schemes() for s in group}
    assert {"memory", "sqlite"} <= schemes


def test_extra_plugins_are_registered_after_builtins() -> None:
    class Extra:
        @hookimpl
        def meterkit_store_schemes(self) -> list[str]:
            return ["extra"]

    extra = Extra()
    pm = make_plugin_manager([extra], entry_points=False)
    assert pm.is_registered(extra)
    # pluggy calls the last registered first: the extra plugin answers before the built-ins.
    assert pm.hook.meterkit_store_schemes()[0] == ["extra"]


def test_unknown_hook_is_rejected_by_check_pending() -> None:
    class Misspelt:
        @hookimpl
        def meterkit_open_stor(self, url: str, scheme: str) -> None:
            return None

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager([Misspelt()], entry_points=False)


def test_wrong_hook_arguments_are_rejected() -> None:
    class WrongArgs:
        @hookimpl
        def meterkit_open_store(self, address: str) -> None:
            return None

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager([WrongArgs()], entry_points=False)


def test_entry_points_group(monkeypatch: pytest.MonkeyPatch) -> None:
    groups: list[str] = []

    def fake_load(self: pluggy.PluginManager, group: str, name: str | None = None) -> int:
        groups.append(group)
        return 0

    monkeypatch.setattr(pluggy.PluginManager, "load_setuptools_entrypoints", fake_load)
    monkeypatch.delenv("METERKIT_NO_ENTRY_POINTS", raising=False)
    make_plugin_manager()
    assert groups == ["meterkit"]
    make_plugin_manager(entry_points=False)
    monkeypatch.setenv("METERKIT_NO_ENTRY_POINTS", "1")
    make_plugin_manager()
    assert groups == ["meterkit"]


def test_shared_plugin_manager() -> None:
    assert get_plugin_manager() is get_plugin_manager()
    with Meter("memory://") as plain:
        assert plain.pm is get_plugin_manager()

    class Nothing:
        @hookimpl
        def meterkit_store_schemes(self) -> list[str]:
            return []

    nothing = Nothing()
    with Meter("memory://", plugins=[nothing]) as own:
        assert own.pm is not get_plugin_manager()
        assert own.pm.is_registered(nothing)
        assert not get_plugin_manager().is_registered(nothing)


def test_first_store_plugin_wins() -> None:
    opened: list[str] = []

    class Shadow:
        """Claims memory:// before the built-in does, and records that it was asked."""

        @hookimpl
        def meterkit_open_store(self, url: str, scheme: str) -> Any:
            opened.append(url)
            if scheme != "memory":
                return None
            store = MemoryStore(url)
            store.shadowed = True  # type: ignore[attr-defined]
            return store

    with Meter("memory://", plugins=[Shadow()]) as meter:
        assert getattr(meter.store, "shadowed", False)
    assert opened == ["memory://"]


def test_observer_error_propagates_but_events_stay() -> None:
    class Failing:
        @hookimpl
        def meterkit_events_recorded(self, meter: Any, events: tuple[Event, ...]) -> None:
            raise RuntimeError("observer broke")

    with Meter("memory://", plugins=[Failing()]) as meter:
        with pytest.raises(RuntimeError, match="observer broke"):
            meter.record(
                "completions", {"input_tokens": 4}, organization_id="org_1", time=T0, id="kept"
            )
        # Stored despite the error: recording it again is a duplicate, and it is counted.
        assert (
            meter.record(
                "completions", {"input_tokens": 4}, organization_id="org_1", time=T0, id="kept"
            )
            is False
        )
        page = meter.usage(
            "completions", organization_id="org_1", start_time=T0, end_time=T0 + 86400
        )
        assert page.data[0].results[0].values["input_tokens"] == 4


def test_hookimpl_is_public() -> None:
    assert meterkit.hookimpl is hookimpl
    assert hookimpl.project_name == "meterkit"
