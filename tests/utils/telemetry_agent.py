"""A minimal agent process for telemetry tests: the real queue and sender, a real paho client.

``python -m tests.utils.telemetry_agent QUEUE --device-id D --username U --password P
--port PORT [--enqueue N] [--exit-when-drained]``

Queues ``N`` records (one interval of one inference each, from
:class:`~agent.telemetry.InferenceStats`, :data:`PUT_CHUNK` per transaction), prints
``queued N`` (the queue's length), then connects and sends until killed, or until the queue
is empty with ``--exit-when-drained`` (prints ``drained``, exits 0). The broker may be down
or refusing the device: paho keeps reconnecting and the sender waits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import TelemetryConfig
from agent.telemetry import InferenceOutcome, InferenceStats, TelemetrySender
from agent.telemetry_queue import TelemetryQueue
from contracts.mqtt import TelemetryRecord

QUEUE_BYTES = 64 * 1024 * 1024
PUT_CHUNK = 100
"""Records (one per simulated interval) per transaction: 10,000 fsyncs would dominate a test."""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("queue", type=Path)
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--username", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--enqueue", type=int, default=0)
    parser.add_argument("--batch-records", type=int, default=500)
    parser.add_argument("--exit-when-drained", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")

    queue = TelemetryQueue(args.queue, QUEUE_BYTES)
    stats = InferenceStats()
    pending: list[TelemetryRecord] = []
    for i in range(args.enqueue):
        stats.observe(
            InferenceOutcome(
                bundle="digits-1.0.0",
                served_by="local",
                latency_ms=1.0 + i % 50,
                local_error=False,
                fallback_reason=None,
                predicted_class=i % 10,
            )
        )
        pending += stats.report()
        if len(pending) == PUT_CHUNK or i == args.enqueue - 1:
            queue.put_many(pending)
            pending = []
    print(f"queued {len(queue)}", flush=True)

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=args.device_id, protocol=mqtt.MQTTv5
    )
    client.username_pw_set(args.username, args.password)
    client.reconnect_delay_set(min_delay=1, max_delay=1)
    sender = TelemetrySender(
        queue, args.device_id, client, TelemetryConfig(batch_records=args.batch_records)
    )

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe(sender.receipt_topic, qos=1)
        sender.wake()

    def on_publish(_client: Any, _userdata: Any, mid: int, reason: ReasonCode, _props: Any) -> None:
        sender.published(mid, reason)

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect_async(args.host, args.port)
    client.loop_start()
    sender.start()
    try:
        if not args.exit_when_drained:
            threading.Event().wait()  # until killed
        while not sender.flush(timeout_s=60):
            pass
        print("drained", flush=True)
    finally:
        sender.stop()
        client.disconnect()
        client.loop_stop()
        queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
