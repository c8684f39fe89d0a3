"""Putting the agent on a board: ``agent.install``, ``agent.sd_notify`` and ``install.sh``.

Board detection runs on fake ``/proc`` + ``/etc`` trees: a Raspberry Pi or a Jetson cannot
exist on the machine the suite runs on, so each fake names the board it imitates and holds
the files that board really has. Everything else is real: ``systemd-analyze verify`` reads
the unit, pip installs this repository into a fresh venv whose ``edgefleet`` then runs, pip
swaps real (tiny) wheels, and sd_notify talks to a real unix datagram socket.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import InstallError
from agent.install import (
    JETSON_JP6_INDEX_URL,
    Board,
    InstallOptions,
    Layout,
    RuntimeWheel,
    UninstallOptions,
    detect_board,
    install,
    render_config,
    render_unit,
    runtime_packages,
    uninstall,
    with_agent_extra,
)
from agent.install.plan import _swap_in
from agent.sd_notify import notify, watchdog_interval

from .conftest import SHIPPED_PROFILES

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)


def _pins(extra: str, name: str) -> set[str]:
    """The version clauses pyproject gives ``name`` in ``extra``, order-free."""
    for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
        if requirement.split("=")[0].split(">")[0].split("<")[0] == name:
            return set(requirement[len(name) :].split(","))
    raise AssertionError(f"{name} is not in the {extra} extra")


# --- board detection on fake trees ---------------------------------------------------------

L4T_R32_7_1 = (
    "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, "
    "DATE: Sat Feb 19 17:05:08 UTC 2022\n"
    "# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
)
DPKG_STATUS_L4T_36_4_3 = """\
Package: nvidia-l4t-camera
Status: install ok installed
Version: 36.4.3-20250107174145

Package: nvidia-l4t-core
Status: install ok installed
Architecture: arm64
Version: 36.4.3-20250107174145
Description: NVIDIA Core Package
"""

# name -> (platform.machine(), {path under the root: content}, the Board expected)
FAKE_BOARDS: dict[str, tuple[str, dict[str, str], Board]] = {
    "fake-raspberry-pi-4": (
        "aarch64",
        {"proc/device-tree/model": "Raspberry Pi 4 Model B Rev 1.4\0"},
        Board("aarch64", "raspberry-pi", "Raspberry Pi 4 Model B Rev 1.4", profile="rpi4"),
    ),
    # JetPack 6 images read from dpkg here: the nvidia-l4t-core version, no nv_tegra_release.
    "fake-jetson-orin-nano-jetpack-6": (
        "aarch64",
        {
            "proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\0",
            "var/lib/dpkg/status": DPKG_STATUS_L4T_36_4_3,
        },
        Board(
            "aarch64",
            "jetson",
            "NVIDIA Jetson Orin Nano Developer Kit",
            l4t="36.4.3",
            jetpack="6.2",
            profile="jetson-orin-nano",
        ),
    ),
    "fake-jetson-nano-jetpack-4": (
        "aarch64",
        {
            "proc/device-tree/model": "NVIDIA Jetson Nano Developer Kit\0",
            "etc/nv_tegra_release": L4T_R32_7_1,
        },
        Board(
            "aarch64",
            "jetson",
            "NVIDIA Jetson Nano Developer Kit",
            l4t="32.7.1",
            jetpack="4.6.1",
            profile="jetson-nano",
        ),
    ),
    # Raspberry Pi OS Bookworm: the device tree under /sys (what /proc/device-tree links to).
    "fake-raspberry-pi-5-sysfs": (
        "aarch64",
        {"sys/firmware/devicetree/base/model": "Raspberry Pi 5 Model B Rev 1.0\0"},
        Board("aarch64", "raspberry-pi", "Raspberry Pi 5 Model B Rev 1.0", profile="rpi5"),
    ),
    "fake-x86_64-box": ("x86_64", {}, Board("x86_64", "generic")),
    # A release newer than the table: the major version only, and no GPU index guessed.
    "fake-jetson-agx-orin-future-l4t": (
        "aarch64",
        {
            "proc/device-tree/model": "NVIDIA Jetson AGX Orin Developer Kit\0",
            "etc/nv_tegra_release": "# R36 (release), REVISION: 9.0, GCID: 1, BOARD: generic\n",
        },
        Board("aarch64", "jetson", "NVIDIA Jetson AGX Orin Developer Kit", l4t="36.9.0"),
    ),
}


def _fake_root(root: Path, files: dict[str, str]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


@pytest.mark.parametrize("name", FAKE_BOARDS)
def test_detect_board_on_a_fake_tree(name: str, tmp_path: Path) -> None:
    machine, files, expected = FAKE_BOARDS[name]
    board = detect_board(_fake_root(tmp_path, files), machine=machine)
    assert board == expected
    assert board.profile is None or board.profile in SHIPPED_PROFILES


def test_jetpack_major_comes_from_the_l4t_major() -> None:
    assert FAKE_BOARDS["fake-jetson-agx-orin-future-l4t"][2].jetpack_major == 6
    assert FAKE_BOARDS["fake-jetson-nano-jetpack-4"][2].jetpack_major == 4
    assert FAKE_BOARDS["fake-raspberry-pi-4"][2].jetpack_major is None


def test_arm64_is_aarch64() -> None:
    assert detect_board(Path("/nonexistent"), machine="arm64").arch == "aarch64"


# --- runtime wheels --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "installed"),
    [
        ("edgefleet[agent]", "edgefleet[agent]"),
        ("edgefleet", "edgefleet[agent]"),
        ("edgefleet==0.2.0", "edgefleet[agent]==0.2.0"),
        (
            "/media/edgefleet-0.2.0-py3-none-any.whl",
            "/media/edgefleet-0.2.0-py3-none-any.whl[agent]",
        ),
        ("./edgefleet-0.2.0.tar.gz", "./edgefleet-0.2.0.tar.gz[agent]"),
        (str(REPO), f"{REPO}[agent]"),
        (f"{REPO}[agent,compiler]", f"{REPO}[agent,compiler]"),
        ("git+https://example.org/edgefleet.git", "git+https://example.org/edgefleet.git"),
        ("edgefleet-fork", "edgefleet-fork"),
    ],
)
def test_a_package_naming_edgefleet_without_extras_gets_the_agent_extra(
    given: str, installed: str
) -> None:
    assert with_agent_extra(given) == installed


@pytest.mark.parametrize(
    "name", ["fake-raspberry-pi-4", "fake-jetson-nano-jetpack-4", "fake-x86_64-box"]
)
def test_cpu_boards_get_nothing_beyond_the_agent_extra(name: str) -> None:
    assert runtime_packages(FAKE_BOARDS[name][2]) == []


def test_a_jetpack_6_jetson_swaps_in_nvidias_gpu_onnxruntime() -> None:
    [wheel] = runtime_packages(FAKE_BOARDS["fake-jetson-orin-nano-jetpack-6"][2])
    assert wheel.requirement.startswith("onnxruntime-gpu")
    assert set(wheel.requirement[len("onnxruntime-gpu") :].split(",")) == _pins(
        "agent", "onnxruntime"
    )
    assert wheel.index_url == JETSON_JP6_INDEX_URL
    assert wheel.replaces == "onnxruntime"


def test_an_unlisted_jetpack_keeps_the_cpu_onnxruntime_unless_given_an_index() -> None:
    board = FAKE_BOARDS["fake-jetson-agx-orin-future-l4t"][2]
    assert runtime_packages(board) == []
    [wheel] = runtime_packages(board, gpu_index_url="https://wheels.example/jetson")
    assert wheel.index_url == "https://wheels.example/jetson"


def test_tvm_is_opt_in_at_the_compilers_pins() -> None:
    wheels = runtime_packages(FAKE_BOARDS["fake-raspberry-pi-4"][2], tvm=True)
    assert [w.requirement for w in wheels] == [
        f"apache-tvm{''.join(_pins('compiler', 'apache-tvm'))}",
        f"apache-tvm-ffi{''.join(_pins('compiler', 'apache-tvm-ffi'))}",
    ]


def test_a_32_bit_arm_os_is_refused_with_the_fix() -> None:
    with pytest.raises(InstallError, match="64-bit Raspberry Pi OS"):
        runtime_packages(Board("armv7l", "raspberry-pi", "Raspberry Pi 4 Model B Rev 1.4"))


# --- the unit and the config -----------------------------------------------------------------


def _fake_venv(root: Path) -> Path:
    """A venv directory whose ``bin/edgefleet`` is a real executable, as verify demands."""
    executable = root / "venv" / "bin" / "edgefleet"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    return root / "venv"


def _verify(unit_path: Path) -> str:
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on unknown keys and bad values too, printing a warning: silence is the pass.
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("data_dir", "groups"),
    [(Path("/var/lib/edgefleet"), ()), (Path("/data/edgefleet"), ("video", "render"))],
    ids=["defaults", "jetson-groups-and-own-data-dir"],
)
def test_systemd_analyze_verify_accepts_the_unit(
    tmp_path: Path, data_dir: Path, groups: tuple[str, ...]
) -> None:
    venv = _fake_venv(tmp_path)
    text = render_unit(
        venv_dir=venv,
        config=Path("/etc/edgefleet/agent.toml"),
        data_dir=data_dir,
        supplementary_groups=groups,
    )
    unit = tmp_path / "edgefleet-agent.service"
    unit.write_text(text)
    assert _verify(unit) == ""
    lines = text.splitlines()
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={venv}/bin/edgefleet agent run --config /etc/edgefleet/agent.toml",
        "Restart=always",
        "RestartSec=5",
        "WatchdogSec=30",
        "User=edgefleet",
        "ProtectSystem=strict",
        f"ReadWritePaths={data_dir}",
        "NoNewPrivileges=yes",
    ):
        assert expected in lines
    assert ("StateDirectory=edgefleet" in lines) == (data_dir.parent == Path("/var/lib"))
    assert ("SupplementaryGroups=video render" in lines) == bool(groups)
    # what would hide a Jetson's GPU or break its JIT stays out
    for absent in ("PrivateDevices", "DevicePolicy", "ProtectClock", "MemoryDenyWriteExecute"):
        assert not any(line.startswith(absent) for line in lines)


@pytest.mark.parametrize(
    ("venv", "user", "complaint"),
    [("/opt/edge fleet", "edgefleet", "without spaces"), ("/opt/ef", "Edge Fleet", "user name")],
)
def test_what_systemd_or_useradd_would_misread_is_refused(
    venv: str, user: str, complaint: str
) -> None:
    with pytest.raises(InstallError, match=complaint):
        render_unit(
            venv_dir=Path(venv), config=Path("/etc/a.toml"), data_dir=Path("/d/e"), user=user
        )


def test_the_starter_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        render_config(device_id="pi-kitchen", data_dir=Path("/var/lib/edgefleet"), mqtt_port=8883)
    )
    config = load_config(path)
    assert config.device_id == "pi-kitchen"
    assert config.data_dir == Path("/var/lib/edgefleet")
    assert config.mqtt.port == 8883


def test_a_config_the_agent_would_refuse_is_not_written() -> None:
    with pytest.raises(InstallError, match="device_id"):
        render_config(device_id="no spaces allowed", data_dir=Path("/var/lib/edgefleet"))


# --- install and uninstall -------------------------------------------------------------------


def _layout(root: Path) -> Layout:
    return Layout(
        venv_dir=root / "venv",
        systemd_dir=root / "systemd",
        config_dir=root / "etc" / "edgefleet",
        data_dir=root / "var" / "edgefleet",
    )


@needs_systemd_analyze
def test_install_then_uninstall_into_a_temp_prefix(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    said: list[str] = []
    # This repository without the agent extra's dependencies (numpy, ONNX Runtime, LiteRT:
    # 300 MB, a minute or two here): the point is a venv whose entry point runs.
    report = install(
        InstallOptions(
            layout=layout,
            package=str(REPO),
            create_user=False,
            start=False,
            device_id="test-board",
            echo=said.append,
        )
    )
    assert not report.started and report.config_written
    assert any("create the venv" in line for line in said)
    help_text = subprocess.run(
        [layout.executable, "--help"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "agent" in help_text
    config = load_config(layout.config_path)
    assert (config.device_id, config.data_dir) == ("test-board", layout.data_dir)
    assert layout.data_dir.is_dir()
    assert _verify(layout.unit_path) == ""
    assert f"ExecStart={layout.executable} agent run" in layout.unit_path.read_text()

    uninstall(UninstallOptions(layout=layout, echo=said.append))
    assert not layout.unit_path.exists()
    assert not layout.venv_dir.exists()
    assert layout.config_path.is_file() and layout.data_dir.is_dir()

    uninstall(UninstallOptions(layout=layout, purge=True, echo=said.append))
    assert not layout.config_dir.exists()
    assert not layout.data_dir.exists()


def test_a_dry_run_prints_the_plan_and_changes_nothing(tmp_path: Path) -> None:
    said: list[str] = []
    report = install(
        InstallOptions(
            layout=_layout(tmp_path),
            board=FAKE_BOARDS["fake-jetson-orin-nano-jetpack-6"][2],
            create_user=False,
            start=False,
            dry_run=True,
            echo=said.append,
        )
    )
    assert report.dry_run and not report.config_written
    assert list(tmp_path.iterdir()) == []
    assert any(step.startswith("replace onnxruntime with onnxruntime-gpu") for step in report.steps)
    assert [line for line in said if line.startswith("[")] == [
        f"[{n}/{len(report.steps)}] {step}" for n, step in enumerate(report.steps, 1)
    ]


def test_an_existing_config_is_kept_and_a_broken_one_stops_the_install(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    layout.config_dir.mkdir(parents=True)
    layout.config_path.write_text(
        render_config(device_id="kept", data_dir=layout.data_dir, mqtt_host="fleet.lan")
    )
    options = InstallOptions(layout=layout, create_user=False, start=False, dry_run=True)
    report = install(options)
    assert not any("write the config" in step for step in report.steps)

    layout.config_path.write_text('device_id = "no spaces allowed"\n')
    with pytest.raises(InstallError, match="--force"):
        install(options)
    forced = install(dataclasses.replace(options, force=True))
    assert any("write the config" in step for step in forced.steps)


def test_uninstall_refuses_a_venv_path_that_is_no_venv(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    (layout.venv_dir / "precious").mkdir(parents=True)
    with pytest.raises(InstallError, match=r"pyvenv\.cfg"):
        uninstall(UninstallOptions(layout=layout))
    assert (layout.venv_dir / "precious").is_dir()


# --- the GPU wheel swap, with real pip and tiny wheels -------------------------------------


def _wheel(folder: Path, distribution: str, flavour: str) -> None:
    """A wheel of ``distribution`` owning the import package ``swapme``, as onnxruntime and
    onnxruntime-gpu both own ``onnxruntime``."""
    stem = f"{distribution.replace('-', '_')}-1.0"
    files = {
        "swapme/__init__.py": f"FLAVOUR = {flavour!r}\n",
        f"{stem}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n"
        ),
        f"{stem}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = [
        f"{name},sha256="
        f"{base64.urlsafe_b64encode(hashlib.sha256(body.encode()).digest()).rstrip(b'=').decode()}"
        f",{len(body.encode())}"
        for name, body in files.items()
    ]
    files[f"{stem}.dist-info/RECORD"] = "\n".join([*record, f"{stem}.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as archive:
        for name, body in files.items():
            archive.writestr(name, body)


def test_the_gpu_wheel_swap_and_its_fallback_with_real_pip(tmp_path: Path) -> None:
    # A venv without pip of its own, driven by this one's pip: the swap takes pip's command
    # line as given, and skipping ensurepip saves seconds.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "swapme-cpu", "cpu")
    offline = ["--no-index", "--find-links", str(wheels)]

    def flavour() -> str:
        """The ``swapme`` that imports, and the distributions installed: ``gpu swapme-gpu``."""
        return subprocess.run(
            [
                python,
                "-c",
                "import importlib.metadata as m, swapme\n"
                "names = sorted(d.metadata['Name'] for d in m.distributions())\n"
                "print(swapme.FLAVOUR, *(n for n in names if n.startswith('swapme')))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    gpu = RuntimeWheel("swapme-gpu", why="the test GPU", replaces="swapme-cpu")

    # no GPU wheel to be had: a warning, and the CPU wheel (back) in place
    warning = _swap_in(pip, gpu, offline)
    assert warning is not None and "swapme-gpu" in warning
    assert flavour() == "cpu swapme-cpu"

    # with one, it replaces the CPU wheel, even one reinstalled over it (as upgrading
    # edgefleet[agent] reinstalls onnxruntime over onnxruntime-gpu)
    _wheel(wheels, "swapme-gpu", "gpu")
    subprocess.run([*pip, "install", "--quiet", *offline, "swapme-gpu"], check=True)
    subprocess.run(
        [*pip, "install", "--quiet", "--force-reinstall", *offline, "swapme-cpu"], check=True
    )
    assert flavour() == "cpu swapme-cpu swapme-gpu"
    assert _swap_in(pip, gpu, offline) is None
    assert flavour() == "gpu swapme-gpu"


# --- install.sh ------------------------------------------------------------------------------

INSTALL_SH = REPO / "agent" / "install.sh"


def test_install_sh_parses_and_is_shellcheck_clean() -> None:
    subprocess.run(["sh", "-n", INSTALL_SH], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package: shellcheck)")
    done = subprocess.run(["shellcheck", INSTALL_SH], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_install_sh_refuses_a_python_that_is_too_old() -> None:
    done = subprocess.run(
        ["sh", INSTALL_SH],
        env={**os.environ, "PYTHON": "false"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "Python 3.11 or later" in done.stderr


# --- sd_notify over a real socket ------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket at a short filesystem path (unix paths stop at 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn") as folder:
        path = os.path.join(folder, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(path)
            server.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield server


def test_notify_sends_ready_and_watchdog(notify_socket: socket.socket) -> None:
    assert notify("READY=1")
    assert notify("WATCHDOG=1")
    assert notify_socket.recv(4096) == b"READY=1"
    assert notify_socket.recv(4096) == b"WATCHDOG=1"


def test_notify_reaches_an_abstract_socket_from_another_process() -> None:
    name = f"edgefleet-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from agent.sd_notify import notify; assert notify('READY=1\\nSTATUS=serving')",
            ],
            env={**os.environ, "NOTIFY_SOCKET": f"@{name}"},
            check=True,
            timeout=60,
        )
        assert server.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify("READY=1")


def test_a_notify_socket_nobody_listens_on_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    with pytest.raises(OSError):
        notify("WATCHDOG=1")


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "other", None),
        (None, None, None),
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            own = str(os.getpid())
            monkeypatch.setenv(key, {"self": own, "other": own + "0"}.get(value, value))
    assert watchdog_interval() == expected


def test_the_cli_keeps_the_agent_extra_for_a_local_package(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgefleet.cli import app

    layout = [
        *("--venv", str(tmp_path / "venv"), "--config-dir", str(tmp_path / "etc")),
        *("--data-dir", str(tmp_path / "data"), "--systemd-dir", str(tmp_path / "units")),
    ]
    result = CliRunner().invoke(
        app,
        ["agent", "install", "--package", str(REPO), "--dry-run", "--no-create-user",
         "--no-start", *layout],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"pip install '{REPO}[agent]' (minutes on a small board)" in result.output


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another group needs root")
def test_config_and_secrets_are_readable_by_the_service_group_only(tmp_path: Path) -> None:
    """install makes the config folder root's in the service's group; enroll's secrets there
    are 0640 in that group (the service runs as its own user), elsewhere 0600."""
    from agent.enroll import _write
    from agent.install.plan import _make_config_dir

    service = "nobody"  # a user every Debian has, standing in for edgefleet
    config_dir = tmp_path / "etc" / "edgefleet"
    _make_config_dir(config_dir, service)
    group = pwd.getpwnam(service).pw_gid
    stat = config_dir.stat()
    assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o777) == (0, group, 0o750)
    _write(config_dir / "agent.toml", "secret", private=True)
    _write(config_dir / "root.json", "{}", private=False)
    secret = (config_dir / "agent.toml").stat()
    assert (secret.st_gid, secret.st_mode & 0o777) == (group, 0o640)
    assert (config_dir / "root.json").stat().st_mode & 0o777 == 0o644
    _write(tmp_path / "agent.toml", "secret", private=True)  # a folder of root's own group
    assert (tmp_path / "agent.toml").stat().st_mode & 0o777 == 0o600


def test_the_cli_prints_the_install_plan_and_changes_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgefleet.cli import app

    layout = [
        *("--venv", str(tmp_path / "venv"), "--config-dir", str(tmp_path / "etc")),
        *("--data-dir", str(tmp_path / "data"), "--systemd-dir", str(tmp_path / "units")),
    ]
    result = CliRunner().invoke(
        app, ["agent", "install", "--dry-run", "--no-create-user", "--no-start", *layout]
    )
    assert result.exit_code == 0, result.output
    assert "dry run: nothing is changed" in result.output
    assert f"write the unit {tmp_path / 'units' / 'edgefleet-agent.service'}" in result.output
    assert list(tmp_path.iterdir()) == []
    removed = CliRunner().invoke(app, ["agent", "uninstall", "--dry-run", *layout])
    assert removed.exit_code == 0, removed.output
