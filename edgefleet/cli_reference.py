"""The CLI reference, docs/cli.md, generated from the typer app so it cannot drift from it.

``python -m edgefleet.cli_reference`` (``make cli-reference``) rewrites docs/cli.md: every
command's ``--help`` as it prints at 80 columns, in the app's order;
``tests/test_cli_reference.py`` fails when the file is not what this prints.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from .cli import app

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = 80
HEADER = """\
# The `edgefleet` command

Generated from the typer app by `python -m edgefleet.cli_reference` (`make cli-reference`);
do not edit by hand: `tests/test_cli_reference.py` fails when this file and the app differ.
Every command's `--help`, as it prints at {width} columns. Exit codes: README.md, "Exit codes".
"""


def _commands(command: Any, parent: Any, name: str) -> Iterator[tuple[str, Any]]:
    """Each command's full name and help context, depth first, in the app's order.

    Typed loosely: typer builds its commands on its own copy of click (``typer._click``).
    """
    ctx = command.context_class(
        command, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH
    )
    yield ctx.command_path, ctx
    if hasattr(command, "list_commands"):
        for sub_name in command.list_commands(ctx):
            sub = command.get_command(ctx, sub_name)
            if sub is not None and not sub.hidden:
                yield from _commands(sub, ctx, sub_name)


def render() -> str:
    """docs/cli.md's text: a header, a table of contents, then one section per command."""
    root = typer.main.get_command(app)
    entries = list(_commands(root, None, "edgefleet"))
    lines = [HEADER.format(width=WIDTH)]
    for path, _ in entries:
        anchor = path.replace(" ", "-")
        depth = path.count(" ")
        lines.append(f"{'  ' * depth}- [`{path}`](#{anchor})")
    lines.append("")
    for path, ctx in entries:
        lines += [f"## `{path}`", "", "```text", ctx.command.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> None:
    REFERENCE.write_text(render())
    print(f"wrote {REFERENCE}", file=sys.stderr)


if __name__ == "__main__":
    main()
