"""The broker's authority: mosquitto's dynamic-security plugin, its document and roles.

Who may connect and what each client may do lives in mosquitto's **dynamic-security
plugin** (``mosquitto_dynamic_security.so``, shipped with mosquitto 2.0; this package is
written against 2.0.11, read from its ``plugins/dynamic-security/`` sources and checked by
``tests/test_fleet_broker.py`` and ``tests/test_hostile_broker.py``). There is no password
file and no ``acl_file``: mosquitto 2.0's ``acl_file`` never checks a SUBSCRIBE
(``security_default.c`` grants it, with a FIXME), so any device could subscribe to the
fleet's ``$share/fleet/...`` and take a share of every device's messages.

What the broker enforces:

* ``allow_anonymous false``; the default for every ACL type is *deny* (``publishClientSend``,
  ``publishClientReceive``, ``subscribe``), but ``unsubscribe``.
* ``use_username_as_clientid true`` on the listener: a client's id *is* its username, so a
  device that connects with another device's client id becomes itself and kicks nobody off
  (this holds for certificates too, where the plugin's own ``clientid`` binding is never
  checked). One account therefore holds one connection at a time.
The roles' ACLs are written from :data:`fleet.broker.access.RULES`, the table an external
broker's HTTP authorization hook is answered from too:

* Each device is a client ``ID`` with one role ``device-ID``: it may subscribe to exactly
  ``edgefleet/v1/devices/ID/cmd`` (a literal filter; ``#``, ``+`` and ``$share/...`` are
  refused in the SUBACK, reason ``0x87 Not authorized``), receive that topic, and publish
  its own ``ack``, ``status`` and ``telemetry``; nothing else.
* Each fleet replica's account (``edgefleet-fleet-REPLICA``, role ``fleet``) may subscribe
  to exactly its three shared subscriptions
  ``$share/fleet/edgefleet/v1/devices/+/{status,ack,telemetry}`` (the plugin checks the full
  ``$share/...`` filter), receive those topics, and publish any device's ``cmd``.
* Admin accounts (``edgefleet-fleet-REPLICA-admin``, role ``broker-admin``; separate so
  they do not take the bridge's connection) may only publish dynamic-security commands to
  ``$CONTROL/dynamic-security/v1`` and read their answers. The embedded broker's admin
  password is new at every start and lives only in memory; a standalone broker
  (:mod:`fleet.standalone`) gives its replicas' admin accounts the password in the
  credential file they share.

Two modes. Without a CA, clients log in with a username and password: the plugin stores
mosquitto's PBKDF2-SHA512 hash, salt and iteration count, which are exactly the fields of
the ``$7$`` hashes the fleet keeps (:func:`hash_password`), so the file is written from
the database without any plaintext. With a :class:`~fleet.ca.FleetCA` the listener is mTLS
only: every client shows a certificate from the CA, its CN is its username
(``use_identity_as_username``; mosquitto then skips the password check) and the CA's CRL
is checked at each handshake.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from contracts.ids import check_device_id

from .access import CONTROL_TOPIC, RESPONSE_TOPIC, AccountKind, Action, rules_for

__all__ = [
    "CONTROL_TOPIC",
    "RESPONSE_TOPIC",
    "DeviceCredential",
    "ServiceAccount",
    "device_addition",
    "device_role",
    "device_role_name",
    "dynsec_password",
    "hash_password",
    "removal",
    "security_document",
    "service_account_commands",
    "verify_password",
]

_SALT_BYTES = 12
_HASH_BYTES = 64
_PBKDF2_HASH = re.compile(r"\$7\$([1-9][0-9]{0,8})\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})")
_ACL_TYPES = {
    Action.SUBSCRIBE: "subscribeLiteral",
    Action.PUBLISH: "publishClientSend",
    Action.RECEIVE: "publishClientReceive",
}
"""How each rule of :data:`fleet.broker.access.RULES` is written for the plugin."""


def hash_password(password: str, *, iterations: int = 101) -> str:
    """A mosquitto 2.0 password hash: ``$7$ITERATIONS$SALT$HASH`` (PBKDF2-HMAC-SHA512).

    101 iterations is ``mosquitto_passwd``'s default; mosquitto hashes each CONNECT's
    password again, so more iterations cost broker CPU per connection.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, not {iterations}")
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, _HASH_BYTES)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def dynsec_password(password_hash: str) -> dict[str, Any] | None:
    """The plugin's ``password``, ``salt`` and ``iterations`` fields of a ``$7$`` hash;
    ``None`` when it is not one the plugin can load (12-byte salt, 64-byte digest)."""
    found = _PBKDF2_HASH.fullmatch(password_hash)
    if found is None:
        return None
    iterations, salt, digest = found.groups()
    try:
        salt_ok = len(base64.b64decode(salt, validate=True)) == _SALT_BYTES
        digest_ok = len(base64.b64decode(digest, validate=True)) == _HASH_BYTES
    except ValueError:
        return None
    if not (salt_ok and digest_ok):
        return None
    return {"password": digest, "salt": salt, "iterations": int(iterations)}


def verify_password(password: str, password_hash: str) -> bool:
    """Whether ``password`` is the one ``password_hash`` (a ``$7$`` hash) was made from."""
    found = _PBKDF2_HASH.fullmatch(password_hash)
    if found is None:
        return False
    iterations, salt, digest = found.groups()
    try:
        expected = base64.b64decode(digest, validate=True)
        computed = hashlib.pbkdf2_hmac(
            "sha512",
            password.encode(),
            base64.b64decode(salt, validate=True),
            int(iterations),
            len(expected),
        )
    except (ValueError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(computed, expected)


@dataclass(frozen=True)
class DeviceCredential:
    """A device's broker identity as the database holds it: its id, and a password hash."""

    device_id: str
    password_hash: str | None
    """``None``: this device connects with a client certificate only."""

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        if self.password_hash is not None and dynsec_password(self.password_hash) is None:
            raise ValueError(
                f"the password hash of {self.device_id} is not a mosquitto $7$ PBKDF2-SHA512 "
                f"hash with a {_SALT_BYTES}-byte salt and a {_HASH_BYTES}-byte digest: make "
                "it with hash_password()"
            )


@dataclass(frozen=True)
class ServiceAccount:
    """One of the fleet's own broker accounts: a replica's bridge, or the plugin's admin."""

    username: str
    kind: AccountKind
    password_hash: str | None
    """``None``: it connects with a client certificate from the fleet's CA."""

    def __post_init__(self) -> None:
        check_device_id(self.username)
        if self.kind is AccountKind.DEVICE:
            raise ValueError(f"{self.username}: devices are DeviceCredential, not accounts")


def device_role_name(device_id: str) -> str:
    return f"device-{device_id}"


def _acls(kind: AccountKind, device_id: str | None = None) -> list[dict[str, Any]]:
    return [
        {"acltype": _ACL_TYPES[rule.action], "topic": rule.topic, "allow": True}
        for rule in rules_for(kind, device_id)
    ]


def device_role(device_id: str) -> dict[str, Any]:
    """Subscribe to and receive its own ``cmd``; publish its own ``ack``, ``status`` and
    ``telemetry`` (:data:`fleet.broker.access.RULES`)."""
    return {"rolename": device_role_name(device_id), "acls": _acls(AccountKind.DEVICE, device_id)}


def removal(device_id: str) -> list[dict[str, Any]]:
    """The plugin's commands that take a device's client and role out."""
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": device_role_name(device_id)},
    ]


def device_addition(device_id: str, password: str | None) -> list[dict[str, Any]]:
    """The plugin's commands that let ``device_id`` in with its own role (``password``:
    ``None`` for a device with a certificate), replacing a stale entry of that id."""
    client: dict[str, Any] = {"command": "createClient", "username": device_id}
    if password is not None:
        client["password"] = password
    client["roles"] = [{"rolename": device_role_name(device_id)}]
    return [*removal(device_id), {"command": "createRole", **device_role(device_id)}, client]


def service_account_commands(
    username: str, kind: AccountKind, password: str
) -> list[dict[str, Any]]:
    """The plugin's commands that add a service account with ``password`` (its role
    exists: :func:`security_document` writes every kind's)."""
    return [
        {
            "command": "createClient",
            "username": username,
            "password": password,
            "roles": [{"rolename": kind.value}],
        }
    ]


def _client(username: str, role: str, password_hash: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"username": username, "roles": [{"rolename": role}]}
    if password_hash is not None:
        fields = dynsec_password(password_hash)
        if fields is None:  # DeviceCredential and hash_password make only loadable ones
            raise ValueError(f"the password hash of {username} cannot be loaded by mosquitto")
        entry.update(fields)
    return entry


def security_document(
    accounts: Sequence[ServiceAccount], devices: Sequence[DeviceCredential]
) -> dict[str, Any]:
    """``dynamic-security.json``: deny by default; a role per kind of service account
    (``fleet``, ``broker-admin``) and per device, and a client for each account and
    device."""
    service_roles = [
        {"rolename": kind.value, "acls": _acls(kind)}
        for kind in (AccountKind.FLEET, AccountKind.BROKER_ADMIN)
    ]
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [
            *(_client(a.username, a.kind.value, a.password_hash) for a in accounts),
            *(
                _client(d.device_id, device_role_name(d.device_id), d.password_hash)
                for d in devices
            ),
        ],
        "groups": [],
        "roles": [*service_roles, *(device_role(d.device_id) for d in devices)],
    }
