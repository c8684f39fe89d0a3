"""Drift and live accuracy of model versions in the field: kept at ingest, read per cohort.

Devices send, per telemetry record, a drift summary of what their model saw
(``extra["drift"]``, :class:`contracts.drift.DriftSummary`) and the ground truth labelled
since their last record (``extra["truth"]``: ``labelled``, ``correct``). The bridge hands
each batch's new records to :func:`fold` in the transaction that stores them, which adds
them into ``modelhealth``: one row per model version, cohort and hour (fleet clock). So the
drift and accuracy views read (cohorts x hours) rows, whatever the number of devices.

A cohort is a device tag; ``""`` is every device (a device with several tags counts in
each of their cohorts, and once in ``""``). A summary that does not parse, or does not fit
the version's reference profile, is skipped and counted; the record itself is stored as
any other, and nothing a device sends there reaches its neighbours' figures.
"""

from __future__ import annotations

import datetime as dt
import json
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import add
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select as sa_select
from sqlalchemy import tuple_
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col

from contracts.bounded import MAX_COUNT
from contracts.drift import (
    DRIFT_REFERENCE_FILE,
    MAX_REFERENCE_BYTES,
    OTHER_CLASS,
    VALUES_PER_FEATURE,
    DriftSummary,
    ReferenceProfile,
)
from contracts.errors import DriftError
from contracts.mqtt import TelemetryRecord

from .errors import RequestError
from .models import Bundle, Device, ModelHealthRow, TelemetryRecordRow

__all__ = [
    "ALL_DEVICES",
    "ReferenceShape",
    "Truth",
    "fold",
    "hour_of",
    "load_reference",
    "load_summary",
    "read_reference",
    "version_references",
]

ALL_DEVICES = ""
"""The cohort every device counts in."""


class Truth(BaseModel):
    """``extra["truth"]`` of one record: labels received since the device's last record."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    labelled: int = Field(ge=0, le=MAX_COUNT)
    correct: int = Field(ge=0, le=MAX_COUNT)

    @model_validator(mode="after")
    def _correct_of_labelled(self) -> Truth:
        if self.correct > self.labelled:
            raise ValueError(f"correct ({self.correct}) is more than labelled ({self.labelled})")
        return self


def read_reference(bundle_file: Path) -> dict[str, Any] | None:
    """The bundle's ``drift-reference.json``, strictly parsed, as JSON to store; ``None``
    when it has none. ``RequestError`` when it is there but malformed or too big."""
    try:
        with tarfile.open(bundle_file, mode="r:") as tar:
            member = next((m for m in tar if m.name == DRIFT_REFERENCE_FILE), None)
            if member is None:
                return None
            if not member.isfile() or member.size > MAX_REFERENCE_BYTES:
                raise RequestError(
                    f"the bundle's {DRIFT_REFERENCE_FILE} is not a file of at most "
                    f"{MAX_REFERENCE_BYTES} bytes: recompile the bundle"
                )
            stream = tar.extractfile(member)
            data = stream.read(MAX_REFERENCE_BYTES + 1) if stream is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise RequestError(f"could not read the bundle: {e}") from e
    try:
        profile = ReferenceProfile.from_json_bytes(data)
    except DriftError as e:
        raise RequestError(f"{str(e)[:1000]}; recompile the bundle") from e
    return dict(json.loads(profile.to_json_bytes()))


def load_reference(document: Any) -> ReferenceProfile:
    """A reference profile as :func:`read_reference` stored it."""
    return ReferenceProfile.from_json_bytes(json.dumps(document).encode())


def load_summary(document: Any) -> DriftSummary:
    """A drift summary as ``extra["drift"]`` or a ``modelhealth`` row holds it (JSON, so
    class keys are text); :class:`~contracts.errors.DriftError` if it is not one.

    As strict as :meth:`DriftSummary.from_extra` (a class key must be an integer's own
    text), without its JSON round trip, which ingest pays per record."""
    if not isinstance(document, dict):
        raise DriftError(f"a drift summary is a JSON object, not {type(document).__name__}")
    classes = document.get("classes", {})
    try:
        keyed = {_class_key(text): count for text, count in classes.items()}
        return DriftSummary.model_validate({**document, "classes": keyed})
    except (AttributeError, TypeError, ValueError) as e:  # ValidationError is a ValueError
        raise DriftError(f"extra.drift is not a drift summary: {e}") from e


def _class_key(text: Any) -> int:
    key = int(text)
    if not isinstance(text, str) or str(key) != text:
        raise ValueError(f"class key {text!r} is not an integer's text")
    return key


@dataclass(frozen=True)
class ReferenceShape:
    """What a summary made against one reference looks like: each feature's bin count,
    and the classes it tracks."""

    bins: dict[str, int]
    classes: frozenset[int]

    @classmethod
    def of(cls, reference: ReferenceProfile) -> ReferenceShape:
        return cls(
            bins={f.name: len(f.fractions) for f in reference.features},
            classes=frozenset({*reference.tracked_classes(), OTHER_CLASS}),
        )

    def fits(self, summary: DriftSummary) -> bool:
        """Whether ``summary`` has this shape, and counts an interval can hold (at most
        ``MAX_COUNT`` inferences, ``VALUES_PER_FEATURE`` values each per feature). Only
        such summaries are merged, so one made otherwise (a device's bug or malice) can
        neither make its cohort's sum unmergeable nor fill it up (an hour's sum holds some
        65 000 of the largest)."""
        count = summary.count
        if count > MAX_COUNT or sum(summary.classes.values()) > count:
            return False
        for name, counts in summary.features.items():
            if self.bins.get(name) != len(counts) or sum(counts) > count * VALUES_PER_FEATURE:
                return False
        return self.classes.issuperset(summary.classes)


def hour_of(at: dt.datetime) -> dt.datetime:
    """The hour (UTC) ``at`` falls in: the unit ``modelhealth`` sums over."""
    return at.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def version_references(
    session: Session, bundle_names: Iterable[str]
) -> dict[str, tuple[int, ReferenceShape | None]]:
    """Bundle name (``NAME-VERSION``) → its model version's id and the shape of its
    reference profile: that of the version's first bundle uploaded with one (every bundle
    of a version is compiled from the same validation data)."""
    names = set(bundle_names)
    if not names:
        return {}
    found = session.execute(
        sa_select(col(Bundle.bundle_name), col(Bundle.model_version_id)).where(
            col(Bundle.bundle_name).in_(names)
        )
    ).all()
    version_of = {name: int(version_id) for name, version_id in found}
    shapes = {
        vid: ReferenceShape.of(r)
        for vid, r in _references(session, set(version_of.values())).items()
    }
    return {name: (vid, shapes.get(vid)) for name, vid in version_of.items()}


def _references(session: Session, version_ids: set[int]) -> dict[int, ReferenceProfile]:
    if not version_ids:
        return {}
    rows = session.execute(
        sa_select(col(Bundle.model_version_id), col(Bundle.drift_reference))
        .where(
            col(Bundle.model_version_id).in_(version_ids), col(Bundle.drift_reference).is_not(None)
        )
        .order_by(col(Bundle.id))
    ).all()
    found: dict[int, ReferenceProfile] = {}
    for version_id, document in rows:
        if document is not None and int(version_id) not in found:
            found[int(version_id)] = load_reference(document)
    return found


@dataclass
class _Sums:
    """One ``modelhealth`` row's share of a batch. Drift counts are added as plain lists
    (every summary fits the reference, :class:`ReferenceShape`, so bins line up) and made a
    :class:`DriftSummary` once, in :meth:`drift`: a model per record would cost ingest."""

    summaries: int = 0
    skipped: int = 0
    count: int = 0
    features: dict[str, list[int]] = field(default_factory=dict)
    classes: dict[int, int] = field(default_factory=dict)
    labelled: int = 0
    correct: int = 0

    def add_drift(self, summary: DriftSummary) -> None:
        self.summaries += 1
        self._add_counts(summary.count, summary.features, summary.classes)

    def add(self, other: _Sums) -> None:
        self.summaries += other.summaries
        self.skipped += other.skipped
        self.labelled += other.labelled
        self.correct += other.correct
        self._add_counts(other.count, other.features, other.classes)

    def _add_counts(
        self, count: int, features: dict[str, list[int]], classes: dict[int, int]
    ) -> None:
        self.count += count
        for name, counts in features.items():
            mine = self.features.get(name)
            self.features[name] = list(counts) if mine is None else list(map(add, mine, counts))
        for key, value in classes.items():
            self.classes[key] = self.classes.get(key, 0) + value

    def drift(self) -> DriftSummary | None:
        """The summaries added, as one; ``None`` if none was, or if their sum passes the
        contract's bounds (then they count as skipped)."""
        if not self.summaries:
            return None
        try:
            return DriftSummary(count=self.count, features=self.features, classes=self.classes)
        except ValidationError:
            self.skipped, self.summaries = self.skipped + self.summaries, 0
            return None


def fold(session: Session, rows: Sequence[tuple[str, TelemetryRecord, dt.datetime]]) -> int:
    """Add the drift summaries and truth counts of ``rows`` (``(device_id, record,
    received_at)``, as :func:`fleet.telemetry.ingest` takes them) into ``modelhealth``;
    returns how many records carried one that was refused (malformed, or not of the
    reference's shape).

    Call it before ingest, in the same transaction: records already stored (a resend) are
    left out, so each counts once. The rows are locked in key order, so replicas folding
    at once wait for each other rather than deadlock. A record whose bundle is not in the
    registry is left out (its telemetry is stored all the same).
    """
    skipped = 0
    carrying = {
        (device_id, record.id): (device_id, record, at)
        for device_id, record, at in rows
        if record.bundle is not None and ("drift" in record.extra or "truth" in record.extra)
    }
    if not carrying:
        return 0
    for device_id, record_id in _stored(session, list(carrying)):
        carrying.pop((device_id, record_id), None)
    versions = version_references(session, {r.bundle for _, r, _ in carrying.values() if r.bundle})
    tags = dict(
        session.execute(
            sa_select(col(Device.id), col(Device.tags)).where(
                col(Device.id).in_({d for d, _ in carrying})
            )
        ).all()
    )
    groups: dict[tuple[int, dt.datetime, tuple[str, ...]], _Sums] = {}
    """Records by version, hour and cohorts: summed once, then added to each cohort."""
    for device_id, record, at in carrying.values():
        if record.bundle not in versions:
            continue
        version_id, shape = versions[record.bundle]
        cohorts = {ALL_DEVICES, *(t for t in tags.get(device_id) or [] if isinstance(t, str))}
        group = groups.setdefault((version_id, hour_of(at), tuple(sorted(cohorts))), _Sums())
        drift, truth = _parse(record.extra, shape)
        if drift is False or truth is False:
            skipped += 1
        if isinstance(drift, DriftSummary):
            group.add_drift(drift)
        elif drift is False:
            group.skipped += 1
        if isinstance(truth, Truth):
            group.labelled += truth.labelled
            group.correct += truth.correct
    sums: dict[tuple[int, str, dt.datetime], _Sums] = {}
    for (version_id, hour, names), group in groups.items():
        for cohort in names:
            sums.setdefault((version_id, cohort, hour), _Sums()).add(group)
    for key in sorted(sums):
        _add(session, key, sums[key])
    return skipped


_KEYS_PER_QUERY = 4000
"""Record keys looked up per statement: two parameters each, well within SQLite's 32 766
and PostgreSQL's 65 535 (a batch may hold far more records)."""


def _stored(session: Session, keys: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Which of ``keys`` (device id, record id) the telemetry table already holds."""
    t = TelemetryRecordRow
    found: list[tuple[str, str]] = []
    for start in range(0, len(keys), _KEYS_PER_QUERY):
        chunk = keys[start : start + _KEYS_PER_QUERY]
        found.extend(
            (str(device_id), str(record_id))
            for device_id, record_id in session.execute(
                sa_select(col(t.device_id), col(t.record_id)).where(
                    tuple_(col(t.device_id), col(t.record_id)).in_(chunk)
                )
            )
        )
    return found


def _parse(
    extra: dict[str, Any], shape: ReferenceShape | None
) -> tuple[DriftSummary | bool | None, Truth | bool | None]:
    """The record's drift summary and truth: each parsed, ``None`` if absent, ``False`` if
    malformed (a drift summary without a reference to judge its shape is left out)."""
    drift: DriftSummary | bool | None = None
    truth: Truth | bool | None = None
    if "drift" in extra and shape is not None:
        try:
            drift = load_summary(extra["drift"])
        except DriftError:
            drift = False
        else:
            drift = drift if shape.fits(drift) else False
    if "truth" in extra:
        try:
            truth = Truth.model_validate(extra["truth"])
        except ValidationError:
            truth = False
    return drift, truth


def _add(session: Session, key: tuple[int, str, dt.datetime], sums: _Sums) -> None:
    """Add ``sums`` to the ``modelhealth`` row of ``key``, made if missing, locked first."""
    version_id, cohort, hour = key
    table = ModelHealthRow.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    session.execute(
        insert(table)
        .values(
            model_version_id=version_id,
            cohort=cohort,
            hour=hour,
            summaries=0,
            skipped=0,
            labelled=0,
            correct=0,
        )
        .on_conflict_do_nothing()
    )
    t = ModelHealthRow
    row = session.execute(
        sa_select(col(t.id), col(t.drift))
        .where(col(t.model_version_id) == version_id, col(t.cohort) == cohort, col(t.hour) == hour)
        .with_for_update()
    ).one()
    drift = sums.drift()
    summaries, skipped = sums.summaries, sums.skipped
    if drift is not None and row.drift is not None:
        try:
            drift = load_summary(row.drift).merge(drift)
        except DriftError:  # the hour's sum is full: what came now is counted, not merged
            drift, summaries, skipped = None, 0, skipped + summaries
    values: dict[str, Any] = {
        "summaries": col(t.summaries) + summaries,
        "skipped": col(t.skipped) + skipped,
        "labelled": col(t.labelled) + sums.labelled,
        "correct": col(t.correct) + sums.correct,
    }
    if drift is not None:
        values["drift"] = drift.to_extra()
    session.execute(table.update().where(table.c.id == row.id).values(**values))
