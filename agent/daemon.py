"""The agent daemon: one MQTT connection, the updater, inference, telemetry and the local API.

``edgefleet agent run --config agent.toml`` builds an :class:`AgentDaemon` and runs it until
SIGTERM. The daemon only wires the parts together; each lives in its own module:

- ``agent.updater``: deploy and rollback commands, A/B slots, health check;
- ``agent.inference`` (+ ``agent.fallback``): answers, cloud fallback, shadow mode;
- ``agent.telemetry`` / ``agent.telemetry_queue``: per-interval records, kept on disk until
  the fleet's storage receipt (its ``receipt`` topic, subscribed with ``cmd``) names them;
- ``agent.api``: the local Open Inference Protocol server;
- ``agent.ground_truth``: the answers served, for true labels to be matched with.

MQTT (topics in ``contracts.mqtt``): the device subscribes to its ``cmd`` topic and only
then publishes its retained ``online`` status, so the fleet, which resends unfinished
commands when a device comes online, never sends into the void. The Last Will marks it
offline. The session starts clean on every connect; paho reconnects with backoff, and
``agent._broker_log`` says so: an outage when it begins, failed attempts at most once a
minute, and the reconnection. Each
PUBACK's reason code goes to the telemetry sender, which keeps a refused batch queued.
Commands run one at a time on a worker thread (downloads block); a malformed command is
logged and dropped, one past its ``expires_at`` on arrival is stale and ignored (no ack,
no record: a fresh copy is acted on), and one whose URLs name another origin than the
fleet's is refused. A command id seen before is only re-acked, shadow commands included.
The retained status also names the last command finished and how, and is published again
whenever that or the serving bundle changes, so the fleet recovers a lost final ack.
True labels the fleet relays on the device's ``truth`` topic (subscribed with ``cmd``) are
applied as the local API applies them; a malformed batch is logged and dropped.

HTTP: the device's API token goes only to the fleet's origin (``agent.origin``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from contracts.mqtt import (
    Ack,
    AckState,
    Command,
    CommandKind,
    GroundTruthBatch,
    PayloadError,
    Status,
    decode_payload,
    device_topic,
)
from ota.client import OtaClient
from ota.errors import OtaError

from . import sd_notify
from ._broker_log import ConnectionLog
from .config import AgentConfig
from .errors import AgentError
from .ground_truth import PredictionLog
from .inference import InferenceService
from .model import LoadedModel, load_installed, unpack_bundle
from .origin import FleetAuth, foreign_urls
from .telemetry import InferenceOutcome, InferenceStats, TelemetrySender
from .telemetry_queue import TelemetryQueue
from .updater import Updater

if TYPE_CHECKING:
    import uvicorn

__all__ = ["AGENT_VERSION", "AgentDaemon"]

log = logging.getLogger(__name__)

_StatusKey = tuple[str | None, str | None, AckState | None, str]
"""What a status says: serving bundle, last command, its final state, the updater's state."""

try:
    AGENT_VERSION = importlib.metadata.version("edgefleet")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    AGENT_VERSION = "0.0.0"


class AgentDaemon:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self._origin = config.fleet_origin
        auth = (
            FleetAuth(config.api_token, self._origin) if config.api_token and self._origin else None
        )
        self._http = httpx.Client(auth=auth, timeout=30.0, follow_redirects=True)
        fallback = config.fallback
        if fallback.model is None and config.model_name is not None:
            fallback = fallback.model_copy(update={"model": config.model_name})
        self.service = InferenceService(fallback)
        self.stats = InferenceStats()
        self.predictions = PredictionLog(config.ground_truth, on_label=self.stats.observe_truth)
        self._truth_topic = device_topic(config.device_id, "truth")
        self.queue = TelemetryQueue(data / "telemetry.db", config.telemetry.max_queue_bytes)
        self.updater = Updater(
            data,
            ack=self._publish_ack,
            activate=self._activate,
            ota=config.ota,
            health=config.health,
            http=self._http,
            origin=self._origin,
        )
        self.service.add_observer(self._observe)
        self._link = ConnectionLog(f"{config.mqtt.host}:{config.mqtt.port}")
        self.client = self._mqtt_client()
        self.sender = TelemetrySender(self.queue, config.device_id, self.client, config.telemetry)
        self._commands: queue.Queue[Command | None] = queue.Queue()
        self._status_shown: _StatusKey | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._api: uvicorn.Server | None = None
        self.malformed_commands = 0
        self.stale_commands = 0

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Serve what is installed, then connect; returns once everything runs."""
        self.updater.recover()
        if self.config.api.enabled:
            from .api import local_api_server  # FastAPI only where the local API runs

            self._api = local_api_server(
                self.service,
                self.config.api,
                model_name=self.config.model_name,
                predictions=self.predictions,
            )
            self._spawn("local-api", self._api.run)
        self._spawn("commands", self._command_loop)
        self.sender.start()
        mqtt_config = self.config.mqtt
        self.client.connect_async(mqtt_config.host, mqtt_config.port, mqtt_config.keepalive_s)
        self.client.loop_start()
        sd_notify.notify("READY=1")

    def run(self) -> None:
        """Queue telemetry every interval, feed the watchdog; until :meth:`request_stop`."""
        watchdog = sd_notify.watchdog_interval()
        tick = min(self.config.telemetry.interval_s, watchdog / 2 if watchdog else 1.0, 1.0)
        next_report = time.monotonic() + self.config.telemetry.interval_s
        while not self._stop.wait(tick):
            if watchdog:
                sd_notify.notify("WATCHDOG=1")
            self.updater.poll()
            if time.monotonic() >= next_report:
                next_report += self.config.telemetry.interval_s
                self.report()
            if self.client.is_connected() and self._status_key() != self._status_shown:
                self._publish_status(online=True)  # a health check ended since

    def request_stop(self) -> None:
        """Make :meth:`run` return (safe from a signal handler)."""
        self._stop.set()

    def report(self) -> None:
        """Queue what the inferences since the last report add up to, and wake the sender."""
        records = self.stats.report()
        if records:
            self.queue.put_many(records)
            self.sender.wake()

    def stop(self) -> None:
        """Queue the last record, give the sender a moment, say goodbye, shut down."""
        self._stop.set()
        self.report()
        self._commands.put(None)
        self.sender.flush(timeout_s=5.0)
        self.sender.stop()
        if self.client.is_connected():
            info = self._publish_status(online=False)
            info.wait_for_publish(timeout=5.0)
        self.client.disconnect()
        self.client.loop_stop()
        if self._api is not None:
            self._api.should_exit = True
        for thread in self._threads:
            thread.join(timeout=30.0)
        self.service.close()
        self.updater.close()
        self.queue.close()
        self._http.close()

    def _spawn(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # --- MQTT -----------------------------------------------------------------------------

    def _mqtt_client(self) -> mqtt.Client:
        config = self.config.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.config.device_id, protocol=mqtt.MQTTv5
        )
        if config.username:
            client.username_pw_set(config.username, config.password)
        if config.tls:
            client.tls_set(
                ca_certs=str(config.ca_file) if config.ca_file else None,
                certfile=str(config.cert_file) if config.cert_file else None,
                keyfile=str(config.key_file) if config.key_file else None,
            )
        client.will_set(
            device_topic(self.config.device_id, "status"),
            Status(online=False, agent_version=AGENT_VERSION).model_dump_json(exclude_none=True),
            qos=1,
            retain=True,
        )
        client.reconnect_delay_set(int(config.reconnect_min_s), int(config.reconnect_max_s))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            refused = f"it refused the connection: {reason} (credentials revoked?)"
            self._link.failed(refused, level=logging.ERROR)
            return
        self._link.connected()
        client.subscribe(
            [
                (device_topic(self.config.device_id, "cmd"), 1),
                (self._truth_topic, 1),
                (self.sender.receipt_topic, 1),
            ]
        )

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        """paho calls this from inside its ``except OSError`` around the connect."""
        error = sys.exc_info()[1]
        self._link.failed(str(error) if error else "the connection failed")

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if not self._stop.is_set():
            self._link.lost(str(reason))

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        if reasons and reasons[0].is_failure:
            log.error("the broker refused the command subscription: %s", reasons[0])
            return
        if len(reasons) > 1 and reasons[1].is_failure:
            log.warning(
                "the broker refused the ground-truth subscription (%s): labels the fleet "
                "relays will not arrive; does the broker's ACL let this device read %s?",
                reasons[1],
                self._truth_topic,
            )
        if len(reasons) > 2 and reasons[2].is_failure:
            log.error(
                "the broker refused the storage receipt subscription (%s): telemetry is sent "
                "again and again and never leaves the queue; does the broker's ACL let this "
                "device read %s?",
                reasons[2],
                self.sender.receipt_topic,
            )
        self._publish_status(online=True)
        self.sender.wake()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._truth_topic:
            self._on_truth(message)
            return
        try:
            command = Command.model_validate_json(message.payload)
        except ValidationError as e:
            self.malformed_commands += 1
            log.warning("dropped a malformed command on %s: %s", message.topic, e)
            return
        if command.expired(time.time()):
            self.stale_commands += 1
            log.warning(
                "ignored command %s: it expired at %s, before it arrived (it sat in a queue, "
                "or this device's clock is ahead); the fleet sends a fresh copy if it still "
                "wants it",
                command.id,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(command.expires_at or 0)),
            )
            return
        self._commands.put(command)

    def _on_truth(self, message: mqtt.MQTTMessage) -> None:
        try:
            batch = decode_payload(bytes(message.payload), GroundTruthBatch)
        except PayloadError as e:
            log.warning("dropped malformed ground truth on %s: %s", message.topic, e)
            return
        outcomes = self.predictions.label(batch.labels)
        matched = sum(o.status == 200 for o in outcomes)
        log.info("ground truth from the fleet: %d of %d label(s) matched", matched, len(outcomes))

    def _on_publish(
        self, _client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Any
    ) -> None:
        self.sender.published(mid, reason)

    def _status_key(self) -> _StatusKey:
        serving, outcome = self.updater.serving, self.updater.last_outcome
        return (
            f"{serving.name}-{serving.version}" if serving else None,
            outcome.command if outcome else None,
            outcome.state if outcome else None,
            str(self.updater.state),
        )

    def _publish_status(self, *, online: bool) -> mqtt.MQTTMessageInfo:
        serving = self.updater.serving
        key = self._status_key()
        status = Status(
            online=online,
            agent_version=AGENT_VERSION,
            bundle=key[0],
            bundle_version_number=serving.version_number if serving else None,
            state=key[3],
            ts=time.time(),
            last_command=key[1],
            last_command_state=key[2],
        )
        self._status_shown = key
        return self.client.publish(
            device_topic(self.config.device_id, "status"),
            status.model_dump_json(exclude_none=True),
            qos=1,
            retain=True,
        )

    def _publish_ack(self, ack: Ack) -> None:
        log.info("command %s: %s %s", ack.command, ack.state, ack.detail)
        self.client.publish(
            device_topic(self.config.device_id, "ack"), ack.model_dump_json(), qos=1
        )

    def _answer(self, ack: Ack) -> None:
        """An ack the agent sends itself (not the updater): recorded, so that a resend of
        its command is re-acked, then published."""
        self.updater.record(ack)
        self._publish_ack(ack)

    # --- commands -------------------------------------------------------------------------

    def _command_loop(self) -> None:
        while (command := self._commands.get()) is not None:
            try:
                if command.kind in (CommandKind.DEPLOY, CommandKind.ROLLBACK):
                    self.updater.handle(command)
                elif (seen := self.updater.acked(command.id)) is not None:
                    self._publish_ack(seen.model_copy(update={"ts": time.time()}))
                elif command.kind is CommandKind.SHADOW:
                    self._start_shadow(command)
                else:
                    self._stop_shadow(command)
            except Exception as e:  # one bad command must not stop the next ones
                log.exception("command %s failed", command.id)
                self._answer(_ack(command, AckState.FAILED, f"the agent failed: {e}"))
            # only a changed status is sent: the fleet answers each status from an online
            # device by resending its unfinished commands, so a status per command (a
            # resent one included) would loop
            if self.client.is_connected() and self._status_key() != self._status_shown:
                self._publish_status(online=True)

    def _start_shadow(self, command: Command) -> None:
        """Install the challenger beside the champion (never serving) and run it in shadow."""
        if command.bundle is None or command.metadata_url is None:
            self._answer(_ack(command, AckState.FAILED, "a shadow command needs a bundle"))
            return
        refusal = foreign_urls(command, self._origin) if self._origin else None
        if refusal:
            self._answer(_ack(command, AckState.FAILED, refusal))
            return
        self._answer(_ack(command, AckState.DOWNLOADING))
        shadow_dir = self.config.data_dir / "shadow"
        try:
            client = OtaClient(
                self.config.data_dir / "ota" / "metadata",
                command.metadata_url,
                targets_url=command.targets_url,
                target_dir=self.config.data_dir / "ota" / "downloads",
                http=self._http,
            )
            target = client.target(command.bundle.target_path)
            if target.hashes.get("sha256") != command.bundle.sha256:
                raise OtaError("the signed target does not match the command's sha256")
            path = client.download(target)
            self._answer(_ack(command, AckState.VERIFIED))
            self._stop_shadow(None)
            shutil.rmtree(shadow_dir, ignore_errors=True)
            unpack_bundle(path, shadow_dir)
            challenger = load_installed(shadow_dir)
            golden = challenger.check_golden_vectors()
            if not golden.passed:
                raise AgentError(f"the challenger failed its golden vectors: {golden.detail}")
        except (OtaError, AgentError, OSError) as e:
            self._answer(_ack(command, AckState.FAILED, str(e)))
            return
        self.service.set_shadow(challenger)
        self._answer(_ack(command, AckState.INSTALLED))
        self._answer(_ack(command, AckState.HEALTHY, f"{challenger.bundle} in shadow"))

    def _stop_shadow(self, command: Command | None) -> None:
        self.service.set_shadow(None)
        if command is not None:
            self._answer(_ack(command, AckState.ROLLED_BACK, "shadow stopped"))

    # --- inference ------------------------------------------------------------------------

    def _activate(self, model: LoadedModel | None) -> None:
        """The updater hands over the model to serve; the one it replaces is left to the
        garbage collector once in-flight calls are done with it."""
        self.service.set_model(model)

    def _observe(self, outcome: InferenceOutcome) -> None:
        self.stats.observe(outcome)
        if outcome.bundle is not None:
            self.updater.observe(outcome.local_error)


def _ack(command: Command, state: AckState, detail: str = "") -> Ack:
    return Ack(command=command.id, state=state, detail=detail, ts=time.time())


def run_agent(config_path: Path) -> None:
    """``edgefleet agent run``: load the config, start, run until SIGTERM or Ctrl-C."""
    import signal

    from .config import load_config

    daemon = AgentDaemon(load_config(config_path))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.request_stop())
    daemon.start()
    try:
        daemon.run()
    finally:
        daemon.stop()
