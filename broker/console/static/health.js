// Health, as pictures: small live charts from /metrics (Prometheus text),
// sampled every SAMPLE_MS while the tab is shown, over the last WINDOW_MS.
// Counters become rates between two samples; a counter that went down (a
// daemon restart, or another gateway process answered) starts over with no
// point rather than a spike. Drawn as SVG polylines, with the last value as
// text next to each chart (what a screen reader reads).

import { $, clear } from "./dom.js";

const SAMPLE_MS = 1000;
const WINDOW_MS = 5 * 60 * 1000;
const SVG = "http://www.w3.org/2000/svg";
const MIN_SPAN_MS = 10 * 1000;
const WIDTH = 300;
const HEIGHT = 80;

/** {name: [{labels: {...}, value}]} from the Prometheus text format. */
export function parseMetrics(text) {
  const series = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    if (match[3]) {
      for (const pair of match[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[pair[1]] = pair[2];
      }
    }
    (series[match[1]] ||= []).push({ labels, value: Number(match[4]) });
  }
  return series;
}

function total(series, name, filter = () => true) {
  const rows = series[name];
  if (!rows) return null;
  return rows.filter((row) => filter(row.labels)).reduce((sum, row) => sum + row.value, 0);
}

/** Buckets [{le, count}] (cumulative) of a histogram, sorted by bound. */
function buckets(series, name) {
  return (series[`${name}_bucket`] || [])
    .map((row) => ({ le: row.labels.le === "+Inf" ? Infinity : Number(row.labels.le),
      count: row.value }))
    .sort((a, b) => a.le - b.le);
}

/** The q-quantile of the observations between two cumulative bucket snapshots. */
export function quantile(before, after, q) {
  const counts = after.map((bucket, i) => bucket.count - (before[i]?.count || 0));
  const seen = counts[counts.length - 1];
  if (!seen || seen <= 0) return null;
  const rank = q * seen;
  for (let i = 0; i < counts.length; i++) {
    if (counts[i] >= rank) {
      const upper = after[i].le;
      const lower = i === 0 ? 0 : after[i - 1].le;
      if (upper === Infinity) return lower;
      const below = i === 0 ? 0 : counts[i - 1];
      const inBucket = counts[i] - below;
      return inBucket > 0 ? lower + (upper - lower) * ((rank - below) / inBucket) : upper;
    }
  }
  return null;
}

// How each chart is made from two consecutive samples (a, b: parsed, dt: seconds).
const CHARTS = [
  { id: "sends", title: "Sends/s", unit: "/s",
    value: (a, b, dt) => rate(a, b, dt, "broker_writer_messages_total") },
  { id: "deliveries", title: "Deliveries/s", unit: "/s",
    value: (a, b, dt) => rate(a, b, dt, "broker_writer_deliveries_total") },
  { id: "batch", title: "Writer batch size", unit: "",
    value: (a, b) => {
      const count = delta(a, b, "broker_writer_batch_size_count");
      const sum = delta(a, b, "broker_writer_batch_size_sum");
      return count && count > 0 ? sum / count : null;
    } },
  { id: "commit", title: "Commit latency p99", unit: "ms",
    value: (a, b) => {
      const value = quantile(buckets(a, "broker_writer_commit_seconds"),
        buckets(b, "broker_writer_commit_seconds"), 0.99);
      return value === null ? null : value * 1000;
    } },
  { id: "sessions", title: "Open sessions", unit: "",
    value: (a, b) => total(b, "broker_open_sessions") },
  { id: "pending", title: "Pending deliveries", unit: "",
    value: (a, b) => total(b, "broker_pending_deliveries") },
];

function delta(a, b, name) {
  const before = total(a, name);
  const after = total(b, name);
  if (before === null || after === null || after < before) return null;
  return after - before;
}

function rate(a, b, dt, name) {
  const change = delta(a, b, name);
  return change === null || dt <= 0 ? null : change / dt;
}

function spanText(ms) {
  const seconds = Math.round(ms / 1000);
  return seconds < 120 ? `${seconds} s` : `${Math.round(seconds / 60)} min`;
}

function format(value, unit) {
  if (value === null || value === undefined) return "—";
  const digits = Math.abs(value) >= 100 || Number.isInteger(value) ? 0 : 1;
  return `${value.toFixed(digits)}${unit ? ` ${unit}` : ""}`;
}

export class HealthView {
  constructor() {
    this.points = Object.fromEntries(CHARTS.map((c) => [c.id, []]));
    this.previous = null;
    this.timer = null;
    this.built = false;
  }

  show() {
    if (!this.built) this.build();
    this.sample();
    clearInterval(this.timer);
    this.timer = setInterval(() => this.sample(), SAMPLE_MS);
  }

  hide() {
    clearInterval(this.timer);
    this.previous = null; // a gap, not a rate over the hidden time
  }

  stop() {
    this.hide();
  }

  build() {
    const box = clear($("charts"));
    for (const chart of CHARTS) {
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
      svg.setAttribute("preserveAspectRatio", "none");
      svg.setAttribute("aria-hidden", "true");
      const base = document.createElementNS(SVG, "line");
      base.setAttribute("class", "base");
      base.setAttribute("x1", "0");
      base.setAttribute("x2", String(WIDTH));
      base.setAttribute("y1", String(HEIGHT - 0.5));
      base.setAttribute("y2", String(HEIGHT - 0.5));
      const area = document.createElementNS(SVG, "polygon");
      area.setAttribute("class", "area");
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", "line");
      svg.append(base, area, line);
      const figure = document.createElement("figure");
      figure.className = "chart";
      figure.dataset.chart = chart.id;
      const caption = document.createElement("figcaption");
      const title = document.createElement("span");
      title.textContent = chart.title;
      const value = document.createElement("output");
      value.className = "value";
      value.textContent = "—";
      const scale = document.createElement("span");
      scale.className = "scale";
      caption.append(title, value);
      figure.append(caption, svg, scale);
      box.append(figure);
    }
    this.built = true;
  }

  async sample() {
    let text;
    try {
      const response = await fetch("/metrics", { cache: "no-store", credentials: "omit" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      text = await response.text();
    } catch (error) {
      this.previous = null;
      return;
    }
    const now = Date.now();
    const current = { at: now, series: parseMetrics(text) };
    if (this.previous) {
      const dt = (now - this.previous.at) / 1000;
      for (const chart of CHARTS) {
        const points = this.points[chart.id];
        points.push({ at: now, value: chart.value(this.previous.series, current.series, dt) });
        while (points.length && points[0].at < now - WINDOW_MS) points.shift();
      }
      this.draw(now);
    }
    this.previous = current;
  }

  draw(now) {
    for (const chart of CHARTS) {
      const figure = document.querySelector(`figure[data-chart="${chart.id}"]`);
      if (!figure) continue;
      const points = this.points[chart.id];
      const known = points.filter((p) => p.value !== null);
      const top = Math.max(1, ...known.map((p) => p.value)) * 1.1;
      // Until the window is full, the history there is fills the width.
      const span = Math.max(MIN_SPAN_MS, Math.min(WINDOW_MS, now - (points[0]?.at ?? now)));
      const coords = known.map((p) => {
        const x = WIDTH - ((now - p.at) / span) * WIDTH;
        const y = HEIGHT - (p.value / top) * HEIGHT;
        return `${x.toFixed(1)},${y.toFixed(1)}`;
      });
      figure.querySelector("polyline").setAttribute("points", coords.join(" "));
      const area = coords.length
        ? `${coords[0].split(",")[0]},${HEIGHT} ${coords.join(" ")} ${coords[coords.length - 1].split(",")[0]},${HEIGHT}`
        : "";
      figure.querySelector("polygon").setAttribute("points", area);
      const last = points.length ? points[points.length - 1].value : null;
      figure.querySelector("output").textContent = format(last, chart.unit);
      figure.querySelector(".scale").textContent =
        `max ${format(top / 1.1, chart.unit)} · last ${spanText(span)}`;
    }
  }
}
