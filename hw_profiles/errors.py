"""Errors raised while finding, reading and validating hardware profiles."""

from __future__ import annotations

from pathlib import Path

__all__ = ["InvalidProfileError", "ProfileError", "ProfileNotFoundError"]


class ProfileError(Exception):
    """Base of every error this package raises."""


class ProfileNotFoundError(ProfileError, LookupError):
    """No profile of that name exists on the search path."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        super().__init__(
            f"no hardware profile named {name!r}; available: {', '.join(available) or 'none'}. "
            "Add your own with a NAME.toml in a directory listed in EDGEFLEET_PROFILES_PATH."
        )


class InvalidProfileError(ProfileError, ValueError):
    """A profile file exists but is not a valid profile.

    ``field`` is the dotted path of the offending entry (``"toolchain.cc"``) or ``None``
    when the file as a whole is unreadable.
    """

    def __init__(self, path: Path, field: str | None, problem: str) -> None:
        self.path = path
        self.field = field
        self.problem = problem
        where = f"{path}: {field}" if field else str(path)
        super().__init__(f"{where}: {problem}")
