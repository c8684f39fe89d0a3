"""The agent's systemd service unit: :func:`render_unit`.

``Type=notify`` with a watchdog (the daemon pings through :mod:`agent.sd_notify`),
``Restart=always``, a dedicated system user, and the sandboxing that leaves a Jetson GPU
working. Left out on purpose: ``PrivateDevices=``, ``DevicePolicy=`` and ``ProtectClock=``
(device allow-lists hide ``/dev/nvhost-*``, ``/dev/nvmap`` and ``/dev/nvgpu``),
``MemoryDenyWriteExecute=`` (CUDA's PTX JIT, TVM and ONNX Runtime map executable memory),
``ProcSubset=pid`` (runtimes read ``/proc/cpuinfo``), ``PrivateUsers=`` (it would unmap the
groups that own the GPU nodes) and an allow-list ``SystemCallFilter=``: only groups of calls
the agent never makes are denied. On a Jetson the user also joins the ``video`` and
``render`` groups that own the GPU nodes (:data:`agent.install.boards.GPU_GROUPS`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import InstallError

__all__ = ["render_unit"]

_DENIED_SYSCALL_GROUPS = (
    "@clock", "@cpu-emulation", "@debug", "@module", "@mount", "@obsolete", "@raw-io",
    "@reboot", "@swap",
)  # fmt: skip
"""System calls the agent never makes, refused with EPERM. A deny list: an allow list such
as ``@system-service`` would have to know what NVIDIA's user-space driver calls."""

_PATH_UNSAFE_IN_UNIT = re.compile(r"[\s\"'\\%;$]")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


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
