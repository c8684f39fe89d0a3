"""The fleet's MQTT broker: mosquitto (2.0) with its dynamic-security plugin as the only
authority, started, configured and kept running by the fleet.

- :mod:`~fleet.broker.endpoint`: :class:`MqttEndpoint` (``mqtt(s)://`` URLs) and the
  address devices are told;
- :mod:`~fleet.broker.access`: who may subscribe to and publish what, one table per kind
  of account, from which both the plugin's roles and the HTTP authorization answers come;
- :mod:`~fleet.broker.security`: what the broker enforces (read its docstring), the
  plugin's document and roles, ``$7$`` password hashes;
- :mod:`~fleet.broker.credential`: the replicas' accounts and the credential file they
  share; :mod:`~fleet.broker.remote`: device accounts on a standalone broker;
- :mod:`~fleet.broker.control`: the admin connection that changes accounts at run time;
- :mod:`~fleet.broker.process`: :class:`MosquittoBroker`, the child process, its config,
  its port (chosen once, kept in its directory) and persistence;
- :mod:`~fleet.broker.supervisor`: :class:`BrokerSupervisor`, which restarts it when it dies.

What survives which kill (mosquitto saves ``mosquitto.db`` on a clean stop and every
:data:`~fleet.broker.process.AUTOSAVE_INTERVAL_S` seconds, and loads it at start; it holds
retained messages and the sessions of clients that keep one, with their subscriptions and
queued QoS 1 messages; devices connect with clean sessions, the fleet's bridge keeps one,
see :mod:`fleet.bridge`):

- **fleet SIGTERM**: the fleet stops its bridge, then mosquitto with SIGTERM, which saves
  everything it holds; the next start listens on the same port and loads it. Devices
  reconnect within their backoff; nothing is lost.
- **fleet SIGKILL**: its mosquitto keeps running (a child outlives its parent), devices stay
  connected, and what they publish queues for the fleet's session (at most
  :data:`~fleet.broker.process.MAX_QUEUED_BYTES` bytes of payload, however many messages;
  past that mosquitto drops new ones, and the bridge's queue alarm fires at a quarter of
  it: see docs/fleet.md, "Bursts"). The next start stops that mosquitto with SIGTERM (it
  saves all it holds, the queue included) and starts a new one from that file on the same
  port: the fleet's session resumes with the queue; devices reconnect. Nothing within the
  limits is lost (``tests/test_outage_restart.py`` sends telemetry while the fleet is
  dead).
  (The alternative, adopting the running broker, would need its admin credential kept on
  disk and a config it could not be sure matches the database; a restart costs devices
  one reconnect and keeps the broker's configuration a function of the database.)
- **mosquitto SIGKILL** (or OOM, or a crash): nothing is saved; the supervisor restarts it
  on the same port from the last autosave. Lost: what it held in memory since then and
  had not delivered: devices' messages queued for the fleet's session (only while the
  bridge was disconnected or slow) and messages in flight; devices send those records
  again, since no storage receipt named them (``fleet/receipts.py``);
  what the last autosave held and was delivered since comes again (telemetry is stored
  once per record id). Commands and acks are not lost for good: the rollout engine resends every
  command without a final ack when a device comes back online, and a device re-acks a
  command it has seen. Devices' Last Wills are not sent (the broker is gone), so the fleet marks
  every device offline itself; each is online again once it reconnects and publishes its
  status. Retained statuses older than the autosave may come back; mosquitto 2.0.11 hands
  retained messages to shared subscriptions too, and the fleet reconciles from them.
- mosquitto 2.0.11 does not save shared subscriptions: a broker started from its save holds
  the fleet's session without them until the bridge subscribes again (at once, on
  connect). A device publishing in that gap gets PUBACK ``0x10`` "No matching
  subscribers", and the agent keeps such a batch queued and sends it again.
- **both** (the machine loses power): as a mosquitto SIGKILL, from the last autosave.
"""

from __future__ import annotations

from .endpoint import MqttEndpoint
from .process import MosquittoBroker, find_dynsec_plugin
from .remote import DeviceAccounts, RemoteAccounts
from .security import CONTROL_TOPIC, DeviceCredential, ServiceAccount, hash_password
from .supervisor import BrokerSupervisor

__all__ = [
    "CONTROL_TOPIC",
    "BrokerSupervisor",
    "DeviceAccounts",
    "DeviceCredential",
    "MosquittoBroker",
    "MqttEndpoint",
    "RemoteAccounts",
    "ServiceAccount",
    "find_dynsec_plugin",
    "hash_password",
]
