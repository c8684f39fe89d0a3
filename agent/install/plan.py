"""Installing and uninstalling the agent as a systemd service: :func:`install`, :func:`uninstall`.

Each plans its steps from what it reads (the board, the :class:`Layout` on disk, the service
user) before changing anything, checking all it can first; then it prints each step as it
takes it, and with ``dry_run`` prints the plan only. The steps run pip in the agent's venv
(swapping in a GPU wheel where :func:`agent.install.packages.runtime_packages` says so),
create the service user, write the config and the unit (:mod:`agent.install.starter_config`,
:mod:`agent.install.unit`), and enable the unit where systemd runs.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from contracts.durable import write_atomic

from ..config import load_config
from ..errors import ConfigError, InstallError
from .boards import GPU_GROUPS, Board, detect_board, systemd_booted
from .packages import RuntimeWheel, edgefleet_requirement, runtime_packages
from .starter_config import default_device_id, render_config
from .unit import render_unit

__all__ = [
    "InstallOptions",
    "InstallReport",
    "Layout",
    "UninstallOptions",
    "UninstallReport",
    "install",
    "uninstall",
]


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
    """A pip requirement, or a local path or wheel, installed as given (``edgefleet agent
    install`` passes it through :func:`~agent.install.packages.with_agent_extra` first)."""
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


def _make_config_dir(path: Path, user: str) -> None:
    """Root's, in the service's group, 0750: the service reads its config, nobody else
    does, and ``agent enroll`` gives the secrets it writes here that group."""
    path.mkdir(parents=True, exist_ok=True)
    ids = _user_ids(user)
    if ids is not None and os.geteuid() == 0:
        os.chown(path, 0, ids[1])
        path.chmod(0o750)


def _swap_in(pip: Sequence[str], wheel: RuntimeWheel, pip_args: Sequence[str]) -> str | None:
    """Install ``wheel`` in place of ``wheel.replaces``, or put that back and say why not."""
    if wheel.replaces is None:
        raise ValueError(f"{wheel.requirement} replaces nothing: pip install it instead")
    replaced = edgefleet_requirement(wheel.replaces, "agent")
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
    """The data and config directories, the config (unless one is kept) and the unit; whether
    the config is written."""
    layout = options.layout
    plan.add(
        f"create the data directory {layout.data_dir}",
        functools.partial(_make_data_dir, layout.data_dir, options.user),
    )
    plan.add(
        f"create the config directory {layout.config_dir} (the group {options.user} reads it)",
        functools.partial(_make_config_dir, layout.config_dir, options.user),
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
    """Install the agent as a systemd service (:class:`Layout` says what goes where).

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
        supplementary_groups=_existing_groups(GPU_GROUPS.get(board.family, ())),
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
