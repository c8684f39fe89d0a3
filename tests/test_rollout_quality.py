"""Drift and live accuracy as gate metrics: ``fleet/rollouts/quality.py`` reads them from
``modelhealth`` rows (real SQLite, the schema the fleet creates) with
``fleet.model_health``, and the gate judges them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, SQLModel, create_engine

from contracts.drift import SummaryBuilder, reference_from_samples
from fleet.drift import ALL_DEVICES, hour_of
from fleet.models import (
    Bundle,
    Gate,
    GateMetric,
    GateOutcome,
    HealthStats,
    ModelHealthRow,
    ModelVersion,
    utcnow,
)
from fleet.rollouts import WaveCounts, evaluate
from fleet.rollouts.gate import ModelQuality
from fleet.rollouts.quality import model_quality

STATS = HealthStats(records=10, inferences=1000)
GATE = Gate(soak_s=60, max_drift_psi=0.25, min_live_accuracy=0.9, min_labelled=100)


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = create_engine("sqlite://")
    SQLModel.metadata.create_all(engine)
    yield engine
    engine.dispose()


def _version(engine: Engine, *, shift: float, labelled: int, correct: int) -> Bundle:
    """A version whose bundle carries a reference of N(0, 1) inputs, and one hour of
    telemetry from its devices: inputs shifted by ``shift``, and ground-truth counts."""
    rng = np.random.default_rng(16)
    reference = reference_from_samples({"x": rng.normal(size=(4000, 3)).astype(np.float32)})
    builder = SummaryBuilder(reference)
    for row in rng.normal(loc=shift, size=(400, 1, 3)).astype(np.float32):
        builder.add({"x": row})
    with Session(engine, expire_on_commit=False) as session:
        version = ModelVersion(name="digits", version="1.1.0")
        session.add(version)
        session.flush()
        bundle = Bundle(
            model_version_id=version.id or 0,
            profile="host",
            runtime="onnxruntime",
            precision="fp32",
            version="1.1.0",
            version_number=1,
            target_path="host/digits-1.1.0.efb",
            sha256="0" * 64,
            length=1,
            bundle_name="digits-1.1.0",
            drift_reference=json.loads(reference.to_json_bytes()),
        )
        session.add(bundle)
        session.add(
            ModelHealthRow(
                model_version_id=version.id or 0,
                cohort=ALL_DEVICES,
                hour=hour_of(utcnow()),
                summaries=8,
                drift=builder.summary().to_extra(),
                labelled=labelled,
                correct=correct,
            )
        )
        session.commit()
    return bundle


def _verdict(engine: Engine, bundle: Bundle, gate: Gate) -> tuple[ModelQuality | None, str]:
    with Session(engine) as session:
        quality = model_quality(session, bundle, gate, until=utcnow(), window_s=60)
    counts = WaveCounts(wave=0, members=4, healthy=4)
    verdict = evaluate(counts, STATS, STATS, gate, shadow=False, soaked_s=60, quality=quality)
    return quality, verdict.outcome


def test_a_drifting_and_less_accurate_version_fails_the_gate_on_both(engine: Engine) -> None:
    bundle = _version(engine, shift=2.0, labelled=200, correct=150)
    with Session(engine) as session:
        quality = model_quality(session, bundle, GATE, until=utcnow(), window_s=60)
    assert quality is not None and quality.drift_psi is not None and quality.drift_psi > 1.0
    assert (quality.labelled, quality.correct) == (200, 150)

    verdict = evaluate(
        WaveCounts(wave=0, members=4, healthy=4), STATS, STATS, GATE, shadow=False, soaked_s=60,
        quality=quality,
    )  # fmt: skip
    assert verdict.outcome is GateOutcome.FAILED
    assert {c.metric for c in verdict.failures} == {GateMetric.DRIFT_PSI, GateMetric.LIVE_ACCURACY}


def test_a_version_like_its_reference_and_right_enough_passes(engine: Engine) -> None:
    bundle = _version(engine, shift=0.0, labelled=200, correct=190)
    quality, outcome = _verdict(engine, bundle, GATE)

    assert quality is not None and quality.drift_psi is not None and quality.drift_psi < 0.25
    assert outcome is GateOutcome.PASSED


def test_nothing_is_read_when_the_gate_judges_neither(engine: Engine) -> None:
    bundle = _version(engine, shift=2.0, labelled=200, correct=0)
    quality, outcome = _verdict(engine, bundle, Gate(soak_s=60))

    assert quality is None
    assert outcome is GateOutcome.PASSED
