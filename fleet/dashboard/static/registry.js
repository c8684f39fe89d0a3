// The registry (models, versions, stages, bundles, model cards) and the audit log.

import { useMemo, useState } from "preact/hooks";

import { api, query } from "./api.js";
import { Badge, Empty, bytes, html, useContentMark, usePoll, when } from "./ui.js";

/** Every bundle by id, with its model's name, version and stage (the registry, polled). */
export function useBundles() {
  const [versions] = usePoll(() => api("/models"), [], 30000);
  return useMemo(() => {
    const found = new Map();
    for (const v of versions ?? []) {
      for (const b of v.bundles) found.set(b.id, { ...b, model: v.name, version: v.version, stage: v.stage });
    }
    return found;
  }, [versions]);
}

export function RegistryPage() {
  const [versions] = usePoll(() => api("/models"), [], 10000);
  useContentMark(versions !== null);
  if (versions === null) return null;
  const models = new Map();
  for (const v of versions) models.set(v.name, [...(models.get(v.name) ?? []), v]);
  return html`<section class="registry">
    <h1>Registry</h1>
    ${models.size === 0 ? html`<${Empty}>No model registered yet (<code>edgefleet fleet publish BUNDLE</code>).<//>` : null}
    ${[...models].map(
      ([name, found]) => html`<article class="model" data-model=${name} key=${name}>
        <div class="heading">
          <h2>${name}</h2>
          <a href=${`#/health?model=${encodeURIComponent(name)}`}>health over time →</a>
        </div>
        <table>
          <thead><tr><th>Version</th><th>Stage</th><th>Owner</th><th>Metrics</th><th>Bundles</th><th>Created</th></tr></thead>
          <tbody>
            ${[...found].reverse().map((v) => html`<${VersionRow} key=${v.id} version=${v} />`)}
          </tbody>
        </table>
      </article>`,
    )}
  </section>`;
}

function VersionRow({ version }) {
  const metrics = Object.entries(version.metrics);
  return html`<tr data-version=${version.version}>
    <td><strong>${version.version}</strong>
      ${version.description ? html`<div class="muted">${version.description}</div>` : null}
      ${version.model_card
        ? html`<details class="card"><summary>model card</summary><pre>${version.model_card}</pre></details>`
        : null}
    </td>
    <td><${Badge} value=${version.stage} /></td>
    <td class="nowrap">${version.owner || "—"}</td>
    <td>${metrics.length ? metrics.map(([k, v]) => html`<div>${k} <strong>${Number(v).toPrecision(4)}</strong></div>`) : "—"}</td>
    <td>
      ${version.bundles.length
        ? version.bundles.map(
            (b) => html`<div class="bundle" data-bundle=${b.id}>
              ${`#${b.id} ${b.profile} · ${b.runtime}:${b.precision} · ${bytes(b.length)} · `}
              <span class="muted" title=${`sha256 ${b.sha256}`}>${b.target_path}</span>
            </div>`,
          )
        : "—"}
    </td>
    <td class="nowrap">${when(version.created_at)}<div class="muted">${version.created_by}</div></td>
  </tr>`;
}

/** `before` → `after` for each top-level field that changed. */
function changes(entry) {
  const before = entry.before ?? {};
  const after = entry.after ?? {};
  const shown = (value) => (typeof value === "object" && value !== null ? JSON.stringify(value) : String(value));
  return Object.keys({ ...before, ...after })
    .filter((key) => !["updated_at", "last_gate"].includes(key) && shown(before[key]) !== shown(after[key]))
    .map((key) => [key, key in before ? shown(before[key]) : null, key in after ? shown(after[key]) : null]);
}

export function AuditPage() {
  const [action, setAction] = useState("");
  const [entries] = usePoll(() => api(`/audit${query({ limit: 200, action })}`), [action], 5000);
  useContentMark(entries !== null);
  return html`<section class="audit">
    <div class="heading">
      <h1>Audit log</h1>
      <label class="field inline">Action
        <input name="action" placeholder="e.g. rollout.pause" value=${action} onChange=${(e) => setAction(e.target.value.trim())} />
      </label>
    </div>
    ${entries === null
      ? null
      : html`<table>
          <thead><tr><th>When</th><th>Who</th><th>Action</th><th>Target</th><th>Changes</th></tr></thead>
          <tbody>
            ${entries.map(
              (e) => html`<tr key=${e.id}>
                <td>${when(e.at)}</td><td>${e.actor}</td><td>${e.action}</td><td><${Target} target=${e.target} /></td>
                <td class="changes">
                  ${changes(e)
                    .slice(0, 8)
                    .map(([key, from, to]) => html`<div><code>${key}</code> ${from === null ? "" : html`<span class="from">${from.slice(0, 120)}</span> → `}<span class="to">${(to ?? "∅").slice(0, 120)}</span></div>`)}
                </td>
              </tr>`,
            )}
          </tbody>
        </table>`}
    <p class="muted">The latest 200 entries, newest first.</p>
  </section>`;
}

function Target({ target }) {
  const [kind, id] = target.split(/:(.*)/s);
  if (kind === "rollout") return html`<a href=${`#/rollouts/${encodeURIComponent(id)}`}>${target}</a>`;
  if (kind === "device") return html`<a href=${`#/devices/${encodeURIComponent(id)}`}>${target}</a>`;
  return target;
}
