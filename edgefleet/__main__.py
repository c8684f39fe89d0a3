"""``python -m edgefleet``: the same as the ``edgefleet`` command."""

from edgefleet.cli import run

run()
