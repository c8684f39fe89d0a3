"""The model registry: versions with their metadata, bundles per profile, stages.

A version moves between stages freely except that a name has at most one production
version: promoting one archives the one before (the cloud endpoint serves production).
Bundles are verified, then signed into the OTA repository as TUF targets.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from contracts.artifacts import LEGACY_FP32
from ota.archive import extract_bundle, verify_bundle
from ota.errors import OtaError
from ota.repository import OtaRepository, target_path_for

from . import audit
from .drift import read_reference
from .errors import ConflictError, NotFoundError, RequestError
from .inference import CloudModel
from .models import (
    Bundle,
    BundlePublic,
    ModelVersion,
    ModelVersionCreate,
    ModelVersionPublic,
    Stage,
)

__all__ = [
    "attach_bundle",
    "cloud_model",
    "create_version",
    "get_bundle",
    "get_version",
    "list_versions",
    "public_version",
    "set_stage",
]


def create_version(session: Session, *, data: ModelVersionCreate, actor: str) -> ModelVersion:
    version = ModelVersion.model_validate(data, update={"created_by": actor})
    session.add(version)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise ConflictError(
            f"{data.name} {data.version} is already registered: versions are immutable, "
            "register a new version"
        ) from None
    audit.record(
        session,
        actor=actor,
        action="model.create",
        target=_label(version),
        after=audit.snapshot(version),
    )
    return version


def get_version(session: Session, *, name: str, version: str) -> ModelVersion:
    found = session.exec(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    ).first()
    if found is None:
        raise NotFoundError(f"no model {name} version {version} in the registry")
    return found


def list_versions(
    session: Session, *, name: str | None = None, stage: Stage | None = None
) -> list[ModelVersion]:
    query = select(ModelVersion)
    if name is not None:
        query = query.where(ModelVersion.name == name)
    if stage is not None:
        query = query.where(ModelVersion.stage == stage)
    return list(session.exec(query.order_by(col(ModelVersion.id))))


def set_stage(session: Session, *, version: ModelVersion, stage: Stage, actor: str) -> None:
    if stage == Stage.PRODUCTION:
        for current in list_versions(session, name=version.name, stage=Stage.PRODUCTION):
            if current.id != version.id:
                _move(session, current, Stage.ARCHIVED, actor)
    _move(session, version, stage, actor)


def _move(session: Session, version: ModelVersion, stage: Stage, actor: str) -> None:
    before = audit.snapshot(version)
    version.stage = stage
    session.add(version)
    audit.record(
        session,
        actor=actor,
        action="model.stage",
        target=_label(version),
        before=before,
        after=audit.snapshot(version),
    )


def attach_bundle(
    session: Session,
    *,
    version: ModelVersion,
    bundle_file: Path,
    repository: OtaRepository,
    actor: str,
) -> Bundle:
    """Verify ``bundle_file`` is this version's, sign it into ``repository``, record it."""
    try:
        manifest = verify_bundle(bundle_file)
    except OtaError as e:
        raise RequestError(f"the uploaded bundle is not valid: {e}") from e
    if (manifest.model.name, manifest.model.version) != (version.name, version.version):
        raise RequestError(
            f"the bundle was compiled from {manifest.model.name} {manifest.model.version}, "
            f"not {version.name} {version.version}: attach it to that version"
        )
    reference = read_reference(bundle_file)
    path = target_path_for(manifest)
    existing = session.exec(select(Bundle).where(Bundle.target_path == path)).first()
    try:
        target = repository.add_bundle(bundle_file)
    except OtaError as e:
        raise ConflictError(str(e)) from e
    if existing is not None:
        return existing
    bundle = Bundle(
        model_version_id=version.id or 0,
        profile=manifest.profile,
        runtime=manifest.runtime,
        precision=manifest.precision,
        version=manifest.version,
        version_number=manifest.version_number,
        target_path=path,
        sha256=target.hashes["sha256"],
        length=target.length,
        bundle_name=f"{manifest.name}-{manifest.version}",
        drift_reference=reference,
    )
    session.add(bundle)
    session.flush()
    audit.record(
        session, actor=actor, action="bundle.attach", target=path, after=audit.snapshot(bundle)
    )
    return bundle


def get_bundle(session: Session, bundle_id: int) -> Bundle:
    bundle = session.get(Bundle, bundle_id)
    if bundle is None:
        raise NotFoundError(f"no bundle with id {bundle_id}")
    return bundle


def public_version(session: Session, version: ModelVersion) -> ModelVersionPublic:
    bundles = session.exec(select(Bundle).where(Bundle.model_version_id == version.id)).all()
    return ModelVersionPublic.model_validate(
        version, update={"bundles": [BundlePublic.model_validate(b) for b in bundles]}
    )


def cloud_model(
    session: Session, *, name: str, repository: OtaRepository, cache_dir: Path
) -> CloudModel | None:
    """The production version of ``name`` as an ONNX file, from its ONNX Runtime bundle.

    The cloud endpoint serves what devices run: the fp32 ONNX Runtime bundle of the
    production version (any profile), unpacked once into ``cache_dir``.
    """
    production = list_versions(session, name=name, stage=Stage.PRODUCTION)
    if not production:
        return None
    version = production[-1]
    bundles = session.exec(
        select(Bundle).where(Bundle.model_version_id == version.id, Bundle.runtime == "onnxruntime")
    ).all()
    if not bundles:
        return None
    # Rows attached before fp32 was called fp32 in manifests say LEGACY_FP32.
    fp32 = ("fp32", LEGACY_FP32)
    bundle = min(bundles, key=lambda b: (b.precision not in fp32, b.id or 0))
    unpacked = cache_dir / bundle.sha256
    if not unpacked.is_dir():
        source = repository.targets_dir / bundle.target_path.rpartition("/")[0]
        source = source / f"{bundle.sha256}.{bundle.target_path.rpartition('/')[2]}"
        partial = cache_dir / f".{bundle.sha256}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        manifest = extract_bundle(source, partial)
        (partial / ".artifact").write_text(manifest.artifact)
        partial.rename(unpacked)
    artifact = (unpacked / ".artifact").read_text()
    return CloudModel(name=name, version=version.version, onnx_path=unpacked / artifact)


def _label(version: ModelVersion) -> str:
    return f"model:{version.name}:{version.version}"
