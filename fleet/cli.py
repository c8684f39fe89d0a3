"""``edgefleet fleet``: run the fleet server, and drive it over its HTTP API.

Every command but ``serve`` is an API client: ``--server`` (or ``$EDGEFLEET_SERVER``)
and ``--token`` (or ``$EDGEFLEET_TOKEN``, else the admin token a local server left in
``fleet-data/admin.token``).
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from contracts.cli import (
    EXIT_CANNOT_START,
    JsonOption,
    fail,
    print_error,
    print_json,
    wait_for_stop,
)

if TYPE_CHECKING:
    from .simulator import SimulatedDeviceSpec

app = typer.Typer(help="Fleet server: registry, devices, rollouts.", no_args_is_help=True)
rollout_app = typer.Typer(help="Staged rollouts through cohorts.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
# `fleet rollouts list` reads naturally too: the same group under its plural, kept out of help.
app.add_typer(rollout_app, name="rollouts", hidden=True)
models_app = typer.Typer(
    help="The model registry: versions, stages, bundles.", no_args_is_help=True
)
app.add_typer(models_app, name="models")

DataDir = Annotated[
    Path, typer.Option("--data-dir", help="Where the server keeps its database, keys, broker.")
]
Server = Annotated[
    str, typer.Option("--server", envvar="EDGEFLEET_SERVER", help="The fleet server's URL.")
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="EDGEFLEET_TOKEN", help="API token (default: DATA_DIR/admin.token)."
    ),
]
RolloutId = Annotated[str, typer.Argument(help="Rollout id (r-...).")]

DEFAULT_SERVER = "http://127.0.0.1:8000"
DEFAULT_DATA_DIR = Path("fleet-data")


# The choices below repeat fleet.models' values so that a mistake is refused before anything
# is sent, without importing SQLModel (`--help` runs on devices without it);
# tests/test_cli_fleet.py keeps them equal to the server's.


class OnFailure(enum.StrEnum):
    """What a rollout does when a wave fails its gate (``RolloutCreate.on_failure``)."""

    PAUSE = "pause"
    ROLLBACK = "rollback"


class RolloutStateName(enum.StrEnum):
    """``fleet.models.RolloutState``."""

    DEPLOYING = "deploying"
    SOAKING = "soaking"
    AWAITING_APPROVAL = "awaiting_approval"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class StageName(enum.StrEnum):
    """``fleet.models.Stage``."""

    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"
    ARCHIVED = "archived"


@app.command("serve")
def serve(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Annotated[str, typer.Option(help="HTTP listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    database_url: Annotated[
        str | None, typer.Option(help="postgresql://... (default: a SQLite file in DATA_DIR).")
    ] = None,
    mqtt_url: Annotated[
        str | None, typer.Option(help="mqtt(s)://user:pass@host:port of an external broker.")
    ] = None,
    mqtt_credential_file: Annotated[
        Path | None,
        typer.Option(
            help="With --mqtt-url mqtt(s)://host:port: the broker passwords the replicas "
            "share (`fleet broker` writes it)."
        ),
    ] = None,
    replica_id: Annotated[
        str,
        typer.Option(
            help="This replica's name, unique among the servers sharing the database "
            "(its MQTT account and client id: edgefleet-fleet-REPLICA)."
        ),
    ] = "main",
    rollout_lease: Annotated[
        float,
        typer.Option(help="Seconds another replica waits to take over rollouts from a dead one."),
    ] = 10.0,
    broker_auth_secret_file: Annotated[
        Path | None,
        typer.Option(
            help="A file with the secret an external broker sends to /api/v1/broker/* "
            "(HTTP authentication and authorization)."
        ),
    ] = None,
    mqtt_tls: Annotated[
        bool, typer.Option(help="Embedded broker: mTLS with device certificates.")
    ] = False,
    mqtt_port: Annotated[
        int | None,
        typer.Option(help="Embedded broker's port (default: chosen once, kept in DATA_DIR)."),
    ] = None,
    mqtt_host: Annotated[
        str | None,
        typer.Option(
            help="Embedded broker's listen address (default: --host). Beyond "
            "loopback it needs --mqtt-tls or --mqtt-allow-plaintext."
        ),
    ] = None,
    mqtt_allow_plaintext: Annotated[
        bool, typer.Option(help="Let the embedded broker listen beyond loopback without TLS.")
    ] = False,
    mqtt_public_url: Annotated[
        str | None,
        typer.Option(
            help="mqtt(s)://HOST:PORT devices are told (default: --public-url's "
            "host with the broker's port)."
        ),
    ] = None,
    mqtt_restart_delay: Annotated[
        float, typer.Option(help="Seconds before restarting a broker that died (doubling).")
    ] = 0.5,
    public_url: Annotated[
        str | None, typer.Option(help="URL devices reach this server at.")
    ] = None,
    rollout_tick: Annotated[float, typer.Option(help="Seconds between rollout checks.")] = 1.0,
    max_bundle_bytes: Annotated[
        int, typer.Option(help="Largest bundle upload, in bytes (default 8 GiB).")
    ] = 8 << 30,
    max_inference_bytes: Annotated[
        int, typer.Option(help="Largest cloud inference request, in bytes (default 16 MiB).")
    ] = 16 << 20,
    metrics_public: Annotated[
        bool, typer.Option(help="Serve /metrics without a token (default: any API token).")
    ] = False,
    drift_webhook_url: Annotated[
        str | None,
        typer.Option(help="POST drift alerts here as JSON (docs/model-health.md)."),
    ] = None,
    ingest_workers: Annotated[
        int,
        typer.Option(  # at most fleet.config.MAX_INGEST_WORKERS: FleetSettings says so
            min=0,
            help="Extra processes storing telemetry through the shared subscription "
            "(docs/scale.md); 0: the server's own bridge alone.",
        ),
    ] = 0,
) -> None:
    """Run the fleet server (embedded defaults: a SQLite file and a local mosquitto).

    Once up it prints where it listens (HTTP, MQTT) and the addresses devices are told.
    A port in use is refused before anything is set up, with exit code 3 (as for any
    start-up that fails)."""
    import logging

    from pydantic import ValidationError

    from .config import FleetSettings
    from .errors import BrokerError, StartupError
    from .listen import bind_http, check_broker_port

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = FleetSettings(
            data_dir=data_dir,
            host=host,
            port=port,
            database_url=database_url,
            mqtt_url=mqtt_url,
            mqtt_credential_file=mqtt_credential_file,
            replica_id=replica_id,
            rollout_lease_s=rollout_lease,
            broker_auth_secret_file=broker_auth_secret_file,
            mqtt_tls=mqtt_tls,
            mqtt_port=mqtt_port,
            mqtt_host=mqtt_host,
            mqtt_allow_plaintext=mqtt_allow_plaintext,
            mqtt_public_url=mqtt_public_url,
            mqtt_restart_delay_s=mqtt_restart_delay,
            public_url=public_url,
            rollout_tick_s=rollout_tick,
            max_bundle_bytes=max_bundle_bytes,
            max_inference_bytes=max_inference_bytes,
            metrics_public=metrics_public,
            drift_webhook_url=drift_webhook_url,
            ingest_workers=ingest_workers,
        )
    except ValidationError as e:
        fail("; ".join(_setting_error(error) for error in e.errors()))

    try:
        check_broker_port(settings)
        listener = bind_http(host, port)
    except (StartupError, BrokerError) as e:
        print_error(e)
        raise typer.Exit(EXIT_CANNOT_START) from None
    import uvicorn  # the server's libraries load only once its ports are known to be free

    from .app import create_app
    from .gc_tuning import tune_for_serving
    from .server import FleetServer

    def announce(server: FleetServer) -> None:
        for line in server.addresses():
            typer.echo(line)

    app = create_app(settings, on_started=announce)
    web = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    tune_for_serving()
    with listener:
        web.run(sockets=[listener])
    if not web.started:  # the lifespan failed: its log says why
        raise typer.Exit(EXIT_CANNOT_START)


@app.command("broker")
def broker(
    database_url: Annotated[
        str, typer.Option(help="postgresql://... : the database the replicas share.")
    ],
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Where the broker keeps its files and credential.")
    ] = Path("fleet-broker"),
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="Listen port (default: chosen once, kept in DATA_DIR).")
    ] = None,
    allow_plaintext: Annotated[
        bool, typer.Option(help="Listen beyond loopback without TLS (a network you trust).")
    ] = False,
    restart_delay: Annotated[
        float, typer.Option(help="Seconds before restarting a broker that died (doubling).")
    ] = 0.5,
) -> None:
    """Run one supervised mosquitto for several `fleet serve` replicas (docs/scale.md).

    Its accounts come from the shared database; on its first start it writes
    DATA_DIR/broker-credential.json (0600), which every replica is given with
    --mqtt-url mqtt://HOST:PORT --mqtt-credential-file FILE."""
    import logging

    from .broker.endpoint import is_loopback
    from .errors import BrokerError
    from .standalone import StandaloneBroker

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not is_loopback(host) and not allow_plaintext:
        fail(
            f"the broker would listen on {host}, beyond loopback, without TLS: device "
            "passwords and every message would cross the network in clear. Put it on a "
            "network you trust and pass --allow-plaintext, or keep --host 127.0.0.1"
        )
    service = StandaloneBroker(
        data_dir, database_url, host=host, port=port, restart_delay_s=restart_delay
    )
    try:
        endpoint = service.start()
    except (BrokerError, ValueError) as e:
        fail(e)
    typer.echo(
        f"MQTT listens on mqtt://{host}:{endpoint.port}; start each replica with --mqtt-url "
        f"mqtt://{endpoint.host}:{endpoint.port} --mqtt-credential-file "
        f"{service.credential_path} --replica-id NAME"
    )
    wait_for_stop()
    service.stop()


def _first_line(error: Exception) -> str:
    """A library's error without the lines of background it appends."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _setting_error(error: Any) -> str:
    """One pydantic error as an option and its message (``Value error, `` dropped)."""
    message = str(error["msg"]).removeprefix("Value error, ")
    fields = [str(part) for part in error.get("loc", ())]
    if not fields:
        return message
    option = "--" + fields[0].removesuffix("_s").replace("_", "-")
    return f"{option}: {message}"


@app.command("admin-token")
def admin_token(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    name: Annotated[str, typer.Option(help="The token's name (in the audit log).")] = "admin",
    database_url: Annotated[
        str | None, typer.Option(help="postgresql://... (default: the SQLite file in DATA_DIR).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Mint an admin API token straight into the database and print it, once.

    The way back in when no admin token is left: it needs the server's data directory (or
    database), not the API, and works whether the server is running or not."""
    from pydantic import ValidationError

    from .config import FleetSettings
    from .db import make_engine, session_scope
    from .migrate import current_revision, head_revision
    from .models import ApiTokenCreate, Role
    from .tokens import issue_api_token

    try:
        request = ApiTokenCreate.model_validate({"name": name, "role": Role.ADMIN})
    except ValidationError as e:
        fail(f"--name {name!r}: {e.errors()[0]['msg']}")
    settings = FleetSettings(data_dir=data_dir, database_url=database_url)
    database = data_dir / "fleet.db"
    if database_url is None and not database.is_file():
        fail(
            f"no fleet database at {database}: pass the --data-dir that `edgefleet fleet serve` "
            "uses (or --database-url)"
        )
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = make_engine(settings.db_url)
    except SQLAlchemyError as e:
        fail(f"--database-url: {_first_line(e)}")
    try:
        revision, head = current_revision(engine), head_revision()
        if revision != head:
            fail(
                f"the database is at revision {revision}, this edgefleet expects {head}: "
                "start `edgefleet fleet serve` once (it migrates), then run this again"
            )
        with session_scope(engine) as session:
            row, token = issue_api_token(
                session, name=request.name, role=Role.ADMIN, actor="cli:admin-token"
            )
            token_id = row.id
    except SQLAlchemyError as e:
        fail(f"the database at --database-url / --data-dir: {_first_line(e)}")
    finally:
        engine.dispose()
    if json_output:
        print_json({"id": token_id, "name": request.name, "role": "admin", "token": token})
    else:
        typer.echo(token)


# --- API client commands --------------------------------------------------------------------


def _client(server: str, token: str | None, data_dir: Path = DEFAULT_DATA_DIR) -> Any:
    import httpx

    if token is None:
        token_file = data_dir / "admin.token"
        if not token_file.is_file():
            fail(f"pass --token or set EDGEFLEET_TOKEN (no {token_file} here)")
        token = token_file.read_text().strip()
    if not token.isascii() or not token.isprintable():
        fail("the API token holds characters no token has: check --token or EDGEFLEET_TOKEN")
    try:
        return httpx.Client(
            base_url=server, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
    except httpx.InvalidURL as e:
        fail(f"--server {server!r} is not a URL ({e}); e.g. {DEFAULT_SERVER}")


def _call(server: str, token: str | None, method: str, path: str, **kwargs: Any) -> Any:
    """The JSON answer of ``/api/v1{path}``; every failure (unreachable server, refused
    token, an error status) is one ``error:`` line and exit code 1."""
    import httpx

    with _client(server, token) as client:
        try:
            response = client.request(method, f"/api/v1{path}", **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            fail(f"cannot reach the fleet server at {server}: {e or type(e).__name__}")
    if response.is_error:
        fail(_http_error(response))
    try:
        return response.json()
    except ValueError:
        fail(
            f"{server} answered {method} /api/v1{path} with {response.status_code} and no "
            "JSON: is --server an edgefleet fleet server?"
        )


def _http_error(response: Any) -> str:
    """An error answer as one line: the server's ``detail`` (a 422's fields as
    ``field: message``), with what to do for a refused token."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    if isinstance(detail, list):  # a 422: the fields that failed validation
        detail = "; ".join(_field_error(error) for error in detail if isinstance(error, dict))
    text = " ".join(str(detail).split())[:2000] or response.reason_phrase
    status = response.status_code
    if status == 401:
        return (
            f"the fleet server refused the API token (401: {text}); "
            "check --token or EDGEFLEET_TOKEN"
        )
    if status == 403:
        return f"the API token's role may not do this (403: {text})"
    if status >= 500:
        return f"the fleet server failed ({status}: {text}); its log says more"
    return f"{status}: {text}"


def _field_error(error: dict[str, Any]) -> str:
    """One field of a 422 as ``field: message`` (the ``body``/``query`` prefix and
    pydantic's ``Value error, `` dropped)."""
    where = ".".join(str(part) for part in error.get("loc", [])[1:])
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


@app.command("publish")
def publish(
    bundle: Annotated[
        Path, typer.Argument(help="A .efb bundle (edgefleet ota bundle).", exists=True)
    ],
    stage: Annotated[
        StageName | None, typer.Option(help="Move the model version to this stage.")
    ] = None,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    json_output: JsonOption = False,
) -> None:
    """Register the bundle's model version (if new) and attach the bundle to it."""
    from ota.archive import read_manifest
    from ota.errors import OtaError

    try:
        manifest = read_manifest(bundle)
    except OtaError as e:
        fail(e)
    name, version = manifest.model.name, manifest.model.version
    existing = _call(server, token, "GET", "/models", params={"name": name})
    if not any(v["version"] == version for v in existing):
        _call(server, token, "POST", "/models", json={"name": name, "version": version})
    attached = _call(
        server,
        token,
        "POST",
        f"/models/{name}/versions/{version}/bundles",
        content=bundle.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    if stage:
        _call(
            server,
            token,
            "PUT",
            f"/models/{name}/versions/{version}/stage",
            json={"stage": stage.value},
        )
    if json_output:
        print_json(attached)
    else:
        typer.echo(f"bundle {attached['id']}: {attached['target_path']} ({name} {version})")


@app.command("enrollment-token")
def enrollment_token(
    profile: Annotated[
        str, typer.Option(help="Hardware profile of the devices (see `edgefleet profiles list`).")
    ],
    tags: Annotated[str, typer.Option(help="Comma-separated tags the devices get.")] = "",
    uses: Annotated[int, typer.Option(help="Devices that may enroll with it.")] = 1,
    reenroll_revoked: Annotated[
        bool,
        typer.Option(
            "--reenroll-revoked", help="Also let a revoked device id enroll again with it."
        ),
    ] = False,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    json_output: JsonOption = False,
) -> None:
    """Create an enrollment token (printed once).

    An unknown profile or a malformed tag is refused before anything is sent."""
    _check_profile(profile)
    tag_list = _tags(tags, "--tags")
    issued = _call(
        server,
        token,
        "POST",
        "/enrollment-tokens",
        json={
            "profile": profile,
            "tags": tag_list,
            "uses": uses,
            "reenroll_revoked": reenroll_revoked,
        },
    )
    if json_output:
        print_json(issued)
    else:
        typer.echo(issued["token"])


@app.command("devices")
def devices(
    server: Server = DEFAULT_SERVER, token: Token = None, json_output: JsonOption = False
) -> None:
    """List enrolled devices."""
    found = _call(server, token, "GET", "/devices")
    if json_output:
        print_json(found)
        return
    for d in found:
        state = "online" if d["online"] else "offline"
        bundle = d["bundle"] or "-"
        typer.echo(f"{d['id']:24} {d['profile']:16} {state:8} {bundle:28} {','.join(d['tags'])}")


@app.command("revoke")
def revoke(
    device_id: Annotated[str, typer.Argument(help="Device to revoke.")],
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    json_output: JsonOption = False,
) -> None:
    """Revoke a device: the broker cuts and refuses it, its tokens stop working."""
    revoked = _call(server, token, "POST", f"/devices/{device_id}/revoke")
    if json_output:
        print_json(revoked)
    else:
        typer.echo(f"revoked {device_id}")


@rollout_app.command("create")
def rollout_create(
    bundle: Annotated[int, typer.Option(help="Bundle id (from `fleet publish`).")],
    waves: Annotated[
        str,
        typer.Option(
            help="Comma-separated waves: cumulative percentages of the selected devices "
            "and/or cohort tags (canary,10,100)."
        ),
    ] = "1,10,50,100",
    tags: Annotated[str, typer.Option(help="Only devices with all these tags.")] = "",
    soak: Annotated[float, typer.Option(help="Seconds each wave soaks before its gate.")] = 300,
    min_healthy: Annotated[float, typer.Option(help="Share of a wave that must be healthy.")] = 0.9,
    max_failure: Annotated[float, typer.Option(help="Share of failures that stops it.")] = 0.1,
    on_failure: Annotated[
        OnFailure, typer.Option(help="What a wave that fails its gate does.")
    ] = OnFailure.PAUSE,
    manual: Annotated[bool, typer.Option(help="Wait for `advance` after each gate.")] = False,
    compare_baseline: Annotated[
        bool,
        typer.Option(
            help="Judge error and fallback rates by a sequential test against the devices "
            "still on the previous version (gate `compare: baseline`)."
        ),
    ] = False,
    shadow: Annotated[
        bool, typer.Option(help="Run beside the serving model; report agreement.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Show who lands in each wave and create nothing (prints an --id)."
        ),
    ] = False,
    rollout_id: Annotated[
        str | None,
        typer.Option("--id", help="The id a --dry-run printed: create the very waves it showed."),
    ] = None,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    json_output: JsonOption = False,
) -> None:
    """Start a rollout of a bundle to devices chosen by profile and tags.

    The server refuses a cohort that no selected device carries (a misspelt canary must
    not send the bundle to everyone); malformed waves and tags are refused before anything
    is sent."""
    body: dict[str, Any] = {
        "bundle_id": bundle,
        "waves": _waves(waves),
        "tags": _tags(tags, "--tags"),
        "gate": {
            "soak_s": soak,
            "min_healthy_ratio": min_healthy,
            "max_failure_ratio": max_failure,
            "compare": "baseline" if compare_baseline else "threshold",
        },
        "on_failure": on_failure.value,
        "auto_advance": not manual,
        "mode": "shadow" if shadow else "deploy",
    }
    if rollout_id is not None:
        body["id"] = rollout_id
    if dry_run:
        _show_preview(_call(server, token, "POST", "/rollouts/preview", json=body), json_output)
        return
    rollout = _call(server, token, "POST", "/rollouts", json=body)
    _show(rollout, json_output)


@rollout_app.command("list")
def rollout_list(
    state: Annotated[
        RolloutStateName | None,
        typer.Option(
            metavar="STATE",
            help="Only rollouts in this state: "
            + ", ".join(s.value for s in RolloutStateName)
            + ".",
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Only rollouts of this model's bundles (its name).")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=1000, help="At most this many, the latest first.")
    ] = 100,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    json_output: JsonOption = False,
) -> None:
    """List rollouts, the latest first: model, state, wave and device counts."""
    params: dict[str, Any] = {"limit": limit}
    if state is not None:
        params["state"] = state.value
    if model is not None:
        params["model"] = model
    found = _call(server, token, "GET", "/rollouts", params=params)
    if json_output:
        print_json(found)
        return
    if not found:
        typer.echo("no rollouts" + (" match" if state or model else ""), err=True)
        return
    versions = _call(server, token, "GET", "/models", params={"name": model} if model else {})
    bundles = {
        b["id"]: f"{v['name']} {v['version']}" for v in versions for b in v.get("bundles", [])
    }
    table = _table("rollout", "model", "state", "wave", "devices")
    for r in found:
        table.add_row(
            r["id"],
            bundles.get(r["bundle_id"], f"bundle {r['bundle_id']}"),
            r["state"] + (" (shadow)" if r["mode"] == "shadow" else ""),
            f"{r['wave'] + 1}/{len(r['waves'])}",
            _device_summary(r["devices"]),
        )
    _print_table(table)


@models_app.command("list")
def models_list(
    name: Annotated[str | None, typer.Option(help="Only this model's versions.")] = None,
    stage: Annotated[StageName | None, typer.Option(help="Only versions at this stage.")] = None,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    json_output: JsonOption = False,
) -> None:
    """List model versions with their stage and bundles (id, profile, runtime, precision)."""
    params: dict[str, Any] = {}
    if name is not None:
        params["name"] = name
    if stage is not None:
        params["stage"] = stage.value
    found = _call(server, token, "GET", "/models", params=params)
    if json_output:
        print_json(found)
        return
    if not found:
        typer.echo("no model versions" + (" match" if name or stage else ""), err=True)
        return
    table = _table("model", "version", "stage", "created", "bundles")
    for v in found:
        table.add_row(
            v["name"],
            v["version"],
            v["stage"],
            v["created_at"][:10],
            "\n".join(
                f"#{b['id']} {b['profile']} {b['runtime']} {b['precision']}"
                for b in v.get("bundles", [])
            )
            or "-",
        )
    _print_table(table)


@rollout_app.command("status")
def rollout_status(
    rollout: RolloutId,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    json_output: JsonOption = False,
) -> None:
    """Show a rollout's waves, gates and device counts."""
    _show(_call(server, token, "GET", f"/rollouts/{rollout}"), json_output)


def _action(action: str, doc: str) -> None:
    def command(
        rollout: RolloutId,
        reason: Annotated[str, typer.Option(help="Goes into the audit log.")] = "",
        server: Server = DEFAULT_SERVER,
        token: Token = None,
        json_output: JsonOption = False,
    ) -> None:
        result = _call(
            server, token, "POST", f"/rollouts/{rollout}/{action}", json={"reason": reason}
        )
        _show(result, json_output)

    command.__doc__ = doc
    rollout_app.command(action)(command)


_action("pause", "Pause a rollout before its next step.")
_action("resume", "Resume a paused rollout at its current wave.")
_action("advance", "Start the next wave now (past a held or failed gate).")
_action("abort", "Stop a rollout; devices keep what they run.")
_action("rollback", "Send every device that took the bundle back to its previous one.")


def _show_preview(preview: dict[str, Any], json_output: bool) -> None:
    """A dry run's waves, numbered from 1 as everywhere else, with their first devices."""
    if json_output:
        print_json(preview)
        return
    typer.echo(
        f"dry run, nothing created: bundle {preview['bundle_id']} to "
        f"{_plural(preview['selected'], 'selected device')} of profile {preview['profile']}"
    )
    for wave in preview["waves"]:
        shown = wave["sample"][:_PREVIEW_IDS]
        more = wave["devices"] - len(shown)
        names = ", ".join(shown) + (f" and {more} more" if more > 0 else "")
        typer.echo(
            f"  wave {wave['wave'] + 1} ({_wave_label(wave['label'])}): "
            f"{_plural(wave['devices'], 'device')}" + (f": {names}" if names else "")
        )
    if preview["unassigned"]:
        typer.echo(f"  in no wave: {_plural(preview['unassigned'], 'device')}")
    typer.echo(
        f"create exactly these waves: the same command without --dry-run, --id {preview['id']}"
    )


_PREVIEW_IDS = 5
"""Device ids a dry run prints per wave (``--json`` has up to 100)."""


def _wave_label(label: str) -> str:
    """``10`` as ``10 %``, a cohort tag as itself."""
    try:
        float(label)
    except ValueError:
        return label
    return f"{label} %"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _device_summary(devices: dict[str, dict[str, int]]) -> str:
    """Every wave's device states added up: ``18 healthy, 2 pending``."""
    totals: dict[str, int] = {}
    for counts in devices.values():
        for state, count in counts.items():
            totals[state] = totals.get(state, 0) + count
    return ", ".join(f"{n} {state}" for state, n in sorted(totals.items())) or "-"


def _table(*columns: str) -> Any:
    """A plain table whose last column wraps and the others keep whole."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=column != columns[-1])
    return table


def _print_table(table: Any) -> None:
    from rich.console import Console

    Console().print(table)


def _check_profile(profile: str) -> None:
    """Refuse a profile this installation does not know (the server checks too)."""
    from hw_profiles import list_profiles

    known = list_profiles()
    if profile not in known:
        fail(
            f"--profile {profile!r}: no hardware profile of that name; known: "
            f"{', '.join(known)} (add one with a TOML file on EDGEFLEET_PROFILES_PATH)"
        )


def _tags(text: str, option: str) -> list[str]:
    """Comma-separated tags, each checked against the identifier policy."""
    from contracts.ids import check_tag

    tags = _split(text)
    for tag in tags:
        try:
            check_tag(tag)
        except ValueError as e:
            fail(f"{option}: {e}")
    return tags


def _waves(text: str) -> list[str]:
    """Comma-separated waves, each a percentage or a cohort tag (the server's rule)."""
    from .bounds import check_wave

    waves = _split(text)
    if not waves:
        fail("--waves: give at least one wave, e.g. 1,10,50,100 or canary,100")
    for wave in waves:
        try:
            check_wave(wave)
        except ValueError as e:
            fail(f"--waves: {e}")
    return waves


def _show(rollout: dict[str, Any], json_output: bool) -> None:
    if json_output:
        print_json(rollout)
        return
    typer.echo(
        f"{rollout['id']}  {rollout['mode']}  bundle {rollout['bundle_id']}  {rollout['state']}  "
        f"wave {rollout['wave'] + 1}/{len(rollout['waves'])}"
    )
    for wave, counts in sorted(rollout["devices"].items(), key=lambda item: int(item[0])):
        label = rollout["waves"][int(wave)]
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        typer.echo(f"  wave {int(wave) + 1} ({_wave_label(label)}): {summary}")
    if rollout["reason"]:
        typer.echo(f"  {rollout['reason']}")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


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
    """Run many simulated devices (the agent's MQTT protocol, no model) against a fleet."""
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
        wait_for_stop(duration)
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

    from contracts.durable import write_atomic

    from .simulator import SimulatedDeviceSpec

    try:
        saved = json.loads(credentials.read_text()) if credentials.exists() else {"devices": []}
        known = {d["device_id"]: d for d in saved["devices"]}
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{credentials} is not a simulator's credentials file ({e}): move it away")
    host, port = saved.get("host"), saved.get("port")
    for i in range(count):
        device_id = f"{prefix}-{i:05d}"
        if device_id in known:
            continue
        if token is None:
            fail(f"{credentials} has {len(known)} devices; pass --token to enroll the rest")
        try:
            response = httpx.post(
                f"{fleet.rstrip('/')}/api/v1/enroll",
                json={"token": token, "device_id": device_id},
                timeout=30,
            )
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            fail(f"cannot reach the fleet server at {fleet}: {e or type(e).__name__}")
        if not response.is_success:
            fail(f"enrolling {device_id}: {_http_error(response)}")
        body = response.json()
        known[device_id] = {
            "device_id": device_id,
            "username": body["mqtt"]["username"],
            "password": body["mqtt"]["password"],
        }
        host, port = body["mqtt"]["host"], body["mqtt"]["port"]
        write_atomic(
            credentials,
            json.dumps({"host": host, "port": port, "devices": list(known.values())}).encode(),
            mode=0o600,
        )
    if host is None or port is None:
        fail("no broker address known: enroll at least one device (--token)")
    specs = [SimulatedDeviceSpec(bundle=bundle, **known[f"{prefix}-{i:05d}"]) for i in range(count)]
    return str(host), int(port), specs
