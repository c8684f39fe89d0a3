"""The dashboard end to end: Debian's chromium, driven by Playwright, against a real fleet
(uvicorn on loopback, mosquitto, SQLite, the rollout engine) and simulated devices.

Each test signs in with an API token as a person would and reads what the page shows,
checked against what the API says. Every request the browser makes must stay on the
fleet's own origin (the dashboard and ``/docs`` work offline), and no page may log a
script error or a Content-Security-Policy violation.

Screenshots of the main screens go to ``$EDGEFLEET_SCREENSHOTS`` (``make screenshots``
sets ``docs/images``), else to the test's temporary directory.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pytest
from playwright.sync_api import BrowserContext, Page, Route, expect, sync_playwright
from sqlalchemy import insert
from sqlmodel import Session

from fleet import dashboard as dashboard_package
from fleet.api.rollouts import Action
from fleet.models import Device, DeviceState
from fleet.rollouts.transitions import OPERATOR_EVENTS
from fleet.simulator import Behaviour, FleetSimulator
from tests.utils.fleet import RunningFleet, make_bundle, running_fleet, wait_for
from tests.utils.http import serve_app

V1, V2, V3 = "digits-host-1.0.0", "digits-host-1.1.0", "digits-host-1.2.0"
CANARIES = {"sim-0001", "sim-0004"}
SIMULATED = [f"sim-{i:04d}" for i in range(6)]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 30_000
CONTENT_SHOWN = "performance.getEntriesByName('edgefleet:content').map(m => m.startTime)"
"""When the page painted its content, in ms from navigation start (``ui.js``'s mark)."""
expect.set_options(timeout=UI_TIMEOUT_MS)
HOLD_EFFECTS = """async () => {
  const { options } = await import("preact");
  window.heldEffects = [];
  options.requestAnimationFrame = (flush) => window.heldEffects.push(flush);
}"""
"""Keep Preact's after-paint work (effects, and effect cleanups of what was unmounted)."""
RUN_HELD_EFFECTS = """async () => {
  const { options } = await import("preact");
  options.requestAnimationFrame = undefined;
  window.heldEffects.forEach((flush) => flush());
}"""


@dataclass
class Dashboard:
    fleet: RunningFleet
    url: str
    context: BrowserContext
    bundles: dict[str, int]
    """Bundle id per ``NAME-VERSION``."""
    tokens: dict[str, str]
    shots: Path
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Script errors and console errors, but the browser's notes on 4xx answers."""

    def page(self, role: str) -> Page:
        """A new tab (its own sessionStorage), signed in with a ``role`` token."""
        page = self.context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("console", self._console)
        page.goto(f"{self.url}/")
        page.get_by_label("API token").fill(self.tokens[role])
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("header .who")).to_have_attribute("data-role", role)
        return page

    def _console(self, message: Any) -> None:
        if message.type == "error" and "the server responded with a status of 4" not in (
            message.text
        ):
            self.problems.append(f"console: {message.text}")

    def shot(self, page: Page, name: str) -> None:
        page.wait_for_timeout(300)  # the last poll's render
        page.screenshot(path=self.shots / f"dashboard-{name}.png")


@pytest.fixture(scope="module")
def dashboard(
    tmp_path_factory: pytest.TempPathFactory, compiled_digits: Path
) -> Iterator[Dashboard]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (make setup installs it: SYSTEM_PACKAGES)"
    out = tmp_path_factory.getbasetemp() / "fleet-bundles"
    out.mkdir(exist_ok=True)
    shots = Path(os.environ.get("EDGEFLEET_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    shots.mkdir(parents=True, exist_ok=True)
    with (
        running_fleet(tmp_path_factory.mktemp("dashboard") / "fleet") as fleet,
        serve_app(fleet.client.app) as served,
        sync_playwright() as playwright,
    ):
        bundles = {}
        for version, stage in (("1.0.0", "production"), ("1.1.0", "staging"), ("1.2.0", None)):
            fleet.api("POST", "/models", json=_model_version(version))
            bundle = fleet.publish(make_bundle(compiled_digits, out, version), stage=stage)
            bundles[f"digits-host-{version}"] = bundle["id"]
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860},
        )
        tokens = {role: fleet.token(role) for role in ("viewer", "operator")}
        ui = Dashboard(
            fleet, served.url, context, bundles, {**tokens, "admin": fleet.admin_token}, shots
        )
        context.on("request", lambda request: ui.requests.append(request.url))
        try:
            yield ui
        finally:
            context.close()


def _model_version(version: str) -> dict[str, Any]:
    return {
        "name": "digits",
        "version": version,
        "owner": "ml-platform",
        "description": f"8x8 digits classifier, {version}",
        "metrics": {"accuracy": 0.97 + int(version.split(".")[1]) / 1000},
        "model_card": f"# digits {version}\n\nA small classifier of handwritten digits.",
    }


@pytest.fixture(scope="module")
def simulated(dashboard: Dashboard) -> Iterator[FleetSimulator]:
    fleet = dashboard.fleet
    specs = fleet.enroll(
        len(SIMULATED),
        prefix="sim",
        tags=lambda i: ["canary", "lab"] if f"sim-{i:04d}" in CANARIES else ["lab"],
        bundle=V1,
        bundle_version_number=1_000_000,
    )
    behaviour = Behaviour(
        failing_bundles={V3},
        error_rate={V1: 0.02, V2: 0.01},
        latency_ms={V1: 6.0, V2: 4.5},
        telemetry_interval_s=0.5,
        inferences_per_report=50,
        install_delay_s=3.0,
    )
    with FleetSimulator("127.0.0.1", fleet.mqtt_port, specs, behaviour) as devices:
        devices.start(connect_timeout_s=60)
        wait_for(
            lambda: len(fleet.api("GET", "/devices?online=true")) == len(SIMULATED),
            what="every simulated device online",
        )
        yield devices


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test in the browser ends with no rollout in progress, nothing asked of another
    origin, and no script error."""
    yield
    if "dashboard" not in request.fixturenames:
        return
    dashboard: Dashboard = request.getfixturevalue("dashboard")
    for rollout in dashboard.fleet.api("GET", "/rollouts?limit=1000"):
        if "abort" in rollout["actions"]:
            dashboard.fleet.api("POST", f"/rollouts/{rollout['id']}/abort")
    outside = [u for u in dashboard.requests if not u.startswith((dashboard.url, "data:"))]
    assert not outside, f"the browser asked for something off the fleet's origin: {outside}"
    problems, dashboard.problems[:] = list(dashboard.problems), []
    assert not problems, problems


def _rollout(fleet: RunningFleet, rollout_id: str) -> dict[str, Any]:
    found: dict[str, Any] = fleet.api("GET", f"/rollouts/{rollout_id}")
    return found


def _confirm(page: Page, action: str, label: str, reason: str = "") -> None:
    page.locator(f".controls button[data-action={action}]").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    if reason:
        dialog.get_by_label("Reason (audit log)").fill(reason)
    dialog.get_by_role("button", name=label, exact=True).click()
    expect(dialog).to_be_hidden()


def _buttons(page: Page) -> set[str]:
    return set(page.locator(".controls button[data-action]").evaluate_all(
        "buttons => buttons.map(b => b.dataset.action)"
    ))  # fmt: skip


# --- tests ------------------------------------------------------------------------------


def test_the_dashboards_controls_are_the_operators_events_of_the_transition_table() -> None:
    assert get_args(Action) == tuple(event.value for event in OPERATOR_EVENTS)


def test_the_vendored_libraries_are_the_versions_the_lock_file_pins() -> None:
    """``make dashboard-assets`` refreshes ``static/vendor/`` from ``package-lock.json``."""
    here = Path(dashboard_package.__file__).parent
    lock = json.loads((here / "package-lock.json").read_text())["packages"]
    wanted = json.loads((here / "package.json").read_text())["dependencies"]
    vendored = json.loads((dashboard_package.STATIC_DIR / "vendor" / "versions.json").read_text())
    assert vendored == wanted
    assert {name: lock[f"node_modules/{name}"]["version"] for name in wanted} == wanted


def test_the_api_docs_work_offline(dashboard: Dashboard) -> None:
    page = dashboard.page("viewer")
    page.goto(f"{dashboard.url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("edgefleet fleet server")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    page.close()


def test_a_chart_library_loaded_after_its_page_was_left_draws_nothing(
    dashboard: Dashboard,
) -> None:
    """Preact 11 removes a left page's canvases at once but runs its effects' cleanups after
    the next paint: a chart library that finishes loading in between must not be handed a
    canvas that is gone (``useChart`` in ``fleet/dashboard/static/ui.js``). The library's
    response is held, and so are Preact's after-paint flushes (``options.requestAnimationFrame``,
    the hook Preact's own test utilities use), to make that window as wide as needed."""
    page = dashboard.page("viewer")
    held: list[Route] = []
    page.route("**/static/vendor/chart.umd.min.js", lambda route: held.append(route))
    with page.expect_request("**/static/vendor/chart.umd.min.js"):
        page.get_by_role("link", name="Health").click()
    expect(page.locator(".charts canvas")).to_have_count(4)  # health.js CHARTS
    page.evaluate(HOLD_EFFECTS)
    page.get_by_role("link", name="Registry").click()
    expect(page.locator("canvas")).to_have_count(0)
    [library] = held
    library.continue_()
    assert page.evaluate("import('./static/vendor/chart.umd.min.js').then(() => 0)") == 0
    made = page.evaluate("Object.keys(Chart.instances).length")
    page.evaluate(RUN_HELD_EFFECTS)
    expect(page.locator("article[data-model=digits]")).to_be_visible()
    assert made == 0, "a chart was made for a canvas that its page had already removed"
    assert not dashboard.problems, dashboard.problems
    page.close()


def test_an_operator_previews_creates_and_steers_a_rollout_to_healthy(
    dashboard: Dashboard, simulated: FleetSimulator
) -> None:
    fleet, page = dashboard.fleet, dashboard.page("operator")
    page.get_by_role("link", name="New rollout").click()
    form = page.locator(".new-rollout form")
    form.get_by_label("Bundle").select_option(str(dashboard.bundles[V2]))

    # a misspelt cohort is refused by the preview, and the error stays until dismissed
    form.locator("input[name=waves]").fill("canry,100")
    form.get_by_role("button", name="Preview waves").click()
    error = page.locator(".errors .error").filter(has_text="cohort tag 'canry'")
    expect(error).to_be_visible()
    expect(form.get_by_role("button", name="Create rollout")).to_be_disabled()
    page.get_by_role("link", name="Rollouts").click()
    page.wait_for_timeout(4500)  # two polls of the rollout list
    expect(error).to_be_visible()
    error.get_by_role("button", name="dismiss").click()
    expect(error).to_be_hidden()
    assert fleet.api("GET", "/rollouts") == []

    # preview, then create exactly what the preview showed
    page.get_by_role("link", name="New rollout").click()
    form.get_by_label("Bundle").select_option(str(dashboard.bundles[V2]))
    form.locator("input[name=waves]").fill("canary,100")
    form.locator("input[name=auto_advance]").uncheck()
    form.locator("input[name=soak_s]").fill("6")
    form.locator("input[name=min_inferences]").fill("20")
    form.get_by_role("button", name="Preview waves").click()
    preview = page.locator(".preview")
    expect(preview.locator("tr[data-wave='0'] td").nth(1)).to_have_text("2")
    rollout_id = preview.get_attribute("data-preview")
    assert rollout_id
    shown = preview.locator("tr[data-wave='0'] .who-list").inner_text()
    assert set(shown.split(", ")) == CANARIES
    rest = set(preview.locator("tr[data-wave='1'] .who-list").inner_text().split(", "))
    assert rest == set(SIMULATED) - CANARIES
    assert fleet.api("GET", "/rollouts") == [], "a preview must write nothing"
    dashboard.shot(page, "new-rollout")
    form.get_by_role("button", name="Create rollout").click()
    page.get_by_role("dialog").get_by_role("button", name="Start rollout").click()
    expect(page).to_have_url(re.compile(f"#/rollouts/{rollout_id}$"))
    members = fleet.api("GET", f"/rollouts/{rollout_id}/devices")
    assert {m["device_id"] for m in members if m["wave"] == 0} == CANARIES
    assert {m["device_id"] for m in members if m["wave"] == 1} == rest

    # the first wave's counts move through the install to healthy, then it soaks
    wave = page.locator(".wave[data-wave='0']")
    seen: set[str] = set()

    def healthy() -> bool:
        legend = wave.locator(".legend li").evaluate_all(
            "items => items.map(i => [i.dataset.part, i.textContent])"
        )
        seen.update(part for part, _ in legend)
        return ["healthy", "2 healthy"] in legend

    wait_for(healthy, timeout_s=30, what="wave 1 healthy on the page")
    assert seen & {"commanded", "downloading", "installed"}, seen
    expect(page.locator("[data-clock=soaking]")).to_contain_text(re.compile(r"\d+ s left"))

    # the gate passes, with its numbers, and the next wave waits for an operator
    expect(page.locator(".rollout")).to_have_attribute("data-state", "awaiting_approval")
    verdict = _rollout(fleet, rollout_id)["last_gate"]
    assert verdict["outcome"] == "passed"
    checks = {c["metric"]: c for c in verdict["checks"]}
    assert {"healthy_ratio", "inferences", "error_rate", "latency_p95_ms"} <= set(checks)
    healthy_row = page.locator("tr[data-metric=healthy_ratio] td")
    expect(healthy_row.nth(1)).to_have_text("100.0 %")
    expect(healthy_row.nth(2)).to_have_text("≥ 90.0 %")
    expect(healthy_row.nth(3)).to_have_text("✓ passed")
    error_row = page.locator("tr[data-metric=error_rate] td")
    expect(error_row.nth(1)).to_have_text(f"{checks['error_rate']['value'] * 100:.2f} %")
    expect(error_row.nth(2)).to_have_text(f"≤ {checks['error_rate']['threshold'] * 100:.2f} %")
    expect(page.locator("tr[data-metric=latency_p95_ms] td").nth(3)).to_have_text("✓ passed")
    assert _buttons(page) == {"pause", "advance", "abort", "rollback"}
    dashboard.shot(page, "rollout")

    # every action asks first: cancelled, nothing happens
    page.locator(".controls button[data-action=abort]").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    assert _rollout(fleet, rollout_id)["state"] == "awaiting_approval"

    _confirm(page, "pause", "Pause", reason="checking the canaries by hand")
    expect(page.locator(".rollout")).to_have_attribute("data-state", "paused")
    assert _rollout(fleet, rollout_id)["reason"] == "checking the canaries by hand"
    expect(page.locator("[data-clock=paused]")).to_be_visible()
    assert _buttons(page) == {"resume", "advance", "abort", "rollback"}
    expect(page.locator(".history tr[data-action=pause]")).to_contain_text("by hand")

    _confirm(page, "resume", "Resume")
    expect(page.locator(".rollout")).to_have_attribute("data-state", "awaiting_approval")
    _confirm(page, "advance", "Advance")
    expect(page.locator(".wave[data-wave='1'] li[data-part=healthy]")).to_have_text("4 healthy")
    expect(page.locator(".rollout")).to_have_attribute("data-state", "completed")
    assert _buttons(page) == {"rollback"}
    assert all(simulated.current_bundle(d) == V2 for d in SIMULATED)
    page.close()


def test_a_failing_wave_halts_and_its_cause_stays_shown_after_the_rollback(
    dashboard: Dashboard, simulated: FleetSimulator
) -> None:
    fleet = dashboard.fleet
    serving = {d: simulated.current_bundle(d) for d in SIMULATED}
    rollout = fleet.api(
        "POST",
        "/rollouts",
        json={
            "bundle_id": dashboard.bundles[V3],
            "waves": ["canary", "100"],
            "on_failure": "rollback",
            "gate": {"soak_s": 0, "max_failure_ratio": 0.1},
        },
    )
    page = dashboard.page("operator")
    page.goto(f"{dashboard.url}/#/rollouts/{rollout['id']}")
    expect(page.locator(".rollout")).to_have_attribute("data-state", "rolled_back")
    [rollback] = [e for e in fleet.api("GET", f"/rollouts/{rollout['id']}/history")
                  if e["action"] == "rollback"]  # fmt: skip
    assert re.match(r"gate failed: wave 1: failure ratio \d+\.\d% > max 10\.0%", rollback["reason"])
    cause = page.locator("[data-cause]")
    expect(cause).to_contain_text("Rolled back because")
    expect(cause).to_contain_text(rollback["reason"])
    now = _rollout(fleet, rollout["id"])["reason"]
    assert now != rollback["reason"]
    expect(page.locator("[data-reason]")).to_contain_text(now)
    expect(page.locator("tr[data-metric=failure_ratio] td").nth(3)).to_have_text("✗ failed")
    failed = page.locator("table.failed tr[data-device]")
    expect(failed.first).to_contain_text("health check failed for digits-host-1.2.0")
    assert set(failed.evaluate_all("rows => rows.map(r => r.dataset.device)")) <= CANARIES
    assert _buttons(page) == set()  # rolled back: nothing left to do
    assert {d: simulated.current_bundle(d) for d in SIMULATED} == serving

    # the device's own page tells the same story
    device = sorted(CANARIES)[0]
    page.locator(f"table.failed a:text('{device}')").click()
    entry = page.locator(f".device-rollouts tr[data-rollout={rollout['id']}]")
    expect(entry).to_contain_text("health check failed")
    expect(page.locator("table.commands")).to_contain_text(V3)
    expect(page.locator("table.telemetry tbody tr").first).to_be_visible()
    dashboard.shot(page, "device")

    # health over time, with the rollouts' waves and the rollback marked
    page.get_by_role("link", name="Health").click()
    page.locator("select[name=window]").select_option("900")
    expect(page.locator(".charts")).to_have_attribute("data-window", "900")
    for chart in ("error_rate", "latency", "fallback_rate"):
        expect(page.locator(f"[data-chart={chart}]")).not_to_have_attribute("data-series", "0")
    expect(page.locator("canvas").first).to_be_visible()
    health = fleet.api("GET", "/models/digits/health?window_s=900")
    assert {"create", "rollback"} <= {m["action"] for m in health["markers"]}
    reported = {v["version"] for v in health["versions"] if v["points"]}
    assert {bundle.rsplit("-", 1)[1] for bundle in serving.values()} <= reported
    # drift and live accuracy per version (fleet/dashboard/static/drift.js), as the API says
    versions = [v["version"] for v in fleet.api("GET", "/models?name=digits")]
    expect(page.locator(".version-health")).to_have_count(len(versions))
    for version in versions:
        base = f"/models/digits/versions/{version}"
        drift, accuracy = fleet.api("GET", f"{base}/drift"), fleet.api("GET", f"{base}/accuracy")
        panel = page.locator(f".version-health[data-version='{version}']")
        expect(panel).to_have_attribute("data-reference", str(drift["reference"]).lower())
        cohorts = ([drift["overall"]] if drift["overall"] else []) + drift["cohorts"]
        shown = ("cohorts" if cohorts else "empty") if drift["reference"] else "none"
        expect(panel.locator(f"[data-drift={shown}]")).to_be_visible()
        labelled = "cohorts" if accuracy["overall"] is not None else "none"
        expect(panel.locator(f"[data-accuracy={labelled}]")).to_be_visible()
    dashboard.shot(page, "health")

    page.get_by_role("link", name="Registry").click()
    expect(page.locator("article[data-model=digits] tr[data-version]")).to_have_count(3)
    production = page.locator("tr[data-version='1.0.0']")
    expect(production).to_contain_text("production")
    production.get_by_text("model card").click()
    expect(production.locator(".card pre")).to_contain_text("handwritten digits")
    dashboard.shot(page, "registry")
    page.close()


def test_controls_follow_the_role_a_viewer_sees_none(
    dashboard: Dashboard, simulated: FleetSimulator
) -> None:
    fleet = dashboard.fleet
    rollout = fleet.api(
        "POST",
        "/rollouts",
        json={
            "bundle_id": dashboard.bundles[V1],
            "waves": ["canary", "100"],
            "auto_advance": False,
            "gate": {"soak_s": 0},
        },
    )
    wait_for(
        lambda: _rollout(fleet, rollout["id"])["state"] == "awaiting_approval",
        what="the canaries to pass",
    )
    operator = dashboard.page("operator")
    operator.goto(f"{dashboard.url}/#/rollouts/{rollout['id']}")
    expect(operator.locator(".controls button[data-action]")).to_have_count(4)
    assert _buttons(operator) == set(_rollout(fleet, rollout["id"])["actions"])
    expect(operator.get_by_role("link", name="Audit log")).to_have_count(0)
    operator.close()

    viewer = dashboard.page("viewer")
    viewer.goto(f"{dashboard.url}/#/rollouts/{rollout['id']}")
    expect(viewer.locator(".rollout")).to_have_attribute("data-state", "awaiting_approval")
    expect(viewer.locator(".wave[data-wave='0'] li[data-part=healthy]")).to_have_text("2 healthy")
    expect(viewer.locator(".controls")).to_have_count(0)
    expect(viewer.locator("button[data-action]")).to_have_count(0)
    viewer.get_by_role("link", name="Rollouts").click()
    expect(viewer.locator(f"tr[data-rollout={rollout['id']}]")).to_be_visible()
    expect(viewer.get_by_role("link", name="New rollout")).to_have_count(0)
    expect(viewer.get_by_role("link", name="Audit log")).to_have_count(0)
    viewer.get_by_role("button", name="Log out").click()
    expect(viewer.get_by_label("API token")).to_be_visible()
    assert viewer.evaluate("sessionStorage.length") == 0
    viewer.close()

    admin = dashboard.page("admin")
    admin.get_by_role("link", name="Audit log").click()
    expect(admin.locator(".audit tbody tr").first).to_be_visible()
    expect(admin.locator(".audit")).to_contain_text(f"rollout:{rollout['id']}")
    admin.close()


PROFILES = ("host", "host", "host", "host", "rpi4")
REGIONS = ("eu", "us", "ap")
STATES = ("idle", "downloading", "health_check")


def _bulk_devices(count: int) -> list[dict[str, Any]]:
    """Devices that need not connect: profile, tags, version, presence and updater state
    vary independently, so every filter splits them."""
    now = dt.datetime.now(dt.UTC)
    return [
        {
            "id": f"bulk-{i:05d}",
            "profile": PROFILES[i % 5],
            "tags": ["bulk", REGIONS[(i // 5) % 3], *(["lab"] if i % 7 == 0 else [])],
            "state": DeviceState.ACTIVE,
            "online": (i // 15) % 2 == 0,
            "bundle": (V1, V2, None)[(i // 30) % 3],
            "agent_state": STATES[(i // 90) % 3],
            "agent_version": "sim-0.1.0",
            "last_seen": now,
            "enrolled_at": now,
        }
        for i in range(count)
    ]


def test_the_device_list_filters_10000_devices_and_a_rollout_of_them_renders_fast(
    dashboard: Dashboard,
) -> None:
    fleet = dashboard.fleet
    enrolled = len(fleet.api("GET", "/devices?limit=10000"))
    devices = _bulk_devices(12_500)
    with Session(fleet.server.db) as session:
        session.execute(insert(Device), devices)  # type: ignore[arg-type]
        session.commit()
    hosts = [d for d in devices if d["profile"] == "host"]
    assert len(hosts) == 10_000

    page = dashboard.page("operator")
    page.get_by_role("link", name="Devices").click()
    summary = page.locator("[data-summary]")
    expect(summary).to_contain_text(f"{enrolled + len(devices):,} enrolled")
    choices = {
        "profile": "host",
        "tag": "eu",
        "bundle": V2,
        "online": "true",
        "agent_state": "idle",
    }
    for name, value in choices.items():
        page.locator(f".filters select[name={name}]").select_option(value)
        expect(page).to_have_url(re.compile(f"{name}={re.escape(value)}"))
    wanted = sorted(
        d["id"]
        for d in hosts
        if "eu" in d["tags"] and d["bundle"] == V2 and d["online"] and d["agent_state"] == "idle"
    )
    assert len(wanted) > 50
    pager = page.locator(".pager")
    expect(pager).to_have_attribute("data-total", str(len(wanted)))
    rows = page.locator(".device-list tbody tr")
    expect(rows).to_have_count(50)
    assert rows.evaluate_all("r => r.map(x => x.dataset.device)") == wanted[:50]
    for cells in rows.evaluate_all("r => r.map(x => [...x.cells].map(c => c.innerText))")[:5]:
        assert cells[1] == "host" and "eu" in cells[2] and cells[3] == "● online"
        assert (cells[4], cells[5]) == (V2, "idle")
    dashboard.shot(page, "devices")
    pager.get_by_role("button", name="next →").click()
    expect(rows.first).to_have_attribute("data-device", wanted[50])
    page.get_by_role("button", name="clear filters").click()
    page.get_by_label("Id contains").fill("bulk-0999")
    expect(pager).to_have_attribute("data-total", "10")

    # a rollout over the 10,000 host devices: its page, timed in the browser
    rollout = fleet.api(
        "POST",
        "/rollouts",
        json={"bundle_id": dashboard.bundles[V2], "tags": ["bulk"], "gate": {"soak_s": 0}},
    )
    progress = fleet.api("GET", f"/rollouts/{rollout['id']}/progress")
    sizes = [wave["members"] for wave in progress["waves"]]
    assert sizes == [100, 900, 4000, 5000]
    timings = []
    for _ in range(5):
        page.goto("about:blank")
        page.goto(f"{dashboard.url}/#/rollouts/{rollout['id']}")
        timings += wait_for(lambda: page.evaluate(CONTENT_SHOWN), what="the page's content")
        for wave, size in enumerate(sizes):
            expect(page.locator(f".wave[data-wave='{wave}'] .wave-name")).to_contain_text(
                f"{size:,} devices"
            )
    print(
        f"rollout page with 10,000 devices: navigation start to content visible "
        f"{statistics.median(timings):.0f} ms median of {[round(t) for t in timings]}"
    )
    page.close()
