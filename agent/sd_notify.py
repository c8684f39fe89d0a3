"""Tell systemd how the agent is doing: the ``sd_notify`` protocol, without libsystemd.

The unit ``edgefleet agent install`` writes is ``Type=notify`` with ``WatchdogSec=``: the
daemon sends ``READY=1`` once it serves, then ``WATCHDOG=1`` at least every
:func:`watchdog_interval` seconds (half of ``WatchdogSec=`` is the usual pace), or systemd
kills and restarts it. Outside systemd (``NOTIFY_SOCKET`` unset) every call does nothing, so
the daemon calls these unconditionally.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
``NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract namespace.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "watchdog_interval"]


def notify(state: str) -> bool:
    """Send ``state`` (``"READY=1"``, ``"WATCHDOG=1"``, ``"STATUS=..."``, newline-joined).

    Returns ``False`` without sending when ``NOTIFY_SOCKET`` is unset or names an address
    family other than a unix socket path or an abstract name. A failed send raises
    :class:`OSError`: the caller decides whether a lost watchdog ping is worth dying for.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


def watchdog_interval() -> float | None:
    """Seconds systemd waits for a ``WATCHDOG=1`` before it restarts this process.

    ``None`` when no watchdog is armed for this process: ``WATCHDOG_USEC`` unset or not a
    positive integer, or ``WATCHDOG_PID`` naming another process (a child that inherited the
    environment must not ping for its parent).
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None
