// What every page shares: the html template tag, the signed-in user and the error tray
// (contexts), polling, the chart library, and small components (badges, stacked bars, a
// confirmation dialog).

import { createContext, h } from "preact";
import { useCallback, useContext, useEffect, useRef, useState } from "preact/hooks";
import htm from "htm";

export const html = htm.bind(h);

let chartLibrary = null;

/** Chart.js, loaded the first time a chart is drawn (its UMD build sets globalThis.Chart). */
function loadChart() {
  chartLibrary ??= import("./vendor/chart.umd.min.js").then(() => globalThis.Chart);
  return chartLibrary;
}

/**
 * A Chart.js chart on the canvas given the returned ref: `draw(ChartJs, canvas)` makes it
 * once the library has loaded, `redraw(chart)` refreshes it whenever `deps` change, and it
 * is destroyed with the component. Returns [canvasRef, failed]: why the library did not
 * load, else null.
 *
 * Preact 11 removes an unmounted component's canvas (its ref turns null) at once but runs
 * its effect cleanups after the next paint: the canvas is taken when the effect runs, and
 * nothing is drawn on it once it has left the document (tests/test_dashboard.py).
 */
export function useChart(draw, redraw, deps) {
  const canvas = useRef(null);
  const chart = useRef(null);
  const [failed, setFailed] = useState(null);
  useEffect(() => {
    const target = canvas.current;
    let cancelled = false;
    loadChart().then(
      (ChartJs) => {
        if (cancelled || !target?.isConnected) return;
        if (chart.current) redraw(chart.current);
        else chart.current = draw(ChartJs, target);
      },
      (error) => setFailed(error.message),
    );
    return () => {
      cancelled = true;
    };
  }, deps);
  useEffect(() => () => chart.current?.destroy(), []);
  return [canvas, failed];
}

const POLL_MS = 2000;

// --- the signed-in user and the errors shown until dismissed ----------------------------

export const UserContext = createContext(null);
export const ErrorContext = createContext(null);

const RANK = { viewer: 1, operator: 2, admin: 3 };

/** Whether the signed-in user's role is at least `role`. */
export function useCan(role) {
  const user = useContext(UserContext);
  return Boolean(user) && RANK[user.role] >= RANK[role];
}

export function useReport() {
  return useContext(ErrorContext).report;
}

/** Errors with a count of repeats, kept until dismissed: a poll failing every 2 s adds one. */
export function useErrorTray() {
  const [errors, setErrors] = useState([]);
  const next = useRef(1);
  const report = useCallback((error) => {
    const message = error?.message ?? String(error);
    setErrors((list) => {
      const same = list.find((e) => e.message === message);
      if (same) return list.map((e) => (e === same ? { ...e, count: e.count + 1, at: new Date() } : e));
      return [...list, { id: next.current++, message, count: 1, at: new Date() }];
    });
  }, []);
  const dismiss = useCallback((id) => setErrors((list) => list.filter((e) => e.id !== id)), []);
  return { errors, report, dismiss };
}

export function ErrorTray({ errors, dismiss }) {
  if (!errors.length) return null;
  return html`<section class="errors" aria-live="polite">
    ${errors.map(
      (e) => html`<div class="error" role="alert" key=${e.id}>
        <span class="error-text">${e.message}</span>
        <span class="error-meta">${e.count > 1 ? `${e.count}× · last ` : ""}${clock(e.at)}</span>
        <button class="link" onClick=${() => dismiss(e.id)} aria-label="dismiss">dismiss</button>
      </div>`,
    )}
  </section>`;
}

// --- data --------------------------------------------------------------------------------

/**
 * Load `load()` now and every `intervalMs` while the page is visible (one call at a time);
 * returns [data, refresh]. Failures go to the error tray; the last data stays shown.
 */
export function usePoll(load, deps, intervalMs = POLL_MS) {
  const report = useReport();
  const [data, setData] = useState(null);
  const generation = useRef(0);
  const busy = useRef(false);
  const refresh = useCallback(async () => {
    const mine = generation.current;
    busy.current = true;
    try {
      const found = await load();
      if (mine === generation.current) setData(found);
    } catch (error) {
      if (mine === generation.current && error.status !== 401) report(error);
    } finally {
      busy.current = false;
    }
  }, deps);
  useEffect(() => {
    generation.current += 1;
    setData(null);
    refresh();
    const timer = setInterval(() => {
      if (!busy.current && document.visibilityState === "visible") refresh();
    }, intervalMs);
    return () => {
      clearInterval(timer);
      generation.current += 1;
    };
  }, [refresh]);
  return [data, refresh];
}

/** The time now, re-rendered every `everyMs`: for countdowns. */
export function useNow(everyMs = 1000) {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), everyMs);
    return () => clearInterval(timer);
  }, [everyMs]);
  return now;
}

/**
 * Once `ready`, mark "edgefleet:content" in the Performance timeline after the frame that
 * shows it was painted: the time from navigation start to content visible.
 */
export function useContentMark(ready) {
  const marked = useRef(false);
  useEffect(() => {
    if (!ready || marked.current) return;
    marked.current = true;
    requestAnimationFrame(() => setTimeout(() => performance.mark("edgefleet:content"), 0));
  }, [ready]);
}

// --- components ---------------------------------------------------------------------------

export function Badge({ value, kind = value }) {
  return html`<span class=${`badge badge-${kind}`}>${String(value).replaceAll("_", " ")}</span>`;
}

/** A horizontal bar of `parts` ({name, count, label}) with a legend of the non-zero ones. */
export function StackedBar({ parts, total, label }) {
  const shown = parts.filter((p) => p.count > 0);
  return html`<div class="stacked">
    <div class="bar" role="img" aria-label=${label}>
      ${shown.map(
        (p) => html`<span
          class=${`seg seg-${p.name}`}
          style=${{ flexGrow: p.count }}
          title=${`${p.count} ${p.label}`}
        ></span>`,
      )}
      ${total === 0 ? html`<span class="seg seg-empty" style=${{ flexGrow: 1 }}></span>` : null}
    </div>
    <ul class="legend">
      ${shown.map(
        (p) => html`<li data-part=${p.name}><i class=${`dot seg-${p.name}`}></i>${p.count} ${p.label}</li>`,
      )}
    </ul>
  </div>`;
}

/**
 * A modal asking to confirm `title`; with `withReason`, a reason field whose text is
 * passed to `onConfirm`. Escape or Cancel closes it.
 */
export function Confirm({ title, children, confirmLabel, danger = false, withReason = false, onConfirm, onClose }) {
  const dialog = useRef(null);
  const [reason, setReason] = useState("");
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    dialog.current?.showModal();
  }, []);
  const confirm = async (event) => {
    event.preventDefault();
    setBusy(true);
    try {
      await onConfirm(reason.trim());
    } finally {
      setBusy(false);
      onClose();
    }
  };
  return html`<dialog ref=${dialog} class="confirm" onClose=${onClose} aria-label=${title}>
    <form method="dialog" onSubmit=${confirm}>
      <h3>${title}</h3>
      <div class="confirm-body">${children}</div>
      ${withReason
        ? html`<label class="field">Reason (audit log)
            <input name="reason" maxlength="2000" value=${reason} onInput=${(e) => setReason(e.target.value)} />
          </label>`
        : null}
      <div class="buttons">
        <button type="button" onClick=${onClose}>Cancel</button>
        <button type="submit" class=${danger ? "danger" : "primary"} disabled=${busy}>${confirmLabel}</button>
      </div>
    </form>
  </dialog>`;
}

export function Empty({ children }) {
  return html`<p class="empty">${children}</p>`;
}

// --- formatting ---------------------------------------------------------------------------

export function clock(value) {
  if (!value) return "";
  return new Date(value).toLocaleTimeString([], { hour12: false });
}

export function when(value) {
  if (!value) return "—";
  const date = new Date(value);
  return date.toLocaleString([], { hour12: false, year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function ago(value, now = Date.now()) {
  if (!value) return "never";
  return `${duration((now - new Date(value).getTime()) / 1000)} ago`;
}

export function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function count(n, noun) {
  return `${n.toLocaleString("en")} ${noun}${n === 1 ? "" : "s"}`;
}

export function percent(value, digits = 1) {
  return value === null || value === undefined ? "—" : `${(value * 100).toFixed(digits)} %`;
}

export function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

/** "Wave 2 · canary" or "Wave 3 · 50 %": waves are counted from 1 on screen. */
export function waveName(index, label) {
  const shown = label === undefined ? "" : /^[0-9.]+$/.test(label) ? ` · ${label} %` : ` · ${label}`;
  return `Wave ${index + 1}${shown}`;
}
