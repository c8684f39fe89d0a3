"""``python wait_url.py URL LOG``: wait until URL answers 2xx (``tcp://HOST:PORT``: accepts a
connection); exit 1 with LOG's tail if not.

The README walkthrough (tests/test_readme_walkthrough.py) runs it after a block the README
starts in another terminal, where a user would wait for the server's first lines.
"""

from __future__ import annotations

import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_S = 180.0


def answers(url: str) -> bool:
    try:
        if url.startswith("tcp://"):
            host, _, port = url.removeprefix("tcp://").rpartition(":")
            with socket.create_connection((host, int(port)), timeout=5):
                return True
        with urllib.request.urlopen(url, timeout=5) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def main(url: str, log: Path) -> int:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if answers(url):
            return 0
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log.is_file() else "(no log)"
    print(f"{url} did not answer within {TIMEOUT_S:.0f} s; {log}:\n{tail}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
