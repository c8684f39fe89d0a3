"""A minimal agent process for updater crash tests: the real ``Updater`` on a data directory.

``python -m tests.utils.updater_driver DATA_DIR --root ROOT_JSON --token TOKEN
[--command COMMAND_JSON] [--watch N] [--max-state-saves N]``

Recovers (as the agent does at start), handles the command if one is given, and answers
a health check with N good inferences. Each ack and each activated model is printed as a
JSON line as it happens (``{"ack": {...}}``, ``{"activate": "NAME-VERSION" | null}``), and
``{"end": STATE}`` last, so a test that kills the process with ``EDGEFLEET_AGENT_CRASH_AT``
sees how far it got.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

from agent.config import HealthConfig, OtaConfig
from agent.model import LoadedModel
from agent.updater import State, Updater
from contracts.mqtt import Ack, Command


def _print(record: object) -> None:
    print(json.dumps(record), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--command")
    parser.add_argument("--watch", type=int, default=3)
    parser.add_argument("--max-state-saves", type=int, default=20)
    args = parser.parse_args()
    serving: list[LoadedModel | None] = [None]

    def activate(model: LoadedModel | None) -> None:
        if serving[0] is not None:
            serving[0].close()
        serving[0] = model
        _print({"activate": model.bundle if model else None})

    def ack(message: Ack) -> None:
        _print({"ack": message.model_dump(mode="json")})

    http = httpx.Client(headers={"Authorization": f"Bearer {args.token}"}, timeout=30.0)
    updater = Updater(
        args.data_dir,
        ack=ack,
        activate=activate,
        ota=OtaConfig(trusted_root=args.root),
        health=HealthConfig(watch_inferences=args.watch, max_error_rate=0.2),
        http=http,
        max_state_saves=args.max_state_saves,
    )
    updater.recover()
    if args.command:
        updater.handle(Command.model_validate_json(args.command))
    while updater.state is State.HEALTH_CHECK:
        updater.observe(local_error=False)
    _print({"end": str(updater.state)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
