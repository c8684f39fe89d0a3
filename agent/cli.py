"""``edgefleet agent``: the on-device daemon, its enrollment and install, and the simulator."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hw_profiles.cli_support import JsonOption, fail, print_json

if TYPE_CHECKING:
    from .simulator import SimulatedDeviceSpec

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
    tag: Annotated[list[str] | None, typer.Option(help="A tag (repeat for more).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Default: OUT/data.")] = None,
) -> None:
    """Enroll this device with a fleet; writes OUT/agent.toml for `agent run`."""
    from .enroll import enroll_device
    from .errors import AgentError
    from .install import default_device_id

    try:
        enrolled = enroll_device(
            fleet,
            token,
            out,
            device_id=device_id or default_device_id(),
            tags=tag,
            data_dir=data_dir,
        )
    except AgentError as e:
        fail(e)
    typer.echo(
        f"enrolled {enrolled.device_id}; run: edgefleet agent run --config {enrolled.config_path}"
    )


@app.command("simulate")
def simulate(
    devices: Annotated[int, typer.Option(help="How many devices to simulate.")],
    fleet: Annotated[str, typer.Option(help="The fleet server's URL.")] = "http://127.0.0.1:8000",
    token: Annotated[
        str | None, typer.Option(help="An enrollment token for at least DEVICES devices.")
    ] = None,
    credentials: Annotated[
        Path, typer.Option(help="Enrolled devices are kept here and reused on the next run.")
    ] = Path("simulated-devices.json"),
    prefix: Annotated[str, typer.Option(help="Device ids are PREFIX-00000, ...")] = "sim",
    bundle: Annotated[str | None, typer.Option(help="NAME-VERSION the devices start on.")] = None,
    telemetry_interval: Annotated[float, typer.Option(help="Seconds between reports.")] = 10.0,
    failing_bundle: Annotated[
        list[str] | None, typer.Option(help="NAME-VERSION whose install fails (repeat).")
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Run many lightweight devices speaking the agent's MQTT protocol against a fleet."""
    from .simulator import Behaviour, FleetSimulator

    host, port, devices_list = _simulated_devices(
        credentials, fleet, token, devices, prefix, bundle
    )
    behaviour = Behaviour(
        telemetry_interval_s=telemetry_interval, failing_bundles=set(failing_bundle or [])
    )
    with FleetSimulator(host, port, devices_list, behaviour) as simulator:
        seconds = simulator.start()
        typer.echo(f"{len(devices_list)} devices connected in {seconds:.1f} s", err=json_output)
        start = time.monotonic()
        try:
            while duration is None or time.monotonic() - start < duration:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        summary = {
            "devices": len(devices_list),
            "connect_s": round(seconds, 2),
            "connected": simulator.connected,
            "commands": sum(len(simulator.received_commands(s.device_id)) for s in devices_list),
            "malformed_commands": simulator.malformed_commands,
        }
    if json_output:
        print_json(summary)
    else:
        typer.echo(json.dumps(summary))


def _simulated_devices(
    credentials: Path,
    fleet: str,
    token: str | None,
    count: int,
    prefix: str,
    bundle: str | None,
) -> tuple[str, int, list[SimulatedDeviceSpec]]:
    """Broker address and devices: those enrolled on an earlier run (kept in
    ``credentials``), and the rest enrolled now through the fleet's API."""
    import httpx

    from .simulator import SimulatedDeviceSpec

    saved = json.loads(credentials.read_text()) if credentials.exists() else {"devices": []}
    known = {d["device_id"]: d for d in saved["devices"]}
    host, port = saved.get("host"), saved.get("port")
    for i in range(count):
        device_id = f"{prefix}-{i:05d}"
        if device_id in known:
            continue
        if token is None:
            fail(f"{credentials} has {len(known)} devices; pass --token to enroll the rest")
        response = httpx.post(
            f"{fleet.rstrip('/')}/api/v1/enroll",
            json={"token": token, "device_id": device_id},
            timeout=30,
        )
        if not response.is_success:
            fail(f"enrolling {device_id}: {response.status_code} {response.text}")
        body = response.json()
        known[device_id] = {
            "device_id": device_id,
            "username": body["mqtt"]["username"],
            "password": body["mqtt"]["password"],
        }
        host, port = body["mqtt"]["host"], body["mqtt"]["port"]
        credentials.write_text(
            json.dumps({"host": host, "port": port, "devices": list(known.values())})
        )
        credentials.chmod(0o600)
    if host is None or port is None:
        fail("no broker address known: enroll at least one device (--token)")
    specs = [SimulatedDeviceSpec(bundle=bundle, **known[f"{prefix}-{i:05d}"]) for i in range(count)]
    return str(host), int(port), specs


@app.command("install")
def install(
    package: Annotated[
        str, typer.Option(help="What pip installs: a requirement, or a wheel/source folder.")
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
    from .install import InstallOptions, Layout
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
                package=package,
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
        run_uninstall(
            UninstallOptions(
                layout=layout, purge=purge, stop=stop, dry_run=dry_run, echo=typer.echo
            )
        )
    except InstallError as e:
        fail(e)
