"""The data commands of ``meterkit``: record, import, export, usage, costs, quota, top, plans,
metrics, prices, doctor and shell completion (see docs/cli.md), each in the module of its kind:
:mod:`~meterkit.cli.ingest`, :mod:`~meterkit.cli.reports`, :mod:`~meterkit.cli.admin`, with
what they share in :mod:`~meterkit.cli.options`.

Every command exits 2 on bad input with one line naming the option at fault, 1 when the store
does not answer, and a command that only reads never creates a store.
"""

from __future__ import annotations

import click

from meterkit.cli.admin import (
    completion,
    doctor,
    metrics,
    plans,
    prices,
    spend_cap,
)
from meterkit.cli.ingest import export, import_, record
from meterkit.cli.reports import costs, quota, top, usage

__all__ = ["COMMANDS"]

COMMANDS: tuple[click.Command, ...] = (
    record,
    import_,
    export,
    usage,
    costs,
    quota,
    top,
    plans,
    metrics,
    spend_cap,
    prices,
    doctor,
    completion,
)
"""Every data command, in the order ``meterkit --help`` lists them (see :mod:`meterkit.cli`)."""
