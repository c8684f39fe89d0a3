"""Errors the compiler raises; each message says what was expected and what to do."""

from __future__ import annotations

__all__ = ["CompilerError", "ToolchainError", "UnsupportedTargetError"]


class CompilerError(Exception):
    """Base of every error this package raises."""


class UnsupportedTargetError(CompilerError, ValueError):
    """A profile asks for a target that TVM or this profile cannot provide."""


class ToolchainError(CompilerError, RuntimeError):
    """The C compiler a profile names is missing or failed to link."""
