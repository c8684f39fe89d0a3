"""The compiler: per hardware profile, import, prune, quantize, tune, build and validate a model.

``compile_model(CompileOptions(...))`` runs the pipeline (see ``pipeline.py``);
``edgefleet compile`` is its command line. The pipeline imports ONNX and friends, so it is
loaded on first use: ``import compiler`` stays cheap on a device without them.
"""

from typing import Any

from .errors import (
    AccuracyGateError,
    CompilerError,
    DataError,
    ModelImportError,
    StepError,
    ToolchainError,
    UnsupportedTargetError,
)
from .targets import tvm_target
from .toolchain import export_library, find_compiler

__all__ = [
    "AccuracyGateError",
    "CompileOptions",
    "CompilerError",
    "DataError",
    "ModelImportError",
    "RpcTarget",
    "StepError",
    "ToolchainError",
    "UnsupportedTargetError",
    "compile_model",
    "export_library",
    "find_compiler",
    "register_step",
    "tvm_target",
]

_LAZY = {"CompileOptions", "compile_model", "register_step"}


def __getattr__(name: str) -> Any:
    if name == "RpcTarget":
        from .tune import RpcTarget

        return RpcTarget
    if name in _LAZY:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'compiler' has no attribute {name!r}")
