// Drift and live accuracy of each version of a model, per cohort (device tag), over the
// last 24 h: GET /models/{name}/versions/{version}/drift and .../accuracy
// (docs/model-health.md). Drift is drawn with Chart.js against its thresholds.

import { api } from "./api.js";
import { Badge, html, percent, useChart, usePoll } from "./ui.js";

const EVERY_DEVICE = "every device";

export function ModelHealth({ model, versions }) {
  if (!versions.length) return null;
  return html`<div class="model-health">
    <h2>Drift and live accuracy (last 24 h)</h2>
    ${[...versions].reverse().map((v) => html`<${VersionHealth} key=${v} model=${model} version=${v} />`)}
  </div>`;
}

function VersionHealth({ model, version }) {
  const base = `/models/${encodeURIComponent(model)}/versions/${encodeURIComponent(version)}`;
  const [drift] = usePoll(() => api(`${base}/drift`), [model, version], 30000);
  const [accuracy] = usePoll(() => api(`${base}/accuracy`), [model, version], 30000);
  if (drift === null || accuracy === null) return null;
  const cohorts = [...(drift.overall ? [drift.overall] : []), ...drift.cohorts];
  const labelled = [...(accuracy.overall ? [accuracy.overall] : []), ...accuracy.cohorts];
  return html`<article class="version-health" data-version=${version} data-reference=${String(drift.reference)}>
    <h3>${model} ${version}</h3>
    ${!drift.reference
      ? html`<p class="muted" data-drift="none">No reference profile in this version's bundles: drift is not measured.</p>`
      : cohorts.length === 0
        ? html`<p class="muted" data-drift="empty">No drift summaries reported in this window.</p>`
        : html`<${DriftChart} cohorts=${cohorts} thresholds=${drift.thresholds} />
            <table class="drift" data-drift="cohorts">
              <thead><tr><th>Cohort</th><th>Inferences</th><th>Max PSI</th><th>Max distance</th><th>Verdict</th></tr></thead>
              <tbody>
                ${cohorts.map(
                  (c) => html`<tr key=${c.cohort} data-cohort=${c.cohort} data-verdict=${c.verdict} title=${c.reasons.join("; ")}>
                    <td>${c.cohort || EVERY_DEVICE}</td><td>${c.samples}</td>
                    <td>${figure(c.max_psi)}</td><td>${figure(c.max_distance)}</td>
                    <td><${Badge} value=${c.verdict} kind=${c.verdict === "drift" ? "failed" : c.verdict === "ok" ? "healthy" : "pending"} /></td>
                  </tr>`,
                )}
              </tbody>
            </table>`}
    ${labelled.length === 0
      ? html`<p class="muted" data-accuracy="none">No ground truth reported in this window.</p>`
      : html`<table class="accuracy" data-accuracy="cohorts">
          <thead><tr><th>Cohort</th><th>Labelled</th><th>Accuracy</th><th>95 % interval</th></tr></thead>
          <tbody>
            ${labelled.map(
              (c) => html`<tr key=${c.cohort} data-cohort=${c.cohort}>
                <td>${c.cohort || EVERY_DEVICE}</td><td>${c.labelled}</td><td>${percent(c.accuracy)}</td>
                <td>${percent(c.low)} – ${percent(c.high)}</td>
              </tr>`,
            )}
          </tbody>
        </table>`}
  </article>`;
}

function figure(value) {
  return value === null || value === undefined ? "—" : value.toFixed(3);
}

/** Max PSI and max distance per cohort as bars, each threshold a dashed line. */
function DriftChart({ cohorts, thresholds }) {
  const labels = cohorts.map((c) => c.cohort || EVERY_DEVICE);
  const datasets = [
    { type: "bar", label: "max PSI", data: cohorts.map((c) => c.max_psi), backgroundColor: "#2563eb" },
    { type: "bar", label: "max distance", data: cohorts.map((c) => c.max_distance), backgroundColor: "#9333ea" },
    threshold(`PSI threshold ${thresholds.psi}`, thresholds.psi, labels, "#2563eb"),
    threshold(`distance threshold ${thresholds.distance}`, thresholds.distance, labels, "#9333ea"),
  ];
  const draw = (ChartJs, canvas) =>
    new ChartJs(canvas, {
      type: "bar",
      data: { labels, datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: { y: { beginAtZero: true } },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
      },
    });
  const redraw = (chart) => {
    chart.data = { labels, datasets };
    chart.update("none");
  };
  const [canvas, failed] = useChart(draw, redraw, [JSON.stringify(cohorts)]);
  return html`<figure class="chart" data-chart="drift" data-cohorts=${cohorts.length}>
    ${failed ? html`<p class="error-text">The chart library did not load: ${failed}</p>` : null}
    <div class="chart-box"><canvas ref=${canvas} aria-label="drift per cohort"></canvas></div>
  </figure>`;
}

function threshold(label, value, labels, color) {
  return {
    type: "line",
    label,
    data: labels.map(() => value),
    borderColor: color,
    borderDash: [5, 4],
    borderWidth: 1,
    pointRadius: 0,
  };
}
