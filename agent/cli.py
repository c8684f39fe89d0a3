"""``edgefleet agent``: the on-device daemon, its enrollment and install."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from contracts.cli import JsonOption, fail, print_json

app = typer.Typer(help="On-device agent: inference, telemetry, updates.", no_args_is_help=True)


@app.command("run")
def run(config: Annotated[Path, typer.Option(help="agent.toml to run with.")]) -> None:
    """Run the agent daemon until SIGTERM or Ctrl-C."""
    import logging

    from .daemon import run_agent
    from .errors import AgentError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        run_agent(config)
    except AgentError as e:
        fail(e)


@app.command("enroll")
def enroll(
    fleet: Annotated[str, typer.Option(help="The fleet server's URL.")],
    token: Annotated[str, typer.Option(help="A one-time enrollment token from the fleet.")],
    out: Annotated[Path, typer.Option(help="Where agent.toml and the secrets go.")] = Path(
        "/etc/edgefleet"
    ),
    device_id: Annotated[str | None, typer.Option(help="Default: the host name.")] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(hidden=True, help="Refused: tags come from the enrollment token."),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Default: OUT/data.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Enroll this device with a fleet; writes OUT/agent.toml for `agent run`.

    Its profile and tags come from the enrollment token.
    """
    if tag:
        raise typer.BadParameter(
            "a device cannot choose its tags: they come from the enrollment token "
            "(edgefleet fleet enrollment-token --tags ...), or an operator sets them later "
            "(PUT /api/v1/devices/ID/tags); enroll without --tag",
            param_hint="--tag",
        )
    from .enroll import enroll_device
    from .errors import AgentError
    from .install import default_device_id

    try:
        enrolled = enroll_device(
            fleet,
            token,
            out,
            device_id=device_id or default_device_id(),
            data_dir=data_dir,
        )
    except AgentError as e:
        fail(e)
    if json_output:
        print_json({"device_id": enrolled.device_id, "config": str(enrolled.config_path)})
        return
    typer.echo(
        f"enrolled {enrolled.device_id}; run: edgefleet agent run --config {enrolled.config_path}"
    )


@app.command("install")
def install(
    package: Annotated[
        str,
        typer.Option(
            help="What pip installs: a requirement, or a wheel/source folder (given the "
            "[agent] extra when it names edgefleet without extras)."
        ),
    ] = "edgefleet[agent]",
    pip_args: Annotated[
        str, typer.Option(help='Extra pip arguments, e.g. "--no-index --find-links /media/w".')
    ] = "",
    venv: Annotated[Path, typer.Option(help="The agent's venv.")] = Path("/opt/edgefleet/venv"),
    config_dir: Annotated[Path, typer.Option(help="Where agent.toml goes.")] = Path(
        "/etc/edgefleet"
    ),
    data_dir: Annotated[Path, typer.Option(help="Slots, telemetry queue, update state.")] = Path(
        "/var/lib/edgefleet"
    ),
    systemd_dir: Annotated[Path, typer.Option(help="Where the unit goes.")] = Path(
        "/etc/systemd/system"
    ),
    unit_name: Annotated[str, typer.Option(help="The systemd unit's name.")] = (
        "edgefleet-agent.service"
    ),
    user: Annotated[str, typer.Option(help="Service user and group.")] = "edgefleet",
    create_user: Annotated[bool, typer.Option("--create-user/--no-create-user")] = True,
    device_id: Annotated[str | None, typer.Option(help="Default: the host name.")] = None,
    tvm: Annotated[bool, typer.Option("--tvm", help="Also install the TVM runtime.")] = False,
    gpu_index_url: Annotated[
        str | None, typer.Option(help="Index with onnxruntime-gpu for this Jetson.")
    ] = None,
    start: Annotated[
        bool, typer.Option("--start/--no-start", help="systemctl enable --now (with systemd).")
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing agent.toml.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Install the agent on this board: venv, runtimes, systemd unit, config."""
    from .errors import InstallError
    from .install import InstallOptions, Layout, with_agent_extra
    from .install import install as run_install

    layout = Layout(
        venv_dir=venv,
        systemd_dir=systemd_dir,
        config_dir=config_dir,
        data_dir=data_dir,
        unit_name=unit_name,
    )
    try:
        report = run_install(
            InstallOptions(
                layout=layout,
                package=with_agent_extra(package),
                pip_args=tuple(shlex.split(pip_args)),
                user=user,
                create_user=create_user,
                device_id=device_id,
                tvm=tvm,
                gpu_index_url=gpu_index_url,
                start=start,
                force=force,
                dry_run=dry_run,
                echo=lambda line: typer.echo(line, err=json_output),
            )
        )
    except InstallError as e:
        fail(e)
    if json_output:
        print_json(json.loads(json.dumps(asdict(report), default=str)))


@app.command("uninstall")
def uninstall(
    venv: Annotated[Path, typer.Option(help="The agent's venv.")] = Path("/opt/edgefleet/venv"),
    config_dir: Annotated[Path, typer.Option(help="Where agent.toml is.")] = Path("/etc/edgefleet"),
    data_dir: Annotated[Path, typer.Option(help="The agent's data.")] = Path("/var/lib/edgefleet"),
    systemd_dir: Annotated[Path, typer.Option(help="Where the unit is.")] = Path(
        "/etc/systemd/system"
    ),
    unit_name: Annotated[str, typer.Option(help="The unit's name.")] = "edgefleet-agent.service",
    purge: Annotated[bool, typer.Option("--purge", help="Also remove config and data.")] = False,
    stop: Annotated[bool, typer.Option("--stop/--no-stop")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Stop and remove the agent's service and venv (--purge: config and data too)."""
    from .errors import InstallError
    from .install import Layout, UninstallOptions
    from .install import uninstall as run_uninstall

    layout = Layout(
        venv_dir=venv,
        systemd_dir=systemd_dir,
        config_dir=config_dir,
        data_dir=data_dir,
        unit_name=unit_name,
    )
    try:
        report = run_uninstall(
            UninstallOptions(
                layout=layout,
                purge=purge,
                stop=stop,
                dry_run=dry_run,
                echo=lambda line: typer.echo(line, err=json_output),
            )
        )
    except InstallError as e:
        fail(e)
    if json_output:
        print_json(asdict(report))
