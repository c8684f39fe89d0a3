"""Put the agent on a board: a venv, the right runtime wheels, a systemd unit and a config.

The pure pieces come first: what board this is (:func:`detect_board`), which runtime wheels
it gets (:func:`runtime_packages`), and the text of the unit and the starter config
(:func:`render_unit`, :func:`render_config`). :func:`install` and :func:`uninstall` then
plan their steps from what they read, before changing anything, print each step as they
take it, and with ``dry_run`` print the plan only.

JetPack
-------
A Jetson names its Jetson Linux (L4T) release in ``/etc/nv_tegra_release``
(``# R36 (release), REVISION: 4.3, ...``) or, on images without that file, in the version of
the ``nvidia-l4t-core`` package (``36.4.3-20250107174145``). :data:`JETPACK_FOR_L4T` maps
exact releases to JetPack versions, from NVIDIA's JetPack archive; a release it does not
list still gets its JetPack major version (:attr:`Board.jetpack_major`) from the L4T major
(32: 4, 34 and 35: 5, 36: 6, 38: 7), never a guessed minor.

Runtime wheels
--------------
``edgefleet[agent]`` brings ONNX Runtime (CPU) and LiteRT, which publish aarch64 and x86_64
wheels only: a 32-bit OS is refused with the fix. On top of it:

* A Jetson on L4T R36.4 (JetPack 6.1 to 6.2.x, CUDA 12.6) gets ``onnxruntime-gpu`` from
  NVIDIA's Jetson AI Lab index, :data:`JETSON_JP6_INDEX_URL`, in place of ``onnxruntime``:
  both own the ``onnxruntime`` import package, so the CPU one is uninstalled first. NVIDIA
  builds these for the JetPack's own Python (3.10 on JetPack 6), and edgefleet needs 3.11,
  so the index may have no wheel for the venv: the GPU wheel is optional, and without one
  the CPU ``onnxruntime`` goes back in and the install says so. ``gpu_index_url`` (or pip's
  ``--find-links``) points at a cp311 build instead.
* Any other Jetson (JetPack 4, 5, 6.0, 7) keeps the CPU ``onnxruntime``: NVIDIA's wheels for
  JetPack 4 and 5 are for Python 3.6 and 3.8, and JetPack 6.0's CUDA 12.2 index is retired.
* ``tvm=True`` adds ``apache-tvm`` and ``apache-tvm-ffi`` at the compiler extra's pins (an
  artifact only loads in the TVM that built it). It is the whole TVM wheel, hundreds of MB,
  as PyPI has no runtime-only one; hence opt-in.

Version ranges come from edgefleet's own metadata, so they move with ``pyproject.toml``.

The unit
--------
``Type=notify`` with a watchdog (the daemon pings through :mod:`agent.sd_notify`),
``Restart=always``, a dedicated system user, and the sandboxing that leaves a Jetson GPU
working. Left out on purpose: ``PrivateDevices=``, ``DevicePolicy=`` and ``ProtectClock=``
(device allow-lists hide ``/dev/nvhost-*``, ``/dev/nvmap`` and ``/dev/nvgpu``),
``MemoryDenyWriteExecute=`` (CUDA's PTX JIT, TVM and ONNX Runtime map executable memory),
``ProcSubset=pid`` (runtimes read ``/proc/cpuinfo``), ``PrivateUsers=`` (it would unmap the
groups that own the GPU nodes) and an allow-list ``SystemCallFilter=``: only groups of calls
the agent never makes are denied. On a Jetson the user also joins the ``video`` and
``render`` groups that own the GPU nodes.
"""

from __future__ import annotations

import functools
import grp
import importlib.metadata
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from contracts.durable import write_atomic

from .config import AgentConfig, load_config
from .errors import ConfigError, InstallError

__all__ = [
    "JETPACK_FOR_L4T",
    "JETSON_JP6_INDEX_URL",
    "Board",
    "InstallOptions",
    "InstallReport",
    "Layout",
    "RuntimeWheel",
    "UninstallOptions",
    "UninstallReport",
    "default_device_id",
    "detect_board",
    "install",
    "render_config",
    "render_unit",
    "runtime_packages",
    "systemd_booted",
    "uninstall",
]

Family = Literal["raspberry-pi", "jetson", "generic"]

JETPACK_FOR_L4T: dict[str, str] = {
    "32.4.3": "4.4",
    "32.4.4": "4.4.1",
    "32.5.0": "4.5",
    "32.5.1": "4.5.1",
    "32.6.1": "4.6",
    "32.7.1": "4.6.1",
    "32.7.2": "4.6.2",
    "32.7.3": "4.6.3",
    "32.7.4": "4.6.4",
    "32.7.5": "4.6.5",
    "32.7.6": "4.6.6",
    "34.1.0": "5.0 DP",
    "34.1.1": "5.0.1 DP",
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
    "38.2.0": "7.0",
}
"""Exact Jetson Linux (L4T) releases and the JetPack that ships them."""

_JETPACK_MAJOR_FOR_L4T = {32: 4, 34: 5, 35: 5, 36: 6, 38: 7}

JETSON_JP6_INDEX_URL = "https://pypi.jetson-ai-lab.io/jp6/cu126"
"""NVIDIA's Jetson AI Lab package index for JetPack 6.1+ (CUDA 12.6, Ubuntu 22.04)."""

_GPU_INDEX_FOR_L4T = {"36.4": JETSON_JP6_INDEX_URL}
"""L4T major.minor -> an index with ``onnxruntime-gpu`` built for that release's CUDA."""

_PROFILE_FOR_MODEL = (
    ("Raspberry Pi 5", "rpi5"),
    ("Raspberry Pi 4", "rpi4"),
    ("NVIDIA Jetson Orin Nano", "jetson-orin-nano"),
    ("NVIDIA Jetson Nano", "jetson-nano"),
)
"""Device-tree model prefixes -> the hardware profile of that board, most specific first."""

_GPU_GROUPS: dict[Family, tuple[str, ...]] = {"jetson": ("video", "render")}
"""Groups owning the GPU device nodes, joined by the service user where they exist."""

_DENIED_SYSCALL_GROUPS = (
    "@clock", "@cpu-emulation", "@debug", "@module", "@mount", "@obsolete", "@raw-io",
    "@reboot", "@swap",
)  # fmt: skip
"""System calls the agent never makes, refused with EPERM. A deny list: an allow list such
as ``@system-service`` would have to know what NVIDIA's user-space driver calls."""

_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_WHEEL_ARCHES = ("aarch64", "x86_64")
_L4T_LINE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")
_PATH_UNSAFE_IN_UNIT = re.compile(r"[\s\"'\\%;$]")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


# --- the board ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Board:
    """What the installer knows about the machine it runs on."""

    arch: str
    """``aarch64`` or ``x86_64`` (aliases folded), else what ``platform.machine()`` says."""
    family: Family
    model: str | None = None
    """The device tree's model string, e.g. ``Raspberry Pi 4 Model B Rev 1.4``."""
    l4t: str | None = None
    """Jetson Linux release, e.g. ``36.4.3``."""
    jetpack: str | None = None
    """JetPack version for an L4T release :data:`JETPACK_FOR_L4T` lists."""
    profile: str | None = None
    """The hardware profile of this board, when it is one edgefleet ships."""

    @property
    def jetpack_major(self) -> int | None:
        if self.l4t is None:
            return None
        return _JETPACK_MAJOR_FOR_L4T.get(int(self.l4t.split(".")[0]))

    def describe(self) -> str:
        facts = [self.arch]
        if self.l4t:
            facts.append(f"L4T {self.l4t}")
            if self.jetpack:
                facts.append(f"JetPack {self.jetpack}")
            elif self.jetpack_major:
                facts.append(f"JetPack {self.jetpack_major}.x")
        if self.profile:
            facts.append(f"profile {self.profile}")
        return f"{self.model or self.family} ({', '.join(facts)})"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _l4t_release(root: Path) -> str | None:
    text = _read_text(root / "etc/nv_tegra_release")
    if text and (match := _L4T_LINE.search(text)):
        return f"{match[1]}.{match[2]}"
    status = _read_text(root / "var/lib/dpkg/status") or ""
    for stanza in status.split("\n\n"):
        lines = stanza.splitlines()
        if "Package: nvidia-l4t-core" in lines:
            for line in lines:
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip().split("-")[0]
    return None


def detect_board(root: Path = Path("/"), machine: str | None = None) -> Board:
    """Read the board from ``root``'s ``/proc/device-tree``, ``/etc`` and dpkg status.

    ``machine`` stands in for ``platform.machine()``; tests pass both to describe a board
    other than the one they run on.
    """
    raw_arch = machine or platform.machine()
    arch = _ARCH_ALIASES.get(raw_arch.lower(), raw_arch)
    model = (_read_text(root / "proc/device-tree/model") or "").strip("\0 \n")
    l4t = _l4t_release(root)
    family: Family = "generic"
    if l4t or model.startswith("NVIDIA Jetson"):
        family = "jetson"
    elif model.startswith("Raspberry Pi"):
        family = "raspberry-pi"
    profile = next((p for prefix, p in _PROFILE_FOR_MODEL if model.startswith(prefix)), None)
    return Board(
        arch=arch,
        family=family,
        model=model or None,
        l4t=l4t,
        jetpack=JETPACK_FOR_L4T.get(l4t) if l4t else None,
        profile=profile,
    )


def systemd_booted(root: Path = Path("/")) -> bool:
    """Whether systemd is the init system here (what ``sd_booted()`` checks)."""
    return (root / "run/systemd/system").is_dir()


# --- runtime wheels -----------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeWheel:
    """A pip requirement installed after ``edgefleet[agent]``, and why."""

    requirement: str
    why: str
    index_url: str | None = None
    """An extra index it comes from; ``None``: the indexes pip is configured with."""
    replaces: str | None = None
    """A distribution it replaces, both owning one import package: that one is uninstalled
    first, and put back (with a warning) when pip cannot get this one."""


def _edgefleet_requirement(name: str, extra: str) -> str:
    """``name`` with the version range edgefleet's ``extra`` gives it; bare when unknown."""
    try:
        requirements = importlib.metadata.requires("edgefleet") or []
    except importlib.metadata.PackageNotFoundError:
        return name
    pattern = re.compile(rf"{re.escape(name)}(?![\w.-])", re.IGNORECASE)
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if f'extra == "{extra}"' in marker and pattern.match(spec.strip()):
            return spec.strip()
    return name


def runtime_packages(
    board: Board, *, tvm: bool = False, gpu_index_url: str | None = None
) -> list[RuntimeWheel]:
    """The runtime wheels ``board`` gets beyond ``edgefleet[agent]`` (see the module doc).

    ``gpu_index_url`` replaces the built-in choice of index for a Jetson's
    ``onnxruntime-gpu``, and gives one to a JetPack that has none.
    """
    if board.arch not in _WHEEL_ARCHES:
        raise InstallError(
            f"this is a {board.arch} system; onnxruntime, ai-edge-litert and apache-tvm publish "
            "aarch64 and x86_64 wheels only. On a Raspberry Pi, flash the 64-bit Raspberry Pi OS."
        )
    wheels: list[RuntimeWheel] = []
    index = gpu_index_url
    if board.family == "jetson" and index is None and board.l4t:
        index = _GPU_INDEX_FOR_L4T.get(".".join(board.l4t.split(".")[:2]))
    if board.family == "jetson" and index:
        cpu = _edgefleet_requirement("onnxruntime", "agent")
        wheels.append(
            RuntimeWheel(
                requirement="onnxruntime-gpu" + cpu[len("onnxruntime") :],
                why="the CUDA and TensorRT execution providers on the Jetson GPU",
                index_url=index,
                replaces="onnxruntime",
            )
        )
    if tvm:
        wheels += [
            RuntimeWheel(
                _edgefleet_requirement(name, "compiler"),
                why="TVM artifacts load only in the TVM that built them: the compiler's pin",
            )
            for name in ("apache-tvm", "apache-tvm-ffi")
        ]
    return wheels


# --- the unit and the config --------------------------------------------------------------


def _unit_path(path: Path, what: str) -> str:
    if not path.is_absolute() or _PATH_UNSAFE_IN_UNIT.search(str(path)):
        raise InstallError(
            f"the {what} path {str(path)!r} cannot go into a systemd unit as is: expected an "
            "absolute path without spaces, quotes, backslashes, '%', ';' or '$'; choose another"
        )
    return str(path)


def render_unit(
    *,
    venv_dir: Path,
    config: Path,
    data_dir: Path,
    user: str = "edgefleet",
    supplementary_groups: Sequence[str] = (),
    watchdog_s: int = 30,
    restart_s: int = 5,
    start_timeout_s: int = 300,
) -> str:
    """The agent's systemd service unit (see the module doc for what is left out and why).

    ``StateDirectory=`` is set when ``data_dir`` is directly under ``/var/lib``, so systemd
    creates it and hands it to ``user``; ``ReadWritePaths=`` always names it.
    """
    if watchdog_s < 1 or restart_s < 0 or start_timeout_s < 1:
        raise InstallError(
            f"expected watchdog_s >= 1, restart_s >= 0 and start_timeout_s >= 1 seconds, got "
            f"{watchdog_s}, {restart_s} and {start_timeout_s}"
        )
    if not _USER_NAME.fullmatch(user):
        raise InstallError(
            f"{user!r} is not a user name useradd accepts: expected lower-case letters, digits, "
            "'_' and '-', starting with a letter or '_'"
        )
    executable = _unit_path(venv_dir / "bin" / "edgefleet", "venv")
    config_path = _unit_path(config, "config")
    data = _unit_path(data_dir, "data")
    lines = [
        "# Written by `edgefleet agent install`; running it again rewrites this file.",
        "[Unit]",
        "Description=edgefleet agent: local inference, telemetry and OTA updates",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={executable} agent run --config {config_path}",
        "Restart=always",
        f"RestartSec={restart_s}",
        f"WatchdogSec={watchdog_s}",
        f"TimeoutStartSec={start_timeout_s}",
        f"User={user}",
        f"Group={user}",
    ]
    if supplementary_groups:
        lines.append(f"SupplementaryGroups={' '.join(supplementary_groups)}")
    if data_dir.parent == Path("/var/lib"):
        lines += [f"StateDirectory={data_dir.name}", "StateDirectoryMode=0750"]
    lines += [
        f"ReadWritePaths={data}",
        # CUDA caches JIT-compiled kernels here; without it a Jetson recompiles every start.
        "CacheDirectory=edgefleet",
        "Environment=PYTHONUNBUFFERED=1",
        "Environment=XDG_CACHE_HOME=%C/edgefleet CUDA_CACHE_PATH=%C/edgefleet/cuda",
        "UMask=0027",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "PrivateMounts=yes",
        "ProtectProc=invisible",
        "RemoveIPC=yes",
        "CapabilityBoundingSet=",
        "SystemCallArchitectures=native",
        f"SystemCallFilter=~{' '.join(_DENIED_SYSCALL_GROUPS)}",
        "SystemCallErrorNumber=EPERM",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def default_device_id() -> str:
    """The host name, made fit for ``device_id`` (letters, digits, ``._-``, 64 at most)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "edgefleet-device"


def render_config(
    *, device_id: str, data_dir: Path, mqtt_host: str = "127.0.0.1", mqtt_port: int = 1883
) -> str:
    """A starter ``agent.toml``, checked against :class:`agent.config.AgentConfig`."""
    text = f"""\
# The edgefleet agent's config, written by `edgefleet agent install`.
# Only device_id and data_dir are required; every other key has a default.
device_id = {json.dumps(device_id)}
data_dir = {json.dumps(str(data_dir))}

[mqtt]
host = {json.dumps(mqtt_host)}
port = {mqtt_port}

[api]
# The local Open Inference Protocol server; loopback unless you mean otherwise.
host = "127.0.0.1"
port = 8800
"""
    try:
        AgentConfig.model_validate(tomllib.loads(text))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise InstallError(f"cannot write a valid agent.toml: {problems}") from e
    return text


# --- install and uninstall ----------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the agent's files go on the board."""

    venv_dir: Path = Path("/opt/edgefleet/venv")
    systemd_dir: Path = Path("/etc/systemd/system")
    config_dir: Path = Path("/etc/edgefleet")
    data_dir: Path = Path("/var/lib/edgefleet")
    unit_name: str = "edgefleet-agent.service"

    @property
    def unit_path(self) -> Path:
        return self.systemd_dir / self.unit_name

    @property
    def config_path(self) -> Path:
        return self.config_dir / "agent.toml"

    @property
    def executable(self) -> Path:
        return self.venv_dir / "bin" / "edgefleet"


@dataclass(frozen=True)
class InstallOptions:
    """What :func:`install` does; the defaults are a production install on this board."""

    layout: Layout = Layout()
    package: str = "edgefleet[agent]"
    """A pip requirement, or a local path or wheel (add ``[agent]`` for its dependencies)."""
    pip_args: tuple[str, ...] = ()
    """Extra ``pip install`` arguments, e.g. ``("--no-index", "--find-links", "/media/wheels")``."""
    python: Path | None = None
    """The interpreter the venv is made from; ``None``: the one running this. A venv's is
    fine (``install.sh`` runs from a throwaway one): the new venv links to its base."""
    system_site_packages: bool = False
    user: str = "edgefleet"
    create_user: bool = True
    device_id: str | None = None
    """``None``: the host name (see :func:`default_device_id`)."""
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    tvm: bool = False
    gpu_index_url: str | None = None
    watchdog_s: int = 30
    restart_s: int = 5
    start: bool = True
    """``systemctl enable --now`` the unit (only where systemd is running)."""
    force: bool = False
    """Replace an existing config."""
    dry_run: bool = False
    board: Board | None = None
    """``None``: :func:`detect_board`."""
    echo: Callable[[str], None] = print


@dataclass(frozen=True)
class InstallReport:
    board: Board
    wheels: tuple[RuntimeWheel, ...]
    layout: Layout
    steps: tuple[str, ...]
    """What was done, in order (with ``dry_run``: what would be)."""
    warnings: tuple[str, ...]
    config_written: bool
    started: bool
    dry_run: bool


@dataclass(frozen=True)
class UninstallOptions:
    layout: Layout = Layout()
    purge: bool = False
    """Also remove the config and the data directory (models, telemetry queue, update state)."""
    stop: bool = True
    """``systemctl disable --now`` the unit first (only where systemd is running)."""
    dry_run: bool = False
    echo: Callable[[str], None] = print


@dataclass(frozen=True)
class UninstallReport:
    steps: tuple[str, ...]
    warnings: tuple[str, ...]
    dry_run: bool


@dataclass(frozen=True)
class _Step:
    says: str
    action: Callable[[], object]


@dataclass
class _Plan:
    steps: list[_Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    echo: Callable[[str], None] = print

    def add(self, says: str, action: Callable[[], object]) -> None:
        self.steps.append(_Step(says, action))

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.echo(f"warning: {message}")

    def carry_out(self, dry_run: bool) -> tuple[str, ...]:
        if dry_run:
            self.echo("dry run: nothing is changed. The plan:")
        if not self.steps:
            self.echo("nothing to do")
        for number, step in enumerate(self.steps, 1):
            self.echo(f"[{number}/{len(self.steps)}] {step.says}")
            if dry_run:
                continue
            try:
                step.action()
            except OSError as e:
                where = f" ({e.filename})" if e.filename else ""
                hint = (
                    " Run as root (sudo), or choose paths you can write."
                    if isinstance(e, PermissionError)
                    else ""
                )
                raise InstallError(f"{step.says}: {e.strerror or e}{where}.{hint}") from e
        return tuple(step.says for step in self.steps)


def _run(
    command: Sequence[str | Path], *, hint: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` quietly; with ``check``, a failure is an :class:`InstallError`."""
    argv = [str(part) for part in command]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    except OSError as e:
        raise InstallError(f"cannot run {argv[0]}: {e.strerror or e}. {hint}") from e
    if check and done.returncode != 0:
        raise InstallError(
            f"`{shlex.join(argv)}` failed (exit {done.returncode}):\n{_tail(done)}\n{hint}"
        )
    return done


def _tail(done: subprocess.CompletedProcess[str], lines: int = 15) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-lines:])


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode(), mode=mode)


def _user_ids(user: str) -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _existing_groups(names: Sequence[str]) -> list[str]:
    found = []
    for name in names:
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        found.append(name)
    return found


def _make_data_dir(path: Path, user: str) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o750)
    ids = _user_ids(user)
    if ids is not None and os.geteuid() == 0:
        os.chown(path, *ids)


def _swap_in(pip: Sequence[str], wheel: RuntimeWheel, pip_args: Sequence[str]) -> str | None:
    """Install ``wheel`` in place of ``wheel.replaces``, or put that back and say why not."""
    if wheel.replaces is None:
        raise ValueError(f"{wheel.requirement} replaces nothing: pip install it instead")
    replaced = _edgefleet_requirement(wheel.replaces, "agent")
    index = ["--extra-index-url", wheel.index_url] if wheel.index_url else []
    _run([*pip, "uninstall", "--yes", wheel.replaces], hint="check the venv's pip.")
    # --no-deps: the dependencies are the replaced wheel's, already there. --force-reinstall:
    # reinstalling edgefleet[agent] may have put the replaced wheel's files over this one's.
    swap = [*pip, "install", "--force-reinstall", "--no-deps", *pip_args, *index]
    done = _run([*swap, wheel.requirement], hint="", check=False)
    if done.returncode == 0:
        return None
    _run(
        [*pip, "install", "--no-deps", *pip_args, replaced],
        hint=f"the venv lacks {replaced} now: install it into the venv by hand.",
    )
    return (
        f"pip could not install {wheel.requirement} ({_tail(done, 1) or f'exit {done.returncode}'}"
        f"); {replaced} is back in its place. For {wheel.why}, give pip an index or a "
        f"--find-links folder with a {wheel.requirement} wheel for this Python."
    )


def _plan_user(plan: _Plan, options: InstallOptions, starting: bool) -> None:
    if _user_ids(options.user) is not None:
        return
    if options.create_user:
        useradd = [
            "useradd", "--system", "--user-group", "--no-create-home",
            "--home-dir", str(options.layout.data_dir), "--shell", "/usr/sbin/nologin",
            options.user,
        ]  # fmt: skip
        plan.add(
            f"create the system user {options.user} (no login, home {options.layout.data_dir})",
            functools.partial(_run, useradd, hint="run as root (sudo), or create the user."),
        )
    elif starting:
        raise InstallError(
            f"the service user {options.user!r} does not exist and user creation is off: "
            f"create it (useradd --system --user-group {options.user}) or let install do it"
        )
    else:
        plan.warn(f"the unit runs as {options.user!r}, which does not exist yet")


def _plan_python(plan: _Plan, options: InstallOptions, wheels: Sequence[RuntimeWheel]) -> None:
    """The venv, the package, the runtime wheels, and a check that the entry point runs."""
    layout = options.layout
    pip = [str(layout.venv_dir / "bin" / "python"), "-m", "pip"]
    pip_args = list(options.pip_args)
    if (layout.venv_dir / "pyvenv.cfg").is_file():
        options.echo(f"reusing the venv {layout.venv_dir}")
    else:
        python = str(options.python or sys.executable)
        flags = ["--system-site-packages"] if options.system_site_packages else []
        venv = [python, "-m", "venv", *flags, str(layout.venv_dir)]
        plan.add(
            f"create the venv {layout.venv_dir} with {python}",
            functools.partial(
                _run,
                venv,
                hint="on Debian and Ubuntu, apt install python3-venv (or python3.11-venv).",
            ),
        )
    plan.add(
        f"pip install {shlex.join([*pip_args, options.package])} (minutes on a small board)",
        functools.partial(
            _run,
            [*pip, "install", "--upgrade", *pip_args, options.package],
            hint="check the network or the index (pip args such as --index-url, --find-links).",
        ),
    )
    for wheel in wheels:
        source = f" from {wheel.index_url}" if wheel.index_url else ""
        if wheel.replaces:

            def swap(wheel: RuntimeWheel = wheel) -> None:
                if (warning := _swap_in(pip, wheel, pip_args)) is not None:
                    plan.warn(warning)

            plan.add(
                f"replace {wheel.replaces} with {wheel.requirement}{source}: {wheel.why}", swap
            )
        else:
            plan.add(
                f"pip install {wheel.requirement}{source}: {wheel.why}",
                functools.partial(
                    _run,
                    [*pip, "install", *pip_args, wheel.requirement],
                    hint="or install without this runtime.",
                ),
            )
    plan.add(
        f"check that {layout.executable} runs",
        functools.partial(
            _run, [layout.executable, "--help"], hint=f"reinstall {options.package}."
        ),
    )


def _plan_files(plan: _Plan, options: InstallOptions, unit_text: str, config_text: str) -> bool:
    """The data directory, the config (unless one is kept) and the unit; whether the config
    is written."""
    layout = options.layout
    plan.add(
        f"create the data directory {layout.data_dir}",
        functools.partial(_make_data_dir, layout.data_dir, options.user),
    )
    write_config = options.force or not layout.config_path.exists()
    if write_config:
        plan.add(
            f"write the config {layout.config_path}",
            functools.partial(_write_atomic, layout.config_path, config_text),
        )
    else:
        try:
            load_config(layout.config_path)
        except ConfigError as e:
            raise InstallError(f"{e}. Fix the existing config, or replace it with --force.") from e
        options.echo(f"keeping the existing config {layout.config_path} (--force replaces it)")
    plan.add(
        f"write the unit {layout.unit_path}",
        functools.partial(_write_atomic, layout.unit_path, unit_text),
    )
    return write_config


def install(options: InstallOptions) -> InstallReport:
    """Install the agent as a systemd service (the module doc says what goes where).

    Everything that can be checked is checked before the first change: the board, the unit
    and config text, an existing config, the service user.
    """
    layout = options.layout
    board = options.board or detect_board()
    options.echo(f"board: {board.describe()}")
    plan = _Plan(echo=options.echo)
    wheels = runtime_packages(board, tvm=options.tvm, gpu_index_url=options.gpu_index_url)
    if board.family == "jetson" and not any(w.replaces == "onnxruntime" for w in wheels):
        plan.warn(
            f"no onnxruntime-gpu index is known for L4T {board.l4t or '(unknown)'}: the agent "
            "uses ONNX Runtime's CPU provider. Give a GPU index URL to use the GPU."
        )
    unit_text = render_unit(
        venv_dir=layout.venv_dir,
        config=layout.config_path,
        data_dir=layout.data_dir,
        user=options.user,
        supplementary_groups=_existing_groups(_GPU_GROUPS.get(board.family, ())),
        watchdog_s=options.watchdog_s,
        restart_s=options.restart_s,
    )
    config_text = render_config(
        device_id=options.device_id or default_device_id(),
        data_dir=layout.data_dir,
        mqtt_host=options.mqtt_host,
        mqtt_port=options.mqtt_port,
    )
    starting = options.start and systemd_booted()
    if options.start and not starting:
        plan.warn(
            "systemd is not running here (no /run/systemd/system): the unit is written but not "
            f"started. On the board: systemctl daemon-reload && systemctl enable --now "
            f"{layout.unit_name}"
        )

    _plan_user(plan, options, starting)
    _plan_python(plan, options, wheels)
    write_config = _plan_files(plan, options, unit_text, config_text)
    if starting:
        for command in (["daemon-reload"], ["enable", "--now", layout.unit_name]):
            plan.add(
                f"systemctl {shlex.join(command)}",
                functools.partial(
                    _run, ["systemctl", *command], hint=f"see journalctl -u {layout.unit_name}."
                ),
            )

    steps = plan.carry_out(options.dry_run)
    return InstallReport(
        board=board,
        wheels=tuple(wheels),
        layout=layout,
        steps=steps,
        warnings=tuple(plan.warnings),
        config_written=write_config and not options.dry_run,
        started=starting and not options.dry_run,
        dry_run=options.dry_run,
    )


def uninstall(options: UninstallOptions) -> UninstallReport:
    """Stop and remove the service and its venv; with ``purge``, its config and data too.

    The system user stays (``userdel edgefleet`` removes it): files it owns may remain.
    """
    layout = options.layout
    plan = _Plan(echo=options.echo)
    systemd = systemd_booted()
    unit_present = layout.unit_path.exists()

    if options.stop and systemd and unit_present:

        def stop() -> None:
            try:
                _run(["systemctl", "disable", "--now", layout.unit_name], hint="")
            except InstallError as e:
                plan.warn(f"{e}\nthe service may still be running: systemctl stop it yourself")

        plan.add(f"systemctl disable --now {layout.unit_name}", stop)
    if unit_present:
        plan.add(f"remove the unit {layout.unit_path}", layout.unit_path.unlink)
        if systemd:
            plan.add(
                "systemctl daemon-reload",
                functools.partial(_run, ["systemctl", "daemon-reload"], hint="see journalctl -xe."),
            )
    if layout.venv_dir.exists():
        if not (layout.venv_dir / "pyvenv.cfg").is_file():
            raise InstallError(
                f"{layout.venv_dir} does not look like a venv (no pyvenv.cfg), so it is not "
                "removed: check the venv path"
            )
        plan.add(
            f"remove the venv {layout.venv_dir}", functools.partial(shutil.rmtree, layout.venv_dir)
        )
    if options.purge:
        config_path = layout.config_path
        if config_path.exists():
            plan.add(f"remove the config {config_path}", config_path.unlink)

            def drop_empty_config_dir() -> None:
                if not any(layout.config_dir.iterdir()):
                    layout.config_dir.rmdir()

            plan.add(f"remove {layout.config_dir} if it is empty", drop_empty_config_dir)
        if layout.data_dir.exists():
            if len(layout.data_dir.resolve().parts) < 3:
                raise InstallError(
                    f"refusing to remove {layout.data_dir} as the data directory: it is too "
                    "near the root; check the data path"
                )
            plan.add(
                f"remove the data directory {layout.data_dir}",
                functools.partial(shutil.rmtree, layout.data_dir),
            )
    else:
        options.echo(
            f"keeping the config {layout.config_path} and the data {layout.data_dir} "
            "(--purge removes them)"
        )
    steps = plan.carry_out(options.dry_run)
    return UninstallReport(steps=steps, warnings=tuple(plan.warnings), dry_run=options.dry_run)
