"""Device accounts on a mosquitto this process did not start (a standalone broker,
``edgefleet fleet broker``), changed through its dynamic-security plugin.

Every replica holds one admin connection of its own (``edgefleet-fleet-REPLICA-admin``:
client ids follow usernames, so replicas sharing one admin account would take each other's
connection) and adds and removes devices with the same commands the embedded broker uses
(:func:`~fleet.broker.security.device_addition`, :func:`~fleet.broker.security.removal`),
each answer read back: a device is in the broker once the call returns, and cut off from
it once :meth:`RemoteAccounts.remove_device` returns.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

from contracts.ids import check_device_id

from ..errors import BrokerError
from .control import ControlClient, NoAnswer, run_commands
from .endpoint import MqttEndpoint
from .security import device_addition, removal

__all__ = ["DeviceAccounts", "RemoteAccounts"]


class DeviceAccounts(Protocol):
    """Where enrollment and revocation put devices in and take them out of the broker:
    the embedded :class:`~fleet.broker.process.MosquittoBroker`, or
    :class:`RemoteAccounts`."""

    def add_device(self, device_id: str, *, password: str | None) -> None: ...

    def remove_device(self, device_id: str) -> None: ...


class RemoteAccounts:
    """The plugin's admin, over the network, as ``endpoint``'s account (see the module)."""

    def __init__(self, endpoint: MqttEndpoint, *, timeout_s: float = 5.0) -> None:
        if not endpoint.username:
            raise ValueError("the broker's admin endpoint needs a username and password")
        self._endpoint = endpoint
        self._timeout_s = timeout_s
        self._control = ControlClient(endpoint, client_id=endpoint.username)

    def connect(self, timeout_s: float) -> None:
        """``BrokerError`` when the broker does not take the admin account in time (its
        standalone broker creates it once the replica is in the database)."""
        self._control.connect(timeout_s)

    def close(self) -> None:
        self._control.close()

    def add_device(self, device_id: str, *, password: str | None) -> None:
        """As :meth:`MosquittoBroker.add_device <fleet.broker.process.MosquittoBroker.add_device>`
        (password mode only)."""
        check_device_id(device_id)
        if password is None:
            raise ValueError(
                f"device {device_id}: a standalone broker takes passwords, not certificates"
            )
        try:
            self.control(device_addition(device_id, password), f"add device {device_id}")
        except NoAnswer:
            with contextlib.suppress(BrokerError):
                self._control.send(removal(device_id))
            raise

    def remove_device(self, device_id: str) -> None:
        """Cut ``device_id`` off and refuse it from now on; returns once the broker
        confirmed (removing a device it does not hold is not an error)."""
        check_device_id(device_id)
        self.control(removal(device_id), f"remove device {device_id}")

    def control(self, commands: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        """Run dynamic-security commands; their answers. ``BrokerError`` if one failed or
        none came in time."""
        return run_commands(
            self._control,
            commands,
            what=what,
            timeout_s=self._timeout_s,
            details=lambda: f" (broker {self._endpoint.url})",
        )
