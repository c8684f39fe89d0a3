"""The compiler: per hardware profile, import, optimize, build and validate a model.

The full pipeline (prune, quantize, tune, build, validate, report) lands with issue #3;
what is here turns a profile into TVM targets and links modules with its toolchain.
"""

from .errors import CompilerError, ToolchainError, UnsupportedTargetError
from .targets import tvm_target
from .toolchain import export_library, find_compiler

__all__ = [
    "CompilerError",
    "ToolchainError",
    "UnsupportedTargetError",
    "export_library",
    "find_compiler",
    "tvm_target",
]
