"""The cloud inference endpoint (Open Inference Protocol v2) on real ONNX models.

Models are built with ``onnx.helper`` and served through the router in a FastAPI app; every
answer is compared with ONNX Runtime run directly on the same input.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from fleet.inference import CloudModel, CloudModels, InferenceRequest, inference_router

TOKEN = "device-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _classifier(path: Path, scale: float = 1.0) -> Path:
    """x [N, 4] FP32 -> logits = x @ W + b and probs = softmax(logits), both [N, 3]."""
    rng = np.random.default_rng(0)
    weights = (rng.normal(size=(4, 3)) * scale).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
        ],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    return _save(graph, path)


def _adder(path: Path) -> Path:
    """a + b, both INT64 [2, 2]: two inputs, fixed shapes, integers."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        "adder",
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, [2, 2]),
            helper.make_tensor_value_info("b", TensorProto.INT64, [2, 2]),
        ],
        [helper.make_tensor_value_info("sum", TensorProto.INT64, [2, 2])],
    )
    return _save(graph, path)


def _log(path: Path) -> Path:
    """log(x) on FP32 [N]: NaN for negative numbers, -inf for 0."""
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"])],
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
    )
    return _save(graph, path)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CloudModel]:
    out = tmp_path_factory.mktemp("models")
    broken = out / "broken.onnx"
    broken.write_bytes(_classifier(out / "whole.onnx").read_bytes()[:100])  # cut short
    return {
        "classifier": CloudModel("classifier", "1.0.0", _classifier(out / "classifier.onnx")),
        "adder": CloudModel("adder", "2.1.0", _adder(out / "adder.onnx")),
        "log": CloudModel("log", "1.0.0", _log(out / "log.onnx")),
        "broken": CloudModel("broken", "0.1.0", broken),
    }


def _require_token(authorization: Annotated[str | None, Header()] = None) -> None:
    if authorization != f"Bearer {TOKEN}":
        raise HTTPException(401, "send the device token")


@pytest.fixture(scope="module")
def client(served: dict[str, CloudModel]) -> Iterator[TestClient]:
    app = FastAPI()
    app.include_router(
        inference_router(served.get, CloudModels(), dependencies=[Depends(_require_token)])
    )
    with TestClient(app, headers=AUTH) as test_client:
        yield test_client


def _direct(model: CloudModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """What ONNX Runtime itself answers, outputs in the model's order."""
    session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def _request(data: Any, shape: list[int], datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}], **extra}


BATCH = np.array([[0.5, -1.0, 2.0, 0.0], [1.5, 0.25, -0.75, 3.0], [0, 0, 0, 0]], np.float32)


# --- answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_outputs_equal_onnxruntime_on_the_same_batch(
    client: TestClient, served: dict[str, CloudModel], nested: bool
) -> None:
    data = BATCH.tolist() if nested else BATCH.reshape(-1).tolist()
    response = client.post(
        "/v2/models/classifier/infer", json=_request(data, [3, 4], id="request-7")
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (
        "classifier",
        "1.0.0",
        "request-7",
    )
    probs, logits = _direct(served["classifier"], {"x": BATCH})
    assert [o["name"] for o in body["outputs"]] == ["probs", "logits"]
    for output, expected in zip(body["outputs"], (probs, logits), strict=True):
        assert output["datatype"] == "FP32" and output["shape"] == [3, 3]
        got = np.array(output["data"], np.float32).reshape(output["shape"])
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(3, 3).sum(1), 1, 1e-5)


def test_the_requested_outputs_only_and_an_id_when_none_was_sent(client: TestClient) -> None:
    response = client.post(
        "/v2/models/classifier/infer",
        json=_request(BATCH[0].tolist(), [1, 4], outputs=[{"name": "logits"}]),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [o["name"] for o in body["outputs"]] == ["logits"]
    assert len(body["id"]) == 36  # a UUID, to find the request in the logs


def test_a_safe_datatype_is_converted_and_a_narrowing_one_refused(
    client: TestClient, served: dict[str, CloudModel]
) -> None:
    pixels = [[0, 17, 128, 255]]
    response = client.post("/v2/models/classifier/infer", json=_request(pixels, [1, 4], "UINT8"))
    assert response.status_code == 200, response.text
    expected = _direct(served["classifier"], {"x": np.array(pixels, np.float32)})[0]
    np.testing.assert_allclose(np.array(response.json()["outputs"][0]["data"]), expected[0], 1e-6)

    response = client.post("/v2/models/classifier/infer", json=_request(pixels, [1, 4], "FP64"))
    assert response.status_code == 400
    assert "FP64" in response.json()["error"] and "send FP32" in response.json()["error"]

    small = {"name": "a", "shape": [2, 2], "datatype": "INT32", "data": [1, 2, 3, 4]}
    big = {"name": "b", "shape": [2, 2], "datatype": "INT64", "data": [2**40, 0, -5, 1]}
    response = client.post("/v2/models/adder/infer", json={"inputs": [small, big]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"] == [
        {"name": "sum", "shape": [2, 2], "datatype": "INT64", "data": [2**40 + 1, 2, -2, 5]}
    ]


def test_nan_and_infinity_come_back_as_null(client: TestClient) -> None:
    response = client.post("/v2/models/log/infer", json=_request([1.0, 0.0, -1.0], [3]))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [0.0, None, None]


# --- bad requests -------------------------------------------------------------------------

VALID = _request(BATCH.tolist(), [3, 4])


def _with_input(**changes: Any) -> dict[str, Any]:
    return {"inputs": [VALID["inputs"][0] | changes]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_with_input(name="image"), "unknown: 'image'; missing: 'x'"),
        (_with_input(shape=[3, 5]), "model takes [-1, 4]"),
        (_with_input(shape=[2, 4]), "holds 8 elements, but data has 12"),
        (_with_input(shape=[-1, 4]), "dimensions must be 0 or more"),
        (_with_input(datatype="BYTES", data=["a", "b"]), "BYTES tensors are not supported"),
        (_with_input(datatype="FLOAT32"), "'FLOAT32' is not a datatype"),
        (_with_input(data=[[1, 2, 3, 4], [5, 6]], shape=[2, 4]), "not a regular array"),
        (_with_input(data=[1, 2, "3", 4], shape=[1, 4]), "must all be numbers"),
        (_with_input(data=[1e300] * 4, shape=[1, 4], datatype="FP16"), "too large for FP16"),
        (_with_input(data=[1, 2, 300, 4], shape=[1, 4], datatype="UINT8"), "300 does not fit"),
        (_with_input(data=[1.5, 2, 3, 4], shape=[1, 4], datatype="INT8"), "must all be integers"),
        ({**VALID, "outputs": [{"name": "scores"}]}, "no output 'scores'"),
        ({"inputs": [VALID["inputs"][0]] * 2}, "'x' is given more than once"),
        ({"inputs": []}, "inputs: List should have at least 1 item"),
        ({"input": VALID["inputs"]}, "inputs: Field required"),
        (b"{not json", "Invalid JSON"),
        (b"", "Invalid JSON"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_bad_request_is_a_400_that_says_why_and_the_next_one_works(
    client: TestClient, body: dict[str, Any] | bytes, message: str
) -> None:
    if isinstance(body, bytes):
        response = client.post("/v2/models/classifier/infer", content=body)
    else:
        response = client.post("/v2/models/classifier/infer", json=body)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert message in response.json()["error"]
    assert client.post("/v2/models/classifier/infer", json=VALID).status_code == 200


def test_a_fixed_dimension_must_match_and_every_input_must_be_given(client: TestClient) -> None:
    a = {"name": "a", "shape": [3, 2], "datatype": "INT64", "data": list(range(6))}
    response = client.post("/v2/models/adder/infer", json={"inputs": [a]})
    assert response.status_code == 400
    assert response.json()["error"] == "model adder takes the inputs 'a', 'b'; missing: 'b'"
    b = {"name": "b", "shape": [3, 2], "datatype": "INT64", "data": list(range(6))}
    response = client.post("/v2/models/adder/infer", json={"inputs": [a, b]})
    assert response.status_code == 400
    assert "input 'a' has shape [3, 2], but the model takes [2, 2]" in response.json()["error"]


# --- models, versions, metadata -----------------------------------------------------------


def test_an_unknown_model_or_version_is_a_404(client: TestClient) -> None:
    for url in ("/v2/models/nope/infer", "/v2/models/classifier/versions/0.9.0/infer"):
        response = client.post(url, json=VALID)
        assert response.status_code == 404
        assert set(response.json()) == {"error"}
    assert "'nope'" in client.get("/v2/models/nope").json()["error"]
    assert "1.0.0 is" in client.get("/v2/models/classifier/versions/2.0.0/ready").json()["error"]


def test_the_served_version_answers_on_its_version_route(client: TestClient) -> None:
    response = client.post("/v2/models/classifier/versions/1.0.0/infer", json=VALID)
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "1.0.0"


def test_metadata_lists_the_signature_with_dynamic_dimensions_as_minus_one(
    client: TestClient,
) -> None:
    assert client.get("/v2/models/classifier").json() == {
        "name": "classifier",
        "versions": ["1.0.0"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "probs", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
        ],
    }
    adder = client.get("/v2/models/adder/versions/2.1.0").json()
    assert adder["inputs"][1] == {"name": "b", "datatype": "INT64", "shape": [2, 2]}
    ready = client.get("/v2/models/adder/ready")
    assert (ready.status_code, ready.json()) == (200, {"name": "adder", "ready": True})


def test_a_model_file_that_does_not_load_is_a_503_and_the_others_still_serve(
    client: TestClient, served: dict[str, CloudModel]
) -> None:
    for response in (
        client.post("/v2/models/broken/infer", json=VALID),
        client.get("/v2/models/broken"),
        client.get("/v2/models/broken/ready"),
    ):
        assert response.status_code == 503
        error = response.json()["error"]
        assert error.startswith("model broken 0.1.0 cannot be loaded by ONNX Runtime")
        assert "Protobuf parsing failed" in error and str(served["broken"].onnx_path) not in error
    assert client.post("/v2/models/classifier/infer", json=VALID).status_code == 200


def test_the_token_check_guards_the_models_but_not_health(client: TestClient) -> None:
    anonymous = {"Authorization": ""}
    assert (
        client.post("/v2/models/classifier/infer", json=VALID, headers=anonymous).status_code == 401
    )
    assert client.get("/v2/models/classifier", headers=anonymous).status_code == 401
    assert client.get("/v2/models/classifier/ready", headers=anonymous).status_code == 401
    assert client.get("/v2/health/live", headers=anonymous).json() == {"live": True}
    assert client.get("/v2/health/ready", headers=anonymous).json() == {"ready": True}


# --- the session cache --------------------------------------------------------------------


def test_threads_share_one_session_and_a_new_version_replaces_it(
    served: dict[str, CloudModel], tmp_path: Path
) -> None:
    models = CloudModels()
    v1 = served["classifier"]
    sessions: list[object] = []
    threads = [threading.Thread(target=lambda: sessions.append(models.get(v1))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(sessions) == 8 and all(s is sessions[0] for s in sessions)

    v2 = CloudModel("classifier", "1.1.0", _classifier(tmp_path / "v2.onnx", scale=3.0))
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": BATCH[0].tolist()}
    request = InferenceRequest.model_validate({"inputs": [x], "outputs": [{"name": "logits"}]})
    answer = models.infer(v2, request)
    assert answer.model_version == "1.1.0"
    expected = _direct(v2, {"x": BATCH[:1]})[1]
    np.testing.assert_allclose(np.array(answer.outputs[0].data), expected[0], rtol=1e-6)
    assert models.get(v2) is not sessions[0]
    assert models.get(v1) is not sessions[0]  # v2 replaced it; v1 is loaded again
