"""Train a small CNN on scikit-learn's bundled digits and export it for edgefleet.

Writes, into the output directory (default: this directory's ``build/``):
  digits.keras   the trained Keras model (for the LiteRT path)
  digits.onnx    the same model as ONNX (for the TVM and ONNX Runtime paths)
  digits.npz     held-out data for calibration and validation: ``image`` and ``labels``

Runs in seconds on a CPU; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from sklearn.datasets import load_digits

INPUT_NAME = "image"


def digits() -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 8, 8, 1) in [0, 1] and labels, shuffled with a fixed seed."""
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(images))
    x = (images[order] / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    return x, labels[order].astype("int64")


def build_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8, 8, 1), name=INPUT_NAME),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def train(out: Path, epochs: int = 30, held_out: int = 600) -> dict[str, float]:
    keras.utils.set_random_seed(0)
    x, y = digits()
    x_train, y_train, x_test, y_test = x[:-held_out], y[:-held_out], x[-held_out:], y[-held_out:]
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "digits.keras")
    model.export(str(out / "digits.onnx"), format="onnx", verbose=False)
    np.savez(out / "digits.npz", **{INPUT_NAME: x_test, "labels": y_test})
    return {"test_accuracy": float(accuracy), "train_samples": len(x_train), "held_out": held_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "build")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    result = train(args.out, args.epochs)
    accuracy = result["test_accuracy"]
    print(f"wrote {args.out}/digits.keras, digits.onnx, digits.npz; test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
