"""A real fleet server for tests: FastAPI's TestClient over the app, mosquitto, SQLite.

``running_fleet`` runs the whole lifespan (migrations, keys, broker, bridge, rollout
engine); ``enroll`` enrolls devices through the API as devices do; ``wait_for`` polls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi.testclient import TestClient

from fleet.app import create_app
from fleet.broker import MqttEndpoint
from fleet.config import FleetSettings
from fleet.server import ADMIN_TOKEN_FILE, FleetServer
from fleet.simulator import SimulatedDeviceSpec
from ota.bundle import bundle_compile_output

T = TypeVar("T")


@dataclass
class RunningFleet:
    client: TestClient
    server: FleetServer
    admin_token: str

    def api(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> Any:
        """Call ``/api/v1{path}`` with ``token`` (default: admin); raise on an HTTP error."""
        response = self.call(method, path, token=token, **kwargs)
        assert response.status_code < 400, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        return response.json()

    def call(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        headers.update(kwargs.pop("headers", {}))
        return self.client.request(method, f"/api/v1{path}", headers=headers, **kwargs)

    def metrics(self) -> str:
        """``/metrics`` as Prometheus scrapes it, with the admin token."""
        response = self.client.get(
            "/metrics", headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        assert response.status_code == 200, f"/metrics: {response.status_code} {response.text}"
        return str(response.text)

    def token(self, role: str) -> str:
        return str(
            self.api("POST", "/tokens", json={"name": f"{role}-user", "role": role})["token"]
        )

    def publish(self, bundle: Path, *, stage: str | None = None) -> dict[str, Any]:
        """Register the bundle's model version and attach the bundle; returns the bundle."""
        from ota.archive import read_manifest

        manifest = read_manifest(bundle)
        name, version = manifest.model.name, manifest.model.version
        if self.call("GET", f"/models/{name}/versions/{version}").status_code == 404:
            self.api("POST", "/models", json={"name": name, "version": version, "owner": "tests"})
        attached: dict[str, Any] = self.api(
            "POST",
            f"/models/{name}/versions/{version}/bundles",
            content=bundle.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
        if stage:
            self.api("PUT", f"/models/{name}/versions/{version}/stage", json={"stage": stage})
        return attached

    def enroll(
        self,
        count: int,
        *,
        profile: str = "host",
        tags: Callable[[int], list[str]] = lambda i: [],
        prefix: str = "dev",
        bundle: str | None = None,
        bundle_version_number: int | None = None,
    ) -> list[SimulatedDeviceSpec]:
        """Enroll ``count`` devices through ``/enroll``; specs for the simulator.

        ``tags`` are set by an operator's ``PUT /devices/ID/tags`` after enrollment (a
        device cannot choose its own).
        """
        grant = self.api("POST", "/enrollment-tokens", json={"profile": profile, "uses": count})[
            "token"
        ]
        specs = []
        for i in range(count):
            enrolled = self.client.post(
                "/api/v1/enroll",
                json={"token": grant, "device_id": f"{prefix}-{i:04d}"},
            )
            assert enrolled.status_code == 201, enrolled.text
            body = enrolled.json()
            if tags(i):
                self.api("PUT", f"/devices/{body['device_id']}/tags", json={"tags": tags(i)})
            specs.append(
                SimulatedDeviceSpec(
                    device_id=body["device_id"],
                    username=body["mqtt"]["username"],
                    password=body["mqtt"]["password"],
                    bundle=bundle,
                    bundle_version_number=bundle_version_number,
                )
            )
        return specs

    @property
    def mqtt_port(self) -> int:
        return self.server.mqtt.port


def fleet_settings(data_dir: Path, **overrides: Any) -> FleetSettings:
    return FleetSettings(
        data_dir=data_dir, **{"rollout_tick_s": 0.1, "mqtt_settle_s": 0.0, **overrides}
    )


@contextmanager
def running_fleet(data_dir: Path, **overrides: Any) -> Iterator[RunningFleet]:
    app = create_app(fleet_settings(data_dir, **overrides))
    with TestClient(app) as client:
        token = (data_dir / ADMIN_TOKEN_FILE).read_text().strip()
        yield RunningFleet(client=client, server=app.state.fleet, admin_token=token)


def device_endpoint(enrolled: dict[str, Any], directory: Path) -> MqttEndpoint:
    """How a device reaches the broker with what ``/enroll`` answered it: its password, or
    (mTLS) its certificate and key, written into ``directory`` with the fleet's CA."""
    mqtt = enrolled["mqtt"]
    if not mqtt["tls"]:
        return MqttEndpoint(
            mqtt["host"], mqtt["port"], username=mqtt["username"], password=mqtt["password"]
        )
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "ca": (directory / "ca.pem", mqtt["ca_pem"]),
        "cert": (directory / f"{enrolled['device_id']}.pem", enrolled["certificate_pem"]),
        "key": (directory / f"{enrolled['device_id']}.key", enrolled["private_key_pem"]),
    }
    for path, text in files.values():
        path.write_text(text)
    return MqttEndpoint(
        mqtt["host"],
        mqtt["port"],
        tls=True,
        ca_file=files["ca"][0],
        cert_file=files["cert"][0],
        key_file=files["key"][0],
    )


def make_bundle(
    compiled: Path, out_dir: Path, version: str, artifact: str = "onnxruntime:fp32"
) -> Path:
    """A bundle of the compiled digits model at ``version`` (model version = ``version``)."""
    out = out_dir / f"digits-{version}.efb"
    if not out.exists():
        bundle_compile_output(compiled, version=version, out=out, artifact_id=artifact)
    return out


def wait_for(
    probe: Callable[[], T | None], *, timeout_s: float = 30.0, what: str = "condition"
) -> T:
    """Poll ``probe`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


class CommandObserver:
    """A broker-side witness: every command any device was sent, as the broker delivered it.

    Connects with a broker account of its own, made through the broker's dynamic-security
    plugin (no fleet account may read ``cmd`` topics), and records ``(device_id, Command)``
    in arrival order.
    """

    def __init__(self, fleet: RunningFleet) -> None:
        import secrets
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from contracts.mqtt import Command, decode_payload, device_id_from_topic

        self.commands: list[tuple[str, Command]] = []
        subscribed = threading.Event()
        broker = fleet.server.broker
        assert broker is not None, "the observer needs the fleet's embedded broker"
        username, password = f"test-observer-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
        commands = "edgefleet/v1/devices/+/cmd"
        broker.control(
            [
                {
                    "command": "createRole",
                    "rolename": username,
                    "acls": [
                        {"acltype": kind, "topic": commands, "allow": True}
                        for kind in ("subscribeLiteral", "publishClientReceive")
                    ],
                },
                {
                    "command": "createClient",
                    "username": username,
                    "password": password,
                    "roles": [{"rolename": username}],
                },
            ]
        )
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5
        )
        self._client.username_pw_set(username, password)

        def on_connect(client: Any, *_: Any) -> None:
            client.subscribe("edgefleet/v1/devices/+/cmd", qos=1)

        def on_subscribe(*_: Any) -> None:
            subscribed.set()

        def on_message(_client: Any, _userdata: Any, message: Any) -> None:
            device_id, _ = device_id_from_topic(message.topic)
            self.commands.append((device_id, decode_payload(message.payload, Command)))

        self._client.on_connect = on_connect
        self._client.on_subscribe = on_subscribe
        self._client.on_message = on_message
        self._client.connect("127.0.0.1", fleet.mqtt_port)
        self._client.loop_start()
        assert subscribed.wait(10), "the observer could not subscribe"

    def devices_sent(self, kind: str) -> set[str]:
        return {device for device, command in self.commands if command.kind.value == kind}

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
