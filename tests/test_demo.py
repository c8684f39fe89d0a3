"""``edgefleet demo --keep-running``, run as a user runs it: the whole story, then the
"keep exploring" commands it prints, run while it stays up and after Ctrl-C."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

EDGEFLEET = Path(sys.executable).parent / "edgefleet"
STORY_TIMEOUT_S = 700.0  # under pytest's 900 s: the failure shows the output
KEEP_RUNNING_LINE = "run until Ctrl-C"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _advice(output: str) -> list[list[str]]:
    """The ``edgefleet ...`` command lines printed under "Keep exploring:"."""
    after = output.split("Keep exploring:", 1)[1]
    return [
        shlex.split(line.strip())
        for line in after.splitlines()
        if line.strip().startswith("edgefleet ")
    ]


def test_demo_tells_the_whole_story_and_its_advice_works(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    stderr = (tmp_path / "demo.stderr").open("w")
    demo = subprocess.Popen(
        [str(EDGEFLEET), "demo", "--out", str(tmp_path / "demo"), "--keep-running"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert demo.stdout is not None
        for text in demo.stdout:
            lines.put(text)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + STORY_TIMEOUT_S
    try:
        while not any(KEEP_RUNNING_LINE in line for line in seen):
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, "".join(seen) + (tmp_path / "demo.stderr").read_text()[-3000:]
            seen.append(line)
        output = "".join(seen)
        data = tmp_path / "demo"

        # Compiled for two profiles, signed and verified as a device would.
        assert (data / "rpi4" / "tvm-fp32.so").read_bytes()[18] == 183  # EM_AARCH64
        signed = sorted(p.name.split(".", 1)[1] for p in (data / "ota-repo").rglob("*.efb"))
        assert signed == ["digits-host-1.0.0.efb", "digits-rpi4-1.0.0.efb"]
        assert "verified against" in output
        # It ships the artifact it selected.
        from ota.archive import read_manifest

        selected = json.loads((data / "host" / "report.json").read_text())["selected"]
        assert f"devices get {selected}, the artifact the host compile selected" in output
        manifest = read_manifest(data / "bundles" / "digits-host-1.0.0.efb")
        assert f"{manifest.runtime}:{manifest.precision}" == selected
        # Two releases everywhere; the broken third stopped by its canary wave and undone.
        for release in ("digits-host-1.0.0", "digits-host-1.1.0"):
            assert f"21 of 21 devices healthy on {release}" in output
        broken = output.split("Roll out a broken 1.2.0", 1)[1]
        assert "rolled_back" in broken
        cause = next(line for line in broken.splitlines() if "cause:" in line)
        assert re.search(r"failure ratio .* > max 10.0% \([23] of 3 devices failed\)", cause), cause
        assert "demo-board: rolled_back: " in broken and "golden vectors" in broken  # its own
        # Answers: local on 1.1.0 after the rollback, then the cloud's when the local fails.
        rows = [line for line in broken.splitlines() if line.startswith("│")]
        assert any("local" in row and "digits-host-1.1.0" in row for row in rows), broken
        failing = output.split("Make the local model fail", 1)[1]
        rows = [line for line in failing.splitlines() if line.startswith("│")]
        assert any("cloud" in row and "latency" in row for row in rows), failing

        # While it runs: the dashboard and every command it advises.
        url = next(
            line.split("dashboard: ", 1)[1].split()[0] for line in seen if "dashboard: " in line
        )
        assert httpx.get(url, timeout=30).status_code == 200
        advice = _advice(output)
        serve = [c for c in advice if c[1:3] == ["fleet", "serve"]]
        assert len(advice) >= 4 and len(serve) == 1
        for command in advice:
            if command not in serve:
                result = _run([str(EDGEFLEET), *command[1:]])
                assert result.returncode == 0, (command, result.stderr)
        token = (data / "fleet" / "admin.token").read_text().strip()
        assert token in output
    finally:
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            demo.wait(timeout=120)
        except subprocess.TimeoutExpired:
            demo.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack
            try:
                demo.wait(timeout=15)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
        stderr.close()
    assert demo.returncode == 0, (tmp_path / "demo.stderr").read_text()[-12000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)

    # After Ctrl-C: the same fleet again from its data, as advised (on a free port here).
    port = _free_port()
    server = subprocess.Popen(
        [str(EDGEFLEET), *serve[0][1:], "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        auth = ["--server", f"http://127.0.0.1:{port}", "--token", token, "--json"]
        deadline = time.monotonic() + 120
        while True:
            result = _run([str(EDGEFLEET), "fleet", "devices", *auth])
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)) == 21
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
