"""``edgefleet ota``: keys, bundles, publishing, verification, deltas and the TUF test client."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from contracts.cli import JsonOption, fail, print_json

from .conformance_cli import app as tuf_client_app

if TYPE_CHECKING:
    from ota.repository import OtaRepository

app = typer.Typer(help="Signed, verifiable update bundles (TUF).", no_args_is_help=True)
keys_app = typer.Typer(help="Signing keys for the TUF roles.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(tuf_client_app, name="tuf-client")

RepoOption = Annotated[
    Path,
    typer.Option(
        "--repo", envvar="EDGEFLEET_OTA_REPO", help="Repository directory (metadata/, targets/)."
    ),
]
KeysOption = Annotated[
    Path,
    typer.Option(
        "--keys", envvar="EDGEFLEET_OTA_KEYS", help="Directory of the encrypted signing keys."
    ),
]
PassphraseEnvOption = Annotated[
    str,
    typer.Option(help="Environment variable that holds the keys' passphrase."),
]
_DEFAULT_REPO = Path("ota-repo")
_DEFAULT_KEYS = Path("ota-keys")
_PASSPHRASE_ENV = "EDGEFLEET_KEY_PASSPHRASE"
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _seconds(text: str, option: str) -> int:
    match = _DURATION.match(text.strip())
    if not match or int(match[1]) == 0:
        fail(f"{option} takes a duration such as 90s, 30m, 6h, 1d or 52w, got {text!r}")
    return int(match[1]) * _UNIT_S[match[2]]


@contextmanager
def _user_errors() -> Iterator[None]:
    """OTA errors and caller mistakes become one ``error:`` line and exit code 1."""
    from ota.errors import OtaError

    try:
        yield
    except (OtaError, ValueError) as e:
        fail(e)


def _repository(repo: Path, keys: Path, passphrase_env: str) -> OtaRepository:
    from ota.keys import KeyStore
    from ota.repository import OtaRepository

    return OtaRepository(repo, KeyStore.from_env(keys, passphrase_env))


@keys_app.command("init")
def keys_init(
    repo: RepoOption = _DEFAULT_REPO,
    keys: KeysOption = _DEFAULT_KEYS,
    root_keys: Annotated[int, typer.Option(min=1, help="Number of root keys.")] = 1,
    root_threshold: Annotated[int, typer.Option(min=1, help="Root signatures required.")] = 1,
    targets_keys: Annotated[int, typer.Option(min=1, help="Number of targets keys.")] = 1,
    targets_threshold: Annotated[int, typer.Option(min=1, help="Targets signatures required.")] = 1,
    timestamp_expiry: Annotated[str, typer.Option(help="Timestamp lifetime.")] = "1d",
    snapshot_expiry: Annotated[str, typer.Option(help="Snapshot lifetime.")] = "7d",
    targets_expiry: Annotated[str, typer.Option(help="Targets lifetime.")] = "90d",
    root_expiry: Annotated[str, typer.Option(help="Root lifetime.")] = "365d",
    passphrase_env: PassphraseEnvOption = _PASSPHRASE_ENV,
    json_output: JsonOption = False,
) -> None:
    """Create root, targets, snapshot and timestamp keys and an empty signed repository."""
    from ota.keys import KeyStore
    from ota.repository import ExpiryPolicy, OtaRepository

    expiry = ExpiryPolicy(
        root_s=_seconds(root_expiry, "--root-expiry"),
        targets_s=_seconds(targets_expiry, "--targets-expiry"),
        snapshot_s=_seconds(snapshot_expiry, "--snapshot-expiry"),
        timestamp_s=_seconds(timestamp_expiry, "--timestamp-expiry"),
    )
    with _user_errors():
        store = KeyStore.from_env(keys, passphrase_env)
        repository = OtaRepository.create(
            repo,
            store,
            expiry=expiry,
            key_counts={"root": root_keys, "targets": targets_keys},
            thresholds={"root": root_threshold, "targets": targets_threshold},
        )
    root = repository.root().signed
    summary: dict[str, Any] = {
        "repository": str(repo),
        "keys": str(keys),
        "root": str(repository.root_file),
        "roles": {
            role: {"keyids": list(r.keyids), "threshold": r.threshold}
            for role, r in root.roles.items()
        },
    }
    if json_output:
        print_json(summary)
        return
    typer.echo(f"repository {repo} created; keys in {keys} (mode 0600, encrypted)")
    for role, r in summary["roles"].items():
        typer.echo(f"  {role}: {len(r['keyids'])} key(s), threshold {r['threshold']}")
    typer.echo(f"provision devices with {repository.root_file}")


@keys_app.command("rotate")
def keys_rotate(
    role: Annotated[str, typer.Option(help="root, targets, snapshot or timestamp.")],
    repo: RepoOption = _DEFAULT_REPO,
    keys: KeysOption = _DEFAULT_KEYS,
    passphrase_env: PassphraseEnvOption = _PASSPHRASE_ENV,
    json_output: JsonOption = False,
) -> None:
    """Replace a role's keys, publish a new root signed by old and new, revoke the old."""
    with _user_errors():
        repository = _repository(repo, keys, passphrase_env)
        new = repository.rotate(role)
    version = repository.root().signed.version
    if json_output:
        print_json({"role": role, "keyids": list(new), "root_version": version})
        return
    typer.echo(f"{role} rotated to {', '.join(k[:16] for k in new)}; root is now version {version}")


@app.command("bundle")
def bundle(
    directory: Annotated[Path, typer.Argument(help="A compile output directory.")],
    version: Annotated[str, typer.Option(help="Semantic version of the bundle.")],
    out: Annotated[Path, typer.Option(help="Bundle file (.efb) to write.")],
    version_number: Annotated[
        int | None,
        typer.Option(min=1, help="Anti-rollback number (default: from --version)."),
    ] = None,
    artifact: Annotated[
        str | None, typer.Option(help="Artifact id, e.g. onnxruntime:int8 (default: selected).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Bundle name (default: MODEL-PROFILE).")] = None,
    model_version: Annotated[
        str | None, typer.Option(help="Model version (default: --version).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Pack a compile output directory into a deterministic bundle."""
    from ota.bundle import bundle_compile_output

    with _user_errors():
        manifest = bundle_compile_output(
            directory,
            version=version,
            out=out,
            version_number=version_number,
            artifact_id=artifact,
            name=name,
            model_version=model_version,
        )
    if json_output:
        print_json(manifest.model_dump(mode="json", by_alias=True))
        return
    typer.echo(
        f"{out}: {manifest.name} {manifest.version} (#{manifest.version_number}), "
        f"{manifest.runtime} {manifest.precision} for {manifest.profile}, "
        f"{len(manifest.files)} files, {out.stat().st_size} bytes"
    )


@app.command("publish")
def publish(
    file: Annotated[Path, typer.Argument(help="Bundle (.efb) to sign and publish.")],
    repo: RepoOption = _DEFAULT_REPO,
    keys: KeysOption = _DEFAULT_KEYS,
    passphrase_env: PassphraseEnvOption = _PASSPHRASE_ENV,
    json_output: JsonOption = False,
) -> None:
    """Verify a bundle, add it to the repository as a TUF target, and re-sign."""
    with _user_errors():
        repository = _repository(repo, keys, passphrase_env)
        target = repository.add_bundle(file)
    if json_output:
        print_json(
            {"target": target.path, "sha256": target.hashes["sha256"], "length": target.length}
        )
        return
    typer.echo(f"published {target.path} (sha256 {target.hashes['sha256'][:16]}…)")


@app.command("refresh")
def refresh(
    repo: RepoOption = _DEFAULT_REPO,
    keys: KeysOption = _DEFAULT_KEYS,
    within: Annotated[
        str | None, typer.Option(help="Re-sign when expiring within this (default: half life).")
    ] = None,
    passphrase_env: PassphraseEnvOption = _PASSPHRASE_ENV,
    json_output: JsonOption = False,
) -> None:
    """Re-sign timestamp metadata before it expires (for cron; the fleet server does it)."""
    import datetime as dt

    margin = dt.timedelta(seconds=_seconds(within, "--within")) if within else None
    with _user_errors():
        repository = _repository(repo, keys, passphrase_env)
        renewed = repository.refresh_timestamp(within=margin)
    expires = repository.timestamp().signed.expires.isoformat()
    if json_output:
        print_json({"renewed": renewed, "expires": expires})
        return
    typer.echo(f"timestamp {'renewed' if renewed else 'still fresh'}, expires {expires}")


@app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="Bundle (.efb) to verify.")],
    root: Annotated[Path, typer.Option(help="Trusted root.json.")],
    metadata: Annotated[
        Path | None,
        typer.Option(help="Copy of the repository's metadata/ (default: metadata/ beside FILE)."),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Verify a side-loaded bundle offline against TUF metadata."""
    from ota.verify import verify_sideloaded

    with _user_errors():
        verified = verify_sideloaded(file, root, metadata or file.parent / "metadata")
    manifest = verified.manifest
    if json_output:
        print_json(
            {
                "verified": True,
                "target": verified.target.path,
                "sha256": verified.target.hashes["sha256"],
                "manifest": manifest.model_dump(mode="json", by_alias=True),
            }
        )
        return
    typer.echo(
        f"OK {file}: {verified.target.path}, {manifest.name} {manifest.version} "
        f"(#{manifest.version_number}) signed and intact, {len(manifest.files)} files checked"
    )


@app.command("delta")
def delta(
    old: Annotated[Path, typer.Argument(help="Bundle the device has.")],
    new: Annotated[Path, typer.Argument(help="Bundle to deliver.")],
    out: Annotated[Path, typer.Option(help="Delta file to write.")],
    algorithm: Annotated[str, typer.Option(help="zstd or bsdiff.")] = "zstd",
    json_output: JsonOption = False,
) -> None:
    """Make a delta that turns OLD into NEW bit for bit."""
    from ota.delta import apply_delta, make_delta

    if algorithm not in ("zstd", "bsdiff"):
        fail(f"--algorithm takes zstd or bsdiff, got {algorithm!r}")
    with _user_errors():
        header = make_delta(old, new, out, algorithm=algorithm)  # type: ignore[arg-type]
        check = out.with_name(out.name + ".check")
        apply_delta(old, out, check, expected_sha256=header.new_sha256)
        check.unlink()
    size = out.stat().st_size
    result = {
        "algorithm": algorithm,
        "delta_bytes": size,
        "new_bytes": header.new_size,
        "ratio": round(size / header.new_size, 4),
    }
    if json_output:
        print_json(result)
        return
    typer.echo(
        f"{out}: {size} bytes, {result['ratio']:.2%} of the {header.new_size}-byte bundle "
        f"({algorithm}; round trip checked)"
    )


@app.command("patch")
def patch(
    old: Annotated[Path, typer.Argument(help="Bundle the device has.")],
    delta_file: Annotated[Path, typer.Argument(metavar="DELTA", help="Delta from `ota delta`.")],
    out: Annotated[Path, typer.Option(help="Rebuilt bundle to write.")],
    sha256: Annotated[
        str | None, typer.Option(help="SHA-256 the result must have (the TUF target's).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Rebuild the new bundle from OLD and a delta, checked bit for bit."""
    import hashlib

    from ota.delta import apply_delta

    with _user_errors():
        apply_delta(old, delta_file, out, expected_sha256=sha256)
    if json_output:
        with out.open("rb") as rebuilt:
            digest = hashlib.file_digest(rebuilt, "sha256").hexdigest()
        print_json({"out": str(out), "bytes": out.stat().st_size, "sha256": digest})
        return
    typer.echo(f"{out}: rebuilt and verified")
