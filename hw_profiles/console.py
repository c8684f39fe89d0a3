"""The ``edgefleet`` console script: one sub-command group per package.

The top level of the repository is fixed, so the root lives in ``hw_profiles``, the one
package every install carries with nothing but base dependencies. Each group lives in its
own package's ``cli.py`` and imports heavy libraries (TVM, TensorFlow) only inside the
command that needs them, so ``edgefleet --help`` works on an ``edgefleet[agent]`` device.
"""

from __future__ import annotations

import typer
from rich.console import Console

import agent.cli
import compiler.cli
import fleet.cli
import ota.cli

from . import cli as profiles_cli
from .errors import ProfileError
from .loader import list_profiles, load_profile

app = typer.Typer(
    name="edgefleet",
    help="Take a trained model to a fleet of edge devices and keep it healthy there.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(profiles_cli.app, name="profiles")
app.command("compile")(compiler.cli.compile_command)
app.add_typer(ota.cli.app, name="ota")
app.add_typer(fleet.cli.app, name="fleet")
app.add_typer(agent.cli.app, name="agent")


@app.command("demo")
def demo() -> None:
    """Run the end-to-end story on one machine (compile, bundle, roll out, serve)."""
    console = Console()
    profiles = []
    for name in list_profiles():
        try:
            profiles.append(load_profile(name))
        except ProfileError as e:
            console.print(f"[yellow]skipped a broken profile:[/] {e}")
    console.print(profiles_cli.profiles_table(profiles))
    console.print(
        "\n[bold]The full demo is coming.[/] Today edgefleet knows the hardware profiles above. "
        "The end-to-end story (compile a model for a profile, sign a bundle, roll it out "
        "through the fleet server, install it with the agent) arrives with issues #3 to #6."
    )
