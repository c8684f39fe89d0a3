"""Boards on their own instruction set: an emulated Raspberry Pi 4 and Jetson Orin Nano.

Every test here runs on an emulated board (``compiler/emulation``): Debian bookworm arm64,
built once per package list under ``~/.cache/edgefleet/userlands``, under qemu user mode
with the profile's CPU model (Cortex-A72 for the Pi 4, Cortex-A76 for the Orin's A78AE),
with a device tree naming the board. Nothing is faked beyond the board's identity: the
artifacts are the cross-built ones, the runtimes are the aarch64 wheels, the agent is this
checkout's wheel installed by ``install.sh``, and the fleet is a real one on this machine.

The Pi follows README.md's "Install the agent on a Raspberry Pi" and the Jetson
docs/agent.md's "On a Jetson" command by command (:func:`_follow`): the docs are what the
tests run. Where the machine cannot emulate (no root, no qemu-user-static or binfmt_misc),
every test that needs a board is skipped with the reason, which the suite's summary shows;
with ``EDGEFLEET_REQUIRE_BOARDS=1`` (CI sets it) that is a failure instead.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.install import default_device_id
from agent.runtimes import OnnxRuntime, load_runtime
from compiler.emulation import (
    VENV,
    WHEELHOUSE,
    ArtifactToRun,
    BoardSpec,
    EmulatedBoard,
    Userland,
    agent_userland_spec,
    cpuinfo_for,
    describe_exit,
    emulation_unavailable,
    ensure_userland,
    run_artifacts,
)
from compiler.errors import EmulationError
from compiler.pipeline import CompileOptions, compile_model, default_cache_dir
from hw_profiles import load_profile
from ota.bundle import bundle_compile_output
from tests.utils.fleet import RunningFleet, running_fleet, wait_for
from tests.utils.http import serve_app
from tests.utils.mqtt import free_port

from .conftest import SHIPPED_PROFILES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
REQUIRE = "EDGEFLEET_REQUIRE_BOARDS"
SHARED = "/mnt/host"
"""Where a board sees the test's folder of wheels and ``install.sh``."""


@dataclass(frozen=True)
class Board:
    """An emulated board: its profile, what it says about itself, and its install docs."""

    profile: str
    model: str
    files: dict[str, str]
    docs: tuple[Path, str]
    """The file and the heading whose ``sh`` block installs the agent on this board."""

    def spec(self) -> BoardSpec:
        emulation = load_profile(self.profile).emulation
        assert emulation is not None, f"profile {self.profile} names no qemu CPU"
        return BoardSpec(emulation.qemu_cpu, self.model, self.files)


RPI4 = Board(
    "rpi4",
    "Raspberry Pi 4 Model B Rev 1.4",
    {},
    (REPO / "README.md", "### Install the agent on a Raspberry Pi"),
)
ORIN = Board(
    "jetson-orin-nano",
    "NVIDIA Jetson Orin Nano Developer Kit",
    {
        "etc/nv_tegra_release": "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: "
        "generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"
    },
    (REPO / "docs" / "agent.md", "### On a Jetson"),
)


# --- the pieces, which need no emulation ---------------------------------------------------


def test_the_userland_is_keyed_by_its_package_lists() -> None:
    spec = agent_userland_spec("aarch64")
    assert "python3-venv" in spec.debian_packages
    assert any(r.startswith("onnxruntime") for r in spec.python_requirements)
    assert any(r.startswith("apache-tvm==") for r in spec.python_requirements)
    shuffled = dataclasses.replace(spec, debian_packages=spec.debian_packages[::-1])
    assert shuffled.key == spec.key  # a list, not an order
    more = dataclasses.replace(spec, debian_packages=(*spec.debian_packages, "curl"))
    assert more.key != spec.key and more.name != spec.name
    assert spec.name == f"debian-bookworm-arm64-{spec.key}"


@pytest.mark.parametrize("name", sorted(SHIPPED_PROFILES))
def test_every_emulated_profile_names_a_cpu_qemu_and_the_board_know(name: str) -> None:
    profile = load_profile(name)
    emulation = profile.emulation
    if emulation is None:  # the build machine itself, or an x86-64 box
        assert name == "host" or profile.arch == "x86_64", f"{name}: arm64, not emulated"
        return
    assert "CPU part" in cpuinfo_for(emulation.qemu_cpu, 4)
    qemu = shutil.which("qemu-aarch64-static")
    if qemu is not None:
        listed = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True).stdout
        assert emulation.qemu_cpu in listed.split()


def test_cpuinfo_and_exit_statuses_in_words() -> None:
    cpuinfo = cpuinfo_for("cortex-a72", 2)
    assert cpuinfo.count("CPU part\t: 0xd08") == 2 and "processor\t: 1" in cpuinfo
    with pytest.raises(EmulationError, match="known: cortex-a53, cortex-a57"):
        cpuinfo_for("cortex-x4", 1)
    assert (
        describe_exit(-4) == describe_exit(132) == ("SIGILL: an instruction this CPU does not have")
    )
    assert (describe_exit(-9), describe_exit(1)) == ("SIGKILL", "exit 1")


# --- the userland, the builds and the wheel ------------------------------------------------


@pytest.fixture(scope="module")
def userland() -> Userland:
    why = emulation_unavailable("aarch64")
    if why is not None:
        message = f"the arm64 board tests did NOT run: {why}"
        if os.environ.get(REQUIRE):
            pytest.fail(f"{message} ({REQUIRE} is set)")
        pytest.skip(message)
    return ensure_userland(agent_userland_spec("aarch64"), default_cache_dir())


def _compile(digits: Path, out: Path, profile: str, **options: Any) -> dict[str, Any]:
    compile_model(
        CompileOptions(
            model=digits / "digits.keras",
            profile=load_profile(profile),
            out_dir=out,
            calibration=digits / "digits.npz",
            quantize="int8",
            **options,
        )
    )
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


@pytest.fixture(scope="module")
def rpi4_build(userland: Userland, digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``edgefleet compile digits.keras --profile rpi4 --quantize int8 --emulation on``."""
    out = tmp_path_factory.mktemp("boards") / "digits-rpi4"
    _compile(digits, out, "rpi4", emulation="on")
    return out


@pytest.fixture(scope="module")
def checkout_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout as a wheel, built from a copy (the checkout itself is left alone)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, source / name)
    for package in ("contracts", "hw_profiles", "ota", "agent", "compiler", "fleet", "edgefleet"):
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", base / "dist", source],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (base / "dist").glob("edgefleet-*.whl")
    return wheel


@pytest.fixture
def board_of(userland: Userland, tmp_path: Path) -> Iterator[Any]:
    """Start a board (one per test) sharing ``tmp_path/shared`` at :data:`SHARED`."""
    started: list[EmulatedBoard] = []
    shared = tmp_path / "shared"
    shared.mkdir()

    def start(board: Board) -> EmulatedBoard:
        running = userland.board(board.spec(), tmp_path / "board", binds={shared: SHARED})
        running.start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


# --- the board itself ----------------------------------------------------------------------

_HWCAP_BITS = {"atomics": 8, "fphp": 9, "asimdhp": 10, "asimddp": 20, "sve": 22}
_AUXV = """
import struct
data = open("/proc/self/auxv", "rb").read()
print(dict(struct.iter_unpack("<QQ", data)).get(16, 0))
"""


@pytest.mark.parametrize(
    ("board", "part", "features"),
    [
        (RPI4, "0xd08", {"atomics": False, "asimddp": False, "fphp": False, "sve": False}),
        (ORIN, "0xd0b", {"atomics": True, "asimddp": True, "fphp": True, "sve": False}),
    ],
    ids=["rpi4", "jetson-orin-nano"],
)
def test_the_board_is_arm64_debian_with_the_profiles_cpu(
    board_of: Any, board: Board, part: str, features: dict[str, bool]
) -> None:
    running = board_of(board)
    assert running.run(["uname", "-m"]).stdout.strip() == "aarch64"
    assert "VERSION_CODENAME=bookworm" in running.run(["cat", "/etc/os-release"]).stdout
    hwcap = int(running.run([f"{VENV}/bin/python", "-c", _AUXV]).stdout)
    # what the CPU model lets programs use, as the kernel (qemu) reports it in AT_HWCAP
    assert {name: bool(hwcap >> bit & 1) for name, bit in _HWCAP_BITS.items()} == {
        "asimdhp": features["fphp"],
        **features,
    }
    cpuinfo = running.run(["cat", "/proc/cpuinfo"]).stdout
    assert f"CPU part\t: {part}" in cpuinfo
    model = running.run(["cat", "/sys/firmware/devicetree/base/model"]).stdout
    assert model == board.model + "\0"


# --- artifacts on the board's instruction set ----------------------------------------------


def test_rpi4_artifacts_run_on_aarch64_and_agree_with_the_host(
    userland: Userland, rpi4_build: Path, digits: Path, tmp_path: Path
) -> None:
    data = np.load(digits / "digits.npz")
    inputs = {"image": data["image"][-600:]}
    artifacts = [
        ArtifactToRun("tvm:fp32", "tvm", rpi4_build / "tvm-fp32.so"),
        ArtifactToRun("onnxruntime:int8", "onnxruntime", rpi4_build / "onnxruntime-int8.onnx"),
        ArtifactToRun("litert:int8", "litert", rpi4_build / "litert-int8.tflite"),
    ]
    on_board = run_artifacts(userland, RPI4.spec(), artifacts, inputs, tmp_path)
    reference = OnnxRuntime(digits / "digits.onnx").predict_batch(inputs)[0]

    # The TVM module: the fp32 model, computed by NEON code on the A72, as the host computes it.
    tvm = on_board["tvm:fp32"][0]
    assert tvm.shape == (600, 10)
    assert np.mean(tvm.argmax(1) == reference.argmax(1)) == 1.0
    np.testing.assert_allclose(tvm, reference, atol=1e-3)
    # The int8 artifacts: the same files on this machine's runtimes, quantized alike.
    for artifact in artifacts[1:]:
        host = load_runtime(artifact.runtime, artifact.path).predict_batch(inputs)[0]
        board = on_board[artifact.name][0]
        assert board.shape == host.shape == (600, 10)
        assert np.mean(board.argmax(1) == host.argmax(1)) >= 0.99, artifact.name
        assert np.mean(board.argmax(1) == reference.argmax(1)) >= 0.97, artifact.name
        scale = float(np.abs(host).max())
        assert float(np.abs(board - host).max()) <= 0.05 * scale, artifact.name


def test_an_rpi4_compile_validates_every_artifact_on_aarch64(rpi4_build: Path) -> None:
    report = json.loads((rpi4_build / "report.json").read_text())
    assert report["schema"] == "edgefleet.compile-report/3"
    on_a72 = {
        "kind": "emulator",
        "arch": "aarch64",
        "cpu": "cortex-a72",
        "summary": "aarch64 under qemu, cortex-a72",
    }
    assert {a["id"]: a["validated_on"] for a in report["artifacts"]} == {
        "onnxruntime:int8": on_a72,
        "litert:int8": on_a72,
        "tvm:fp32": on_a72,
    }
    assert all(c["validated_on"] == on_a72 and c["passed"] for c in report["candidates"])
    # emulated runs are never reported as the board's latency
    assert report["latency_ms"] == {}
    assert all("emulated runs are not timed" in c["latency_note"] for c in report["candidates"])
    steps = {s["name"]: s["detail"] for s in report["steps"]}
    assert steps["emulator"]["board"] == "aarch64 under qemu, cortex-a72"
    assert steps["build"]["tvm:fp32"]["validated_on"] == "aarch64 under qemu, cortex-a72"
    assert not any("host build" in json.dumps(step) for step in steps.values())
    # LiteRT answers to the model's own input name on every runtime
    litert = next(a for a in report["artifacts"] if a["id"] == "litert:int8")
    sidecar = json.loads((rpi4_build / litert["metadata_path"]).read_text())
    assert [s["name"] for s in sidecar["inputs"]] == ["image"]
    card = (rpi4_build / "MODEL_CARD.md").read_text()
    assert "| tvm:fp32 | True | top1_agreement | 1.0000 | n/a |" in card
    assert card.count("aarch64 under qemu, cortex-a72 |") == 3


def test_a_build_using_instructions_the_board_lacks_fails_on_the_board_only(
    userland: Userland, digits: Path, write_profile: Any, tmp_path: Path
) -> None:
    """A Pi 4 profile that lets LLVM use SVE: the host build of the same module runs (the
    old check passed it), the A72 has no SVE and dies on the first vector instruction: that
    candidate is skipped with the cause, the others ship."""
    write_profile("rpi4-sve", lambda text: text.replace('["+neon"]', '["+neon", "+sve"]'))
    options = {
        "model": digits / "digits.onnx",
        "profile": load_profile("rpi4-sve"),
        "calibration": digits / "digits.npz",
    }
    on_board = compile_model(CompileOptions(out_dir=tmp_path / "on", emulation="on", **options))
    [failure] = [f for f in on_board.failed if f.id == "tvm:fp32"]
    assert failure.step == "validate"
    assert "built but does not run on aarch64 under qemu, cortex-a72" in failure.cause
    assert "SIGILL: an instruction this CPU does not have" in failure.cause
    assert on_board.artifact("tvm:fp32") is None
    assert on_board.artifacts, "the candidates that run on the board still ship"
    passed = compile_model(CompileOptions(out_dir=tmp_path / "off", emulation="off", **options))
    tvm = passed.artifact("tvm:fp32")
    assert tvm is not None and tvm.validated_on is not None
    assert tvm.validated_on.kind == "host-build"


# --- the agent on a board, installed as the docs say ---------------------------------------


def _doc_commands(board: Board) -> list[str]:
    """The commands of the ``sh`` block under the board's install heading, one per line
    (continuations joined, comments dropped)."""
    path, heading = board.docs
    text = path.read_text()
    assert heading in text, f"{path.name} lost its section {heading!r}"
    block = re.search(r"```sh\n(.*?)```", text[text.index(heading) :], re.DOTALL)
    assert block is not None, f"{path.name}: no sh block under {heading!r}"
    joined = block.group(1).replace("\\\n", " ")
    commands = [line.split("  #")[0].strip() for line in joined.splitlines()]
    return [" ".join(c.split()) for c in commands if c and not c.startswith("#")]


@dataclass
class Agent:
    """The agent the unit would start, started as the unit says (systemd is not running)."""

    board: EmulatedBoard
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        unit = self.board.path("/etc/systemd/system/edgefleet-agent.service").read_text()
        service = dict(
            line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#"
        )
        user = service["User"]
        cache = self.board.path("/var/cache/edgefleet")
        cache.mkdir(exist_ok=True)
        os.chown(cache, *self.board.user_ids(user))
        env = {"PYTHONUNBUFFERED": "1"}
        for line in unit.splitlines():
            if line.startswith("Environment="):
                for pair in line.removeprefix("Environment=").split():
                    key, value = pair.split("=", 1)
                    env[key] = value.replace("%C", "/var/cache")
        self.process = self.board.popen(
            service["ExecStart"].split(),
            env=env,
            user=user,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(30) == -signal.SIGKILL

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def wait_until_ready(self, local: str) -> None:
        """Until the local API says ready (a minute or two under emulation); the log on
        timeout."""
        try:
            wait_for(functools.partial(_ready, local), timeout_s=240, what="the local API")
        except AssertionError as e:
            raise AssertionError(f"{e}; the agent's log:\n{self.tail()}") from None


@dataclass
class Fleet:
    running: RunningFleet
    url: str


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        running_fleet(tmp_path / "fleet", public_url=url) as running,
        serve_app(running.client.app, port=port),
    ):
        yield Fleet(running, url)


def _follow(
    board: Board,
    userland: Userland,
    running: EmulatedBoard,
    fleet: Fleet,
    wheel: Path,
    agent: Agent,
    tmp_path: Path,
) -> dict[str, Any]:
    """Run the board's documented install, command by command; what each said."""
    shared = tmp_path / "shared"
    shutil.copyfile(wheel, shared / wheel.name)
    shutil.copyfile(REPO / "agent" / "install.sh", shared / "install.sh")
    token = fleet.running.api("POST", "/enrollment-tokens", json={"profile": board.profile})[
        "token"
    ]
    # An offline board, as the docs say: pip takes the userland's wheels and this checkout's.
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": f"{WHEELHOUSE} {SHARED}"}
    said: dict[str, Any] = {}
    for documented in _doc_commands(board):
        command = documented.removeprefix("sudo ")  # root already, and minbase has no sudo
        words = command.split()
        if words[:2] == ["apt", "install"]:
            wanted = [w for w in words[2:] if not w.startswith("-")]
            debs = userland.manifest()["debian_packages"]
            assert isinstance(debs, list)
            known = {deb.split("=")[0] for deb in debs}
            assert set(wanted) <= known, f"{command}: the userland lacks {set(wanted) - known}"
            continue
        if words[0] == "systemctl":
            assert words[1:] == ["restart", "edgefleet-agent"], command
            agent.start()
            continue
        if words[0] == "curl":
            assert words[-1] == "http://127.0.0.1:8800/v2/health/ready", command
            local = _local(running)  # the same check, on the port the test moved the API to
            agent.wait_until_ready(local)
            said["ready"] = local
            continue
        line = (
            command.replace("'edgefleet[agent]'", f"{SHARED}/{wheel.name}")
            .replace("http://FLEET:8000", fleet.url)
            .replace("TOKEN", token)
        )
        done = running.run(["sh", "-c", line], env=offline, cwd=SHARED, timeout_s=900)
        said[words[0] if "install.sh" not in command else "install.sh"] = done.stdout + done.stderr
        if " agent enroll " in f" {line} ":
            _quick_reports(running)
    return said


def _quick_reports(running: EmulatedBoard) -> None:
    """After enrolling: the local API on a free port (this machine runs other tests too) and
    telemetry every second; the only edits to the documented config."""
    config = running.path("/etc/edgefleet/agent.toml")
    text = config.read_text().replace("port = 8800", f"port = {free_port()}")
    config.write_text(text + "\n[telemetry]\ninterval_s = 1\n")


def _local(running: EmulatedBoard) -> str:
    config = tomllib.loads(running.path("/etc/edgefleet/agent.toml").read_text())
    return f"http://127.0.0.1:{config['api']['port']}"


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v2/health/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _infer(base: str, images: np.ndarray) -> httpx.Response:
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": list(images.shape),
                "datatype": "FP32",
                "data": images.ravel().tolist(),
            }
        ]
    }
    return httpx.post(f"{base}/v2/models/digits/infer", json=body, timeout=60)


def _roll_out(
    fleet: Fleet, bundle: dict[str, Any], local: str, images: np.ndarray
) -> tuple[dict[str, Any], int]:
    """Roll ``bundle`` out to the board and answer the health check's watch with local
    inferences until the rollout ends; the rollout and how many the new model served."""
    rollout = fleet.running.api(
        "POST",
        "/rollouts",
        json={"bundle_id": bundle["id"], "waves": ["100"], "gate": {"soak_s": 0}},
    )
    served = 0

    def finished() -> dict[str, Any] | None:
        nonlocal served
        answer = _infer(local, images[:1])
        if (
            answer.status_code == 200
            and answer.json()["parameters"].get("bundle") == bundle["bundle_name"]
        ):
            served += 1
        state = fleet.running.api("GET", f"/rollouts/{rollout['id']}")
        return state if state["state"] in ("completed", "paused", "rolled_back") else None

    return wait_for(finished, timeout_s=600, what="the rollout to finish"), served


def _bundle(build: Path, out: Path, version: str, artifact: str) -> Path:
    path = out / f"digits-{artifact.replace(':', '-')}-{version}.efb"
    bundle_compile_output(build, version=version, out=path, artifact_id=artifact)
    return path


def test_a_raspberry_pi_installed_as_the_readme_says_serves_updates_and_survives_sigkill(
    userland: Userland,
    board_of: Any,
    fleet: Fleet,
    rpi4_build: Path,
    checkout_wheel: Path,
    digits: Path,
    tmp_path: Path,
) -> None:
    running = board_of(RPI4)
    agent = Agent(running, tmp_path / "agent.log")
    said = _follow(RPI4, userland, running, fleet, checkout_wheel, agent, tmp_path)
    try:
        _check_install(said["install.sh"], running, checkout_wheel, board="Raspberry Pi 4")
        local = said["ready"]
        device = default_device_id()
        wait_for(
            lambda: fleet.running.api("GET", f"/devices/{device}")["online"],
            timeout_s=60,
            what="the board online at the fleet",
        )
        _dry_run_changes_nothing(running, checkout_wheel)

        images = np.load(digits / "digits.npz")["image"][-8:]
        reference = OnnxRuntime(digits / "digits.onnx").predict_batch({"image": images})[0]
        tvm = fleet.running.publish(_bundle(rpi4_build, tmp_path, "1.0.0", "tvm:fp32"))
        done, served = _roll_out(fleet, tvm, local, images)
        assert done["state"] == "completed", (done["reason"], agent.tail())
        assert served >= 50  # the health check watched 50 local inferences before committing

        # a batch of 8 reaches the batch-1 TVM module, under the model's input name
        answer = _infer(local, images)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["parameters"] == {"served_by": "local", "bundle": "digits-rpi4-1.0.0"}
        outputs = np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(8, 10)
        np.testing.assert_allclose(outputs, reference, atol=1e-3)
        metadata = httpx.get(f"{local}/v2/models/digits", timeout=30).json()
        assert metadata["inputs"][0]["name"] == "image"
        assert metadata["inputs"][0]["shape"] == [-1, 8, 8, 1]

        # the LiteRT int8 artifact takes the same name: no serving_default_image:0
        litert = fleet.running.publish(_bundle(rpi4_build, tmp_path, "1.1.0", "litert:int8"))
        done, _ = _roll_out(fleet, litert, local, images)
        assert done["state"] == "completed", (done["reason"], agent.tail())
        answer = _infer(local, images)
        assert answer.status_code == 200, answer.text
        assert answer.json()["parameters"]["bundle"] == "digits-rpi4-1.1.0"
        top1 = np.array(answer.json()["outputs"][0]["data"]).reshape(8, 10).argmax(1)
        assert (top1 == reference.argmax(1)).all()
        wait_for(
            lambda: any(
                r["bundle"] == "digits-rpi4-1.1.0" and r["inferences"] >= 1
                for r in fleet.running.api("GET", f"/devices/{device}/telemetry")
            ),
            timeout_s=120,
            what="telemetry of the board's inferences at the fleet",
        )

        agent.kill()
        agent.start()
        agent.wait_until_ready(local)
        answer = _infer(local, images)
        assert answer.status_code == 200, answer.text
        assert answer.json()["parameters"] == {"served_by": "local", "bundle": "digits-rpi4-1.1.0"}
    finally:
        if agent.process is not None and agent.process.poll() is None:
            assert agent.stop() == 0, agent.tail()


def _check_install(said: str, running: EmulatedBoard, wheel: Path, *, board: str) -> None:
    assert f"board: {board}" in said, said
    assert f"pip install '{SHARED}/{wheel.name}[agent]'" in said, said
    assert "create the system user edgefleet" in said, said
    unit = running.path("/etc/systemd/system/edgefleet-agent.service").read_text()
    assert f"ExecStart={VENV}/bin/edgefleet agent run --config /etc/edgefleet/agent.toml" in unit
    config = running.path("/etc/edgefleet/agent.toml")
    uid, gid = running.user_ids("edgefleet")
    assert (config.stat().st_mode & 0o777, config.stat().st_gid) == (0o640, gid)
    assert running.path("/var/lib/edgefleet").stat().st_uid == uid


def _dry_run_changes_nothing(running: EmulatedBoard, wheel: Path) -> None:
    watched = ["/etc/edgefleet/agent.toml", "/etc/systemd/system/edgefleet-agent.service"]

    def digest() -> list[str]:
        return [hashlib.sha256(running.path(p).read_bytes()).hexdigest() for p in watched]

    before = digest()
    plan = running.run(
        [f"{VENV}/bin/edgefleet", "agent", "install", "--package", f"{SHARED}/{wheel.name}",
         "--tvm", "--dry-run"],
        env={"PIP_NO_INDEX": "1"},
    ).stdout  # fmt: skip
    assert "dry run: nothing is changed" in plan
    assert f"reusing the venv {VENV}" in plan
    assert "keeping the existing config /etc/edgefleet/agent.toml" in plan
    assert digest() == before


def test_a_jetson_orin_nano_installed_as_the_docs_say_serves_its_cpu_artifacts(
    userland: Userland,
    board_of: Any,
    fleet: Fleet,
    checkout_wheel: Path,
    digits: Path,
    tmp_path: Path,
) -> None:
    build = tmp_path / "digits-orin"
    report = _compile(digits, build, "jetson-orin-nano", emulation="on")
    where = {c["id"]: c["validated_on"] for c in report["candidates"]}
    assert where["onnxruntime:int8"] == {
        "kind": "emulator",
        "arch": "aarch64",
        "cpu": "cortex-a76",
        "summary": "aarch64 under qemu, cortex-a76 "
        "(CPU execution provider: the board's GPU is not emulated)",
    }
    assert where["litert:int8"]["summary"] == "aarch64 under qemu, cortex-a76"
    # TVM's CUDA module cannot run here at all: built where nvcc is, checked through a twin
    assert where.get("tvm:fp32", {"kind": "host-build"})["kind"] == "host-build"

    running = board_of(ORIN)
    agent = Agent(running, tmp_path / "agent.log")
    said = _follow(ORIN, userland, running, fleet, checkout_wheel, agent, tmp_path)
    try:
        install = said["install.sh"]
        _check_install(install, running, checkout_wheel, board="NVIDIA Jetson Orin Nano")
        assert "L4T 36.4.3, JetPack 6.2, profile jetson-orin-nano" in install
        assert "replace onnxruntime with onnxruntime-gpu" in install
        assert "is back in its place" in install  # no cp311 GPU wheel offline: the CPU one
        local = said["ready"]

        images = np.load(digits / "digits.npz")["image"][-8:]
        reference = OnnxRuntime(digits / "digits.onnx").predict_batch({"image": images})[0]
        bundle = fleet.running.publish(_bundle(build, tmp_path, "1.0.0", "onnxruntime:int8"))
        done, served = _roll_out(fleet, bundle, local, images)
        assert done["state"] == "completed", (done["reason"], agent.tail())
        assert served >= 50
        answer = _infer(local, images)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["parameters"] == {
            "served_by": "local",
            "bundle": "digits-jetson-orin-nano-1.0.0",
        }
        top1 = np.array(body["outputs"][0]["data"]).reshape(8, 10).argmax(1)
        assert (top1 == reference.argmax(1)).all()
        device = default_device_id()
        wait_for(
            lambda: any(
                r["bundle"] == "digits-jetson-orin-nano-1.0.0" and r["inferences"] >= 1
                for r in fleet.running.api("GET", f"/devices/{device}/telemetry")
            ),
            timeout_s=120,
            what="telemetry of the board's inferences at the fleet",
        )
    finally:
        if agent.process is not None and agent.process.poll() is None:
            assert agent.stop() == 0, agent.tail()
