"""An installed bundle, loaded: its manifest, its runtime and its golden-vector check.

A slot directory holds an unpacked bundle: ``manifest.json`` and the files it lists
(:func:`unpack_bundle` writes both). :func:`load_installed` reads the manifest back,
loads the artifact on the runtime the manifest names, and returns a :class:`LoadedModel`
that inference, shadow mode and the updater's health check all use.

A bundle that lists ``drift-reference.json`` has it parsed strictly
(``contracts/drift.py``). One that does not parse costs the bundle its drift summaries,
not its install: the model still serves, and the reason is logged once at load.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contracts.drift import DRIFT_REFERENCE_FILE, ReferenceProfile
from contracts.errors import DriftError
from contracts.tensors import TensorSpec
from ota.archive import extract_bundle
from ota.errors import BundleError
from ota.manifest import MANIFEST_NAME, Manifest, parse_manifest

from .errors import ModelLoadError
from .runtimes import Runtime, load_runtime

__all__ = ["GoldenResult", "LoadedModel", "load_installed", "unpack_bundle"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GoldenResult:
    passed: bool
    detail: str


@dataclass
class LoadedModel:
    manifest: Manifest
    runtime: Runtime
    directory: Path
    drift_reference: ReferenceProfile | None = None
    """What the inputs looked like at compile time; ``None`` when the bundle has none."""

    @property
    def bundle(self) -> str:
        """``NAME-VERSION``, as status, acks and telemetry name a bundle."""
        return f"{self.manifest.name}-{self.manifest.version}"

    @property
    def model_name(self) -> str:
        return self.manifest.model.name

    @property
    def inputs(self) -> list[TensorSpec]:
        """What :meth:`predict` takes: the runtime's inputs with any number of samples on
        the first axis, which it splits into calls the artifact accepts (a TVM module and
        a LiteRT model are built for one sample at a time)."""
        return [_any_batch(spec) for spec in self.runtime.inputs]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [_any_batch(spec) for spec in self.runtime.outputs]

    def predict(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.runtime.predict_batch(inputs)

    def check_golden_vectors(self) -> GoldenResult:
        """Run the bundle's golden inputs; compare with the outputs recorded at compile time."""
        spec = self.manifest.golden_vectors
        try:
            with np.load(self.directory / spec.path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError) as e:
            return GoldenResult(False, f"cannot read golden vectors {spec.path}: {e}")
        inputs = {k.removeprefix("input:"): v for k, v in arrays.items() if k.startswith("input:")}
        expected = [arrays[f"output:{i}"] for i in range(len(arrays) - len(inputs))]
        try:
            got = self.predict(inputs)
        except Exception as e:  # whatever the runtime raises is a failed check, not a crash
            return GoldenResult(False, f"the model raised on its golden inputs: {e}")
        if len(got) != len(expected):
            return GoldenResult(False, f"{len(got)} outputs, golden vectors expect {len(expected)}")
        for index, (out, want) in enumerate(zip(got, expected, strict=True)):
            out = np.asarray(out, dtype=np.float64)
            want = np.asarray(want, dtype=np.float64)
            if out.shape != want.shape:
                return GoldenResult(False, f"output {index}: shape {out.shape} != {want.shape}")
            if spec.top1 and out.ndim == 2:
                agree = float(np.mean(out.argmax(axis=1) == want.argmax(axis=1)))
                if agree < 1.0:
                    return GoldenResult(False, f"output {index}: top-1 agrees on {agree:.0%}")
            close = np.abs(out - want) <= spec.atol + spec.rtol * np.abs(want)
            if not close.all():
                worst = float(np.max(np.abs(out - want)))
                return GoldenResult(
                    False,
                    f"output {index}: {int((~close).sum())} values outside tolerance "
                    f"(max |diff| {worst:.3g}, atol {spec.atol}, rtol {spec.rtol})",
                )
        return GoldenResult(True, f"{spec.count} golden vectors within tolerance")

    def close(self) -> None:
        self.runtime.close()


def _any_batch(spec: TensorSpec) -> TensorSpec:
    if not spec.shape:
        return spec
    return TensorSpec(spec.name, (None, *spec.shape[1:]), spec.dtype)


def load_installed(directory: Path) -> LoadedModel:
    """Load the bundle extracted in ``directory``; :class:`ModelLoadError` if it cannot run."""
    try:
        manifest = parse_manifest((directory / MANIFEST_NAME).read_bytes())
    except OSError as e:
        raise ModelLoadError(f"no readable {MANIFEST_NAME} in {directory}: {e}") from e
    except BundleError as e:
        raise ModelLoadError(f"{directory}: {e}") from e
    runtime = load_runtime(manifest.runtime, directory / manifest.artifact)
    return LoadedModel(
        manifest=manifest,
        runtime=runtime,
        directory=directory,
        drift_reference=_drift_reference(manifest, directory),
    )


def _drift_reference(manifest: Manifest, directory: Path) -> ReferenceProfile | None:
    if DRIFT_REFERENCE_FILE not in {f.path for f in manifest.files}:
        return None
    bundle = f"{manifest.name}-{manifest.version}"
    try:
        return ReferenceProfile.from_json_bytes((directory / DRIFT_REFERENCE_FILE).read_bytes())
    except (OSError, DriftError) as e:
        log.warning(
            "bundle %s: no drift summaries, its %s is unusable: %s", bundle, DRIFT_REFERENCE_FILE, e
        )
        return None


def unpack_bundle(bundle: Path, directory: Path) -> Manifest:
    """Extract ``bundle`` (hash-checking every file) and its manifest into ``directory``.

    Raises ``ota.errors.BundleError`` when the archive is not what its manifest says.
    """
    manifest = extract_bundle(bundle, directory)
    (directory / MANIFEST_NAME).write_bytes(manifest.to_json())
    return manifest
