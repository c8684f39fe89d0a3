"""Drift: what a model saw at compile time, what it sees in the field, and how far apart.

The public API, shared by the compiler (writes the reference), the OTA bundle (carries it),
the agent (folds inferences into summaries) and the fleet (merges and scores them):

- :data:`DRIFT_REFERENCE_FILE`, ``drift-reference.json``: the file's name in a compile
  output directory and in an OTA bundle.
- :class:`ReferenceProfile` (schema :data:`DRIFT_REFERENCE_SCHEMA`): ``samples``,
  ``features`` (one :class:`FeatureReference` per input channel or feature and one per
  continuous output, such as ``output:norm``), and ``classes`` (class fractions, for a
  classifier). :meth:`ReferenceProfile.from_json_bytes` is the only way in from bytes and
  raises :class:`~contracts.errors.DriftError` on anything malformed.
  :func:`reference_from_samples` builds one from validation data.
- :class:`DriftSummary`, what a device sends per bundle and reporting interval in
  ``TelemetryRecord.extra["drift"]`` (:meth:`DriftSummary.to_extra`, read back with
  :meth:`DriftSummary.from_extra`): ``count`` inferences, ``features`` (counts per bin of
  the reference's edges), ``classes`` (sparse counts of the reference's
  :data:`TRACKED_CLASSES` most frequent classes, every other class under
  :data:`OTHER_CLASS`). :meth:`DriftSummary.merge` adds two (associative, commutative).
  :class:`SummaryBuilder` folds inferences into one, from their arrays or from the
  :data:`DriftSample` that :func:`drift_sample` copies out of them.
- :func:`psi` (population stability index), :func:`binned_wasserstein` (the distance for
  continuous features), :func:`score` → :class:`DriftScores` against
  :class:`DriftThresholds` (defaults :data:`PSI_ALERT`, :data:`DISTANCE_ALERT`,
  :data:`MIN_COUNT`); a PSI alerts past its threshold plus :func:`psi_noise`, what chance
  alone gives for its bins and sample sizes.

Bins are fixed by the reference: ``edges`` are its interior quantiles (deciles), a value
``v`` falls in bin ``searchsorted(edges, v, side="right")``, so bin 0 holds what lies below
the first edge and the last bin what lies at or above the last. Fixed bins are what make a
summary bounded (a few hundred bytes whatever the traffic) and mergeable (counts add), so
the fleet can sum devices, cohorts and days without keeping anything raw. No raw input
leaves the device: a summary holds counts only.

What is binned (:func:`input_features`): for a 4-D image input, each channel (NCHW, or
NHWC when only the last axis is 1 to 4 long); for a 2-D or 3-D input, each feature of the
last axis; anything else, the whole tensor. At most :data:`MAX_INPUT_CHANNELS` channels per
input, and from each sample a strided subsample of at most :data:`VALUES_PER_FEATURE`
values per channel: cheap on the device, and the same values the reference was made of.
For a model that is not a classifier, the L2 norm of the first output per sample is the
feature ``output:norm``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .bounded import NO_CONTROL
from .errors import DriftError

__all__ = [
    "BINS",
    "DISTANCE_ALERT",
    "DRIFT_REFERENCE_FILE",
    "DRIFT_REFERENCE_SCHEMA",
    "MAX_CLASSES",
    "MAX_EDGES",
    "MAX_FEATURES",
    "MAX_INPUT_CHANNELS",
    "MAX_REFERENCE_BYTES",
    "MIN_COUNT",
    "OTHER_CLASS",
    "OUTPUT_NORM",
    "PSI_ALERT",
    "PSI_EPSILON",
    "TRACKED_CLASSES",
    "VALUES_PER_FEATURE",
    "DriftSample",
    "DriftScores",
    "DriftSummary",
    "DriftThresholds",
    "FeatureReference",
    "FeatureScore",
    "ReferenceProfile",
    "SummaryBuilder",
    "binned_wasserstein",
    "drift_sample",
    "input_features",
    "psi",
    "psi_noise",
    "reference_from_samples",
    "score",
]

DRIFT_REFERENCE_FILE = "drift-reference.json"
DRIFT_REFERENCE_SCHEMA: Literal["edgefleet.drift-reference/1"] = "edgefleet.drift-reference/1"
MAX_REFERENCE_BYTES = 4 << 20
BINS = 10
"""Bins per feature in a reference :func:`reference_from_samples` makes (deciles); fewer
when quantiles coincide (a feature with few distinct values)."""
MAX_EDGES = 63
MAX_FEATURES = 64
MAX_CLASSES = 100_000
MAX_INPUT_CHANNELS = 16
"""Channels (or 2-D features) per input that are binned; the rest are not watched."""
VALUES_PER_FEATURE = 64
"""Values per channel taken from each sample, strided over the channel."""
MAX_NAME_CHARS = 128
TRACKED_CLASSES = 16
"""Classes a summary counts one by one: the reference's most frequent ones."""
OTHER_CLASS = -1
"""Key of a summary's ``classes`` that counts every class not tracked."""
OUTPUT_NORM = "output:norm"
MAX_TOTAL = 2**53 - 1
"""Largest count in a summary, merged ones included: exact in a JSON double, and in a
64-bit column."""

PSI_EPSILON = 1e-4
"""Floor of a reference bin's fraction in :func:`psi` (a bin the reference never hit)."""
PSI_PSEUDOCOUNT = 0.5
"""Added to every observed bin in :func:`psi` (Jeffreys' prior), so an empty bin in a small
sample counts as rare, not impossible: without it one empty decile adds 0.69 to the PSI."""
PSI_ALERT = 0.25
"""The customary "significant shift" band starts at 0.25 (0.1 to 0.25 is "moderate"); the
customary rule assumes samples large enough that chance adds nothing. Here chance is
allowed for: a PSI alerts past ``PSI_ALERT`` plus :func:`psi_noise`, what sampling alone
adds on average (measured in tests/test_drift_device.py: no false alarm in long runs)."""
DISTANCE_ALERT = 0.1
"""The binned Wasserstein-1 distance is a fraction of the reference's central range (first
to last edge): 0.1 is every value moved a tenth of that range, or a tenth of them across it."""
MIN_COUNT = 200
"""Inferences a summary needs before it can alert: fewer, and noise reads as drift."""

_Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), NO_CONTROL]
_Total = Annotated[int, Field(ge=0, le=MAX_TOTAL)]
_Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class FeatureReference(_Strict):
    """One input channel, input feature or continuous output at compile time."""

    name: _Name
    edges: Annotated[list[float], Field(min_length=1, max_length=MAX_EDGES)]
    """Strictly increasing, finite."""
    fractions: Annotated[list[_Fraction], Field(min_length=2, max_length=MAX_EDGES + 1)]
    """One per bin: ``len(edges) + 1``, summing to 1."""

    @model_validator(mode="after")
    def _bins(self) -> Self:
        if any(not b > a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError(f"feature {self.name!r}: edges must be strictly increasing")
        if len(self.fractions) != len(self.edges) + 1:
            raise ValueError(
                f"feature {self.name!r}: {len(self.edges)} edges make {len(self.edges) + 1} "
                f"bins, but there are {len(self.fractions)} fractions"
            )
        _check_sum(self.fractions, f"feature {self.name!r}: fractions")
        return self


def _check_sum(fractions: Sequence[float], what: str) -> None:
    total = math.fsum(fractions)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{what} sum to {total}, not 1")


class ReferenceProfile(_Strict):
    """``drift-reference.json``: the validation data's distribution, as the compiler saw it."""

    schema_: Literal["edgefleet.drift-reference/1"] = Field(
        default=DRIFT_REFERENCE_SCHEMA, alias="schema"
    )
    samples: Annotated[int, Field(ge=1, le=MAX_TOTAL)]
    """Validation samples the profile was made of."""
    features: Annotated[list[FeatureReference], Field(max_length=MAX_FEATURES)]
    classes: Annotated[list[_Fraction], Field(min_length=1, max_length=MAX_CLASSES)] | None = None
    """Fraction of the samples the reference model put in each class (by class index), for a
    classifier; ``None`` otherwise."""

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if self.classes is not None:
            _check_sum(self.classes, "class fractions")
        return self

    @classmethod
    def from_json_bytes(cls, data: bytes) -> ReferenceProfile:
        """Parse ``drift-reference.json``; :class:`~contracts.errors.DriftError` if malformed."""
        if len(data) > MAX_REFERENCE_BYTES:
            raise DriftError(
                f"{DRIFT_REFERENCE_FILE} is {len(data)} bytes, "
                f"over the {MAX_REFERENCE_BYTES} allowed"
            )
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            raise DriftError(f"{DRIFT_REFERENCE_FILE} is not a drift reference profile: {e}") from e

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True, indent=1).encode()

    def has_output_norm(self) -> bool:
        return any(f.name == OUTPUT_NORM for f in self.features)

    def tracked_classes(self) -> list[int]:
        """The :data:`TRACKED_CLASSES` most frequent classes, most frequent first (ties: the
        lower index first)."""
        fractions = self.classes or []
        return sorted(range(len(fractions)), key=lambda c: (-fractions[c], c))[:TRACKED_CLASSES]

    def class_fractions(self) -> dict[int, float]:
        """Fractions of the tracked classes and of :data:`OTHER_CLASS`, as summaries count them."""
        if self.classes is None:
            return {}
        tracked = {c: self.classes[c] for c in self.tracked_classes()}
        if len(tracked) < len(self.classes):
            tracked[OTHER_CLASS] = max(0.0, 1.0 - math.fsum(tracked.values()))
        return tracked


def _check_counts(counts: list[int], what: str) -> None:
    if math.fsum(counts) > MAX_TOTAL:
        raise ValueError(f"{what} sum past {MAX_TOTAL}")


class DriftSummary(_Strict):
    """Counts of one bundle's inferences over an interval, in the reference's bins."""

    count: _Total = 0
    """Inferences folded in."""
    features: Annotated[
        dict[_Name, Annotated[list[_Total], Field(min_length=2, max_length=MAX_EDGES + 1)]],
        Field(max_length=MAX_FEATURES),
    ] = Field(default_factory=dict)
    """Counts per bin; a feature's counts add up to the values binned (up to
    :data:`VALUES_PER_FEATURE` per inference for an input channel, one for ``output:norm``)."""
    classes: Annotated[
        dict[Annotated[int, Field(ge=OTHER_CLASS, lt=MAX_CLASSES)], _Total],
        Field(max_length=TRACKED_CLASSES + 1),
    ] = Field(default_factory=dict)
    """Predicted class → inferences, for the tracked classes and :data:`OTHER_CLASS`."""

    @model_validator(mode="after")
    def _sums(self) -> Self:
        for name, counts in self.features.items():
            _check_counts(counts, f"counts of {name!r}")
        _check_counts(list(self.classes.values()), "class counts")
        return self

    def merge(self, other: DriftSummary) -> DriftSummary:
        """Both summaries' counts added; :class:`~contracts.errors.DriftError` if a feature
        has different bins in each (summaries against different references)."""
        features = {name: list(counts) for name, counts in self.features.items()}
        for name, counts in other.features.items():
            mine = features.get(name)
            if mine is None:
                features[name] = list(counts)
            elif len(mine) != len(counts):
                raise DriftError(
                    f"feature {name!r} has {len(mine)} bins in one summary and {len(counts)} "
                    "in the other: they were made against different references"
                )
            else:
                features[name] = [a + b for a, b in zip(mine, counts, strict=True)]
        classes = dict(self.classes)
        for key, value in other.classes.items():
            classes[key] = classes.get(key, 0) + value
        try:
            return DriftSummary(count=self.count + other.count, features=features, classes=classes)
        except ValidationError as e:
            raise DriftError(f"merged drift summary out of bounds: {e}") from e

    def to_extra(self) -> dict[str, Any]:
        """As it rides in ``TelemetryRecord.extra["drift"]`` (JSON: class keys as text)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_extra(cls, value: Any) -> DriftSummary:
        """Read ``TelemetryRecord.extra["drift"]``; :class:`~contracts.errors.DriftError` if
        it is not a summary."""
        try:
            return cls.model_validate_json(json.dumps(value, allow_nan=False))
        except (ValidationError, ValueError, TypeError) as e:
            raise DriftError(f"extra.drift is not a drift summary: {e}") from e


def psi(reference_fractions: Sequence[float], counts: Sequence[int]) -> float:
    """Population stability index of ``counts`` against ``reference_fractions`` (same bins):
    ``sum((o - r) * ln(o / r))``, reference fractions floored at :data:`PSI_EPSILON`,
    observed fractions with :data:`PSI_PSEUDOCOUNT` added to each bin. 0 with no counts."""
    if len(reference_fractions) != len(counts):
        raise ValueError(f"{len(reference_fractions)} reference bins but {len(counts)} counts")
    total = math.fsum(counts)
    if total <= 0:
        return 0.0
    ref = np.maximum(np.asarray(reference_fractions, dtype=np.float64), PSI_EPSILON)
    ref = ref / ref.sum()
    observed = (np.asarray(counts, dtype=np.float64) + PSI_PSEUDOCOUNT) / (
        total + PSI_PSEUDOCOUNT * len(counts)
    )
    return float(np.sum((observed - ref) * np.log(observed / ref)))


def psi_noise(bins: int, count: int, reference_samples: int) -> float:
    """The PSI two samples of one distribution show on average, ``(bins - 1) * (1/n + 1/m)``
    (PSI is the symmetric Kullback-Leibler divergence; for counts of one distribution it is
    about a chi-square with ``bins - 1`` degrees of freedom over each sample's size). ``n``
    is the summary's inferences and ``m`` the reference's samples: the values of one input
    move together, so counting them one by one would understate the noise."""
    return (bins - 1) * (1 / max(1, count) + 1 / max(1, reference_samples))


def binned_wasserstein(feature: FeatureReference, counts: Sequence[int]) -> float:
    """Wasserstein-1 distance between the reference and ``counts`` over the reference's
    central range (first to last edge), divided by that range: 0 for the same distribution,
    at most 1. Each distribution's CDF is known at the edges and taken as linear between
    them; mass beyond the outer edges counts by the edge it crossed, not by how far it went.
    With a single edge, the difference in mass below it."""
    if len(feature.fractions) != len(counts):
        raise ValueError(f"{len(feature.fractions)} reference bins but {len(counts)} counts")
    total = math.fsum(counts)
    if total <= 0:
        return 0.0
    ref_cdf = np.cumsum(feature.fractions)[:-1]
    obs_cdf = np.cumsum(np.asarray(counts, dtype=np.float64) / total)[:-1]
    gap = np.abs(ref_cdf - obs_cdf)
    if len(feature.edges) == 1:
        return float(gap[0])
    edges = np.asarray(feature.edges, dtype=np.float64)
    widths = np.diff(edges)
    area = np.sum(widths * (gap[:-1] + gap[1:]) / 2)
    return float(min(1.0, area / (edges[-1] - edges[0])))


class DriftThresholds(_Strict):
    psi: Annotated[float, Field(gt=0)] = PSI_ALERT
    distance: Annotated[float, Field(gt=0, le=1)] = DISTANCE_ALERT
    min_count: Annotated[int, Field(ge=1)] = MIN_COUNT


class FeatureScore(_Strict):
    psi: float
    psi_limit: float
    """:attr:`DriftThresholds.psi` plus :func:`psi_noise` for these bins and counts."""
    distance: float | None = None
    """:func:`binned_wasserstein`, for continuous features (not for classes)."""


class DriftScores(_Strict):
    """A summary scored against its reference."""

    count: int
    features: dict[str, FeatureScore]
    classes_psi: float | None
    classes_psi_limit: float | None
    max_psi: float
    max_distance: float
    alert: bool
    """``count`` reached ``min_count`` and some PSI or distance passed its threshold."""
    reasons: list[str]
    """What passed its threshold, as a person reads it (empty when there is no alert)."""


def score(
    reference: ReferenceProfile, summary: DriftSummary, thresholds: DriftThresholds | None = None
) -> DriftScores:
    """Per-feature PSI and distance, the classes' PSI, their maxima and whether to alert.
    Features the summary lacks, or binned differently, are not scored."""
    limits = thresholds or DriftThresholds()
    features: dict[str, FeatureScore] = {}
    for feature in reference.features:
        counts = summary.features.get(feature.name)
        if counts is None or len(counts) != len(feature.fractions) or sum(counts) == 0:
            continue
        features[feature.name] = FeatureScore(
            psi=psi(feature.fractions, counts),
            psi_limit=limits.psi + psi_noise(len(counts), summary.count, reference.samples),
            distance=binned_wasserstein(feature, counts),
        )
    classes_psi: float | None = None
    classes_limit: float | None = None
    expected = reference.class_fractions()
    if expected and summary.classes:
        keys = sorted(expected)
        classes_psi = psi([expected[k] for k in keys], [summary.classes.get(k, 0) for k in keys])
        classes_limit = limits.psi + psi_noise(len(keys), summary.count, reference.samples)
    psis = [s.psi for s in features.values()] + ([classes_psi] if classes_psi is not None else [])
    distances = [s.distance for s in features.values() if s.distance is not None]
    reasons: list[str] = []
    if summary.count >= limits.min_count:
        for name, s in features.items():
            if s.psi > s.psi_limit:
                reasons.append(f"{name}: PSI {s.psi:.3f} > {s.psi_limit:.3f}")
            if s.distance is not None and s.distance > limits.distance:
                reasons.append(f"{name}: distance {s.distance:.3f} > {limits.distance}")
        if classes_psi is not None and classes_limit is not None and classes_psi > classes_limit:
            reasons.append(f"classes: PSI {classes_psi:.3f} > {classes_limit:.3f}")
    return DriftScores(
        count=summary.count,
        features=features,
        classes_psi=classes_psi,
        classes_psi_limit=classes_limit,
        max_psi=max(psis, default=0.0),
        max_distance=max(distances, default=0.0),
        alert=bool(reasons),
        reasons=reasons,
    )


def input_features(name: str, batch: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The values binned for input ``name`` from ``batch`` (samples first): one
    ``(feature name, float64 values)`` per channel or feature, at most
    :data:`VALUES_PER_FEATURE` values per sample each. A non-numeric input has none."""
    if batch.dtype.kind not in "biuf" or batch.ndim == 0 or batch.size == 0:
        return []
    n = batch.shape[0]
    if batch.ndim == 4:
        channels_last = not 1 <= batch.shape[1] <= 4 and 1 <= batch.shape[3] <= 4
    else:
        channels_last = batch.ndim in (2, 3)
    if batch.ndim in (2, 3, 4):
        if channels_last:
            grid = batch.reshape(n, -1, batch.shape[-1])[:, :, :MAX_INPUT_CHANNELS]
            step = max(1, grid.shape[1] // VALUES_PER_FEATURE)
            picked = grid[:, ::step][:, :VALUES_PER_FEATURE].transpose(2, 0, 1)
        else:
            grid = batch.reshape(n, batch.shape[1], -1)[:, :MAX_INPUT_CHANNELS]
            step = max(1, grid.shape[2] // VALUES_PER_FEATURE)
            picked = grid[:, :, ::step][:, :, :VALUES_PER_FEATURE].transpose(1, 0, 2)
        names = [f"{name}:{c}" for c in range(picked.shape[0])]
    else:
        flat = batch.reshape(n, -1)
        step = max(1, flat.shape[1] // VALUES_PER_FEATURE)
        picked = flat[:, ::step][:, :VALUES_PER_FEATURE][np.newaxis]
        names = [name]
    copied = picked.astype(np.float64)  # one copy for every channel, contiguous
    return [
        (feature, copied[index].reshape(-1))
        for index, feature in enumerate(names)
        if len(feature) <= MAX_NAME_CHARS
    ]


def output_norms(batch: np.ndarray) -> np.ndarray:
    """L2 norm of each sample of an output (samples first): the ``output:norm`` feature."""
    flat = batch.reshape(batch.shape[0], -1).astype(np.float64)
    return np.sqrt(np.einsum("ij,ij->i", flat, flat))


DriftSample = dict[str, np.ndarray]
"""Feature name → the values one inference call contributes (see :func:`drift_sample`)."""


def drift_sample(
    inputs: Mapping[str, np.ndarray], first_output: np.ndarray | None = None
) -> DriftSample:
    """The values an inference call adds to a summary, copied out of its arrays (so the
    caller may reuse them): :func:`input_features` of each input and, given the first
    output, ``output:norm`` (pass it only when the reference has that feature: a
    classifier's has not). A few hundred floats for an image model."""
    sample: DriftSample = {}
    for name, array in inputs.items():
        for feature, values in input_features(name, np.asarray(array)):
            sample[feature] = values
    if first_output is not None and np.asarray(first_output).size:
        sample[OUTPUT_NORM] = output_norms(np.asarray(first_output))
    return sample


def _feature_reference(name: str, values: np.ndarray) -> FeatureReference | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    edges = np.unique(np.quantile(values, np.arange(1, BINS) / BINS))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    fractions = counts / counts.sum()
    return FeatureReference(
        name=name, edges=[float(e) for e in edges], fractions=[float(f) for f in fractions]
    )


def reference_from_samples(
    inputs: Mapping[str, np.ndarray],
    first_output: np.ndarray | None = None,
    *,
    classifier: bool = False,
) -> ReferenceProfile:
    """The profile of validation ``inputs`` (one array per input, samples first) and the
    reference model's ``first_output`` on them: its predicted classes for a ``classifier``
    (argmax of the last axis), its per-sample norm otherwise."""
    samples = len(next(iter(inputs.values())))
    features: list[FeatureReference] = []
    for name in sorted(inputs):
        for feature, values in input_features(name, np.asarray(inputs[name])):
            made = _feature_reference(feature, values)
            if made is not None and len(features) < MAX_FEATURES:
                features.append(made)
    classes: list[float] | None = None
    if first_output is not None and len(first_output):
        out = np.asarray(first_output)
        if classifier:
            scores = out.reshape(len(out), -1)
            predicted = np.argmax(scores, axis=1)
            width = min(scores.shape[1], MAX_CLASSES)
            counts = np.bincount(predicted[predicted < width], minlength=width)
            classes = [float(c) for c in counts / max(1, counts.sum())]
        else:
            made = _feature_reference(OUTPUT_NORM, output_norms(out))
            if made is not None and len(features) < MAX_FEATURES:
                features.append(made)
    return ReferenceProfile(samples=samples, features=features, classes=classes)


class SummaryBuilder:
    """Folds inferences into a :class:`DriftSummary` against one reference. Not thread-safe:
    the caller holds its own lock."""

    def __init__(self, reference: ReferenceProfile) -> None:
        self._reference = reference
        self._edges = {f.name: np.asarray(f.edges, dtype=np.float64) for f in reference.features}
        self._counts = {
            name: np.zeros(len(e) + 1, dtype=np.int64) for name, e in self._edges.items()
        }
        self._tracked = set(reference.tracked_classes())
        self._classes: dict[int, int] = {}
        self._count = 0

    @property
    def reference(self) -> ReferenceProfile:
        return self._reference

    def add(
        self,
        inputs: Mapping[str, np.ndarray],
        first_output: np.ndarray | None = None,
        predicted_class: int | None = None,
    ) -> None:
        """One inference call: its inputs (each with its batch axis, as the model takes
        them), its first output (for ``output:norm``) and its predicted class."""
        self.add_sample(drift_sample(inputs, first_output), predicted_class)

    def add_sample(self, sample: DriftSample, predicted_class: int | None = None) -> None:
        """One inference call, its values already taken by :func:`drift_sample`."""
        self._count += 1
        for feature, values in sample.items():
            edges = self._edges.get(feature)
            if edges is not None:
                bins = np.searchsorted(edges, values, side="right")
                self._counts[feature] += np.bincount(bins, minlength=len(edges) + 1)
        if predicted_class is not None and self._tracked:
            key = predicted_class if predicted_class in self._tracked else OTHER_CLASS
            self._classes[key] = self._classes.get(key, 0) + 1

    def summary(self) -> DriftSummary:
        """What was folded in so far, as a summary (the builder keeps counting)."""
        return DriftSummary(
            count=self._count,
            features={
                n: [int(c) for c in counts] for n, counts in self._counts.items() if counts.any()
            },
            classes=dict(self._classes),
        )
