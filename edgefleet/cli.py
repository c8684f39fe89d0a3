"""The ``edgefleet`` console script: the roof that puts every package's command group together.

Each group lives in its own package's ``cli.py`` and imports heavy libraries (TVM,
TensorFlow, FastAPI) only inside the command that needs them, so ``edgefleet --help`` works
on an ``edgefleet[agent]`` device. This package is the only one that imports all the
others; nothing imports it.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Annotated

import typer

import agent.cli
import compiler.cli
import fleet.cli
import hw_profiles.cli
import ota.cli
from contracts.cli import EXIT_ERROR, EXIT_INTERRUPTED, print_error

app = typer.Typer(
    name="edgefleet",
    help="Take a trained model to a fleet of edge devices and keep it healthy there.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: click's formatter keeps every option name whole at 80 columns, and gives
    # flags no metavar; rich's panels truncated names and showed `<bool>` on every flag.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        try:
            version = importlib.metadata.version("edgefleet")
        except importlib.metadata.PackageNotFoundError:  # a source tree, not installed
            version = "unknown (not installed)"
        typer.echo(f"edgefleet {version}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Take a trained model to a fleet of edge devices and keep it healthy there."""


app.add_typer(hw_profiles.cli.app, name="profiles")
app.command("compile")(compiler.cli.compile_command)
app.add_typer(ota.cli.app, name="ota")
app.add_typer(fleet.cli.app, name="fleet")
app.add_typer(agent.cli.app, name="agent")
# The simulator is a fleet-side tool (it ships with the fleet, not on devices); its old
# place under `agent` stays as an alias.
agent.cli.app.command("simulate", help="Alias of `edgefleet fleet simulate`.")(fleet.cli.simulate)


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes its models.")] = Path(
        "build/demo"
    ),
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="Leave the fleet and dashboard up until Ctrl-C.")
    ] = False,
) -> None:
    """The end-to-end story on one machine: train, compile per profile, sign, then a fleet
    with a real agent and simulated devices: two releases rolled out in waves, a broken
    third rolled back by its gate, local and cloud answers."""
    from .demo import run_demo

    run_demo(out, keep_running=keep_running)


def run() -> None:
    """The console script: the app, with the mistakes any command can meet turned into one
    ``error:`` line instead of a traceback: a file that is missing or unreadable (exit 1),
    Ctrl-C (exit 130)."""
    try:
        app(prog_name="edgefleet")
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print_error(f"{where}{e.strerror or e}")
        raise SystemExit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
