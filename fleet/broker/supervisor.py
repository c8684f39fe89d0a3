"""Keep the embedded mosquitto running: watch it, and restart it when it dies.

A thread checks the broker every ``check_interval_s``: the process is alive and keeps the
fleet's admin connection (paho pings it, so a broker that stopped answering loses it
within its keepalive). When either fails the supervisor, at once, logs an error with the
last lines of mosquitto's log and calls ``on_down`` (the fleet flips readiness and marks
every device offline); then it restarts mosquitto on the same address and port, with its
configuration and accounts written again from ``credentials()`` (the database). The first
restart waits ``restart_delay_s``; each failed attempt, or a death within ``stable_s`` of the
last restart, doubles the wait up to ``max_delay_s``. Once it is back it checks that every
device the database holds is in the broker (an enrollment committed while it restarted
could be missing: then it restarts once more), logs that it is back and calls ``on_up``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .endpoint import MqttEndpoint
from .process import MosquittoBroker
from .security import DeviceCredential, ServiceAccount

__all__ = ["BrokerSupervisor"]

log = logging.getLogger(__name__)


class BrokerSupervisor:
    """Starts ``broker`` and keeps it running (see the module's docstring).

    ``credentials``: every device's broker identity, read afresh for each start;
    ``accounts``: more service accounts (a standalone broker's replicas), likewise.
    ``on_down(problem)`` and ``on_up()`` run on the supervisor's thread; an exception in
    them is logged and does not stop the supervision.
    """

    def __init__(
        self,
        broker: MosquittoBroker,
        *,
        fleet_username: str | None,
        fleet_password: str,
        credentials: Callable[[], list[DeviceCredential]],
        accounts: Callable[[], list[ServiceAccount]] = list,
        on_down: Callable[[str], None] = lambda _problem: None,
        on_up: Callable[[], None] = lambda: None,
        check_interval_s: float = 0.2,
        unresponsive_s: float = 15.0,
        restart_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        stable_s: float = 60.0,
    ) -> None:
        if not 0 < restart_delay_s <= max_delay_s:
            raise ValueError(
                f"restart_delay_s must be > 0 and at most max_delay_s ({max_delay_s}), "
                f"not {restart_delay_s}"
            )
        self._broker = broker
        self._fleet_username = fleet_username
        self._fleet_password = fleet_password
        self._credentials = credentials
        self._accounts = accounts
        self._on_down = on_down
        self._on_up = on_up
        self._check_interval_s = check_interval_s
        self._unresponsive_s = unresponsive_s
        self._restart_delay_s = restart_delay_s
        self._max_delay_s = max_delay_s
        self._stable_s = stable_s
        self._delay_s = restart_delay_s
        self._up = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._up_since = 0.0
        self._down_since = 0.0
        self._unhealthy_since: float | None = None
        self.restarts = 0
        """Restarts that brought the broker back, since :meth:`start`."""

    @property
    def up(self) -> bool:
        """Whether mosquitto runs and answers (as of the last check)."""
        return self._up.is_set()

    def start(self) -> MqttEndpoint:
        """Start mosquitto (``BrokerError`` as :meth:`MosquittoBroker.start` raises it) and
        the thread that watches it; the fleet's endpoint."""
        if self._thread is not None:
            raise RuntimeError("the supervisor is already started")
        endpoint = self._start_broker()
        self._up_since = time.monotonic()
        self._up.set()
        self._thread = threading.Thread(target=self._watch, name="mqtt-broker", daemon=True)
        self._thread.start()
        return endpoint

    def stop(self) -> None:
        """Stop watching, then stop mosquitto (it saves its persistence file)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._up.clear()
        self._broker.stop()

    # --- the thread -----------------------------------------------------------------------

    def _start_broker(self) -> MqttEndpoint:
        return self._broker.start(
            fleet_username=self._fleet_username,
            fleet_password=self._fleet_password,
            devices=self._credentials(),
            accounts=self._accounts(),
        )

    def _watch(self) -> None:
        while not self._stopping.wait(self._check_interval_s):
            try:
                self._check()
            except Exception:  # a bug: log it, and keep watching
                log.exception("the MQTT broker's supervisor failed; it goes on watching")

    def _check(self) -> None:
        problem = self._problem()
        if problem is None:
            if time.monotonic() - self._up_since >= self._stable_s:
                self._delay_s = self._restart_delay_s
            return
        self._went_down(problem)
        self._restart()

    def _problem(self) -> str | None:
        """What is wrong, once it counts: at once for a process that exited; after
        ``unresponsive_s`` for a live one without its admin connection (paho reconnects
        that by itself when the broker only dropped it)."""
        problem = self._broker.problem()
        if problem is None or self._broker.pid is None:
            self._unhealthy_since = None
            return problem
        now = time.monotonic()
        if self._unhealthy_since is None:
            self._unhealthy_since = now
        if now - self._unhealthy_since < self._unresponsive_s:
            return None
        self._unhealthy_since = None
        return f"{problem} for {self._unresponsive_s:.0f} s"

    def _went_down(self, problem: str) -> None:
        self._up.clear()
        self._down_since = time.monotonic()
        log.error(
            "the MQTT broker is down: %s; every device is offline until it is back, "
            "enrollments and revocations answer 503 meanwhile; restarting it on %s port %s. "
            "Last lines of %s:\n%s",
            problem,
            self._broker.host,
            self._broker.port,
            self._broker.log_path,
            self._broker.log_tail(),
        )
        self._call(self._on_down, problem)
        self._broker.stop()  # reap it; stop a hung one; close the admin connection

    def _restart(self) -> None:
        attempts = 0
        while not self._stopping.wait(self._delay_s):
            attempts += 1
            self._delay_s = min(self._delay_s * 2, self._max_delay_s)
            try:
                self._start_broker()
                missing = self._missing()
            except Exception as e:  # the broker, or the database it is written from
                self._broker.stop()
                log.error(
                    "restarting the MQTT broker failed (attempt %d): %s; next attempt in %.1f s",
                    attempts,
                    e,
                    self._delay_s,
                )
                continue
            if missing:
                log.warning(
                    "the restarted MQTT broker lacks %d device(s) enrolled while it restarted "
                    "(%s): restarting it again with them",
                    len(missing),
                    ", ".join(sorted(missing)[:5]),
                )
                self._broker.stop()
                self._delay_s = self._restart_delay_s
                continue
            self.restarts += 1
            self._up_since = time.monotonic()
            self._up.set()
            log.warning(
                "the MQTT broker is back on %s port %s after %.1f s down (restart %d, attempt "
                "%d); devices come back online as they reconnect",
                self._broker.host,
                self._broker.port,
                self._up_since - self._down_since,
                self.restarts,
                attempts,
            )
            self._call(self._on_up)
            return

    def _missing(self) -> set[str]:
        """Devices and accounts the database holds that the running broker does not."""
        (answer,) = self._broker.control([{"command": "listClients"}])
        present = set(answer.get("data", {}).get("clients", []))
        wanted = {c.device_id for c in self._credentials()}
        wanted |= {a.username for a in self._accounts()}
        return wanted - present

    def _call(self, callback: Callable[..., None], *args: str) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("the fleet failed to act on the MQTT broker's news")
