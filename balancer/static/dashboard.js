// balancer dashboard: polls ./status once a second and updates the page in place.
// Rows are kept between polls (keyed by pool and backend) so share bars move smoothly, and
// every name is set with textContent, never parsed as HTML.
"use strict";

const POLL_MS = 1000;
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
  const table = el("table");
  const thead = el("thead");
  const hr = el("tr");
  for (const [label, cls] of [["backend"], ["state"], ["weight", "num"], ["in flight", "num"],
      ["requests", "num"], ["errors", "num"], ["traffic share", "share-cell"]]) {
    hr.append(el("th", cls, label));
  }
  thead.append(hr);
  const tbody = el("tbody");
  table.append(thead, tbody);
  section.append(head, concentrated, discovery, panic, table);
  document.getElementById("pools").append(section);
  return {el: section, meta, badges, concentrated, discovery, panic, tbody, rows: new Map()};
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
        requests = el("td", "num"), errors = el("td", "num");
  const shareCell = el("td", "share-cell");
  const share = el("div", "share");
  const track = el("div", "share-track");
  const fill = el("div", "share-fill");
  const limit = el("div", "share-limit");
  track.append(fill, limit);
  const shareText = el("span", "share-text");
  share.append(track, shareText);
  shareCell.append(share);
  tr.append(who, state, weight, inFlight, requests, errors, shareCell);
  return {tr, url, stateText, reason, weight, inFlight, requests, errors, fill, limit, shareText};
}

function renderPool(name, p, guard) {
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
  view.concentrated.textContent = c ? `Traffic concentrated: ${c.backend} takes ${pct(c.share)} ` +
    `of the ${c.requests} requests in the last ${duration(guard.live_window)} ` +
    `(max_share ${pct(guard.max_share)} + margin ${pct(guard.live_margin)}).` : "";
  view.discovery.hidden = !p.discovery_refused;
  view.discovery.textContent = p.discovery_refused ? "DNS discovery kept the last good set: " +
    p.discovery_refused : "";
  view.panic.hidden = !p.panic;
  view.panic.textContent = p.panic ? "Panic: too few backends are healthy; traffic is spread " +
    "over all of them." : "";

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
  const seen = new Set(Object.keys(s.pools));
  for (const [name, p] of Object.entries(s.pools)) renderPool(name, p, s.guard);
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
