"""The inference service applications embed: the local model first, the cloud when it falls short.

:meth:`InferenceService.infer` runs the installed model (the *champion*) and sends the
request to the cloud fallback instead when one of ``FallbackConfig``'s triggers fires:

- ``no_model``: no model is installed (``on_no_model``);
- ``error``: the local runtime raised (``on_error``);
- ``latency``: the local answer took longer than ``latency_budget_ms``; it is computed,
  then replaced by the cloud's;
- ``confidence``: the local answer's confidence is below ``min_confidence``.

Confidence is read from the first output, taken as ``[rows, classes]`` (a 1-D output is one
row). A row that already is a probability distribution (every value in [0, 1], summing to 1
within 1e-3) is used as it is; any other row is passed through a softmax. The answer's
confidence is the lowest top probability over its rows, so one unsure row sends the whole
batch to the cloud. An output with fewer than two classes, or not floating point, has no
confidence and never triggers the fallback.

When the cloud fails on a ``latency`` or ``confidence`` fallback, the local answer is served
anyway (``served_by="local"`` with the ``fallback_reason`` that was tried). With no local
answer to fall back on (``no_model``, ``error``), the cloud's :class:`FallbackError` is
raised (after ``error``, with a note saying how the local runtime failed). Without a
fallback, a missing model raises :class:`NoModelError` and a runtime failure
:class:`LocalInferenceError`.

Hot swap: :meth:`InferenceService.set_model` replaces the model for the calls that start
afterwards; a call in flight keeps the model it started with. The service never closes a
model: a replaced one is freed when its last call returns and its owner drops it (close it
yourself only once no call can still be using it).

Shadow mode: with a challenger set (:meth:`InferenceService.set_shadow`), each served call
hands its inputs and answer to one worker thread, which runs the challenger and compares
top-1 classes per row with the answer that was served. The worker holds one call and
queues at most one more; a call arriving while both places are taken is not shadowed
(``shadow_agreed`` is ``None``), so the challenger never slows the champion down beyond a
copy of the inputs. A challenger that raises counts as disagreeing.

Drift: when the model's bundle carries a drift reference, an answered call's outcome holds
a few hundred values copied out of its inputs (and its first output, when the local model
answered) for :class:`~agent.telemetry.InferenceStats` to bin into the bundle's drift
summary (``contracts/drift.py``): every call, or for a model so fast that summarising
would cost more than 2 % of its time, a random share of them (``agent/drift_sampling.py``).

Every call, served or failed, emits one :class:`~agent.telemetry.InferenceOutcome` to the
observers: a shadowed call's outcome is emitted by the worker once the challenger has run,
the others' before :meth:`~InferenceService.infer` returns. Observers must be thread-safe
and quick; one that raises is logged and the others still run.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Literal

import numpy as np

from contracts.drift import drift_sample

from .config import FallbackConfig
from .drift_sampling import COST_SHARE, DriftSampling, summary_cost_s
from .errors import FallbackError, LocalInferenceError, NoModelError
from .fallback import CloudFallback
from .model import LoadedModel
from .telemetry import DriftObservation, InferenceOutcome

__all__ = ["FallbackReason", "InferenceResult", "InferenceService", "confidence", "top1"]

log = logging.getLogger(__name__)

FallbackReason = Literal["no_model", "error", "latency", "confidence"]
Observer = Callable[[InferenceOutcome], None]


@dataclass(frozen=True)
class InferenceResult:
    """An answer, and who gave it.

    ``fallback_reason`` is why the cloud was asked; with ``served_by="local"`` it means the
    cloud failed and the local answer was served anyway. ``bundle`` is the local bundle that
    served or was tried; ``model_version`` is the version that answered (the cloud's when it
    did). ``latency_ms`` is the whole call, cloud included.
    """

    outputs: list[np.ndarray]
    served_by: Literal["local", "cloud"]
    bundle: str | None
    fallback_reason: FallbackReason | None
    latency_ms: float
    output_names: list[str]
    model_version: str


def top1(output: np.ndarray) -> np.ndarray | None:
    """The top class of each row of a ``[rows, classes]`` output; ``None`` if not a classifier."""
    rows = _rows(output)
    return None if rows is None else rows.argmax(axis=1)


def confidence(output: np.ndarray) -> float | None:
    """The lowest top probability over the rows (see the module docstring for the rule)."""
    rows = _rows(output)
    if rows is None or not np.issubdtype(rows.dtype, np.floating):
        return None
    rows = rows.astype(np.float64)
    is_distribution = (
        (rows >= 0).all(axis=1)
        & (rows <= 1).all(axis=1)
        & np.isclose(rows.sum(axis=1), 1.0, rtol=0, atol=1e-3)
    )
    shifted = np.exp(rows - rows.max(axis=1, keepdims=True))
    softmax = shifted / shifted.sum(axis=1, keepdims=True)
    probabilities = np.where(is_distribution[:, None], rows, softmax)
    return float(probabilities.max(axis=1).min())


def _rows(output: np.ndarray) -> np.ndarray | None:
    array = np.asarray(output)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] < 2 or array.shape[0] == 0:
        return None
    return array


@dataclass
class _Trace:
    local_error: bool = False
    reason: FallbackReason | None = None


@dataclass(frozen=True)
class _ShadowJob:
    challenger: LoadedModel
    inputs: dict[str, np.ndarray]
    served: np.ndarray | None
    outcome: InferenceOutcome


class InferenceService:
    """Local inference with cloud fallback, hot swap and shadow mode; safe to share by threads.

    ``cloud`` is the fallback client to use (to inject a breaker clock); by default one is
    made from ``config`` when it has a ``url``. Close the service to stop its shadow worker
    and the cloud client's connections.
    """

    def __init__(
        self,
        config: FallbackConfig | None = None,
        *,
        cloud: CloudFallback | None = None,
        drift_share: float | None = COST_SHARE,
    ) -> None:
        """``drift_share``: what summarising calls for drift may cost, as a share of the
        model's time (``agent/drift_sampling.py``); ``None`` summarises every call."""
        if config is not None and cloud is not None and config != cloud.config:
            raise ValueError("pass the fallback config or a CloudFallback made from it, not both")
        self.config = cloud.config if cloud is not None else config or FallbackConfig()
        if cloud is None and self.config.url is not None:
            cloud = CloudFallback(self.config)
        self.cloud = cloud
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._shadow: LoadedModel | None = None
        self._observers: list[Observer] = []
        self._jobs: queue.Queue[_ShadowJob | None] = queue.Queue(maxsize=1)
        self._worker: threading.Thread | None = None
        self._drift_share = drift_share
        self._sampling: tuple[LoadedModel, DriftSampling] | None = None
        """The model the drift coin was made for, and the coin (``agent/drift_sampling.py``)."""

    # --- configuration -----------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        with self._lock:
            return self._model

    @property
    def shadow(self) -> LoadedModel | None:
        with self._lock:
            return self._shadow

    @property
    def ready(self) -> bool:
        """A model is installed, or the cloud takes requests when none is."""
        return self.model is not None or (self.cloud is not None and self.config.on_no_model)

    def set_model(self, model: LoadedModel | None) -> None:
        """Serve ``model`` from the next call on (``None``: uninstall); see the module doc."""
        with self._lock:
            self._model = model

    def set_shadow(self, model: LoadedModel | None) -> None:
        """Run ``model`` as a challenger beside the champion (``None``: stop)."""
        with self._lock:
            self._shadow = model
            if model is not None and self._worker is None:
                self._worker = threading.Thread(
                    target=self._shadow_loop, name="edgefleet-shadow", daemon=True
                )
                self._worker.start()

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer`` with the :class:`InferenceOutcome` of every call from now on."""
        with self._lock:
            self._observers.append(observer)

    # --- inference ---------------------------------------------------------------------

    def infer(self, inputs: Mapping[str, np.ndarray]) -> InferenceResult:
        """Answer ``inputs`` (keyed by the model's input names), locally or from the cloud."""
        start = time.perf_counter()
        with self._lock:
            model, challenger = self._model, self._shadow
        trace = _Trace()
        try:
            result = self._answer(model, inputs, start, trace)
        except Exception:
            self._emit(
                InferenceOutcome(
                    bundle=model.bundle if model is not None else None,
                    served_by="none",
                    latency_ms=_elapsed_ms(start),
                    local_error=trace.local_error,
                    fallback_reason=trace.reason,
                    predicted_class=None,
                )
            )
            raise
        outcome = InferenceOutcome(
            bundle=result.bundle,
            served_by=result.served_by,
            latency_ms=result.latency_ms,
            local_error=trace.local_error,
            fallback_reason=result.fallback_reason,
            predicted_class=_first_class(result.outputs),
            drift=self._drift(model, inputs, result),
        )
        self._emit_or_shadow(outcome, challenger, inputs, result.outputs)
        return result

    def _drift(
        self, model: LoadedModel | None, inputs: Mapping[str, np.ndarray], result: InferenceResult
    ) -> DriftObservation | None:
        """The call's drift values when its bundle has a reference and the call is one
        :class:`~agent.drift_sampling.DriftSampling` picks: its inputs, and its first output
        when the local model gave it (a cloud model's outputs would read as drift)."""
        reference = model.drift_reference if model is not None else None
        if model is None or reference is None:
            return None
        local = result.served_by == "local" and result.outputs and reference.has_output_norm()
        first_output = result.outputs[0] if local else None
        if self._drift_share is not None:
            sampling = self._sampling
            if sampling is None or sampling[0] is not model:  # the first call of this model
                cost_s = summary_cost_s(reference, inputs, first_output)
                sampling = self._sampling = (model, DriftSampling(cost_s, self._drift_share))
            if not sampling[1].take(result.latency_ms / 1000.0):
                return None
        return DriftObservation(reference, drift_sample(inputs, first_output))

    def _answer(
        self,
        model: LoadedModel | None,
        inputs: Mapping[str, np.ndarray],
        start: float,
        trace: _Trace,
    ) -> InferenceResult:
        """The answer to serve; ``trace`` records what happened on the way, for the outcome."""
        if model is None:
            if not self._falls_back(self.config.on_no_model):
                raise NoModelError(self._no_model_text())
            trace.reason = "no_model"
            return self._from_cloud(inputs, None, "no_model", start)
        try:
            local = model.predict(inputs)
        except Exception as e:  # whatever the runtime raises is a local failure
            trace.local_error = True
            failure = f"bundle {model.bundle} failed on this input ({type(e).__name__}: {e})"
            if not self._falls_back(self.config.on_error):
                raise LocalInferenceError(failure) from e
            trace.reason = "error"
            try:
                return self._from_cloud(inputs, model, "error", start)
            except FallbackError as cloud_error:
                cloud_error.add_note(f"the cloud was asked because {failure}")
                raise
        trace.reason = self._quality_reason(local, start)
        if trace.reason is not None:
            try:
                return self._from_cloud(inputs, model, trace.reason, start)
            except FallbackError as e:
                log.warning(
                    "cloud fallback (%s) failed; serving the local answer: %s", trace.reason, e
                )
        return self._local(local, model, trace.reason, start)

    def _falls_back(self, trigger_enabled: bool) -> bool:
        return self.cloud is not None and trigger_enabled

    def _quality_reason(self, local: list[np.ndarray], start: float) -> FallbackReason | None:
        if self.cloud is None:
            return None
        budget = self.config.latency_budget_ms
        if budget is not None and _elapsed_ms(start) > budget:
            return "latency"
        threshold = self.config.min_confidence
        if threshold is not None and local:
            score = confidence(local[0])
            if score is not None and score < threshold:
                return "confidence"
        return None

    def _from_cloud(
        self,
        inputs: Mapping[str, np.ndarray],
        model: LoadedModel | None,
        reason: FallbackReason | None,
        start: float,
    ) -> InferenceResult:
        assert self.cloud is not None  # only called where _falls_back said so
        answer = self.cloud.infer(inputs, model.model_name if model is not None else None)
        return InferenceResult(
            outputs=answer.outputs,
            served_by="cloud",
            bundle=model.bundle if model is not None else None,
            fallback_reason=reason,
            latency_ms=_elapsed_ms(start),
            output_names=answer.names,
            model_version=answer.model_version,
        )

    @staticmethod
    def _local(
        outputs: list[np.ndarray], model: LoadedModel, reason: FallbackReason | None, start: float
    ) -> InferenceResult:
        return InferenceResult(
            outputs=outputs,
            served_by="local",
            bundle=model.bundle,
            fallback_reason=reason,
            latency_ms=_elapsed_ms(start),
            output_names=[spec.name for spec in model.runtime.outputs],
            model_version=model.manifest.model.version,
        )

    def _no_model_text(self) -> str:
        if self.cloud is None:
            return (
                "no model is installed and no cloud fallback is configured: wait for a "
                "deployment, or set fallback.url in agent.toml"
            )
        return "no model is installed and fallback.on_no_model is off in agent.toml"

    # --- outcomes and the shadow worker ----------------------------------------------------

    def _emit_or_shadow(
        self,
        outcome: InferenceOutcome,
        challenger: LoadedModel | None,
        inputs: Mapping[str, np.ndarray],
        served: list[np.ndarray],
    ) -> None:
        if challenger is None:
            self._emit(outcome)
            return
        job = _ShadowJob(
            challenger=challenger,
            inputs={name: np.array(value, copy=True) for name, value in inputs.items()},
            served=served[0] if served else None,
            outcome=replace(outcome, shadow_bundle=challenger.bundle),
        )
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self._emit(job.outcome)  # the challenger is busy: this call is not shadowed

    def _shadow_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                outputs = job.challenger.predict(job.inputs)
            except Exception as e:  # a failing challenger disagrees; the champion is unaffected
                log.warning("shadow bundle %s failed: %s", job.challenger.bundle, e)
                agreed = False
            else:
                agreed = _same_top1(job.served, outputs[0] if outputs else None)
            self._emit(replace(job.outcome, shadow_agreed=agreed))

    def _emit(self, outcome: InferenceOutcome) -> None:
        with self._lock:
            observers = list(self._observers)
        for observer in observers:
            try:
                observer(outcome)
            except Exception:  # one broken observer must not break inference or the others
                log.exception("inference observer %r raised", observer)

    def close(self) -> None:
        """Stop the shadow worker (after the call it holds) and close the cloud client."""
        with self._lock:
            worker, self._worker = self._worker, None
            self._shadow = None
        if worker is not None:
            self._jobs.put(None)
            worker.join()
        if self.cloud is not None:
            self.cloud.close()

    def __enter__(self) -> InferenceService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _first_class(outputs: list[np.ndarray]) -> int | None:
    """The top class of the first row of the first output, for telemetry."""
    classes = top1(outputs[0]) if outputs else None
    return int(classes[0]) if classes is not None else None


def _same_top1(served: np.ndarray | None, challenger: np.ndarray | None) -> bool:
    if served is None or challenger is None:
        return False
    a, b = top1(served), top1(challenger)
    return a is not None and b is not None and a.shape == b.shape and bool((a == b).all())
