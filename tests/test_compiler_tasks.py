"""Compiles of models the digits suite never sees: each task judged by its own metrics, int8
that searches its way past the gate, and candidates that fail without ending the compile.

The models are built here (``tests/utils/task_models.py``); real ONNX Runtime quantization
and, where a test says so, real TVM builds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from compiler.errors import AccuracyGateError, DataError, StepError
from compiler.pipeline import DEFAULT_PIPELINE, CompileOptions, compile_model
from contracts.drift import DRIFT_REFERENCE_FILE, OUTPUT_NORM, ReferenceProfile
from contracts.report import AccuracyGate, CompileReport, parse_report
from hw_profiles import Profile, load_profile
from tests.utils import task_models

WITHOUT_TVM = tuple(step for step in DEFAULT_PIPELINE if step != "build")
"""These tests judge the gate; TVM builds are the failure test's business."""


def _onnxruntime_only() -> Profile:
    """This machine's profile with ONNX Runtime alone: the gate and the int8 search are what
    these tests judge, and LiteRT and TVM have tests of their own below."""
    host = load_profile("host")
    return host.model_copy(
        update={"runtimes": [r for r in host.runtimes if r.name == "onnxruntime"]}
    )


LENIENT = {
    "min_top1_agreement": 0.0,
    "max_accuracy_drop": 1.0,
    "min_cosine_similarity": -1.0,
    "max_relative_error": 1e9,
    "min_box_iou": 0.0,
    "max_score_error": 1e9,
}
STRICT = {  # what no int8 model meets
    "min_top1_agreement": 1.0,
    "max_accuracy_drop": 0.0,
    "min_cosine_similarity": 1.0,
    "max_relative_error": 1e-12,
    "min_box_iou": 1.0,
    "max_score_error": 0.0,
}
OWN_THRESHOLDS = {
    "classification": ("min_top1_agreement", "max_accuracy_drop"),
    "embedding": ("min_cosine_similarity",),
    "regression": ("max_relative_error",),
    "detection": ("min_box_iou", "max_score_error"),
}


def _compile(
    model: Path,
    out: Path,
    *,
    pipeline: tuple[str, ...] = WITHOUT_TVM,
    profile: Profile | None = None,
    **options: Any,
) -> CompileReport:
    return compile_model(
        CompileOptions(
            model=model,
            profile=profile or _onnxruntime_only(),
            out_dir=out,
            calibration=model.with_suffix(".npz"),
            latency_runs=3,
            **options,
        ),
        pipeline=pipeline,
    )


def _gate(task: str, own: dict[str, float], others: dict[str, float]) -> AccuracyGate:
    mine = OWN_THRESHOLDS[task]
    values = {k: (own[k] if k in mine else others[k]) for k in LENIENT}
    return AccuracyGate.model_validate(values)


TASK_MODELS: list[tuple[Callable[[Path], Path], str, list[str], str]] = [
    (task_models.classifier, "classification", ["scores"], "sums to 1"),
    (task_models.embedder, "embedding", ["embedding"], "not probabilities"),
    (task_models.regressor, "regression", ["values"], "not rows of scores"),
    (task_models.detector_head, "detection", ["boxes", "box_scores"], "holds boxes"),
]


@pytest.mark.parametrize(("build", "task", "roles", "evidence"), TASK_MODELS)
def test_each_task_is_inferred_and_judged_by_its_own_metrics_only(
    build: Callable[[Path], Path], task: str, roles: list[str], evidence: str, tmp_path: Path
) -> None:
    model = build(tmp_path)
    # Every other task's thresholds are out of reach: a model judged by them would fail.
    report = _compile(model, tmp_path / "out", quantize="int8", gate=_gate(task, LENIENT, STRICT))
    assert report.task is not None and report.task.task == task and not report.task.declared
    assert evidence in report.task.reason
    assert any(f"judged as {task}: " in note for note in report.notes)
    (candidate,) = report.candidates
    assert candidate.passed and candidate.accuracy is not None
    assert [o.role for o in candidate.accuracy.outputs] == roles
    assert [o.name for o in candidate.accuracy.outputs] == [o.name for o in onnx_outputs(model)]
    on_disk = parse_report((tmp_path / "out" / "report.json").read_bytes())
    assert on_disk.task == report.task
    # The drift reference the bundle ships: each of the 16 input features, and the outputs
    # as a class histogram for a classifier, as a norm otherwise (contracts/drift.py).
    drift = ReferenceProfile.from_json_bytes((tmp_path / "out" / DRIFT_REFERENCE_FILE).read_bytes())
    assert drift.samples == 48  # the half of the calibration data kept for validation
    assert [f.name for f in drift.features if f.name != OUTPUT_NORM] == [
        f"x:{i}" for i in range(16)
    ]
    assert (drift.classes is not None) == (task == "classification")
    assert (OUTPUT_NORM in [f.name for f in drift.features]) == (task != "classification")
    if drift.classes is not None:
        assert len(drift.classes) == 5 and max(drift.classes) < 1


def test_an_output_with_its_drift_reference_is_an_earlier_output_a_compile_replaces(
    tmp_path: Path,
) -> None:
    model = task_models.classifier(tmp_path)
    _compile(model, tmp_path / "out", quantize="fp32")
    first = (tmp_path / "out" / DRIFT_REFERENCE_FILE).read_bytes()
    _compile(model, tmp_path / "out", quantize="fp32")  # not refused as someone else's files
    assert (tmp_path / "out" / DRIFT_REFERENCE_FILE).read_bytes() == first


@pytest.mark.parametrize(("build", "task", "roles", "evidence"), TASK_MODELS[1:])
def test_each_tasks_own_threshold_is_the_one_that_refuses(
    build: Callable[[Path], Path], task: str, roles: list[str], evidence: str, tmp_path: Path
) -> None:
    model = build(tmp_path)
    with pytest.raises(AccuracyGateError) as caught:
        _compile(model, tmp_path / "out", quantize="int8", gate=_gate(task, STRICT, LENIENT))
    metrics = {"embedding": "cosine_similarity", "regression": "relative_error"}
    expected = metrics.get(task, "box_iou")
    assert f"{expected} " in str(caught.value) and "top1_agreement" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def onnx_outputs(model: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(model)).graph.output)


def test_a_declared_task_overrides_the_evidence(tmp_path: Path) -> None:
    model = task_models.embedder(tmp_path)
    report = _compile(model, tmp_path / "out", quantize="int8", task="regression")
    assert report.task is not None and report.task.declared and report.task.task == "regression"
    assert report.candidates[0].accuracy is not None
    assert report.candidates[0].accuracy.metric == "relative_error"


def test_detection_declared_for_a_model_without_boxes_is_refused(tmp_path: Path) -> None:
    model = task_models.classifier(tmp_path)
    with pytest.raises(DataError, match=r"--task detection needs an output of boxes"):
        _compile(model, tmp_path / "out", task="detection")


def test_int8_that_misses_the_gate_keeps_the_sensitive_operators_in_float(
    tmp_path: Path,
) -> None:
    model = task_models.outlier_classifier(tmp_path)
    with pytest.raises(AccuracyGateError, match="top1_agreement"):
        _compile(model, tmp_path / "refused", quantize="int8", accuracy_search=False)
    report = _compile(model, tmp_path / "out", quantize="int8")
    (candidate,) = report.candidates
    search = candidate.accuracy_search
    assert candidate.passed and search is not None and search.outcome == "passed"
    assert sorted(search.kept_in_float) == ["head", "outlier"]  # the two that share the tensor
    assert list(search.sensitivity)[:2] == search.kept_in_float
    assert [s.passed for s in search.steps] == [False, True]
    assert search.size_bytes_before > 0 and search.size_bytes_after > 0
    assert search.p50_ms_before is not None and search.p50_ms_after is not None
    import onnx

    shipped = onnx.load(str(tmp_path / "out" / "onnxruntime-int8.onnx"))
    weights = {n.name: n.input[1] for n in shipped.graph.node if n.op_type == "Gemm"}
    assert weights == {  # int8 weights where they do no harm, float ones where they did
        "embed": "w0_DequantizeLinear_Output",
        "outlier": "w1",
        "head": "w2",
    }
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "int8 accuracy search for `onnxruntime:int8`: passed" in card


def test_int8_that_nothing_repairs_ends_with_a_clear_refusal(tmp_path: Path) -> None:
    model = task_models.outlier_input_classifier(tmp_path)
    with pytest.raises(AccuracyGateError) as caught:
        _compile(model, tmp_path / "out", quantize="int8")
    message = str(caught.value)
    assert "int8 refused after the accuracy search" in message
    assert "its one quantized operator (only)" in message and "leaves no int8" in message
    assert not (tmp_path / "out").exists()


def test_a_candidate_tvm_cannot_build_is_named_and_the_others_ship(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """TVM's mixed-precision pass rejects the depthwise-separable block: tvm:fp16 is skipped,
    the ONNX Runtime candidates and tvm:fp32 go on, and the fastest of them is selected."""
    model = task_models.depthwise_separable_cnn(tmp_path)
    host = load_profile("host")
    no_litert = host.model_copy(
        update={"runtimes": [r for r in host.runtimes if r.name != "litert"]}
    )
    report = _compile(
        model, tmp_path / "out", select="fastest", pipeline=DEFAULT_PIPELINE, profile=no_litert
    )
    (failure,) = report.failed
    assert (failure.id, failure.step) == ("tvm:fp16", "build")
    assert "ToMixedPrecision" in failure.cause and "\n" not in failure.cause
    assert "skipped tvm:fp16: build failed: " in capfd.readouterr().err
    ids = {c.id for c in report.candidates}
    assert "tvm:fp16" not in ids and {"onnxruntime:fp32", "tvm:fp32"} <= ids
    assert report.selected is not None and report.selected in {a.id for a in report.artifacts}
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["failed"][0]["id"] == "tvm:fp16"
    assert not (tmp_path / "out" / "tvm-fp16.so").exists()
    assert "`tvm:fp16` (build)" in (tmp_path / "out" / "MODEL_CARD.md").read_text()


def test_when_no_candidate_can_be_built_the_compile_says_why(tmp_path: Path) -> None:
    model = task_models.depthwise_separable_cnn(tmp_path)
    with pytest.raises(StepError, match=r"no candidate could be built and run.*tvm:fp16 \(build\)"):
        _compile(
            model,
            tmp_path / "out",
            quantize="fp16",
            pipeline=("import", "build"),
            profile=load_profile("host"),
        )
    assert not (tmp_path / "out").exists()


def test_the_digits_onnx_model_gets_litert_candidates_that_pass_the_gate(
    digits: Path, tmp_path: Path
) -> None:
    """ONNX to LiteRT through onnx2tf: fp32, fp16, dynamic-range and full-integer int8."""
    from agent.runtimes import load_runtime

    report = compile_model(
        CompileOptions(
            model=digits / "digits.onnx",
            profile=load_profile("host"),
            out_dir=tmp_path / "out",
            calibration=digits / "digits.npz",
            latency_runs=3,
            select="fastest",
        ),
        pipeline=WITHOUT_TVM,
    )
    litert = {c.id: c for c in report.candidates if c.id.startswith("litert:")}
    assert sorted(litert) == ["litert:fp16", "litert:fp32", "litert:int8", "litert:int8-dynamic"]
    assert all(c.passed for c in litert.values()), report.failed
    assert not [f for f in report.failed if f.id.startswith("litert:")]
    int8 = report.artifact("litert:int8")
    assert int8 is not None and int8.metadata_path == "litert-int8.json"
    import numpy as np

    data = np.load(digits / "digits.npz")
    runtime = load_runtime("litert", tmp_path / "out" / int8.path)
    name = next(k for k in data.files if k != "labels")
    scores = runtime.predict_batch({name: data[name][:64]})[0]
    assert np.mean(scores.argmax(1) == data["labels"][:64]) >= 0.9


def test_an_operator_onnx2tf_cannot_convert_is_named_and_the_others_ship(tmp_path: Path) -> None:
    model = task_models.contrib_op_regressor(tmp_path)
    report = _compile(model, tmp_path / "out", profile=load_profile("host"))
    (failure,) = report.failed
    assert (failure.id, failure.step) == ("litert:fp32", "convert")
    assert "FastGelu 'fast_gelu'" in failure.cause
    assert [c.id for c in report.candidates] == ["onnxruntime:fp32"]
    assert report.candidates[0].passed


def test_a_mul_and_add_after_a_conv_are_folded_into_it_before_onnx2tf(tmp_path: Path) -> None:
    """Exporters write Conv -> Mul -> Add for a batch norm (tf2onnx on Keras MobileNetV2),
    and onnx2tf stops at some such Mul; the model it is given has them folded, same outputs."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from compiler.onnx_to_tf import _folded

    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),  # depthwise, 4 channels
        "scale": rng.standard_normal((1, 4, 1, 1)).astype(np.float32),
        "shift": rng.standard_normal((1, 4, 1, 1)).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], group=4, pads=[1, 1, 1, 1]),
            helper.make_node("Mul", ["c", "scale"], ["m"]),
            helper.make_node("Add", ["m", "shift"], ["y"]),
        ],
        "bn_after_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source = tmp_path / "model.onnx"
    onnx.save(model, source)

    folded = _folded(source, tmp_path / "folded.onnx")
    assert folded == tmp_path / "folded.onnx"
    assert [n.op_type for n in onnx.load(folded).graph.node] == ["Conv"]
    x = {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    before, after = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, x)[0]
        for p in (source, folded)
    )
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_a_second_model_reuses_the_profiles_tuning_database_for_shared_layers(
    tmp_path: Path,
) -> None:
    """The classifier and the embedder share their first layer (16 -> 32, Gemm + Relu):
    the embedder is tuned only for the layer it does not share, and each model compiled
    again tunes nothing. Trial budgets are tiny: this checks bookkeeping, not speed."""
    from compiler.importers import import_model
    from compiler.tune import tune_model

    host = load_profile("host")
    cache, lines = tmp_path / "cache", []

    def tune(model: Path, trials: int) -> Any:
        source = import_model(model, tmp_path)
        return tune_model(
            model, host, inputs=source.inputs, trials=trials, cache_root=cache, echo=lines.append
        )

    first = tune(task_models.classifier(tmp_path), 3)  # one trial for each of its 3 tasks
    assert not first.reused and first.tasks == 3 and first.tasks_reused == 0
    assert first.trials == 3
    assert lines and all(" trials, fastest kernel " in line for line in lines)
    assert lines[-1].startswith("tuning: 3/3 trials") and "ETA" in lines[-1]
    records = (first.database / "database_tuning_record.json").read_text().splitlines()

    second = tune(task_models.embedder(tmp_path), 2)
    assert second.database == first.database  # one database per profile
    assert not second.reused and second.tasks == 2 and second.tasks_reused == 1
    assert second.trials == 1  # its share of the budget: 2 trials x 1 new task / 2 tasks
    after = (second.database / "database_tuning_record.json").read_text().splitlines()
    assert after[: len(records)] == records and len(after) > len(records)

    again = tune(task_models.classifier(tmp_path), 3)
    assert again.reused and again.trials == 0 and again.tasks_reused == again.tasks


def test_a_time_budget_spent_in_the_first_rounds_stops_the_tune_cleanly(tmp_path: Path) -> None:
    """A budget that runs out before every task had its first round: TVM's gradient
    scheduler would then pick a terminated task and stop on a check (the first end-to-end
    `--tune-time` run did); the tune ends with what it measured, and says it was timed."""
    from compiler.importers import import_model
    from compiler.tune import TIME_ONLY_TRIALS, tune_model

    model = task_models.classifier(tmp_path)
    result = tune_model(
        model,
        load_profile("host"),
        inputs=import_model(model, tmp_path).inputs,
        trials=TIME_ONLY_TRIALS,
        cache_root=tmp_path / "cache",
        time_budget_s=0.1,
    )
    assert 0 < result.trials < result.tasks * 8 and result.time_budget_s == 0.1
    assert result.records == result.trials


@pytest.mark.parametrize(
    ("text", "seconds"), [("20m", 1200.0), ("90s", 90.0), ("1.5h", 5400.0), ("45", 45.0)]
)
def test_a_tuning_time_budget_reads_minutes_seconds_and_hours(text: str, seconds: float) -> None:
    from compiler.tune import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "0m", "-5s", "infs"])
def test_a_tuning_time_budget_that_is_not_a_duration_is_refused(text: str) -> None:
    from compiler.tune import parse_duration

    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def test_an_untuned_tvm_build_far_behind_onnxruntime_is_never_selected(tmp_path: Path) -> None:
    from compiler.candidates import Candidate
    from compiler.pipeline import UNTUNED_SLOWDOWN_LIMIT, CompileContext, _select
    from contracts.report import Latency, ValidatedOn

    here = ValidatedOn(kind="build-machine", arch="x86_64", summary="here")
    options = CompileOptions(
        model=tmp_path / "m.onnx", profile=load_profile("host"), out_dir=tmp_path / "out",
        select="fastest",
    )  # fmt: skip
    ctx = CompileContext(options, tmp_path, tmp_path)
    ctx.reference_latency = Latency(p50=1.0, p95=1.0, runs=5, where="host")

    def candidate(runtime: Any, p50: float) -> Candidate:
        made = Candidate(runtime, "fp32", tmp_path / runtime, tmp_path / runtime, here)
        made.latency = Latency(p50=p50, p95=p50, runs=5, where="host")
        return made

    within = 0.9 * UNTUNED_SLOWDOWN_LIMIT  # slower than the reference, within the limit
    ctx.candidates = [candidate("tvm", within), candidate("onnxruntime", 2 * within)]
    assert _select(ctx)["selected"] == "tvm:fp32"
    ctx.candidates = [candidate("tvm", 0.1), candidate("onnxruntime", 1.0)]
    ctx.reference_latency = Latency(p50=0.01, p95=0.01, runs=5, where="host")  # tvm 10x slower
    detail = _select(ctx)
    assert detail["selected"] == "onnxruntime:fp32"
    assert "untuned, 10.0x slower" in detail["not_eligible"]["tvm:fp32"]
    assert any("not selected; tune it" in note for note in ctx.notes)
    ctx.candidates = [candidate("tvm", 0.1), candidate("onnxruntime", 1.0)]
    ctx.tuning_database = tmp_path  # tuned: judged by its latency alone
    assert _select(ctx)["selected"] == "tvm:fp32"


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--task", "segmentation"], "--task must be auto, classification, embedding"),
        (["--tune-time", "soon"], "expected a duration like 20m, 90s or 1h, got 'soon'"),
    ],
)
def test_compile_options_that_do_not_parse_are_one_error_line(
    option: list[str], expected: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from contracts.cli import EXIT_ERROR
    from edgefleet.cli import app

    model = task_models.classifier(tmp_path)
    result = CliRunner().invoke(
        app, ["compile", str(model), "--profile", "host", "--out", str(tmp_path / "o"), *option]
    )
    assert result.exit_code == EXIT_ERROR, result.output
    assert expected in " ".join(result.stderr.split())
    assert not (tmp_path / "o").exists()
