"""``edgefleet profiles``: list and show hardware profiles."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from contracts.cli import JsonOption, fail, print_json

from .errors import ProfileError
from .loader import list_profiles, load_profile
from .schema import Profile

app = typer.Typer(help="Hardware profiles: the boards edgefleet builds for.", no_args_is_help=True)


def profiles_table(profiles: Sequence[Profile]) -> Table:
    """One row per profile, the facts that tell boards apart, in 80 columns.

    Runtimes that run on the GPU are marked ``+gpu``; ``profiles show`` has the rest.
    """
    table = Table(title="Hardware profiles", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("CPU", no_wrap=True)
    table.add_column("GPU", no_wrap=True)
    table.add_column("cores", justify="right")
    table.add_column("mem MB", justify="right")
    table.add_column("runtimes", no_wrap=True)
    detected = [p.name for p in profiles if p.detected]
    if detected:
        table.caption = f"{', '.join(detected)}: detected from this machine"
    for p in profiles:
        table.add_row(
            p.name,
            str(p.targets.cpu.get("mcpu", p.arch)),
            str(p.targets.gpu["arch"]) if p.targets.gpu else "-",
            str(p.resources.cores),
            str(p.resources.memory_budget_mb),
            "\n".join(r.name + ("+gpu" if r.device == "gpu" else "") for r in p.runtimes),
        )
    return table


def _is_scalar_list(value: Any) -> bool:
    return isinstance(value, list) and not any(isinstance(v, Mapping | list) for v in value)


def _tree(label: str, data: Mapping[str, Any] | Sequence[Any]) -> Tree:
    tree = Tree(label)
    items = data.items() if isinstance(data, Mapping) else enumerate(data)
    for key, value in items:
        if isinstance(value, Mapping | list) and value and not _is_scalar_list(value):
            tree.add(_tree(f"[bold]{key}[/]", value))
        else:
            tree.add(f"[bold]{key}[/] = {value!r}")
    return tree


@app.command("list")
def list_command(json_output: JsonOption = False) -> None:
    """List every profile on the search path (EDGEFLEET_PROFILES_PATH, then the shipped ones)."""
    profiles: list[Profile] = []
    broken: list[ProfileError] = []
    for name in list_profiles():
        try:
            profiles.append(load_profile(name))
        except ProfileError as e:
            broken.append(e)
    if json_output:
        print_json([p.model_dump(mode="json") for p in profiles])
    else:
        Console().print(profiles_table(profiles))
    if broken:
        fail("\n".join(str(e) for e in broken))


@app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="Profile name, e.g. rpi4.")],
    json_output: JsonOption = False,
) -> None:
    """Show one profile in full: targets, toolchain, resources, runtimes, gates, install notes."""
    try:
        profile = load_profile(name)
    except ProfileError as e:
        fail(e)
    data = profile.model_dump(mode="json")
    if json_output:
        print_json(data)
    else:
        Console().print(_tree(f"[bold]{profile.name}[/]: {profile.description}", data))
