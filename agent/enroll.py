"""Enroll this device with a fleet and write what it needs to run: ``agent.toml`` and secrets.

``edgefleet agent enroll --fleet URL --token TOKEN`` trades a one-time enrollment token for
the device's identity (``POST /api/v1/enroll``) and writes, into one directory:

- ``agent.toml``: device id, broker, OTA URLs, the device's API token (mode 0600), and
  ``fleet_url``, the URL enrolled with: its origin is the only one the token goes to and
  the only one commands may send the device to;
- ``root.json``: the fleet's TUF root, the device's starting point of trust;
- with mTLS: ``device.crt``, ``device.key`` (0600) and ``ca.crt``.

Into a folder ``agent install`` made (root's, in the service's group) the secrets are 0640
in that group instead, so the service can read them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from contracts.durable import write_atomic

from .config import load_config
from .errors import EnrollmentError
from .origin import Origin

__all__ = ["Enrolled", "enroll_device"]


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    config_path: Path


def enroll_device(
    fleet_url: str,
    token: str,
    out_dir: Path,
    *,
    device_id: str,
    data_dir: Path | None = None,
    api_port: int = 8800,
) -> Enrolled:
    """Enroll ``device_id`` and write its configuration into ``out_dir``; its profile and
    tags come from the token."""
    base = fleet_url.rstrip("/")
    try:
        Origin.of(base)
    except ValueError as e:
        raise EnrollmentError(
            f"cannot enroll: {e}; give the fleet's address (http://fleet:8000)"
        ) from None
    try:
        response = httpx.post(
            f"{base}/api/v1/enroll",
            json={"token": token, "device_id": device_id},
            timeout=30.0,
        )
    except httpx.HTTPError as e:
        raise EnrollmentError(f"cannot reach the fleet at {fleet_url}: {e}") from e
    if not response.is_success:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise EnrollmentError(
            f"the fleet refused the enrollment ({response.status_code}): {detail}"
        )
    body: dict[str, Any] = response.json()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / "root.json", json.dumps(body["ota_root"], indent=1), private=False)
    mqtt = body["mqtt"]
    lines = [
        f"device_id = {json.dumps(body['device_id'])}",
        f"data_dir = {json.dumps(str(data_dir or 'data'))}",
        f"api_token = {json.dumps(body['api_token'])}",
        f"fleet_url = {json.dumps(base)}",
        "",
        "[mqtt]",
        f"host = {json.dumps(mqtt['host'])}",
        f"port = {mqtt['port']}",
        f"tls = {'true' if mqtt['tls'] else 'false'}",
    ]
    if mqtt.get("password"):
        lines += [
            f"username = {json.dumps(mqtt['username'])}",
            f"password = {json.dumps(mqtt['password'])}",
        ]
    if mqtt["tls"]:
        _write(out_dir / "ca.crt", mqtt["ca_pem"], private=False)
        _write(out_dir / "device.crt", body["certificate_pem"], private=False)
        _write(out_dir / "device.key", body["private_key_pem"], private=True)
        lines += ['ca_file = "ca.crt"', 'cert_file = "device.crt"', 'key_file = "device.key"']
    lines += [
        "",
        "[ota]",
        f"metadata_url = {json.dumps(body['ota_metadata_url'])}",
        f"targets_url = {json.dumps(body['ota_targets_url'])}",
        'trusted_root = "root.json"',
        "",
        "[api]",
        f"port = {api_port}",
        "",
        "[fallback]",
        f"url = {json.dumps(body['api_url'])}",
        f"token = {json.dumps(body['api_token'])}",
        "",
    ]
    config_path = out_dir / "agent.toml"
    _write(config_path, "\n".join(lines), private=True)
    load_config(config_path)  # what was written must be what the agent accepts
    return Enrolled(device_id=body["device_id"], config_path=config_path)


def _write(path: Path, text: str, *, private: bool) -> None:
    """Secrets are the writer's alone (0600), except in a folder of another group that the
    writer may give them to (``agent install`` makes ``/etc/edgefleet`` root's in the
    service's group): there 0640 and that group, so the service, which runs as its own user,
    can read its config."""
    if not private:
        write_atomic(path, text.encode(), mode=0o644)
        return
    group = path.parent.stat().st_gid
    shared = group != os.getegid() and (os.geteuid() == 0 or group in os.getgroups())
    write_atomic(path, text.encode(), mode=0o640 if shared else 0o600)
    if shared:
        os.chown(path, -1, group)
