"""Errors the agent raises at its boundary."""

from __future__ import annotations

__all__ = [
    "AgentError",
    "CircuitOpenError",
    "ConfigError",
    "EnrollmentError",
    "FallbackError",
    "FallbackRejectedError",
    "FallbackTimeout",
    "InstallError",
    "LocalInferenceError",
    "ModelLoadError",
    "NoModelError",
    "RuntimeUnavailableError",
    "TelemetryQueueError",
    "UpdateError",
]


class AgentError(Exception):
    """Base of every error this package raises."""


class ConfigError(AgentError, ValueError):
    """``agent.toml`` is missing, not TOML, or has a wrong key or value."""


class ModelLoadError(AgentError, ValueError):
    """A model artifact is missing, corrupt or not what its runtime expects."""


class RuntimeUnavailableError(AgentError, ImportError):
    """The Python package of a runtime is not installed on this machine."""


class NoModelError(AgentError):
    """No model is installed and no cloud fallback is configured."""


class FallbackError(AgentError):
    """The cloud endpoint failed, timed out, or its circuit breaker is open."""


class TelemetryQueueError(AgentError):
    """The on-disk telemetry queue cannot be opened or written."""


class UpdateError(AgentError):
    """An update was refused (tampered, older, failed its health check) or could not run."""


class CircuitOpenError(FallbackError):
    """The cloud fallback's circuit breaker is open: calls fail fast until it half-opens."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FallbackTimeout(FallbackError, TimeoutError):
    """The cloud endpoint did not answer within ``fallback.timeout_s`` (after its retries)."""


class LocalInferenceError(AgentError, RuntimeError):
    """The local runtime raised on an inference and no cloud fallback took the request."""


class FallbackRejectedError(FallbackError):
    """The cloud endpoint refused the request with a 4xx (a bad request, token or model name);
    such a request is not retried."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class InstallError(AgentError, RuntimeError):
    """Installing or removing the agent on a board failed; the message says what to do."""


class EnrollmentError(AgentError):
    """The fleet refused the enrollment, or could not be reached."""
