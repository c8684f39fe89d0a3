"""A bundle manifest for files that are not a real model: for the tests of what is done
with bundles (archives, uploads, CLI), not of what is in them."""

from __future__ import annotations

import datetime as dt
import hashlib

from ota.manifest import BundleFile, GoldenVectors, Manifest, ModelInfo

__all__ = ["toy_manifest"]


def toy_manifest(
    contents: dict[str, bytes], *, model_version: str = "1", year: int = 2025
) -> Manifest:
    """``digits-host`` 1.0.0 on ONNX Runtime fp32 listing ``contents`` (path → bytes) with
    their hashes; ``model.onnx`` is the artifact and ``golden.npz`` the golden vectors, so
    both must be among them."""
    return Manifest(
        name="digits-host",
        version="1.0.0",
        version_number=1_000_000,
        model=ModelInfo(name="digits", version=model_version),
        profile="host",
        runtime="onnxruntime",
        precision="fp32",
        device="cpu",
        artifact="model.onnx",
        files=[
            BundleFile(path=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
            for name, data in contents.items()
        ],
        min_agent_version="0.1.0",
        created=dt.datetime(year, 1, 1, tzinfo=dt.UTC),
        golden_vectors=GoldenVectors(path="golden.npz", count=1, atol=0.0, rtol=0.0, top1=True),
    )
