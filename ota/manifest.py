"""``manifest.json``: what a bundle holds, validated on every read.

The manifest names the bundle and its two versions (a semantic version for people, an
integer ``version_number`` that only grows, for anti-rollback), the model, the hardware
profile and runtime, every file with its size and SHA-256, and the golden vectors the
agent's health check runs after an install. ``parse_manifest`` is the only way in from
bytes; anything malformed raises ``ManifestError`` with the field at fault.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contracts.artifacts import LEGACY_FP32, Device, Precision, RuntimeName
from contracts.ids import Name, Version
from contracts.report import GoldenVectors

from .errors import ManifestError

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "MAX_FILES",
    "MAX_FILE_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_PATH_BYTES",
    "BundleFile",
    "GoldenVectors",
    "Manifest",
    "ModelInfo",
    "check_member_path",
    "parse_manifest",
    "parse_semver",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "edgefleet.bundle/1"
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILES = 256
MAX_FILE_BYTES = 16 << 30
MAX_PATH_BYTES = 100

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def parse_semver(version: str) -> tuple[int, int, int, str]:
    """``(major, minor, patch, prerelease)`` of a semantic version; ``ValueError`` if not one."""
    match = _SEMVER.fullmatch(version)
    if match is None:
        raise ValueError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.4.0)")
    return int(match[1]), int(match[2]), int(match[3]), match[4] or ""


def check_member_path(path: str) -> str:
    """A file name inside a bundle: relative, POSIX, no ``..``, no empty or dot parts, and at
    most 100 bytes of UTF-8 so that every ustar header and every file system holds it."""
    if not path or len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ValueError(f"file path {path!r} must be 1 to {MAX_PATH_BYTES} bytes of UTF-8")
    if path.startswith("/") or "\\" in path or "\x00" in path:
        raise ValueError(f"file path {path!r} must be relative and use '/'")
    parts = PurePosixPath(path).parts
    if (
        not parts
        or any(part in ("", ".", "..") for part in parts)
        or str(PurePosixPath(path)) != path
    ):
        raise ValueError(f"file path {path!r} must not contain '.', '..' or empty parts")
    if path == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME} cannot list itself")
    return path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BundleFile(_Strict):
    path: str
    sha256: str
    size: Annotated[int, Field(ge=0, le=MAX_FILE_BYTES)]

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_member_path(value)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not _SHA256.fullmatch(value):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return value


class ModelInfo(_Strict):
    name: Name
    version: Version


class Manifest(_Strict):
    schema_: Literal["edgefleet.bundle/1"] = Field(alias="schema", default="edgefleet.bundle/1")
    name: Name
    version: Version
    version_number: Annotated[int, Field(ge=1, lt=1 << 53)]
    model: ModelInfo
    profile: Name
    runtime: RuntimeName
    precision: Precision
    device: Device
    artifact: str
    artifact_metadata: str | None = None
    files: Annotated[list[BundleFile], Field(min_length=1, max_length=MAX_FILES)]
    min_agent_version: str
    created: dt.datetime
    golden_vectors: GoldenVectors

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @field_validator("precision", mode="before")
    @classmethod
    def _legacy_fp32(cls, value: object) -> object:
        """Bundles made before fp32 had its name say ``none``; devices still run them."""
        return "fp32" if value == LEGACY_FP32 else value

    @field_validator("version", "min_agent_version")
    @classmethod
    def _semver(cls, value: str) -> str:
        parse_semver(value)
        return value

    @field_validator("created", mode="before")
    @classmethod
    def _created(cls, value: object) -> object:
        """JSON has no datetime: accept an ISO 8601 string with a timezone."""
        if isinstance(value, str):
            try:
                parsed = dt.datetime.fromisoformat(value)
            except ValueError as e:
                raise ValueError(f"not an ISO 8601 time: {e}") from e
            if parsed.tzinfo is None:
                raise ValueError("must carry a timezone (e.g. +00:00)")
            return parsed
        return value

    @model_validator(mode="after")
    def _references(self) -> Manifest:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("files lists a path twice")
        directories = {str(parent) for p in paths for parent in PurePosixPath(p).parents}
        clashes = sorted(directories.intersection(paths))
        if clashes:
            raise ValueError(f"{clashes[0]!r} is listed as a file and used as a directory")
        for field_name, path in (
            ("artifact", self.artifact),
            ("artifact_metadata", self.artifact_metadata),
            ("golden_vectors.path", self.golden_vectors.path),
        ):
            if path is not None and path not in paths:
                raise ValueError(f"{field_name} {path!r} is not in files")
        return self

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, no whitespace variation, so bundles are reproducible."""
        data = self.model_dump(mode="json", by_alias=True)
        return (json.dumps(data, sort_keys=True, indent=1) + "\n").encode()


def parse_manifest(data: bytes) -> Manifest:
    """Validate manifest bytes; ``ManifestError`` names the first fields at fault."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{MANIFEST_NAME} is {len(data)} bytes, more than the 1 MiB allowed")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, 4300+ digit integers
        raise ManifestError(f"{MANIFEST_NAME} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{MANIFEST_NAME} must hold a JSON object, not {type(raw).__name__}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in e.errors()[:5]
        )
        raise ManifestError(f"{MANIFEST_NAME} is not a valid bundle manifest: {problems}") from None
