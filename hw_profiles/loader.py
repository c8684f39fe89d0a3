"""Find profile files on the search path, read them and validate them into ``Profile``s.

The search path is the directories in ``EDGEFLEET_PROFILES_PATH`` (``os.pathsep``
separated, first wins) followed by the profiles shipped in this package, so a user's
``rpi4.toml`` replaces the shipped one. It is read when a function is called, never at
import time.
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import InvalidProfileError, ProfileNotFoundError
from .host import UnsupportedHostError, detect_host
from .schema import Profile

__all__ = [
    "BUILTIN_PROFILE_DIR",
    "PROFILES_PATH_ENV",
    "list_profiles",
    "load_profile",
    "load_profile_file",
    "profile_search_path",
]

PROFILES_PATH_ENV = "EDGEFLEET_PROFILES_PATH"
BUILTIN_PROFILE_DIR = Path(__file__).resolve().parent

# Set by the loader, so a file may not carry them.
_LOADER_FIELDS = ("name", "source", "detected")
# A file with `detect_from_machine = true` gets the fields it leaves out from detect_host().
_DETECT_KEY = "detect_from_machine"
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def profile_search_path(env: Mapping[str, str] | None = None) -> list[Path]:
    """Directories searched for ``NAME.toml``, most important first."""
    env = os.environ if env is None else env
    user_dirs = [Path(p) for p in env.get(PROFILES_PATH_ENV, "").split(os.pathsep) if p]
    return [*user_dirs, BUILTIN_PROFILE_DIR]


def _profile_files(search_path: Sequence[Path]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for directory in search_path:
        if not directory.is_dir():
            continue
        for file in sorted(directory.glob("*.toml")):
            files.setdefault(file.stem, file)
    return files


def list_profiles(search_path: Sequence[Path] | None = None) -> list[str]:
    """Names of every profile on the search path, sorted. Nothing is validated yet."""
    return sorted(_profile_files(search_path or profile_search_path()))


def load_profile(name: str, search_path: Sequence[Path] | None = None) -> Profile:
    """Load and validate the profile called ``name``."""
    files = _profile_files(search_path or profile_search_path())
    if name not in files:
        raise ProfileNotFoundError(name, sorted(files))
    return load_profile_file(files[name])


def load_profile_file(path: Path) -> Profile:
    """Read and validate one profile file; its stem is the profile's name."""
    name = path.stem
    if not _NAME_PATTERN.fullmatch(name):
        raise InvalidProfileError(
            path, None, "the file name must be lowercase letters, digits, '.', '_' or '-'"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidProfileError(path, None, f"cannot read the file: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidProfileError(path, None, f"not valid TOML: {e}") from e

    for key in _LOADER_FIELDS:
        if key in raw:
            raise InvalidProfileError(path, key, "set by the loader from the file; remove it")
    detected = raw.pop(_DETECT_KEY, False)
    if detected is not False and detected is not True:
        raise InvalidProfileError(path, _DETECT_KEY, f"expected true or false, got {detected!r}")
    if detected:
        try:
            raw = {**detect_host(), **raw}
        except UnsupportedHostError as e:
            raise InvalidProfileError(path, _DETECT_KEY, str(e)) from e

    try:
        return Profile.model_validate({**raw, "name": name, "source": path, "detected": detected})
    except ValidationError as e:
        field, problem = _describe(e)
        raise InvalidProfileError(path, field, problem) from e


def _describe(error: ValidationError) -> tuple[str | None, str]:
    """The first problem's dotted field and a message saying what was expected."""
    problems = error.errors(include_url=False)
    first = problems[0]
    loc = first["loc"]
    field = _dotted(loc) or None
    kind = first["type"]
    if kind == "missing":
        problem = "required field is missing"
    elif kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        problem = f"unknown field; expected one of: {', '.join(allowed)}"
    else:
        message = first["msg"].removeprefix("Value error, ")
        problem = message if not loc else f"{message}; got {first['input']!r}"
    if len(problems) > 1:
        problem += f" (and {len(problems) - 1} more problem(s) after fixing this one)"
    return field, problem


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """Field names a TOML table may hold at ``loc`` (list indexes skipped)."""
    model: type[BaseModel] | None = Profile
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        model = _model_in(model.model_fields[str(part)].annotation)
    if model is None:
        return []
    return [key for key in model.model_fields if key not in _LOADER_FIELDS]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None`` or ``list[X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (
        list,
        typing.Union,
    ):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
