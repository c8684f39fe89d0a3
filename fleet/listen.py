"""The ports ``fleet serve`` listens on, checked before it creates keys, a database or a
broker: a port in use fails at once, not after the whole start-up.

The HTTP socket is bound here and handed to uvicorn, so nothing can take the port between
the check and the serving. The embedded broker's port is only probed (mosquitto binds it
itself), and skipped when the process holding it is this data directory's own mosquitto
left running by a killed server, which the start stops and replaces.
"""

from __future__ import annotations

import errno
import socket

from .broker.process import MosquittoBroker
from .config import FleetSettings
from .errors import StartupError

__all__ = ["bind_http", "check_broker_port"]


def bind_http(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` for uvicorn; :class:`StartupError` if it cannot."""
    return _bind(host, port, "HTTP", "--port", listen=True)


def check_broker_port(settings: FleetSettings) -> None:
    """Refuse an embedded broker port that something else listens on."""
    if settings.mqtt_url is not None:
        return  # an external broker: not ours to listen on
    broker = MosquittoBroker(
        settings.broker_dir, host=settings.mqtt_listen_host, port=settings.mqtt_port
    )
    port = broker.planned_port()
    if port is None or broker.orphan_pid() is not None:
        return
    option = "--mqtt-port" if settings.mqtt_port else f"--mqtt-port (kept in {broker.port_path})"
    _bind(settings.mqtt_listen_host, port, "the MQTT broker", option, listen=False).close()


def _bind(host: str, port: int, what: str, option: str, *, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(
                f"{what} cannot listen on {host}:{port}: the port is in use (another "
                f"`fleet serve`?); stop what holds it or choose another {option}"
            ) from None
        raise StartupError(
            f"{what} cannot listen on {host}:{port}: {e.strerror or e} ({option})"
        ) from None
    return sock
