"""Ask the agent's local inference API (Open Inference Protocol) about held-out wines.

Waits until the agent serves ``--bundle`` itself (not through the cloud fallback), then
sends the first ``--samples`` rows of ``wine.npz`` and prints who answered, with which
bundle, and the predicted and true classes. Exits 1 if the bundle is not served locally
within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import numpy as np

INPUT_NAME = "features"  # train.py's; not imported from there, which would load TensorFlow


def ask(agent: str, data: Path, samples: int) -> dict:
    with np.load(data) as held_out:
        x = held_out[INPUT_NAME][:samples]
    body = {
        "inputs": [
            {"name": INPUT_NAME, "shape": list(x.shape), "datatype": "FP32",
             "data": x.ravel().tolist()}
        ]
    }  # fmt: skip
    return httpx.post(f"{agent}/v2/models/wine/infer", json=body, timeout=30).json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent", default="http://127.0.0.1:8800")
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "build" / "wine.npz")
    parser.add_argument("--bundle", default="wine-rpi4-1.0.0")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    answer: dict = {}
    while time.monotonic() < deadline:
        try:
            answer = ask(args.agent, args.data, args.samples)
        except httpx.HTTPError as e:
            answer = {"error": str(e)}
        parameters = answer.get("parameters", {})
        if parameters.get("served_by") == "local" and parameters.get("bundle") == args.bundle:
            break
        time.sleep(1)
    else:
        print(f"the agent does not serve {args.bundle} yet; its last answer: {answer}",
              file=sys.stderr)  # fmt: skip
        return 1
    output = answer["outputs"][0]
    predicted = np.asarray(output["data"]).reshape(output["shape"]).argmax(axis=1)
    with np.load(args.data) as held_out:
        labels = held_out["labels"][: args.samples]
    print(f"served by {parameters['served_by']} with {parameters['bundle']}")
    print(f"predicted {' '.join(map(str, predicted))}")
    print(f"labels    {' '.join(map(str, labels))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
