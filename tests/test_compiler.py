"""The compile pipeline end to end on the digits CNN: real ONNX Runtime, TVM and LiteRT."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from agent.errors import ModelLoadError
from agent.runtimes import LiteRTRuntime, OnnxRuntime, TvmRuntime, load_runtime
from compiler.errors import (
    AccuracyGateError,
    DataError,
    ModelImportError,
    StepError,
    UnsupportedTargetError,
)
from compiler.pipeline import CompileOptions, compile_model, register_step
from contracts.cli import EXIT_ERROR
from contracts.report import REPORT_SCHEMA, parse_report
from edgefleet.cli import app
from hw_profiles import load_profile

runner = CliRunner()
EM_AARCH64 = 183


def _compile(digits: Path, out: Path, model: str = "digits.onnx", **options: Any) -> dict[str, Any]:
    """The report as JSON types, as ``--json`` prints it and ``report.json`` holds it."""
    profile = load_profile(options.pop("profile", "host"))
    report = compile_model(
        CompileOptions(
            model=digits / model,
            profile=profile,
            out_dir=out,
            calibration=options.pop("calibration", digits / "digits.npz"),
            latency_runs=5,
            **options,
        )
    )
    return report.to_dict()


def _candidate(report: dict[str, Any], cid: str) -> dict[str, Any]:
    return next(c for c in report["candidates"] if c["id"] == cid)


def test_report_follows_the_contract(digits: Path, tmp_path: Path) -> None:
    report = _compile(digits, tmp_path / "out", quantize="int8")
    on_disk = (tmp_path / "out" / "report.json").read_bytes()
    assert json.loads(on_disk) == report
    parsed = parse_report(on_disk)  # the model reads back exactly what the compiler wrote
    assert parsed.to_json() == on_disk and parsed.to_dict() == report
    assert report["schema"] == REPORT_SCHEMA
    assert report["settings"]["quantize"] == "int8"
    assert report["profile"] == "host"
    assert len(report["source"]["sha256"]) == 64
    assert {a["runtime"] for a in report["artifacts"]} == {"onnxruntime", "litert", "tvm"}
    for artifact in report["artifacts"]:
        path = tmp_path / "out" / artifact["path"]
        assert path.stat().st_size == artifact["size_bytes"]
    assert set(report["latency_ms"]) >= {"reference_onnxruntime", "onnxruntime:int8", "tvm:fp32"}
    assert report["accuracy"]["metric"] == "top1_agreement"
    assert [s["name"] for s in report["steps"]] == [
        "import", "emulator", "prune", "quantize", "tune", "build", "validate", "drift",
        "measure", "select", "golden",
    ]  # fmt: skip
    here = {"kind": "build-machine", "arch": platform.machine(),
            "summary": f"the artifact itself on this {platform.machine()} machine"}  # fmt: skip
    assert all(c["validated_on"] == here for c in report["candidates"])
    for artifact in report["artifacts"]:  # the agent's health check reads these
        golden = artifact["golden"]
        assert (tmp_path / "out" / golden["path"]).exists() and golden["count"] == 4
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert report["source"]["sha256"] in card and "onnxruntime" in card


def test_static_int8_keeps_top1_accuracy_within_one_point(digits: Path, tmp_path: Path) -> None:
    report = _compile(digits, tmp_path / "out", model="digits.keras", quantize="int8")
    for cid in ("onnxruntime:int8", "litert:int8"):
        accuracy = _candidate(report, cid)["accuracy"]
        assert accuracy["reference_accuracy"] > 0.9
        assert accuracy["reference_accuracy"] - accuracy["accuracy"] <= 0.01, cid
    int8 = (tmp_path / "out" / "onnxruntime-int8.onnx").stat().st_size
    fp32 = (digits / "digits.onnx").stat().st_size
    assert int8 < 0.5 * fp32
    # LiteRT renames the input (serving_default_image:0, int8); its sidecar keeps the
    # model's name and type, so clients send the same tensor to every runtime.
    litert = next(a for a in report["artifacts"] if a["id"] == "litert:int8")
    assert litert["metadata_path"] == "litert-int8.json"
    runtime = LiteRTRuntime(tmp_path / "out" / "litert-int8.tflite")
    assert [(s.name, s.dtype) for s in runtime.inputs] == [("image", "float32")]
    images = np.load(digits / "digits.npz")["image"][:8]
    reference = OnnxRuntime(digits / "digits.onnx").predict_batch({"image": images})[0]
    assert (runtime.predict_batch({"image": images})[0].argmax(1) == reference.argmax(1)).all()
    sidecar = tmp_path / "out" / "litert-int8.json"
    sidecar.write_text(
        sidecar.read_text().replace(
            '"inputs": [', '"inputs": [{"name": "x", "shape": [1], "dtype": "float32"}, ', 1
        )
    )
    with pytest.raises(ModelLoadError, match="names 2 inputs and 1 outputs"):
        LiteRTRuntime(tmp_path / "out" / "litert-int8.tflite")


def test_every_candidate_runs_on_its_runtime_and_agrees_with_onnxruntime(
    digits: Path, tmp_path: Path
) -> None:
    report = _compile(digits, tmp_path / "out", model="digits.keras", select="fastest")
    data = np.load(digits / "digits.npz")
    sample = {"image": data["image"][:64]}
    reference = OnnxRuntime(digits / "digits.onnx").predict_batch(sample)[0]
    for artifact in report["artifacts"]:
        runtime = load_runtime(artifact["runtime"], tmp_path / "out" / artifact["path"])
        outputs = runtime.predict_batch(sample)[0]
        agreement = np.mean(outputs.argmax(1) == reference.argmax(1))
        assert agreement >= 0.97, artifact["id"]
        assert artifact["id"] == f"{artifact['runtime']}:{artifact['precision']}"
        if artifact["precision"] == "fp32":
            np.testing.assert_allclose(outputs, reference, atol=1e-3, err_msg=artifact["id"])


def test_select_fastest_marks_the_lowest_p50_that_passed(digits: Path, tmp_path: Path) -> None:
    report = _compile(digits, tmp_path / "out", model="digits.keras", select="fastest")
    ids = {c["id"] for c in report["candidates"]}
    assert {"onnxruntime:fp32", "onnxruntime:int8", "litert:int8", "tvm:fp32", "tvm:fp16"} <= ids
    timed = {
        c["id"]: c["latency_ms"]["p50"]
        for c in report["candidates"]
        if c["passed"] and c["latency_ms"]
    }
    # The report rounds p50 to 0.1 µs, so two candidates may tie there: any of the tied ones.
    assert timed[report["selected"]] == min(timed.values())
    assert [c["id"] for c in report["candidates"] if c["selected"]] == [report["selected"]]


@pytest.fixture(scope="module")
def tuned(
    digits: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path, Path]:
    """A host compile tuned with two trials: (report, cache directory, output directory)."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("tuned") / "out"
    return _compile(digits, out, tune_trials=2, cache_dir=cache), cache, out


def _step(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s["detail"] for s in report["steps"] if s["name"] == name)


def test_a_tuned_tvm_build_matches_onnxruntime(
    digits: Path, tuned: tuple[dict[str, Any], Path, Path]
) -> None:
    report, _, out = tuned
    tune = _step(report, "tune")
    assert tune["reused"] is False and tune["records"] >= 2
    assert _step(report, "build")["tvm:fp32"]["tuned"] is True
    sample = {"image": np.load(digits / "digits.npz")["image"][:32]}
    reference = OnnxRuntime(digits / "digits.onnx").predict_batch(sample)[0]
    tuned_output = TvmRuntime(out / "tvm-fp32.so").predict_batch(sample)[0]
    np.testing.assert_allclose(tuned_output, reference, atol=1e-4)


def test_a_second_compile_reuses_the_tuning_database(
    digits: Path, tuned: tuple[dict[str, Any], Path, Path], tmp_path: Path
) -> None:
    first, cache, _ = tuned
    database = Path(_step(first, "tune")["database"])
    records = (database / "database_tuning_record.json").read_text()
    again = _step(_compile(digits, tmp_path / "again", tune_trials=2, cache_dir=cache), "tune")
    assert again["reused"] is True
    assert Path(again["database"]) == database
    assert (database / "database_tuning_record.json").read_text() == records  # no new trials


def test_tuning_for_a_board_without_rpc_says_how(digits: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedTargetError, match="--rpc-tracker HOST:PORT"):
        _compile(digits, tmp_path / "out", profile="rpi4", tune_trials=2, cache_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_an_rpi4_build_without_an_emulated_board_is_validated_through_a_host_build(
    digits: Path, tmp_path: Path
) -> None:
    """With no arm64 userland in the cache (an empty one here), ``--emulation auto`` checks
    the portable artifacts themselves here and TVM through a twin, and says so; the emulated
    board is tests/test_board_arm64.py's."""
    report = _compile(
        digits, tmp_path / "out", profile="rpi4", quantize="int8", cache_dir=tmp_path / "cache"
    )
    library = tmp_path / "out" / "tvm-fp32.so"
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64
    assert json.loads(library.with_suffix(".json").read_text())["inputs"][0]["name"] == "image"
    tvm = _candidate(report, "tvm:fp32")
    assert tvm["accuracy"]["passed"] is True
    host = platform.machine()
    assert tvm["validated_on"] == {
        "kind": "host-build", "arch": host, "summary": f"host build of the same module ({host})"
    }  # fmt: skip
    assert _candidate(report, "onnxruntime:int8")["validated_on"]["kind"] == "build-machine"
    assert _step(report, "build")["tvm:fp32"]["validated_on"] == tvm["validated_on"]["summary"]
    assert "no aarch64 userland is built" in _step(report, "emulator")["skipped"]
    assert any("validated on this machine, not on aarch64" in note for note in report["notes"])
    assert "reference_onnxruntime" not in report["latency_ms"]
    assert any("latency not measured" in note for note in report["notes"])


def test_an_over_pruned_model_fails_the_gate_and_publishes_nothing(
    digits: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier compile")
    result = runner.invoke(
        app,
        ["compile", str(digits / "digits.onnx"), "--profile", "host", "--prune", "0.99",
         "--calibration", str(digits / "digits.npz"), "--out", str(out), "--force"],
    )  # fmt: skip
    assert result.exit_code == EXIT_ERROR
    message = " ".join(result.stderr.split())
    assert "accuracy gate failed" in message
    assert "top1_agreement" in message and "< threshold 0.9700" in message
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert not list(tmp_path.glob(".out.staging-*"))


def test_gate_thresholds_can_be_overridden(digits: Path, tmp_path: Path) -> None:
    with pytest.raises(AccuracyGateError, match="accuracy_drop"):
        _compile(
            digits,
            tmp_path / "out",
            prune=0.8,
            gate=load_profile("host").accuracy_gate.model_copy(
                update={"min_top1_agreement": 0.0, "max_accuracy_drop": 0.0}
            ),
        )


def test_a_corrupt_onnx_file_gives_a_clear_error(digits: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes((digits / "digits.onnx").read_bytes()[:300])
    result = runner.invoke(app, ["compile", str(corrupt), "--profile", "host"])
    assert result.exit_code == EXIT_ERROR
    assert str(corrupt) in result.stderr.replace("\n", "")
    assert "ONNX" in result.stderr
    with pytest.raises(ModelImportError):
        _compile(tmp_path, tmp_path / "out", model="corrupt.onnx", calibration=None)


def test_without_data_static_int8_is_refused_and_the_gate_skipped(
    digits: Path, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match="int8-dynamic"):
        _compile(digits, tmp_path / "a", quantize="int8", calibration=None)
    report = _compile(digits, tmp_path / "b", quantize="int8-dynamic", calibration=None)
    assert report["accuracy"] is None
    assert any("accuracy gate are skipped" in n for n in report["notes"])


def test_a_data_file_that_does_not_fit_the_model_is_named(digits: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((4, 8, 8, 1), "float32"))
    with pytest.raises(DataError, match="missing \\['image'\\], unexpected \\['pixels'\\]"):
        _compile(digits, tmp_path / "out", calibration=bad)
    np.savez(bad, image=np.zeros((4, 8, 8), "float32"))
    with pytest.raises(DataError, match=r"expected \(N, 8, 8, 1\)"):
        _compile(digits, tmp_path / "out", calibration=bad)


def test_steps_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_step("quantize")(lambda ctx: {})


def test_keep_float_leaves_the_named_operator_unquantized(digits: Path, tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(digits / "digits.onnx"))
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    report = _compile(digits, tmp_path / "out", quantize="int8", keep_float=(first_conv.name,))
    assert _step(report, "quantize")["onnxruntime:int8"]["kept_in_float"] == [first_conv.name]
    quantized = onnx.load(str(tmp_path / "out" / "onnxruntime-int8.onnx"))
    producers = {o: n for n in quantized.graph.node for o in n.output}
    conv = next(n for n in quantized.graph.node if n.name == first_conv.name)
    weight_producer = producers.get(conv.input[1])
    assert weight_producer is None or weight_producer.op_type != "DequantizeLinear"
    others = [n for n in quantized.graph.node if n.op_type == "Conv" and n.name != conv.name]
    assert producers[others[0].input[1]].op_type == "DequantizeLinear"
    with pytest.raises(StepError, match=r"not in the model as it is quantized.*MatMulAddFusion"):
        _compile(digits, tmp_path / "bad", quantize="int8", keep_float=("no-such-node",))


def test_json_output_is_only_the_report_even_when_tensorflow_prints(
    digits: Path, tmp_path: Path
) -> None:
    script = Path(sys.executable).parent / "edgefleet"
    result = subprocess.run(
        [str(script), "compile", str(digits / "digits.keras"), "--profile", "host",
         "--quantize", "int8", "--calibration", str(digits / "digits.npz"),
         "--out", str(tmp_path / "out"), "--json", "--latency-runs", "3"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())
    assert "litert:int8" in {a["id"] for a in report["artifacts"]}


def test_stdout_holds_only_what_edgefleet_prints(digits: Path, tmp_path: Path) -> None:
    """TensorFlow's start-up lines and the LiteRT converter's "Saved artifact at ..." go to
    stderr; stdout is the candidates table, the notes and where the output went."""
    script = Path(sys.executable).parent / "edgefleet"
    result = subprocess.run(
        [str(script), "compile", str(digits / "digits.keras"), "--profile", "host",
         "--calibration", str(digits / "digits.npz"), "--out", str(tmp_path / "out"),
         "--latency-runs", "3"],
        capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Saved artifact" in result.stderr  # the converter did talk...
    for noise in ("Saved artifact", "absl", "tensorflow", "WARNING", "I0000"):
        assert noise not in result.stdout, result.stdout  # ...but not on stdout
    assert "litert:fp32" in result.stdout and "report.json" in result.stdout


def test_a_corrupt_data_file_is_a_data_error(digits: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "data.npz"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        _compile(digits, tmp_path / "out", calibration=corrupt)


def test_quantize_none_is_a_deprecated_alias_of_fp32(digits: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["compile", str(digits / "digits.onnx"), "--profile", "host", "--quantize", "none",
         "--calibration", str(digits / "digits.npz"), "--out", str(tmp_path / "out"),
         "--latency-runs", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--quantize none is deprecated; use --quantize fp32" in " ".join(result.stderr.split())
    report = parse_report((tmp_path / "out" / "report.json").read_bytes())
    assert report.settings.quantize == "fp32"
    assert {a.id for a in report.artifacts} == {"onnxruntime:fp32", "litert:fp32", "tvm:fp32"}
    assert {a.precision for a in report.artifacts} == {"fp32"}
    wrong = runner.invoke(app, ["compile", str(digits / "digits.onnx"), "--profile", "host",
                                "--quantize", "int4"])  # fmt: skip
    assert wrong.exit_code == EXIT_ERROR
    assert "--quantize must be one of fp32, fp16, int8, int8-dynamic, got 'int4'" in " ".join(
        wrong.stderr.split()
    )
    with pytest.raises(ValueError, match="it is now called 'fp32'"):
        CompileOptions(
            model=digits / "digits.onnx",
            profile=load_profile("host"),
            out_dir=tmp_path / "api",
            **{"quantize": "none"},
        )
