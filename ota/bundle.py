"""Pack a compile output directory into a bundle: one artifact, its golden vectors, the report.

``edgefleet compile`` leaves ``report.json`` and every artifact that passed the accuracy
gate in its output directory; a bundle ships one of them (the one ``--select`` marked,
the only one, or the one named), ready for one runtime on one hardware profile.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from .archive import write_bundle
from .errors import BundleError
from .manifest import BundleFile, GoldenVectors, Manifest, ModelInfo, parse_semver

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


def _load_report(directory: Path) -> dict[str, Any]:
    report_path = directory / "report.json"
    try:
        report = json.loads(report_path.read_text())
    except FileNotFoundError:
        raise BundleError(
            f"{directory} has no report.json: pass the output directory of `edgefleet compile`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{report_path} is not readable JSON: {e}") from None
    if not isinstance(report, dict) or not isinstance(report.get("artifacts"), list):
        raise BundleError(f"{report_path} is not a compile report (no 'artifacts' list)")
    return report


def _choose_artifact(report: dict[str, Any], wanted: str | None, directory: Path) -> dict[str, Any]:
    artifacts = {a["id"]: a for a in report["artifacts"]}
    if not artifacts:
        raise BundleError(f"{directory}: the compile published no artifact (every one failed)")
    if wanted is not None:
        if wanted not in artifacts:
            raise BundleError(f"{directory} has no artifact {wanted!r}; it has {sorted(artifacts)}")
        return artifacts[wanted]
    if report.get("selected"):
        return artifacts[report["selected"]]
    if len(artifacts) == 1:
        return next(iter(artifacts.values()))
    raise BundleError(
        f"{directory} holds {len(artifacts)} artifacts and none was selected: pass --artifact "
        f"with one of {sorted(artifacts)} (or compile with --select fastest)"
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
    golden = chosen.get("golden")
    if golden is None:
        raise BundleError(
            f"{directory}: artifact {chosen['id']} has no golden vectors (compiled before they "
            "existed?): compile again, the agent's health check needs them"
        )
    paths = [chosen["path"], golden["path"], "report.json"]
    if chosen.get("metadata_path"):
        paths.append(chosen["metadata_path"])
    if (directory / "MODEL_CARD.md").exists():
        paths.append("MODEL_CARD.md")
    sources = {p: directory / p for p in paths}
    for path, source in sources.items():
        if not source.is_file():
            raise BundleError(f"{directory}: {path} is listed in report.json but missing")
    model_name = Path(report["source"]["path"]).stem
    try:
        manifest = Manifest(
            name=name or f"{model_name}-{report['profile']}",
            version=version,
            version_number=version_number or version_number_for(version),
            model=ModelInfo(name=model_name, version=model_version or version),
            profile=report["profile"],
            runtime=chosen["runtime"],
            precision=chosen["precision"],
            device=chosen["device"],
            artifact=chosen["path"],
            artifact_metadata=chosen.get("metadata_path"),
            files=[
                BundleFile(path=p, sha256=_sha256(s), size=s.stat().st_size)
                for p, s in sorted(sources.items())
            ],
            min_agent_version=min_agent_version,
            created=dt.datetime.fromisoformat(report["created"]),
            golden_vectors=GoldenVectors(**golden),
        )
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise BundleError(f"cannot bundle {directory}: {e}") from None
    write_bundle(manifest, sources, out)
    return manifest
