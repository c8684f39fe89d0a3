"""``edgefleet ota tuf-client``: the client command line of the TUF conformance suite.

Implements ``CLIENT-CLI.md`` of theupdateframework/tuf-conformance (``init``, ``refresh``,
``download``, with the options before the command) on ``ota.client.OtaClient``, the code
the agent runs, so the suite checks edgefleet's own client::

    pytest tuf_conformance --entrypoint "edgefleet ota tuf-client"

Exit code 0 on success, 1 on any failure, with the reason on stderr.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from ota.client import OtaClient

app = typer.Typer(
    help="TUF conformance-suite client (CLIENT-CLI.md): init, refresh, download.",
    no_args_is_help=True,
)


class _Options:
    metadata_dir: Path | None
    metadata_url: str | None
    target_names: list[str]
    target_base_url: str | None
    target_dir: Path | None


_options = _Options()


@app.callback()
def options(
    metadata_dir: Annotated[
        Path | None, typer.Option(help="Trusted metadata directory (required).")
    ] = None,
    metadata_url: Annotated[str | None, typer.Option(help="Repository metadata URL.")] = None,
    target_name: Annotated[
        list[str] | None, typer.Option(help="Target path to download (repeatable).")
    ] = None,
    target_base_url: Annotated[str | None, typer.Option(help="Repository targets URL.")] = None,
    target_dir: Annotated[Path | None, typer.Option(help="Where verified targets go.")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING)
    _options.metadata_dir = metadata_dir
    _options.metadata_url = metadata_url
    _options.target_names = target_name or []
    _options.target_base_url = target_base_url
    _options.target_dir = target_dir


def _fail(message: object) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _metadata_dir() -> Path:
    if _options.metadata_dir is None:
        _fail("--metadata-dir is required")
    return _options.metadata_dir


def _client() -> OtaClient:
    from ota.client import OtaClient

    if not _options.metadata_url:
        _fail("--metadata-url is required")
    return OtaClient(
        _metadata_dir(),
        str(_options.metadata_url),
        targets_url=_options.target_base_url,
        target_dir=_options.target_dir,
    )


@app.command("init")
def init(trusted_root: Annotated[Path, typer.Argument(help="Initial root.json.")]) -> None:
    """Trust TRUSTED_ROOT: copy it into the metadata directory (no network)."""
    from ota.client import OtaClient

    try:
        OtaClient.init(_metadata_dir(), trusted_root)
    except OSError as e:
        _fail(e)


@app.command("refresh")
def refresh() -> None:
    """Update top-level metadata through the TUF client workflow."""
    from ota.errors import OtaError

    client = _client()
    try:
        client.refresh()
    except (OtaError, OSError) as e:
        _fail(e)
    finally:
        client.close()


@app.command("download")
def download() -> None:
    """Refresh, then download and verify each --target-name in order."""
    from ota.errors import OtaError

    if not _options.target_names or _options.target_dir is None:
        _fail("download needs --target-name and --target-dir")
    client = _client()
    try:
        for name in _options.target_names:
            client.download(client.target(name), attempts=1)
    except (OtaError, OSError, ValueError) as e:
        _fail(e)
    finally:
        client.close()
