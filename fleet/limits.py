"""Request body limits, as a pure ASGI middleware in front of every route.

Each request's limit comes from the first :class:`BodyLimit` whose pattern matches its
path, else the default. A declared ``Content-Length`` over the limit is answered 413 at
once, before a byte of the body is read; otherwise the bytes actually received are
counted as the app reads them (chunked bodies included), and the read that crosses the
limit ends the request with a 413. Nothing past the limit is ever buffered: the server's
memory does not grow with what a client sends.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit", "BodyLimitMiddleware", "BodyTooLargeError"]


@dataclass(frozen=True)
class BodyLimit:
    """Bodies of requests whose path matches ``path`` (a full match) may hold ``max_bytes``;
    a 413 answers ``{error_field: message}``."""

    path: re.Pattern[str]
    max_bytes: int
    error_field: str = "detail"


class BodyTooLargeError(Exception):
    """A request body crossed its limit while the app was reading it."""


class BodyLimitMiddleware:
    def __init__(
        self, app: ASGIApp, *, default_max_bytes: int, limits: Sequence[BodyLimit] = ()
    ) -> None:
        self.app = app
        self.default = BodyLimit(re.compile(".*"), default_max_bytes)
        self.limits = tuple(limits)

    def limit_for(self, path: str) -> BodyLimit:
        return next((rule for rule in self.limits if rule.path.fullmatch(path)), self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > rule.max_bytes:
            await _refuse(send, rule, f"a body of {declared} bytes")
            return

        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLargeError
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > rule.max_bytes:
                    exceeded = True
                    raise BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's own answer to the cut body; the 413 replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if started:
                raise
        if exceeded and not started:
            await _refuse(send, rule, f"over {received} bytes")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length before the app runs
    return None


async def _refuse(send: Send, rule: BodyLimit, found: str) -> None:
    message = (
        f"the request body is too large: this route takes at most {rule.max_bytes} bytes, "
        f"the request sent {found}; send less (the server's limits are in docs/fleet.md)"
    )
    body = json.dumps({rule.error_field: message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
