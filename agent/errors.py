"""Errors the agent raises at its boundary."""

from __future__ import annotations

__all__ = ["AgentError", "ModelLoadError", "RuntimeUnavailableError"]


class AgentError(Exception):
    """Base of every error this package raises."""


class ModelLoadError(AgentError, ValueError):
    """A model artifact is missing, corrupt or not what its runtime expects."""


class RuntimeUnavailableError(AgentError, ImportError):
    """The Python package of a runtime is not installed on this machine."""
