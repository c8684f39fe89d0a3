"""Loading and validating hardware profiles, and turning them into real TVM targets."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path

import pytest

from compiler import UnsupportedTargetError, tvm_target
from hw_profiles import (
    InvalidProfileError,
    ProfileNotFoundError,
    list_profiles,
    load_profile,
    load_profile_file,
)
from hw_profiles.host import UnsupportedHostError, detect_host

from .conftest import SHIPPED_PROFILES


def test_the_six_profiles_ship() -> None:
    assert set(list_profiles()) == SHIPPED_PROFILES


@pytest.mark.parametrize("name", sorted(SHIPPED_PROFILES))
def test_every_shipped_profile_builds_real_tvm_targets(name: str) -> None:
    profile = load_profile(name)
    cpu = tvm_target(profile, "cpu")
    assert cpu.kind.name == "llvm"
    assert str(cpu.attrs["mtriple"]).startswith(profile.arch)
    if profile.targets.gpu is not None:
        gpu = tvm_target(profile, "gpu")
        assert gpu.kind.name == "cuda"
        assert gpu.attrs["arch"] == profile.targets.gpu["arch"]
        assert gpu.host is not None and gpu.host.attrs["mtriple"] == cpu.attrs["mtriple"]
    else:
        with pytest.raises(UnsupportedTargetError, match="has no GPU target"):
            tvm_target(profile, "gpu")


@pytest.mark.parametrize(
    ("name", "mcpu", "feature", "has_it"),
    [
        ("rpi4", "cortex-a72", "feature.has_dotprod", False),
        ("rpi5", "cortex-a76", "feature.has_dotprod", True),
        ("rpi5", "cortex-a76", "feature.has_fp16_simd", True),
        ("jetson-nano", "cortex-a57", "feature.has_asimd", True),
        ("jetson-orin-nano", "cortex-a78ae", "feature.has_dotprod", True),
    ],
)
def test_arm_profiles_give_tvm_the_board_cpu_features(
    name: str, mcpu: str, feature: str, has_it: bool
) -> None:
    target = tvm_target(load_profile(name))
    assert target.attrs["mcpu"] == mcpu
    assert bool(target.attrs[feature]) is has_it


@pytest.mark.parametrize(("name", "sm"), [("jetson-nano", "sm_53"), ("jetson-orin-nano", "sm_87")])
def test_jetson_profiles_target_their_gpu(name: str, sm: str) -> None:
    profile = load_profile(name)
    assert tvm_target(profile, "gpu").attrs["arch"] == sm
    assert profile.runtime("onnxruntime") is not None
    assert profile.runtime("onnxruntime").providers[0] == "TensorrtExecutionProvider"  # type: ignore[union-attr]
    assert profile.agent_install.jetpack


def test_host_profile_describes_this_machine() -> None:
    host = load_profile("host")
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    assert host.detected
    assert host.arch == machine
    assert host.resources.cores == os.cpu_count()
    flags = Path("/proc/cpuinfo").read_text()
    if "avx2" in flags:
        assert "+avx2" in host.targets.cpu["mattr"]
    assert tvm_target(host).attrs["num-cores"] == os.cpu_count()


def test_detect_host_reads_arm_features_and_refuses_unknown_architectures() -> None:
    detected = detect_host(
        machine="aarch64",
        cpuinfo="processor : 0\nFeatures : fp asimd evtstrm crc32 asimddp\n",
        meminfo="MemTotal:        8000000 kB\n",
    )
    assert detected["arch"] == "aarch64"
    assert detected["targets"]["cpu"]["mattr"] == ["+neon", "+dotprod"]
    assert detected["resources"]["memory_budget_mb"] == 8000000 // 1024 // 2
    with pytest.raises(UnsupportedHostError, match="'riscv64' is not supported"):
        detect_host(machine="riscv64", cpuinfo="", meminfo="")


def test_a_detected_profile_keeps_the_fields_its_file_sets(
    write_profile: Callable[..., Path],
) -> None:
    path = write_profile(
        "buildbox",
        lambda text: (
            "detect_from_machine = true\n"
            + text.split("[targets.cpu]")[0].replace('arch = "aarch64"\n', "")
            + "[resources]\ncores = 1\nmemory_budget_mb = 64\n"
            + text[text.index("[[runtimes]]") :]
        ),
    )
    profile = load_profile_file(path)
    assert profile.detected
    assert profile.resources.cores == 1  # from the file, not the machine
    assert profile.targets.cpu["num-cores"] == os.cpu_count()  # from the machine


def test_user_profiles_are_added_and_override_shipped_ones(
    write_profile: Callable[..., Path],
) -> None:
    own = write_profile("myboard")
    override = write_profile("rpi4", lambda text: text.replace("cores = 4", "cores = 2"))
    assert set(list_profiles()) == SHIPPED_PROFILES | {"myboard"}
    assert load_profile("myboard").source == own
    rpi4 = load_profile("rpi4")
    assert rpi4.source == override
    assert rpi4.resources.cores == 2


def test_an_unknown_profile_names_the_available_ones() -> None:
    with pytest.raises(ProfileNotFoundError) as caught:
        load_profile("rpi9")
    assert "rpi9" in str(caught.value)
    assert "jetson-orin-nano" in str(caught.value)
    assert "EDGEFLEET_PROFILES_PATH" in str(caught.value)


BROKEN_PROFILES = [
    pytest.param(
        lambda t: t.replace('arch = "aarch64"', "arch = aarch64"),
        None,
        ["not valid TOML", "line 2"],
        id="toml-syntax",
    ),
    pytest.param(
        lambda t: t.replace('cc = "aarch64-linux-gnu-gcc"\n', ""),
        "toolchain.cc",
        ["required field is missing"],
        id="missing-field",
    ),
    pytest.param(
        lambda t: t.replace("cores = 4", 'cores = "four"'),
        "resources.cores",
        ["valid integer", "'four'"],
        id="wrong-type",
    ),
    pytest.param(
        lambda t: t.replace("cores = 4", "cores = 4\nmemory_mb = 10"),
        "resources.memory_mb",
        ["unknown field", "expected one of: cores, memory_budget_mb"],
        id="unknown-field",
    ),
    pytest.param(
        lambda t: t.replace('name = "litert"', 'name = "tensorrt"'),
        "runtimes[2].name",
        ["'tvm', 'onnxruntime' or 'litert'", "'tensorrt'"],
        id="unknown-runtime",
    ),
    pytest.param(
        lambda t: t.replace('"fp32", "int8"', '"fp32", "int4"'),
        "quantization[1]",
        ["'fp32', 'fp16', 'int8' or 'int8-dynamic'", "'int4'"],
        id="unknown-quantization",
    ),
    pytest.param(
        lambda t: t.replace('"fp32", "int8"', '"none", "int8"'),
        "quantization[0]",
        ['"none" is now called "fp32"', "'none'"],
        id="quantization-none-is-now-fp32",
    ),
    pytest.param(
        lambda t: t.replace("min_top1_agreement = 0.97", "min_top1_agreement = 1.5"),
        "accuracy_gate.min_top1_agreement",
        ["less than or equal to 1"],
        id="out-of-range",
    ),
    pytest.param(
        lambda t: t.replace('kind = "llvm"', 'kind = "c"'),
        "targets.cpu",
        ['expected kind = "llvm"'],
        id="cpu-target-not-llvm",
    ),
    pytest.param(
        lambda t: t.replace('arch = "aarch64"', 'arch = "x86_64"'),
        None,
        ["targets.cpu.mtriple 'aarch64-linux-gnu' does not match arch 'x86_64'"],
        id="arch-mismatch",
    ),
    pytest.param(
        lambda t: t.replace('name = "tvm"', 'name = "tvm"\ndevice = "gpu"'),
        None,
        ['device = "gpu" but targets.gpu is not set'],
        id="gpu-runtime-without-gpu",
    ),
    pytest.param(
        lambda t: t.replace('name = "litert"', 'name = "litert"\nproviders = ["CPU"]'),
        "runtimes[2]",
        ["'providers' applies to onnxruntime only"],
        id="providers-on-litert",
    ),
    pytest.param(
        lambda t: 'name = "other"\n' + t,
        "name",
        ["set by the loader"],
        id="name-in-file",
    ),
]


@pytest.mark.parametrize(("edit", "field", "expected"), BROKEN_PROFILES)
def test_a_broken_profile_names_file_field_and_expectation(
    write_profile: Callable[..., Path],
    edit: Callable[[str], str],
    field: str | None,
    expected: list[str],
) -> None:
    path = write_profile("broken", edit)
    with pytest.raises(InvalidProfileError) as caught:
        load_profile("broken")
    error = caught.value
    assert error.path == path
    assert error.field == field
    message = str(error)
    assert str(path) in message
    if field:
        assert f": {field}: " in message
    for fragment in expected:
        assert fragment in message


def test_a_profile_file_name_must_be_a_plain_lowercase_name(
    write_profile: Callable[..., Path],
) -> None:
    path = write_profile("My Board")
    with pytest.raises(InvalidProfileError, match="lowercase letters"):
        load_profile_file(path)


def test_a_target_option_tvm_rejects_names_the_file_and_field(
    write_profile: Callable[..., Path],
) -> None:
    path = write_profile("typo", lambda t: t.replace("num-cores = 4", "num_cores = 4"))
    profile = load_profile("typo")  # the schema leaves TVM's own options to TVM
    with pytest.raises(UnsupportedTargetError) as caught:
        tvm_target(profile)
    message = str(caught.value)
    assert f"{path}: targets.cpu: TVM rejected the target" in message
    assert "num_cores" in message
    assert isinstance(caught.value.__cause__, ValueError)
