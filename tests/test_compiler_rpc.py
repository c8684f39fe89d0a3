"""Tuning and latency through a TVM RPC tracker, with a tracker and a server on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compiler.pipeline import CompileOptions, compile_model
from compiler.tune import RpcTarget
from hw_profiles import load_profile
from tests.utils.mqtt import free_port

KEY = "edgefleet-test-board"


@pytest.fixture
def rpc_board() -> Iterator[RpcTarget]:
    """A tracker and one RPC server registered under KEY: a board on loopback."""
    from tvm import rpc
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker_port, server_port = free_port(), free_port()
    tracker = Tracker(host="127.0.0.1", port=tracker_port, port_end=tracker_port + 1, silent=True)
    server = Server(
        host="127.0.0.1",
        port=server_port,
        port_end=server_port + 1,
        key=KEY,
        tracker_addr=("127.0.0.1", tracker.port),
        silent=True,
    )
    deadline = time.monotonic() + 30
    while KEY not in rpc.connect_tracker("127.0.0.1", tracker.port).text_summary():
        assert time.monotonic() < deadline, "the RPC server never registered with the tracker"
        time.sleep(0.2)
    yield RpcTarget("127.0.0.1", tracker.port, KEY)
    server.terminate()
    tracker.terminate()


def test_tuning_and_latency_go_through_the_rpc_tracker(
    rpc_board: RpcTarget, digits: Path, tmp_path: Path
) -> None:
    report = compile_model(
        CompileOptions(
            model=digits / "digits.onnx",
            profile=load_profile("host"),
            out_dir=tmp_path / "out",
            calibration=digits / "digits.npz",
            tune_trials=2,
            cache_dir=tmp_path / "cache",
            rpc=rpc_board,
            latency_runs=5,
        )
    )
    tune = next(s.detail for s in report.steps if s.name == "tune")
    assert tune["measured_on"] == f"rpc 127.0.0.1:{rpc_board.port} key {KEY}"
    assert tune["records"] >= 2 and not tune["reused"]
    latency = report.latency_ms["tvm:fp32"]
    assert latency.where == f"rpc key {KEY}" and latency.p50 > 0
    assert report.settings.rpc_tracker == f"127.0.0.1:{rpc_board.port}"
