"""``ota.archive``, fast and in-process: the bundle a build writes, and every way a hostile
archive is refused (its order, its entry types, sizes, hashes, duplicates, truncation),
each with the exact message a user reads. ``make mutate`` runs these (.ci/mutate.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from ota.archive import _copy_and_hash, extract_bundle, read_manifest, verify_bundle, write_bundle
from ota.errors import ArchiveError, BundleIntegrityError
from ota.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
)
from tests.utils.bundles import toy_manifest

CONTENTS = {"model.onnx": b"the model bytes", "golden.npz": b"golden", "lib/x/extra.bin": b"x" * 9}


def _sources(directory: Path, contents: dict[str, bytes]) -> dict[str, Path]:
    sources = {}
    for name, data in contents.items():
        path = directory / "src" / name.replace("/", "_")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        sources[name] = path
    return sources


def _bundle(directory: Path, contents: dict[str, bytes] = CONTENTS) -> Path:
    out = directory / "built" / "here" / "digits.efb"
    return write_bundle(toy_manifest(contents), _sources(directory, contents), out)


def _member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "model.onnx"
    return info, data


def _crafted(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A tar written entry by entry, as an attacker would."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _good_members(contents: dict[str, bytes] = CONTENTS) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        _member(MANIFEST_NAME, toy_manifest(contents).to_json()),
        *(_member(name, data) for name, data in contents.items()),
    ]


# --- writing ----------------------------------------------------------------------------------


def test_a_bundle_round_trips_into_a_new_directory(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    assert bundle == tmp_path / "built" / "here" / "digits.efb"
    assert _bundle(tmp_path) == bundle  # written again beside itself, replaced whole
    manifest = toy_manifest(CONTENTS)
    assert read_manifest(bundle) == manifest
    assert verify_bundle(bundle) == manifest
    dest = tmp_path / "deep" / "er" / "slot"
    assert extract_bundle(bundle, dest) == manifest
    assert {
        p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()
    } == CONTENTS
    assert sorted(p.name for p in dest.parent.iterdir()) == ["slot"]


def test_the_archive_is_deterministic_ustar_with_the_manifest_first(tmp_path: Path) -> None:
    contents = {**CONTENTS, "modèle-é.bin": b"non-ascii name"}
    first = _bundle(tmp_path / "one", contents)
    second = _bundle(tmp_path / "two", contents)
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [MANIFEST_NAME, *sorted(contents)]
        assert tar.pax_headers == {}
        for member in members:
            assert member.type == tarfile.REGTYPE
            assert (member.mtime, member.mode, member.uid, member.gid) == (0, 0o644, 0, 0)
            assert (member.uname, member.gname, member.pax_headers) == ("", "", {})
        manifest = tar.extractfile(members[0])
        assert manifest is not None and manifest.read() == toy_manifest(contents).to_json()
    raw = first.read_bytes()
    assert raw[257:263] == b"ustar\x00"  # a plain ustar header, no pax extension entries
    assert b"PaxHeader" not in raw and b"path=" not in raw


def test_sources_that_do_not_match_the_manifest_are_refused(tmp_path: Path) -> None:
    sources = _sources(tmp_path, CONTENTS)
    del sources["golden.npz"]
    sources["other.bin"] = sources["model.onnx"]
    with pytest.raises(ValueError) as raised:
        write_bundle(toy_manifest(CONTENTS), sources, tmp_path / "out.efb")
    assert str(raised.value) == (
        "sources ['lib/x/extra.bin', 'model.onnx', 'other.bin'] do not match the manifest's "
        "['golden.npz', 'lib/x/extra.bin', 'model.onnx']"
    )
    assert not (tmp_path / "out.efb").exists()


# --- reading what is there -------------------------------------------------------------------


def test_reading_the_manifest_reads_no_file_and_verifying_reads_all(tmp_path: Path) -> None:
    altered = {**CONTENTS, "model.onnx": b"THE model bytes"}  # same size, other bytes
    members = _good_members(CONTENTS)
    members[1] = _member("model.onnx", altered["model.onnx"])
    bundle = _crafted(tmp_path / "altered.efb", members)
    assert read_manifest(bundle) == toy_manifest(CONTENTS)
    with pytest.raises(BundleIntegrityError) as raised:
        verify_bundle(bundle)
    listed = hashlib.sha256(CONTENTS["model.onnx"]).hexdigest()
    found = hashlib.sha256(altered["model.onnx"]).hexdigest()
    assert str(raised.value) == (
        f"altered.efb: 'model.onnx' has SHA-256 {found}, the manifest lists {listed}: the "
        "bundle was altered after it was built"
    )


def test_a_missing_bundle_file_is_an_archive_error(tmp_path: Path) -> None:
    missing = tmp_path / "nothere.efb"
    with pytest.raises(ArchiveError) as raised:
        read_manifest(missing)
    assert str(raised.value) == f"{missing}: no such bundle file"


@pytest.mark.parametrize(
    "data",
    [b"not a tar at all" * 64, b"\x00" * 10],
    ids=["garbage", "short"],
)
def test_a_file_that_is_no_tar_is_an_archive_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "junk.efb"
    path.write_bytes(data)
    with pytest.raises(ArchiveError) as raised:
        verify_bundle(path)
    message = str(raised.value)
    assert message.startswith("junk.efb: ") and "not " in message


def test_a_compressed_bundle_is_refused(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    packed = tmp_path / "packed.efb"
    packed.write_bytes(gzip.compress(bundle.read_bytes()))
    with pytest.raises(ArchiveError) as raised:
        read_manifest(packed)
    assert str(raised.value).startswith("packed.efb: not a readable bundle archive (truncated?): ")


def test_a_truncated_bundle_is_an_archive_error(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    raw = bundle.read_bytes()
    with tarfile.open(bundle) as tar:
        first, *_, last = tar.getmembers()
    inside = ((first.offset_data + 3, read_manifest), (last.offset_data + 3, verify_bundle))
    for cut, reader in inside:
        path = tmp_path / "cut.efb"
        path.write_bytes(raw[:cut])
        with pytest.raises(ArchiveError) as raised:
            reader(path)
        assert str(raised.value).startswith("cut.efb: ")
        assert "truncated" in str(raised.value)


# --- hostile first entries -------------------------------------------------------------------


def test_an_empty_archive_has_no_manifest(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError) as raised:
        read_manifest(_crafted(tmp_path / "empty.efb", []))
    assert str(raised.value) == (
        "empty.efb: not a bundle: the first entry must be manifest.json, found nothing"
    )


@pytest.mark.parametrize(
    ("first", "found"),
    [
        (_member("model.onnx", b"the model bytes"), "'model.onnx'"),
        (_member(MANIFEST_NAME, kind=tarfile.SYMTYPE), "'manifest.json'"),
        (_member(MANIFEST_NAME, kind=tarfile.DIRTYPE), "'manifest.json'"),
    ],
    ids=["another-file", "a-symlink", "a-directory"],
)
def test_the_first_entry_must_be_the_manifest_as_a_file(
    tmp_path: Path, first: tuple[tarfile.TarInfo, bytes], found: str
) -> None:
    bundle = _crafted(tmp_path / "first.efb", [first, *_good_members()])
    with pytest.raises(ArchiveError) as raised:
        read_manifest(bundle)
    assert str(raised.value) == (
        f"first.efb: not a bundle: the first entry must be manifest.json, found {found}"
    )


def test_a_manifest_over_1_mib_is_refused_before_it_is_read(tmp_path: Path) -> None:
    data = toy_manifest(CONTENTS).to_json()
    exact = data + b" " * (MAX_MANIFEST_BYTES - len(data))
    members = _good_members()
    members[0] = _member(MANIFEST_NAME, exact)
    assert verify_bundle(_crafted(tmp_path / "exact.efb", members)) == toy_manifest(CONTENTS)
    members[0] = _member(MANIFEST_NAME, exact + b" ")
    with pytest.raises(ArchiveError) as raised:
        read_manifest(_crafted(tmp_path / "big.efb", members))
    assert str(raised.value) == (
        f"big.efb: manifest.json is {MAX_MANIFEST_BYTES + 1} bytes, more than 1 MiB"
    )


# --- hostile later entries -------------------------------------------------------------------


def _refused(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> str:
    bundle = _crafted(tmp_path / "hostile.efb", members)
    read_manifest(bundle)  # the manifest itself is fine
    with pytest.raises(ArchiveError) as raised:
        verify_bundle(bundle)
    dest = tmp_path / "out" / "slot"
    with pytest.raises(ArchiveError) as extracted:
        extract_bundle(bundle, dest)
    assert str(extracted.value) == str(raised.value)
    assert list((tmp_path / "out").iterdir()) == []  # no slot, no temporary directory
    return str(raised.value)


@pytest.mark.parametrize("name", ["../escape.bin", "/etc/passwd", "unlisted.bin"])
def test_an_entry_the_manifest_does_not_list_is_refused(tmp_path: Path, name: str) -> None:
    members = [*_good_members(), _member(name, b"payload")]
    assert _refused(tmp_path, members) == (
        f"hostile.efb: entry {name!r} is not listed in the manifest"
    )
    assert not (tmp_path / "escape.bin").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE])
def test_links_and_directories_are_refused(tmp_path: Path, kind: bytes) -> None:
    members = _good_members()
    members[1] = _member("model.onnx", kind=kind)
    members[1][0].linkname = "/etc/passwd"
    assert _refused(tmp_path, members) == (
        "hostile.efb: entry 'model.onnx' is not a regular file (links and directories are refused)"
    )


def test_an_entry_that_appears_twice_is_refused(tmp_path: Path) -> None:
    members = [*_good_members(), _member("model.onnx", CONTENTS["model.onnx"])]
    assert _refused(tmp_path, members) == "hostile.efb: entry 'model.onnx' appears twice"


def test_an_entry_of_another_size_is_refused(tmp_path: Path) -> None:
    members = _good_members()
    members[1] = _member("model.onnx", CONTENTS["model.onnx"] + b"!")
    with pytest.raises(BundleIntegrityError):
        _refused(tmp_path, members)
    with pytest.raises(BundleIntegrityError) as raised:
        verify_bundle(tmp_path / "hostile.efb")
    assert str(raised.value) == ("hostile.efb: 'model.onnx' is 16 bytes, the manifest lists 15")


def test_files_the_manifest_lists_must_all_be_there(tmp_path: Path) -> None:
    members = _good_members()
    del members[2:]
    assert _refused(tmp_path, members) == (
        "hostile.efb: files listed in the manifest are missing: golden.npz, lib/x/extra.bin"
    )


def test_extracting_over_an_existing_directory_is_refused(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    dest = tmp_path / "slot"
    dest.mkdir()
    with pytest.raises(ValueError) as raised:
        extract_bundle(bundle, dest)
    assert str(raised.value) == f"{dest} already exists"
    assert list(dest.iterdir()) == []


# --- streaming --------------------------------------------------------------------------------


def test_files_are_hashed_and_copied_in_chunks_not_read_whole(tmp_path: Path) -> None:
    big = {**CONTENTS, "model.onnx": bytes(range(256)) * (24 * 4096)}  # 24 MiB
    bundle = _bundle(tmp_path, big)
    tracemalloc.start()
    try:
        verify_bundle(bundle)
        extract_bundle(bundle, tmp_path / "slot")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes held at once"
    assert (tmp_path / "slot" / "model.onnx").read_bytes() == big["model.onnx"]


def test_a_stream_that_ends_early_is_truncated(tmp_path: Path) -> None:
    """tarfile raises its own error for a short archive first; this is the guard behind it."""
    entry = toy_manifest(CONTENTS).files[0]
    out = tmp_path / "copy"
    with out.open("wb") as sink, pytest.raises(ArchiveError) as raised:
        _copy_and_hash(io.BytesIO(b"the model"), entry, lambda _: sink, "short.efb")
    assert str(raised.value) == "short.efb: truncated inside 'model.onnx'"
    assert sink.closed
    assert out.read_bytes() == b"the model"
    digest = _copy_and_hash(io.BytesIO(CONTENTS["model.onnx"]), entry, None, "whole.efb")
    assert digest == entry.sha256
