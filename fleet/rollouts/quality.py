"""The new version's drift and live accuracy, read for a wave's gate (``max_drift_psi``,
``min_live_accuracy``) from what :mod:`fleet.model_health` reports.

The figures are the version's over every device serving it (the ``""`` cohort) in the whole
hours of the fleet's clock that cover the soak: ``modelhealth`` keeps hours, not devices,
so earlier waves' devices weigh in too.
"""

from __future__ import annotations

import datetime as dt

from sqlmodel import Session

from contracts.drift import DriftThresholds

from ..model_health import accuracy_report, drift_report
from ..models import Bundle, Gate, ModelVersion
from .gate import ModelQuality

__all__ = ["model_quality"]


def model_quality(
    session: Session,
    bundle: Bundle,
    gate: Gate,
    *,
    until: dt.datetime,
    window_s: float,
    thresholds: DriftThresholds | None = None,
) -> ModelQuality | None:
    """``bundle``'s version's input drift (the largest PSI of its features and classes)
    and ground-truth counts over the window; ``None`` when the gate judges neither.
    ``thresholds``: how many inferences a drift score needs (``min_count``)."""
    if gate.max_drift_psi is None and gate.min_live_accuracy is None:
        return None
    version = session.get(ModelVersion, bundle.model_version_id)
    if version is None:
        return ModelQuality()
    drift = drift_report(
        session,
        version=version,
        thresholds=thresholds or DriftThresholds(),
        until=until,
        window_s=window_s,
    ).overall
    accuracy = accuracy_report(session, version=version, until=until, window_s=window_s).overall
    return ModelQuality(
        drift_psi=drift.max_psi if drift is not None else None,
        labelled=accuracy.labelled if accuracy is not None else 0,
        correct=accuracy.correct if accuracy is not None else 0,
    )
