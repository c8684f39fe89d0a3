"""Fuzzing the bundle readers: only ``BundleError`` escapes, and nothing lands outside dest.

The issue's requirement: Hypothesis-fuzz the manifest parser and the archive reader (path
traversal entries such as ``../x`` and absolute paths, symlinks, huge sizes, truncated
files). ``parse_manifest`` may only return a ``Manifest`` or raise ``ManifestError``;
``read_manifest``, ``verify_bundle`` and ``extract_bundle`` may only return a manifest or
raise a ``BundleError`` subclass, and ``extract_bundle`` writes nothing but ``dest`` (and,
on error, leaves no ``dest`` and no temporary directory behind). Positive controls at the
end keep these from passing vacuously.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ota.archive import extract_bundle, read_manifest, verify_bundle, write_bundle
from ota.errors import BundleError, ManifestError
from ota.manifest import (
    MANIFEST_NAME,
    MAX_FILE_BYTES,
    MAX_FILES,
    Manifest,
    check_member_path,
    parse_manifest,
)

FUZZ = settings(max_examples=400, deadline=None)
FUZZ_FEW = settings(max_examples=100, deadline=None)

GB = 10**9

# ---------------------------------------------------------------------------------------
# A valid manifest and bundle, built here


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_doc(files: dict[str, bytes]) -> dict[str, Any]:
    """A JSON-ready manifest listing ``files`` (name -> content); every field valid."""
    names = list(files)
    return {
        "schema": "edgefleet.bundle/1",
        "name": "digits",
        "version": "1.2.3-rc.1+build.5",
        "version_number": 1_002_003,
        "model": {"name": "digits", "version": "2"},
        "profile": "rpi4",
        "runtime": "onnxruntime",
        "precision": "fp32",
        "device": "cpu",
        "artifact": names[0],
        "artifact_metadata": names[1] if len(names) > 2 else None,
        "files": [{"path": n, "sha256": _sha(d), "size": len(d)} for n, d in files.items()],
        "min_agent_version": "0.1.0",
        "created": "2024-05-01T12:00:00+00:00",
        "golden_vectors": {
            "path": names[-1],
            "count": 8,
            "atol": 1e-5,
            "rtol": 1e-3,
            "top1": True,
        },
    }


def _manifest_bytes(doc: object) -> bytes:
    return json.dumps(doc).encode()


def _manifest(files: dict[str, bytes]) -> Manifest:
    return parse_manifest(_manifest_bytes(_manifest_doc(files)))


def _write_valid_bundle(root: Path, files: dict[str, bytes]) -> tuple[Path, Manifest]:
    """``write_bundle`` of ``files`` into ``root/in/b.efb``, sources under ``root/src``."""
    src = root / "src"
    src.mkdir()
    sources = {}
    for i, (name, data) in enumerate(files.items()):
        sources[name] = src / f"{i}.bin"
        sources[name].write_bytes(data)
    manifest = _manifest(files)
    return write_bundle(manifest, sources, root / "in" / "b.efb"), manifest


REFERENCE_FILES = {
    "model.onnx": bytes(range(256)) * 3,  # spans two tar blocks
    "sub/dir/meta.json": b'{"a": 1}\n',
    "empty.bin": b"",
    "golden.npz": b"\x93NUMPY" + b"\x01" * 600,
}


@functools.cache
def _reference_bundle() -> tuple[bytes, Manifest, tuple[tarfile.TarInfo, ...]]:
    """A valid bundle's bytes, its manifest and its tar members (header and data offsets)."""
    with tempfile.TemporaryDirectory() as t:
        path, manifest = _write_valid_bundle(Path(t), REFERENCE_FILES)
        data = path.read_bytes()
        with tarfile.open(path) as tar:
            members = tuple(tar.getmembers())
    return data, manifest, members


# ---------------------------------------------------------------------------------------
# Running the readers in a sandbox


def _tree(root: Path) -> set[str]:
    """Every path under ``root`` (links not followed), relative to it."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def _check_readers(make_bundle: Callable[[Path], bytes]) -> Manifest | None:
    """Run all three readers on the bundle ``make_bundle(sandbox)`` returns.

    Asserts the contract: each returns a manifest or raises ``BundleError`` (any other
    exception propagates and fails the test); read_manifest and verify_bundle write
    nothing; extract_bundle writes exactly the listed files under dest, with their listed
    SHA-256, or on error leaves the sandbox as it found it. Returns the verified manifest.
    """
    with tempfile.TemporaryDirectory() as t:
        root = Path(t)
        (root / "in").mkdir()
        (root / "out").mkdir()
        bundle = root / "in" / "b.efb"
        bundle.write_bytes(make_bundle(root))
        dest = root / "out" / "dest"
        before = _tree(root)

        results: dict[str, Manifest | None] = {}
        for reader in (read_manifest, verify_bundle):
            try:
                results[reader.__name__] = reader(bundle)
            except BundleError:
                results[reader.__name__] = None
            assert _tree(root) == before, f"{reader.__name__} wrote files"
        try:
            extracted: Manifest | None = extract_bundle(bundle, dest)
        except BundleError:
            extracted = None
            assert _tree(root) == before, "a failed extract_bundle left files behind"
        else:
            expected = set(before)
            for f in extracted.files:
                written = PurePosixPath("out/dest", f.path)
                expected |= {str(written)} | {str(p) for p in written.parents[:-1]}
            assert _tree(root) == expected, "extract_bundle wrote outside the listed files"
            for f in extracted.files:
                assert _sha((dest / f.path).read_bytes()) == f.sha256

        verified = results["verify_bundle"]
        assert extracted == verified, "extract_bundle and verify_bundle disagree"
        if verified is not None:
            assert results["read_manifest"] == verified
        return verified


# ---------------------------------------------------------------------------------------
# 1. The manifest parser


def _parse(data: bytes) -> Manifest | None:
    """``parse_manifest``; ``None`` for ManifestError. Anything else escapes and fails."""
    try:
        manifest = parse_manifest(data)
    except ManifestError:
        return None
    # Whatever parses is sound: safe paths, sane sizes, and canonical bytes round-trip.
    assert 1 <= len(manifest.files) <= MAX_FILES
    for f in manifest.files:
        assert check_member_path(f.path) == f.path
        assert 0 <= f.size <= MAX_FILE_BYTES
    assert parse_manifest(manifest.to_json()) == manifest
    return manifest


BAD_PATHS = [
    "../x",
    "/etc/passwd",
    "a/../../b",
    "a/..",
    "..",
    ".",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "",
    "a\\b",
    "..\\x",
    "a\x00b",
    "/",
    "//x",
    MANIFEST_NAME,
    "x" * 201,
]
ODD_PATHS = ["\udcff", "é" * 200, "a" * 200, "a\nb", "-rf", " ", "CON", "d", "d/f"]
BAD_SIZES = [-1, -(2**63), 2**64, 2**63, MAX_FILE_BYTES + 1, 10**30, 1.0, "1", None, True]
BAD_SHAS = ["", "0" * 63, "0" * 65, "A" * 64, "g" * 64, " " + "0" * 63, 0, None]
DEEP = "__DEEP__"  # replaced by 5000 nested arrays in the JSON text
BIG_INT = "__BIG_INT__"  # replaced by an integer literal with 5000 digits
ODD_VALUES: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**53,
    2**64,
    -(2**64),
    1.5,
    float("inf"),
    float("-inf"),
    float("nan"),
    "",
    "x",
    "\ud800",
    "1.0",
    "1.0.0",
    "01.0.0",
    "2024-01-01T00:00:00",
    "2024-01-01T00:00:00+00:00",
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+01:00",
    "tvm",
    "gpu",
    [],
    {},
    [1, [2]],
    {"a": {"b": None}},
    DEEP,
    BIG_INT,
    *BAD_PATHS,
    *BAD_SIZES,
    *BAD_SHAS,
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(ODD_VALUES),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


def _slots(node: object) -> list[tuple[dict[str, object] | list[object], str | int]]:
    """Every (container, key) pair in a JSON document, depth first."""
    slots: list[tuple[dict[str, object] | list[object], str | int]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            slots.append((node, key))
            slots.extend(_slots(value))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            slots.append((node, index))
            slots.extend(_slots(value))
    return slots


def _dump(doc: object) -> bytes:
    text = json.dumps(doc)
    text = text.replace(json.dumps(DEEP), "[" * 5000 + "]" * 5000)
    return text.replace(json.dumps(BIG_INT), "9" * 5000).encode()


@st.composite
def mutated_manifests(draw: st.DrawFn) -> bytes:
    """A valid manifest's JSON with one to four mutations: keys dropped, values of the
    wrong type or range, unsafe file paths, huge or negative sizes, bad digests, extra
    keys, duplicate or too many files, deep nesting."""
    names = draw(
        st.lists(st.sampled_from(["a.onnx", "g.npz", "x/y.bin", *ODD_PATHS]), min_size=1).map(
            lambda n: list(dict.fromkeys(n))
        )
    )
    doc = _manifest_doc({n: n.encode("utf-8", "surrogateescape") for n in names})
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "set", "extra", "path", "size", "sha", "files"]))
        files = doc.get("files")
        files = files if isinstance(files, list) else []
        entry: dict[str, object] = draw(
            st.sampled_from([f for f in files if isinstance(f, dict)] or [{}])
        )
        if op in ("drop", "set"):
            container, key = draw(st.sampled_from(_slots(doc)))
            if op == "drop":
                container.pop(key)  # type: ignore[arg-type]
            else:
                container[key] = draw(json_values)  # type: ignore[index]
        elif op == "extra":
            dicts = [doc, *(c for c, _ in _slots(doc) if isinstance(c, dict))]
            draw(st.sampled_from(dicts))[draw(st.text(max_size=10))] = draw(json_values)
        elif op == "path":
            entry["path"] = draw(st.sampled_from(BAD_PATHS + ODD_PATHS) | st.text(max_size=8))
        elif op == "size":
            entry["size"] = draw(st.sampled_from([*BAD_SIZES, 0, 10 * GB, MAX_FILE_BYTES]))
        elif op == "sha":
            entry["sha256"] = draw(st.sampled_from(BAD_SHAS) | st.text(max_size=70))
        elif files:
            count = draw(st.sampled_from([0, 2, MAX_FILES + 1]))
            doc["files"] = [copy.deepcopy(files[0]) for _ in range(count)]
    return _dump(doc)


@FUZZ
@given(
    st.binary(max_size=1500)
    | st.text(max_size=300).map(str.encode)
    | json_values.map(_dump)
    | st.sampled_from([b"", b"{}", b"[]", b"null", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00"])
)
def test_parse_manifest_on_arbitrary_bytes_raises_only_manifest_error(data: bytes) -> None:
    """Garbage, text and arbitrary JSON give a ``Manifest`` or ``ManifestError``, never
    another exception."""
    _parse(data)


@settings(max_examples=1000, deadline=None)
@given(mutated_manifests())
def test_parse_manifest_on_mutated_manifests_raises_only_manifest_error(data: bytes) -> None:
    """A valid manifest with keys dropped, types changed, unsafe paths, huge or negative
    sizes, bad digests, extra keys or deep nesting gives a sound ``Manifest`` or
    ``ManifestError``."""
    _parse(data)


@FUZZ
@given(
    st.lists(st.sampled_from(["a.onnx", "g.npz", "x/y.bin"]), min_size=1, unique=True),
    st.data(),
)
def test_byte_flipped_manifests_raise_only_manifest_error(
    names: list[str], data: st.DataObject
) -> None:
    """Random byte flips in a valid manifest's canonical JSON give ``Manifest`` or
    ``ManifestError``."""
    raw = bytearray(_manifest({n: n.encode() for n in names}).to_json())
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    _parse(bytes(raw))


@pytest.mark.parametrize("path", BAD_PATHS)
def test_unsafe_file_paths_are_refused(path: str) -> None:
    """Traversal, absolute, empty, backslash and self-referencing paths are a
    ``ManifestError``, wherever they appear."""
    doc = _manifest_doc({"a.onnx": b"a"})
    doc["files"].append({"path": path, "sha256": "0" * 64, "size": 0})
    with pytest.raises(ManifestError):
        parse_manifest(_manifest_bytes(doc))
    doc = _manifest_doc({"a.onnx": b"a"})
    doc["artifact"] = path
    with pytest.raises(ManifestError):
        parse_manifest(_manifest_bytes(doc))


@pytest.mark.parametrize("size", [-1, MAX_FILE_BYTES + 1, 2**64, -(2**64), 1.0, "1"])
def test_out_of_range_sizes_are_refused(size: object) -> None:
    """Negative, over 16 GiB, 2**64 and non-integer sizes are a ``ManifestError``."""
    doc = _manifest_doc({"a.onnx": b"a"})
    doc["files"][0]["size"] = size
    with pytest.raises(ManifestError):
        parse_manifest(_manifest_bytes(doc))


def test_an_integer_literal_too_long_for_python_is_a_manifest_error() -> None:
    """``json.loads`` refuses integer literals over 4300 digits with a plain ValueError;
    the parser must turn it into ``ManifestError`` like any other malformed JSON."""
    doc = _manifest_doc({"a.onnx": b"a"})
    doc["version_number"] = BIG_INT
    with pytest.raises(ManifestError):
        parse_manifest(_dump(doc))


# ---------------------------------------------------------------------------------------
# 2. The archive reader


def _block(size: int) -> int:
    return -(-size // 512) * 512


@FUZZ
@given(st.data())
def test_truncated_bundles_raise_only_bundle_error(data: st.DataObject) -> None:
    """A valid bundle cut anywhere before the end of its last file is refused with
    ``BundleError``; cut in the trailing zero blocks it still gives the original manifest.
    Nothing is written outside dest either way."""
    raw, manifest, members = _reference_bundle()
    headers = [m.offset for m in members]
    end_of_data = members[-1].offset_data + _block(members[-1].size)
    cut = data.draw(
        st.integers(0, len(raw) - 1)
        | st.sampled_from(headers).flatmap(lambda h: st.integers(max(h - 2, 0), h + 600))
    )
    got = _check_readers(lambda _: raw[:cut])
    assert got == (None if cut < end_of_data else manifest)


@FUZZ
@given(st.data(), st.booleans())
def test_byte_flipped_bundles_raise_only_bundle_error(
    data: st.DataObject, fix_checksums: bool
) -> None:
    """Random byte flips anywhere in a valid bundle or in its headers (then, half the time,
    with the header checksums recomputed, so tar reads the forged fields: names, sizes,
    types, link targets) give a manifest whose files all match, or ``BundleError``. (A flip
    inside the manifest's text can leave it valid, e.g. another version digit: the manifest
    is not self-signed, the TUF target hash over the whole bundle is what catches that.)"""
    raw, manifest, members = _reference_bundle()
    headers = [m.offset for m in members]
    flipped = bytearray(raw)
    offsets = st.integers(0, len(raw) - 1) | st.sampled_from(headers).flatmap(
        lambda h: st.integers(h, h + 511)
    )
    for _ in range(data.draw(st.integers(1, 8))):
        flipped[data.draw(offsets)] ^= data.draw(st.integers(1, 255))
    if fix_checksums:
        for h in headers:
            block = flipped[h : h + 512]
            block[148:156] = b" " * 8
            flipped[h + 148 : h + 155] = b"%06o\0" % sum(block)
    got = _check_readers(lambda _: bytes(flipped))
    assert got is None or got.files == manifest.files


@dataclasses.dataclass
class _Entry:
    """One hand-crafted tar member. ``{SANDBOX}`` in a name or link target stands for the
    test's temporary directory, so an absolute path that escapes can be seen there."""

    name: str
    data: bytes | None  # None: the manifest's JSON, filled in when the tar is written
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""
    header_size: int | None = None  # the size the header claims, when not len(data)
    keep: int | None = None  # how many data bytes are actually written


def _tar_bytes(entries: list[_Entry], manifest: bytes, fmt: int, root: Path) -> bytes:
    out = bytearray()
    for e in entries:
        info = tarfile.TarInfo(e.name.replace("{SANDBOX}", str(root)))
        info.type = e.kind
        info.linkname = e.linkname.replace("{SANDBOX}", str(root))
        info.mode = 0o644
        info.mtime = 0
        data = manifest if e.data is None else e.data
        has_data = e.kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
        data = data if has_data else b""
        info.size = len(data) if e.header_size is None else e.header_size
        if e.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        out += info.tobuf(fmt, "utf-8", "surrogateescape")
        data = data[: e.keep] if e.keep is not None else data
        out += data + b"\0" * (-len(data) % 512)
    return bytes(out + b"\0" * 1024)


FILE_NAMES = ["model.onnx", "golden.npz", "sub/dir/meta.json", "link", "link/x", ".hidden"]
EVIL_NAMES = [
    "../x",
    "../../x",
    "a/../../x",
    "a/../../../x",
    "../dest/x",
    "../.dest.tmp/x",
    "{SANDBOX}/abs",
    "{SANDBOX}/out/dest",
    "/etc/passwd",
    "./model.onnx",
    "sub//dir/meta.json",
    "sub/dir/../dir/meta.json",
    "model.onnx/",
    "",
    ".",
    "..",
    "extra.bin",
    MANIFEST_NAME,
    "a\\..\\x",
]
LINK_TARGETS = ["/etc/passwd", "../", "..", "../../x", "{SANDBOX}/abs", "{SANDBOX}", "model.onnx"]
KINDS = [
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.CONTTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.FIFOTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    b"Z",  # unknown type
]
HUGE_SIZES = [10 * GB, 2**33, MAX_FILE_BYTES, MAX_FILE_BYTES + 1, 2**63 - 1, 1 << 20, -1, -512]


CRAFT_OPS = ["insert", "kind", "dup", "drop", "move", "huge", "listed-huge", "content"]
CRAFT_OPS += ["flip", "list-extra", "garbage-manifest"]


@st.composite
def crafted_archives(draw: st.DrawFn) -> tuple[list[_Entry], bytes, int]:
    """A tar built entry by entry with the ``tarfile`` module: a valid bundle, then up to
    five changes: evil entries inserted (traversal, absolute, links, devices, dirs), entry
    types changed, entries duplicated, dropped or reordered (manifest not first), header
    sizes that claim gigabytes with a few bytes present, contents altered, the manifest
    listing files that are absent or garbage instead of a manifest."""
    names = draw(st.lists(st.sampled_from(FILE_NAMES), min_size=1, max_size=4, unique=True))
    files = {n: draw(st.binary(max_size=700)) for n in names}
    doc = _manifest_doc(files)
    listed = doc["files"]
    entries = [_Entry(MANIFEST_NAME, None)] + [_Entry(n, files[n]) for n in sorted(files)]
    manifest: bytes | None = None
    indices = st.builds(lambda i: i % len(entries), st.integers(0, 64))
    after_first = st.builds(lambda i: 1 + i % len(entries), st.integers(0, 64))
    for _ in range(draw(st.integers(0, 5))):
        op = draw(st.sampled_from(CRAFT_OPS))
        if op == "insert":
            name = draw(st.sampled_from(EVIL_NAMES + FILE_NAMES))
            entry = _Entry(name, draw(st.binary(max_size=40)), draw(st.sampled_from(KINDS)))
            entry.linkname = draw(st.sampled_from(LINK_TARGETS))
            entries.insert(draw(after_first), entry)
        elif op == "kind":
            entry = entries[draw(indices)]
            entry.kind = draw(st.sampled_from(KINDS))
            entry.linkname = draw(st.sampled_from(LINK_TARGETS))
        elif op == "dup":
            entries.insert(draw(after_first), copy.copy(entries[draw(indices)]))
        elif op == "drop" and len(entries) > 1:
            entries.pop(draw(indices))
        elif op == "move":
            i, j = draw(indices), draw(indices)
            entries[i], entries[j] = entries[j], entries[i]
        elif op == "huge":
            entry = entries[draw(indices)]
            entry.header_size = draw(st.sampled_from(HUGE_SIZES))
            entry.keep = draw(st.integers(0, 16))
        elif op == "listed-huge":
            # The manifest and the header agree on a huge size; the data is not there.
            item = draw(st.sampled_from(listed))
            item["size"] = draw(st.sampled_from([10 * GB, MAX_FILE_BYTES, 1 << 20]))
            for entry in entries:
                if entry.name == item["path"]:
                    entry.header_size, entry.keep = item["size"], draw(st.integers(0, 16))
        elif op == "content":
            entries[draw(indices)].data = draw(st.binary(max_size=40))
        elif op == "flip":
            # Same size, other bytes: only the SHA-256 can tell.
            entry = entries[draw(indices)]
            if entry.data:
                entry.data = bytes([entry.data[0] ^ 0xFF]) + entry.data[1:]
        elif op == "list-extra":
            name = draw(st.sampled_from(["extra.bin", *FILE_NAMES]))
            listed.append({"path": name, "sha256": _sha(b""), "size": 0})
        elif op == "garbage-manifest":
            manifest = draw(st.binary(max_size=64) | json_values.map(_dump))
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    return entries, _manifest_bytes(doc) if manifest is None else manifest, fmt


@settings(max_examples=800, deadline=None)
@given(crafted_archives())
def test_crafted_archives_raise_only_bundle_error(
    archive: tuple[list[_Entry], bytes, int],
) -> None:
    """Hand-crafted tars with traversal and absolute names, symlinks and hardlinks out of
    the bundle, directories, devices, FIFOs, duplicates, unlisted entries, the manifest not
    first and headers claiming 10 GB: only ``BundleError``, and no file outside dest."""
    entries, manifest, fmt = archive
    _check_readers(lambda root: _tar_bytes(entries, manifest, fmt, root))


def _valid_entries() -> tuple[list[_Entry], bytes]:
    files = {"model.onnx": b"onnx" * 100, "golden.npz": b"npz"}
    manifest = _manifest_bytes(_manifest_doc(files))
    return [_Entry(MANIFEST_NAME, None)] + [
        _Entry(n, d) for n, d in sorted(files.items())
    ], manifest


def _attack(change: Callable[[list[_Entry]], object]) -> list[_Entry]:
    entries, _ = _valid_entries()
    change(entries)
    return entries


def _evil(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> _Entry:
    return _Entry(name, b"pwned", kind, linkname)


ATTACKS: dict[str, list[_Entry]] = {
    "manifest not first": _attack(lambda e: e.append(e.pop(0))),
    "manifest missing": _attack(lambda e: e.pop(0)),
    "two manifests": _attack(lambda e: e.append(_Entry(MANIFEST_NAME, None))),
    "manifest is a symlink": _attack(
        lambda e: e.__setitem__(0, _evil(MANIFEST_NAME, tarfile.SYMTYPE, "/etc/passwd"))
    ),
    "manifest is a directory": _attack(
        lambda e: e.__setitem__(0, _evil(MANIFEST_NAME, tarfile.DIRTYPE))
    ),
    "manifest header claims 10 GB": _attack(
        lambda e: e.__setitem__(0, _Entry(MANIFEST_NAME, None, header_size=10 * GB, keep=8))
    ),
    "manifest header claims 1 MiB, few bytes present": _attack(
        lambda e: e.__setitem__(0, _Entry(MANIFEST_NAME, None, header_size=1 << 20, keep=8))
    ),
    "manifest header size negative": _attack(
        lambda e: e.__setitem__(0, _Entry(MANIFEST_NAME, None, header_size=-512))
    ),
    "../x": _attack(lambda e: e.append(_evil("../x"))),
    "../../x": _attack(lambda e: e.append(_evil("../../x"))),
    "a/../../x": _attack(lambda e: e.append(_evil("a/../../x"))),
    "absolute path into the sandbox": _attack(lambda e: e.append(_evil("{SANDBOX}/abs"))),
    "absolute /etc/passwd": _attack(lambda e: e.append(_evil("/etc/passwd"))),
    "symlink to /etc/passwd": _attack(
        lambda e: e.append(_evil("evil", tarfile.SYMTYPE, "/etc/passwd"))
    ),
    "symlink to ../": _attack(lambda e: e.append(_evil("evil", tarfile.SYMTYPE, "../"))),
    "listed file is a symlink": _attack(
        lambda e: e.__setitem__(1, _evil(e[1].name, tarfile.SYMTYPE, "{SANDBOX}/abs"))
    ),
    "listed file is a hardlink to /etc/passwd": _attack(
        lambda e: e.__setitem__(1, _evil(e[1].name, tarfile.LNKTYPE, "/etc/passwd"))
    ),
    "hardlink to ../": _attack(lambda e: e.append(_evil("evil", tarfile.LNKTYPE, "../"))),
    "directory": _attack(lambda e: e.append(_evil("dir", tarfile.DIRTYPE))),
    "listed file is a directory": _attack(
        lambda e: e.__setitem__(1, _evil(e[1].name, tarfile.DIRTYPE))
    ),
    "listed file is a fifo": _attack(lambda e: e.__setitem__(1, _evil(e[1].name, b"6"))),
    "listed file is a char device": _attack(lambda e: e.__setitem__(1, _evil(e[1].name, b"3"))),
    "listed file is a block device": _attack(lambda e: e.__setitem__(1, _evil(e[1].name, b"4"))),
    "duplicate entry": _attack(lambda e: e.append(copy.copy(e[1]))),
    "unlisted entry": _attack(lambda e: e.append(_evil("extra.bin"))),
    "listed file missing": _attack(lambda e: e.pop(1)),
    "listed file header claims 10 GB": _attack(
        lambda e: e.__setitem__(1, dataclasses.replace(e[1], header_size=10 * GB, keep=4))
    ),
    "listed file header size negative": _attack(
        lambda e: e.__setitem__(1, dataclasses.replace(e[1], header_size=-512))
    ),
    "listed file altered": _attack(
        lambda e: e.__setitem__(1, dataclasses.replace(e[1], data=b"X" * len(e[1].data or b"")))
    ),
}


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
@pytest.mark.parametrize("entries", ATTACKS.values(), ids=list(ATTACKS))
def test_each_named_attack_is_refused(entries: list[_Entry], fmt: int) -> None:
    """Each attack the issue names is refused by verify_bundle and extract_bundle (not
    just survived), with ``BundleError`` and nothing written outside dest."""
    _, manifest = _valid_entries()
    assert _check_readers(lambda root: _tar_bytes(entries, manifest, fmt, root)) is None


def test_a_listed_file_whose_data_is_absent_is_refused_without_reading_10_gb() -> None:
    """Manifest and tar header agree on 10 GB, only a few bytes follow: truncated, refused."""
    files = {"model.onnx": b"onnx"}
    doc = _manifest_doc(files)
    doc["files"][0]["size"] = 10 * GB
    entries = [_Entry(MANIFEST_NAME, None), _Entry("model.onnx", b"onnx", header_size=10 * GB)]
    got = _check_readers(
        lambda root: _tar_bytes(entries, _manifest_bytes(doc), tarfile.PAX_FORMAT, root)
    )
    assert got is None


@pytest.mark.parametrize(
    "names",
    [["d", "d/f"], ["d/f", "d"], ["é" * 200], ["sub/" + "é" * 150], ["."]],
    ids=[
        "file-then-dir",
        "dir-then-file",
        "name-over-255-bytes",
        "component-over-255-bytes",
        "dot",
    ],
)
def test_listed_paths_the_filesystem_cannot_hold_raise_only_bundle_error(
    names: list[str],
) -> None:
    """Paths the manifest accepts but a directory cannot hold (a file and a directory of
    the same name; a name longer than NAME_MAX bytes in UTF-8; ``.``, the directory itself)
    are refused with ``BundleError`` (by the manifest or by extract_bundle), not an
    ``OSError``."""
    files = {n: n.encode() for n in names}
    entries = [_Entry(MANIFEST_NAME, None)] + [_Entry(n, d) for n, d in files.items()]
    manifest = _manifest_bytes(_manifest_doc(files))
    _check_readers(lambda root: _tar_bytes(entries, manifest, tarfile.PAX_FORMAT, root))


# ---------------------------------------------------------------------------------------
# 3. Positive controls: the checks above can fail


def test_a_valid_manifest_parses_and_round_trips() -> None:
    """The helper's manifest is valid, so the mutation tests start from a good one."""
    manifest = _parse(_manifest_bytes(_manifest_doc(REFERENCE_FILES)))
    assert manifest is not None
    assert [f.path for f in manifest.files] == list(REFERENCE_FILES)
    assert next(f for f in manifest.files if f.path == "model.onnx").size == len(
        REFERENCE_FILES["model.onnx"]
    )
    assert manifest.golden_vectors.path == "golden.npz"


@FUZZ_FEW
@given(
    st.dictionaries(
        st.sampled_from(["model.onnx", "golden.npz", "sub/dir/meta.json", "report.json"]),
        st.binary(max_size=3000),
        min_size=1,
    )
)
def test_a_valid_bundle_round_trips(files: dict[str, bytes]) -> None:
    """write_bundle then read_manifest, verify_bundle and extract_bundle give back the
    same manifest and the same bytes."""
    with tempfile.TemporaryDirectory() as t:
        path, manifest = _write_valid_bundle(Path(t), files)
        raw = path.read_bytes()
    assert _check_readers(lambda _: raw) == manifest
    with tempfile.TemporaryDirectory() as t:
        (Path(t) / "b.efb").write_bytes(raw)
        assert extract_bundle(Path(t) / "b.efb", Path(t) / "dest") == manifest
        for name, data in files.items():
            assert (Path(t) / "dest" / name).read_bytes() == data


def test_the_reference_bundle_and_an_unchanged_crafted_tar_are_accepted() -> None:
    """The harness accepts good input: the reference bundle and a hand-crafted tar with
    no attack verify and extract."""
    raw, manifest, _ = _reference_bundle()
    assert _check_readers(lambda _: raw) == manifest
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        entries, data = _valid_entries()
        got = _check_readers(lambda root, e=entries, d=data, f=fmt: _tar_bytes(e, d, f, root))
        assert got is not None and got.artifact == "model.onnx"


def test_a_tampered_file_is_caught_by_the_harness() -> None:
    """A bundle with one file's bytes altered is refused: the fuzz harness sees failures."""
    raw, _, members = _reference_bundle()
    model = next(m for m in members if m.name == "model.onnx")
    tampered = bytearray(raw)
    tampered[model.offset_data + 700] ^= 0x01
    assert _check_readers(lambda _: bytes(tampered)) is None
