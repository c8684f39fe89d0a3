"""A model version's drift and live accuracy per cohort, read from ``modelhealth``.

Both views cover whole hours of the fleet's clock: the current hour and as many before as
the window asks (``window_s`` rounded up to the hour). Rows are cohorts x hours: the
accuracy sums are added by the database; drift summaries (fixed-size) are merged here and
scored against the version's reference profile with :mod:`contracts.drift`.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from collections.abc import Sequence

from pydantic import BaseModel
from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col

from contracts.drift import DriftSummary, DriftThresholds, FeatureScore, ReferenceProfile, score

from .drift import ALL_DEVICES, hour_of, load_reference, load_summary
from .models import Bundle, ModelHealthRow, ModelVersion

__all__ = [
    "AccuracyReport",
    "CohortAccuracy",
    "CohortDrift",
    "DriftReport",
    "DriftVerdict",
    "accuracy_report",
    "drift_report",
    "reference_of",
    "wilson_interval",
]

WILSON_Z_95 = 1.959963984540054
"""The standard normal's 97.5 % quantile: a two-sided 95 % interval."""


class DriftVerdict(enum.StrEnum):
    DRIFT = "drift"
    OK = "ok"
    TOO_FEW_SAMPLES = "too_few_samples"
    """Fewer inferences summarised than the thresholds need: no verdict yet."""


class CohortDrift(BaseModel):
    cohort: str
    """A device tag; ``""``: every device."""
    summaries: int
    """Telemetry records whose drift summary was merged."""
    skipped: int
    """Drift summaries refused (malformed, or not of the reference's shape)."""
    samples: int
    """Inferences the merged summary covers."""
    max_psi: float | None
    """The largest PSI of the features and the classes; ``None`` without a score."""
    max_distance: float | None
    """The largest binned Wasserstein distance of the continuous features."""
    classes_psi: float | None
    features: dict[str, FeatureScore]
    reasons: list[str]
    """What passed its threshold, in words (empty unless the verdict is ``drift``)."""
    verdict: DriftVerdict


class DriftReport(BaseModel):
    name: str
    version: str
    since: dt.datetime
    until: dt.datetime
    reference: bool
    """Whether the version has a reference profile (from its bundles); without one, no
    cohort has a score."""
    thresholds: DriftThresholds
    overall: CohortDrift | None
    """Every device's (the ``""`` cohort); ``None`` when nothing was reported."""
    cohorts: list[CohortDrift]
    """Per device tag, by name."""


class CohortAccuracy(BaseModel):
    cohort: str
    labelled: int
    correct: int
    accuracy: float | None
    low: float | None
    """The Wilson score interval's bounds at :attr:`AccuracyReport.confidence`."""
    high: float | None


class AccuracyReport(BaseModel):
    name: str
    version: str
    since: dt.datetime
    until: dt.datetime
    confidence: float
    overall: CohortAccuracy | None
    cohorts: list[CohortAccuracy]


def wilson_interval(correct: int, labelled: int, z: float = WILSON_Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / labelled`` (``labelled`` > 0):
    unlike the normal approximation it stays within [0, 1] and is honest near 0 and 1."""
    if labelled <= 0 or not 0 <= correct <= labelled:
        raise ValueError(f"need 0 <= correct <= labelled, labelled > 0: not {correct}/{labelled}")
    p = correct / labelled
    z2 = z * z
    centre = (p + z2 / (2 * labelled)) / (1 + z2 / labelled)
    half = z * math.sqrt(p * (1 - p) / labelled + z2 / (4 * labelled * labelled))
    half /= 1 + z2 / labelled
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact where rounding is not
    high = 1.0 if correct == labelled else min(1.0, centre + half)
    return low, high


def window_start(until: dt.datetime, window_s: float) -> dt.datetime:
    """The first hour a window of ``window_s`` seconds ending at ``until`` covers."""
    hours = max(1, math.ceil(window_s / 3600))
    return hour_of(until) - dt.timedelta(hours=hours - 1)


def reference_of(session: Session, version: ModelVersion) -> ReferenceProfile | None:
    """The version's reference profile: its first bundle uploaded with one."""
    document = session.execute(
        sa_select(col(Bundle.drift_reference))
        .where(col(Bundle.model_version_id) == version.id, col(Bundle.drift_reference).is_not(None))
        .order_by(col(Bundle.id))
        .limit(1)
    ).scalar()
    return load_reference(document) if document is not None else None


def drift_report(
    session: Session,
    *,
    version: ModelVersion,
    thresholds: DriftThresholds,
    until: dt.datetime,
    window_s: float,
) -> DriftReport:
    """``version``'s drift per cohort over the window ending at ``until``."""
    since = window_start(until, window_s)
    reference = reference_of(session, version)
    t = ModelHealthRow
    rows = session.execute(
        sa_select(col(t.cohort), col(t.summaries), col(t.skipped), col(t.drift))
        .where(col(t.model_version_id) == version.id, col(t.hour) >= since)
        .order_by(col(t.cohort), col(t.hour))
    ).all()
    merged: dict[str, tuple[int, int, DriftSummary | None]] = {}
    for cohort, summaries, skipped, document in rows:
        count, refused, summary = merged.get(cohort, (0, 0, None))
        if document is not None:
            found = load_summary(document)
            summary = found if summary is None else summary.merge(found)
        merged[cohort] = (count + int(summaries), refused + int(skipped), summary)
    cohorts = [
        _cohort_drift(cohort, count, refused, summary, reference, thresholds)
        for cohort, (count, refused, summary) in sorted(merged.items())
    ]
    overall = next((c for c in cohorts if c.cohort == ALL_DEVICES), None)
    return DriftReport(
        name=version.name,
        version=version.version,
        since=since,
        until=until,
        reference=reference is not None,
        thresholds=thresholds,
        overall=overall,
        cohorts=[c for c in cohorts if c.cohort != ALL_DEVICES],
    )


def _cohort_drift(
    cohort: str,
    count: int,
    refused: int,
    summary: DriftSummary | None,
    reference: ReferenceProfile | None,
    thresholds: DriftThresholds,
) -> CohortDrift:
    samples = summary.count if summary is not None else 0
    if reference is None or summary is None or samples < thresholds.min_count:
        return CohortDrift(
            cohort=cohort,
            summaries=count,
            skipped=refused,
            samples=samples,
            max_psi=None,
            max_distance=None,
            classes_psi=None,
            features={},
            reasons=[],
            verdict=DriftVerdict.TOO_FEW_SAMPLES,
        )
    scored = score(reference, summary, thresholds)
    return CohortDrift(
        cohort=cohort,
        summaries=count,
        skipped=refused,
        samples=samples,
        max_psi=scored.max_psi,
        max_distance=scored.max_distance,
        classes_psi=scored.classes_psi,
        features=scored.features,
        reasons=scored.reasons,
        verdict=DriftVerdict.DRIFT if scored.alert else DriftVerdict.OK,
    )


def accuracy_report(
    session: Session, *, version: ModelVersion, until: dt.datetime, window_s: float
) -> AccuracyReport:
    """``version``'s live accuracy per cohort over the window ending at ``until``, from
    the ground truth devices reported; cohorts with no labels are left out."""
    since = window_start(until, window_s)
    t = ModelHealthRow
    rows: Sequence[tuple[str, int, int]] = [
        (str(cohort), int(labelled), int(correct))
        for cohort, labelled, correct in session.execute(
            sa_select(col(t.cohort), func.sum(col(t.labelled)), func.sum(col(t.correct)))
            .where(col(t.model_version_id) == version.id, col(t.hour) >= since)
            .group_by(col(t.cohort))
            .order_by(col(t.cohort))
        ).all()
    ]
    cohorts = [_cohort_accuracy(*row) for row in rows if row[1] > 0]
    return AccuracyReport(
        name=version.name,
        version=version.version,
        since=since,
        until=until,
        confidence=0.95,
        overall=next((c for c in cohorts if c.cohort == ALL_DEVICES), None),
        cohorts=[c for c in cohorts if c.cohort != ALL_DEVICES],
    )


def _cohort_accuracy(cohort: str, labelled: int, correct: int) -> CohortAccuracy:
    low, high = wilson_interval(correct, labelled)
    return CohortAccuracy(
        cohort=cohort,
        labelled=labelled,
        correct=correct,
        accuracy=correct / labelled,
        low=low,
        high=high,
    )
