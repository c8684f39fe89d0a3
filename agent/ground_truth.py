"""Ground truth on the device: predictions remembered by request id, true labels matched.

The local API records every answer it serves (:meth:`PredictionLog.record`): the request
id it answered with, the bundle, and the predicted class (the top class of the first row
of the first output, as telemetry's ``predictions`` count it). A true label arrives later
by that id, through the local API (``POST /v2/ground-truth``) or relayed by the fleet on
the device's ``truth`` topic, and :meth:`PredictionLog.label` says what it came to
(:class:`Verdict`). Each labelled prediction is counted once, through ``on_label``, into
the telemetry of its bundle (``extra["truth"]``, agent/telemetry.py).

The log is bounded by :class:`~agent.config.GroundTruthConfig`: at most ``max_predictions``
(the oldest go first) and none older than ``max_age_s``. It lives in memory only: a
restarted agent has forgotten its earlier predictions, and labels for them answer
``unknown`` (404), as for any prediction it no longer holds. A prediction the cloud
fallback answered is kept under no bundle (``None``): the cloud's model is not the one
installed here, so its answers never count towards the local bundle's accuracy.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydantic import TypeAdapter, ValidationError

from contracts.mqtt import GroundTruth, RequestId

from .config import GroundTruthConfig

__all__ = ["HTTP_STATUS", "LabelOutcome", "PredictionLog", "Verdict"]

LabelObserver = Callable[[str | None, bool], None]
"""Called with ``(bundle, correct)`` for each prediction labelled."""


class Verdict(enum.StrEnum):
    CORRECT = "correct"
    WRONG = "wrong"
    UNKNOWN = "unknown"
    """No prediction of that id is held: never made here, or forgotten (bounds, restart)."""
    ALREADY_LABELLED = "already_labelled"
    """The prediction has a label already; the first one counted, this one is ignored."""
    NO_CLASS = "no_class"
    """The answer had no class to compare (not a ``[rows, classes]`` output)."""


HTTP_STATUS: dict[Verdict, int] = {
    Verdict.CORRECT: 200,
    Verdict.WRONG: 200,
    Verdict.UNKNOWN: 404,
    Verdict.ALREADY_LABELLED: 409,
    Verdict.NO_CLASS: 409,
}
"""The status a label's answer carries in the local API."""

_EXPLAINED: dict[Verdict, str] = {
    Verdict.UNKNOWN: (
        "no prediction with this request id is held here: it was never answered by this "
        "agent, or it is older than ground_truth.max_age_s, pushed out by "
        "ground_truth.max_predictions newer ones, or from before the agent restarted"
    ),
    Verdict.ALREADY_LABELLED: "this prediction is labelled already; the first label counted",
    Verdict.NO_CLASS: "the answer to this request had no class to compare the label with",
}

_REQUEST_ID: TypeAdapter[str] = TypeAdapter(RequestId)


@dataclass(frozen=True)
class LabelOutcome:
    """What one label came to: ``bundle`` is the prediction's (``None`` when unknown or
    answered by the cloud)."""

    request_id: str
    verdict: Verdict
    bundle: str | None = None

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.verdict]

    def as_json(self) -> dict[str, object]:
        answer: dict[str, object] = {"request_id": self.request_id, "result": self.verdict.value}
        if self.verdict in (Verdict.CORRECT, Verdict.WRONG):
            answer["bundle"] = self.bundle
        else:
            answer["error"] = _EXPLAINED[self.verdict]
        return answer


@dataclass
class _Prediction:
    bundle: str | None
    predicted_class: int | None
    at: float
    labelled: bool = False


class PredictionLog:
    """Predictions by request id, bounded by count and age; safe to share by threads.

    ``clock`` gives seconds (monotonic); ``on_label`` hears of every prediction labelled.
    """

    def __init__(
        self,
        config: GroundTruthConfig | None = None,
        *,
        on_label: LabelObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or GroundTruthConfig()
        self._on_label = on_label
        self._clock = clock
        self._lock = threading.Lock()
        self._predictions: collections.OrderedDict[str, _Prediction] = collections.OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._predictions)

    def record(self, request_id: str, bundle: str | None, predicted_class: int | None) -> bool:
        """Remember an answer; ``False`` (nothing kept) for an id a label could not name
        (see ``contracts.mqtt.RequestId``). The same id again replaces the earlier one."""
        try:
            _REQUEST_ID.validate_python(request_id)
        except ValidationError:
            return False
        now = self._clock()
        with self._lock:
            self._predictions.pop(request_id, None)
            self._predictions[request_id] = _Prediction(bundle, predicted_class, now)
            self._forget(now)
        return True

    def label(self, truths: Iterable[GroundTruth]) -> list[LabelOutcome]:
        """Match each label with its prediction, in order; counts each one labelled."""
        outcomes: list[LabelOutcome] = []
        with self._lock:
            self._forget(self._clock())
            for truth in truths:
                outcomes.append(self._match(truth))
        if self._on_label is not None:
            for outcome in outcomes:
                if outcome.verdict in (Verdict.CORRECT, Verdict.WRONG):
                    self._on_label(outcome.bundle, outcome.verdict is Verdict.CORRECT)
        return outcomes

    def _match(self, truth: GroundTruth) -> LabelOutcome:
        prediction = self._predictions.get(truth.request_id)
        if prediction is None:
            return LabelOutcome(truth.request_id, Verdict.UNKNOWN)
        if prediction.predicted_class is None:
            return LabelOutcome(truth.request_id, Verdict.NO_CLASS, prediction.bundle)
        if prediction.labelled:
            return LabelOutcome(truth.request_id, Verdict.ALREADY_LABELLED, prediction.bundle)
        prediction.labelled = True
        verdict = Verdict.CORRECT if prediction.predicted_class == truth.label else Verdict.WRONG
        return LabelOutcome(truth.request_id, verdict, prediction.bundle)

    def _forget(self, now: float) -> None:
        """Drop the oldest past either bound (the dict is in the order they were made)."""
        oldest = now - self.config.max_age_s
        predictions = self._predictions
        while predictions and (
            len(predictions) > self.config.max_predictions
            or next(iter(predictions.values())).at < oldest
        ):
            predictions.popitem(last=False)
