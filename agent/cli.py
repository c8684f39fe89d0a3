"""``edgefleet agent``: the on-device daemon and the fleet simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hw_profiles.cli_support import not_implemented

app = typer.Typer(help="On-device agent: inference, telemetry, updates.", no_args_is_help=True)


@app.command("run")
def run(config: Annotated[Path, typer.Option(help="agent.toml to run with.")]) -> None:
    """Run the agent daemon."""
    not_implemented("agent run", issue=6)


@app.command("simulate")
def simulate(devices: Annotated[int, typer.Option(help="How many devices to simulate.")]) -> None:
    """Run many lightweight simulated devices against a fleet server."""
    not_implemented("agent simulate", issue=6)


@app.command("install")
def install() -> None:
    """Install the agent on this board: venv, runtimes, systemd unit, config."""
    not_implemented("agent install", issue=6)
