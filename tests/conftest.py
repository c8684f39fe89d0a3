"""Shared fixtures: profile files to break, and a user profile directory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from hw_profiles import BUILTIN_PROFILE_DIR, PROFILES_PATH_ENV

# CI replays the same examples on every run (a red build is then reproducible); locally
# Hypothesis explores new ones each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

SHIPPED_PROFILES = {"rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "x86_64-avx2", "host"}


@pytest.fixture(autouse=True)
def _no_user_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the shipped profiles unless they add a directory themselves."""
    monkeypatch.delenv(PROFILES_PATH_ENV, raising=False)


@pytest.fixture
def user_profile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty directory on EDGEFLEET_PROFILES_PATH."""
    directory = tmp_path / "profiles"
    directory.mkdir()
    monkeypatch.setenv(PROFILES_PATH_ENV, str(directory))
    yield directory


@pytest.fixture
def write_profile(user_profile_dir: Path) -> Callable[..., Path]:
    """Write ``NAME.toml`` into the user directory: the shipped rpi4 profile, edited.

    ``edit`` takes the rpi4 text and returns the text to write.
    """

    def write(name: str = "myboard", edit: Callable[[str], str] = lambda text: text) -> Path:
        text = (BUILTIN_PROFILE_DIR / "rpi4.toml").read_text()
        path = user_profile_dir / f"{name}.toml"
        path.write_text(edit(text))
        return path

    return write


MODELS_CACHE_ENV = "EDGEFLEET_TEST_MODELS"
"""A directory where the trained and compiled digits model are kept for later sessions to
reuse. ``make mutate`` sets it (.ci/mutate.py): each mutant's test run would otherwise
train and compile them again. Unset, every session builds them in its own temp dir."""
_BUILT = ".built"


def _model_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, bool]:
    """Where to build ``name``, and whether a finished build is already there."""
    cache = os.environ.get(MODELS_CACHE_ENV)
    if not cache:
        return tmp_path_factory.mktemp(name), False
    path = Path(cache) / name
    path.mkdir(parents=True, exist_ok=True)
    return path, (path / _BUILT).is_file()


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/digits/train.py run as a user runs it: digits.keras, .onnx and .npz."""
    import subprocess
    import sys

    out, built = _model_dir(tmp_path_factory, "digits")
    if built:
        return out
    script = Path(__file__).resolve().parents[1] / "examples" / "digits" / "train.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout
    (out / _BUILT).touch()
    return out


@pytest.fixture(scope="session")
def compiled_digits(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``edgefleet compile digits.onnx --profile host``: fp32 on ONNX Runtime, LiteRT (the
    ONNX model converted with onnx2tf) and TVM."""
    from compiler.pipeline import CompileOptions, compile_model
    from hw_profiles import load_profile

    parent, built = _model_dir(tmp_path_factory, "compiled")
    out = parent / "digits-host"
    if built:
        return out
    compile_model(
        CompileOptions(
            model=digits / "digits.onnx",
            profile=load_profile("host"),
            out_dir=out,
            calibration=digits / "digits.npz",
            latency_runs=3,
        )
    )
    (parent / _BUILT).touch()
    return out


@pytest.fixture
def bundles(compiled_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Bundles of the compiled digits model at 1.0.0 and 1.1.0 (made once per session)."""
    from tests.utils.fleet import make_bundle

    out = tmp_path_factory.getbasetemp() / "fleet-bundles"
    out.mkdir(exist_ok=True)
    return make_bundle(compiled_digits, out, "1.0.0"), make_bundle(compiled_digits, out, "1.1.0")


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One throwaway PostgreSQL server for the whole run (started by the first test that
    asks); each test makes a database of its own on it."""
    from tests.utils.postgres import postgres_available, postgres_server

    if not postgres_available():
        pytest.skip("PostgreSQL server binaries not found (install the postgresql package)")
    with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield url
