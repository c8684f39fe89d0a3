"""The fleet server's API and broker, with real mosquitto clients as devices.

Registry, roles, enrollment, broker ACLs and revocation (checked with ``mosquitto_sub`` /
``mosquitto_pub``), telemetry ingest (idempotent, malformed payloads counted), OTA files
and the cloud inference endpoint.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.runtimes import OnnxRuntime
from contracts.drift import DRIFT_REFERENCE_FILE, SummaryBuilder, reference_from_samples
from contracts.mqtt import TelemetryBatch, TelemetryRecord, device_topic, encode_telemetry
from ota.archive import extract_bundle
from tests.utils.fleet import RunningFleet, running_fleet, wait_for


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    with running_fleet(tmp_path / "fleet") as running:
        yield running


def _sub(fleet: RunningFleet, user: str, password: str, topic: str, *extra: str) -> Any:
    return subprocess.run(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(fleet.mqtt_port),
            "-u",
            user,
            "-P",
            password,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            topic,
            "-W",
            "2",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )


def _pub(fleet: RunningFleet, user: str, password: str, topic: str, payload: bytes) -> Any:
    return subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            str(fleet.mqtt_port),
            "-u",
            user,
            "-P",
            password,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            topic,
            "-s",
        ],
        input=payload,
        capture_output=True,
        timeout=15,
        check=False,
    )


def _metric(fleet: RunningFleet, line_start: str) -> float:
    text = fleet.metrics()
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    ]
    return sum(values)


# --- registry ----------------------------------------------------------------------------------


def test_the_registry_keeps_metadata_bundles_and_one_production_version(
    fleet: RunningFleet, bundles: tuple[Path, Path]
) -> None:
    fleet.api(
        "POST",
        "/models",
        json={
            "name": "digits",
            "version": "1.0.0",
            "owner": "ml-team",
            "description": "CNN",
            "metrics": {"accuracy": 0.995},
            "hyperparameters": {"epochs": 12},
            "source_sha256": "ab" * 32,
            "training_data": "sklearn digits 1797",
            "model_card": "# digits",
        },
    )
    duplicate = fleet.call("POST", "/models", json={"name": "digits", "version": "1.0.0"})
    assert duplicate.status_code == 409 and "immutable" in duplicate.json()["detail"]
    v1 = fleet.publish(bundles[0], stage="production")
    assert (v1["profile"], v1["runtime"], v1["target_path"]) == (
        "host",
        "onnxruntime",
        "host/digits-host-1.0.0.efb",
    )
    wrong = fleet.call(
        "POST", "/models/digits/versions/1.0.0/bundles", content=bundles[1].read_bytes()
    )
    assert wrong.status_code == 400 and "1.1.0" in wrong.json()["detail"]
    fleet.publish(bundles[1], stage="production")
    production = fleet.api("GET", "/models/digits/stages/production")
    assert [v["version"] for v in production] == ["1.1.0"]
    first = fleet.api("GET", "/models/digits/versions/1.0.0")
    assert first["stage"] == "archived" and first["metrics"] == {"accuracy": 0.995}
    assert first["bundles"][0]["sha256"] == v1["sha256"]
    stage_changes = fleet.api("GET", "/audit?action=model.stage")
    archived = next(
        e
        for e in stage_changes
        if e["target"] == "model:digits:1.0.0" and e["after"]["stage"] == "archived"
    )
    assert archived["before"]["stage"] == "production" and archived["actor"] == "admin"


def test_a_tampered_bundle_upload_is_refused_and_nothing_is_published(
    fleet: RunningFleet, bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    data = bytearray(bundles[0].read_bytes())
    with tarfile.open(bundles[0]) as archive:  # one byte inside the model file itself
        model = next(m for m in archive.getmembers() if m.name.endswith(".onnx"))
    data[model.offset_data + model.size // 2] ^= 0xFF
    fleet.api("POST", "/models", json={"name": "digits", "version": "1.0.0"})
    refused = fleet.call("POST", "/models/digits/versions/1.0.0/bundles", content=bytes(data))
    assert refused.status_code == 400 and "not valid" in refused.json()["detail"]
    targets = json.loads(fleet.client.get("/ota/metadata/timestamp.json").content)
    assert targets["signed"]["version"] == 1  # nothing was signed


# --- roles and tokens -----------------------------------------------------------------------------


def test_roles_limit_what_a_token_can_do(fleet: RunningFleet) -> None:
    viewer, operator = fleet.token("viewer"), fleet.token("operator")
    assert fleet.client.get("/api/v1/devices").status_code == 401
    assert fleet.call("GET", "/devices", token="efa_wrong").status_code == 401
    assert fleet.call("GET", "/devices", token=viewer).status_code == 200
    refused = fleet.call("POST", "/rollouts", token=viewer, json={"bundle_id": 1})
    assert refused.status_code == 403 and "operator" in refused.json()["detail"]
    assert (
        fleet.call("POST", "/models", token=viewer, json={"name": "m", "version": "1"}).status_code
        == 403
    )
    assert (
        fleet.call(
            "POST", "/models", token=operator, json={"name": "m", "version": "1"}
        ).status_code
        == 201
    )
    assert (
        fleet.call(
            "POST", "/tokens", token=operator, json={"name": "x", "role": "admin"}
        ).status_code
        == 403
    )
    tokens = fleet.api("GET", "/tokens")
    viewer_id = next(t["id"] for t in tokens if t["name"] == "viewer-user")
    fleet.api("DELETE", f"/tokens/{viewer_id}")
    assert fleet.call("GET", "/devices", token=viewer).status_code == 401
    created = fleet.api("GET", "/audit?action=model.create")
    assert created[0]["actor"] == "operator-user" and created[0]["after"]["name"] == "m"
    assert "token_hash" not in json.dumps(fleet.api("GET", "/audit?limit=1000"))


# --- enrollment and the broker --------------------------------------------------------------------


def test_an_enrollment_token_is_used_once(fleet: RunningFleet) -> None:
    grant = fleet.api("POST", "/enrollment-tokens", json={"profile": "rpi4", "tags": ["lab"]})
    first = fleet.client.post("/api/v1/enroll", json={"token": grant["token"], "device_id": "pi-1"})
    assert first.status_code == 201
    body = first.json()
    assert body["profile"] == "rpi4" and body["tags"] == ["lab"] and body["mqtt"]["password"]
    assert body["ota_root"]["signed"]["_type"] == "root"
    again = fleet.client.post("/api/v1/enroll", json={"token": grant["token"], "device_id": "pi-2"})
    assert again.status_code == 403 and "used up" in again.json()["detail"]
    unknown = fleet.client.post("/api/v1/enroll", json={"token": "efe_nope", "device_id": "pi-3"})
    assert unknown.status_code == 403
    device = fleet.api("GET", "/devices/pi-1")
    assert device["state"] == "active" and "password" not in json.dumps(device)


def test_devices_reach_only_their_own_topics_and_revocation_cuts_them_off(
    fleet: RunningFleet,
) -> None:
    a, b = fleet.enroll(2, prefix="acl")
    assert a.password and b.password
    # A reads its own cmd
    listener = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(fleet.mqtt_port),
            "-u",
            a.device_id,
            "-P",
            a.password,
            "-V",
            "mqttv5",
            "-t",
            device_topic(a.device_id, "cmd"),
            "-C",
            "1",
            "-W",
            "5",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    fleet.server.bridge.send(a.device_id, _ping_command())
    assert '"kind":"deploy"' in listener.communicate(timeout=10)[0]
    # A may not read B's cmd: the broker refuses the SUBSCRIBE itself, and B's command
    # reaches B and never A.
    spy, owner = (
        subprocess.Popen(
            [
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                str(fleet.mqtt_port),
                "-u",
                user,
                "-P",
                password,
                "-V",
                "mqttv5",
                "-t",
                device_topic(b.device_id, "cmd"),
                "-C",
                "1",
                "-W",
                "3",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for user, password in ((a.device_id, a.password), (b.device_id, b.password))
    )
    time.sleep(0.5)
    fleet.server.bridge.send(b.device_id, _ping_command())
    assert '"kind":"deploy"' in owner.communicate(timeout=10)[0]
    spied, refusal = spy.communicate(timeout=10)
    assert spied == "" and "All subscription requests were denied" in refusal
    # A may not write B's topics: the broker refuses and the fleet never sees it
    before = _metric(fleet, "edgefleet_mqtt_messages_total")
    for channel in ("telemetry", "status", "ack"):
        forged = _pub(fleet, a.device_id, a.password, device_topic(b.device_id, channel), b"{}")
        assert b"not authorized" in (forged.stdout + forged.stderr).lower()
    # nor its own cmd
    forged = _pub(fleet, a.device_id, a.password, device_topic(a.device_id, "cmd"), b"{}")
    assert b"not authorized" in (forged.stdout + forged.stderr).lower()
    time.sleep(0.5)
    assert _metric(fleet, "edgefleet_mqtt_messages_total") == before
    # a wrong password is refused
    assert _sub(fleet, a.device_id, "wrong", device_topic(a.device_id, "cmd")).returncode != 0
    # revocation: the live connection is cut, and the device cannot come back
    live = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(fleet.mqtt_port),
            "-u",
            b.device_id,
            "-P",
            b.password,
            "-V",
            "mqttv5",
            "-t",
            device_topic(b.device_id, "cmd"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    assert live.poll() is None
    fleet.api("POST", f"/devices/{b.device_id}/revoke")
    assert live.wait(timeout=10) is not None
    again = _sub(fleet, b.device_id, b.password, device_topic(b.device_id, "cmd"))
    assert again.returncode != 0
    assert fleet.api("GET", f"/devices/{b.device_id}")["state"] == "revoked"


def _ping_command() -> Any:
    from contracts.mqtt import Command, CommandKind

    return Command(id=f"test-{time.time_ns()}", kind=CommandKind.DEPLOY, issued_at=time.time())


def test_telemetry_is_ingested_once_and_malformed_payloads_are_counted(fleet: RunningFleet) -> None:
    (device,) = fleet.enroll(1, prefix="tel")
    assert device.password
    topic = device_topic(device.device_id, "telemetry")
    batch = TelemetryBatch(
        records=[
            TelemetryRecord(
                id=f"rec-{i}", ts=time.time(), bundle="m-1.0.0", inferences=10, errors=1
            )
            for i in range(50)
        ]
    )
    for payload in (encode_telemetry(batch), encode_telemetry(batch, compress=False)):
        assert _pub(fleet, device.device_id, device.password, topic, payload).returncode == 0
    for garbage in (b"\x28\xb5\x2f\xfdnot zstd", b"{not json", b'{"records": [{"id": 3}]}', b"[]"):
        assert _pub(fleet, device.device_id, device.password, topic, garbage).returncode == 0
    wait_for(lambda: _metric(fleet, "edgefleet_mqtt_malformed_total") == 4, what="4 malformed")
    wait_for(lambda: _metric(fleet, "edgefleet_telemetry_records_total") == 50, what="50 records")
    assert _metric(fleet, "edgefleet_telemetry_duplicates_total") == 50
    # the server keeps serving, and a good batch after the garbage is stored
    assert fleet.client.get("/v2/health/ready").status_code == 200
    late = TelemetryBatch(records=[TelemetryRecord(id="late", ts=time.time(), inferences=1)])
    _pub(fleet, device.device_id, device.password, topic, encode_telemetry(late))
    wait_for(lambda: _metric(fleet, "edgefleet_telemetry_records_total") == 51, what="51 records")


# --- downloads and cloud inference --------------------------------------------------------------


def test_devices_download_bundles_and_fall_back_to_the_production_model(
    fleet: RunningFleet, bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    attached = fleet.publish(bundles[0], stage="production")
    grant = fleet.api("POST", "/enrollment-tokens", json={"profile": "host"})["token"]
    enrolled = fleet.client.post(
        "/api/v1/enroll", json={"token": grant, "device_id": "dl-1"}
    ).json()
    device_auth = {"Authorization": f"Bearer {enrolled['api_token']}"}
    # the device token fetches bundles (with Range) but is no API token
    name = attached["target_path"].rsplit("/", 1)[1]
    url = f"/ota/targets/host/{attached['sha256']}.{name}"
    assert fleet.client.get(url).status_code == 401
    whole = fleet.client.get(url, headers=device_auth)
    assert whole.status_code == 200 and whole.content == bundles[0].read_bytes()
    part = fleet.client.get(url, headers={**device_auth, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole.content[100:200]
    assert fleet.client.get("/api/v1/devices", headers=device_auth).status_code == 403
    # the cloud endpoint answers like the bundle's model does on ONNX Runtime
    unpacked = tmp_path / "unpacked"
    manifest = extract_bundle(bundles[0], unpacked)
    local = OnnxRuntime(unpacked / manifest.artifact)
    sample = np.random.default_rng(0).random((1, 8, 8, 1), dtype=np.float32)
    expected = local.predict({local.inputs[0].name: sample})[0]
    request = {
        "inputs": [
            {
                "name": local.inputs[0].name,
                "shape": list(sample.shape),
                "datatype": "FP32",
                "data": sample.ravel().tolist(),
            }
        ]
    }
    answer = fleet.client.post("/v2/models/digits/infer", json=request, headers=device_auth)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == "1.0.0"
    got = np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(
        body["outputs"][0]["shape"]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    unknown = fleet.client.post("/v2/models/unknown/infer", json=request, headers=device_auth)
    assert unknown.status_code == 404


# --- model health (docs/model-health.md) ------------------------------------------------


def _with_drift_reference(bundle: Path, reference: bytes, out: Path) -> Path:
    """``bundle`` again with ``reference`` as its drift-reference.json, listed in the
    manifest with its hash as a compile lists it (bundling refuses a malformed one)."""
    from ota.archive import write_bundle
    from ota.manifest import BundleFile

    unpacked = out.with_suffix(".d")
    manifest = extract_bundle(bundle, unpacked)
    (unpacked / DRIFT_REFERENCE_FILE).write_bytes(reference)
    listed = BundleFile(
        path=DRIFT_REFERENCE_FILE,
        sha256=hashlib.sha256(reference).hexdigest(),
        size=len(reference),
    )
    files = [f for f in manifest.files if f.path != DRIFT_REFERENCE_FILE] + [listed]
    changed = manifest.model_copy(update={"files": files})
    return write_bundle(changed, {f.path: unpacked / f.path for f in files}, out)


def test_drift_and_accuracy_from_a_bundles_reference_and_a_devices_telemetry(
    fleet: RunningFleet, bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    """The whole path: a malformed reference refuses the upload (400, nothing signed); a
    good one is kept; a device's shifted summary and its ground truth, published through
    mosquitto, come out of /drift and /accuracy for its cohort."""
    upload = "/models/digits/versions/1.0.0/bundles"
    fleet.api("POST", "/models", json={"name": "digits", "version": "1.0.0"})
    malformed = b'{"schema": "edgefleet.drift-reference/1", "samples": 0, "features": []}'
    bad = _with_drift_reference(bundles[0], malformed, tmp_path / "bad.efb")
    refused = fleet.call("POST", upload, content=bad.read_bytes())
    assert refused.status_code == 400, refused.text
    assert DRIFT_REFERENCE_FILE in refused.json()["detail"]
    targets = json.loads(fleet.client.get("/ota/metadata/timestamp.json").content)
    assert targets["signed"]["version"] == 1  # nothing was signed

    reference = reference_from_samples({"x": np.random.default_rng(3).normal(size=(2000, 2))})
    good = _with_drift_reference(bundles[0], reference.to_json_bytes(), tmp_path / "good.efb")
    fleet.publish(good)
    (device,) = fleet.enroll(1, prefix="drift", tags=lambda _: ["site-b"])
    builder = SummaryBuilder(reference)
    for values in np.random.default_rng(4).normal(loc=1.5, size=(300, 1, 2)):
        builder.add({"x": values})
    record = TelemetryRecord(
        id="h-1",
        ts=time.time(),
        bundle="digits-host-1.0.0",
        inferences=300,
        extra={"drift": builder.summary().to_extra(), "truth": {"labelled": 20, "correct": 15}},
    )
    payload = encode_telemetry(TelemetryBatch(records=[record]))
    topic = device_topic(device.device_id, "telemetry")
    assert _pub(fleet, device.device_id, device.password, topic, payload).returncode == 0

    base = "/models/digits/versions/1.0.0"
    wait_for(lambda: fleet.api("GET", f"{base}/accuracy")["cohorts"], what="ground truth")
    accuracy = fleet.api("GET", f"{base}/accuracy")
    assert [(c["cohort"], c["labelled"], c["correct"]) for c in accuracy["cohorts"]] == [
        ("site-b", 20, 15)
    ]
    drift = fleet.api("GET", f"{base}/drift?window_s=3600")
    assert drift["reference"] is True
    assert [(c["cohort"], c["samples"], c["verdict"]) for c in drift["cohorts"]] == [
        ("site-b", 300, "drift")
    ]
    assert drift["overall"]["verdict"] == "drift"
    assert fleet.call("GET", "/models/digits/versions/9.9.9/drift").status_code == 404
    assert fleet.call("GET", f"{base}/drift?window_s=10").status_code == 422
