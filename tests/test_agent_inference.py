"""The inference service and its cloud fallback, on the real digits bundle and a real cloud.

The local model is a bundle of the compiled digits model, unpacked and loaded as the agent
does; the cloud is the fleet's Open Inference Protocol endpoint under uvicorn on loopback
(``tests/utils/oip_cloud.py``). Answers are compared with ONNX Runtime run directly.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.config import FallbackConfig
from agent.errors import (
    CircuitOpenError,
    FallbackError,
    FallbackRejectedError,
    FallbackTimeout,
    LocalInferenceError,
    NoModelError,
)
from agent.fallback import _TRANSITIONS, BreakerState, CircuitBreaker, CloudFallback
from agent.inference import InferenceService, confidence
from agent.model import LoadedModel, load_installed, unpack_bundle
from agent.telemetry import InferenceOutcome
from tests.utils.fleet import make_bundle, wait_for
from tests.utils.mqtt import free_port
from tests.utils.oip_cloud import TOKEN, CloudEndpoint

pytestmark = pytest.mark.slow  # the digits model is trained and compiled once per session


@pytest.fixture(scope="module")
def installed(compiled_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Slot directories holding the digits bundle at 1.0.0 and 1.1.0, unpacked."""
    out = tmp_path_factory.mktemp("agent-inference")
    slots = {}
    for version in ("1.0.0", "1.1.0"):
        slots[version] = out / f"slot-{version}"
        unpack_bundle(make_bundle(compiled_digits, out, version), slots[version])
    return slots


@pytest.fixture(scope="module")
def onnx_file(compiled_digits: Path) -> Path:
    return compiled_digits / "onnxruntime-fp32.onnx"


@pytest.fixture(scope="module")
def images(digits: Path) -> np.ndarray:
    with np.load(digits / "digits.npz") as data:
        return np.asarray(data["image"][:8])


@pytest.fixture
def endpoint(onnx_file: Path, tmp_path: Path) -> CloudEndpoint:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(onnx_file.read_bytes()[:100])
    return CloudEndpoint(onnx_file, broken)


@pytest.fixture
def cloud(endpoint: CloudEndpoint) -> Iterator[CloudEndpoint]:
    with endpoint.serving():
        yield endpoint


def _direct(onnx_file: Path, image: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"image": image})[0])


def _config(endpoint: CloudEndpoint, **overrides: Any) -> FallbackConfig:
    options: dict[str, Any] = {
        "url": endpoint.url,
        "token": TOKEN,
        "model": "digits",
        "backoff_s": 0.01,
    }
    return FallbackConfig(**(options | overrides))


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _service(
    config: FallbackConfig | None = None, model: LoadedModel | None = None
) -> tuple[InferenceService, list[InferenceOutcome]]:
    service = InferenceService(config)
    outcomes: list[InferenceOutcome] = []
    service.add_observer(outcomes.append)
    service.set_model(model)
    return service, outcomes


# --- serving locally ------------------------------------------------------------------------


def test_the_local_answer_is_onnx_runtimes(
    installed: dict[str, Path], onnx_file: Path, images: np.ndarray
) -> None:
    service, outcomes = _service(model=load_installed(installed["1.0.0"]))
    result = service.infer({"image": images})
    np.testing.assert_allclose(result.outputs[0], _direct(onnx_file, images), rtol=1e-5, atol=1e-6)
    assert (result.served_by, result.bundle, result.fallback_reason) == (
        "local",
        "digits-host-1.0.0",
        None,
    )
    assert result.model_version == "1.0.0" and result.latency_ms > 0
    expected_class = int(_direct(onnx_file, images)[0].argmax())
    assert outcomes == [
        InferenceOutcome(
            bundle="digits-host-1.0.0",
            served_by="local",
            latency_ms=result.latency_ms,
            local_error=False,
            fallback_reason=None,
            predicted_class=expected_class,
        )
    ]


def test_without_a_fallback_a_missing_model_or_a_failing_runtime_is_the_callers_error(
    installed: dict[str, Path], images: np.ndarray
) -> None:
    service, outcomes = _service()
    with pytest.raises(NoModelError, match="no cloud fallback is configured"):
        service.infer({"image": images})
    broken = load_installed(installed["1.0.0"])
    broken.close()
    service.set_model(broken)
    with pytest.raises(LocalInferenceError, match=r"bundle digits-host-1\.0\.0 failed") as caught:
        service.infer({"image": images})
    assert caught.value.__cause__ is not None
    assert [(o.served_by, o.local_error) for o in outcomes] == [("none", False), ("none", True)]


def test_a_hot_swap_serves_the_new_bundle_to_the_calls_after_it(
    installed: dict[str, Path], images: np.ndarray
) -> None:
    v1, v2 = load_installed(installed["1.0.0"]), load_installed(installed["1.1.0"])
    service, _ = _service(model=v1)
    served: list[str | None] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(20):
                served.append(service.infer({"image": images[:1]}).bundle)
        except BaseException as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    service.set_model(v2)
    for thread in threads:
        thread.join()
    assert not errors
    assert set(served) <= {"digits-host-1.0.0", "digits-host-1.1.0"}
    assert service.infer({"image": images[:1]}).bundle == "digits-host-1.1.0"


# --- each fallback trigger ------------------------------------------------------------------


def test_no_model_goes_to_the_cloud(
    cloud: CloudEndpoint, onnx_file: Path, images: np.ndarray
) -> None:
    service, outcomes = _service(_config(cloud))
    assert service.ready
    result = service.infer({"image": images})
    assert (result.served_by, result.fallback_reason, result.bundle) == ("cloud", "no_model", None)
    np.testing.assert_allclose(result.outputs[0], _direct(onnx_file, images), rtol=1e-5, atol=1e-6)
    assert len(result.output_names) == 1 and result.model_version == "1.0.0"
    assert (outcomes[0].served_by, outcomes[0].fallback_reason) == ("cloud", "no_model")

    off, _ = _service(_config(cloud, on_no_model=False))
    assert not off.ready
    with pytest.raises(NoModelError, match="on_no_model is off"):
        off.infer({"image": images})


def test_a_runtime_that_raises_goes_to_the_cloud(
    cloud: CloudEndpoint, installed: dict[str, Path], onnx_file: Path, images: np.ndarray
) -> None:
    model = load_installed(installed["1.0.0"])
    model.close()  # its session is gone: every predict raises
    service, outcomes = _service(_config(cloud), model)
    result = service.infer({"image": images})
    assert (result.served_by, result.fallback_reason) == ("cloud", "error")
    assert result.bundle == "digits-host-1.0.0"
    np.testing.assert_allclose(result.outputs[0], _direct(onnx_file, images), rtol=1e-5, atol=1e-6)
    assert outcomes[0].local_error and outcomes[0].served_by == "cloud"


def test_an_answer_over_the_latency_budget_is_replaced_by_the_clouds(
    cloud: CloudEndpoint, installed: dict[str, Path], images: np.ndarray
) -> None:
    service, outcomes = _service(
        _config(cloud, latency_budget_ms=1e-6), load_installed(installed["1.0.0"])
    )
    result = service.infer({"image": images})
    assert (result.served_by, result.fallback_reason) == ("cloud", "latency")
    assert outcomes[0].fallback_reason == "latency" and not outcomes[0].local_error
    assert cloud.requests == 1


def test_an_unsure_answer_goes_to_the_cloud(
    cloud: CloudEndpoint, installed: dict[str, Path], images: np.ndarray
) -> None:
    model = load_installed(installed["1.0.0"])
    blurred = images.mean(axis=0, keepdims=True)  # an average of digits: no digit for sure
    assert (confidence(model.predict({"image": blurred})[0]) or 1.0) < 1.0
    service, _ = _service(_config(cloud, min_confidence=1.0), model)
    result = service.infer({"image": blurred})
    assert (result.served_by, result.fallback_reason) == ("cloud", "confidence")

    sure, _ = _service(_config(cloud, min_confidence=0.0), model)
    assert sure.infer({"image": blurred}).served_by == "local"


def test_confidence_reads_probabilities_as_they_are_and_softmaxes_the_rest() -> None:
    assert confidence(np.array([[0.7, 0.2, 0.1]], dtype=np.float32)) == pytest.approx(0.7)
    assert confidence(np.array([[0.0, 0.0]], dtype=np.float32)) == pytest.approx(0.5)
    logits = np.array([[2.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    assert confidence(logits) == pytest.approx(0.5)  # the least sure row counts
    assert confidence(np.array([[3.0]], dtype=np.float32)) is None
    assert confidence(np.array([[1, 0]], dtype=np.int64)) is None


def test_when_the_cloud_fails_a_local_answer_it_was_to_replace_is_served(
    installed: dict[str, Path], images: np.ndarray
) -> None:
    config = FallbackConfig(
        url=f"http://127.0.0.1:{free_port()}", latency_budget_ms=1e-6, retries=0
    )
    service, outcomes = _service(config, load_installed(installed["1.0.0"]))
    result = service.infer({"image": images})
    assert (result.served_by, result.fallback_reason) == ("local", "latency")
    assert outcomes[0].served_by == "local"


def test_a_failing_runtime_and_a_failing_cloud_raise_with_both_reasons(
    installed: dict[str, Path], images: np.ndarray
) -> None:
    model = load_installed(installed["1.0.0"])
    model.close()
    config = FallbackConfig(url=f"http://127.0.0.1:{free_port()}", model="digits", retries=0)
    service, outcomes = _service(config, model)
    with pytest.raises(FallbackError, match="failed after 1 attempt") as caught:
        service.infer({"image": images})
    assert "digits-host-1.0.0 failed on this input" in " ".join(caught.value.__notes__)
    assert (outcomes[0].served_by, outcomes[0].fallback_reason) == ("none", "error")


# --- the client: retries, refusals, timeouts ------------------------------------------------


def test_a_5xx_is_retried_until_the_cloud_answers(cloud: CloudEndpoint, images: np.ndarray) -> None:
    cloud.fail_next = 2
    with CloudFallback(_config(cloud, retries=2)) as client:
        answer = client.infer({"image": images})
    assert cloud.requests == 3 and answer.model_version == "1.0.0"
    assert answer.outputs[0].shape == (len(images), 10) and answer.outputs[0].dtype == np.float32

    cloud.fail_next, cloud.requests = 5, 0
    with (
        CloudFallback(_config(cloud, retries=1)) as client,
        pytest.raises(FallbackError, match=r"failed after 2 attempts: HTTP 503: .*cannot be"),
    ):
        client.infer({"image": images})
    assert cloud.requests == 2


def test_a_4xx_is_not_retried_and_says_what_the_cloud_refused(
    cloud: CloudEndpoint, images: np.ndarray
) -> None:
    with CloudFallback(_config(cloud, model="nope", retries=3)) as client:
        with pytest.raises(FallbackRejectedError, match="HTTP 404: no model named 'nope'") as e:
            client.infer({"image": images})
        assert e.value.status_code == 404 and client.breaker.state is BreakerState.CLOSED
    assert cloud.requests == 1
    with (
        CloudFallback(_config(cloud, token="wrong")) as client,
        pytest.raises(FallbackRejectedError, match="HTTP 401"),
    ):
        client.infer({"image": images})
    with (
        CloudFallback(_config(cloud)) as client,
        pytest.raises(FallbackRejectedError, match=r"HTTP 400: .*shape \[8, 4, 8, 1\]"),
    ):
        client.infer({"image": images[:, :4]})


def test_a_cloud_that_does_not_answer_times_out_after_its_retries(images: np.ndarray) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        config = FallbackConfig(
            url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            model="digits",
            timeout_s=0.2,
            retries=1,
            backoff_s=0,
        )
        with CloudFallback(config) as client, pytest.raises(FallbackTimeout, match="2 attempts"):
            client.infer({"image": images})


def test_outputs_and_inputs_keep_their_datatypes_through_the_codec() -> None:
    from contracts import oip

    inputs: Mapping[str, np.ndarray] = {
        "a": np.arange(6, dtype=np.int64).reshape(2, 3),
        "b": np.array([True, False]),
        "c": np.array([[1.5, np.nan]], dtype=np.float32),
    }
    for tensor in oip.encode_inputs(inputs):
        output = oip.ResponseOutput.model_validate_json(
            oip.encode_output(tensor["name"], inputs[tensor["name"]]).model_dump_json()
        )
        back = oip.decode_output(output)
        assert back.dtype == inputs[tensor["name"]].dtype
        np.testing.assert_array_equal(back, inputs[tensor["name"]])


# --- the circuit breaker --------------------------------------------------------------------


def test_every_breaker_state_that_makes_calls_has_a_failure_edge() -> None:
    failing = {state for state, event in _TRANSITIONS if event.value in {"failed", "tripped"}}
    # OPEN makes no calls (it fails fast), so nothing can fail there.
    assert failing == set(BreakerState) - {BreakerState.OPEN}


def test_a_half_open_breaker_lets_one_probe_through_and_refuses_the_rest() -> None:
    clock = _FakeClock()
    breaker = CircuitBreaker(failures=1, reset_s=10, clock=clock)
    first = breaker.before_call()
    assert not first.probe
    breaker.failed(first, "boom")
    with pytest.raises(CircuitOpenError, match=r"open after 1 consecutive failures \(last: boom"):
        breaker.before_call()
    clock.now += 10
    probe = breaker.before_call()
    assert probe.probe and breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpenError, match="a probe call is under way"):
        breaker.before_call()
    breaker.succeeded(probe)
    assert breaker.state is BreakerState.CLOSED and not breaker.before_call().probe


def test_results_of_calls_let_out_before_the_breaker_opened_are_ignored() -> None:
    clock = _FakeClock()
    breaker = CircuitBreaker(failures=2, reset_s=10, clock=clock)
    early, late = breaker.before_call(), breaker.before_call()
    breaker.failed(early, "down")
    breaker.failed(breaker.before_call(), "down")
    assert breaker.state is BreakerState.OPEN
    breaker.succeeded(late)  # in flight while it opened: the breaker has moved on
    assert breaker.state is BreakerState.OPEN
    clock.now += 10
    probe = breaker.before_call()
    breaker.failed(late, "down")  # neither is it the probe's result
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.failed(probe, "still down")
    assert breaker.state is BreakerState.OPEN


def test_the_breaker_opens_fails_fast_half_opens_and_closes_when_the_cloud_is_back(
    endpoint: CloudEndpoint, images: np.ndarray
) -> None:
    clock = _FakeClock()
    with endpoint.serving():  # a port to come back to
        pass
    config = _config(endpoint, retries=0, breaker_failures=3, breaker_reset_s=30)
    service = InferenceService(cloud=CloudFallback(config, clock=clock))
    breaker = service.cloud.breaker if service.cloud else None
    assert breaker is not None
    for _ in range(3):  # the cloud is down: each call fails on its own
        with pytest.raises(FallbackError, match="ConnectError") as caught:
            service.infer({"image": images})
        assert not isinstance(caught.value, CircuitOpenError)
    assert breaker.state is BreakerState.OPEN

    with pytest.raises(CircuitOpenError, match=r"is open .* refused until .* \(in 30\.0 s\)") as e:
        service.infer({"image": images})
    assert e.value.retry_after_s == pytest.approx(30) and e.value.__cause__ is None

    clock.now += 30  # the probe goes out, finds the cloud still down, and re-opens
    with pytest.raises(FallbackError, match="ConnectError"):
        service.infer({"image": images})
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError):
        service.infer({"image": images})

    clock.now += 30
    with endpoint.serving():
        result = service.infer({"image": images})
        assert (result.served_by, breaker.state) == ("cloud", BreakerState.CLOSED)
        assert service.infer({"image": images}).served_by == "cloud"
    service.close()


# --- shadow mode ----------------------------------------------------------------------------


class _GatedRuntime:
    """A real runtime whose calls wait for ``gate``: a challenger kept busy on purpose."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)

    def predict_batch(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.entered.set()
        assert self.gate.wait(10)
        result: list[np.ndarray] = self._runtime.predict_batch(inputs)
        return result


def test_the_challenger_runs_beside_the_champion_and_agreement_is_recorded(
    installed: dict[str, Path], images: np.ndarray
) -> None:
    champion, challenger = load_installed(installed["1.0.0"]), load_installed(installed["1.1.0"])
    with InferenceService() as service:
        outcomes: list[InferenceOutcome] = []
        service.add_observer(outcomes.append)
        service.set_model(champion)
        service.set_shadow(challenger)
        for image in images[:3]:
            assert service.infer({"image": image[None]}).bundle == "digits-host-1.0.0"
            wait_for(lambda n=len(outcomes): len(outcomes) > n, timeout_s=10, what="an outcome")
        assert [(o.bundle, o.shadow_bundle, o.shadow_agreed) for o in outcomes] == [
            ("digits-host-1.0.0", "digits-host-1.1.0", True)
        ] * 3

        challenger.close()  # a challenger that raises disagrees; the champion still serves
        assert service.infer({"image": images[:1]}).served_by == "local"
        wait_for(lambda: len(outcomes) == 4, timeout_s=10, what="the failed shadow's outcome")
        assert outcomes[3].shadow_agreed is False


def test_a_busy_challenger_is_skipped_not_waited_for(
    installed: dict[str, Path], images: np.ndarray
) -> None:
    challenger = load_installed(installed["1.1.0"])
    gated = _GatedRuntime(challenger.runtime)
    challenger.runtime = gated
    with InferenceService() as service:
        outcomes: list[InferenceOutcome] = []
        service.add_observer(outcomes.append)
        service.set_model(load_installed(installed["1.0.0"]))
        service.set_shadow(challenger)
        service.infer({"image": images[:1]})
        assert gated.entered.wait(10)  # the worker holds call 1
        service.infer({"image": images[:1]})  # call 2 waits in the queue
        service.infer({"image": images[:1]})  # call 3 finds both places taken
        assert [(o.shadow_bundle, o.shadow_agreed) for o in outcomes] == [
            ("digits-host-1.1.0", None)
        ]
        gated.gate.set()
        wait_for(lambda: len(outcomes) == 3, timeout_s=10, what="the shadowed outcomes")
        assert [o.shadow_agreed for o in outcomes[1:]] == [True, True]
