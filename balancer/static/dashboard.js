// balancer dashboard: polls ./status once a second and updates the page in place.
// Rows are kept between polls (keyed by pool and backend) so share bars move smoothly, and
// every name is set with textContent, never parsed as HTML.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const CHART_H = 150;                   // the chart's height; its width is the page's
const SMOOTH = 3;                      // samples each plotted share is taken over
const LABEL_PX = 7;                    // a mark label's width per character (11 px semibold)
const COLOURS = ["#3b7ddd", "#e8590c", "#2f9e44", "#ae3ec9", "#f08c00", "#1098ad",
                 "#d6336c", "#5c7cfa", "#74b816", "#868e96"];
const RESULTS = {applied: "applied", refused: "refused", kept: "kept",
                 rolled_back: "rolled back"};
const pools = new Map();   // pool name -> {el, rows: Map(backend name -> row)}
let status = null;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function pct(x) { return +(x * 100).toFixed(1) + "%"; }

function duration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
        m = Math.floor(s % 3600 / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function clock(iso) { return iso ? new Date(iso).toLocaleTimeString() : "–"; }

function latency(p99) {
  if (p99 === null || p99 === undefined) return "–";
  if (p99 === "+Inf") return "> 30 s";
  return p99 < 1 ? `≤ ${+(p99 * 1000).toFixed(1)} ms` : `≤ ${p99} s`;
}

function makeChart() {
  const fig = el("figure", "chart");
  const plot = svg("svg", {role: "img",
                           "aria-label": "traffic share per backend over the live window"});
  const legend = el("ul", "legend");
  const axis = el("div", "axis");
  fig.append(plot, axis, legend);
  return {fig, plot, legend, axis};
}

// Each backend's share per sample, over the last SMOOTH samples (null where there was none).
function shares(h) {
  const names = Object.keys(h.backends);
  const out = Object.fromEntries(names.map(n => [n, []]));
  for (let i = 0; i < h.t.length; i++) {
    let total = 0;
    const sums = {};
    for (const n of names) {
      let sum = 0;
      for (let j = Math.max(0, i - SMOOTH + 1); j <= i; j++) sum += h.backends[n][j] || 0;
      sums[n] = sum;
      total += sum;
    }
    for (const n of names) out[n].push(total ? sums[n] / total : null);
  }
  return out;
}

function renderChart(chart, h, guard, events) {
  // Drawn in the chart's own pixels (the viewBox follows its width), so text never stretches.
  const CHART_W = Math.max(200, Math.round(chart.plot.getBoundingClientRect().width) || 800);
  chart.plot.setAttribute("viewBox", `0 0 ${CHART_W} ${CHART_H}`);
  const end = h.end, start = end - guard.live_window;
  const x = t => ((t - start) / guard.live_window * CHART_W).toFixed(1);
  const y = v => ((1 - v) * (CHART_H - 4) + 2).toFixed(1);
  const nodes = [];
  for (const v of [0, 0.5, 1]) {
    nodes.push(svg("line", {class: "grid", x1: 0, x2: CHART_W, y1: y(v), y2: y(v)}));
  }
  nodes.push(svg("line", {class: "limit", x1: 0, x2: CHART_W,
                          y1: y(guard.max_share), y2: y(guard.max_share)}));
  // Each mark's label sits right of its line, or left of it where it would run off the chart;
  // labels close together (an apply and its rollback half a second later) take the next row
  // down instead of overlapping; every label is drawn after every line, on a halo of the
  // chart's background, so no mark's line crosses another's text.
  const rowEnds = [], labels = [];
  for (const e of events) {
    if (e.t < start || e.t > end) continue;
    const at = +x(e.t), name = RESULTS[e.result] || e.result;
    const hover = `reload ${name} at ${clock(e.at)}` + (e.reason ? `: ${e.reason}` : "");
    const g = svg("g", {class: "reload-mark " + e.result});
    g.dataset.result = e.result;
    g.append(svg("line", {x1: at, x2: at, y1: 0, y2: CHART_H}), svg("title"));
    g.lastChild.textContent = hover;
    nodes.push(g);
    const wide = LABEL_PX * name.length;
    const left = at + 4 + wide > CHART_W ? at - 4 - wide : at + 4;
    let row = rowEnds.findIndex(last => left - last > 6);
    if (row < 0) row = rowEnds.length;
    rowEnds[row] = left + wide;
    const label = svg("text", {class: "reload-label " + e.result, x: left.toFixed(1),
                               y: 12 + 13 * (row % 6)});
    label.append(name, svg("title"));
    label.lastChild.textContent = hover;
    labels.push(label);
  }
  nodes.push(...labels);
  const series = shares(h);
  chart.legend.replaceChildren();
  Object.entries(series).forEach(([name, values], i) => {
    const colour = COLOURS[i % COLOURS.length];
    let d = "", pen = "M", last = null;
    values.forEach((v, j) => {
      if (v === null || h.t[j] < start) { pen = "M"; return; }
      d += `${pen}${x(h.t[j])},${y(v)}`;
      pen = "L";
      last = v;
    });
    const path = svg("path", {class: "series", d, stroke: colour});
    path.dataset.backend = name;
    path.dataset.last = last === null ? "" : last.toFixed(4);
    nodes.push(path);
    const item = el("li");
    item.dataset.backend = name;
    const swatch = el("span", "swatch");
    swatch.style.background = colour;
    item.append(swatch, name, el("span", "legend-share", last === null ? "" : " " + pct(last)));
    chart.legend.append(item);
  });
  chart.plot.replaceChildren(...nodes);
  chart.axis.textContent = `${clock(new Date(start * 1000).toISOString())} – ` +
    `${clock(new Date(end * 1000).toISOString())} · 0–100% of the pool's requests`;
}

function makePool(name) {
  const section = el("section", "pool");
  section.dataset.pool = name;
  const head = el("div", "pool-head");
  head.append(el("h2", null, name));
  const meta = el("span", "meta");
  const badges = el("span", "badges");
  head.append(meta, badges);
  const concentrated = el("p", "alert concentrated");
  concentrated.hidden = true;
  const panic = el("p", "alert panic");
  panic.hidden = true;
  const discovery = el("p", "alert discovery");
  discovery.hidden = true;
  const chart = makeChart();
  const table = el("table");
  const thead = el("thead");
  const hr = el("tr");
  for (const [label, cls] of [["backend"], ["state"], ["weight", "num"], ["in flight", "num"],
      ["requests", "num"], ["p99", "num"], ["errors", "num"], ["traffic share", "share-cell"]]) {
    hr.append(el("th", cls, label));
  }
  thead.append(hr);
  const tbody = el("tbody");
  table.append(thead, tbody);
  section.append(head, concentrated, discovery, panic, chart.fig, table);
  document.getElementById("pools").append(section);
  return {el: section, meta, badges, concentrated, discovery, panic, chart, tbody,
          rows: new Map()};
}

function makeRow(pool, name) {
  const tr = el("tr", "backend");
  tr.dataset.pool = pool;
  tr.dataset.backend = name;
  const who = el("td");
  const label = el("strong", null, name);
  const url = el("span", "url");
  who.append(label, url);
  const state = el("td");
  const stateText = el("span", "state");
  const reason = el("span", "reason");
  state.append(stateText, reason);
  const weight = el("td", "num"), inFlight = el("td", "num"),
        requests = el("td", "num"), p99 = el("td", "num p99"), errors = el("td", "num");
  const shareCell = el("td", "share-cell");
  const share = el("div", "share");
  const track = el("div", "share-track");
  const fill = el("div", "share-fill");
  const limit = el("div", "share-limit");
  track.append(fill, limit);
  const shareText = el("span", "share-text");
  share.append(track, shareText);
  shareCell.append(share);
  tr.append(who, state, weight, inFlight, requests, p99, errors, shareCell);
  return {tr, url, stateText, reason, weight, inFlight, requests, p99, errors, fill, limit,
          shareText};
}

function renderPool(name, p, guard, events) {
  let view = pools.get(name);
  if (!view) { view = makePool(name); pools.set(name, view); }
  const up = p.backends.filter(b => b.state === "up").length;
  view.meta.textContent = `${p.strategy} · ${up}/${p.backends.length} up · ` +
    `${p.in_flight} in flight · ${p.waiting} waiting · ` +
    `${p.window_requests} requests in window · rejected: ` +
    Object.entries(p.rejected).map(([k, v]) => `${k} ${v}`).join(", ");
  view.badges.replaceChildren();
  if (p.panic) view.badges.append(el("span", "badge panic", "PANIC"));
  if (p.concentrated || p.discovery_refused) {
    view.badges.append(el("span", "badge concentrated", "CONCENTRATED"));
  }

  const c = p.concentrated;
  view.concentrated.hidden = !c;
  // Too few in rotation (health checks, ejection) says its own cause, in the log's words.
  view.concentrated.textContent = !c ? "" : c.cause === "rotation"
    ? `Traffic concentrated: ${c.reason.replace(/^pool [^:]+: /, "")}.`
    : `Traffic concentrated: ${c.backend} takes ${pct(c.share)} ` +
      `of the ${c.requests} requests in the last ${duration(guard.live_window)} ` +
      `(max_share ${pct(guard.max_share)} + margin ${pct(guard.live_margin)}).`;
  view.discovery.hidden = !p.discovery_refused;
  view.discovery.textContent = p.discovery_refused ? "DNS discovery kept the last good set: " +
    p.discovery_refused : "";
  view.panic.hidden = !p.panic;
  view.panic.textContent = p.panic ? "Panic: too few backends are healthy; traffic is spread " +
    "over all of them." : "";
  if (p.history) renderChart(view.chart, p.history, guard, events);

  const seen = new Set();
  p.backends.forEach((b, i) => {
    seen.add(b.name);
    let row = view.rows.get(b.name);
    if (!row) { row = makeRow(name, b.name); view.rows.set(b.name, row); }
    if (view.tbody.children[i] !== row.tr) view.tbody.insertBefore(row.tr, view.tbody.children[i] || null);
    row.tr.dataset.state = b.state;
    row.url.textContent = b.url;
    row.stateText.className = "state " + b.state;
    row.stateText.textContent = b.state;
    row.reason.textContent = b.state === "down" ? b.health_reason : "";
    row.weight.textContent = b.weight;
    row.inFlight.textContent = b.max_connections ? `${b.in_flight} / ${b.max_connections}` : b.in_flight;
    row.requests.textContent = b.requests.toLocaleString();
    row.p99.textContent = latency(b.p99);
    row.p99.dataset.p99 = b.p99 ?? "";
    row.p99.title = "p99 upstream latency over the live window (upper bound of its bucket)";
    row.errors.textContent = b.errors.toLocaleString();
    row.fill.style.width = (b.share * 100).toFixed(1) + "%";
    row.fill.dataset.share = b.share;
    row.fill.classList.toggle("hot", !!(c && c.backend === b.name));
    row.limit.style.left = `calc(${(guard.max_share * 100).toFixed(1)}% - 1px)`;
    row.shareText.textContent = pct(b.share);
  });
  for (const [bname, row] of view.rows) {
    if (!seen.has(bname)) { row.tr.remove(); view.rows.delete(bname); }
  }
}

function render(s) {
  status = s;
  document.getElementById("uptime").textContent = duration(s.uptime);
  document.getElementById("reloads-applied").textContent = s.reloads.applied ?? 0;
  document.getElementById("reloads-refused").textContent = s.reloads.refused ?? 0;
  document.getElementById("window").textContent = duration(s.guard.live_window);
  renderRunning(s);
  const seen = new Set(Object.keys(s.pools));
  const events = s.reload_events || [];
  for (const [name, p] of Object.entries(s.pools)) renderPool(name, p, s.guard, events);
  for (const [name, view] of pools) {
    if (!seen.has(name)) { view.el.remove(); pools.delete(name); }
  }
  const order = Object.keys(s.pools);
  const main = document.getElementById("pools");
  order.forEach((name, i) => {
    const node = pools.get(name).el;
    if (main.children[i] !== node) main.insertBefore(node, main.children[i] || null);
  });
}

// The header's "what runs": config sha and when applied, the last reload, a probation, and
// a banner while the last reload is one that was rolled back.
function renderRunning(s) {
  const sha = document.getElementById("config-sha");
  sha.textContent = s.config_sha256 ? s.config_sha256.slice(0, 12) : "–";
  sha.title = s.config_sha256 ? "sha256 " + s.config_sha256 + " (GET /config)" : "";
  document.getElementById("config-applied").textContent = clock(s.config_applied_at);
  const last = s.last_reload, lastEl = document.getElementById("last-reload");
  lastEl.textContent = last ? `${RESULTS[last.result] || last.result} ${clock(last.at)}` : "none";
  lastEl.className = last ? "result " + last.result : "";
  lastEl.dataset.result = last ? last.result : "";
  lastEl.title = last && last.reason ? last.reason : "";
  const p = s.probation;
  document.getElementById("probation-box").hidden = !p;
  document.getElementById("probation").textContent = p ?
    `${p.pools.join(", ") || "all pools"} · ${Math.ceil(p.remaining)}s left` : "";
  const banner = document.getElementById("rollback-banner");
  const rolled = !!last && last.result === "rolled_back";
  banner.hidden = !rolled;
  banner.textContent = rolled ? `The last reload was ROLLED BACK at ${clock(last.at)}: ` +
    `${last.reason || "no reason given"}. The previous config runs again` +
    (s.config_sha256 ? ` (sha256 ${s.config_sha256.slice(0, 12)}).` : ".") : "";
}

async function poll() {
  const conn = document.getElementById("connection");
  try {
    const resp = await fetch("status", {cache: "no-store"});
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
    conn.className = "connection ok";
    conn.textContent = "live · " + new Date().toLocaleTimeString();
  } catch (err) {
    conn.className = "connection lost";
    conn.textContent = "cannot reach /status: " + err.message;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
