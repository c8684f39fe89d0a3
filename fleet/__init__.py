"""The fleet server: model registry, devices, MQTT bridge, staged rollouts, dashboard.

:mod:`fleet.server` brings one server up (database, broker, OTA repository) and
:mod:`fleet.app` is its FastAPI application, one router per resource in :mod:`fleet.api`.
Behind them: :mod:`fleet.registry` (models, versions, bundles, stages), :mod:`fleet.devices`
(enrollment, identity, presence), :mod:`fleet.rollouts` (staged rollouts, a persisted state
machine), :mod:`fleet.telemetry` (ingest and health figures), :mod:`fleet.bridge` (MQTT to
and from the database), :mod:`fleet.broker` (mosquitto), :mod:`fleet.ota_files` (TUF
metadata and bundles over HTTP) and :mod:`fleet.inference` (the cloud inference endpoint).
:mod:`fleet.simulator` runs thousands of simulated devices against a fleet in one process.

docs/architecture.md places the fleet among the other packages; docs/fleet.md is its
reference.
"""
