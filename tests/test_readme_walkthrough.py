"""The README's walkthrough, run as a new user runs it, so the README cannot drift from the code.

How blocks are marked and run: tests/utils/walkthrough.py. ``TUNE_TRIALS`` keeps the host
compile's tuning small.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.utils.walkthrough import ROOT, Block, run_walkthrough, walkthrough_blocks

pytestmark = pytest.mark.slow

# The README says the host compile tunes TUNE_TRIALS trials (64 unless set): minutes on
# this machine, where tuning has its own tests (tests/test_compiler.py); none here.
TEST_TUNE_TRIALS = "0"


def test_the_marked_blocks_are_found_in_order() -> None:
    text = (
        "<!-- walkthrough -->\n```sh\necho one\n```\nprose\n```sh\nnot marked\n```\n"
        "<!-- walkthrough: background; ready when http://x/ answers -->\n```sh\nserve\n```\n"
    )
    assert walkthrough_blocks(text) == [
        Block("echo one\n", background=False, ready_url=None),
        Block("serve\n", background=True, ready_url="http://x/"),
    ]
    with pytest.raises(ValueError, match="every marker"):
        walkthrough_blocks("<!-- walkthrough -->\n\n```sh\necho detached\n```\n")


def test_readme_walkthrough_runs(tmp_path: Path) -> None:
    run_walkthrough(
        ROOT / "README.md",
        tmp_path,
        copies=["examples/digits/train.py"],
        env={"TUNE_TRIALS": TEST_TUNE_TRIALS},
        timeout_s=840,  # under pytest's 900 s, so the failure shows the output
    )
    # What the walkthrough promises to leave behind.
    for made in ("build/rpi4/report.json", "build/host/report.json", "ota-repo/metadata/root.json",
                 "update.delta", "rebuilt-1.1.0.efb", "digits-host-1.0.0.efb",
                 "fleet-data/admin.token", "device/agent.toml"):  # fmt: skip
        assert (tmp_path / made).exists(), made
