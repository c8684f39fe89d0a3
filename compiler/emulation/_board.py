"""A board in a box: a userland root, a CPU model and a mount namespace to run them in.

:class:`EmulatedBoard` starts one holder process in a private mount namespace
(``unshare --mount``) and sets the board up there: the cached userland under an overlay
(writes go to a scratch directory, the cache stays as built), the host's ``/proc`` and
``/dev``, a ``/proc/cpuinfo`` and ``/sys`` that describe the emulated CPU (and a device
tree naming the board), and the host folders the caller shares. Every command enters that
namespace (``nsenter --mount``), ``chroot``\\ s into the root and runs there; the kernel
hands each foreign binary to ``qemu-aarch64`` through binfmt_misc, and ``QEMU_CPU`` picks
the CPU model, so subprocesses (pip, ``python -m venv``, ``useradd``) are emulated too.
When the holder and every command have ended, the namespace and its mounts are gone: a
crash leaves nothing mounted on the host.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import EmulationError

__all__ = ["BASE_ENV", "BoardSpec", "EmulatedBoard", "cpuinfo_for", "describe_exit"]

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
"""The environment every command starts from (nothing of the host's leaks in)."""

_CPUS: dict[str, tuple[int, str]] = {
    "cortex-a53": (0xD03, "fp asimd aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a57": (0xD07, "fp asimd aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a72": (0xD08, "fp asimd aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a76": (
        0xD0B,
        "fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
        "asimddp",
    ),
}
"""qemu ``-cpu`` models -> (Arm part number, the features qemu 7.2's model reports in
``AT_HWCAP``), for the ``/proc/cpuinfo`` a board shows. Runtimes read the part number to
pick kernels; ONNX Runtime 1.32 crashes on the host's x86 ``/proc/cpuinfo``."""


def cpuinfo_for(cpu: str, cores: int) -> str:
    """``/proc/cpuinfo`` as an aarch64 kernel writes it for ``cores`` cores of ``cpu``."""
    if cpu not in _CPUS:
        raise EmulationError(
            f"no /proc/cpuinfo is known for qemu CPU {cpu!r}; known: {', '.join(sorted(_CPUS))}"
        )
    part, features = _CPUS[cpu]
    block = (
        "BogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0x{part:03x}\nCPU revision\t: 3\n"
    )
    return "".join(
        f"processor\t: {n}\n" + block.format(features=features, part=part) + "\n"
        for n in range(cores)
    )


@dataclass(frozen=True)
class BoardSpec:
    """What the emulated board is: its CPU, and what it says about itself."""

    cpu: str
    """qemu's ``-cpu`` model, e.g. ``cortex-a72`` (a profile's ``emulation.qemu_cpu``)."""
    model: str | None = None
    """The device tree's model string (``/sys/firmware/devicetree/base/model``), e.g.
    ``Raspberry Pi 4 Model B Rev 1.4``; ``None``: no device tree."""
    files: Mapping[str, str] = field(default_factory=dict)
    """Files the board has beyond the userland, by path under ``/`` (e.g. a Jetson's
    ``etc/nv_tegra_release``)."""

    @property
    def summary(self) -> str:
        return f"aarch64 under qemu, {self.cpu}"


class EmulatedBoard:
    """The userland at ``root`` running as the board ``spec`` describes (see the module doc).

    ``work`` holds the overlay's writes and the board's ``/sys``; ``binds`` maps host
    directories to where they appear on the board. ``writable`` mounts ``root`` itself
    instead of an overlay (to build a userland). Use as a context manager.
    """

    def __init__(
        self,
        root: Path,
        spec: BoardSpec,
        work: Path,
        *,
        binds: Mapping[Path, str] | None = None,
        writable: bool = False,
    ) -> None:
        self.root, self.spec, self.work = root, spec, work
        self._binds = dict(binds or {})
        self._writable = writable
        self._holder: subprocess.Popen[str] | None = None
        self._started: list[subprocess.Popen[Any]] = []
        self.merged = root if writable else work / "merged"

    # --- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> EmulatedBoard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        board = self.work / "board"
        sys_cpu = board / "sys/devices/system/cpu"
        sys_cpu.mkdir(parents=True, exist_ok=True)
        cores = os.cpu_count() or 1
        for name in ("possible", "present", "online"):
            (sys_cpu / name).write_text(f"0-{cores - 1}\n" if cores > 1 else "0\n")
        (board / "cpuinfo").write_text(cpuinfo_for(self.spec.cpu, cores))
        if self.spec.model is not None:
            tree = board / "sys/firmware/devicetree/base"
            tree.mkdir(parents=True, exist_ok=True)
            (tree / "model").write_text(self.spec.model + "\0")
        commands = []
        if not self._writable:
            upper, scratch = self.work / "upper", self.work / "overlay-work"
            for directory in (upper, scratch, self.merged):
                directory.mkdir(parents=True, exist_ok=True)
            for relative, text in self.spec.files.items():
                target = upper / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
            options = f"lowerdir={self.root},upperdir={upper},workdir={scratch}"
            commands.append(["mount", "-t", "overlay", "overlay", "-o", options, self.merged])
        elif self.spec.files:
            raise ValueError("a writable board (a userland being built) takes no extra files")
        merged = self.merged
        commands += [
            ["mount", "-t", "proc", "proc", merged / "proc"],
            ["mount", "--bind", board / "cpuinfo", merged / "proc/cpuinfo"],
            ["mount", "--rbind", "/dev", merged / "dev"],
            ["mount", "--bind", board / "sys", merged / "sys"],
        ]
        for host, guest in self._binds.items():
            target = merged / guest.lstrip("/")
            commands += [["mkdir", "-p", target], ["mount", "--bind", host, target]]
        script = "set -e\n" + "".join(shlex.join(map(str, c)) + "\n" for c in commands)
        script += "echo ready\nread _ || true\n"
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != "ready":
            _, errors = holder.communicate(timeout=30)
            raise EmulationError(
                f"could not set up the emulated board in {self.work}: "
                f"{errors.strip() or 'the mount namespace exited'}"
            )
        self._holder = holder

    def close(self) -> None:
        """End every process still on the board, then the board itself."""
        holder, self._holder = self._holder, None
        if holder is None:
            return
        for pid in self._pids_on_board(holder.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self._started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        holder.communicate(timeout=30)  # its stdin closes: the holder's `read` ends

    @staticmethod
    def _pids_on_board(holder: int) -> list[int]:
        """Processes in the holder's mount namespace, the holder excepted."""
        try:
            namespace = os.readlink(f"/proc/{holder}/ns/mnt")
        except OSError:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == holder:
                continue
            try:
                if os.readlink(entry / "ns/mnt") == namespace:
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    # --- running ----------------------------------------------------------------------

    def path(self, guest: str) -> Path:
        """Where the host reads and writes the board's ``guest`` path (while it runs)."""
        if self._holder is None:
            raise RuntimeError("the board is not running")
        return (
            Path(f"/proc/{self._holder.pid}/root")
            / str(self.merged).lstrip("/")
            / (guest.lstrip("/"))
        )

    def user_ids(self, user: str) -> tuple[int, int]:
        """``(uid, gid)`` of ``user`` in the board's ``/etc/passwd``."""
        for line in self.path("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return int(fields[2]), int(fields[3])
        raise EmulationError(f"the board has no user {user!r} in /etc/passwd")

    def command(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str = "/",
    ) -> tuple[list[str], dict[str, str]]:
        """The host command line and environment that run ``argv`` on the board."""
        if self._holder is None:
            raise RuntimeError("the board is not running")
        qemu = {"QEMU_CPU": self.spec.cpu}
        userspec = []
        if user is not None:
            uid, gid = self.user_ids(user)
            userspec = [f"--userspec={uid}:{gid}"]
        variables = [f"{k}={v}" for k, v in {**BASE_ENV, **qemu, **(env or {})}.items()]
        line = [
            "nsenter", f"--target={self._holder.pid}", "--mount", "--",
            "chroot", *userspec, str(self.merged),
            "/usr/bin/env", "-i", f"--chdir={cwd}", *variables, *argv,
        ]  # fmt: skip
        return line, {"PATH": os.environ.get("PATH", BASE_ENV["PATH"]), **qemu}

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str = "/",
        timeout_s: float = 600,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on the board and wait; with ``check``, a failure is an
        :class:`EmulationError` carrying the end of its output."""
        line, host_env = self.command(argv, env=env, user=user, cwd=cwd)
        try:
            done = subprocess.run(
                line, env=host_env, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise EmulationError(
                f"`{shlex.join(argv)}` on the emulated board ran past {timeout_s:.0f} s"
            ) from e
        if check and done.returncode != 0:
            raise EmulationError(
                f"`{shlex.join(argv)}` failed on the emulated board "
                f"({describe_exit(done.returncode)}):\n"
                + "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
            )
        return done

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: str = "/",
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on the board; its process is the emulated program itself (every
        step before it ``exec``\\ s), so a signal sent to it reaches the program."""
        line, host_env = self.command(argv, env=env, user=user, cwd=cwd)
        process = subprocess.Popen(line, env=host_env, stdout=stdout, stderr=stderr)
        self._started.append(process)
        return process


def describe_exit(returncode: int) -> str:
    """An exit status in words; a signal by name (qemu dies of the signal its guest got)."""
    number = -returncode if returncode < 0 else returncode - 128
    if returncode >= 0 and (returncode <= 128 or number not in signal.valid_signals()):
        return f"exit {returncode}"
    name = signal.Signals(number).name
    if number == signal.SIGILL:
        return f"{name}: an instruction this CPU does not have"
    return name
