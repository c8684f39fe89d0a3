// Health over time per model version (error rate, p50/p95 latency, fallback rate, shadow
// agreement), bucketed by the server, drawn with Chart.js, rollout milestones marked.

import { api, query } from "./api.js";
import { ModelHealth } from "./drift.js";
import { Empty, html, useChart, useContentMark, usePoll } from "./ui.js";

const WINDOWS = [
  [900, "15 min"],
  [3600, "1 h"],
  [6 * 3600, "6 h"],
  [24 * 3600, "24 h"],
  [7 * 86400, "7 days"],
];
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];

export function HealthPage({ params }) {
  const [models] = usePoll(() => api("/models"), [], 30000);
  const names = [...new Set((models ?? []).map((m) => m.name))].sort();
  const model = params.get("model") || names[0] || "";
  const windowS = Number(params.get("window")) || 3600;
  useContentMark(models !== null);
  const go = (changes) => {
    const next = new URLSearchParams({ model, window: String(windowS), ...changes });
    location.hash = `#/health?${next}`;
  };
  return html`<section class="health">
    <div class="heading">
      <h1>Health over time</h1>
      <form class="filters" onSubmit=${(e) => e.preventDefault()}>
        <label class="field inline">Model
          <select name="model" value=${model} onChange=${(e) => go({ model: e.target.value })}>
            ${names.map((n) => html`<option value=${n}>${n}</option>`)}
          </select>
        </label>
        <label class="field inline">Last
          <select name="window" value=${String(windowS)} onChange=${(e) => go({ window: e.target.value })}>
            ${WINDOWS.map(([s, label]) => html`<option value=${String(s)}>${label}</option>`)}
          </select>
        </label>
      </form>
    </div>
    ${models === null ? null : model ? html`<${HealthCharts} model=${model} windowS=${windowS} />` : html`<${Empty}>No model registered yet.<//>`}
    ${model ? html`<${ModelHealth} model=${model} versions=${(models ?? []).filter((m) => m.name === model).map((m) => m.version)} />` : null}
  </section>`;
}

const CHARTS = [
  ["error_rate", "Error rate", "%", (p) => [["", pct(p.error_rate)]]],
  ["latency", "Latency", "ms", (p) => [[" p50", p.latency_p50_ms], [" p95", p.latency_p95_ms]]],
  ["fallback_rate", "Fallback rate", "%", (p) => [["", pct(p.fallback_rate)]]],
  ["agreement", "Shadow agreement", "%", (p) => [["", pct(p.agreement)]]],
];

function pct(value) {
  return value === null || value === undefined ? null : value * 100;
}

/** The four charts for `model` over the last `windowS` seconds; only `rolloutId`'s
 * milestones when given, else every rollout's of the model. */
export function HealthCharts({ model, windowS, rolloutId }) {
  const [health] = usePoll(
    () => api(`/models/${encodeURIComponent(model)}/health${query({ window_s: windowS, buckets: 60 })}`),
    [model, windowS],
    10000,
  );
  if (health === null) return html`<p class="muted">Loading health of ${model}…</p>`;
  const markers = health.markers.filter((m) => !rolloutId || m.rollout_id === rolloutId);
  const reported = health.versions.some((v) => v.points.length);
  return html`<div class="charts" data-model=${model} data-window=${windowS}>
    ${reported ? null : html`<p class="muted">No telemetry from ${model} in this window.</p>`}
    ${CHARTS.map(([name, title, unit, values]) => html`<${Chart}
      key=${name}
      name=${name}
      title=${`${title} (${unit})`}
      health=${health}
      values=${values}
      markers=${markers}
      labelRollouts=${!rolloutId}
    />`)}
  </div>`;
}

function markerLabel(marker, withRollout) {
  const what = {
    create: "wave 1",
    passed: `wave ${(marker.wave ?? 0) + 1}`,
    advance: `wave ${(marker.wave ?? 0) + 1}`,
    resume: "resume",
    rollback: "rollback",
    rolled_back: "rolled back",
    complete: "complete",
    abort: "abort",
  }[marker.action] ?? marker.action;
  return withRollout ? `${marker.rollout_id.slice(0, 6)} ${what}` : what;
}

/**
 * Vertical dashed lines at the rollout milestones, labelled at the top in the first of
 * four rows where the label fits; a label that fits nowhere is left out (its line stays).
 */
const milestones = {
  id: "milestones",
  afterDatasetsDraw(chart, _args, options) {
    const { ctx, chartArea, scales } = chart;
    const rows = [-Infinity, -Infinity, -Infinity, -Infinity];
    ctx.save();
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "top";
    for (const marker of options.markers ?? []) {
      const x = scales.x.getPixelForValue(Date.parse(marker.at));
      if (x < chartArea.left || x > chartArea.right) continue;
      const stop = ["rollback", "rolled_back", "abort"].includes(marker.action);
      ctx.strokeStyle = stop ? "#dc2626" : "#6b7280";
      ctx.fillStyle = ctx.strokeStyle;
      ctx.setLineDash([4, 3]);
      ctx.beginPath();
      ctx.moveTo(x, chartArea.top);
      ctx.lineTo(x, chartArea.bottom);
      ctx.stroke();
      const label = markerLabel(marker, options.labelRollouts);
      const width = ctx.measureText(label).width;
      const left = Math.min(x + 3, chartArea.right - width);
      const row = rows.findIndex((end) => left > end + 4);
      if (row < 0) continue;
      rows[row] = left + width;
      ctx.fillText(label, left, chartArea.top + 2 + row * 13);
    }
    ctx.restore();
  },
};

/** The x axis starts at the first figure or milestone, not before the window: a fleet
 * that reported for a minute of an hour gets the whole width for that minute. */
function firstShown(health, markers) {
  const times = [
    ...health.versions.flatMap((v) => v.points.map((p) => Date.parse(p.start))),
    ...markers.map((m) => Date.parse(m.at)),
  ];
  const since = Date.parse(health.since);
  if (!times.length) return since;
  return Math.max(since, Math.min(...times) - health.bucket_s * 1000);
}

/** One dataset per version (and per figure: p50, p95), each point at its bucket's middle. */
function datasets(health, values) {
  const found = [];
  const half = (health.bucket_s * 1000) / 2;
  health.versions.forEach((version, i) => {
    const color = COLORS[i % COLORS.length];
    const series = version.points.map((p) => ({ x: Date.parse(p.start) + half, ys: values(p) }));
    const names = series[0]?.ys.map(([suffix]) => suffix) ?? values({}).map(([suffix]) => suffix);
    names.forEach((suffix, j) => {
      const data = series.map((s) => ({ x: s.x, y: s.ys[j][1] })).filter((d) => d.y !== null && d.y !== undefined);
      if (!data.length) return;
      found.push({
        label: `${version.version}${suffix}`,
        data,
        borderColor: color,
        backgroundColor: color,
        borderDash: j === 0 && names.length > 1 ? [5, 4] : [],
        pointRadius: 2,
        borderWidth: 2,
        tension: 0.2,
      });
    });
  });
  return found;
}

/** A time on the x axis (``this``: the scale), with seconds when it spans minutes. */
function tickLabel(value) {
  const seconds = this.max - this.min < 600_000 ? { second: "2-digit" } : {};
  return new Date(value).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", ...seconds, hour12: false });
}

function Chart({ name, title, health, values, markers, labelRollouts }) {
  const since = firstShown(health, markers);
  const until = Date.parse(health.until);
  const data = datasets(health, values);
  const draw = (ChartJs, canvas) => {
    const options = {
      animation: false,
      maintainAspectRatio: false,
      parsing: false,
      interaction: { mode: "nearest", intersect: false },
      scales: {
        x: {
          type: "linear",
          min: since,
          max: until,
          ticks: {
            maxTicksLimit: 7,
            callback: tickLabel,
          },
        },
        y: { beginAtZero: true },
      },
      plugins: {
        legend: { position: "bottom", labels: { boxWidth: 12 } },
        title: { display: true, text: title, align: "start" },
        milestones: { markers, labelRollouts },
        tooltip: {
          callbacks: { title: (items) => new Date(items[0].parsed.x).toLocaleString([], { hour12: false }) },
        },
      },
    };
    return new ChartJs(canvas, { type: "line", data: { datasets: data }, options, plugins: [milestones] });
  };
  const redraw = (chart) => {
    chart.data.datasets = data;
    chart.options.scales.x.min = since;
    chart.options.scales.x.max = until;
    chart.options.plugins.milestones = { markers, labelRollouts };
    chart.update("none");
  };
  const [canvas, failed] = useChart(draw, redraw, [health]);
  return html`<figure class="chart" data-chart=${name} data-series=${data.length}>
    ${failed ? html`<p class="error-text">The chart library did not load: ${failed}</p>` : null}
    ${data.length ? null : html`<p class="no-data">nothing reported in this window</p>`}
    <div class="chart-box"><canvas ref=${canvas} aria-label=${title}></canvas></div>
  </figure>`;
}
