// Rollouts: the list, one rollout (waves, gate, clock, controls, failures, history, health)
// and a new rollout, previewed before it is created.

import { useMemo, useState } from "preact/hooks";

import { api } from "./api.js";
import { HealthCharts } from "./health.js";
import { useBundles } from "./registry.js";
import {
  Badge,
  Confirm,
  Empty,
  StackedBar,
  ago,
  clock,
  count,
  duration,
  html,
  percent,
  useCan,
  useContentMark,
  useNow,
  usePoll,
  useReport,
  waveName,
  when,
} from "./ui.js";

/** Where a wave's devices stand, in the order a device moves through them. */
const PARTS = [
  ["pending", "pending"],
  ["commanded", "sent"],
  ["downloading", "downloading"],
  ["installed", "installed"],
  ["healthy", "healthy"],
  ["failed", "failed"],
  ["rolling_back", "rolling back"],
  ["rolled_back", "rolled back"],
];

/** RolloutPublic.devices counts member states; the list shows them with PARTS' names. */
const PART_OF_STATE = { in_progress: "downloading" };

const ACTIONS = {
  pause: {
    label: "Pause",
    what: "Nothing more is sent for this wave until it is resumed; devices already commanded finish what they started.",
  },
  resume: { label: "Resume", what: "The current wave deploys again: its unfinished commands go out once more." },
  advance: { label: "Advance", what: "The next wave starts now, past a held or failed gate." },
  abort: {
    label: "Abort",
    danger: true,
    what: "The rollout ends here. Devices keep the bundle they have; nothing is rolled back.",
  },
  rollback: {
    label: "Roll back",
    danger: true,
    what: "Every device that took the bundle is sent back to the one it had before.",
  },
};

const METRICS = {
  failure_ratio: ["Failure ratio", percent],
  healthy_ratio: ["Healthy ratio", percent],
  inferences: ["Inferences", (v) => Math.round(v).toLocaleString("en")],
  error_rate: ["Error rate", (v) => percent(v, 2)],
  fallback_rate: ["Fallback rate", (v) => percent(v, 2)],
  latency_p95_ms: ["p95 latency", (v) => `${v.toFixed(1)} ms`],
  agreement: ["Shadow agreement", percent],
  // compare: baseline: the sequential test's always-valid p-value against the gate's alpha
  error_rate_vs_baseline: ["Error rate vs previous (p)", (v) => v.toPrecision(2)],
  fallback_rate_vs_baseline: ["Fallback rate vs previous (p)", (v) => v.toPrecision(2)],
  drift_psi: ["Input drift (PSI)", (v) => v.toFixed(3)],
  live_accuracy: ["Live accuracy", (v) => percent(v, 1)],
};

const STOPPED = ["paused", "rolling_back", "rolled_back", "aborted"];

// --- the list ------------------------------------------------------------------------------

export function RolloutList() {
  const canOperate = useCan("operator");
  const bundles = useBundles();
  const [rollouts] = usePoll(() => api("/rollouts?limit=100"), []);
  useContentMark(rollouts !== null);
  return html`<section>
    <div class="heading">
      <h1>Rollouts</h1>
      ${canOperate ? html`<a class="button primary" href="#/rollouts/new">New rollout</a>` : null}
    </div>
    ${rollouts === null
      ? null
      : rollouts.length === 0
        ? html`<${Empty}>No rollout yet.<//>`
        : html`<table class="rollouts">
            <thead><tr><th>Rollout</th><th>Model version</th><th>State</th><th>Wave</th><th>Devices</th><th>Reason</th><th>Created</th></tr></thead>
            <tbody>
              ${rollouts.map((r) => html`<${RolloutRow} key=${r.id} rollout=${r} bundle=${bundles.get(r.bundle_id)} />`)}
            </tbody>
          </table>`}
  </section>`;
}

function RolloutRow({ rollout, bundle }) {
  const totals = {};
  let members = 0;
  for (const states of Object.values(rollout.devices)) {
    for (const [state, n] of Object.entries(states)) {
      const part = PART_OF_STATE[state] ?? state;
      totals[part] = (totals[part] ?? 0) + n;
      members += n;
    }
  }
  const wave = Math.min(rollout.wave, rollout.waves.length - 1);
  return html`<tr data-rollout=${rollout.id}>
    <td><a href=${`#/rollouts/${rollout.id}`}>${rollout.id}</a>${rollout.mode === "shadow" ? html` <${Badge} value="shadow" />` : null}</td>
    <td>${bundle ? `${bundle.model} ${bundle.version}` : `bundle ${rollout.bundle_id}`}</td>
    <td><${Badge} value=${rollout.state} /></td>
    <td>${waveName(wave, rollout.waves[wave])} <span class="muted">of ${rollout.waves.length}</span></td>
    <td class="mini"><${StackedBar} parts=${PARTS.map(([name, label]) => ({ name, label, count: totals[name] ?? 0 }))} total=${members} label=${count(members, "device")} /></td>
    <td class="reason">${rollout.reason}</td>
    <td>${ago(rollout.created_at)}</td>
  </tr>`;
}

// --- one rollout ---------------------------------------------------------------------------

export function RolloutPage({ id }) {
  const [data, refresh] = usePoll(async () => {
    const [rollout, progress, history, failed] = await Promise.all([
      api(`/rollouts/${encodeURIComponent(id)}`),
      api(`/rollouts/${encodeURIComponent(id)}/progress`),
      api(`/rollouts/${encodeURIComponent(id)}/history?limit=200`),
      api(`/rollouts/${encodeURIComponent(id)}/devices?state=failed&limit=50`),
    ]);
    return { rollout, progress, history, failed, fetchedAt: Date.now() };
  }, [id]);
  useContentMark(data !== null);
  if (data === null) return html`<p class="muted">Loading rollout ${id}…</p>`;
  const { rollout, progress, history, failed } = data;
  const bundle = progress.bundle;
  const stop = STOPPED.includes(rollout.state)
    ? [...history].reverse().find((e) => ["rollback", "pause", "abort"].includes(e.action))
    : null;
  return html`<section class="rollout" data-state=${rollout.state}>
    <div class="heading">
      <h1>Rollout ${rollout.id} <${Badge} value=${rollout.state} /></h1>
      <${Controls} rollout=${rollout} refresh=${refresh} />
    </div>
    <p class="subtitle">
      <strong>${bundle.model} ${bundle.version}</strong>
      ${` (${bundle.name} · ${bundle.profile} · ${bundle.runtime}:${bundle.precision}) · ${rollout.mode}`}
      ${` · on failure: ${rollout.on_failure} · `}
      ${rollout.auto_advance ? "advances by itself" : "each wave waits for an operator"}
      ${rollout.tags.length ? ` · devices tagged ${rollout.tags.join(", ")}` : ""}
      ${` · created by ${rollout.created_by} ${ago(rollout.created_at)}`}
    </p>
    ${stop && stop.reason !== rollout.reason
      ? html`<p class="cause" data-cause>
          <strong>${stop.action === "rollback" ? "Rolled back because" : stop.action === "pause" ? "Paused because" : "Aborted because"}:</strong>
          ${` ${stop.reason} `}<span class="muted">(${stop.actor}, ${when(stop.at)})</span>
        </p>`
      : null}
    <p class="reason-now" data-reason><span class="muted">Now:</span> ${rollout.reason || "—"}</p>
    <${Clock} progress=${progress} fetchedAt=${data.fetchedAt} />
    <h2>Waves</h2>
    <div class="waves">
      ${progress.waves.map((w) => html`<${WaveRow} key=${w.wave} wave=${w} current=${w.wave === rollout.wave && !["completed", "rolled_back", "aborted"].includes(rollout.state)} />`)}
    </div>
    <${GateVerdict} verdict=${rollout.last_gate} gate=${rollout.gate} waves=${rollout.waves} />
    <${FailedDevices} failed=${failed} waves=${rollout.waves} />
    <${History} history=${history} />
    <${RolloutHealth} rollout=${rollout} model=${bundle.model} />
  </section>`;
}

function Controls({ rollout, refresh }) {
  const canOperate = useCan("operator");
  const report = useReport();
  const [asking, setAsking] = useState(null);
  if (!canOperate || rollout.actions.length === 0) return null;
  const act = async (action, reason) => {
    try {
      await api(`/rollouts/${encodeURIComponent(rollout.id)}/${action}`, {
        method: "POST",
        body: reason ? { reason } : {},
      });
    } catch (error) {
      report(error);
    }
    await refresh();
  };
  const asked = asking && ACTIONS[asking];
  return html`<div class="controls">
    ${rollout.actions.map(
      (action) => html`<button class=${ACTIONS[action].danger ? "danger" : ""} data-action=${action} onClick=${() => setAsking(action)}>
        ${ACTIONS[action].label}
      </button>`,
    )}
    ${asked
      ? html`<${Confirm}
          title=${`${asked.label} rollout ${rollout.id}?`}
          confirmLabel=${asked.label}
          danger=${Boolean(asked.danger)}
          withReason
          onConfirm=${(reason) => act(asking, reason)}
          onClose=${() => setAsking(null)}
        >
          <p>${asked.what}</p>
          <p class="muted">It is ${rollout.state.replaceAll("_", " ")}, in ${waveName(Math.min(rollout.wave, rollout.waves.length - 1), rollout.waves[rollout.wave])} of ${rollout.waves.length}.</p>
        <//>`
      : null}
  </div>`;
}

function Clock({ progress, fetchedAt }) {
  const now = useNow();
  const serverNow = now + (Date.parse(progress.now) - fetchedAt);
  const wave = progress.wave + 1;
  if (progress.state === "soaking" && progress.soak_ends_at) {
    const left = (Date.parse(progress.soak_ends_at) - serverNow) / 1000;
    return html`<p class="clock" data-clock="soaking">
      Soaking wave ${wave}: <strong>${left > 0 ? `${duration(left)} left` : "judging the gate…"}</strong>
      <span class="muted"> (the soak ends at ${clock(progress.soak_ends_at)})</span>
    </p>`;
  }
  if (progress.state === "deploying") {
    const since = (serverNow - Date.parse(progress.wave_started_at)) / 1000;
    const text = `Deploying wave ${wave} for ${duration(since)}; a device silent for ${duration(progress.deploy_timeout_s)} counts as failed.`;
    return html`<p class="clock" data-clock="deploying">${text}</p>`;
  }
  if (progress.state === "awaiting_approval") {
    return html`<p class="clock" data-clock="awaiting">Wave ${wave} passed its gate; the next wave waits for an operator to advance it.</p>`;
  }
  if (progress.state === "paused") {
    return html`<p class="clock" data-clock="paused">Paused in wave ${wave}: nothing is sent until an operator resumes or advances it.</p>`;
  }
  return null;
}

function WaveRow({ wave, current }) {
  const parts = PARTS.map(([name, label]) => ({ name, label, count: wave[name] }));
  const kind = wave.cohort ? "cohort" : "share";
  return html`<div class=${`wave${current ? " current" : ""}`} data-wave=${wave.wave}>
    <div class="wave-name">
      <strong>${waveName(wave.wave, wave.label)}</strong>
      <span class="muted">${kind} · ${count(wave.members, "device")}</span>
      ${current ? html`<span class="now">now</span>` : null}
    </div>
    <${StackedBar} parts=${parts} total=${wave.members} label=${`${waveName(wave.wave, wave.label)}: ${wave.healthy} of ${wave.members} healthy`} />
  </div>`;
}

function GateVerdict({ verdict, gate, waves }) {
  if (!verdict) {
    return html`<h2>Gate</h2>
      <p class="muted">
        ${`Not judged yet: after soaking ${duration(gate.soak_s)}, at least ${percent(gate.min_healthy_ratio, 0)} of a wave must be healthy and at most ${percent(gate.max_failure_ratio, 0)} failed`}
        ${gate.min_inferences ? `, with ${gate.min_inferences} inferences reported` : ""}.
      </p>`;
  }
  const stats = [verdict.new, verdict.baseline];
  return html`<h2>Gate of ${waveName(verdict.wave, waves[verdict.wave])}: <${Badge} value=${verdict.outcome} /></h2>
    ${verdict.waiting ? html`<p class="muted">Waiting: ${verdict.waiting}</p>` : null}
    <table class="gate">
      <thead><tr><th>Check</th><th>Value</th><th>Threshold</th><th>Verdict</th><th>Why</th></tr></thead>
      <tbody>
        ${verdict.checks.map((c) => {
          const [label, shown] = METRICS[c.metric] ?? [c.metric, String];
          return html`<tr data-metric=${c.metric} class=${c.passed ? "pass" : "fail"}>
            <td>${label}</td>
            <td class="num">${shown(c.value)}</td>
            <td class="num">${c.bound === "max" ? "≤" : "≥"} ${shown(c.threshold)}</td>
            <td>${c.passed ? html`<span class="verdict pass">✓ passed</span>` : html`<span class="verdict fail">✗ failed</span>`}</td>
            <td class="reason">${c.reason}</td>
          </tr>`;
        })}
      </tbody>
    </table>
    ${stats.some(Boolean)
      ? html`<table class="stats">
          <thead><tr><th>Telemetry</th><th>Records</th><th>Inferences</th><th>Error rate</th><th>Fallback rate</th><th>p95 latency</th><th>Agreement</th></tr></thead>
          <tbody>
            ${[["this wave, new version", verdict.new], ["baseline, previous version", verdict.baseline]].map(([name, s]) =>
              s
                ? html`<tr><td>${name}</td><td class="num">${s.records}</td><td class="num">${s.inferences.toLocaleString("en")}</td>
                    <td class="num">${percent(s.error_rate, 2)}</td><td class="num">${percent(s.fallback_rate, 2)}</td>
                    <td class="num">${s.latency_p95_ms === null ? "—" : `${s.latency_p95_ms.toFixed(1)} ms`}</td>
                    <td class="num">${percent(s.agreement)}</td></tr>`
                : null,
            )}
          </tbody>
        </table>`
      : null}`;
}

function FailedDevices({ failed, waves }) {
  if (!failed.length) return null;
  return html`<h2>Failed devices</h2>
    <table class="failed">
      <thead><tr><th>Device</th><th>Wave</th><th>Last ack</th><th>Reason</th></tr></thead>
      <tbody>
        ${failed.map(
          (d) => html`<tr data-device=${d.device_id}>
            <td><a href=${`#/devices/${encodeURIComponent(d.device_id)}`}>${d.device_id}</a></td>
            <td>${waveName(d.wave, waves[d.wave])}</td>
            <td>${d.last_ack ?? "—"}</td>
            <td class="reason">${d.detail || "—"}</td>
          </tr>`,
        )}
      </tbody>
    </table>
    ${failed.length === 50 ? html`<p class="muted">The first 50 are shown.</p>` : null}`;
}

function History({ history }) {
  return html`<h2>History</h2>
    <table class="history">
      <thead><tr><th>When</th><th>Who</th><th>What</th><th>State</th><th>Wave</th><th>Reason</th></tr></thead>
      <tbody>
        ${[...history].reverse().map(
          (e) => html`<tr key=${e.id} data-action=${e.action}>
            <td>${when(e.at)}</td><td>${e.actor}</td><td>${e.action.replaceAll("_", " ")}</td>
            <td>${e.state ? html`<${Badge} value=${e.state} />` : "—"}</td>
            <td>${e.wave === null ? "—" : e.wave + 1}</td>
            <td class="reason">${e.reason || "—"}</td>
          </tr>`,
        )}
      </tbody>
    </table>`;
}

function RolloutHealth({ rollout, model }) {
  const windowS = useMemo(() => {
    const age = (Date.now() - Date.parse(rollout.created_at)) / 1000;
    return Math.min(31 * 86400, Math.max(900, Math.ceil(age * 1.2) + 60));
  }, [rollout.id]);
  return html`<h2>Health of ${model}</h2>
    <${HealthCharts} model=${model} windowS=${windowS} rolloutId=${rollout.id} />`;
}

// --- a new rollout -------------------------------------------------------------------------

const GATE_FIELDS = [
  ["soak_s", "Soak (s)", 300, "How long a wave's health is watched before its gate is judged."],
  ["min_healthy_ratio", "Min healthy ratio", 0.9, "Share of a wave that must report healthy (0–1)."],
  ["max_failure_ratio", "Max failure ratio", 0.1, "Share of failed devices that stops the rollout at once (0–1)."],
  ["deploy_timeout_s", "Deploy timeout (s)", 1800, "A device silent this long counts as failed."],
  ["min_inferences", "Min inferences", 0, "Telemetry a wave must report before its health is judged (0: acks only)."],
  ["max_error_rate_increase", "Max error rate increase", 0.02, "Over the previous version's error rate (absolute, 0–1)."],
  ["max_fallback_rate_increase", "Max fallback rate increase", 0.05, "Over the previous version's (absolute, 0–1)."],
  ["max_latency_ratio", "Max p95 latency ratio", 1.5, "Times the previous version's p95 latency."],
  ["min_agreement", "Min shadow agreement", 0, "Shadow rollouts: agreeing predictions (0–1)."],
];

function splitList(text) {
  return text.split(",").map((s) => s.trim()).filter(Boolean);
}

export function NewRollout() {
  const canOperate = useCan("operator");
  const report = useReport();
  const bundles = useBundles();
  const [form, setForm] = useState({
    bundle_id: "",
    tags: "",
    waves: "1,10,50,100",
    mode: "deploy",
    on_failure: "pause",
    auto_advance: true,
    gate: Object.fromEntries(GATE_FIELDS.map(([name, , value]) => [name, String(value)])),
  });
  const [preview, setPreview] = useState(null);
  const [confirming, setConfirming] = useState(false);
  useContentMark(bundles.size > 0);
  if (!canOperate) return html`<p class="empty">Creating a rollout needs the operator role.</p>`;
  const body = {
    bundle_id: Number(form.bundle_id),
    tags: splitList(form.tags),
    waves: splitList(form.waves),
    mode: form.mode,
    on_failure: form.on_failure,
    auto_advance: form.auto_advance,
    gate: Object.fromEntries(Object.entries(form.gate).map(([k, v]) => [k, Number(v)])),
  };
  const current = preview && preview.body === JSON.stringify(body);
  const set = (name) => (event) => setForm({ ...form, [name]: event.target.type === "checkbox" ? event.target.checked : event.target.value });
  const setGate = (name) => (event) => setForm({ ...form, gate: { ...form.gate, [name]: event.target.value } });
  const runPreview = async (event) => {
    event.preventDefault();
    try {
      const result = await api("/rollouts/preview", { method: "POST", body });
      setPreview({ body: JSON.stringify(body), result });
    } catch (error) {
      setPreview(null);
      report(error);
    }
  };
  const create = async () => {
    try {
      const created = await api("/rollouts", { method: "POST", body: { ...body, id: preview.result.id } });
      location.hash = `#/rollouts/${created.id}`;
    } catch (error) {
      report(error);
    }
  };
  const chosen = bundles.get(body.bundle_id);
  const options = [...bundles.values()].sort((a, b) => a.model.localeCompare(b.model) || b.id - a.id);
  return html`<section class="new-rollout">
    <h1>New rollout</h1>
    <form onSubmit=${runPreview}>
      <div class="grid">
        <label class="field">Bundle
          <select name="bundle" required value=${form.bundle_id} onChange=${set("bundle_id")}>
            <option value="">choose a bundle…</option>
            ${options.map(
              (b) => html`<option value=${b.id}>${b.model} ${b.version} — ${b.profile}, ${b.runtime}:${b.precision} (${b.stage})</option>`,
            )}
          </select>
        </label>
        <label class="field">Waves <span class="hint">cumulative percentages or cohort tags, e.g. canary,10,50,100</span>
          <input name="waves" required value=${form.waves} onInput=${set("waves")} />
        </label>
        <label class="field">Only devices tagged <span class="hint">all of these, comma-separated</span>
          <input name="tags" value=${form.tags} onInput=${set("tags")} />
        </label>
        <label class="field">Mode
          <select name="mode" value=${form.mode} onChange=${set("mode")}>
            <option value="deploy">deploy: devices serve the new version</option>
            <option value="shadow">shadow: it runs beside the current one</option>
          </select>
        </label>
        <label class="field">When a gate fails
          <select name="on_failure" value=${form.on_failure} onChange=${set("on_failure")}>
            <option value="pause">pause the rollout</option>
            <option value="rollback">roll back every device that took it</option>
          </select>
        </label>
        <label class="check"><input type="checkbox" name="auto_advance" checked=${form.auto_advance} onChange=${set("auto_advance")} />
          advance to the next wave by itself when a gate passes</label>
      </div>
      <fieldset>
        <legend>Gate</legend>
        <div class="grid gate-fields">
          ${GATE_FIELDS.map(
            ([name, label, , hint]) => html`<label class="field" title=${hint}>${label}
              <input name=${name} type="number" step="any" min="0" required value=${form.gate[name]} onInput=${setGate(name)} />
            </label>`,
          )}
        </div>
      </fieldset>
      <div class="buttons">
        <button type="submit" name="preview">Preview waves</button>
        <button type="button" class="primary" name="create" disabled=${!current} onClick=${() => setConfirming(true)}
          title=${current ? "" : "Preview first: creating takes exactly the waves the preview shows"}>Create rollout</button>
      </div>
    </form>
    ${preview ? html`<${Preview} result=${preview.result} stale=${!current} />` : null}
    ${confirming && current
      ? html`<${Confirm}
          title="Start this rollout?"
          confirmLabel="Start rollout"
          onConfirm=${create}
          onClose=${() => setConfirming(false)}
        >
          <p>
            ${`${chosen ? `${chosen.model} ${chosen.version}` : `Bundle ${body.bundle_id}`} goes to ${count(preview.result.selected - preview.result.unassigned, "device")} in ${count(preview.result.waves.length, "wave")}; the first wave's commands go out at once.`}
          </p>
        <//>`
      : null}
  </section>`;
}

function Preview({ result, stale }) {
  return html`<div class=${`preview${stale ? " stale" : ""}`} data-preview=${result.id}>
    <h2>Preview ${stale ? html`<span class="muted">(the form changed: preview again)</span>` : null}</h2>
    <p>
      ${`${count(result.selected, "device")} of profile ${result.profile} selected; rollout id `}
      <code>${result.id}</code>. Nothing has been sent yet.
    </p>
    ${result.unassigned
      ? html`<p class="warning">${count(result.unassigned, "selected device")} fall in no wave: they keep what they have.</p>`
      : null}
    <table>
      <thead><tr><th>Wave</th><th>Devices</th><th>Who</th></tr></thead>
      <tbody>
        ${result.waves.map(
          (w) => html`<tr data-wave=${w.wave}>
            <td>${waveName(w.wave, w.label)}</td>
            <td class="num">${w.devices.toLocaleString("en")}</td>
            <td class="who-list">${w.sample.slice(0, 12).join(", ")}${w.devices > 12 ? ` and ${(w.devices - 12).toLocaleString("en")} more` : ""}</td>
          </tr>`,
        )}
      </tbody>
    </table>
  </div>`;
}
