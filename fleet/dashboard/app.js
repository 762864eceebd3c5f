// The Iwaki fleet dashboard: plain ES2020, no framework, nothing loaded from outside.
//
// It signs in with an API bearer token (kept in localStorage), then polls
// /api/v1/summary and the data of the view on screen every REFRESH_MS
// (2 s, or ?refresh=<ms> in the page's address) and updates the page in
// place. Views are hash routes: #/nodes, #/nodes/<id>, #/alerts, #/events,
// #/rollouts, #/rollouts/<id>.
// Every value from the API is put in the page as text (textContent), never
// as HTML. docs/dashboard.md describes the page for operators.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "iwaki.token";
const REFRESH_MS = refreshMs(new URLSearchParams(location.search).get("refresh"));
const SVG = "http://www.w3.org/2000/svg";
// the thresholds fleet/health.py opens alerts at, to mark the values in the node list
const LOW_HEAP = 16 * 1024;
const BACKLOG = 100;
const WEAK_RSSI = -80;

const $ = (id) => document.getElementById(id);

const app = {
  token: null,
  generation: 0,       // each refresh cycle has a number; only the newest one schedules the next
  timer: null,
  lastOk: null,        // Date of the last successful update
  skewMs: 0,           // server clock minus ours, from summary.generated_at
  nodes: [],
  sort: { key: "state", dir: 1 },     // "state" sorts problems first (see problemRank)
  nodeRows: new Map(),
  alertRows: new Map(),
  ackForbidden: null,  // the API's 403 detail once this token was refused an acknowledgement
  rolloutForbidden: null, // the same for pausing, resuming or aborting a rollout
  commandForbidden: null, // the same for sending a command to a node (Ping, Report health now)
  command: null,       // the node command whose answer the node page is waiting for, if any
  commandWaitMs: 15000, // how long to wait for a node's answer to a command
  commandPollMs: 500,  // how often to ask the API for it meanwhile
  chartSigs: new Map(),
  failedRoute: null,   // location.hash of a view the API refused (404, 403): its section stays hidden
};

function refreshMs(text) {
  const n = Number(text);
  return Number.isFinite(n) && n >= 100 ? Math.min(n, 600000) : 2000;
}

// -- the API --------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.status = status;
    this.code = code;
  }
}

/** The API does not answer, or failed (>= 500: `status`, `code` and `detail` are the API's). */
class Unreachable extends Error {
  constructor(message, { status = null, code = null, detail = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

/** Call the API; `body` (when given) is sent as JSON. */
async function api(path, { method = "GET", token = app.token, body } = {}) {
  const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
  const request = { method, cache: "no-store", headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    request.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(API + path, request);
  } catch (err) {
    throw new Unreachable(`the fleet API at ${location.host} does not answer (${err.message})`);
  }
  let answer = null;
  try {
    answer = await resp.json();
  } catch (err) {
    answer = null;
  }
  if (!resp.ok) {
    const detail = (answer && answer.detail) || `the API answered HTTP ${resp.status}`;
    const code = (answer && answer.error) || null;
    if (resp.status >= 500) {
      throw new Unreachable(`the fleet API failed (HTTP ${resp.status}): ${detail}`, { status: resp.status, code, detail });
    }
    throw new ApiError(resp.status, code, detail);
  }
  return answer;
}

/** Every item of a paginated list (at most `pages` pages of 1000). */
async function apiAll(path, pages = 20) {
  const sep = path.includes("?") ? "&" : "?";
  let items = [];
  let offset = 0;
  for (let i = 0; i < pages && offset !== null; i++) {
    const page = await api(`${path}${sep}limit=1000&offset=${offset}`);
    items = items.concat(page.items);
    offset = page.next_offset;
  }
  return items;
}

// -- small DOM helpers ------------------------------------------------------------

/** el("td", {class: "num"}, "text", childNode...) */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const c of children) node.append(c);
  return node;
}

/** Rebuild `box`'s children with `build()` only when `data` differs from what it shows. */
function replaceIfChanged(box, data, build) {
  const sig = JSON.stringify(data);
  if (box.dataset.sig !== sig) {
    box.dataset.sig = sig;
    box.replaceChildren(...build());
  }
}

function setText(node, text) {
  text = text === null || text === undefined ? "" : String(text);
  if (node.textContent !== text) node.textContent = text;
}

function show(node, visible) {
  node.hidden = !visible;
}

/** The table `<name>`-table (or `<name>`) when it has rows, its `<name>-empty` note when not. */
function showTable(name, rows) {
  const table = $(`${name}-table`) || $(name);
  show(table.closest(".scroll") || table, rows > 0);
  show($(`${name}-empty`), rows === 0);
}

function badge(text, kind) {
  return el("span", { class: `badge ${kind}`, text });
}

// -- formatting ------------------------------------------------------------------

const pad = (n) => String(n).padStart(2, "0");

function localTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function clock(d) {
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function ago(iso) {
  if (!iso) return "never";
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return iso;
  const s = Math.max(0, Math.round((Date.now() + app.skewMs - then) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function timeCell(iso, relative = false) {
  const t = el("time", { datetime: iso || null, title: iso || null, text: relative ? ago(iso) : localTime(iso) });
  return t;
}

/** An uptime, readably: "42 s", "5 min 03 s", "1 h 02 min", "3 d 4 h". */
function duration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${pad(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${pad(Math.floor((s % 3600) / 60))} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

const kib = (bytes) => (bytes === null || bytes === undefined ? "–" : `${(bytes / 1024).toFixed(1)} KiB`);
const unit = (v, u) => (v === null || v === undefined ? "–" : `${v} ${u}`.trim());

function compactJson(value, max = 160) {
  if (value === null || value === undefined) return "";
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text.length > max ? text.slice(0, max - 1) + "…" : text;
}

// -- signing in and out ------------------------------------------------------------

function showSignIn(message, kind = "error") {
  app.generation++;
  clearTimeout(app.timer);
  show($("main"), false);
  show($("signin"), true);
  show($("signout"), false);
  show($("offline-banner"), false);
  setText($("updated"), "Not signed in");
  const err = $("signin-error");
  err.className = kind;
  setText(err, message || "");
  show(err, Boolean(message));
  $("token").focus();
}

function signOut(message, kind = "error") {
  localStorage.removeItem(TOKEN_KEY);
  app.token = null;
  app.ackForbidden = null;
  app.rolloutForbidden = null;
  app.commandForbidden = null;
  app.command = null; // a command still waiting for its answer stops there
  forgetData();
  showSignIn(message, kind);
}

function forget(box) {
  box.replaceChildren();
  delete box.dataset.sig;
}

/** Clear every figure, row and chart, so nothing seen with one token stays on screen for the next. */
function forgetData() {
  for (const box of document.querySelectorAll("main tbody, .charts, #node-facts")) forget(box);
  clearRolloutView();
  for (const value of document.querySelectorAll(".summary .value")) value.textContent = "–";
  for (const box of document.querySelectorAll(".notice, #view-error")) show(box, false);
  app.nodes = [];
  app.nodeRows.clear();
  app.alertRows.clear();
  app.chartSigs.clear();
  app.lastOk = null;
}

function refusedMessage(err, saved) {
  if (err instanceof Unreachable) return `Cannot sign in: ${err.message}. Try again when it is back.`;
  if (err.status === 401) {
    return `${saved ? "Your saved token" : "This token"} was refused (401 unauthorized): ${err.message} ` +
      "Check that it was copied whole, or ask an administrator for a new one.";
  }
  if (err.status === 403) {
    return `This token is valid but its role may not use the dashboard (403 forbidden): ${err.message}`;
  }
  return `Cannot sign in (${err.status}): ${err.message}`;
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) {
    showSignIn("Enter the API token an administrator gave you.");
    return;
  }
  const button = event.submitter || $("signin-form").querySelector("button");
  button.disabled = true;
  try {
    const summary = await api("/summary", { token });
    app.token = token;
    localStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    enterDashboard();
    renderSummary(summary);
  } catch (err) {
    showSignIn(refusedMessage(err, false));
  } finally {
    button.disabled = false;
  }
}

function enterDashboard() {
  show($("signin"), false);
  show($("signin-error"), false);
  show($("main"), true);
  show($("signout"), true);
  if (!location.hash) history.replaceState(null, "", "#/nodes");
  refresh();
}

// -- the refresh cycle -------------------------------------------------------------

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  if (parts[0] === "nodes" && parts.length > 1 && parts[1]) {
    const raw = parts.slice(1).join("/");
    let id = raw;
    try {
      id = decodeURIComponent(raw);
    } catch (err) {
      // a hand-typed address with a stray "%": take it as it is
    }
    return { view: "node", id };
  }
  if (parts[0] === "rollouts" && parts[1]) return { view: "rollout", id: parts[1] };
  if (parts[0] === "alerts" || parts[0] === "events" || parts[0] === "rollouts") return { view: parts[0] };
  return { view: "nodes" };
}

/** Fetch the summary and the current view now, then again every REFRESH_MS. */
async function refresh() {
  const generation = ++app.generation;
  clearTimeout(app.timer);
  const where = route();
  showView(where);
  const [summary, view] = await Promise.allSettled([api("/summary"), loadView(where)]);
  if (generation !== app.generation) return; // signed out, or a newer cycle started meanwhile
  const failures = [summary, view].filter((r) => r.status === "rejected").map((r) => r.reason);
  const lost = failures.find((e) => e instanceof Unreachable);
  const refused = failures.find((e) => e instanceof ApiError && e.status === 401);
  if (refused) {
    signOut(refusedMessage(refused, true));
    return;
  }
  if (lost) {
    connectionLost(lost);
  } else {
    connectionBack();
  }
  if (summary.status === "fulfilled") {
    renderSummary(summary.value);
  } else if (summary.reason instanceof ApiError) {
    showViewError(`The fleet summary is not available to this token (${summary.reason.status}): ${summary.reason.message}`);
  }
  app.failedRoute = view.status === "rejected" && view.reason instanceof ApiError ? location.hash : null;
  showView(where);
  if (view.status === "fulfilled") {
    try {
      view.value();
      if (summary.status === "fulfilled") show($("view-error"), false);
    } catch (err) {
      showViewError(`The page failed to draw this view: ${err}`);
      console.error(err);
    }
  } else if (view.reason instanceof ApiError) {
    showViewError(viewErrorMessage(where, view.reason));
  } else if (!(view.reason instanceof Unreachable)) {
    showViewError(`The page failed to show this view: ${view.reason}`);
  }
  app.timer = setTimeout(refresh, REFRESH_MS);
}

function viewErrorMessage(where, err) {
  if (err.status === 404 && where.view === "node") return `There is no node “${where.id}” in the registry (404).`;
  if (err.status === 404 && where.view === "rollout") return `There is no rollout “${where.id}” (404).`;
  if (err.status === 422 && where.view === "rollout") return `“${where.id}” is not a rollout id (a number).`;
  if (err.status === 403) return `Your token's role may not see this view (403 forbidden): ${err.message}`;
  return `The API refused this view (${err.status}): ${err.message}`;
}

function showViewError(text) {
  setText($("view-error"), text);
  show($("view-error"), true);
}

function connectionLost(err) {
  setText($("offline-detail"), err.message.charAt(0).toUpperCase() + err.message.slice(1) + ".");
  show($("offline-banner"), true);
  document.body.classList.add("stale");
  const last = app.lastOk ? `last updated ${clock(app.lastOk)}` : "no update yet";
  setText($("updated"), `Connection lost; ${last}`);
}

function connectionBack() {
  show($("offline-banner"), false);
  document.body.classList.remove("stale");
  app.lastOk = new Date();
  setText($("updated"), `Last updated ${clock(app.lastOk)} (every ${REFRESH_MS / 1000} s)`);
}

/** Fetch what the view needs; resolve to a function that draws it (so a failed fetch draws nothing). */
async function loadView(where) {
  if (where.view === "nodes") {
    const items = await apiAll("/nodes");
    return () => renderNodes(items);
  }
  if (where.view === "node") {
    const node = await api(`/nodes/${encodeURIComponent(where.id)}`);
    return () => renderNode(node);
  }
  if (where.view === "alerts") {
    const state = $("alert-state").value;
    const page = await api(`/alerts?state=${encodeURIComponent(state)}&limit=500`);
    return () => renderAlerts(page);
  }
  if (where.view === "rollouts") {
    const [rollouts, releases] = await Promise.all([api("/rollouts?limit=100"), api("/releases?limit=100")]);
    return () => renderRollouts(rollouts, releases);
  }
  if (where.view === "rollout") {
    const rollout = await api(`/rollouts/${encodeURIComponent(where.id)}`);
    return () => renderRollout(rollout);
  }
  const q = new URLSearchParams({ limit: "200" });
  if ($("event-severity").value) q.set("severity", $("event-severity").value);
  if ($("event-node").value.trim()) q.set("node", $("event-node").value.trim());
  const page = await api(`/events?${q}`);
  return () => renderEvents(page);
}

function showView(where) {
  const refused = app.failedRoute === location.hash;
  for (const name of ["nodes", "node", "alerts", "events", "rollouts", "rollout"]) {
    show($(`view-${name}`), where.view === name && !refused);
  }
  const tab = { node: "nodes", rollout: "rollouts" }[where.view] || where.view;
  for (const a of document.querySelectorAll(".tabs a")) {
    if (a.dataset.view === tab) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

// -- summary -------------------------------------------------------------------

function renderSummary(s) {
  const generated = Date.parse(s.generated_at);
  if (!Number.isNaN(generated)) app.skewMs = generated - Date.now();
  const relay = s.relay || {};
  const figures = {
    "sum-nodes": s.nodes, "sum-online": s.online, "sum-offline": s.offline, "sum-unknown": s.unknown,
    "sum-alerting": s.alerting, "sum-alerts": s.alerts_open, "sum-backlog": relay.backlog,
    "sum-telemetry": s.telemetry_stored, "sum-gaps": s.gaps, "sum-invalid": s.invalid,
  };
  for (const [id, value] of Object.entries(figures)) {
    setText($(id), value === undefined || value === null ? "–" : value);
  }
  $("sum-offline").parentElement.classList.toggle("lit", s.offline > 0);
  $("sum-alerting").parentElement.classList.toggle("lit", s.alerting > 0);
  $("sum-alerts").parentElement.classList.toggle("lit", s.alerts_open > 0);
}

// -- node list -------------------------------------------------------------------

const STATE_RANK = { offline: 0, unknown: 2, online: 3 };

/** 0 = the worst: offline first, then nodes with open alerts, then unknown, then healthy. */
function problemRank(n) {
  if (n.state === "offline") return 0;
  if (n.alerts_open > 0) return 1;
  return STATE_RANK[n.state] ?? 2;
}

function sortValue(n, key) {
  const h = n.health || {};
  switch (key) {
    case "id": return n.id;
    case "last_seen": return n.last_seen || "";
    case "board": return n.board || "";
    case "fw": return n.fw || "";
    case "alerts_open": return n.alerts_open || 0;
    case "heap_free": case "rssi": case "lag_max_ms": case "outbox_depth": return h[key] ?? null;
    default: return problemRank(n); // "state"
  }
}

function compareNodes(a, b) {
  const { key, dir } = app.sort;
  const va = sortValue(a, key);
  const vb = sortValue(b, key);
  if (va === null && vb !== null) return 1; // no value: always last
  if (vb === null && va !== null) return -1;
  if (va < vb) return -dir;
  if (va > vb) return dir;
  if (key === "state" && (a.alerts_open || 0) !== (b.alerts_open || 0)) return (b.alerts_open || 0) - (a.alerts_open || 0);
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

function matchesFilter(n) {
  const f = $("state-filter").value;
  if (!f) return true;
  if (f === "alerting") return n.alerts_open > 0;
  return n.state === f;
}

function makeNodeRow(id) {
  const link = el("a", { href: `#/nodes/${encodeURIComponent(id)}`, text: id });
  const tr = el("tr", { "data-node": id },
    el("th", { scope: "row" }, link),
    el("td", { class: "state" }),
    el("td", { class: "seen" }),
    el("td", { class: "board" }),
    el("td", { class: "fw" }),
    el("td", { class: "num alerts" }),
    el("td", { class: "num heap" }),
    el("td", { class: "num rssi" }),
    el("td", { class: "num lag" }),
    el("td", { class: "num outbox" }));
  return tr;
}

function updateNodeRow(tr, n) {
  const h = n.health || {};
  const c = tr.cells;
  tr.dataset.state = n.state;
  const stateCell = c[1];
  const reason = n.state_reason ? ` (${n.state_reason})` : "";
  if (stateCell.dataset.value !== n.state + reason) {
    stateCell.dataset.value = n.state + reason;
    stateCell.replaceChildren(badge(n.state, `state-${n.state}`), el("span", { class: "reason", text: reason }));
  }
  const seen = c[2].firstChild || c[2].appendChild(el("time"));
  setText(seen, ago(n.last_seen));
  seen.setAttribute("datetime", n.last_seen || "");
  seen.title = n.last_seen ? `last heard ${localTime(n.last_seen)}` : "never heard live (only retained messages)";
  setText(c[3], n.board || "–");
  setText(c[4], n.fw || "–");
  const alerts = n.alerts_open || 0;
  if (c[5].dataset.value !== String(alerts)) {
    c[5].dataset.value = String(alerts);
    c[5].replaceChildren(alerts ? badge(String(alerts), "sev-warning") : el("span", { class: "muted", text: "0" }));
  }
  setText(c[6], kib(h.heap_free));
  c[6].classList.toggle("warn", h.heap_free != null && h.heap_free < LOW_HEAP);
  setText(c[7], unit(h.rssi, "dBm"));
  c[7].classList.toggle("warn", h.rssi != null && h.rssi < WEAK_RSSI);
  setText(c[8], unit(h.lag_max_ms, "ms"));
  c[8].classList.toggle("warn", h.overruns > 0);
  c[8].title = h.overruns ? `${h.overruns} overruns in the last health period` : "";
  setText(c[9], h.outbox_depth ?? "–");
  c[9].classList.toggle("warn", h.outbox_depth > BACKLOG);
}

function renderNodes(items) {
  app.nodes = items;
  const rows = items.filter(matchesFilter).sort(compareNodes);
  const body = $("nodes-body");
  const keep = new Set();
  let prev = null;
  for (const n of rows) {
    let tr = app.nodeRows.get(n.id);
    if (!tr) {
      tr = makeNodeRow(n.id);
      app.nodeRows.set(n.id, tr);
    }
    updateNodeRow(tr, n);
    const wanted = prev ? prev.nextSibling : body.firstChild;
    if (wanted !== tr) body.insertBefore(tr, wanted);
    prev = tr;
    keep.add(n.id);
  }
  for (const [id, tr] of app.nodeRows) {
    if (!keep.has(id)) {
      tr.remove();
      app.nodeRows.delete(id);
    }
  }
  setText($("nodes-count"), rows.length === items.length ? `${items.length} nodes` : `${rows.length} of ${items.length} nodes`);
  showTable("nodes", rows.length);
}

function sortBy(key) {
  app.sort = app.sort.key === key ? { key, dir: -app.sort.dir } : { key, dir: key === "alerts_open" ? -1 : 1 };
  for (const th of document.querySelectorAll("#nodes-table th[data-sort]")) {
    if (th.dataset.sort === app.sort.key) th.setAttribute("aria-sort", app.sort.dir > 0 ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  }
  renderNodes(app.nodes);
}

// -- node page -------------------------------------------------------------------

function clearNodeView() {
  setText($("node-title"), "");
  for (const id of ["node-state", "node-facts", "node-charts", "node-health"]) forget($(id));
  for (const id of ["node-alerts", "node-gaps", "node-events"]) forget($(id).tBodies[0]);
  commandButtons("");
}

function renderNode(n) {
  setText($("node-title"), n.id);
  commandButtons(n.id);
  $("node-state").replaceChildren(badge(n.state, `state-${n.state}`));
  const channels = n.channels && typeof n.channels === "object"
    ? Object.entries(n.channels).map(([k, v]) => `${k} (${(v && v.sensor) || "?"})`).join(", ") : "";
  // the detail's "gaps" is the list of open gaps; a plain node row has the count of missing messages
  const missing = Array.isArray(n.gaps) ? n.gaps.reduce((sum, g) => sum + g.to_seq - g.from_seq + 1, 0) : (n.gaps ?? 0);
  const facts = [
    ["State", `${n.state}${n.state_reason ? ` (${n.state_reason})` : ""} since ${localTime(n.state_at)}`],
    ["Last seen", n.last_seen ? `${ago(n.last_seen)} (${localTime(n.last_seen)})` : "never heard live"],
    ["First seen", localTime(n.first_seen)],
    ["Board", `${n.board || "–"} (${n.chip || "chip unknown"})`],
    ["Firmware", `${n.fw || "–"}, config ${n.config_hash || "–"}`],
    ["Boot", `${n.boot ?? "–"} (boot count ${n.boot_count ?? "–"}, last reset: ${n.reset_cause || "–"})`],
    ["Last seq", n.last_seq ?? "–"],
    ["Messages missing", missing],
    ["Duplicates / invalid", `${n.duplicates ?? 0} / ${n.invalid ?? 0}`],
    ["Channels", channels || "–"],
  ];
  replaceIfChanged($("node-facts"), facts,
    () => facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: String(v) }))));

  renderAlertRows($("node-alerts").tBodies[0], n.alerts || [], false);
  showTable("node-alerts", (n.alerts || []).length);

  const telemetry = n.telemetry || {};
  const charts = Object.keys(telemetry).sort().map((ch) => ({
    key: `t:${n.id}:${ch}`, title: ch, unit: "", channel: ch, band: true,
    points: byTime(telemetry[ch]).map((r) => ({ t: r.received_at, y: r.mean, lo: r.min, hi: r.max, n: r.n })),
  }));
  updateCharts($("node-charts"), charts, "No telemetry stored for this node yet.");

  const health = byTime(n.health || []);
  const series = [
    ["heap_free", "free heap", "KiB", (r) => (r.heap_free == null ? null : r.heap_free / 1024)],
    ["lag_max_ms", "loop lag (max)", "ms", (r) => r.lag_max_ms],
    ["rssi", "Wi-Fi signal", "dBm", (r) => r.rssi],
  ];
  updateCharts($("node-health"), series.map(([key, title, u, pick]) => ({
    key: `h:${n.id}:${key}`, title, unit: u, channel: key, band: false,
    points: health.map((r) => ({ t: r.received_at, y: pick(r) })).filter((p) => p.y !== null && p.y !== undefined),
  })), "No health report stored for this node yet.");

  const gaps = Array.isArray(n.gaps) ? n.gaps : [];
  replaceIfChanged($("node-gaps").tBodies[0], gaps, () => gaps.map((g) => el("tr", {},
    el("td", { text: g.boot }), el("td", { text: `${g.from_seq}–${g.to_seq}` }),
    el("td", { class: "num", text: g.to_seq - g.from_seq + 1 }), el("td", {}, timeCell(g.detected_at)))));
  showTable("node-gaps", gaps.length);

  const events = n.events || [];
  replaceIfChanged($("node-events").tBodies[0], events, () => events.map(eventRow(false)));
  showTable("node-events", events.length);
}

function byTime(rows) {
  return rows.slice().sort((a, b) => (a.received_at < b.received_at ? -1 : a.received_at > b.received_at ? 1 : 0));
}

/** Draw each chart into `box` unless the same data is drawn already (keyed by chart.key). */
function updateCharts(box, charts, emptyText) {
  const wanted = new Set(charts.map((c) => c.key));
  for (const fig of Array.from(box.children)) {
    if (!wanted.has(fig.dataset.key)) fig.remove();
  }
  let prev = null;
  for (const chart of charts) {
    const sig = JSON.stringify(chart.points);
    let fig = Array.from(box.children).find((f) => f.dataset.key === chart.key);
    if (!fig || app.chartSigs.get(chart.key) !== sig) {
      const fresh = drawChart(chart);
      if (fig) fig.replaceWith(fresh);
      else box.insertBefore(fresh, prev ? prev.nextSibling : box.firstChild);
      fig = fresh;
      app.chartSigs.set(chart.key, sig);
    }
    prev = fig;
  }
  const empty = box.querySelector(".empty");
  if (!charts.length && !empty) box.append(el("p", { class: "muted empty", text: emptyText }));
  if (charts.length && empty) empty.remove();
}

const W = 480, H = 170, L = 50, R = 10, T = 10, B = 24;

function fmt(v) {
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 100) return v.toFixed(1);
  return Number(v.toPrecision(3)).toString();
}

/**
 * One time-series chart as inline SVG: the mean as a line with a dot per
 * row (circle.pt, one for each point given) and, with `band`, the min–max
 * band behind it. Points are {t: iso, y, lo, hi}.
 */
function drawChart({ key, title, unit: u, channel, band, points }) {
  const label = `${title}${u ? ` (${u})` : ""}`;
  const fig = el("figure", { class: "chart", "data-key": key, "data-channel": channel, "data-points": points.length });
  const last = points[points.length - 1];
  const caption = el("figcaption", {},
    el("strong", { text: label }),
    el("span", { class: "muted", text: points.length
      ? ` ${points.length} point${points.length === 1 ? "" : "s"}, latest ${fmt(last.y)}${u ? " " + u : ""} at ${localTime(last.t)}`
      : " no data" }));
  fig.append(caption);
  if (!points.length) return fig;

  const times = points.map((p) => Date.parse(p.t));
  const lows = points.map((p) => (band && p.lo != null ? p.lo : p.y));
  const highs = points.map((p) => (band && p.hi != null ? p.hi : p.y));
  let y0 = Math.min(...lows), y1 = Math.max(...highs);
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
  const padY = (y1 - y0) * 0.08;
  y0 -= padY; y1 += padY;
  // by time; by arrival order when rows share a timestamp (a burst stored at once)
  const byTime = times.every((t, i) => i === 0 || t > times[i - 1]);
  const t0 = times[0], t1 = times[times.length - 1];
  const span = byTime ? t1 - t0 : points.length - 1;
  const x = (i) => (span === 0 ? L + (W - L - R) / 2 : L + ((byTime ? times[i] - t0 : i) / span) * (W - L - R));
  const y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  const xy = (i, v) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`;

  const chart = svg("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img", class: "plot",
    "aria-label": `${label}: ${points.length} points from ${localTime(points[0].t)} to ${localTime(last.t)}, ` +
      `latest ${fmt(last.y)}, lowest ${fmt(Math.min(...lows))}, highest ${fmt(Math.max(...highs))}`,
  });
  for (const f of [0, 0.5, 1]) {
    const v = y0 + f * (y1 - y0);
    chart.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    chart.append(svg("text", { class: "axis", x: L - 6, y: y(v) + 4, "text-anchor": "end" }, fmt(v)));
  }
  chart.append(svg("text", { class: "axis", x: L, y: H - 8, "text-anchor": "start" }, localTime(points[0].t).slice(5)));
  if (points.length > 1) chart.append(svg("text", { class: "axis", x: W - R, y: H - 8, "text-anchor": "end" }, localTime(last.t).slice(5)));
  if (band) {
    const upper = points.map((p, i) => xy(i, highs[i]));
    const lower = points.map((p, i) => xy(i, lows[i])).reverse();
    chart.append(svg("polygon", { class: "band", points: upper.concat(lower).join(" ") }));
  }
  if (points.length > 1) chart.append(svg("polyline", { class: "line", points: points.map((p, i) => xy(i, p.y)).join(" ") }));
  const dots = svg("g", { class: "pts" });
  points.forEach((p, i) => {
    const range = band && p.lo != null ? ` (min ${fmt(p.lo)}, max ${fmt(p.hi)})` : "";
    dots.append(svg("circle", { class: "pt", cx: x(i).toFixed(1), cy: y(p.y).toFixed(1), r: 2.5 },
      svg("title", {}, `${localTime(p.t)}: ${fmt(p.y)}${u ? " " + u : ""}${range}`)));
  });
  chart.append(dots);
  fig.append(chart);
  return fig;
}

// -- alerts ----------------------------------------------------------------------

function renderAlerts(page) {
  renderAlertRows($("alerts-table").tBodies[0], page.items, true);
  setText($("alerts-count"), page.total > page.items.length ? `${page.items.length} of ${page.total}` : `${page.total} alerts`);
  showTable("alerts", page.items.length);
}

function renderAlertRows(body, alerts, withNode) {
  const keep = new Set();
  let prev = null;
  for (const a of alerts) {
    const key = `${withNode ? "all" : "node"}:${a.id}`;
    let tr = app.alertRows.get(key);
    if (!tr || tr.parentElement !== body) {
      tr = el("tr", { "data-alert": a.id });
      app.alertRows.set(key, tr);
    }
    const sig = JSON.stringify([a, app.ackForbidden]);
    if (tr.dataset.sig !== sig) {
      tr.dataset.sig = sig;
      tr.replaceChildren(...alertCells(a, withNode));
    }
    const wanted = prev ? prev.nextSibling : body.firstChild;
    if (wanted !== tr) body.insertBefore(tr, wanted);
    prev = tr;
    keep.add(tr);
  }
  for (const [key, tr] of app.alertRows) {
    if (tr.parentElement === body && !keep.has(tr)) {
      tr.remove();
      app.alertRows.delete(key);
    }
  }
}

function alertCells(a, withNode) {
  const cells = [el("td", {}, timeCell(a.opened_at))];
  if (withNode) cells.push(el("td", {}, el("a", { href: `#/nodes/${encodeURIComponent(a.node)}`, text: a.node })));
  cells.push(el("td", { text: a.kind }), el("td", {}, badge(a.severity, `sev-${a.severity}`)), el("td", { class: "msg", text: a.message || "" }));
  cells.push(el("td", { class: "acked", text: a.acked_at ? `by ${a.acked_by} at ${localTime(a.acked_at)}` : "not yet" }));
  if (withNode) cells.push(el("td", {}, a.closed_at ? timeCell(a.closed_at) : badge("open", "sev-open")));
  const action = el("td");
  if (!a.acked_at && !a.closed_at) {
    const button = el("button", {
      type: "button", class: "ack", "data-ack": a.id, text: "Acknowledge",
      disabled: Boolean(app.ackForbidden), title: app.ackForbidden || null,
      "aria-label": `Acknowledge alert ${a.id}: ${a.kind} on ${a.node}`,
    });
    action.append(button);
  }
  cells.push(action);
  return cells;
}

async function acknowledge(button) {
  const id = button.dataset.ack;
  const box = button.closest("section").querySelector(".notice[data-for=alerts]");
  button.disabled = true;
  try {
    const alert = await api(`/alerts/${encodeURIComponent(id)}/ack`, { method: "POST" });
    notice(box, `Alert ${alert.id} (${alert.kind} on ${alert.node}) acknowledged by ${alert.acked_by}. ` +
      "It stays open until its condition clears.", "ok");
    const tr = button.closest("tr");
    tr.dataset.sig = "";
    tr.replaceChildren(...alertCells(alert, tr.cells.length > 6));
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) {
      app.ackForbidden = `Not allowed: ${err.message}`;
      notice(box, `You cannot acknowledge alerts (403 forbidden): ${err.message} ` +
        "Acknowledging needs an operator or admin token.", "error");
      for (const b of document.querySelectorAll("button.ack")) {
        b.disabled = true;
        b.title = app.ackForbidden;
      }
      return;
    }
    if (err instanceof ApiError && err.status === 401) {
      signOut(refusedMessage(err, true));
      return;
    }
    notice(box, `Alert ${id} was not acknowledged: ${err.message}`, "error");
    button.disabled = false;
  }
}

// -- node commands (the node page's Ping and Report health now) --------------------

const COMMANDS = {
  ping: { noun: "Ping", doing: "answer the ping", label: (id) => `Ping ${id}`,
    title: "Ask the node for its uptime" },
  health: { noun: "Health report request", doing: "publish a health report", label: (id) => `Report health now from ${id}`,
    title: "Ask the node to publish a health report now" },
};

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const seconds = (ms) => `${Math.round(ms / 100) / 10} s`;

/** Set the command buttons up for node `id` ("" while no node is drawn): disabled while
 * a command waits for its answer, and for good once the token was refused (403). */
function commandButtons(id) {
  for (const b of document.querySelectorAll("button[data-node-command]")) {
    const what = COMMANDS[b.dataset.nodeCommand];
    b.dataset.node = id;
    b.disabled = !id || Boolean(app.commandForbidden) || app.command !== null;
    b.title = app.commandForbidden || (app.command ? "Waiting for the node's answer to the last command" : what.title);
    b.setAttribute("aria-label", id ? what.label(id) : b.textContent);
  }
}

/** Send the button's command to its node, then wait for the node's answer and show it. */
async function sendCommand(button) {
  const id = button.dataset.node;
  const name = button.dataset.nodeCommand;
  const what = COMMANDS[name];
  if (!id || !what || app.command) return;
  const box = $("node-command-message");
  const command = { node: id, name };
  const current = () => app.command === command; // false once signed out or on another page
  app.command = command;
  commandButtons(id);
  notice(box, `Sending the ${what.noun.toLowerCase()} to ${id}…`, "pending");
  let sent = null;
  try {
    sent = await api(`/nodes/${encodeURIComponent(id)}/commands`, { method: "POST", body: { name } });
    if (!current()) return;
    notice(box, `${what.noun} sent to ${id} at ${clock(new Date())} (node state: ${sent.node_state}); ` +
      `waiting for its answer (up to ${seconds(app.commandWaitMs)})…`, "pending");
    const outcome = await waitForReply(sent, current);
    if (outcome && current()) notice(box, ...answerText(sent, outcome));
  } catch (err) {
    if (!current()) return;
    const failed = sent ? `${what.noun} was sent to ${id}, but its answer cannot be read`
      : `${what.noun} was not sent to ${id}`;
    commandFailed(box, failed, err);
  } finally {
    if (current()) {
      app.command = null;
      commandButtons(id);
    }
  }
}

/** Ask for the command's replies until one is there or the wait is over:
 * {reply} or {reply: null, trouble}; null when the page moved on meanwhile. */
async function waitForReply(sent, current) {
  const path = sent.replies && sent.replies.startsWith(API + "/") ? sent.replies.slice(API.length)
    : `/nodes/${encodeURIComponent(sent.node)}/replies?cmd_id=${encodeURIComponent(sent.id)}`;
  const deadline = Date.now() + app.commandWaitMs;
  let trouble = null;
  while (current()) {
    try {
      const page = await api(path);
      if (page.items.length) return { reply: page.items[0] };
      trouble = null;
    } catch (err) {
      if (!(err instanceof Unreachable)) throw err;
      trouble = err; // the API is down or busy for a moment: ask again
    }
    if (Date.now() >= deadline) return { reply: null, trouble };
    await sleep(app.commandPollMs);
  }
  return null;
}

/** [text, kind] for the notice: what the node answered, or that it did not. */
function answerText(sent, { reply, trouble }) {
  const id = sent.node;
  if (!reply) {
    const why = sent.node_state === "offline"
      ? "the node is offline; it gets the command when it reconnects, if its broker session kept it"
      : "the node may be offline";
    const asked = trouble ? ` The API could not be asked for it: ${trouble.message}.` : "";
    return [`No answer from ${id} within ${seconds(app.commandWaitMs)} (${why}).${asked}`, "warn"];
  }
  if (!reply.ok) {
    const doing = (COMMANDS[sent.name] || { doing: sent.name }).doing;
    return [`${id} could not ${doing}: ${reply.error || "it gave no reason"}.`, "error"];
  }
  if (sent.name === "ping") {
    const rtt = Date.parse(reply.received_at) - Date.parse(sent.sent_at);
    const took = Number.isFinite(rtt) ? ` in ${rtt < 100 ? "under 0.1 s" : `${(rtt / 1000).toFixed(1)} s`}` : "";
    const up = reply.result && Number.isFinite(reply.result.up_ms) ? `up ${duration(reply.result.up_ms)}` : "no uptime given";
    return [`${id} answered the ping${took}: ${up}.`, "ok"];
  }
  return [`${id} is publishing a health report now; it shows under Health with the next update.`, "ok"];
}

function commandFailed(box, what, err) {
  if (err instanceof ApiError && err.status === 403) {
    app.commandForbidden = `Not allowed: ${err.message}`;
    notice(box, `You cannot send commands to nodes (403 forbidden): ${err.message.replace(/\.?$/, ".")} ` +
      "Ping and Report health now need an operator, technician or admin token.", "error");
    return;
  }
  if (err instanceof ApiError && err.status === 401) {
    signOut(refusedMessage(err, true));
    return;
  }
  // a 503 here (no broker behind this API) is about the command, not the connection: no banner
  const status = err.status ? ` (${err.status}${err.code ? " " + err.code : ""})` : "";
  const detail = err instanceof Unreachable && err.detail ? err.detail : err.message;
  notice(box, `${what}${status}: ${detail.replace(/\.?$/, ".")}`, "error");
}

function notice(box, text, kind) {
  box.className = `notice ${kind}`;
  setText(box, text);
  show(box, true);
}

// -- events ----------------------------------------------------------------------

function eventRow(withNode) {
  return (e) => {
    const cells = [el("td", {}, timeCell(e.received_at))];
    if (withNode) cells.push(el("td", {}, el("a", { href: `#/nodes/${encodeURIComponent(e.node)}`, text: e.node })));
    cells.push(el("td", { text: e.event }), el("td", {}, badge(e.severity, `sev-${e.severity}`)),
      el("td", { class: "data", text: compactJson(e.data) }));
    return el("tr", { "data-event": e.id }, ...cells);
  };
}

function renderEvents(page) {
  replaceIfChanged($("events-table").tBodies[0], page.items, () => page.items.map(eventRow(true)));
  setText($("events-count"), page.total > page.items.length ? `latest ${page.items.length} of ${page.total}` : `${page.total} events`);
  showTable("events", page.items.length);
}

// -- rollouts --------------------------------------------------------------------

// deployment states in the order an update moves through them (fleet/rollouts.py)
const DEPLOYMENT_STATES = ["pending", "sent", "downloading", "verifying", "staged", "trial", "committed",
  "failed", "rolled_back", "timed_out", "skipped"];
const FINISHED = ["committed", "failed", "rolled_back", "timed_out", "skipped"];
const FAILED_STATES = ["failed", "rolled_back", "timed_out"];
// which operator action a rollout in each state accepts (the API answers 409 otherwise)
const ACTIONS = { pause: ["running"], resume: ["paused", "halted"], abort: ["running", "paused", "halted"] };
const PAST = { pause: "paused", resume: "resumed", abort: "aborted" };
const AFTER = {
  pause: "No more nodes are sent the update; those already updating go on.",
  resume: "The nodes left are sent the update again, wave by wave.",
  abort: "Nodes not yet sent the update are skipped; updates under way still finish and are recorded.",
};

function depKind(state) {
  if (state === "committed") return "dep-ok";
  if (FAILED_STATES.includes(state)) return "dep-failed";
  if (state === "skipped" || state === "pending") return `dep-${state}`;
  return "dep-active";
}

const percent = (rate) => (rate === null || rate === undefined ? "–" : `${(rate * 100).toFixed(rate < 0.1 ? 1 : 0)}%`);

/** "2 pending, 1 committed": the counts by deployment state, in the order an update goes. */
function countsText(counts) {
  const known = DEPLOYMENT_STATES.filter((s) => counts[s]);
  const other = Object.keys(counts).filter((s) => !DEPLOYMENT_STATES.includes(s) && counts[s]);
  return known.concat(other).map((s) => `${counts[s]} ${s.replace("_", " ")}`).join(", ") || "none";
}

function countBadges(counts) {
  const states = DEPLOYMENT_STATES.filter((s) => counts[s]);
  if (!states.length) return [document.createTextNode("none")];
  return states.map((s) => el("span", { class: `badge ${depKind(s)}`, "data-count": s,
    text: `${counts[s]} ${s.replace("_", " ")}` }));
}

function wavesDone(r) {
  return r.waves.filter((w) => w.finished_at).length;
}

function wavesText(r) {
  const done = wavesDone(r);
  if (done === r.waves.length) return `all ${r.waves.length} done`;
  return `wave ${r.current_wave} of ${r.waves.length} (${done} done)`;
}

function rolloutRow(r) {
  const progress = el("progress", { max: r.waves.length, value: wavesDone(r), "aria-label": `waves of rollout ${r.id}` });
  return el("tr", { "data-rollout": r.id },
    el("th", { scope: "row" }, el("a", { href: `#/rollouts/${r.id}`, text: `#${r.id}` })),
    el("td", { class: "release", text: r.release }),
    el("td", { class: "state" }, badge(r.state, `ro-${r.state}`),
      r.reason ? el("span", { class: "reason", text: ` ${r.reason}` }) : ""),
    el("td", { class: "waves" }, progress, ` ${wavesText(r)}`),
    el("td", { class: "counts" }, ...countBadges(r.counts)),
    el("td", { class: "num rate", text: percent(r.failure_rate) }),
    el("td", {}, timeCell(r.created_at), ` by ${r.created_by}`));
}

function renderRollouts(page, releases) {
  replaceIfChanged($("rollouts-table").tBodies[0], page.items, () => page.items.map(rolloutRow));
  setText($("rollouts-count"), page.total > page.items.length ? `latest ${page.items.length} of ${page.total}` : `${page.total} rollout${page.total === 1 ? "" : "s"}`);
  showTable("rollouts", page.items.length);
  replaceIfChanged($("releases-table").tBodies[0], releases.items, () => releases.items.map((v) => el("tr", { "data-release": v.version },
    el("th", { scope: "row", text: v.version }), el("td", { text: v.kind }), el("td", { text: (v.boards || []).join(", ") }),
    el("td", { text: v.min_version || "any" }), el("td", { class: "num", text: kib(v.total_size) }),
    el("td", {}, timeCell(v.created_at), ` by ${v.created_by}`))));
  showTable("releases", releases.items.length);
}

function clearRolloutView() {
  setText($("rollout-title"), "");
  for (const id of ["rollout-state", "rollout-facts"]) forget($(id));
  for (const id of ["rollout-waves", "rollout-deployments"]) forget($(id).tBodies[0]);
  for (const b of document.querySelectorAll("button[data-rollout-action]")) b.dataset.rollout = "";
}

function renderRollout(r) {
  setText($("rollout-title"), `Rollout ${r.id}: release ${r.release}`);
  replaceIfChanged($("rollout-state"), [r.state, r.reason], () => [badge(r.state, `ro-${r.state}`),
    el("span", { class: "reason", text: r.reason ? ` ${r.reason}` : "" })]);
  for (const b of document.querySelectorAll("button[data-rollout-action]")) {
    const verb = b.dataset.rolloutAction;
    b.dataset.rollout = r.id;
    b.disabled = Boolean(app.rolloutForbidden) || !ACTIONS[verb].includes(r.state);
    b.title = app.rolloutForbidden || (ACTIONS[verb].includes(r.state) ? "" : `A ${r.state} rollout cannot be ${PAST[verb]}`);
  }
  const facts = [
    ["State", `${r.state}${r.reason ? ` (${r.reason})` : ""} since ${localTime(r.updated_at)}`],
    ["Started", `${localTime(r.created_at)} by ${r.created_by}`],
    ["Waves", r.waves.map((w) => `${w.spec} (${w.size})`).join(", ") + ` — ${wavesText(r)}`],
    ["Soak after each wave", `${r.soak_s} s`],
    ["Failure rate", `${percent(r.failure_rate)} (halts above ${percent(r.failure_threshold)})`],
    ["Deployments", countsText(r.counts)],
    ["Downgrade allowed", r.force ? "yes (force)" : "no"],
  ];
  replaceIfChanged($("rollout-facts"), facts,
    () => facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: String(v) }))));

  const waves = r.waves.map((w, i) => {
    const deps = r.deployments.filter((d) => d.wave === i + 1);
    const done = deps.filter((d) => FINISHED.includes(d.state)).length;
    const failed = deps.filter((d) => FAILED_STATES.includes(d.state)).length;
    return { n: i + 1, w, size: deps.length, done, failed, current: r.current_wave === i + 1 };
  });
  replaceIfChanged($("rollout-waves").tBodies[0], waves, () => waves.map((x) => el("tr", { "data-wave": x.n },
    el("th", { scope: "row", text: x.current && r.state !== "done" ? `${x.n} (current)` : String(x.n) }),
    el("td", { text: x.w.spec }), el("td", { class: "num", text: x.size }),
    el("td", { class: "progress" }, el("progress", { max: x.size || 1, value: x.done, "aria-label": `wave ${x.n}` }),
      ` ${x.done} of ${x.size} finished${x.failed ? `, ${x.failed} failed` : ""}`),
    el("td", {}, x.w.started_at ? timeCell(x.w.started_at) : "not yet"),
    el("td", {}, x.w.finished_at ? timeCell(x.w.finished_at) : "–"))));

  const deps = r.deployments;
  replaceIfChanged($("rollout-deployments").tBodies[0], deps, () => deps.map((d) => el("tr", { "data-node": d.node, "data-state": d.state },
    el("th", { scope: "row" }, el("a", { href: `#/nodes/${encodeURIComponent(d.node)}`, text: d.node })),
    el("td", { class: "wave", text: d.wave ?? "–" }),
    el("td", { class: "state" }, badge(d.state.replace("_", " "), depKind(d.state))),
    el("td", { text: d.from_version || "–" }), el("td", { class: "num", text: d.attempt ?? "–" }),
    el("td", { class: "msg reason-text", text: d.reason || "" }),
    el("td", {}, timeCell(d.updated_at)),
    el("td", { class: "data history" }, (d.history || []).map((h) =>
      `${clock(new Date(h.at))} ${h.state}${h.detail ? ` (${h.detail})` : ""}`).join(" → ")))));
  showTable("rollout-deployments", deps.length);
}

async function rolloutAction(button) {
  const verb = button.dataset.rolloutAction;
  const id = button.dataset.rollout;
  const box = $("rollout-message");
  if (!id) return;
  if (verb === "abort" && !window.confirm(`Abort rollout ${id}? Nodes not yet sent the update are skipped; ` +
      "this cannot be undone.")) return;
  button.disabled = true;
  try {
    const r = await api(`/rollouts/${encodeURIComponent(id)}/${verb}`, { method: "POST" });
    notice(box, `Rollout ${r.id} is now ${r.state}. ${AFTER[verb]}`, "ok");
    renderRollout(r);
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) {
      app.rolloutForbidden = `Not allowed: ${err.message}`;
      notice(box, `You cannot ${verb} rollouts (403 forbidden): ${err.message.replace(/\.?$/, ".")} ` +
        "Pausing, resuming and aborting need an operator or admin token.", "error");
      for (const b of document.querySelectorAll("button[data-rollout-action]")) {
        b.disabled = true;
        b.title = app.rolloutForbidden;
      }
      return;
    }
    if (err instanceof ApiError && err.status === 401) {
      signOut(refusedMessage(err, true));
      return;
    }
    const status = err instanceof ApiError ? ` (${err.status}${err.code ? " " + err.code : ""})` : "";
    notice(box, `Rollout ${id} was not ${PAST[verb]}${status}: ${err.message}`, "error");
    refresh();
  }
}

// -- start -----------------------------------------------------------------------

function start() {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => signOut("Signed out. The token was removed from this browser.", "notice"));
  window.addEventListener("hashchange", () => {
    if (!app.token) return;
    app.command = null; // an answer still awaited is not shown on another page
    for (const box of document.querySelectorAll(".notice")) show(box, false);
    show($("view-error"), false);
    clearNodeView(); // another node's figures must not show under this one's title, even briefly
    clearRolloutView();
    refresh();
  });
  for (const th of document.querySelectorAll("#nodes-table th[data-sort] button")) {
    th.addEventListener("click", () => sortBy(th.parentElement.dataset.sort));
  }
  $("state-filter").addEventListener("change", () => renderNodes(app.nodes));
  for (const id of ["alert-state", "event-severity"]) $(id).addEventListener("change", () => refresh());
  let typing = null;
  $("event-node").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(refresh, 300);
  });
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button.ack");
    if (button && !button.disabled) acknowledge(button);
    const action = event.target.closest("button[data-rollout-action]");
    if (action && !action.disabled) rolloutAction(action);
    const command = event.target.closest("button[data-node-command]");
    if (command && !command.disabled) sendCommand(command);
  });
  app.token = localStorage.getItem(TOKEN_KEY);
  if (app.token) enterDashboard();
  else showSignIn();
}

start();
