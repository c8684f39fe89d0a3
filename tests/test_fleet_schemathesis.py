"""Schemathesis against the running fleet's own OpenAPI, over real HTTP.

Every documented operation is called with generated requests, schema-valid and not (the
examples, coverage and fuzzing phases), then in sequences that follow the links between
operations (the stateful phase), all with an admin token. Three checks must hold on every
answer: no 5xx, the status is one the schema documents for that operation, and the body
matches the documented schema (and content type). ``DELETE /tokens/{id}`` is left out: it
would revoke the token the run itself uses (tests/test_hostile_http.py covers it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.utils.fleet import running_fleet
from tests.utils.http import serve_app

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "response_schema_conformance",
        "content_type_conformance",
    ]
)
MAX_EXAMPLES = 15
"""Per operation and phase: the run stays within about two minutes on two cores."""

CONFIG = """
[dictionaries.names]
values = ["digits"]
[dictionaries.versions]
values = ["1.0.0"]
[dictionaries.devices]
values = ["st-0000", "st-0001"]
[dictionaries.profiles]
values = ["host", "rpi4"]

[parameters]
"path.name" = { dictionary = "names", probability = 0.5 }
"query.name" = { dictionary = "names", probability = 0.5 }
"path.version" = { dictionary = "versions", probability = 0.5 }
"path.device_id" = { dictionary = "devices", probability = 0.5 }
"body.profile" = { dictionary = "profiles", probability = 0.5 }
"""
"""Half the time, a name that is stored (the model and devices the test makes first), so
generated requests reach past the 404s."""


def test_schemathesis_finds_no_5xx_undocumented_status_or_schema_violation(
    tmp_path: Path,
) -> None:
    report = tmp_path / "report.json"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    with running_fleet(tmp_path / "fleet") as fleet, serve_app(fleet.client.app) as app:
        fleet.api("POST", "/models", json={"name": "digits", "version": "1.0.0"})
        fleet.enroll(2, prefix="st")
        started = time.monotonic()
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(config),
                "run",
                f"{app.url}/openapi.json",
                "--header",
                f"Authorization: Bearer {fleet.admin_token}",
                "--checks",
                CHECKS,
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--exclude-method",
                "DELETE",
                "--generation-with-security-parameters",
                "false",
                "--generation-database",
                "none",
                "--seed",
                "20240601",
                "--workers",
                "1",
                "--request-timeout",
                "30",
                "--no-color",
                "--report",
                "json",
                "--report-json-path",
                str(report),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=tmp_path,  # it keeps a cache in .schemathesis/ where it runs
        )
        elapsed = time.monotonic() - started
    output = run.stdout[-6000:] + run.stderr[-3000:]
    summary = json.loads(report.read_text()) if report.exists() else {}
    cases = summary.get("test_cases", {})
    print(
        f"schemathesis: {cases.get('generated')} cases, {cases.get('with_failures')} with "
        f"failures, {len(summary.get('failures', []))} kinds of failure, {elapsed:.0f} s"
    )
    assert run.returncode == 0, f"schemathesis found problems (exit {run.returncode}):\n{output}"
    assert summary.get("complete"), f"the run did not complete:\n{output}"
    assert cases["with_failures"] == 0 and not summary["failures"], summary["failures"]
    assert not summary["errors"], f"schemathesis could not run some cases: {summary['errors']}"
    assert summary["phases"]["stateful"]["status"] == "success", summary["phases"]
    assert cases["generated"] >= 500, f"only {cases['generated']} cases ran:\n{output}"
