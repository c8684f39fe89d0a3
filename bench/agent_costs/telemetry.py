"""Table 4 of the agent benchmark: telemetry throughput of ``TelemetryQueue`` +
``TelemetrySender`` to a real mosquitto, against plain paho sending the same payloads."""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import TelemetryConfig
from agent.telemetry import InferenceOutcome, InferenceStats, TelemetrySender
from agent.telemetry_queue import TelemetryQueue
from contracts.mqtt import TelemetryRecord, device_topic
from fleet.broker import MqttEndpoint

from .broker import Account, FleetSubscriber, connect_device, disconnect
from .common import log, markdown_table, wait_until

__all__ = ["bench_telemetry", "telemetry_table"]


def make_records(count: int) -> list[TelemetryRecord]:
    """``count`` records as the daemon makes them: ``InferenceStats`` over 20 inferences each."""
    stats = InferenceStats()
    rng = random.Random(0)
    records: list[TelemetryRecord] = []
    for _ in range(count):
        for _ in range(20):
            stats.observe(
                InferenceOutcome(
                    bundle="mobilenetv2-host-1.0.0",
                    served_by="local",
                    latency_ms=rng.uniform(15.0, 40.0),
                    local_error=False,
                    fallback_reason=None,
                    predicted_class=rng.randrange(1000),
                )
            )
        records.extend(stats.report())
    return records


def sender_run(
    work: Path,
    records: list[TelemetryRecord],
    endpoint: MqttEndpoint,
    subscriber: FleetSubscriber,
    account: Account,
) -> tuple[dict[str, Any], list[bytes]]:
    config = TelemetryConfig()
    max_bytes = max(config.max_queue_bytes, 4096 * len(records))
    path = work / f"telemetry-{secrets.token_hex(4)}.db"
    queue = TelemetryQueue(path, max_bytes)
    start = time.perf_counter()
    queue.put_many(records)
    fill_s = time.perf_counter() - start
    if len(queue) != len(records):
        raise RuntimeError(f"the queue holds {len(queue)} of {len(records)} records")
    client = connect_device(endpoint, account)
    payloads: list[bytes] = []
    first: list[float] = []
    publish = client.publish

    def recording_publish(
        topic: str, payload: Any = None, qos: int = 0, retain: bool = False, properties: Any = None
    ) -> mqtt.MQTTMessageInfo:
        if not first:
            first.append(time.perf_counter())
        payloads.append(payload)
        return publish(topic, payload, qos, retain, properties)

    client.publish = recording_publish  # type: ignore[method-assign]
    delivered = subscriber.telemetry
    sender = TelemetrySender(queue, account.device_id, client, config)
    client.subscribe(sender.receipt_topic, qos=1)  # before the first publish, on the wire
    try:
        sender.start()
        wait_until(lambda: len(queue) == 0, 600, "the sender to empty the queue", poll=0.01)
        seconds = time.perf_counter() - first[0]
    finally:
        sender.stop()
        disconnect(client)
    wait_until(
        lambda: subscriber.telemetry - delivered >= len(payloads), 60, "the sender's batches"
    )
    queue.close()
    path.unlink()
    return {
        "seconds": seconds,
        "fill_s": fill_s,
        "batches": len(payloads),
        "payload_bytes": sum(len(p) for p in payloads),
    }, payloads


def peer_run(
    payloads: list[bytes],
    endpoint: MqttEndpoint,
    subscriber: FleetSubscriber,
    account: Account,
    *,
    pipelined: bool,
) -> float:
    """Seconds from the first publish to the last PUBACK of ``payloads`` (plain paho, QoS 1)."""
    topic = device_topic(account.device_id, "telemetry")
    client = connect_device(endpoint, account, len(payloads) if pipelined else None)
    delivered = subscriber.telemetry
    try:
        start = time.perf_counter()
        if pipelined:
            infos = [client.publish(topic, payload, qos=1) for payload in payloads]
            for info in infos:
                info.wait_for_publish(60)
        else:
            for payload in payloads:
                client.publish(topic, payload, qos=1).wait_for_publish(60)
        seconds = time.perf_counter() - start
    finally:
        disconnect(client)
    wait_until(lambda: subscriber.telemetry - delivered >= len(payloads), 60, "the peer's batches")
    return seconds


def bench_telemetry(
    work: Path,
    endpoint: MqttEndpoint,
    subscriber: FleetSubscriber,
    account: Account,
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    log(f"telemetry: making {args.records} records with InferenceStats")
    records = make_records(args.records)
    record_bytes = statistics.mean(
        len(r.model_dump_json(exclude_defaults=True)) for r in records[:200]
    )
    times: dict[str, list[float]] = {"sender": [], "one": [], "pipelined": []}
    sender_info: list[dict[str, Any]] = []
    for i in range(args.telemetry_runs):
        info, payloads = sender_run(work, records, endpoint, subscriber, account)
        sender_info.append(info)
        times["sender"].append(info["seconds"])
        times["one"].append(peer_run(payloads, endpoint, subscriber, account, pipelined=False))
        times["pipelined"].append(peer_run(payloads, endpoint, subscriber, account, pipelined=True))
        log(
            f"telemetry: run {i + 1}/{args.telemetry_runs}: "
            + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items())
        )
    labels = {
        "sender": "TelemetryQueue + TelemetrySender",
        "one": "plain paho, same payloads, one in flight (peer)",
        "pipelined": "plain paho, same payloads, pipelined",
    }
    peer = statistics.median(times["one"])
    rows = []
    for key, label in labels.items():
        median = statistics.median(times[key])
        rows.append(
            {
                "path": label,
                "records": len(records),
                "batches": sender_info[0]["batches"],
                "payload_bytes": sender_info[0]["payload_bytes"],
                "median_s": median,
                "min_s": min(times[key]),
                "records_per_s": len(records) / median,
                "x_peer": peer / median,
            }
        )
    extra = {
        "record_json_bytes_mean": record_bytes,
        "fill_s_median": statistics.median(i["fill_s"] for i in sender_info),
    }
    return rows, extra


def telemetry_table(rows: list[dict[str, Any]], extra: dict[str, Any], runs: int) -> str:
    r0 = rows[0]
    title = (
        f"Telemetry to a local mosquitto, QoS 1: {r0['records']:,} records "
        f"(~{extra['record_json_bytes_mean']:.0f} B of JSON each) in {r0['batches']} zstd "
        f"batches, {r0['payload_bytes'] / 1e6:.2f} MB on the wire; median of {runs} runs "
        f"(queue fill, one transaction, not timed: {extra['fill_s_median']:.2f} s)"
    )
    return markdown_table(
        title,
        ["path", "median s", "min s", "records/s", "throughput x peer"],
        [
            [
                r["path"],
                f"{r['median_s']:.3f}",
                f"{r['min_s']:.3f}",
                f"{r['records_per_s']:,.0f}",
                f"{r['x_peer']:.2f}",
            ]
            for r in rows
        ],
    )
