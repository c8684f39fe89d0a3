"""Prometheus metrics of one fleet server (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["FleetMetrics"]


class FleetMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "edgefleet_mqtt_messages",
            "MQTT messages received by channel.",
            ["channel"],
            registry=self.registry,
        )
        self.malformed = Counter(
            "edgefleet_mqtt_malformed",
            "MQTT messages dropped as malformed, by channel.",
            ["channel"],
            registry=self.registry,
        )
        self.quarantined = Counter(
            "edgefleet_mqtt_quarantined",
            "MQTT messages that decoded but that the database refused, kept in the quarantine "
            "table instead, by channel.",
            ["channel"],
            registry=self.registry,
        )
        self.shed = Counter(
            "edgefleet_mqtt_shed",
            "MQTT messages dropped on arrival because the database was down and the bridge "
            "already held its most unstored bytes, by channel.",
            ["channel"],
            registry=self.registry,
        )
        self.receipts_unqueued = Counter(
            "edgefleet_mqtt_receipts_unqueued",
            "Storage receipts not queued because too many publishes awaited the broker's "
            "PUBACK (the rest of the packet ids are kept for commands); each costs its "
            "device a resend.",
            registry=self.registry,
        )
        self.database_unavailable = Gauge(
            "edgefleet_ingest_database_unavailable",
            "1 while the MQTT bridge holds messages and waits for the database to come back.",
            registry=self.registry,
        )
        self.store_retries = Counter(
            "edgefleet_ingest_store_retries",
            "Transactions of MQTT messages retried because the database failed.",
            registry=self.registry,
        )
        self.telemetry_records = Counter(
            "edgefleet_telemetry_records", "Telemetry records stored.", registry=self.registry
        )
        self.telemetry_duplicates = Counter(
            "edgefleet_telemetry_duplicates",
            "Telemetry records received again and skipped (same device and record id).",
            registry=self.registry,
        )
        self.model_health_skipped = Counter(
            "edgefleet_model_health_skipped",
            "Drift summaries and ground-truth counts in telemetry that were malformed or not "
            "of their version's reference profile: skipped, the record stored all the same.",
            registry=self.registry,
        )
        self.drift_alerts = Counter(
            "edgefleet_drift_alerts",
            "Times a model version's cohort started drifting (once per crossing).",
            ["model", "version", "cohort"],
            registry=self.registry,
        )
        self.drifting = Gauge(
            "edgefleet_drifting",
            "1 while a model version's cohort is in drift, 0 once it is back (as last judged).",
            ["model", "version", "cohort"],
            registry=self.registry,
        )
        self.drift_webhook_failures = Counter(
            "edgefleet_drift_webhook_failures",
            "Drift alerts the operator's webhook did not take (error, timeout, non-2xx).",
            registry=self.registry,
        )
        self.commands = Counter(
            "edgefleet_commands_sent",
            "Commands published to devices, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.devices_online = Gauge(
            "edgefleet_devices_online",
            "Devices whose retained status says online.",
            registry=self.registry,
        )
        self.rollouts_active = Gauge(
            "edgefleet_rollouts_active", "Rollouts not yet finished.", registry=self.registry
        )
        self.broker_up = Gauge(
            "edgefleet_broker_up",
            "1 while the embedded MQTT broker runs and answers, 0 while it is down and being "
            "restarted (always 0 with an external broker, which is not watched).",
            registry=self.registry,
        )
        self.broker_stored_bytes = Gauge(
            "edgefleet_broker_stored_bytes",
            "Payload bytes the MQTT broker holds (queued for the fleet and everyone else, in "
            "flight, retained), as it last published them ($SYS; mosquitto only).",
            registry=self.registry,
        )
        self.broker_queue_alarm = Gauge(
            "edgefleet_broker_queue_alarm",
            "1 while the broker holds more than a quarter of its per-client queue bound: the "
            "fleet falls behind its devices, and past the bound the broker drops telemetry "
            "devices already count delivered.",
            registry=self.registry,
        )
        self.broker_restarts = Counter(
            "edgefleet_broker_restarts",
            "Times the embedded MQTT broker died and was brought back.",
            registry=self.registry,
        )
        self.rollout_leader = Gauge(
            "edgefleet_rollout_leader",
            "1 while this replica holds the rollout lease and drives rollouts, else 0.",
            registry=self.registry,
        )
        self.sessions_drained = Counter(
            "edgefleet_mqtt_sessions_drained",
            "Dead replicas' MQTT sessions this replica took over and emptied.",
            registry=self.registry,
        )
        self.ingest_worker_records = Counter(
            "edgefleet_ingest_worker_records",
            "Telemetry records stored by each ingest worker process (fleet/ingest_workers.py; "
            "also counted in edgefleet_telemetry_records_total).",
            ["worker"],
            registry=self.registry,
        )
        self.ingest_worker_restarts = Counter(
            "edgefleet_ingest_worker_restarts",
            "Ingest worker processes that exited and were restarted, by worker.",
            ["worker"],
            registry=self.registry,
        )
        self.timestamp_refresh_failures = Gauge(
            "edgefleet_timestamp_refresh_failures",
            "Failed attempts to re-sign the TUF timestamp since start.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
