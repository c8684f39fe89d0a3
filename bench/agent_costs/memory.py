"""Table 3 of the agent benchmark: the memory of ``edgefleet agent run`` as a child process,
idle with and without a model, under load through its local API, and after."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from agent.slots import Slots
from contracts import oip
from contracts.tensors import TensorSpec
from fleet.broker import MqttEndpoint

from .broker import Account, FleetSubscriber
from .common import MIB, free_port, log, markdown_table, mib, sample_inputs, wait_until

__all__ = ["bench_agent_memory", "memory_table"]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile (bytes) and Threads of ``pid``."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"}
    result = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            number = int(value.split()[0])
            result[key] = number if key == "Threads" else number * 1024
    return result


def write_agent_config(home: Path, account: Account, endpoint: MqttEndpoint, port: int) -> Path:
    config = home / "agent.toml"
    config.write_text(
        "\n".join(
            [
                f"device_id = {json.dumps(account.device_id)}",
                'data_dir = "data"',
                "",
                "[mqtt]",
                f"host = {json.dumps(endpoint.host)}",
                f"port = {endpoint.port}",
                f"username = {json.dumps(account.device_id)}",
                f"password = {json.dumps(account.password)}",
                "",
                "[api]",
                f"port = {port}",
                "",
            ]
        )
    )
    return config


def load_agent(
    client_url: str, name: str, body: bytes, requests: int, concurrency: int
) -> tuple[float, int]:
    """Send ``requests`` requests from ``concurrency`` keep-alive clients; (seconds, failures)."""
    remaining = iter(range(requests))
    lock = threading.Lock()
    failures = [0]

    def worker() -> None:
        with httpx.Client(base_url=client_url, timeout=120) as client:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                response = client.post(
                    f"/v2/models/{name}/infer",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                if response.status_code != 200:
                    with lock:
                        failures[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, failures[0]


def bench_agent_memory(
    work: Path,
    endpoint: MqttEndpoint,
    subscriber: FleetSubscriber,
    account: Account,
    bundle: Path | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    label = "MobileNetV2 installed" if bundle is not None else "no model"
    home = work / account.device_id
    shutil.rmtree(home, ignore_errors=True)  # a --workdir used before
    data = home / "data"
    data.mkdir(parents=True)
    model_name = None
    if bundle is not None:
        slots = Slots(data)
        model_name = slots.stage(bundle).model.name
        slots.switch()
    port = free_port()
    config = write_agent_config(home, account, endpoint, port)
    command = [str(Path(sys.executable).parent / "edgefleet"), "agent", "run", "--config"]
    result: dict[str, Any] = {"agent": label}
    log(f"memory: starting edgefleet agent run ({label})")
    with (home / "agent.log").open("wb") as agent_log:
        start = time.perf_counter()
        process = subprocess.Popen(
            [*command, str(config)], stdout=agent_log, stderr=subprocess.STDOUT
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the agent exited; see {home / 'agent.log'}")
            try:
                live = client.get("/v2/health/live").status_code == 200
            except httpx.HTTPError:
                return False
            return live and subscriber.online.get(account.device_id, False)

        wait_until(up, 180, f"the agent ({label}) to serve and be online", poll=0.05)
        result["start_s"] = time.perf_counter() - start
        ready = client.get("/v2/health/ready").status_code == 200
        if ready != (bundle is not None):
            raise RuntimeError(f"agent ({label}): /v2/health/ready says ready={ready}")
        time.sleep(args.settle_s)
        result["idle"] = proc_status(process.pid)
        log(f"memory: {label}: idle VmRSS {result['idle']['VmRSS'] / MIB:.1f} MiB")
        if bundle is not None and model_name is not None and args.load_requests:
            specs = [
                TensorSpec(t["name"], tuple(None if d < 0 else d for d in t["shape"]), "float32")
                for t in client.get(f"/v2/models/{model_name}").json()["inputs"]
            ]
            body = json.dumps({"inputs": oip.encode_inputs(sample_inputs(specs))}).encode()
            peak = [0]
            loading = threading.Event()

            def sample() -> None:
                while not loading.wait(0.1):
                    peak[0] = max(peak[0], proc_status(process.pid)["VmRSS"])

            sampler = threading.Thread(target=sample)
            sampler.start()
            log(f"memory: {label}: {args.load_requests} requests, {args.load_concurrency} clients")
            try:
                seconds, failures = load_agent(
                    f"http://127.0.0.1:{port}",
                    model_name,
                    body,
                    args.load_requests,
                    args.load_concurrency,
                )
            finally:
                loading.set()
                sampler.join()
            if failures:
                raise RuntimeError(f"{failures} of {args.load_requests} requests failed")
            result["load"] = {
                "requests": args.load_requests,
                "concurrency": args.load_concurrency,
                "request_bytes": len(body),
                "seconds": seconds,
                "peak_sampled_rss": peak[0],
                "end": proc_status(process.pid),
            }
            time.sleep(3)
            result["after_load"] = proc_status(process.pid)
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return result


def memory_table(results: list[dict[str, Any]], broker: str) -> str:
    rows = []
    for r in results:
        idle = r["idle"]
        rows.append(
            [
                r["agent"],
                "idle",
                mib(idle["VmRSS"]),
                mib(idle["RssAnon"]),
                mib(idle["RssFile"]),
                mib(idle["VmHWM"]),
                str(idle["Threads"]),
                f"ready and online in {r['start_s']:.1f} s",
            ]
        )
        if "load" in r:
            load, end, after = r["load"], r["load"]["end"], r["after_load"]
            rate = load["requests"] / load["seconds"]
            rows.append(
                [
                    r["agent"],
                    "under load (peak sampled)",
                    mib(load["peak_sampled_rss"]),
                    "",
                    "",
                    mib(end["VmHWM"]),
                    str(end["Threads"]),
                    f"{load['requests']} requests of {load['request_bytes'] / 1e6:.1f} MB JSON, "
                    f"{load['concurrency']} clients, {rate:.1f} req/s",
                ]
            )
            rows.append(
                [
                    r["agent"],
                    "3 s after load",
                    mib(after["VmRSS"]),
                    mib(after["RssAnon"]),
                    mib(after["RssFile"]),
                    mib(after["VmHWM"]),
                    str(after["Threads"]),
                    "",
                ]
            )
    return markdown_table(
        f"Memory of `edgefleet agent run` (/proc/PID/status, MiB), MQTT to {broker}",
        ["agent", "state", "VmRSS", "RssAnon", "RssFile", "VmHWM", "threads", "notes"],
        rows,
        text_columns=2,
        last_is_text=True,
    )
