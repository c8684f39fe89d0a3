"""What every ``edgefleet`` sub-command shares: JSON output, errors, exit codes.

Exit codes (README.md, "Exit codes"): 0 success, 1 a user-facing error (the message says
what to do), 2 a usage error (click's: an unknown option, a value not among the choices),
3 ``fleet serve`` could not start (a port in use, or its start-up failed: uvicorn's code),
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

__all__ = [
    "EXIT_CANNOT_START",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "JsonOption",
    "fail",
    "print_error",
    "print_json",
    "third_party_output_to_stderr",
    "wait_for_stop",
]

EXIT_ERROR = 1
EXIT_USAGE = 2
"""click's own code for a usage error; named here so tests and docs can say it."""
EXIT_CANNOT_START = 3
"""``fleet serve`` could not start; the same code uvicorn exits with when start-up fails."""
EXIT_INTERRUPTED = 130
"""Ctrl-C: 128 + SIGINT, as shells report it."""

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON to stdout.")]

_stderr = Console(stderr=True)


@contextlib.contextmanager
def third_party_output_to_stderr() -> Iterator[None]:
    """Move what libraries print (TensorFlow, absl and tf2onnx write to stdout, some from
    C++, so at the file-descriptor level) to stderr for the duration: stdout keeps only
    what edgefleet itself prints, so ``--json`` pipes into ``jq`` and tables stay clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def print_json(data: Any) -> None:
    """JSON on stdout, nothing else, so ``--json`` output pipes into ``jq``."""
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def print_error(message: object) -> None:
    """``error: message`` on stderr."""
    _stderr.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def fail(message: object) -> NoReturn:
    """Print ``error: message`` on stderr and exit with EXIT_ERROR (inside a command)."""
    print_error(message)
    raise typer.Exit(EXIT_ERROR)


def wait_for_stop(timeout_s: float | None = None) -> bool:
    """Block until Ctrl-C (SIGINT) or SIGTERM, or until ``timeout_s`` has passed; ``True``
    when a signal ended the wait. The handlers are installed here, and the previous ones put
    back after: a process a shell starts in the background inherits SIGINT ignored, and
    Python then never raises KeyboardInterrupt. The handler only sets a flag (taking a lock
    in a handler can deadlock against the interrupted main thread); the wait polls it."""
    signalled: list[int] = []
    previous = {
        number: signal.signal(number, lambda signum, _frame: signalled.append(signum))
        for number in (signal.SIGINT, signal.SIGTERM)
    }
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while not signalled:
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                return False
            time.sleep(left)
        return True
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
