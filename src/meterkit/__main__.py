"""``python -m meterkit``: the ``meterkit`` command, for environments without its script."""

from meterkit.cli import main

main(prog_name="meterkit")
