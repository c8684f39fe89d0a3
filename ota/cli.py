"""``edgefleet ota``: keys, bundles, verification and deltas."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hw_profiles.cli_support import not_implemented

app = typer.Typer(help="Signed, verifiable update bundles (TUF).", no_args_is_help=True)
keys_app = typer.Typer(help="Signing keys for the TUF roles.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init() -> None:
    """Create root, targets, snapshot and timestamp keys."""
    not_implemented("ota keys init", issue=4)


@keys_app.command("rotate")
def keys_rotate(role: Annotated[str, typer.Option(help="Role whose key to rotate.")]) -> None:
    """Rotate one role's key and re-sign root."""
    not_implemented("ota keys rotate", issue=4)


@app.command("bundle")
def bundle(
    directory: Annotated[Path, typer.Argument(help="A compile output directory.")],
    version: Annotated[str, typer.Option(help="Semantic version of the bundle.")],
    out: Annotated[Path, typer.Option(help="Bundle file (.efb) to write.")],
) -> None:
    """Pack a compile output directory into a deterministic bundle."""
    not_implemented("ota bundle", issue=4)


@app.command("verify")
def verify(file: Annotated[Path, typer.Argument(help="Bundle (.efb) to verify.")]) -> None:
    """Verify a bundle offline against trusted TUF metadata."""
    not_implemented("ota verify", issue=4)


@app.command("delta")
def delta(
    old: Annotated[Path, typer.Argument(help="Bundle the device has.")],
    new: Annotated[Path, typer.Argument(help="Bundle to deliver.")],
    out: Annotated[Path, typer.Option(help="Delta file to write.")],
) -> None:
    """Make a delta that turns OLD into NEW bit for bit."""
    not_implemented("ota delta", issue=4)
