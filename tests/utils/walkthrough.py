"""Markdown walkthroughs run as a user runs them: the README's, and each example's README.

The blocks that run are the ```sh blocks right after a ``<!-- walkthrough -->`` comment, in
the order they appear; they run in one bash (variables carry from block to block) with
``set -euo pipefail``, in a fresh directory holding copies of the files the test names, as
in a fresh clone. A block marked ``<!-- walkthrough: background; ready when URL answers
-->`` is one the text starts in another terminal: it runs in the background and the next
block waits until URL answers (``tests/utils/wait_url.py``).

It runs in private network and PID namespaces: the fixed ports the text uses (8000, 8800)
are free there whatever else this machine runs, and when the walkthrough ends every process
it started dies with the namespace. ``HOME`` is a fresh directory (no tuning database, no
emulated userland).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(
    r"^<!-- walkthrough(?P<options>[^>]*?)-->\n```sh\n(?P<body>.*?)^```", re.DOTALL | re.MULTILINE
)
ANY_MARKER = re.compile(r"^<!-- walkthrough", re.MULTILINE)
READY = re.compile(r";\s*ready when (?P<url>\S+) answers")
WAIT_URL = ROOT / "tests" / "utils" / "wait_url.py"
# Variables of the calling environment that would point the text's commands elsewhere.
UNSET = ("EDGEFLEET_SERVER", "EDGEFLEET_TOKEN", "EDGEFLEET_OTA_REPO", "EDGEFLEET_OTA_KEYS",
         "EDGEFLEET_PROFILES_PATH")  # fmt: skip


@dataclass(frozen=True)
class Block:
    body: str
    background: bool
    ready_url: str | None


def walkthrough_blocks(text: str) -> list[Block]:
    """The marked blocks of ``text``, in order; a marker without its block is an error."""
    blocks = []
    for match in MARKER.finditer(text):
        options = match["options"]
        ready = READY.search(options)
        blocks.append(
            Block(
                body=match["body"],
                background="background" in options,
                ready_url=ready["url"] if ready else None,
            )
        )
    markers = len(ANY_MARKER.findall(text))
    if markers != len(blocks):
        raise ValueError(
            f"{markers} walkthrough markers but {len(blocks)} marked ```sh blocks: "
            "every marker must be followed directly by a ```sh block"
        )
    return blocks


def walkthrough_script(blocks: list[Block]) -> str:
    """One bash script: the blocks in order, background ones started and waited for."""
    lines = ["set -euo pipefail", "ip link set lo up"]
    for number, block in enumerate(blocks, start=1):
        lines.append(f"echo '== walkthrough block {number}' >&2")
        if block.background:
            lines.append(f"( {block.body.strip()}\n) > background-{number}.log 2>&1 &")
        else:
            lines.append(block.body.rstrip())
        if block.ready_url:
            lines.append(
                # -P: not tests/utils first on sys.path, where http.py hides the stdlib's
                f"python -P {shlex.quote(str(WAIT_URL))} {shlex.quote(block.ready_url)} "
                f"background-{number}.log"
            )
    return "\n".join(lines) + "\n"


def namespaces() -> list[str]:
    """``unshare`` with private network and PID namespaces (user namespace when not root)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    command = [unshare, "--net", "--pid", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        command.insert(1, "--map-root-user")
    probe = subprocess.run([*command, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make network and PID namespaces here: {probe.stderr.strip()}")
    return command


def run_walkthrough(
    markdown: Path, workdir: Path, copies: list[str], env: dict[str, str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """Run ``markdown``'s walkthrough in ``workdir`` beside copies of ``copies`` (paths in
    this checkout); fail the test with the output and the background logs if it fails."""
    blocks = walkthrough_blocks(markdown.read_text())
    assert blocks, f"{markdown} lost its walkthrough blocks"
    command = namespaces()
    for relative in copies:
        source, target = ROOT / relative, workdir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("build", "__pycache__"))
        else:
            shutil.copy(source, target)
    home = workdir / "home"
    home.mkdir()
    script = workdir / "walkthrough.sh"
    script.write_text(walkthrough_script(blocks))
    full_env = {
        **{k: v for k, v in os.environ.items() if k not in UNSET},
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **env,
    }
    result = subprocess.run(
        [*command, "bash", str(script)],
        cwd=workdir,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    logs = "".join(
        f"\n--- {log.name}\n{log.read_text()[-2000:]}" for log in workdir.glob("background-*.log")
    )
    assert result.returncode == 0, (
        f"{markdown.name}'s walkthrough failed (exit {result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}{logs}"
    )
    return result
