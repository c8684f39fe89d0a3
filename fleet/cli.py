"""``edgefleet fleet``: the fleet server and rollouts."""

from __future__ import annotations

from typing import Annotated

import typer

from hw_profiles.cli_support import not_implemented

app = typer.Typer(help="Fleet server: registry, devices, rollouts.", no_args_is_help=True)
rollout_app = typer.Typer(help="Staged rollouts through cohorts.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")

RolloutId = Annotated[str, typer.Argument(help="Rollout id.")]


@app.command("serve")
def serve() -> None:
    """Run the fleet server (embedded defaults: a SQLite file and a local mosquitto)."""
    not_implemented("fleet serve", issue=5)


@rollout_app.command("create")
def rollout_create() -> None:
    """Start a rollout of a bundle to devices chosen by profile and tags."""
    not_implemented("fleet rollout create", issue=5)


@rollout_app.command("status")
def rollout_status(rollout: RolloutId) -> None:
    """Show a rollout's waves, gates and device counts."""
    not_implemented("fleet rollout status", issue=5)


@rollout_app.command("pause")
def rollout_pause(rollout: RolloutId) -> None:
    """Pause a rollout before its next wave."""
    not_implemented("fleet rollout pause", issue=5)


@rollout_app.command("resume")
def rollout_resume(rollout: RolloutId) -> None:
    """Resume a paused rollout."""
    not_implemented("fleet rollout resume", issue=5)


@rollout_app.command("rollback")
def rollout_rollback(rollout: RolloutId) -> None:
    """Send every device that took the bundle back to its previous one."""
    not_implemented("fleet rollout rollback", issue=5)
