"""Hardware profiles: one TOML file per board, validated on load.

>>> from hw_profiles import load_profile
>>> load_profile("rpi4").targets.cpu["mcpu"]
'cortex-a72'
"""

from .errors import InvalidProfileError, ProfileError, ProfileNotFoundError
from .loader import (
    BUILTIN_PROFILE_DIR,
    PROFILES_PATH_ENV,
    list_profiles,
    load_profile,
    load_profile_file,
    profile_search_path,
)
from .schema import Profile, RuntimeChoice

__all__ = [
    "BUILTIN_PROFILE_DIR",
    "PROFILES_PATH_ENV",
    "InvalidProfileError",
    "Profile",
    "ProfileError",
    "ProfileNotFoundError",
    "RuntimeChoice",
    "list_profiles",
    "load_profile",
    "load_profile_file",
    "profile_search_path",
]
