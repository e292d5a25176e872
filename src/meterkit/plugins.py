"""The plugin manager: built-in stores, then third-party plugins from entry points.

Third-party plugins register in the entry-point group ``meterkit``.

Entry points are loaded the first time a plugin manager is needed, not at import.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable

import pluggy

from meterkit import hookspecs

__all__ = ["BUILTIN_PLUGINS", "get_plugin_manager", "make_plugin_manager"]

BUILTIN_PLUGINS: tuple[str, ...] = (
    "meterkit.stores.memory",
    "meterkit.stores.sqlite",
    "meterkit.stores.postgres",
    "meterkit.stores.redis",
)

_default: pluggy.PluginManager | None = None


def make_plugin_manager(
    extra: Iterable[object] = (), *, entry_points: bool = True
) -> pluggy.PluginManager:
    """A new plugin manager with the built-ins, the installed entry points and ``extra``."""
    pm = pluggy.PluginManager("meterkit")
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if entry_points and not os.environ.get("METERKIT_NO_ENTRY_POINTS"):
        pm.load_setuptools_entrypoints("meterkit")
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The shared plugin manager, created (and entry points loaded) on first call."""
    global _default
    if _default is None:
        _default = make_plugin_manager()
    return _default
