"""The starter ``agent.toml`` an install writes (:func:`render_config`), and the device id
it defaults to (:func:`default_device_id`)."""

from __future__ import annotations

import json
import re
import socket
import tomllib
from pathlib import Path

from pydantic import ValidationError

from ..config import AgentConfig
from ..errors import InstallError

__all__ = ["default_device_id", "render_config"]


def default_device_id() -> str:
    """The host name, made fit for ``device_id`` (letters, digits, ``._-``, 64 at most)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "edgefleet-device"


def render_config(
    *, device_id: str, data_dir: Path, mqtt_host: str = "127.0.0.1", mqtt_port: int = 1883
) -> str:
    """A starter ``agent.toml``, checked against :class:`agent.config.AgentConfig`."""
    text = f"""\
# The edgefleet agent's config, written by `edgefleet agent install`.
# Only device_id and data_dir are required; every other key has a default.
device_id = {json.dumps(device_id)}
data_dir = {json.dumps(str(data_dir))}

[mqtt]
host = {json.dumps(mqtt_host)}
port = {mqtt_port}

[api]
# The local Open Inference Protocol server; loopback unless you mean otherwise.
host = "127.0.0.1"
port = 8800
"""
    try:
        AgentConfig.model_validate(tomllib.loads(text))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise InstallError(f"cannot write a valid agent.toml: {problems}") from e
    return text
