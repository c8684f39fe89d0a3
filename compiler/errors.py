"""Errors the compiler raises; each message says what was expected and what to do.

Two families meet the user: bad input (a model, a data file, a profile that is not what
it should be) and a failed step (a toolchain, a tuner, a gate). Misuse by a caller raises
``ValueError`` / ``RuntimeError`` as usual.
"""

from __future__ import annotations

__all__ = [
    "AccuracyGateError",
    "CompilerError",
    "DataError",
    "EmulationError",
    "ModelImportError",
    "OptionError",
    "OutputDirError",
    "StepError",
    "ToolchainError",
    "UnsupportedTargetError",
]


class CompilerError(Exception):
    """Base of every error this package raises."""


class ModelImportError(CompilerError, ValueError):
    """The model file is missing, corrupt, or in a format the compiler does not read."""


class DataError(CompilerError, ValueError):
    """A calibration or validation ``.npz`` does not fit the model."""


class UnsupportedTargetError(CompilerError, ValueError):
    """A profile asks for a target that TVM or this profile cannot provide."""


class ToolchainError(CompilerError, RuntimeError):
    """The C compiler a profile names is missing or failed to link."""


class EmulationError(CompilerError, RuntimeError):
    """An emulated board could not be built or run (see ``compiler/emulation``)."""


class OutputDirError(CompilerError, ValueError):
    """``--out`` names a directory a compile may not replace (see ``compiler/output.py``)."""


class StepError(CompilerError, RuntimeError):
    """A pipeline step could not do its work (quantizer, tuner, converter failed)."""


class OptionError(StepError, ValueError):
    """An option names what the model does not have (``--keep-float NODE``): bad input,
    which ends the compile rather than skipping one candidate."""


class AccuracyGateError(CompilerError):
    """A candidate fell below the accuracy gate; nothing was published."""
