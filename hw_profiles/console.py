"""The ``edgefleet`` console script: one sub-command group per package.

The top level of the repository is fixed, so the root lives in ``hw_profiles``, the one
package every install carries with nothing but base dependencies. Each group lives in its
own package's ``cli.py`` and imports heavy libraries (TVM, TensorFlow) only inside the
command that needs them, so ``edgefleet --help`` works on an ``edgefleet[agent]`` device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import agent.cli
import compiler.cli
import fleet.cli
import ota.cli

from . import cli as profiles_cli

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
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes its models.")] = Path(
        "build/demo"
    ),
) -> None:
    """Run the end-to-end story on one machine: train, compile per profile, gate, report."""
    from .demo import run_demo

    run_demo(out)
