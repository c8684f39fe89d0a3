// Devices: the list, filtered and paged by the server, and one device's page (its history
// across rollouts, commands and the audit log, and its latest telemetry).

import { useEffect, useState } from "preact/hooks";

import { api, query } from "./api.js";
import { Badge, Empty, ago, html, percent, useContentMark, useNow, usePoll, waveName, when } from "./ui.js";

const PAGE = 50;
const FILTERS = ["profile", "tag", "bundle", "online", "agent_state", "q"];

function go(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value) search.set(key, value);
  const text = search.toString();
  location.hash = `#/devices${text ? `?${text}` : ""}`;
}

export function DeviceList({ params }) {
  const now = useNow(10000);
  const filters = Object.fromEntries(FILTERS.map((name) => [name, params.get(name) ?? ""]));
  const page = Math.max(0, Number(params.get("page") ?? 0) || 0);
  const key = JSON.stringify([filters, page]);
  const [summary] = usePoll(() => api("/device-summary"), [], 10000);
  const [found] = usePoll(
    () => api(`/devices${query({ ...filters, limit: PAGE, offset: page * PAGE })}`, { total: true }),
    [key],
  );
  const [search, setSearch] = useState(filters.q);
  useEffect(() => setSearch(filters.q), [filters.q]);
  useEffect(() => {
    if (search === filters.q) return undefined;
    const timer = setTimeout(() => go({ ...filters, q: search }), 300);
    return () => clearTimeout(timer);
  }, [search]);
  useContentMark(found !== null);
  const choose = (name) => (event) => go({ ...filters, [name]: event.target.value });
  const select = (name, label, values, any = "any") => html`<label class="field inline">${label}
    <select name=${name} value=${filters[name]} onChange=${choose(name)}>
      <option value="">${any}</option>
      ${values.map(([value, shown]) => html`<option value=${value}>${shown}</option>`)}
      ${filters[name] && !values.some(([v]) => v === filters[name]) ? html`<option value=${filters[name]}>${filters[name]}</option>` : null}
    </select>
  </label>`;
  const facet = (name) => Object.entries(summary?.[name] ?? {}).map(([value, n]) => [value, `${value} (${n.toLocaleString("en")})`]);
  const first = page * PAGE;
  return html`<section class="devices">
    <div class="heading">
      <h1>Devices</h1>
      ${summary
        ? html`<p class="muted" data-summary>
            ${`${summary.total.toLocaleString("en")} enrolled · ${summary.online.toLocaleString("en")} online · ${summary.revoked.toLocaleString("en")} revoked`}
          </p>`
        : null}
    </div>
    <form class="filters" onSubmit=${(e) => e.preventDefault()}>
      ${select("profile", "Profile", facet("profiles"))}
      ${select("tag", "Tag", facet("tags"))}
      ${select("bundle", "Version", facet("bundles"))}
      ${select("online", "Online", [["true", "online"], ["false", "offline"]])}
      ${select("agent_state", "Updater", facet("agent_states"))}
      <label class="field inline">Id contains
        <input name="q" value=${search} maxlength="64" pattern="[A-Za-z0-9._-]*" onInput=${(e) => setSearch(e.target.value)} />
      </label>
      ${Object.values(filters).some(Boolean) ? html`<button type="button" class="link" onClick=${() => go({})}>clear filters</button>` : null}
    </form>
    ${found === null
      ? null
      : html`<p class="pager" data-total=${found.total}>
            ${found.total === 0
              ? "No device matches."
              : `${(first + 1).toLocaleString("en")}–${(first + found.data.length).toLocaleString("en")} of ${found.total.toLocaleString("en")}`}
            <button disabled=${page === 0} onClick=${() => go({ ...filters, page: page - 1 })}>← previous</button>
            <button disabled=${first + found.data.length >= found.total} onClick=${() => go({ ...filters, page: page + 1 })}>next →</button>
          </p>
          <table class="device-list">
            <thead><tr><th>Device</th><th>Profile</th><th>Tags</th><th>Online</th><th>Serving</th><th>Updater</th><th>Agent</th><th>Last seen</th></tr></thead>
            <tbody>
              ${found.data.map(
                (d) => html`<tr key=${d.id} data-device=${d.id}>
                  <td><a href=${`#/devices/${encodeURIComponent(d.id)}`}>${d.id}</a>${d.state === "revoked" ? html` <${Badge} value="revoked" />` : null}</td>
                  <td>${d.profile}</td>
                  <td>${d.tags.map((t) => html`<span class="tag">${t}</span>`)}</td>
                  <td><${Online} online=${d.online} /></td>
                  <td>${d.bundle ?? "—"}</td>
                  <td>${d.agent_state ?? "—"}</td>
                  <td>${d.agent_version ?? "—"}</td>
                  <td>${ago(d.last_seen, now)}</td>
                </tr>`,
              )}
            </tbody>
          </table>`}
  </section>`;
}

function Online({ online }) {
  return html`<span class=${online ? "online" : "offline"}>${online ? "● online" : "○ offline"}</span>`;
}

export function DevicePage({ id }) {
  const path = `/devices/${encodeURIComponent(id)}`;
  const [data] = usePoll(async () => {
    const [device, history, telemetry] = await Promise.all([
      api(path),
      api(`${path}/history?limit=50`),
      api(`${path}/telemetry?limit=20`),
    ]);
    return { device, history, telemetry };
  }, [id]);
  useContentMark(data !== null);
  if (data === null) return html`<p class="muted">Loading device ${id}…</p>`;
  const { device, history, telemetry } = data;
  return html`<section class="device" data-device=${device.id}>
    <div class="heading">
      <h1>${device.id} <${Online} online=${device.online} /> ${device.state === "revoked" ? html`<${Badge} value="revoked" />` : null}</h1>
    </div>
    <dl class="facts">
      <dt>Profile</dt><dd>${device.profile}</dd>
      <dt>Tags</dt><dd>${device.tags.length ? device.tags.map((t) => html`<span class="tag">${t}</span>`) : "—"}</dd>
      <dt>Serving</dt><dd>${device.bundle ?? "—"}</dd>
      <dt>Updater</dt><dd>${device.agent_state ?? "—"}</dd>
      <dt>Agent</dt><dd>${device.agent_version ?? "—"}</dd>
      <dt>Last seen</dt><dd>${when(device.last_seen)}</dd>
      <dt>Enrolled</dt><dd>${when(device.enrolled_at)}</dd>
      ${device.revoked_at ? html`<dt>Revoked</dt><dd>${when(device.revoked_at)}</dd>` : null}
    </dl>
    <h2>Rollouts</h2>
    ${history.rollouts.length === 0
      ? html`<${Empty}>No rollout has taken this device.<//>`
      : html`<table class="device-rollouts">
          <thead><tr><th>Rollout</th><th>Bundle</th><th>Wave</th><th>Its state</th><th>Last ack</th><th>Reason</th><th>Updated</th></tr></thead>
          <tbody>
            ${history.rollouts.map(
              (r) => html`<tr data-rollout=${r.rollout_id} class=${r.state === "failed" ? "fail" : ""}>
                <td><a href=${`#/rollouts/${encodeURIComponent(r.rollout_id)}`}>${r.rollout_id}</a> <${Badge} value=${r.rollout_state} /></td>
                <td class="nowrap">${r.bundle ?? "—"}</td>
                <td class="nowrap">${waveName(r.wave)}</td>
                <td><${Badge} value=${r.state} /></td>
                <td>${r.last_ack ?? "—"}</td>
                <td class="reason">${r.detail || "—"}</td>
                <td>${when(r.updated_at)}</td>
              </tr>`,
            )}
          </tbody>
        </table>`}
    <h2>Commands</h2>
    ${history.commands.length === 0
      ? html`<${Empty}>No command sent to this device.<//>`
      : html`<table class="commands">
          <thead><tr><th>Sent</th><th>Kind</th><th>Bundle</th><th>Last ack</th><th>Acked</th><th>Command</th></tr></thead>
          <tbody>
            ${history.commands.map(
              (c) => html`<tr key=${c.id}>
                <td>${when(c.created_at)}</td><td>${c.kind}</td><td class="nowrap">${c.bundle ?? "—"}</td>
                <td>${c.last_ack ? html`<${Badge} value=${c.last_ack} />` : "none yet"}</td>
                <td>${c.last_ack ? when(c.updated_at) : "—"}</td><td class="muted">${c.id}</td>
              </tr>`,
            )}
          </tbody>
        </table>`}
    <h2>Audit</h2>
    ${history.audit.length === 0
      ? html`<${Empty}>Nothing recorded.<//>`
      : html`<table class="device-audit">
          <thead><tr><th>When</th><th>Who</th><th>What</th></tr></thead>
          <tbody>${history.audit.map((a) => html`<tr key=${a.id}><td>${when(a.at)}</td><td>${a.actor}</td><td>${a.action}</td></tr>`)}</tbody>
        </table>`}
    <h2>Recent telemetry</h2>
    ${telemetry.length === 0
      ? html`<${Empty}>No telemetry received.<//>`
      : html`<table class="telemetry">
          <thead><tr><th>Received</th><th>Bundle</th><th>Inferences</th><th>Error rate</th><th>Fallback rate</th><th>p50</th><th>p95</th><th>Shadow</th></tr></thead>
          <tbody>
            ${telemetry.map(
              (t) => html`<tr key=${t.record_id}>
                <td>${when(t.received_at)}</td><td>${t.bundle ?? "—"}</td><td class="num">${t.inferences}</td>
                <td class="num">${t.inferences ? percent(t.errors / t.inferences, 2) : "—"}</td>
                <td class="num">${t.inferences ? percent(t.fallbacks / t.inferences, 2) : "—"}</td>
                <td class="num">${t.latency_p50_ms === null ? "—" : `${t.latency_p50_ms.toFixed(1)} ms`}</td>
                <td class="num">${t.latency_p95_ms === null ? "—" : `${t.latency_p95_ms.toFixed(1)} ms`}</td>
                <td>${t.shadow_bundle ? `${t.shadow_bundle}: ${percent(t.shadow_compared ? t.shadow_agreed / t.shadow_compared : null)}` : "—"}</td>
              </tr>`,
            )}
          </tbody>
        </table>`}
  </section>`;
}
