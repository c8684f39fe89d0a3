"""The arm64 Debian userland boards run in: what goes in it, how it is built, where it is kept.

A :class:`UserlandSpec` lists the Debian packages and the Python requirements; its
:attr:`~UserlandSpec.key` (a hash of that list) names the cache directory, so a changed
list builds a new userland and an unchanged one is reused. :func:`ensure_userland` builds
one when the cache has none:

1. ``debootstrap --foreign --variant=minbase`` downloads the packages and unpacks the base;
2. every downloaded ``.deb`` is unpacked on the host (``dpkg-deb``), in place of the
   ``--second-stage``, which runs every maintainer script under emulation (11 minutes);
   the little those scripts do that matters here (accounts, ``/etc/hosts``) is done by hand;
3. under emulation: a venv at :data:`VENV` (where ``edgefleet agent install`` puts the
   agent's), the requirements downloaded into the wheelhouse :data:`WHEELHOUSE` (so
   boards install offline: ``PIP_NO_INDEX=1 PIP_FIND_LINKS=...``) and installed from it.

The tree is built beside its final place and renamed there when complete; a lock file
keeps two builds of one key from racing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.install.packages import edgefleet_requirement

from ..errors import EmulationError
from ._board import BoardSpec, EmulatedBoard

__all__ = [
    "MANIFEST",
    "VENV",
    "WHEELHOUSE",
    "Userland",
    "UserlandSpec",
    "agent_userland_spec",
    "ensure_userland",
    "find_userland",
]

VENV = "/opt/edgefleet/venv"
WHEELHOUSE = "/var/cache/edgefleet/wheels"
MANIFEST = "userland.json"
_BUILDER_REVISION = 2
"""Part of the cache key: raise it when the build steps change what a userland holds."""

_DEBIAN_ARCH = {"aarch64": "arm64"}


@dataclass(frozen=True)
class UserlandSpec:
    """A Debian userland for one architecture, with a venv of Python requirements."""

    arch: str
    suite: str
    debian_packages: tuple[str, ...]
    python_requirements: tuple[str, ...]
    mirror: str = "http://deb.debian.org/debian"

    @property
    def debian_arch(self) -> str:
        try:
            return _DEBIAN_ARCH[self.arch]
        except KeyError:
            raise EmulationError(
                f"no emulated userland for {self.arch!r}; supported: {', '.join(_DEBIAN_ARCH)}"
            ) from None

    @property
    def key(self) -> str:
        """A hash of the package lists (not of the mirror, which serves the same packages)."""
        listed = [
            _BUILDER_REVISION,
            self.arch,
            self.suite,
            sorted(self.debian_packages),
            sorted(self.python_requirements),
        ]
        return hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"debian-{self.suite}-{self.debian_arch}-{self.key}"


@dataclass(frozen=True)
class Userland:
    """A built userland: its root tree and what :data:`MANIFEST` says about it."""

    spec: UserlandSpec
    directory: Path

    @property
    def root(self) -> Path:
        return self.directory / "root"

    def manifest(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.directory / MANIFEST).read_text())
        return data

    def board(
        self, spec: BoardSpec, work: Path, *, binds: dict[Path, str] | None = None
    ) -> EmulatedBoard:
        """A board running this userland (not started: use it as a context manager)."""
        return EmulatedBoard(self.root, spec, work, binds=binds)


def _requirements(extra: str) -> list[str]:
    """edgefleet's own requirements (the base ones) plus ``extra``'s, markers dropped."""
    try:
        declared = importlib.metadata.requires("edgefleet") or []
    except importlib.metadata.PackageNotFoundError:
        raise EmulationError(
            "edgefleet's metadata is not installed, so the userland's requirements are "
            "unknown: pip install -e '.[all]' in the checkout"
        ) from None
    chosen = []
    for requirement in declared:
        spec, _, marker = requirement.partition(";")
        if not marker.strip() or f'extra == "{extra}"' in marker:
            chosen.append(spec.strip())
    return chosen


def agent_userland_spec(arch: str = "aarch64") -> UserlandSpec:
    """Debian bookworm (Python 3.11, as Raspberry Pi OS Bookworm) with ``python3-venv``, and
    a venv holding what ``edgefleet[agent]`` and TVM's runtime need, at this checkout's
    version ranges (TVM at the compiler's pins: a module loads only in the TVM that built it).
    """
    tvm = [edgefleet_requirement(name, "compiler") for name in ("apache-tvm", "apache-tvm-ffi")]
    return UserlandSpec(
        arch=arch,
        suite="bookworm",
        debian_packages=("python3", "python3-venv"),
        python_requirements=tuple(dict.fromkeys([*_requirements("agent"), *tvm])),
    )


def find_userland(spec: UserlandSpec, cache_dir: Path) -> Userland | None:
    """The built userland for ``spec`` under ``cache_dir``, if there is one."""
    directory = cache_dir / "userlands" / spec.name
    return Userland(spec, directory) if (directory / MANIFEST).is_file() else None


@contextmanager
def _lock(path: Path, echo: Callable[[str], None]) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"waiting for another build of this userland ({path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def ensure_userland(
    spec: UserlandSpec, cache_dir: Path, *, echo: Callable[[str], None] = print
) -> Userland:
    """The userland for ``spec``, built into ``cache_dir/userlands`` first if it is not there
    (minutes, and a download of about 200 MB). Needs root, ``debootstrap`` and emulation."""
    found = find_userland(spec, cache_dir)
    if found is not None:
        return found
    for tool in ("debootstrap", "dpkg-deb", "tar"):
        if shutil.which(tool) is None:
            raise EmulationError(
                f"building the {spec.arch} userland needs {tool}, which is not on PATH: "
                "apt-get install debootstrap"
            )
    final = cache_dir / "userlands" / spec.name
    with _lock(final.with_name(f".{spec.name}.lock"), echo):
        found = find_userland(spec, cache_dir)
        if found is not None:
            return found
        partial = final.with_name(f".{spec.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            _build(spec, partial, echo)
            os.rename(partial, final)
            echo(f"  userland ready: {final}")
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return Userland(spec, final)


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise EmulationError(f"{what} failed (exit {done.returncode}):\n{tail}")


def _build(spec: UserlandSpec, directory: Path, echo: Callable[[str], None]) -> None:
    start = time.monotonic()
    root = directory / "root"
    root.mkdir(parents=True)
    echo(f"building the {spec.debian_arch} userland {spec.name} (once; a few minutes)")
    _run(
        [
            "debootstrap", "--foreign", "--variant=minbase", f"--arch={spec.debian_arch}",
            f"--include={','.join(spec.debian_packages)}", spec.suite, str(root), spec.mirror,
        ],
        f"debootstrap of Debian {spec.suite} {spec.debian_arch} from {spec.mirror}",
    )  # fmt: skip
    debs = _unpack_debs(root)
    _configure(root)
    echo(f"  Debian unpacked ({time.monotonic() - start:.0f} s); installing Python packages")
    freeze = _install_python(spec, root, directory / "build")
    shutil.rmtree(directory / "build", ignore_errors=True)
    manifest = {
        "spec": asdict(spec),
        "key": spec.key,
        "built": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "build_seconds": round(time.monotonic() - start, 1),
        "debian_packages": debs,
        "python_packages": freeze,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _unpack_debs(root: Path) -> list[str]:
    """Unpack every downloaded package over the root, keeping the merged-/usr symlinks;
    ``NAME=VERSION`` of each."""
    archives = root / "var/cache/apt/archives"
    unpacked = []
    for deb in sorted(archives.glob("*.deb")):
        unpack = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        extract = subprocess.run(
            ["tar", "-x", "--keep-directory-symlink", "-C", str(root)],
            stdin=unpack.stdout,
            capture_output=True,
            check=False,
        )
        if unpack.wait() != 0 or extract.returncode != 0:
            raise EmulationError(f"cannot unpack {deb.name}: {extract.stderr.decode().strip()}")
        name, version, _ = deb.name.split("_")
        unpacked.append(f"{name}={version.replace('%3a', ':')}")
        deb.unlink()
    return unpacked


def _configure(root: Path) -> None:
    """What the skipped maintainer scripts would have set up that a board here uses."""
    proc = root / "proc"
    if proc.is_symlink():  # debootstrap's first stage points it at the host's /proc
        proc.unlink()
    proc.mkdir(exist_ok=True)
    shutil.rmtree(root / "debootstrap", ignore_errors=True)
    etc = root / "etc"
    base = root / "usr/share/base-passwd"
    shutil.copyfile(base / "passwd.master", etc / "passwd")
    shutil.copyfile(base / "group.master", etc / "group")
    users = [line.split(":")[0] for line in (etc / "passwd").read_text().splitlines() if line]
    groups = [line.split(":")[0] for line in (etc / "group").read_text().splitlines() if line]
    shadow_gid = next(
        int(line.split(":")[2])
        for line in (etc / "group").read_text().splitlines()
        if line.startswith("shadow:")
    )
    for name, lines in (
        ("shadow", [f"{user}:*:19000:0:99999:7:::" for user in users]),
        ("gshadow", [f"{group}:*::" for group in groups]),
    ):
        path = etc / name
        path.write_text("\n".join(lines) + "\n")
        os.chown(path, 0, shadow_gid)
        path.chmod(0o640)
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
    (etc / "hostname").write_text("edgefleet-board\n")


def _host_ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts, for pip on the board (a proxy that
    re-signs TLS is trusted only through it)."""
    for variable in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(variable)
        if value and Path(value).is_file():
            return Path(value)
    default = ssl.get_default_verify_paths().cafile
    return Path(default) if default and Path(default).is_file() else None


def _install_python(spec: UserlandSpec, root: Path, build: Path) -> list[str]:
    """The venv, the wheelhouse and the requirements, under emulation; ``pip freeze``."""
    build.mkdir()
    resolv = root / "etc/resolv.conf"
    shutil.copyfile("/etc/resolv.conf", resolv)
    env = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_PROGRESS_BAR": "off", "PIP_NO_CACHE_DIR": "1"}
    proxies = ("http_proxy", "https_proxy", "no_proxy")
    env |= {k: v for k, v in os.environ.items() if k.lower() in proxies}
    binds = {}
    ca = _host_ca_bundle()
    if ca is not None:
        shutil.copyfile(ca, build / "ca.pem")
        binds[build] = "/mnt/edgefleet-build"
        env["PIP_CERT"] = "/mnt/edgefleet-build/ca.pem"
    pip = [f"{VENV}/bin/python", "-m", "pip"]
    requirements = list(spec.python_requirements)
    try:
        # The build's board has no CPU of its own to imitate: any model qemu has will do.
        with EmulatedBoard(
            root, BoardSpec("cortex-a72"), build / "board", binds=binds, writable=True
        ) as board:
            board.run(["python3", "-m", "venv", VENV], timeout_s=900)
            board.run(
                [*pip, "download", "--dest", WHEELHOUSE, *requirements], env=env, timeout_s=1800
            )
            offline = ["--no-index", "--find-links", WHEELHOUSE]
            board.run([*pip, "install", *offline, *requirements], env=env, timeout_s=1800)
            freeze = board.run([*pip, "freeze"], env=env).stdout.split()
    finally:
        resolv.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (root / "mnt/edgefleet-build").rmdir()  # the CA bundle's mount point, if made
    return freeze
