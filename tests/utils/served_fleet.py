"""``edgefleet fleet serve`` and ``edgefleet agent run`` as processes, as users run them, for
tests that kill them (or the fleet's mosquitto) for real.

:func:`serve_fleet` starts the server and waits until it answers; :class:`ServedFleet`
reads its API, metrics, logs and the addresses it printed. :func:`enroll_agent` enrolls a
real agent with ``edgefleet agent enroll`` and short reconnect backoffs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fleet.simulator import SimulatedDeviceSpec
from tests.utils.fleet import wait_for
from tests.utils.mqtt import free_port

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
_MQTT_LINE = re.compile(r"^MQTT listens on mqtts?://\S+:(\d+); devices are told (\S+)$", re.M)


@dataclass
class ServedFleet:
    """One ``fleet serve`` process: ``port`` is its HTTP port on loopback."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    port: int
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """``/api/v1{path}`` with the admin token the first start left in the data dir."""
        return self._call(method, f"/api/v1{path}", **kwargs)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        token = (self.data_dir / "admin.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.api(method, path, **kwargs)
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def publish(self, bundle: Path) -> dict[str, Any]:
        """Register the bundle's model version and attach the bundle; the bundle."""
        from ota.archive import read_manifest

        model = read_manifest(bundle).model
        self.ok("POST", "/models", json={"name": model.name, "version": model.version})
        attached: dict[str, Any] = self.ok(
            "POST",
            f"/models/{model.name}/versions/{model.version}/bundles",
            content=bundle.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
        return attached

    def rollout_done(self, rollout_id: str, timeout_s: float) -> dict[str, Any]:
        """The rollout once it finished (completed, paused or rolled back)."""
        finished = ("completed", "paused", "rolled_back", "aborted")
        return wait_for(
            lambda: (r := self.ok("GET", f"/rollouts/{rollout_id}"))["state"] in finished and r,
            timeout_s=timeout_s,
            what=f"rollout {rollout_id} to finish",
        )

    def health(self, which: str) -> int:
        """The status of ``/v2/health/{which}``; 0 when the server does not answer."""
        try:
            return httpx.get(f"{self.url}/v2/health/{which}", timeout=2).status_code
        except httpx.HTTPError:
            return 0

    def metric(self, name: str, labels: str = "", default: float | None = None) -> float:
        """One sample of ``/metrics``: ``name{labels}`` (``labels`` as exposed, e.g.
        ``worker="1"``); ``default`` when it is not there (``None``: fail the test)."""
        text = self._call("GET", "/metrics").text
        sample = f"{name}{{{labels}}}" if labels else name
        found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        if found is None and default is not None:
            return default
        assert found, f"{sample} is not in /metrics:\n{text[-2000:]}"
        return float(found.group(1))

    def online(self) -> set[str]:
        return {d["id"] for d in self.ok("GET", "/devices", params={"online": "true"})}

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def printed(self) -> str:
        return self.stdout.read_text(errors="replace")

    def mqtt_port(self) -> int:
        """The broker port ``fleet serve`` printed at start."""
        found = _MQTT_LINE.search(self.printed())
        assert found, f"fleet serve printed no MQTT address:\n{self.printed()}"
        return int(found.group(1))

    def mosquitto_pid(self) -> int:
        return int((self.data_dir / "mosquitto" / "mosquitto.pid").read_text())

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        self.process.wait(30)


def serve_fleet(data_dir: Path, port: int | None, *options: str) -> ServedFleet:
    """Start ``edgefleet fleet serve`` on loopback ``port`` and wait until it answers.

    ``None``: a free port, and another one if some other process takes it between the
    choice and the server's bind (an outgoing connection can be given any free port)."""
    attempts = _PORT_ATTEMPTS if port is None else 1
    refused = ""
    for _ in range(attempts):
        fleet, refused = _serve(data_dir, free_port() if port is None else port, options)
        if fleet is not None:
            return fleet
    raise AssertionError(
        f"fleet serve found its HTTP port in use {attempts} times; its last log:\n{refused}"
    )


_PORT_ATTEMPTS = 3


def _serve(data_dir: Path, port: int, options: tuple[str, ...]) -> tuple[ServedFleet | None, str]:
    """The server answering on ``port``; ``None`` and the tail of its log if it exited
    because that port (not another, such as the broker's) was taken."""
    stamp = time.time_ns()
    stdout = data_dir.parent / f"serve-{stamp}.out"
    stderr = data_dir.parent / f"serve-{stamp}.log"
    command = [EDGEFLEET, "fleet", "serve", "--data-dir", str(data_dir), "--port", str(port)]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [*command, "--rollout-tick", "0.1", *options], stdout=out, stderr=err
        )
    fleet = ServedFleet(process, data_dir, port, stdout, stderr)

    def answers() -> bool:
        if process.poll() is not None:
            if f":{port}: the port is in use" in fleet.log():  # fleet/listen.py's words
                return True
            raise AssertionError(f"fleet serve exited:\n{fleet.log()[-3000:]}")
        return fleet.health("live") == 200

    wait_for(answers, timeout_s=60, what="fleet serve to answer")
    if process.poll() is not None:
        return None, fleet.log()[-3000:]
    return fleet, ""


def enroll_simulated(
    fleet: ServedFleet, count: int, *, tags: list[str]
) -> tuple[list[SimulatedDeviceSpec], int]:
    """``count`` devices enrolled through ``/enroll`` with a token carrying ``tags``, and
    the broker port they were told."""
    grant = fleet.ok(
        "POST", "/enrollment-tokens", json={"profile": "host", "tags": tags, "uses": count}
    )["token"]
    specs = []
    for i in range(count):
        body = fleet.ok("POST", "/enroll", json={"token": grant, "device_id": f"sim-{i:03d}"})
        mqtt = body["mqtt"]
        specs.append(SimulatedDeviceSpec(body["device_id"], mqtt["username"], mqtt["password"]))
    return specs, int(mqtt["port"])


def enroll_agent(fleet: ServedFleet, out: Path, device_id: str) -> Path:
    """``edgefleet agent enroll``; its ``agent.toml`` with reconnects backing off 1 to 2 s."""
    grant = fleet.ok("POST", "/enrollment-tokens", json={"profile": "host"})["token"]
    result = subprocess.run(
        [EDGEFLEET, "agent", "enroll", "--fleet", fleet.url, "--token", grant, "--out",
         str(out), "--device-id", device_id],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = out / "agent.toml"
    text = config.read_text().replace("port = 8800", f"port = {free_port()}")
    text = text.replace("[mqtt]\n", "[mqtt]\nreconnect_min_s = 1\nreconnect_max_s = 2\n")
    config.write_text(text)
    return config


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [EDGEFLEET, "agent", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
