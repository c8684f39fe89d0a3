"""The agent's local Open Inference Protocol API, served by uvicorn and called with httpx.

The model is the real digits bundle; the cloud fallback is the fleet's endpoint, also under
uvicorn (``tests/utils/oip_cloud.py``). Answers are compared with ONNX Runtime directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from agent.api import local_api_server
from agent.config import ApiConfig, FallbackConfig
from agent.ground_truth import PredictionLog
from agent.inference import InferenceService
from agent.model import load_installed, unpack_bundle
from agent.telemetry import InferenceStats
from tests.utils.fleet import make_bundle
from tests.utils.oip_cloud import TOKEN, CloudEndpoint, running

pytestmark = pytest.mark.slow  # the digits model is trained and compiled once per session


@pytest.fixture(scope="module")
def slot(compiled_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agent-api")
    unpack_bundle(make_bundle(compiled_digits, out, "1.0.0"), out / "slot")
    return out / "slot"


@pytest.fixture(scope="module")
def onnx_file(compiled_digits: Path) -> Path:
    return compiled_digits / "onnxruntime-fp32.onnx"


@pytest.fixture(scope="module")
def images(digits: Path) -> np.ndarray:
    with np.load(digits / "digits.npz") as data:
        return np.asarray(data["image"][:4])


@pytest.fixture
def service() -> Iterator[InferenceService]:
    with InferenceService() as service:
        yield service


def _serve(service: InferenceService, **options: Any) -> Any:
    return running(local_api_server(service, ApiConfig(port=0), **options))


@pytest.fixture
def api(service: InferenceService) -> Iterator[httpx.Client]:
    with _serve(service) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        yield client


def _request(images: np.ndarray, **extra: Any) -> dict[str, Any]:
    tensor = {
        "name": "image",
        "shape": list(images.shape),
        "datatype": "FP32",
        "data": images.reshape(-1).tolist(),
    }
    return {"inputs": [tensor], **extra}


def test_live_always_and_ready_only_with_a_model(
    api: httpx.Client, service: InferenceService, slot: Path
) -> None:
    assert api.get("/v2/health/live").json() == {"live": True}
    not_ready = api.get("/v2/health/ready")
    assert (not_ready.status_code, not_ready.json()) == (503, {"ready": False})
    service.set_model(load_installed(slot))
    ready = api.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert api.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}


def test_metadata_lists_the_runtimes_tensors(
    api: httpx.Client, service: InferenceService, slot: Path
) -> None:
    model = load_installed(slot)
    service.set_model(model)
    output = model.runtime.outputs[0].name
    assert api.get("/v2/models/digits").json() == {
        "name": "digits",
        "versions": ["1.0.0"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8, 1]}],
        "outputs": [{"name": output, "datatype": "FP32", "shape": [-1, 10]}],
    }


def test_infer_answers_locally_as_onnx_runtime_does(
    api: httpx.Client, service: InferenceService, slot: Path, onnx_file: Path, images: np.ndarray
) -> None:
    service.set_model(load_installed(slot))
    response = api.post("/v2/models/digits/infer", json=_request(images, id="req-1"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("digits", "1.0.0", "req-1")
    assert body["parameters"] == {"served_by": "local", "bundle": "digits-host-1.0.0"}
    [output] = body["outputs"]
    assert (output["datatype"], output["shape"]) == ("FP32", [4, 10])
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": images})[0]
    got = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_each_answer_is_remembered_by_its_id_for_its_true_label(
    service: InferenceService, slot: Path, images: np.ndarray
) -> None:
    stats = InferenceStats()
    predictions = PredictionLog(on_label=stats.observe_truth)
    service.set_model(load_installed(slot))
    with (
        _serve(service, predictions=predictions) as port,
        httpx.Client(base_url=f"http://127.0.0.1:{port}") as api,
    ):
        named = api.post("/v2/models/digits/infer", json=_request(images[:1], id="req-7"))
        unnamed = api.post("/v2/models/digits/infer", json=_request(images[1:2]))
        classes = [int(np.argmax(r.json()["outputs"][0]["data"])) for r in (named, unnamed)]
        made_up = unnamed.json()["id"]
        labels = [
            {"request_id": "req-7", "label": classes[0]},
            {"request_id": made_up, "label": (classes[1] + 1) % 10},
        ]
        answer = api.post("/v2/ground-truth", json={"labels": labels})
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"] == [
        {"request_id": "req-7", "result": "correct", "bundle": "digits-host-1.0.0", "status": 200},
        {"request_id": made_up, "result": "wrong", "bundle": "digits-host-1.0.0", "status": 200},
    ]
    [record] = stats.report()
    assert record.extra["truth"] == {"labelled": 2, "correct": 1}


def test_an_answer_the_cloud_gave_never_counts_for_the_local_bundle(
    onnx_file: Path, slot: Path, images: np.ndarray
) -> None:
    endpoint = CloudEndpoint(onnx_file, onnx_file)
    predictions = PredictionLog()
    with endpoint.serving():
        config = FallbackConfig(url=endpoint.url, token=TOKEN, model="digits", min_confidence=1.0)
        with (
            InferenceService(config) as service,
            _serve(service, predictions=predictions) as port,
            httpx.Client(base_url=f"http://127.0.0.1:{port}") as api,
        ):
            service.set_model(load_installed(slot))
            body = api.post("/v2/models/digits/infer", json=_request(images[:1], id="c-1")).json()
            assert body["parameters"]["served_by"] == "cloud", body["parameters"]
            label = int(np.argmax(body["outputs"][0]["data"]))
            answer = api.post("/v2/ground-truth", json={"request_id": "c-1", "label": label})
    assert answer.json() == {"request_id": "c-1", "result": "correct", "bundle": None}


def test_a_batch_reaches_a_tvm_module_built_for_one_sample(
    api: httpx.Client,
    service: InferenceService,
    compiled_digits: Path,
    onnx_file: Path,
    images: np.ndarray,
    tmp_path: Path,
) -> None:
    """TVM modules take one sample (their signature says [1, 8, 8, 1]); the API takes any
    number, which ``predict_batch`` splits, and says so in the metadata."""
    bundle = make_bundle(compiled_digits, tmp_path, "1.0.0", artifact="tvm:fp32")
    unpack_bundle(bundle, tmp_path / "slot")
    model = load_installed(tmp_path / "slot")
    assert model.runtime.inputs[0].shape == (1, 8, 8, 1)
    service.set_model(model)
    metadata = api.get("/v2/models/digits").json()
    assert metadata["platform"] == "tvm_relax"
    assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    response = api.post("/v2/models/digits/infer", json=_request(images))
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert output["shape"] == [4, 10]
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": images})[0]
    got = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_uint8_pixels_are_converted_but_fp64_is_refused(
    api: httpx.Client, service: InferenceService, slot: Path, images: np.ndarray
) -> None:
    service.set_model(load_installed(slot))
    pixels = _request(images)
    pixels["inputs"][0] |= {"datatype": "UINT8", "data": [0] * images.size}
    assert api.post("/v2/models/digits/infer", json=pixels).status_code == 200
    wide = _request(images)
    wide["inputs"][0]["datatype"] = "FP64"
    response = api.post("/v2/models/digits/infer", json=wide)
    assert response.status_code == 400
    assert "is FP64, but the model takes FP32" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not an inference request"),
        ({"inputs": []}, "inputs: List should have at least 1 item"),
        (
            {"inputs": [{"name": "img", "shape": [1], "datatype": "FP32", "data": [0.0]}]},
            "model digits takes the inputs 'image'; unknown: 'img'; missing: 'image'",
        ),
        (
            {"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32", "data": [0]}]},
            "input 'image' has shape [1, 8, 8], but the model takes [-1, 8, 8, 1]",
        ),
        (
            {"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": [0]}]},
            "shape [1, 8, 8, 1] holds 64 elements, but data has 1",
        ),
        (
            _request(np.zeros((1, 8, 8, 1)), outputs=[{"name": "probs"}]),
            "model digits has no output 'probs'",
        ),
    ],
)
def test_a_request_the_model_cannot_take_is_a_400_that_says_why(
    api: httpx.Client, service: InferenceService, slot: Path, body: Any, message: str
) -> None:
    service.set_model(load_installed(slot))
    if isinstance(body, bytes):
        response = api.post("/v2/models/digits/infer", content=body)
    else:
        response = api.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_an_unknown_model_is_a_404(
    api: httpx.Client, service: InferenceService, slot: Path, images: np.ndarray
) -> None:
    service.set_model(load_installed(slot))
    for response in (
        api.post("/v2/models/cats/infer", json=_request(images)),
        api.get("/v2/models/cats"),
    ):
        assert response.status_code == 404
        assert response.json() == {"error": "no model named 'cats' is served here; 'digits' is"}


def test_no_model_and_no_fallback_is_a_503(service: InferenceService, images: np.ndarray) -> None:
    with (
        _serve(service, model_name="digits") as port,
        httpx.Client(base_url=f"http://127.0.0.1:{port}") as api,
    ):
        response = api.post("/v2/models/digits/infer", json=_request(images))
        assert response.status_code == 503
        assert (
            "no model is installed and no cloud fallback is configured"
            in (response.json()["error"])
        )
        assert api.get("/v2/models/digits").status_code == 503
        assert api.get("/v2/models/digits/ready").status_code == 503


def test_without_a_model_the_cloud_answers_and_the_response_says_so(
    onnx_file: Path, tmp_path: Path, images: np.ndarray
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    endpoint = CloudEndpoint(onnx_file, broken)
    with endpoint.serving():
        config = FallbackConfig(url=endpoint.url, token=TOKEN, model="digits")
        with (
            InferenceService(config) as service,
            _serve(service) as port,
            httpx.Client(base_url=f"http://127.0.0.1:{port}") as api,
        ):
            assert api.get("/v2/health/ready").status_code == 200
            response = api.post("/v2/models/digits/infer", json=_request(images))
            assert response.status_code == 200, response.text
            assert response.json()["parameters"] == {
                "served_by": "cloud",
                "bundle": None,
                "fallback_reason": "no_model",
            }
            assert response.json()["outputs"][0]["shape"] == [4, 10]
            bad = _request(images[:, :4])
            refused = api.post("/v2/models/digits/infer", json=bad)
            assert refused.status_code == 400
            assert "cloud endpoint refused" in refused.json()["error"]
            assert "shape [4, 4, 8, 1]" in refused.json()["error"]
