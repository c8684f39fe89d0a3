"""docs/cli.md is what the typer app prints: a changed command or option without
``make cli-reference`` fails here."""

from __future__ import annotations

import difflib

from edgefleet.cli_reference import REFERENCE, render


def test_cli_reference_is_up_to_date() -> None:
    expected = render()
    actual = REFERENCE.read_text() if REFERENCE.is_file() else ""
    diff = "".join(
        difflib.unified_diff(
            actual.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            "docs/cli.md",
            "the app",
            n=1,
        )
    )
    assert not diff, f"docs/cli.md is stale: run `make cli-reference`\n{diff[:4000]}"


def test_every_command_has_a_section() -> None:
    text = render()
    for command in ("edgefleet compile", "edgefleet fleet rollout create", "edgefleet ota delta",
                    "edgefleet agent run", "edgefleet profiles show"):  # fmt: skip
        assert f"## `{command}`" in text
        assert f"Usage: {command} " in text
