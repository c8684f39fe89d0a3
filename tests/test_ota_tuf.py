"""TUF end to end over real HTTP: a signed repository, a device client, and every attack.

The repository is a directory signed by ``OtaRepository`` and served by uvicorn; the
device is ``OtaClient`` (python-tuf's ngclient). Attackers write files into the served
directory, as a compromised mirror or CDN would.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, MetaFile, TargetFile
from tuf.api.serialization.json import JSONSerializer

from ota.archive import verify_bundle
from ota.bundle import bundle_compile_output
from ota.client import OtaClient, TrustState, check_not_older
from ota.delta import apply_delta, make_delta
from ota.download import part_path
from ota.errors import (
    BundleIntegrityError,
    DeltaError,
    DownloadError,
    ExpiredMetadataError,
    KeyStoreError,
    OtaError,
    RollbackError,
    TrustError,
)
from ota.keys import KeyStore
from ota.repository import ExpiryPolicy, OtaRepository
from ota.verify import _DirectoryFetcher, verify_sideloaded
from tests.utils.http_files import FileServer, serve_directory
from tests.utils.tcp_proxy import CuttingProxy

PASSPHRASE = b"correct horse battery staple"
TARGET_V1 = "host/digits-host-1.0.0.efb"


@pytest.fixture(scope="module")
def bundles(compiled_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """1.0.0 of the digits model and 1.1.0 with slightly changed weights (a fine-tune)."""
    out = tmp_path_factory.mktemp("bundles")
    v1 = out / "digits-1.0.0.efb"
    bundle_compile_output(compiled_digits, version="1.0.0", out=v1, artifact_id="onnxruntime:fp32")
    tuned = out / "fine-tuned"
    shutil.copytree(compiled_digits, tuned)
    model = onnx.load(tuned / "onnxruntime-fp32.onnx")
    # Fine-tune the classifier head: the last weight matrix moves a little, the rest stays.
    head = min(
        (t for t in model.graph.initializer if len(t.dims) == 2),
        key=lambda t: numpy_helper.to_array(t).size,
    )
    array = numpy_helper.to_array(head)
    head.CopyFrom(numpy_helper.from_array((array * 1.01).astype(array.dtype), head.name))
    onnx.save(model, tuned / "onnxruntime-fp32.onnx")
    v2 = out / "digits-1.1.0.efb"
    bundle_compile_output(tuned, version="1.1.0", out=v2, artifact_id="onnxruntime:fp32")
    return {"1.0.0": v1, "1.1.0": v2}


def _repository(tmp_path: Path, **create: object) -> OtaRepository:
    keys = KeyStore(tmp_path / "keys", PASSPHRASE)
    return OtaRepository.create(tmp_path / "repo", keys, **create)  # type: ignore[arg-type]


@pytest.fixture
def repo(tmp_path: Path, bundles: dict[str, Path]) -> OtaRepository:
    repository = _repository(tmp_path)
    repository.add_bundle(bundles["1.0.0"])
    return repository


@pytest.fixture
def server(repo: OtaRepository) -> Iterator[FileServer]:
    with serve_directory(repo.path) as served:
        yield served


def _device(
    tmp_path: Path, repo: OtaRepository, url: str, targets_url: str | None = None
) -> OtaClient:
    """A freshly provisioned device: it trusts the repository's root as of now."""
    device = tmp_path / "device"
    OtaClient.init(device / "metadata", repo.root_file)
    return OtaClient(
        device / "metadata",
        f"{url}/metadata",
        targets_url=targets_url or f"{url}/targets",
        target_dir=device / "bundles",
    )


@pytest.fixture
def device(tmp_path: Path, repo: OtaRepository, server: FileServer) -> Iterator[OtaClient]:
    client = _device(tmp_path, repo, server.url)
    yield client
    client.close()


def _signers(repo: OtaRepository, role: str) -> list[CryptoSigner]:
    return repo.keys.signers(role, list(repo.root().signed.roles[role].keyids))


def _write(repo: OtaRepository, name: str, md: Metadata) -> bytes:  # type: ignore[type-arg]
    data = md.to_bytes(JSONSerializer(compact=False))
    (repo.metadata_dir / name).write_bytes(data)
    return data


def _forge_targets(repo: OtaRepository, signers: list[Signer], target: TargetFile) -> None:
    """An attacker's targets version listing ``target``, signed by ``signers``, published
    with valid snapshot and timestamp signatures (those keys are not the ones attacked)."""
    targets = repo.targets().signed
    targets.version += 1
    targets.targets[target.path] = target
    md = Metadata(targets)
    for signer in signers:
        md.sign(signer, append=True)
    _write(repo, f"{targets.version}.targets.json", md)
    snapshot = repo.snapshot().signed
    snapshot.version += 1
    snapshot.meta["targets.json"] = MetaFile(version=targets.version)
    snapshot_md = Metadata(snapshot)
    snapshot_md.sign(_signers(repo, "snapshot")[0])
    snapshot_bytes = _write(repo, f"{snapshot.version}.snapshot.json", snapshot_md)
    timestamp = repo.timestamp().signed
    timestamp.version += 1
    timestamp.snapshot_meta = MetaFile(
        version=snapshot.version,
        length=len(snapshot_bytes),
        hashes={"sha256": hashlib.sha256(snapshot_bytes).hexdigest()},
    )
    timestamp_md = Metadata(timestamp)
    timestamp_md.sign(_signers(repo, "timestamp")[0])
    _write(repo, "timestamp.json", timestamp_md)


def _evil_target(repo: OtaRepository, bundles: dict[str, Path]) -> TargetFile:
    """Version 1.1.0 put in the targets directory as an attacker would, then listed."""
    target = TargetFile.from_file("host/digits-host-1.1.0.efb", str(bundles["1.1.0"]))
    dest = repo.target_file(target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundles["1.1.0"], dest)
    return target


# --- the happy path ------------------------------------------------------------------------


def test_a_device_downloads_a_verified_bundle_once(
    device: OtaClient, server: FileServer, bundles: dict[str, Path]
) -> None:
    target = device.target(TARGET_V1)
    assert target.custom["edgefleet"]["version_number"] == 1_000_000
    path = device.download(target)
    assert path.read_bytes() == bundles["1.0.0"].read_bytes()
    assert verify_bundle(path).version == "1.0.0"
    fetched = [p for p, _ in server.requests if p.startswith("/targets/")]
    assert fetched == [f"/targets/host/{target.hashes['sha256']}.digits-host-1.0.0.efb"]
    device.download(target)  # cached and still valid: no second request
    assert [p for p, _ in server.requests if p.startswith("/targets/")] == fetched
    assert device.check().state is TrustState.CURRENT


# --- tampering -----------------------------------------------------------------------------


def test_a_tampered_artifact_on_the_server_is_refused(
    device: OtaClient, repo: OtaRepository
) -> None:
    target = device.target(TARGET_V1)
    served = repo.target_file(target)
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF
    served.write_bytes(bytes(data))
    with pytest.raises(TrustError, match="does not have the length and hash the signed targets"):
        device.download(target, attempts=1)
    assert not device.local_path(target).exists()
    assert not part_path(device.local_path(target)).exists()
    with pytest.raises(BundleIntegrityError, match="altered"):
        verify_bundle(served)


def test_a_bundle_listed_with_a_hash_it_does_not_have_is_refused(
    device: OtaClient, repo: OtaRepository, bundles: dict[str, Path]
) -> None:
    """A mirror serves another (valid, signed-elsewhere) bundle under the listed name."""
    target = device.target(TARGET_V1)
    shutil.copyfile(bundles["1.1.0"], repo.target_file(target))
    with pytest.raises(TrustError, match="length and hash"):
        device.download(target, attempts=1)
    assert not device.local_path(target).exists()


# --- keys ----------------------------------------------------------------------------------


def test_targets_signed_by_a_key_root_does_not_list_are_refused(
    device: OtaClient, repo: OtaRepository, bundles: dict[str, Path]
) -> None:
    _forge_targets(repo, [CryptoSigner.generate_ed25519()], _evil_target(repo, bundles))
    with pytest.raises(TrustError, match=r"signature check failed.*wrong or revoked key"):
        device.refresh()
    assert device.check().state is TrustState.REFUSED


def test_a_revoked_key_is_refused_after_rotation(
    device: OtaClient, repo: OtaRepository, bundles: dict[str, Path]
) -> None:
    """Key compromise: the old targets key leaked, the operator rotated it away."""
    device.refresh()
    leaked = _signers(repo, "targets")
    repo.rotate("targets")
    assert not list(repo.keys.directory.glob(f"targets.{leaked[0].public_key.keyid}.pem"))
    _forge_targets(repo, leaked, _evil_target(repo, bundles))
    with pytest.raises(TrustError, match="signature check failed"):
        device.refresh()


def test_a_threshold_of_two_is_not_met_by_one_signature(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    repo = _repository(tmp_path, key_counts={"targets": 2}, thresholds={"targets": 2})
    repo.add_bundle(bundles["1.0.0"])
    assert len(repo.targets().signatures) == 2
    with serve_directory(repo.path) as served:
        client = _device(tmp_path, repo, served.url)
        client.refresh()
        one_of_two = _signers(repo, "targets")[:1]
        _forge_targets(repo, one_of_two, _evil_target(repo, bundles))
        with pytest.raises(TrustError, match=r"signature check failed.*threshold"):
            _device(tmp_path / "other", repo, served.url).refresh()


def test_keys_are_encrypted_private_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _repository(tmp_path)
    files = list(repo.keys.directory.iterdir())
    assert len(files) == 4
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    wrong = OtaRepository(repo.path, KeyStore(repo.keys.directory, b"guess"))
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        wrong.refresh_timestamp(within=dt.timedelta(days=365))
    monkeypatch.delenv("EDGEFLEET_KEY_PASSPHRASE", raising=False)
    with pytest.raises(KeyStoreError, match="EDGEFLEET_KEY_PASSPHRASE"):
        KeyStore.from_env(repo.keys.directory)


# --- versions and freshness ----------------------------------------------------------------


def test_replaying_older_metadata_is_refused(
    device: OtaClient, repo: OtaRepository, bundles: dict[str, Path]
) -> None:
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.add_bundle(bundles["1.1.0"])
    device.refresh()
    (repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    with pytest.raises(RollbackError, match="rollback"):
        device.refresh()


def test_an_older_bundle_is_refused_by_the_repository_and_the_device(
    device: OtaClient, repo: OtaRepository, bundles: dict[str, Path], tmp_path: Path
) -> None:
    repo.add_bundle(bundles["1.1.0"])
    old = device.target(TARGET_V1)
    check_not_older(device.target("host/digits-host-1.1.0.efb"), 1_001_000)
    with pytest.raises(RollbackError, match="rollback to version_number 1000000"):
        check_not_older(old, installed_version_number=1_001_000)
    with pytest.raises(RollbackError, match=r"not above the 1001000 of the published 1\.1\.0"):
        repo.add_bundle(_rebundled(bundles, tmp_path, "0.9.0"))


def _rebundled(bundles: dict[str, Path], tmp_path: Path, version: str) -> Path:
    """The 1.1.0 bundle's contents released again under an older version."""
    from ota.archive import extract_bundle, write_bundle

    unpacked = tmp_path / f"unpacked-{version}"
    manifest = extract_bundle(bundles["1.1.0"], unpacked)
    older = manifest.model_copy(update={"version": version, "version_number": 900})
    out = tmp_path / f"{version}.efb"
    write_bundle(older, {f.path: unpacked / f.path for f in manifest.files}, out)
    return out


def test_an_expired_timestamp_blocks_installs_until_refreshed(
    tmp_path: Path, bundles: dict[str, Path]
) -> None:
    """Freeze: a mirror keeps serving old, valid-once metadata. The device refuses to
    install, says so, and recovers when the repository re-signs the timestamp."""
    repo = _repository(tmp_path, expiry=ExpiryPolicy(timestamp_s=3))
    repo.add_bundle(bundles["1.0.0"])
    with serve_directory(repo.path) as served:
        client = _device(tmp_path, repo, served.url)
        assert client.check().can_install
        time.sleep(3.5)
        status = client.check()
        assert status.state is TrustState.METADATA_EXPIRED and not status.can_install
        assert "freeze" in status.detail
        with pytest.raises(ExpiredMetadataError):
            client.refresh()
        assert repo.refresh_timestamp()
        assert client.check().state is TrustState.CURRENT
        assert client.download(client.target(TARGET_V1)).exists()


def test_mixing_snapshot_and_targets_from_different_versions_is_refused(
    device: OtaClient, repo: OtaRepository, bundles: dict[str, Path]
) -> None:
    repo.add_bundle(bundles["1.1.0"])
    current = repo.snapshot().signed.meta["targets.json"].version
    older = (repo.metadata_dir / f"{current - 1}.targets.json").read_bytes()
    (repo.metadata_dir / f"{current}.targets.json").write_bytes(older)
    with pytest.raises(RollbackError, match="mix-and-match"):
        device.refresh()


def test_a_device_offline_across_two_root_rotations_follows_them(
    device: OtaClient, repo: OtaRepository, bundles: dict[str, Path]
) -> None:
    device.refresh()
    repo.rotate("root")
    repo.rotate("targets")
    repo.rotate("root")
    repo.add_bundle(bundles["1.1.0"])
    assert repo.root().signed.version == 4
    device.refresh()  # back online: walks root 2, 3, 4 from the root it trusted
    target = device.target("host/digits-host-1.1.0.efb")
    assert device.download(target).read_bytes() == bundles["1.1.0"].read_bytes()
    trusted = Metadata.from_file(str(device.metadata_dir / "root.json"))
    assert trusted.signed.version == 4


# --- delivery ------------------------------------------------------------------------------


def test_an_interrupted_download_resumes_where_it_stopped(
    tmp_path: Path, repo: OtaRepository, server: FileServer, bundles: dict[str, Path]
) -> None:
    size = bundles["1.0.0"].stat().st_size
    with CuttingProxy(server.port, cut_after=size // 2, cuts=1) as proxy:
        client = _device(tmp_path, repo, server.url, f"http://127.0.0.1:{proxy.port}/targets")
        target = client.target(TARGET_V1)
        with pytest.raises(DownloadError, match=r"failed after|connection closed"):
            client.download(target, attempts=1)
        partial = part_path(client.local_path(target))
        kept = partial.stat().st_size
        assert 0 < kept < size
        path = client.download(target, attempts=1)
    assert path.read_bytes() == bundles["1.0.0"].read_bytes()
    ranges = [r for p, r in server.requests if p.startswith("/targets/")]
    assert ranges == [None, f"bytes={kept}-"]
    assert not partial.exists()


def test_a_download_retries_and_resumes_by_itself(
    tmp_path: Path, repo: OtaRepository, server: FileServer, bundles: dict[str, Path]
) -> None:
    size = bundles["1.0.0"].stat().st_size
    with CuttingProxy(server.port, cut_after=size // 3, cuts=2) as proxy:
        client = _device(tmp_path, repo, server.url, f"http://127.0.0.1:{proxy.port}/targets")
        path = client.download(client.target(TARGET_V1), attempts=3)
    assert path.read_bytes() == bundles["1.0.0"].read_bytes()
    ranges = [r for p, r in server.requests if p.startswith("/targets/")]
    assert len(ranges) == 3 and ranges[0] is None and all(r for r in ranges[1:])


@pytest.mark.parametrize("algorithm", ["zstd", "bsdiff"])
def test_a_delta_rebuilds_the_signed_bundle_bit_for_bit(
    device: OtaClient, repo: OtaRepository, bundles: dict[str, Path], tmp_path: Path, algorithm: str
) -> None:
    repo.add_bundle(bundles["1.1.0"])
    target = device.target("host/digits-host-1.1.0.efb")
    delta = tmp_path / "1.0.0-1.1.0.delta"
    make_delta(bundles["1.0.0"], bundles["1.1.0"], delta, algorithm=algorithm)  # type: ignore[arg-type]
    assert delta.stat().st_size < bundles["1.1.0"].stat().st_size / 2
    rebuilt = apply_delta(
        bundles["1.0.0"], delta, tmp_path / "rebuilt.efb", expected_sha256=target.hashes["sha256"]
    )
    assert rebuilt.read_bytes() == bundles["1.1.0"].read_bytes()
    with pytest.raises(DeltaError, match="another old bundle"):
        apply_delta(bundles["1.1.0"], delta, tmp_path / "x.efb")
    with pytest.raises(DeltaError, match="TUF says"):
        apply_delta(bundles["1.0.0"], delta, tmp_path / "x.efb", expected_sha256="0" * 64)
    corrupt = bytearray(delta.read_bytes())
    corrupt[-20] ^= 0xFF
    (tmp_path / "corrupt.delta").write_bytes(bytes(corrupt))
    with pytest.raises(DeltaError):
        apply_delta(bundles["1.0.0"], tmp_path / "corrupt.delta", tmp_path / "x.efb")
    assert not (tmp_path / "x.efb").exists()


# --- side-loading --------------------------------------------------------------------------


def test_a_side_loaded_bundle_is_verified_offline(
    repo: OtaRepository, bundles: dict[str, Path], tmp_path: Path
) -> None:
    stick = tmp_path / "usb"
    shutil.copytree(repo.metadata_dir, stick / "metadata")
    shutil.copyfile(bundles["1.0.0"], stick / "digits.efb")
    root_v1 = tmp_path / "root-v1.json"
    shutil.copyfile(repo.root_file, root_v1)
    verified = verify_sideloaded(stick / "digits.efb", root_v1, stick / "metadata")
    assert verified.target.path == TARGET_V1

    shutil.copyfile(bundles["1.1.0"], stick / "unreleased.efb")
    with pytest.raises(TrustError, match="do not list"):
        verify_sideloaded(stick / "unreleased.efb", root_v1, stick / "metadata")

    forged = stick / "forged.efb"
    forged_bundle = _rebundled({"1.1.0": bundles["1.1.0"]}, tmp_path, "1.0.0")
    shutil.copyfile(forged_bundle, forged)
    with pytest.raises(TrustError, match="tampered after release"):
        verify_sideloaded(forged, root_v1, stick / "metadata")


def test_a_side_loaded_bundle_is_returned_verified_or_refused_with_the_figures(
    repo: OtaRepository, bundles: dict[str, Path], tmp_path: Path
) -> None:
    stick = tmp_path / "usb"
    shutil.copytree(repo.metadata_dir, stick / "metadata")
    shutil.copyfile(bundles["1.0.0"], stick / "digits.efb")
    root_v1 = tmp_path / "root-v1.json"
    shutil.copyfile(repo.root_file, root_v1)
    data = (stick / "digits.efb").read_bytes()

    verified = verify_sideloaded(stick / "digits.efb", root_v1, stick / "metadata")
    assert verified.manifest == verify_bundle(stick / "digits.efb")
    assert verified.target.length == len(data)
    assert verified.target.hashes["sha256"] == hashlib.sha256(data).hexdigest()

    nowhere = stick / "nowhere"
    with pytest.raises(OtaError) as missing:
        verify_sideloaded(stick / "digits.efb", root_v1, nowhere)
    assert str(missing.value) == (
        f"no metadata directory at {nowhere}: copy the repository's metadata/ next to the "
        "bundle or pass --metadata DIR"
    )

    (stick / "metadata" / "timestamp.json").unlink()
    with pytest.raises(DownloadError) as unreachable:
        verify_sideloaded(stick / "digits.efb", root_v1, stick / "metadata")
    assert str(unreachable.value).startswith(f"metadata in {stick / 'metadata'}: ")
    assert f"timestamp.json not in {stick / 'metadata'}" in str(unreachable.value)

    shutil.copytree(repo.metadata_dir, stick / "metadata", dirs_exist_ok=True)
    forged = _rebundled({"1.1.0": bundles["1.1.0"]}, tmp_path, "1.0.0")
    forged_data = forged.read_bytes()
    with pytest.raises(TrustError) as tampered:
        verify_sideloaded(forged, root_v1, stick / "metadata")
    assert str(tampered.value) == (
        f"{forged.name}: refused, the signed targets list {TARGET_V1} with SHA-256 "
        f"{hashlib.sha256(data).hexdigest()} and {len(data)} bytes, the file has "
        f"{hashlib.sha256(forged_data).hexdigest()} and {len(forged_data)} bytes: tampered "
        "after release"
    )


def test_the_side_loading_fetcher_serves_only_files_directly_in_its_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "1.root.json").write_text("{}")
    (tmp_path / "timestamp.json").write_text("{}")
    fetcher = _DirectoryFetcher(tmp_path)

    assert b"".join(fetcher.fetch("http://metadata.local/timestamp.json")) == b"{}"
    for name in ("sub/1.root.json", "snapshot.json"):
        with pytest.raises(DownloadHTTPError) as refused:
            b"".join(fetcher.fetch(f"http://metadata.local/{name}"))
        assert refused.value.status_code == 404
        assert str(refused.value) == f"{name} not in {tmp_path}"
