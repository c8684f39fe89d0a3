"""Pack a compile output directory into a bundle: one artifact, its golden vectors, the report.

``edgefleet compile`` leaves ``report.json`` and every artifact that passed the accuracy
gate in its output directory; a bundle ships one of them (the one ``--select`` marked,
the only one, or the one named), ready for one runtime on one hardware profile. The
drift reference (``drift-reference.json``, ``contracts/drift.py``) goes with it when the
compile made one, checked first, and listed with its hash like every other file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from contracts.drift import DRIFT_REFERENCE_FILE, ReferenceProfile
from contracts.errors import DriftError, ReportError
from contracts.report import REPORT_NAME, Artifact, CompileReport, parse_report

from .archive import write_bundle
from .errors import BundleError
from .manifest import BundleFile, Manifest, ModelInfo, parse_semver

__all__ = ["MIN_AGENT_VERSION", "bundle_compile_output", "version_number_for"]

# The first agent release that reads schema edgefleet.bundle/1.
MIN_AGENT_VERSION = "0.1.0"


def version_number_for(version: str) -> int:
    """The anti-rollback integer for a plain release: MAJOR*10^6 + MINOR*10^3 + PATCH.

    It grows with every release as long as minor and patch stay below 1000. Pre-releases
    (``1.2.0-rc.1``) have no place in that order: give them ``--version-number``.
    """
    major, minor, patch, prerelease = parse_semver(version)
    if prerelease or minor >= 1000 or patch >= 1000 or major >= 1_000_000:
        raise ValueError(
            f"cannot derive an anti-rollback number from {version!r}: pass --version-number N "
            "(an integer larger than the one of every bundle already released)"
        )
    return major * 1_000_000 + minor * 1_000 + patch


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _load_report(directory: Path) -> CompileReport:
    report_path = directory / REPORT_NAME
    try:
        data = report_path.read_bytes()
    except FileNotFoundError:
        raise BundleError(
            f"{directory} has no {REPORT_NAME}: pass the output directory of `edgefleet compile`"
        ) from None
    except OSError as e:
        raise BundleError(f"cannot read {report_path}: {e.strerror}") from None
    try:
        return parse_report(data)
    except ReportError as e:
        raise BundleError(f"{directory}: cannot bundle this compile output: {e}") from None


def _check_drift_reference(path: Path) -> None:
    """Refuse to sign a drift reference the agent would refuse."""
    try:
        ReferenceProfile.from_json_bytes(path.read_bytes())
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror}") from None
    except DriftError as e:
        raise BundleError(f"{path}: {e}; compile again to make a new one") from None


def _choose_artifact(report: CompileReport, wanted: str | None, directory: Path) -> Artifact:
    ids = [a.id for a in report.artifacts]
    if not ids:
        raise BundleError(f"{directory}: the compile published no artifact (every one failed)")
    if wanted is not None:
        chosen = report.artifact(wanted)
        if chosen is None:
            raise BundleError(f"{directory} has no artifact {wanted!r}; it has {sorted(ids)}")
        return chosen
    if report.selected is not None:
        selected = report.artifact(report.selected)
        assert selected is not None  # parse_report checked the reference
        return selected
    if len(ids) == 1:
        return report.artifacts[0]
    raise BundleError(
        f"{directory} holds {len(ids)} artifacts and none was selected: pass --artifact "
        f"with one of {sorted(ids)} (or compile with --select fastest)"
    )


def bundle_compile_output(
    directory: Path,
    *,
    version: str,
    out: Path,
    version_number: int | None = None,
    artifact_id: str | None = None,
    name: str | None = None,
    model_version: str | None = None,
    min_agent_version: str = MIN_AGENT_VERSION,
) -> Manifest:
    """Write the bundle for one artifact of ``directory`` to ``out`` and return its manifest.

    The creation time is the compile's, so the same directory and options give the same
    bytes.
    """
    report = _load_report(directory)
    chosen = _choose_artifact(report, artifact_id, directory)
    golden = chosen.golden
    if golden is None:
        raise BundleError(
            f"{directory}: artifact {chosen.id} has no golden vectors (compiled without the "
            "golden step?): compile again, the agent's health check needs them"
        )
    paths = [*chosen.files().values(), REPORT_NAME]
    if (directory / "MODEL_CARD.md").exists():
        paths.append("MODEL_CARD.md")
    if (directory / DRIFT_REFERENCE_FILE).exists():
        _check_drift_reference(directory / DRIFT_REFERENCE_FILE)
        paths.append(DRIFT_REFERENCE_FILE)
    sources = {p: directory / p for p in paths}
    for path, source in sources.items():
        if not source.is_file():
            raise BundleError(f"{directory}: {path} is listed in {REPORT_NAME} but missing")
    model_name = Path(report.source.path).stem
    try:
        manifest = Manifest(
            name=name or f"{model_name}-{report.profile}",
            version=version,
            version_number=version_number or version_number_for(version),
            model=ModelInfo(name=model_name, version=model_version or version),
            profile=report.profile,
            runtime=chosen.runtime,
            precision=chosen.precision,
            device=chosen.device,
            artifact=chosen.path,
            artifact_metadata=chosen.metadata_path,
            files=[
                BundleFile(path=p, sha256=_sha256(s), size=s.stat().st_size)
                for p, s in sorted(sources.items())
            ],
            min_agent_version=min_agent_version,
            created=report.created,
            golden_vectors=golden,
        )
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise BundleError(f"cannot bundle {directory}: {e}") from None
    write_bundle(manifest, sources, out)
    return manifest
