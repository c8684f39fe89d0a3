"""Train a small Keras classifier on scikit-learn's bundled wine data, for a LiteRT int8 build.

Writes, into the output directory (default: this directory's ``build/``):
  wine.keras              the trained Keras model; ``edgefleet compile`` converts it for LiteRT
  wine-calibration.npz    the training inputs, to calibrate int8 on: ``features``
  wine.npz                held-out data to validate on: ``features`` and ``labels``

The inputs are the 13 measurements standardised with the training set's mean and standard
deviation (a Keras ``Normalization`` layer inside the model would be simpler, but Keras'
ONNX export turns its constants into extra model inputs). Runs in seconds on a CPU; nothing
is downloaded.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from sklearn.datasets import load_wine

INPUT_NAME = "features"
HELD_OUT = 60


def train(out: Path, epochs: int) -> float:
    keras.utils.set_random_seed(0)
    x, y = load_wine(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype("float32"), y[order].astype("int64")
    mean, std = x[:-HELD_OUT].mean(axis=0), x[:-HELD_OUT].std(axis=0)
    x = (x - mean) / std
    x_train, y_train, x_test, y_test = x[:-HELD_OUT], y[:-HELD_OUT], x[-HELD_OUT:], y[-HELD_OUT:]
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],), name=INPUT_NAME),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=16, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "wine.keras")
    np.savez(out / "wine-calibration.npz", **{INPUT_NAME: x_train})
    np.savez(out / "wine.npz", **{INPUT_NAME: x_test, "labels": y_test})
    return float(accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "build")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    accuracy = train(args.out, args.epochs)
    print(f"wrote {args.out}/wine.keras, wine-calibration.npz, wine.npz; "
          f"test accuracy {accuracy:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
