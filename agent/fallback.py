"""The cloud fallback: an Open Inference Protocol (v2) client behind a circuit breaker.

:class:`CloudFallback` posts NumPy inputs to ``{url}/v2/models/{model}/infer`` (the fleet's
own endpoint, KServe, Triton or MLServer) and reads the outputs back as NumPy.

One call makes up to ``1 + retries`` attempts. Only what may pass by itself is retried: a
connection error, a timeout or a 5xx, after ``backoff_s * 2**n`` seconds (n = 0, 1, ...). A
4xx is the request's or the configuration's fault and is raised at once
(:class:`FallbackRejectedError`).

The :class:`CircuitBreaker` counts calls, not attempts: a call whose attempts all failed is
one failure, and ``breaker_failures`` of them in a row open it. An answer of any status
below 500 shows the endpoint is up and counts as a success. While open, calls fail fast
with :class:`CircuitOpenError`; ``breaker_reset_s`` later one call is let through as a
probe (a single attempt, no retries) while the others keep failing fast, and its result
closes or re-opens the breaker.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import httpx
import numpy as np
from pydantic import ValidationError

from contracts import oip

from .config import FallbackConfig
from .errors import CircuitOpenError, FallbackError, FallbackRejectedError, FallbackTimeout

__all__ = ["BreakerState", "CircuitBreaker", "CloudAnswer", "CloudFallback", "Permit"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class _Event(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TRIPPED = "tripped"
    """A failure that reaches ``breaker_failures`` in a row, or the probe's failure."""
    COOLED = "cooled"
    """``breaker_reset_s`` have passed since the breaker opened; a call arrives to probe."""


_TRANSITIONS: dict[tuple[BreakerState, _Event], BreakerState] = {
    (BreakerState.CLOSED, _Event.SUCCEEDED): BreakerState.CLOSED,
    (BreakerState.CLOSED, _Event.FAILED): BreakerState.CLOSED,
    (BreakerState.CLOSED, _Event.TRIPPED): BreakerState.OPEN,
    # OPEN lets no call out, so no call can fail there: it only cools down.
    (BreakerState.OPEN, _Event.COOLED): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, _Event.SUCCEEDED): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, _Event.TRIPPED): BreakerState.OPEN,
}
"""Every transition the breaker makes; anything else is a bug and raises ``KeyError``."""


@dataclass(frozen=True)
class Permit:
    """A call let out by :meth:`CircuitBreaker.before_call`; hand it back with the result."""

    period: int
    probe: bool


class CircuitBreaker:
    """The breaker's state, without I/O: ask :meth:`before_call`, then report the result.

    Results count only for the state they were let out in: a call that was in flight when
    the breaker opened (or half-opened) reports into a state that has moved on, and is
    ignored. ``clock`` returns seconds on a monotonic scale (``time.monotonic``); tests
    pass their own.
    """

    def __init__(
        self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if failures < 1 or reset_s <= 0:
            raise ValueError("a breaker needs failures >= 1 and reset_s > 0")
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._period = 0
        """Counts state changes: tells a result from the current state from a late one."""
        self._failures = 0
        self._opened_at = 0.0
        self._last_error = ""

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def before_call(self) -> Permit:
        """Let a call go out, or raise :class:`CircuitOpenError` while calls are refused."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return Permit(self._period, probe=False)
            remaining = self._opened_at + self._reset_s - self._clock()
            if self._state is BreakerState.OPEN and remaining <= 0:
                self._fire(_Event.COOLED)
                return Permit(self._period, probe=True)
            until = datetime.now(UTC) + timedelta(seconds=max(remaining, 0.0))
            why = (
                "a probe call is under way"
                if self._state is BreakerState.HALF_OPEN
                else f"calls are refused until {until:%H:%M:%S} UTC (in {remaining:.1f} s)"
            )
            raise CircuitOpenError(
                f"the cloud fallback's circuit breaker is {self._state.value} after "
                f"{self._failures} consecutive failures (last: {self._last_error}); {why}",
                retry_after_s=max(remaining, 0.0),
            )

    def succeeded(self, permit: Permit) -> None:
        with self._lock:
            if permit.period == self._period:
                self._failures = 0
                self._fire(_Event.SUCCEEDED)

    def failed(self, permit: Permit, error: str) -> None:
        with self._lock:
            if permit.period != self._period:
                return
            self._failures += 1
            self._last_error = error
            tripped = permit.probe or self._failures >= self._threshold
            self._fire(_Event.TRIPPED if tripped else _Event.FAILED)
            if self._state is BreakerState.OPEN:
                self._opened_at = self._clock()

    def _fire(self, event: _Event) -> None:
        state = _TRANSITIONS[(self._state, event)]
        if state is not self._state:
            self._state = state
            self._period += 1


@dataclass(frozen=True)
class CloudAnswer:
    """The endpoint's outputs, in the order it sent them, with their names."""

    outputs: list[np.ndarray]
    names: list[str]
    model_version: str


class _Retryable(Exception):
    """An attempt that failed in a way another attempt may not."""


class CloudFallback:
    """An Open Inference Protocol client for ``config.url``; thread-safe, one connection pool.

    ``clock`` drives the circuit breaker (see :class:`CircuitBreaker`).
    """

    def __init__(
        self, config: FallbackConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if config.url is None:
            raise ValueError("a cloud fallback needs fallback.url in agent.toml")
        self.config = config
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_s, clock)
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        self._client = httpx.Client(
            base_url=config.url.rstrip("/"), headers=headers, timeout=config.timeout_s
        )

    def infer(self, inputs: Mapping[str, np.ndarray], model: str | None = None) -> CloudAnswer:
        """Run ``inputs`` on the cloud's ``fallback.model`` (else ``model``).

        Raises :class:`~agent.errors.FallbackError` (or one of its kinds) when no answer
        comes: the endpoint is down, slow, refuses the request, or the breaker is open.
        """
        name = self.config.model or model
        if name is None:
            raise FallbackError(
                "no model name for the cloud endpoint: set fallback.model in agent.toml "
                "(without a local model there is no name to borrow)"
            )
        try:
            body = {"inputs": oip.encode_inputs(inputs)}
        except ValueError as e:
            raise FallbackError(f"cannot send these inputs to the cloud: {e}") from e
        permit = self.breaker.before_call()
        attempts = 1 if permit.probe else 1 + self.config.retries
        try:
            answer = self._call(f"/v2/models/{name}/infer", body, attempts)
        except FallbackRejectedError:
            self.breaker.succeeded(permit)  # the endpoint is up; the request is what it refused
            raise
        except BaseException as e:
            self.breaker.failed(permit, str(e))
            raise
        self.breaker.succeeded(permit)
        return answer

    def _call(self, path: str, body: dict[str, Any], attempts: int) -> CloudAnswer:
        """Up to ``attempts`` attempts, backing off between them."""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.config.backoff_s * 2 ** (attempt - 1))
            try:
                return self._attempt(path, body)
            except _Retryable as e:
                error = e
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        message = f"the cloud endpoint {self.config.url} failed after {tries}: {error}"
        if isinstance(error.__cause__, httpx.TimeoutException):
            raise FallbackTimeout(message) from error.__cause__
        raise FallbackError(message) from error.__cause__

    def _attempt(self, path: str, body: dict[str, Any]) -> CloudAnswer:
        try:
            response = self._client.post(path, json=body)
        except httpx.TimeoutException as e:
            raise _Retryable(f"no answer within {self.config.timeout_s} s") from e
        except httpx.TransportError as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from e
        except httpx.HTTPError as e:
            raise FallbackError(f"the cloud endpoint's answer to {path} is unreadable: {e}") from e
        if response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}: {_error_text(response)}")
        if response.status_code >= 400:
            raise FallbackRejectedError(
                f"the cloud endpoint refused the request to {path} with HTTP "
                f"{response.status_code}: {_error_text(response)}",
                status_code=response.status_code,
            )
        try:
            parsed = oip.InferenceResponse.model_validate_json(response.content)
            outputs = [oip.decode_output(output) for output in parsed.outputs]
        except (ValidationError, ValueError) as e:
            raise FallbackError(
                f"the cloud endpoint's answer to {path} is not an inference response: {e}"
            ) from e
        names = [output.name for output in parsed.outputs]
        return CloudAnswer(outputs=outputs, names=names, model_version=parsed.model_version)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CloudFallback:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _error_text(response: httpx.Response) -> str:
    """The ``error`` of a protocol error body, else the start of the body."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error) if error else response.text[:200]
