"""Bundles from compile output: deterministic bytes, a validated manifest, golden vectors."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.runtimes import load_runtime
from ota.archive import extract_bundle, read_manifest, verify_bundle
from ota.bundle import bundle_compile_output, version_number_for
from ota.errors import BundleError, BundleIntegrityError, ManifestError
from ota.manifest import parse_manifest
from tests.utils.reports import as_schema_2


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_same_compile_output_gives_the_same_bytes(
    compiled_digits: Path, tmp_path: Path
) -> None:
    first = tmp_path / "a.efb"
    second = tmp_path / "b.efb"
    for out in (first, second):
        bundle_compile_output(
            compiled_digits, version="1.2.3", out=out, artifact_id="onnxruntime:fp32"
        )
    assert _sha256(first) == _sha256(second)
    manifest = verify_bundle(first)
    assert manifest.version_number == 1_002_003
    assert manifest.runtime == "onnxruntime" and manifest.profile == "host"
    listed = {f.path: f for f in manifest.files}
    assert set(listed) == {
        "onnxruntime-fp32.onnx",
        "onnxruntime-fp32.golden.npz",
        "report.json",
        "MODEL_CARD.md",
        "drift-reference.json",
    }
    artifact = compiled_digits / "onnxruntime-fp32.onnx"
    assert listed["onnxruntime-fp32.onnx"].sha256 == _sha256(artifact)
    assert listed["onnxruntime-fp32.onnx"].size == artifact.stat().st_size


def test_golden_vectors_hold_for_the_bundled_artifact_and_fail_for_another(
    compiled_digits: Path, tmp_path: Path
) -> None:
    """What the agent's health check relies on: expected outputs within the tolerance."""
    bundle_compile_output(
        compiled_digits, version="1.0.0", out=tmp_path / "b.efb", artifact_id="tvm:fp32"
    )
    manifest = extract_bundle(tmp_path / "b.efb", tmp_path / "x")
    golden = manifest.golden_vectors
    arrays = np.load(tmp_path / "x" / golden.path)
    inputs = {k.removeprefix("input:"): v for k, v in arrays.items() if k.startswith("input:")}
    expected = arrays["output:0"]
    assert golden.count == len(expected) >= 1 and golden.top1

    runtime = load_runtime(manifest.runtime, tmp_path / "x" / manifest.artifact)
    got = runtime.predict_batch(inputs)[0]
    assert np.all(np.abs(got - expected) <= golden.atol + golden.rtol * np.abs(expected))
    assert (got.argmax(1) == expected.argmax(1)).all()
    # A different model (inputs reversed in the batch) must not pass the same check.
    wrong = runtime.predict_batch({k: v[::-1] for k, v in inputs.items()})[0]
    assert not np.all(np.abs(wrong - expected) <= golden.atol + golden.rtol * np.abs(expected))


def test_a_tampered_artifact_is_named(compiled_digits: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b.efb"
    bundle_compile_output(
        compiled_digits, version="1.0.0", out=bundle, artifact_id="onnxruntime:fp32"
    )
    data = bytearray(bundle.read_bytes())
    offset = data.find(b"onnxruntime-fp32.onnx", 2048) + 4096  # inside that file's bytes
    data[offset] ^= 0x01
    bundle.write_bytes(bytes(data))
    read_manifest(bundle)  # the manifest itself is intact
    with pytest.raises(BundleIntegrityError, match=r"onnxruntime-fp32.onnx.*altered"):
        verify_bundle(bundle)
    with pytest.raises(BundleIntegrityError):
        extract_bundle(bundle, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b.efb"]


def test_bundling_asks_which_artifact_when_none_was_selected(
    compiled_digits: Path, tmp_path: Path
) -> None:
    with pytest.raises(BundleError, match=r"onnxruntime:fp32.*tvm:fp32|--artifact"):
        bundle_compile_output(compiled_digits, version="1.0.0", out=tmp_path / "b.efb")
    with pytest.raises(BundleError, match="no artifact 'litert:int8'"):
        bundle_compile_output(
            compiled_digits, version="1.0.0", out=tmp_path / "b.efb", artifact_id="litert:int8"
        )
    with pytest.raises(BundleError, match=r"no report\.json"):
        bundle_compile_output(tmp_path, version="1.0.0", out=tmp_path / "b.efb")
    assert not (tmp_path / "b.efb").exists()


def test_a_compile_output_without_golden_vectors_is_refused(
    compiled_digits: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old-compile"
    shutil.copytree(compiled_digits, old)
    report = json.loads((old / "report.json").read_text())
    for artifact in report["artifacts"]:
        del artifact["golden"]
    (old / "report.json").write_text(json.dumps(report))
    with pytest.raises(BundleError, match="golden vectors"):
        bundle_compile_output(
            old, version="1.0.0", out=tmp_path / "b.efb", artifact_id="onnxruntime:fp32"
        )


def test_version_numbers_grow_with_releases_and_prereleases_need_one() -> None:
    releases = ["0.9.9", "0.10.0", "1.0.0", "1.0.1", "1.1.0", "2.0.0"]
    numbers = [version_number_for(v) for v in releases]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    with pytest.raises(ValueError, match="--version-number"):
        version_number_for("1.2.0-rc.1")
    with pytest.raises(ValueError, match="not a semantic version"):
        version_number_for("v1.2")


def test_manifest_errors_name_the_field(compiled_digits: Path, tmp_path: Path) -> None:
    bundle_compile_output(
        compiled_digits, version="1.0.0", out=tmp_path / "b.efb", artifact_id="onnxruntime:fp32"
    )
    good = json.loads(read_manifest(tmp_path / "b.efb").to_json())
    cases = {
        "version": ("one", "version"),
        "version_number": (0, "version_number"),
        "runtime": ("pytorch", "runtime"),
        "created": ("2026-01-01T00:00:00", "timezone"),
        "precision": ("fp64", "precision"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ManifestError, match=message):
            parse_manifest(json.dumps(good | {key: value}).encode())
    files = [dict(good["files"][0], path="../../etc/passwd"), *good["files"][1:]]
    with pytest.raises(ManifestError, match=r"files\.0\.path"):
        parse_manifest(json.dumps(good | {"files": files}).encode())
    missing_artifact = dict(good, artifact="elsewhere.onnx")
    with pytest.raises(ManifestError, match=r"artifact 'elsewhere\.onnx' is not in files"):
        parse_manifest(json.dumps(missing_artifact).encode())
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"{")


def test_a_manifest_from_before_fp32_was_named_reads_as_fp32(
    compiled_digits: Path, tmp_path: Path
) -> None:
    """Devices keep running bundles made when fp32 was written ``none``."""
    manifest = bundle_compile_output(
        compiled_digits, version="1.0.0", out=tmp_path / "b.efb", artifact_id="tvm:fp32"
    )
    assert manifest.precision == "fp32"
    old = json.loads(manifest.to_json()) | {"precision": "none"}
    assert parse_manifest(json.dumps(old).encode()) == manifest


def _typo_in_an_artifact(report: dict[str, Any]) -> None:
    report["artifacts"][0]["sha265"] = report["artifacts"][0].pop("sha256")


def _next_schema(report: dict[str, Any]) -> None:
    report["schema"] = "edgefleet.compile-report/4"


def _selected_is_not_shipped(report: dict[str, Any]) -> None:
    report["selected"] = "litert:int8"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            _typo_in_an_artifact,
            "report.json is not a valid compile report: artifacts.0.sha256: Field required; "
            "artifacts.0.sha265: unknown key (a typo?)",
            id="typo",
        ),
        pytest.param(
            _next_schema,
            "report.json has schema 'edgefleet.compile-report/4'; this release reads schemas "
            "'edgefleet.compile-report/1', 'edgefleet.compile-report/2' and "
            "'edgefleet.compile-report/3': compile the model again with this release",
            id="schema-version",
        ),
        pytest.param(
            _selected_is_not_shipped,
            "selected names 'litert:int8', which is not a shipped artifact; the artifacts are "
            "['onnxruntime:fp32', 'litert:fp32', 'tvm:fp32']",
            id="selected-missing",
        ),
    ],
)
def test_ota_bundle_refuses_a_report_that_breaks_the_contract(
    compiled_digits: Path,
    tmp_path: Path,
    edit: Callable[[dict[str, Any]], None],
    expected: str,
) -> None:
    directory = tmp_path / "compiled"
    shutil.copytree(compiled_digits, directory)
    report = json.loads((directory / "report.json").read_text())
    edit(report)
    (directory / "report.json").write_text(json.dumps(report, indent=2))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "edgefleet"), "ota", "bundle", str(directory),
         "--version", "1.0.0", "--artifact", "onnxruntime:fp32", "--out", "b.efb"],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    message = " ".join(result.stderr.split())
    assert message.startswith(f"error: {directory}: cannot bundle this compile output: ")
    assert expected in message
    assert not (tmp_path / "b.efb").exists()


def _as_schema_1(report: dict[str, Any]) -> None:
    """What a compile of the release before ``validated_on`` wrote."""
    as_schema_2(report)
    report["schema"] = "edgefleet.compile-report/1"
    for record in (*report["artifacts"], *report["candidates"]):
        del record["validated_on"]


def test_ota_bundle_reads_reports_of_every_schema(compiled_digits: Path, tmp_path: Path) -> None:
    directory = tmp_path / "compiled"
    shutil.copytree(compiled_digits, directory)
    current = json.loads((directory / "report.json").read_text())
    assert current["schema"] == "edgefleet.compile-report/3"
    assert current["artifacts"][0]["validated_on"]["kind"] == "build-machine"
    older, oldest = json.loads(json.dumps(current)), json.loads(json.dumps(current))
    as_schema_2(older)
    _as_schema_1(oldest)
    for version, report in (("1.0.0", current), ("1.0.1", older), ("1.0.2", oldest)):
        (directory / "report.json").write_text(json.dumps(report, indent=2))
        result = subprocess.run(
            [str(Path(sys.executable).parent / "edgefleet"), "ota", "bundle", str(directory),
             "--version", version, "--artifact", "onnxruntime:fp32", "--out", f"{version}.efb"],
            cwd=tmp_path, capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert read_manifest(tmp_path / f"{version}.efb").precision == "fp32"
