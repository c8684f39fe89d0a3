"""TVM builds linked with a profile's toolchain: an AArch64 ELF for rpi4, a runnable host module."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm.relax.frontend.onnx import from_onnx

from compiler import ToolchainError, export_library, tvm_target
from hw_profiles import load_profile

EM_AARCH64 = 183
EM_X86_64 = 62
ET_DYN = 3


@pytest.fixture(scope="module")
def mlp() -> tuple[onnx.ModelProto, np.ndarray]:
    """relu(x @ w): small enough to build in a second, real enough to run."""
    weights = np.random.default_rng(0).standard_normal((8, 4)).astype("float32")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weights, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights


def _elf_header(path: Path) -> tuple[bytes, int, int, int, int]:
    """(magic, class, data encoding, e_type, e_machine) of an ELF file."""
    head = path.read_bytes()[:20]
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    return head[:4], head[4], head[5], e_type, e_machine


def test_rpi4_build_is_an_aarch64_shared_object(
    mlp: tuple[onnx.ModelProto, np.ndarray], tmp_path: Path
) -> None:
    profile = load_profile("rpi4")
    executable = tvm.compile(from_onnx(mlp[0]), target=tvm_target(profile))
    library = export_library(executable, tmp_path / "model.so", profile)
    magic, elf_class, encoding, e_type, e_machine = _elf_header(library)
    assert magic == b"\x7fELF"
    assert elf_class == 2  # 64-bit
    assert encoding == 1  # little-endian
    assert e_type == ET_DYN
    assert e_machine == EM_AARCH64


def test_host_build_runs_and_matches_numpy(
    mlp: tuple[onnx.ModelProto, np.ndarray], tmp_path: Path
) -> None:
    model, weights = mlp
    profile = load_profile("host")
    executable = tvm.compile(from_onnx(model), target=tvm_target(profile))
    library = export_library(executable, tmp_path / "model.so", profile)
    if profile.arch == "x86_64":
        assert _elf_header(library)[4] == EM_X86_64
    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    x = np.random.default_rng(1).standard_normal((1, 8)).astype("float32")
    np.testing.assert_allclose(
        vm["main"](tvm.runtime.tensor(x)).numpy(), np.maximum(x @ weights, 0), rtol=1e-5
    )


def test_a_missing_cross_compiler_says_what_to_install(
    write_profile, mlp: tuple[onnx.ModelProto, np.ndarray], tmp_path: Path
) -> None:
    write_profile(
        "nocc",
        lambda t: t.replace('cc = "aarch64-linux-gnu-gcc"', 'cc = "aarch64-edgefleet-missing-gcc"'),
    )
    profile = load_profile("nocc")
    executable = tvm.compile(from_onnx(mlp[0]), target=tvm_target(profile))
    with pytest.raises(ToolchainError) as caught:
        export_library(executable, tmp_path / "model.so", profile)
    assert "'aarch64-edgefleet-missing-gcc', which is not on PATH" in str(caught.value)
    assert "apt-get install -y gcc-aarch64-linux-gnu libc6-dev-arm64-cross" in str(caught.value)
    assert not (tmp_path / "model.so").exists()
