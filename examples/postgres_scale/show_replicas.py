"""Print what every replica says about the replicas: the rollout lease and each heartbeat.

``python show_replicas.py URL ...`` asks ``GET /api/v1/replicas`` (any API token; default
``fleet-data/admin.token``) of each URL, and exits 1 unless they all name the same lease
holder and list every replica.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--token-file", type=Path, default=Path("fleet-data/admin.token"))
    args = parser.parse_args()
    token = args.token_file.read_text().strip()
    holders = set()
    for url in args.urls:
        answer = (
            httpx.get(
                f"{url}/api/v1/replicas", headers={"Authorization": f"Bearer {token}"}, timeout=10
            )
            .raise_for_status()
            .json()
        )
        lease = answer["lease"]
        names = [f"{r['id']} ({'alive' if r['alive'] else 'silent'})" for r in answer["replicas"]]
        holders.add(lease["holder"] if lease["held"] else None)
        print(f"{url}: replicas {', '.join(names)}; rollouts driven by {lease['holder']} "
              f"(term {lease['epoch']})")  # fmt: skip
    if len(holders) != 1 or None in holders:
        print(f"the replicas disagree on the lease holder: {holders}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
