"""The ``meterkit`` command and the demo: :mod:`~meterkit.cli.main` (serve, keys, rollups,
prune, demo), :mod:`~meterkit.cli.data` (record, import, export, usage, costs, quota, top,
plans, metrics, prices, doctor), :mod:`~meterkit.cli.eventfiles` (event files: NDJSON, JSON, CSV,
CloudEvents; cells safe in a spreadsheet), :mod:`~meterkit.cli.common` (opening the store,
errors as exits), :mod:`~meterkit.cli.demo` and :mod:`~meterkit.cli.demo_model`. Nothing in
the library imports them. See docs/cli.md."""

from meterkit.cli.main import main

__all__ = ["main"]
