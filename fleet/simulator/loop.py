"""The simulated devices' connections: :class:`FleetSimulator`, one selector thread driving
every device's paho client.

Scale: the thread drives every paho client through paho's external-loop hooks
(``on_socket_open`` / ``on_socket_register_write`` ... then ``loop_read`` / ``loop_write`` /
``loop_misc``), so a device costs a socket and a few KiB rather than a thread. Every paho call
happens on that thread; other threads hand it work through a queue and wake it through a
socketpair. Connects are paced — at most ``_CONNECT_WINDOW`` devices between TCP connect and
SUBACK at once — so 10,000 devices do not overflow the broker's accept backlog. What a
device does once connected is :class:`~fleet.simulator._protocol.DeviceProtocol`'s.

Note: the process's open-file limit is raised to fit one socket per device, so descriptors
above 1024 appear; code in the same process that calls ``select.select()`` (paho's own
``loop_start``) fails on such descriptors — open those clients before starting a large fleet.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import logging
import resource
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from contracts.mqtt import Ack, Command, Status, device_topic

from ..paho_property_tables import share_property_tables
from ._device import GONE, Device, Phase, seeded_fraction
from ._protocol import DeviceProtocol, TelemetryLedger, record_id
from .specs import Behaviour, SimulatedDeviceSpec

__all__ = ["FleetSimulator"]

log = logging.getLogger(__name__)

_CONNECT_WINDOW = 128
"""Devices between TCP connect and SUBACK at once; mosquitto listens with a backlog of 100."""
_KEEPALIVE_S = 60
_MISC_INTERVAL_S = 1.0
_MISC_SLICES = 10
"""``loop_misc`` (keepalive) reaches each device every 10 s: far inside the keepalive."""
_STOP_TIMEOUT_S = 10.0
_CALL_TIMEOUT_S = 60.0
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 1.0, 30.0
_FD_MARGIN = 256
"""Descriptors beyond one per device: the selector, wake pair, logs, the test's own."""
_T = TypeVar("_T")
_WILL_REASON = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")


class FleetSimulator:
    """Many simulated devices on one broker, all driven by one selector thread.

    ``start()`` connects them; ``stop()`` (or leaving the ``with`` block) disconnects them with
    reason "disconnect with will message", so the broker leaves ``Status(online=False)``
    retained, as after ``kill()``. Entering the ``with`` block does not start it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        devices: Sequence[SimulatedDeviceSpec],
        behaviour: Behaviour,
        *,
        tls_ca: Path | None = None,
        agent_version: str = "sim-0.1.0",
        seed: int = 0,
    ) -> None:
        ids = [spec.device_id for spec in devices]
        duplicates = sorted(d for d, n in collections.Counter(ids).items() if n > 1)
        if duplicates:
            raise ValueError(
                f"device ids must be unique (they are MQTT client ids): {duplicates[:5]}"
            )
        if tls_ca is None and any(spec.cert_file for spec in devices):
            raise ValueError("client certificates need tls_ca: mutual TLS runs over TLS")
        self.host = host
        self.port = port
        self._tls_ca = tls_ca
        self._shared_tls: ssl.SSLContext | None = None
        self._devices = {spec.device_id: Device(spec) for spec in devices}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._protocol = DeviceProtocol(
            behaviour,
            agent_version=agent_version,
            seed=seed,
            lock=self._lock,
            call_later=self._call_later,
        )
        self._phases: collections.Counter[Phase] = collections.Counter(
            {Phase.WAITING: len(self._devices)}
        )
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self._to_connect: collections.deque[Device] = collections.deque()
        self._pending_writes: set[Device] = set()
        self._starting = False
        self._stopping = False
        self._ended = False
        share_property_tables()  # paho's MQTT 5 decoding, without its per-packet tables

    # ------------------------------------------------------------------ public, any thread

    def start(self, *, connect_timeout_s: float = 120) -> float:
        """Connect every device; seconds until all were connected and subscribed.

        Raises ``ConnectionError`` when the broker refuses a device or cannot be reached, and
        ``TimeoutError`` after ``connect_timeout_s``; either way everything is stopped first.
        """
        if self._thread is not None:
            raise RuntimeError("this FleetSimulator was already started; make a new one")
        _raise_open_file_limit(len(self._devices) + _FD_MARGIN)
        began = time.monotonic()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._starting = True
        self._to_connect.extend(self._devices.values())
        self._thread = threading.Thread(target=self._run, name="fleet-simulator", daemon=True)
        self._thread.start()
        total = len(self._devices)
        with self._changed:
            done = self._changed.wait_for(
                lambda: (
                    self._phases[Phase.READY] == total
                    or self._phases[Phase.REFUSED] > 0
                    or self._ended
                ),
                timeout=connect_timeout_s,
            )
            refused = [d for d in self._devices.values() if d.phase is Phase.REFUSED]
            ready = self._phases[Phase.READY]
        elapsed = time.monotonic() - began
        if refused:
            self.stop()
            reasons = "; ".join(f"{d.spec.device_id}: {d.error}" for d in refused[:5])
            raise ConnectionError(
                f"{len(refused)} of {total} simulated devices could not connect to "
                f"{self.host}:{self.port} ({reasons}); check the broker and the credentials"
            )
        if self._ended:
            raise RuntimeError("the simulated devices' loop ended while connecting; see the log")
        if not done:
            self.stop()
            raise TimeoutError(
                f"only {ready} of {total} simulated devices connected and subscribed within "
                f"{connect_timeout_s} s; is the broker overloaded or its connection limit low?"
            )
        self._call(self._started)
        return elapsed

    def stop(self) -> None:
        """Disconnect every device (the broker publishes their Last Will) and end the loop."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._call(self._begin_stop)
        thread.join(_STOP_TIMEOUT_S + 5)

    def kill(self, device_ids: Iterable[str]) -> None:
        """Drop these devices' connections without DISCONNECT, as a power cut would: the
        broker publishes their Last Will. They stay down."""
        devices = [self._device(d) for d in device_ids]
        self._call(lambda: self._kill(devices))

    def publish_telemetry(self, device_ids: Iterable[str] | None = None) -> int:
        """Send one telemetry batch now from each of these devices (default: all); returns how
        many were connected and sent one."""
        devices = (
            list(self._devices.values())
            if device_ids is None
            else [self._device(d) for d in device_ids]
        )
        return self._call(lambda: sum(self._protocol.report(d) for d in devices))

    def received_commands(self, device_id: str) -> list[Command]:
        """Every well-formed command the device received, resends included, in order."""
        device = self._device(device_id)
        with self._lock:
            return list(device.commands)

    def ignored_commands(self, device_id: str) -> list[Command]:
        """The commands the device ignored because they arrived past their ``expires_at``."""
        device = self._device(device_id)
        with self._lock:
            return list(device.ignored)

    def send_pending_telemetry(self, device_ids: Iterable[str] | None = None) -> int:
        """Re-send now, without a new report, the records these devices (default: all) hold
        for a retry; returns how many records went."""
        devices = (
            list(self._devices.values())
            if device_ids is None
            else [self._device(d) for d in device_ids]
        )
        return self._call(lambda: sum(self._protocol.send_unsent(d) for d in devices))

    def telemetry_sent(self, device_id: str) -> list[str]:
        """The ids of the telemetry records the device published at least once, in order,
        whether or not a PUBACK delivered them (see :meth:`telemetry_ledger`)."""
        device = self._device(device_id)
        reports = self._call(lambda: device.reports)
        return [record_id(self.seed, device_id, n) for n in range(1, reports + 1)]

    def telemetry_ledger(self, device_id: str) -> TelemetryLedger:
        """The device's records: acknowledged (a PUBACK delivered them), pending a retry,
        or dropped."""
        device = self._device(device_id)
        return self._call(lambda: self._protocol.ledger(device))

    def acks_sent(self, device_id: str) -> list[Ack]:
        """Every ack the device published, re-acks of resent commands included, in order."""
        device = self._device(device_id)
        with self._lock:
            return list(device.acks)

    def current_bundle(self, device_id: str) -> str | None:
        """``NAME-VERSION`` the device serves."""
        device = self._device(device_id)
        with self._lock:
            return device.bundle

    def shadow_bundle(self, device_id: str) -> str | None:
        """``NAME-VERSION`` the device runs in shadow, if any."""
        device = self._device(device_id)
        with self._lock:
            return device.shadow

    @property
    def malformed_commands(self) -> int:
        """Payloads on the devices' ``cmd`` topics that were not a valid ``Command``."""
        with self._lock:
            return self._protocol.malformed

    @property
    def connected(self) -> int:
        """Devices connected and subscribed right now."""
        with self._lock:
            return self._phases[Phase.READY]

    @property
    def behaviour(self) -> Behaviour:
        return self._protocol.behaviour

    @property
    def agent_version(self) -> str:
        """What each device's ``status`` says it runs."""
        return self._protocol.agent_version

    @property
    def seed(self) -> int:
        """Seeds reconnect jitter, telemetry phases and record ids."""
        return self._protocol.seed

    def __enter__(self) -> FleetSimulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ cross-thread plumbing

    def _device(self, device_id: str) -> Device:
        try:
            return self._devices[device_id]
        except KeyError:
            raise ValueError(f"{device_id!r} is not one of this simulator's devices") from None

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the loop thread and return its result."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            raise RuntimeError("the simulator is not running: call start() first")
        if threading.current_thread() is thread:
            return fn()
        future: Future[_T] = Future()
        self._calls.append((fn, future))
        self._wake()
        deadline = time.monotonic() + _CALL_TIMEOUT_S
        while True:
            try:
                return future.result(0.5)
            except FutureTimeout:
                if not thread.is_alive():
                    raise RuntimeError("the simulator stopped before doing this") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the simulator's loop did not answer within {_CALL_TIMEOUT_S} s"
                    ) from None

    def _wake(self) -> None:
        # a full buffer wakes the loop as well; a closed one means the loop has ended
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def _set_phase(self, device: Device, phase: Phase, error: str | None = None) -> None:
        with self._changed:
            self._phases[device.phase] -= 1
            self._phases[phase] += 1
            device.phase = phase
            if error is not None:
                device.error = error
            self._changed.notify_all()

    # ------------------------------------------------------------------ the loop thread

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("the simulated devices' loop failed; every device is dropped")
        finally:
            self._close_all()
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def _loop(self) -> None:
        assert self._selector is not None
        devices = list(self._devices.values())
        next_misc, misc_slice = time.monotonic() + _MISC_INTERVAL_S, 0
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            if self._stopping:
                stop_deadline = stop_deadline or now + _STOP_TIMEOUT_S
                if now >= stop_deadline or not any(d.sock for d in devices):
                    break
            wait = min(next_misc, self._timers[0][0] if self._timers else next_misc) - now
            if self._calls or (self._to_connect and self._can_admit()):
                wait = 0.0
            for key, mask in self._selector.select(max(0.0, wait)):
                if key.data is None:
                    self._drain_wake()
                else:
                    self._service(key.data, key.fileobj, mask)
            while self._calls:
                fn, future = self._calls.popleft()
                try:
                    future.set_result(fn())
                except Exception as e:
                    future.set_exception(e)
            self._run_timers()
            self._admit_connects()
            if time.monotonic() >= next_misc:  # keepalive pings, a slice of devices at a time
                next_misc = time.monotonic() + _MISC_INTERVAL_S
                misc_slice = (misc_slice + 1) % _MISC_SLICES
                for device in devices[misc_slice::_MISC_SLICES]:
                    if device.sock is not None and device.client is not None:
                        device.client.loop_misc()
            self._flush_writes()

    def _service(self, device: Device, sock: Any, mask: int) -> None:
        client = device.client
        assert client is not None
        try:
            if mask & selectors.EVENT_READ:
                client.loop_read()
                # TLS may hold decrypted packets the kernel no longer reports as readable
                while device.sock is sock and isinstance(sock, ssl.SSLSocket) and sock.pending():
                    client.loop_read()
            if mask & selectors.EVENT_WRITE and device.sock is sock:
                client.loop_write()
        except Exception:
            log.exception("simulated device %s: error in its network loop", device.spec.device_id)

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay_s, self._timer_seq, fn))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:
                log.exception("simulated devices: error in a scheduled step")

    def _close_all(self) -> None:
        assert self._selector is not None and self._wake_r is not None
        for device in self._devices.values():
            if device.sock is not None:
                sock = device.sock
                self._unregister(device)
                sock.close()
        self._selector.close()
        self._wake_r.close()
        if self._wake_w is not None:
            self._wake_w.close()
        while self._calls:  # answer callers still waiting: nothing runs any more
            self._calls.popleft()[1].set_exception(RuntimeError("the simulator has stopped"))

    # ------------------------------------------------------------------ connecting

    def _can_admit(self) -> bool:
        return not self._stopping and self._phases[Phase.CONNECTING] < _CONNECT_WINDOW

    def _admit_connects(self) -> None:
        while self._to_connect and self._can_admit():
            device = self._to_connect.popleft()
            if device.phase in (Phase.WAITING, Phase.LOST):
                self._connect(device)

    def _connect(self, device: Device) -> None:
        try:
            if device.client is None:
                device.client = self._new_client(device)
                device.client.connect(self.host, self.port, _KEEPALIVE_S, clean_start=True)
            else:
                device.client.reconnect()
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            if self._starting:
                self._set_phase(device, Phase.REFUSED, f"cannot connect: {e}")
            else:
                self._lost(device)
            return
        self._set_phase(device, Phase.CONNECTING)

    def _new_client(self, device: Device) -> mqtt.Client:
        spec = device.spec
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=spec.device_id,
            userdata=device,
            protocol=mqtt.MQTTv5,
        )
        if spec.username is not None:
            client.username_pw_set(spec.username, spec.password)
        if self._tls_ca is not None:
            client.tls_set_context(self._tls_context(spec))
        client.will_set(
            device_topic(spec.device_id, "status"),
            Status(online=False).model_dump_json(exclude_none=True),
            qos=1,
            retain=True,
        )
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._protocol.on_message
        client.message_callback_add(
            device_topic(spec.device_id, "receipt"), self._protocol.on_receipt
        )
        client.on_publish = self._protocol.on_publish
        return client

    def _tls_context(self, spec: SimulatedDeviceSpec) -> ssl.SSLContext:
        """One context shared by devices without a certificate; one each for those with."""
        assert self._tls_ca is not None
        if spec.cert_file is None:
            if self._shared_tls is None:
                self._shared_tls = ssl.create_default_context(cafile=str(self._tls_ca))
            return self._shared_tls
        context = ssl.create_default_context(cafile=str(self._tls_ca))
        context.load_cert_chain(str(spec.cert_file), str(spec.key_file) if spec.key_file else None)
        return context

    def _on_socket_open(self, client: mqtt.Client, device: Device, sock: Any) -> None:
        assert self._selector is not None
        self._selector.register(sock, selectors.EVENT_READ, device)
        device.sock, device.watch_write = sock, False

    def _on_socket_close(self, client: mqtt.Client, device: Device, sock: Any) -> None:
        if device.sock is sock:
            self._unregister(device)

    def _on_register_write(self, client: mqtt.Client, device: Device, sock: Any) -> None:
        """Queued output: written at the end of this loop turn, without a selector change."""
        if device.sock is sock:
            self._pending_writes.add(device)

    def _on_unregister_write(self, client: mqtt.Client, device: Device, sock: Any) -> None:
        if device.sock is sock and device.watch_write and self._selector is not None:
            self._selector.modify(sock, selectors.EVENT_READ, device)
            device.watch_write = False

    def _flush_writes(self) -> None:
        """Write what each device queued; wait for EVENT_WRITE only where the socket is full."""
        while self._pending_writes:
            device = self._pending_writes.pop()
            client, sock = device.client, device.sock
            if client is None or sock is None:
                continue
            try:
                client.loop_write()
            except Exception:
                log.exception("simulated device %s: error writing", device.spec.device_id)
            if device.sock is sock and client.want_write() and not device.watch_write:
                assert self._selector is not None
                self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)
                device.watch_write = True

    def _unregister(self, device: Device) -> None:
        sock, device.sock, device.watch_write = device.sock, None, False
        if sock is not None and self._selector is not None:
            self._selector.unregister(sock)

    def _on_connect(
        self, client: mqtt.Client, device: Device, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self._refused(device, f"CONNACK {reason}")
            return
        receipts = device_topic(device.spec.device_id, "receipt")
        _, device.sub_mid = client.subscribe([(device.cmd_topic, 1), (receipts, 1)])

    def _on_subscribe(
        self, client: mqtt.Client, device: Device, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        if mid != device.sub_mid:
            return
        if refused := [r for r in reasons if r.is_failure]:
            self._refused(device, f"SUBACK {refused[0]} for its cmd and receipt topics")
            return
        device.reconnects = 0
        self._protocol.publish_status(device)  # online only once commands can reach it
        self._set_phase(device, Phase.READY)
        self._protocol.send_unsent(device)

    def _refused(self, device: Device, error: str) -> None:
        """The broker said no: fatal during start(); afterwards, retry like a lost link."""
        if self._starting:
            self._set_phase(device, Phase.REFUSED, error)
        elif device.client is not None:
            log.warning("simulated device %s: %s; reconnecting", device.spec.device_id, error)
            device.client.disconnect()

    def _on_disconnect(
        self, client: mqtt.Client, device: Device, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if device.phase not in GONE and not self._stopping:
            self._lost(device)

    def _lost(self, device: Device) -> None:
        """Reconnect later, backing off exponentially with a seeded jitter."""
        self._set_phase(device, Phase.LOST)
        device.reconnects += 1
        delay = min(_RECONNECT_MAX_S, _RECONNECT_MIN_S * 2 ** (device.reconnects - 1))
        jitter = 0.5 + 0.5 * seeded_fraction(
            self.seed, device.spec.device_id, f"reconnect/{device.reconnects}"
        )
        self._call_later(delay * jitter, functools.partial(self._to_connect.append, device))

    def _started(self) -> None:
        """After start(): failures now mean reconnect, and periodic telemetry begins."""
        self._starting = False
        self._protocol.start_reporting(self._devices.values())

    def _kill(self, devices: Iterable[Device]) -> None:
        for device in devices:
            if device.phase in GONE:
                continue
            sock = device.sock
            self._set_phase(device, Phase.KILLED)
            if sock is not None:
                self._unregister(device)
                sock.close()

    def _begin_stop(self) -> None:
        self._stopping = True
        self._to_connect.clear()
        for device in self._devices.values():
            if device.client is not None and device.sock is not None:
                device.client.disconnect(reasoncode=_WILL_REASON)
            if device.phase not in GONE:
                self._set_phase(device, Phase.STOPPED)


def _raise_open_file_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one; ``RuntimeError`` if even that is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(
            f"simulating this many devices needs about {needed} open files (one socket each), "
            f"but the hard RLIMIT_NOFILE is {hard}; raise it (ulimit -Hn, LimitNOFILE=, "
            f"docker --ulimit nofile=) or simulate fewer devices"
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else needed, hard)
        )
