"""MQTT client benchmark (issue 17): which Python client the fleet's bridge should receive
with, each measured against ``mosquitto_sub`` (C) in the same run.

    python bench/mqtt_client_bench.py [--clients all|KEY,...] [--shapes single,batch50]
        [--messages 20000] [--batches 2000] [--publishers 2] [--repeat 3] [--json FILE]

Each run starts a fresh mosquitto on the fleet's config (``bench_broker`` of
``bench/fleet_bench.py``: dynamic security, persistence, the fleet's queue bounds), and
its load generator (``bench/fleet_load.py``: separate processes publishing pre-encoded
QoS 1 telemetry, the contract's payloads, on 500 device topics each). One client, in a
process of its own, subscribes to the fleet's shared filter
(``$share/fleet/edgefleet/v1/devices/+/telemetry``) at QoS 1 with the fleet's account and
a persistent session (clean start off, a session expiry where the protocol has one), and
receives every message: it only counts them, no decoding, no database. Measured per client:

- **msgs/s**: messages over the span from the first publish to the client holding the
  last one;
- **CPU per message**: the client process's CPU time (user + system, all its threads)
  from its subscription to its last message, over the messages. ``mosquitto_sub``'s is
  read from outside (``psutil`` before the load, ``wait4`` when it exits after ``-C``).

The clients (:data:`CLIENTS`): ``mosquitto_sub`` (MQTT 5, the peer); paho-mqtt as the
fleet's bridge uses it (manual acks: a worker takes messages off paho's thread in batches
and writes each batch's PUBACKs at once, ``fleet/bridge.py``), over MQTT 5 and over 3.1.1;
paho with its own acks on arrival, MQTT 5 and 3.1.1; and the alternatives on PyPI that
are maintained and receive QoS 1: aiomqtt (asyncio over paho, acks on arrival only),
gmqtt (asyncio, MQTT 5; on arrival, or after the message's coroutine, which can wait for
its batch as the bridge's acks wait for the commit), amqtt (asyncio, MQTT 3.1.1 only,
acks on arrival) and zmqtt (asyncio, MQTT 5, manual acks). Those four come with ``pip
install -e '.[bench]'``; a client not installed is reported as such and skipped. Left
out: mqttools (subscribes at QoS 0 only, last release 2021), hbmqtt and asyncio-mqtt
(the former names of amqtt and aiomqtt), mqtt5 (a packet codec, not a client).

A client that does not set MQTT 5's Receive Maximum (every 3.1.1 client) gets mosquitto's
``max_inflight_messages`` (20 on the fleet's broker) messages in flight before its first
acknowledgement (mosquitto 2.0.11 sends more once acknowledgements come); the bridge sets
65,535, as every MQTT 5 client here does. Before the runs, :func:`paho_decode_us` times
paho's own decoding of one PUBLISH in each protocol, where most of paho's MQTT 5 cost per
message goes.

Figures are medians of ``--repeat`` runs, each client's ratio to ``mosquitto_sub`` taken
within a repeat. Runs of a repeat go client after client, so load from elsewhere on the
machine spreads over all of them. The publishers' rate with nothing subscribed (**load
alone**) is measured too: it must stay above every rate here, or the generator is what
is measured. The publishers' processes live through the bench (:class:`LoadPool`), each
client's for one run. Everything started (brokers, publishers, clients) is stopped on the
way out, Ctrl-C and SIGTERM included. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import json
import multiprocessing
import os
import queue
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.bridge import (
    BATCH_SIZE,
    BATCH_WAIT_S,
    PUBACK_PREFIX,
    RECEIVE_MAXIMUM,
    SESSION_EXPIRY_S,
)
from fleet.paho_property_tables import share_property_tables

if TYPE_CHECKING:
    from bench.fleet_bench import BenchBroker, Load

_SPAWN = multiprocessing.get_context("spawn")
_READY_TIMEOUT_S = 60.0
_DEVICES_PER_PUBLISHER = 500
"""Device topics each publisher sends on, as in ``bench/fleet_bench.py``."""
PEER = "mosquitto_sub"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- what a client does, in its own process ----------------------------------------------


@dataclass(frozen=True)
class Job:
    """What one client receives, and from where."""

    host: str
    port: int
    username: str
    password: str
    topic: str
    count: int
    timeout_s: float


class Meter:
    """Counts a client's messages in its own process; at the last one, notes the time
    (``time.monotonic()``, system-wide) and the process's CPU time since :meth:`ready`."""

    def __init__(self, expected: int, events: Any) -> None:
        self._expected = expected
        self._events = events
        self._cpu_start = 0.0
        self.count = 0
        self.last = 0.0
        self.cpu_s = 0.0
        self.done = threading.Event()

    def ready(self) -> None:
        """Subscribed: the CPU clock starts, and the parent may start the load."""
        self._cpu_start = time.process_time()
        self._events.put(("ready",))

    def arrived(self, messages: int) -> bool:
        """Count ``messages`` more; whether every expected message has come."""
        self.count += messages
        if self.count >= self._expected and not self.done.is_set():
            self.last = time.monotonic()
            self.cpu_s = time.process_time() - self._cpu_start
            self.done.set()
        return self.count >= self._expected


def _paho(job: Job, meter: Meter, *, mqtt5: bool, bridge_acks: bool) -> None:
    """paho-mqtt, its network thread started as the bridge starts it. ``bridge_acks``: as
    ``fleet/bridge.py``, manual acks, a worker draining paho's messages in batches and
    queueing each batch's PUBACKs as one write, paho's property tables shared
    (``fleet/paho_property_tables.py``); else paho as shipped, acknowledging each message
    on arrival."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    if bridge_acks:
        share_property_tables()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=job.username,
        protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
        clean_session=None if mqtt5 else False,
        manual_ack=bridge_acks,
    )
    client.username_pw_set(job.username, job.password)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(0 if bridge_acks else 1000)
    subscribed = threading.Event()
    client.on_connect = lambda c, *_: c.subscribe(job.topic, 1)
    client.on_subscribe = lambda *_: subscribed.set()

    def count(*_: Any) -> None:
        meter.arrived(1)

    if bridge_acks:
        inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        client.on_message = lambda _c, _u, message: inbox.put(message)
        threading.Thread(target=_ack_batches, args=(client, inbox, meter), daemon=True).start()
    else:
        client.on_message = count
    if mqtt5:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        properties.ReceiveMaximum = RECEIVE_MAXIMUM
        client.connect(job.host, job.port, 30, clean_start=False, properties=properties)
    else:
        client.connect(job.host, job.port, 30)
    client.loop_start()
    try:
        if not subscribed.wait(_READY_TIMEOUT_S):
            raise RuntimeError("no SUBACK")
        meter.ready()
        meter.done.wait(job.timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()


def _ack_batches(client: Any, inbox: queue.Queue[Any], meter: Meter) -> None:
    """The bridge's worker without its database (``MqttBridge._drain``): take a batch,
    then write its PUBACKs (``MqttBridge._acknowledge``)."""
    from paho.mqtt.client import PUBACK

    while True:
        batch = [inbox.get()]
        deadline = time.monotonic() + BATCH_WAIT_S
        while len(batch) < BATCH_SIZE:
            try:
                batch.append(inbox.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        pubacks = b"".join(PUBACK_PREFIX + m.mid.to_bytes(2, "big") for m in batch if m.qos == 1)
        client._packet_queue(PUBACK, pubacks, 0, 0)
        meter.arrived(len(batch))


async def _aiomqtt(job: Job, meter: Meter) -> None:
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    properties.ReceiveMaximum = RECEIVE_MAXIMUM
    async with aiomqtt.Client(
        job.host,
        job.port,
        username=job.username,
        password=job.password,
        identifier=job.username,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
        max_inflight_messages=1000,
    ) as client:
        await client.subscribe(job.topic, qos=1)
        meter.ready()
        async with asyncio.timeout(job.timeout_s):
            async for _ in client.messages:
                if meter.arrived(1):
                    break


@dataclass
class _Batch:
    settled: asyncio.Future[None]
    size: int = 0


async def _gmqtt(job: Job, meter: Meter, *, bridge_acks: bool) -> None:
    """gmqtt. ``bridge_acks``: ``optimistic_acknowledgement`` off, gmqtt's way of
    acknowledging after processing: a message's PUBACK goes once its ``on_message``
    coroutine returns, and each waits for its batch to be let go of (after 50 ms or 2,000
    messages), as the bridge would have it wait for its batch's commit; else gmqtt
    acknowledges each on arrival."""
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv50

    client = gmqtt.Client(
        job.username,
        clean_session=False,
        optimistic_acknowledgement=not bridge_acks,
        session_expiry_interval=SESSION_EXPIRY_S,
        receive_maximum=RECEIVE_MAXIMUM,
    )
    client.set_auth_credentials(job.username, job.password)
    subscribed, done = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    open_batch: list[_Batch] = []  # the batch new messages join: none, or one

    def settle(batch: _Batch) -> None:
        if batch.settled.done():
            return
        batch.settled.set_result(None)
        if open_batch and open_batch[0] is batch:
            open_batch.clear()
        if meter.arrived(batch.size):
            done.set()

    async def on_message_batched(*_: Any) -> int:
        if not open_batch:
            open_batch.append(_Batch(loop.create_future()))
            loop.call_later(BATCH_WAIT_S, settle, open_batch[0])
        batch = open_batch[0]
        batch.size += 1
        if batch.size >= BATCH_SIZE:
            settle(batch)
        await batch.settled
        return 0

    def on_message(*_: Any) -> int:
        if meter.arrived(1):
            done.set()
        return 0

    client.on_message = on_message_batched if bridge_acks else on_message
    client.on_subscribe = lambda *_: subscribed.set()
    await client.connect(job.host, job.port, version=MQTTv50)
    try:
        client.subscribe(job.topic, qos=1)
        await asyncio.wait_for(subscribed.wait(), _READY_TIMEOUT_S)
        meter.ready()
        await asyncio.wait_for(done.wait(), job.timeout_s)
    finally:
        await client.disconnect()


async def _amqtt(job: Job, meter: Meter) -> None:
    from amqtt.client import MQTTClient
    from amqtt.mqtt.constants import QOS_1

    client = MQTTClient(client_id=job.username, config={"auto_reconnect": False})
    user, password = quote(job.username, safe=""), quote(job.password, safe="")
    await client.connect(f"mqtt://{user}:{password}@{job.host}:{job.port}/", cleansession=False)
    try:
        await client.subscribe([(job.topic, QOS_1)])
        meter.ready()
        async with asyncio.timeout(job.timeout_s):
            while not meter.done.is_set():
                await client.deliver_message()
                meter.arrived(1)
    finally:
        await client.disconnect()


async def _zmqtt(job: Job, meter: Meter) -> None:
    import zmqtt

    async with (
        zmqtt.create_client(
            job.host,
            job.port,
            client_id=job.username,
            username=job.username,
            password=job.password,
            version="5.0",
            clean_session=False,
            session_expiry_interval=SESSION_EXPIRY_S,
            receive_maximum=RECEIVE_MAXIMUM,
        ) as client,
        client.subscribe(job.topic, qos=zmqtt.QoS.AT_LEAST_ONCE, auto_ack=False) as sub,
    ):
        meter.ready()
        async with asyncio.timeout(job.timeout_s):
            async for message in sub:
                await message.ack()
                if meter.arrived(1):
                    break


# --- the clients --------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    label: str
    mqtt: str
    acks: str
    module: str | None
    """What must be importable; ``None``: not a Python client."""
    receive: Callable[[Job, Meter], None] | None
    """Runs in the client's own process until every message came (or it gives up)."""


def _in_asyncio(receive: Callable[[Job, Meter], Any]) -> Callable[[Job, Meter], None]:
    return lambda job, meter: asyncio.run(receive(job, meter))


CLIENTS: dict[str, Client] = {
    PEER: Client("mosquitto_sub (C)", "5", "on arrival", None, None),
    "paho-bridge": Client(
        "paho-mqtt, as fleet/bridge.py",
        "5",
        "manual, batched by a worker",
        "paho.mqtt",
        partial(_paho, mqtt5=True, bridge_acks=True),
    ),
    "paho-5": Client(
        "paho-mqtt",
        "5",
        "on arrival (paho's)",
        "paho.mqtt",
        partial(_paho, mqtt5=True, bridge_acks=False),
    ),
    "paho-311": Client(
        "paho-mqtt",
        "3.1.1",
        "on arrival (paho's)",
        "paho.mqtt",
        partial(_paho, mqtt5=False, bridge_acks=False),
    ),
    "paho-311-bridge": Client(
        "paho-mqtt, as fleet/bridge.py but MQTT 3.1.1",
        "3.1.1",
        "manual, batched by a worker",
        "paho.mqtt",
        partial(_paho, mqtt5=False, bridge_acks=True),
    ),
    "aiomqtt": Client(
        "aiomqtt (asyncio, over paho)", "5", "on arrival (paho's)", "aiomqtt", _in_asyncio(_aiomqtt)
    ),
    "gmqtt-bridge": Client(
        "gmqtt (asyncio), acks as the bridge would",
        "5",
        "after on_message's coroutine, batched",
        "gmqtt",
        _in_asyncio(partial(_gmqtt, bridge_acks=True)),
    ),
    "gmqtt": Client(
        "gmqtt (asyncio)",
        "5",
        "on arrival (gmqtt's)",
        "gmqtt",
        _in_asyncio(partial(_gmqtt, bridge_acks=False)),
    ),
    "amqtt": Client(
        "amqtt (asyncio)", "3.1.1", "on arrival (amqtt's)", "amqtt", _in_asyncio(_amqtt)
    ),
    "zmqtt": Client("zmqtt (asyncio)", "5", "manual, each message", "zmqtt", _in_asyncio(_zmqtt)),
}


def installed(key: str) -> bool:
    module = CLIENTS[key].module
    return module is None or importlib.util.find_spec(module.split(".")[0]) is not None


def _client_process(key: str, job: Job, events: Any) -> None:
    """A child process: one client receiving ``job``; puts ``("ready",)`` once subscribed,
    then ``("done", last, cpu_s)`` or ``("failed", why)``."""
    receive = CLIENTS[key].receive
    assert receive is not None
    meter = Meter(job.count, events)
    try:
        receive(job, meter)
    except Exception as e:  # the parent reports it; the run goes on
        if not meter.done.is_set():
            events.put(("failed", f"{type(e).__name__}: {e}"[:300]))
            return
    if meter.done.is_set():
        events.put(("done", meter.last, meter.cpu_s))
    else:
        events.put(("failed", f"received {meter.count} of {job.count} in {job.timeout_s:.0f} s"))


# --- one run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    messages_per_s: float
    cpu_per_message_s: float


class ClientFailed(RuntimeError):
    """A client did not receive every message; the run goes on without it."""


@contextmanager
def _python_client(key: str, job: Job) -> Iterator[Callable[[float], Received]]:
    """The client's process, subscribed; the ``with`` body gets a function that, given the
    load's start, waits for the client's last message."""
    events: Any = _SPAWN.Queue()
    process = _SPAWN.Process(target=_client_process, args=(key, job, events), daemon=True)
    process.start()
    try:
        event = _next_event(events, _READY_TIMEOUT_S + 30)
        if event[0] != "ready":
            raise ClientFailed(str(event[1]))

        def result(started: float) -> Received:
            event = _next_event(events, job.timeout_s + 30)
            if event[0] != "done":
                raise ClientFailed(str(event[1]))
            _, last, cpu = event
            return Received(job.count / (last - started), cpu / job.count)

        yield result
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()


def _next_event(events: Any, timeout_s: float) -> tuple[Any, ...]:
    try:
        return tuple(events.get(timeout=timeout_s))
    except queue.Empty:
        raise ClientFailed(f"no word from the client in {timeout_s:.0f} s") from None


@contextmanager
def _mosquitto_sub(bench: BenchBroker, job: Job) -> Iterator[Callable[[float], Received]]:
    """``mosquitto_sub`` subscribed, as ``bench/fleet_bench.py`` runs it, with the
    bridge's persistent session; exits after ``job.count`` messages."""
    import psutil

    from bench.fleet_bench import wait_until

    connected = f" as {job.username} "
    offset = bench.broker.log_path.stat().st_size
    command = [
        "mosquitto_sub",
        *("-h", job.host, "-p", str(job.port), "-u", job.username, "-P", job.password),
        *("-i", job.username, "-V", "mqttv5", "-c", "-x", str(SESSION_EXPIRY_S)),
        *("-D", "connect", "receive-maximum", str(RECEIVE_MAXIMUM)),
        *("-q", "1", "-t", job.topic, "-C", str(job.count), "-N"),
    ]
    sub = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_until(
            lambda: connected in bench.broker.log_path.read_text()[offset:],
            _READY_TIMEOUT_S,
            "mosquitto_sub to connect",
        )
        time.sleep(1.0)  # its SUBACK is not logged; its SUBSCRIBE follows the CONNECT at once
        times = psutil.Process(sub.pid).cpu_times()
        cpu_before = times.user + times.system

        def result(started: float) -> Received:
            exited = _wait_exit(sub.pid, job.timeout_s)
            if exited is None:
                raise ClientFailed(f"mosquitto_sub still running after {job.timeout_s:.0f} s")
            status, usage = exited
            done = time.monotonic()
            sub.returncode = os.waitstatus_to_exitcode(status)
            if sub.returncode != 0:
                raise ClientFailed(f"mosquitto_sub exited {sub.returncode}")
            cpu = usage.ru_utime + usage.ru_stime - cpu_before
            return Received(job.count / (done - started), cpu / job.count)

        yield result
    finally:
        if sub.returncode is None:
            sub.kill()
            sub.wait()


def _wait_exit(pid: int, timeout_s: float) -> tuple[int, Any] | None:
    """``(status, rusage)`` of the child ``pid`` once it exits (woken by its pidfd at once),
    or ``None`` after ``timeout_s``."""
    pidfd = os.pidfd_open(pid)
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)
    if not readable:
        return None
    _, status, usage = os.wait4(pid, 0)
    return status, usage


class LoadPool:
    """The load generator's processes, started once for the whole bench: each load is a
    call of ``bench/fleet_load.py``'s ``publish`` in each (what ``publishers`` of
    ``bench/fleet_bench.py`` does with fresh processes), so a run pays for encoding its
    messages, not for starting Python twice."""

    def __init__(self, publishers: int) -> None:
        self.publishers = publishers
        self._manager = _SPAWN.Manager()
        self._pool = ProcessPoolExecutor(publishers, mp_context=_SPAWN)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._manager.shutdown()

    @contextmanager
    def load(
        self, bench: BenchBroker, shape: str, messages: int, timeout_s: float
    ) -> Iterator[Callable[[], Load]]:
        """The publishers connecting to ``bench``'s broker and encoding ``messages``
        messages of ``shape`` between them (meanwhile the client starts); the ``with`` body
        gets a function that waits until they are ready, starts them and waits for their
        last PUBACK."""
        from bench.fleet_bench import Load
        from bench.fleet_load import publish

        events: Any = self._manager.Queue()
        go: Any = self._manager.Event()
        n = self.publishers
        calls = [
            self._pool.submit(
                publish,
                i,
                f"bench-load-{i}",
                bench.load_password,
                bench.fleet.host,
                bench.fleet.port,
                shape,
                messages // n + (i < messages % n),
                _DEVICES_PER_PUBLISHER,
                events,
                go,
                timeout_s,
            )
            for i in range(n)
        ]

        def run() -> Load:
            for _ in calls:
                event = events.get(timeout=_READY_TIMEOUT_S + 60)
                if event[0] != "ready":
                    raise RuntimeError(f"a publisher failed: {event}")
            go.set()
            done = [events.get(timeout=timeout_s + 60) for _ in calls]
            return Load(
                sum(r.sent for r in done),
                sum(r.acked for r in done),
                min(r.started for r in done),
                max(r.finished for r in done),
            )

        try:
            yield run
        finally:
            go.set()  # publishers still waiting publish to the broker, still up, and end
            for call in calls:
                call.result(timeout=timeout_s + 60)


def _job(bench: BenchBroker, count: int, timeout_s: float) -> Job:
    from contracts.mqtt import shared_subscription

    peer = bench.peer
    return Job(
        peer.host,
        peer.port,
        str(peer.username),
        str(peer.password),
        shared_subscription("telemetry"),
        count,
        timeout_s,
    )


def receive_once(
    work: Path, pool: LoadPool, key: str, shape: str, count: int, timeout_s: float
) -> Received:
    """One client on a fresh broker receiving ``count`` messages of ``shape``."""
    from bench.fleet_bench import bench_broker

    directory = Path(tempfile.mkdtemp(prefix=f"broker-{key}-", dir=work))
    with (
        bench_broker(directory, pool.publishers) as bench,
        pool.load(bench, shape, count, timeout_s) as run,
    ):
        job = _job(bench, count, timeout_s)
        starts = _mosquitto_sub(bench, job) if key == PEER else _python_client(key, job)
        with starts as result:
            load = run()
            if load.acked != count:
                raise RuntimeError(f"the broker acknowledged {load.acked} of {count} publishes")
            return result(load.started)


def load_alone(work: Path, pool: LoadPool, shape: str, count: int, timeout_s: float) -> float:
    """Messages per second the broker acknowledges the publishers with no subscriber."""
    from bench.fleet_bench import bench_broker

    directory = Path(tempfile.mkdtemp(prefix="broker-load-", dir=work))
    with (
        bench_broker(directory, pool.publishers) as bench,
        pool.load(bench, shape, count, timeout_s) as run,
    ):
        return run().rate


def paho_decode_us() -> dict[str, float]:
    """Microseconds paho takes to decode one PUBLISH (a one-record message, no
    properties) per protocol: where paho's MQTT 5 cost per message goes. Uses paho's
    private ``_packet.decode_publish`` (paho 2.2); empty if that is gone."""
    import timeit

    try:
        from paho.mqtt import _packet
        from paho.mqtt.client import MQTTv5, MQTTv311
    except ImportError:
        return {}
    from bench.fleet_load import SHAPES, records_of
    from contracts.mqtt import TelemetryBatch, device_topic, encode_telemetry

    topic = device_topic("bench-0-00001", "telemetry").encode()
    payload = encode_telemetry(TelemetryBatch(records=list(records_of(0, 1, SHAPES["single"]))))
    header = len(topic).to_bytes(2, "big") + topic + (1).to_bytes(2, "big")
    packets = {"3.1.1": (MQTTv311, header + payload), "5": (MQTTv5, header + b"\0" + payload)}
    calls = 5_000
    return {
        version: min(
            timeit.repeat(
                partial(_packet.decode_publish, 0x32, packet, protocol), number=calls, repeat=5
            )
        )
        / calls
        * 1e6
        for version, (protocol, packet) in packets.items()
    }


# --- the runs and the table ---------------------------------------------------------------


def ratios(runs: dict[str, list[Received | str]], key: str, field: str) -> float | None:
    """The median over repeats of ``key``'s ``field`` over the peer's in the same repeat;
    ``None`` if no repeat has both."""
    pairs = [
        getattr(mine, field) / getattr(peer, field)
        for mine, peer in zip(runs[key], runs[PEER], strict=True)
        if isinstance(mine, Received) and isinstance(peer, Received)
    ]
    return statistics.median(pairs) if pairs else None


def median_of(runs: list[Received | str], field: str) -> float | None:
    values = [getattr(r, field) for r in runs if isinstance(r, Received)]
    return statistics.median(values) if values else None


def run(work: Path, pool: LoadPool, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"load_alone": {}, "runs": {}, "not_installed": []}
    keys = [k for k in args.clients if installed(k)]
    results["not_installed"] = [k for k in args.clients if k not in keys]
    for key in results["not_installed"]:
        log(f"{key}: not installed (pip install -e '.[bench]'), skipped")
    results["load_average_at_start"] = os.getloadavg()[0]
    results["paho_decode_us"] = paho_decode_us()
    for shape in args.shapes:
        results["load_alone"][shape] = []
        results["runs"][shape] = {k: [] for k in keys}
        for repeat in range(args.repeat):
            count = args.messages if shape == "single" else args.batches
            rate = load_alone(work, pool, shape, count, args.timeout_s)
            results["load_alone"][shape].append(rate)
            log(f"{shape} #{repeat + 1}: load alone {rate:,.0f} msgs/s")
            for key in keys:
                started = time.monotonic()
                try:
                    got: Received | str = receive_once(
                        work, pool, key, shape, count, args.timeout_s
                    )
                except ClientFailed as e:
                    got = f"failed: {e}"
                results["runs"][shape][key].append(got)
                shown = (
                    f"{got.messages_per_s:,.0f} msgs/s, {got.cpu_per_message_s * 1e6:.1f} µs/msg"
                    if isinstance(got, Received)
                    else got
                )
                log(f"{shape} #{repeat + 1}: {key}: {shown} ({time.monotonic() - started:.1f} s)")
    return results


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    from bench.fleet_load import SHAPES

    lines = [
        f"{dt.date.today()}, load average {results['load_average_at_start']:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; --messages {args.messages} --batches "
        f"{args.batches} --publishers {args.publishers} --repeat {args.repeat}",
        "",
    ]
    for shape, runs in results["runs"].items():
        alone = statistics.median(results["load_alone"][shape])
        lines += [
            f"{SHAPES[shape].name}: load alone {alone:,.0f} msgs/s",
            "",
            "| client | MQTT | acks | msgs/s | / mosquitto_sub | CPU µs/msg | / mosquitto_sub |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for key, received in runs.items():
            client = CLIENTS[key]
            rate, cpu = (
                median_of(received, "messages_per_s"),
                median_of(received, "cpu_per_message_s"),
            )
            if rate is None or cpu is None:
                lines.append(f"| {client.label} | {client.mqtt} | {client.acks} | {received[0]} |")
                continue
            rate_ratio = ratios(runs, key, "messages_per_s")
            cpu_ratio = ratios(runs, key, "cpu_per_message_s")
            lines.append(
                f"| {client.label} | {client.mqtt} | {client.acks} | {rate:,.0f} | "
                f"{_ratio(rate_ratio)} | {cpu * 1e6:.1f} | {_ratio(cpu_ratio)} |"
            )
        lines.append("")
    decode = results["paho_decode_us"]
    if decode:
        lines.append(
            "paho decoding one PUBLISH (one record, no properties; best of 5): "
            + ", ".join(f"MQTT {v} {us:.1f} µs" for v, us in decode.items())
        )
    for key in results["not_installed"]:
        lines.append(f"{key}: not installed (pip install -e '.[bench]')")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _keys(text: str) -> list[str]:
    keys = list(CLIENTS) if text == "all" else [PEER, *(k for k in text.split(",") if k != PEER)]
    unknown = [k for k in keys if k not in CLIENTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown clients {unknown}; known: {list(CLIENTS)}")
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clients", type=_keys, default="all", help=f"all, or some of {', '.join(CLIENTS)}"
    )
    parser.add_argument("--shapes", type=lambda s: s.split(","), default="single,batch50")
    parser.add_argument("--messages", type=int, default=20_000, help="one-record messages")
    parser.add_argument("--batches", type=int, default=2_000, help="50-record messages")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per client and run")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind as on Ctrl-C
    pool = LoadPool(args.publishers)
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-mqtt-client-bench-") as tmp:
            results = run(Path(tmp), pool, args)
    except KeyboardInterrupt:
        log("interrupted: everything it started is stopped")
        sys.exit(130)
    finally:
        pool.close()
    print(markdown(results, args))
    if args.json:
        serial = {
            **results,
            "runs": {
                shape: {
                    k: [asdict(r) if isinstance(r, Received) else r for r in v]
                    for k, v in runs.items()
                }
                for shape, runs in results["runs"].items()
            },
        }
        args.json.write_text(json.dumps(serial, indent=1) + "\n")


if __name__ == "__main__":
    main()
