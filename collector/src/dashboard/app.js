// outflow's dashboard: polls the collector's /api every INTERVAL_MS and draws what it answers.
// Plain JavaScript, no library: served by the collector itself, it works offline.
"use strict";

const INTERVAL_MS = 2000;
const COLORS = ["#4fb3ff", "#ff6b6b", "#ffb454", "#7bd88f", "#c792ea", "#f78c6c", "#89ddff", "#e6db74", "#ff79c6", "#a3be8c"];
const OTHERS = "#3a4652";
const CLIENT_GROUPS = ["client-address", "client-id", "client-prefix", "peer", "host", "workload"];

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("outflow-token") || "", refreshes: 0, busy: false };
window.outflow = state; // for the tests: how many refreshes drew the page

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
}

function time(ms, withDate) {
  const d = new Date(Number(ms));
  const hm = d.toISOString().slice(11, 16);
  return withDate ? d.toISOString().slice(5, 10) + " " + hm : hm;
}

function ago(ms, endMs) {
  const s = Math.max(0, Math.round((endMs - ms) / 1000));
  if (s < 90) return s + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

class Unauthorized extends Error {}

async function api(path) {
  const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) throw new Unauthorized();
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

// Segmented buttons: the chosen value is the element's data-value.
function segment(id, onChange) {
  const el = $(id);
  const mark = () => el.querySelectorAll("button").forEach((b) => b.classList.toggle("on", b.dataset.v === el.dataset.value));
  el.addEventListener("click", (e) => {
    if (e.target.dataset.v) { el.dataset.value = e.target.dataset.v; mark(); onChange(); }
  });
  mark();
}

function route() {
  const m = location.hash.match(/^#\/client\/([^/]+)\/(.+)$/);
  return m ? { page: "client", group: m[1], key: decodeURIComponent(m[2]) } : { page: "overview" };
}

function clientLink(group, key) {
  if (!CLIENT_GROUPS.includes(group)) return esc(key);
  return `<a href="#/client/${group}/${encodeURIComponent(key)}">${esc(key)}</a>`;
}

// A stacked area chart of series (each {bytes: [...]}) over common buckets, into el.
function chart(el, start, bucketMs, layers, opts) {
  const W = 1000, H = opts.height || 240, L = opts.bare ? 0 : 64, B = opts.bare ? 2 : 22, T = opts.bare ? 2 : 8;
  const n = layers.length ? layers[0].bytes.length : 0;
  const totals = Array.from({ length: n }, (_, i) => layers.reduce((s, l) => s + (l.bytes[i] || 0), 0));
  const max = Math.max(1, ...totals);
  // Each bucket is a step of its width: a minute with bytes next to minutes without is a
  // column, not a peak drawn through its neighbours.
  const x = (i) => L + (n < 1 ? 0 : (i * (W - L - 4)) / n);
  const y = (v) => T + (H - T - B) * (1 - v / max);
  let svg = `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" data-buckets="${n}" data-nonzero="${totals.filter((t) => t > 0).length}">`;
  if (!opts.bare) {
    for (let k = 0; k <= 4; k++) {
      const v = (max * k) / 4;
      svg += `<line class="axis" x1="${L}" x2="${W}" y1="${y(v)}" y2="${y(v)}"/><text x="${L - 6}" y="${y(v) + 4}" text-anchor="end">${bytes(v)}</text>`;
    }
    const every = Math.max(1, Math.ceil(n / 8));
    for (let i = 0; i < n; i += every) {
      const anchor = i === 0 ? "start" : i > n - 1 - every / 2 ? "end" : "middle";
      svg += `<text x="${x(i)}" y="${H - 6}" text-anchor="${anchor}">${time(start + i * bucketMs, opts.withDate || bucketMs >= 3600000)}</text>`;
    }
  }
  const base = new Array(n).fill(0);
  layers.forEach((l) => {
    const top = base.map((b, i) => b + (l.bytes[i] || 0));
    let d = `M${x(0)},${y(top[0])}`;
    for (let i = 0; i < n; i++) d += ` L${x(i)},${y(top[i])} L${x(i + 1)},${y(top[i])}`;
    for (let i = n - 1; i >= 0; i--) d += ` L${x(i + 1)},${y(base[i])} L${x(i)},${y(base[i])}`;
    svg += `<path d="${d} Z" fill="${l.color}" fill-opacity="0.85" data-key="${esc(l.key || "")}"><title>${esc(l.key || "")}</title></path>`;
    top.forEach((t, i) => { base[i] = t; });
  });
  if (opts.marker != null && n > 1) {
    const i = Math.round((opts.marker - start) / bucketMs);
    if (i >= 0 && i < n) svg += `<line x1="${x(i)}" x2="${x(i)}" y1="${T}" y2="${H - (opts.bare ? 0 : B)}" stroke="#ff6b6b" stroke-dasharray="4 3"/>`;
  }
  el.innerHTML = svg + "</svg>";
}

function card(label, value, cls) {
  return `<div class="card ${cls || ""}"><div class="l">${esc(label)}</div><div class="v">${value}</div></div>`;
}

// An alert's card; `where` makes the ids of its chart unique on the page.
function alertHtml(a, endMs, where) {
  const cls = `alert ${a.open ? "open" : "resolved"} ${esc(a.severity)}`;
  const ev = [
    ["observed", bytes(a.observed_bytes) + ` in ${Math.round(a.window_seconds / 60)} min`],
    a.threshold_bytes ? ["threshold", bytes(a.threshold_bytes)] : null,
    a.baseline_bytes ? ["baseline", bytes(a.baseline_bytes)] : null,
    a.peak_bytes ? ["peak", bytes(a.peak_bytes)] : null,
    a.members ? ["members", a.members] : null,
    ["first seen", time(a.first_seen_ms, true)],
    ["last seen", ago(a.last_seen_ms, endMs) + " ago"],
    a.hosts.length ? ["hosts", a.hosts.map(esc).join(", ")] : null,
    a.peers.length ? ["via", a.peers.map(esc).join(", ")] : null,
    a.client_addrs.length ? ["from", a.client_addrs.map(esc).join(", ")] : null,
  ].filter(Boolean).map(([k, v]) => `<span>${k} <b>${v}</b></span>`).join("");
  const key = a.group ? clientLink(a.group, a.key) : esc(a.key);
  const id = sparkId(a, where);
  return `<div class="${cls}" data-key="${esc(a.key)}" data-group="${esc(a.group || "")}" data-detector="${esc(a.detector)}">
    <div class="head"><span class="det">${esc(a.detector)}</span><span class="key">${key}</span><span class="state">${a.open ? "open" : "resolved"} · ${esc(a.severity)}</span></div>
    <div class="summary">${esc(a.summary)}</div><div class="evidence">${ev}</div>${a.series ? `<div id="${id}"></div>` : ""}</div>`;
}

function sparkId(a, where) {
  return `spark-${where}-` + a.id.replace(/[^a-zA-Z0-9_-]/g, "_");
}

function drawSparks(list, where) {
  list.forEach((a) => {
    if (!a.series) return;
    const el = document.getElementById(sparkId(a, where));
    if (el) chart(el, a.series.start_ms, a.series.bucket_ms, [{ bytes: a.series.bytes, color: "#ffb454", key: a.key }], { height: 46, bare: true, marker: a.first_seen_ms });
  });
}

async function drawOverview() {
  const group = $("stack-group").value, range = $("range").dataset.value;
  const topGroup = $("top-group").value, win = $("window").dataset.value;
  const [ov, top, al] = await Promise.all([
    api(`/api/overview?range=${range}&group=${group}&top=5`),
    api(`/api/top?group=${topGroup}&window=${win}&limit=20`),
    api("/api/alerts?limit=30"),
  ]);
  $("cards").innerHTML =
    card(`response bytes, last ${{ "10m": "10 min", "1h": "hour", "24h": "day", "7d": "week" }[range]}`, bytes(ov.fleet_bytes)) +
    card("hosts", ov.hosts) +
    card("client addresses", ov.keys["client-address"]) +
    card("client ids", ov.keys["client-id"]) +
    card("alerts open", ov.alerts_open, ov.alerts_open ? "alerting" : "") +
    card("newest batch", ov.end_ms ? time(ov.end_ms, true) : "none yet");
  const layers = ov.stack.map((s, i) => ({ key: s.key, bytes: s.series.bytes, color: COLORS[i % COLORS.length] }));
  const others = ov.fleet.bytes.map((b, i) => Math.max(0, b - layers.reduce((s, l) => s + (l.bytes[i] || 0), 0)));
  const all = layers.concat([{ key: "everyone else", bytes: others, color: OTHERS }]);
  // Per minute over any range; dates on the axis beyond an hour.
  chart($("chart"), ov.fleet.start_ms, ov.fleet.bucket_ms, all, { withDate: ov.fleet.bytes.length > 60 });
  $("legend").innerHTML = all.map((l) => `<span style="--c:${l.color}">${l.key === "everyone else" ? "everyone else" : clientLink(group, l.key)}</span>`).join("");

  const max = Math.max(1, ...top.talkers.map((t) => t.response_bytes));
  const sum = top.talkers.reduce((s, t) => s + t.response_bytes, 0) || 1;
  $("top").querySelector("tbody").innerHTML = top.talkers.length
    ? top.talkers.map((t) => `<tr data-key="${esc(t.key)}"><td class="key">${clientLink(topGroup, t.key)}</td>
        <td class="num"><span class="bar" style="width:${Math.round((60 * t.response_bytes) / max)}px"></span>${bytes(t.response_bytes)}</td>
        <td class="num">${bytes(t.request_bytes)}</td><td class="num">${t.connections_closed}</td><td class="num">${t.hosts}</td>
        <td class="num">${((100 * t.response_bytes) / sum).toFixed(1)}%</td></tr>`).join("")
    : `<tr><td colspan="6" class="empty">no traffic in this window</td></tr>`;

  const open = al.alerts.filter((a) => a.open).length;
  $("alert-count").textContent = `${open} open, ${al.alerts.length - open} resolved`;
  $("alerts").innerHTML = al.alerts.length ? al.alerts.map((a) => alertHtml(a, al.end_ms, "fleet")).join("") : `<div class="empty">no alerts</div>`;
  drawSparks(al.alerts, "fleet");
}

async function drawClient(r) {
  const c = await api(`/api/client?group=${encodeURIComponent(r.group)}&key=${encodeURIComponent(r.key)}`);
  $("client-title").textContent = `${r.group} ${c.key}`;
  $("client-cards").innerHTML = c.windows.map((w) => card(`last ${w.window}: response`, bytes(w.response_bytes))).join("") +
    card("hosts (24 h)", c.hosts.length) + card("alerts", c.alerts.length, c.alerts.some((a) => a.open) ? "alerting" : "");
  const range = $("client-range").dataset.value, s = c.series[range];
  const firstAlert = c.alerts.length ? Math.min(...c.alerts.map((a) => a.first_seen_ms)) : null;
  chart($("client-chart"), s.start_ms, s.bucket_ms, [{ key: c.key, bytes: s.bytes, color: COLORS[0] }], { marker: firstAlert });
  $("client-hosts").innerHTML = c.hosts.map((h) => `<li>${clientLink("host", h)}</li>`).join("") || `<li class="empty">none</li>`;
  $("client-alerts").innerHTML = c.alerts.length ? c.alerts.map((a) => alertHtml(a, c.end_ms, "client")).join("") : `<div class="empty">no alerts</div>`;
  drawSparks(c.alerts, "client");
}

async function refresh() {
  if (state.busy) return;
  state.busy = true;
  const r = route();
  $("overview-page").hidden = r.page !== "overview";
  $("client-page").hidden = r.page !== "client";
  try {
    if (r.page === "client") await drawClient(r); else await drawOverview();
    $("login").hidden = true;
    $("status").className = "status live";
    $("status").textContent = "live · " + new Date().toLocaleTimeString();
    state.refreshes++;
  } catch (e) {
    if (e instanceof Unauthorized) {
      $("login").hidden = false;
      $("overview-page").hidden = true;
      $("client-page").hidden = true;
      $("status").className = "status down";
      $("status").textContent = "read token needed";
    } else {
      $("status").className = "status down";
      $("status").textContent = "collector: " + e.message;
    }
  } finally {
    state.busy = false;
  }
}

$("interval").textContent = INTERVAL_MS / 1000;
$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem("outflow-token", state.token);
  refresh();
});
["stack-group", "top-group"].forEach((id) => $(id).addEventListener("change", refresh));
segment("range", refresh);
segment("window", refresh);
segment("client-range", refresh);
window.addEventListener("hashchange", refresh);
refresh();
setInterval(refresh, INTERVAL_MS);
