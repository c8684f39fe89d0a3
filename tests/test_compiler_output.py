"""``edgefleet compile --out``: a compile never deletes what it did not make."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compiler.errors import OutputDirError
from compiler.output import check_output_dir
from contracts.cli import EXIT_ERROR
from edgefleet.cli import app

runner = CliRunner()


def _compile(model: Path, out: Path | None, *extra: str) -> object:
    args = ["compile", str(model), "--profile", "host", "--latency-runs", "1", "--json"]
    return runner.invoke(app, [*args, *(["--out", str(out)] if out else []), *extra])


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_a_directory_with_other_files_is_refused_before_any_work(
    digits: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "notes" / "plan.md").write_text("plan")
    before = _tree(out)
    result = _compile(digits / "digits.onnx", out)
    assert result.exit_code == EXIT_ERROR  # type: ignore[attr-defined]
    said = " ".join(result.stderr.split())  # type: ignore[attr-defined]
    assert "not an earlier edgefleet compile output" in said and "--force" in said
    assert "notes.txt" in said
    assert _tree(out) == before
    assert not list(tmp_path.glob(".mine.*"))


def test_an_earlier_output_is_replaced_and_a_touched_one_is_not(
    digits: Path, tmp_path: Path
) -> None:
    out = tmp_path / "digits-host"
    first = _compile(digits / "digits.onnx", out)
    assert first.exit_code == 0, first.stderr  # type: ignore[attr-defined]
    created = json.loads((out / "report.json").read_text())["created"]
    again = _compile(digits / "digits.onnx", out)
    assert again.exit_code == 0, again.stderr  # type: ignore[attr-defined]
    assert (out / "report.json").exists() and (out / "MODEL_CARD.md").exists()
    assert json.loads((out / "report.json").read_text())["created"] >= created
    (out / "my-notes.txt").write_text("mine now")
    refused = _compile(digits / "digits.onnx", out)
    assert refused.exit_code == EXIT_ERROR  # type: ignore[attr-defined]
    assert "my-notes.txt" in refused.stderr  # type: ignore[attr-defined]
    assert (out / "my-notes.txt").read_text() == "mine now"
    forced = _compile(digits / "digits.onnx", out, "--force")
    assert forced.exit_code == 0, forced.stderr  # type: ignore[attr-defined]
    assert not (out / "my-notes.txt").exists()


def test_the_current_directory_and_the_models_own_are_never_replaced(
    digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    model = work / "digits.onnx"
    model.write_bytes((digits / "digits.onnx").read_bytes())
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (Path("."), tmp_path):
        with pytest.raises(OutputDirError, match="current directory or one above it"):
            check_output_dir(out, source=model, force=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(OutputDirError, match="holds the source model"):
        check_output_dir(work, source=model, force=True)
    result = _compile(model, Path("."), "--force")
    assert result.exit_code == EXIT_ERROR  # type: ignore[attr-defined]
    assert sorted(os.listdir(work)) == ["digits.onnx", "notes.txt"]


def test_the_default_output_is_named_after_the_model_and_the_profile(
    digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _compile(digits / "digits.onnx", None)
    assert result.exit_code == 0, result.stderr  # type: ignore[attr-defined]
    assert (tmp_path / "build" / "digits-host" / "report.json").is_file()
