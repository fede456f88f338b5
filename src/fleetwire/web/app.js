// fleetwire dashboard: one page, no build step, no dependency. It talks to the server it was
// served from: REST under /api/v1 (Authorization: Bearer) and one /ws/client session (the token
// in `access_token`, contract §2, as browsers cannot set headers on a WebSocket).
// Every text from the server goes into the page through textContent, never as HTML.
"use strict";

const ROW_H = 26;                    // px, as .row in app.css
const TAIL_MAX = 300;                // lines kept in the live tail
const DRAWER_EVENTS = 200;           // lines kept in the drawer's timeline
const STALE_MS = 3600 * 1000;        // offline and last seen longer ago: "stale"
const RESUME_MAX = 500;              // devices named in `resume` (the server replays ≤ 500 events)
const SPARK_POINTS = 40;
const EVENT_CLASSES = ["presence", "status", "telemetry", "command", "registry"];

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
};

// ---- state ---------------------------------------------------------------------------------
const state = {
  token: null, claims: null, role: null, subscribed: false,
  devices: new Map(),        // id -> {id, name, tags, disabled, connected, status, last_seen_at, seq}
  ids: [],                   // every id, sorted
  shown: [],                 // ids passing the filters
  tags: new Set(),
  filter: { glob: "", tag: "", status: "" },
  ws: null, wsOpen: false, backoff: 1000, nextId: 1,
  pending: new Map(),        // request id -> {resolve, reject}
  queue: [],                 // incoming events, applied once per animation frame
  frame: 0,
  tail: { paused: false, held: [], telemetry: true },
  features: { twin: false, jobs: false },
  drawer: null,              // {id, latest: Map(key -> {value, ts, points[]}), commands: Map}
  commands: new Map(),       // command_id -> {device_id, name, state, li?}
  jobs: new Map(),
};

// ---- token ---------------------------------------------------------------------------------
function decodeClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
  } catch (e) { return null; }
}

function takeToken() {
  // `fleetwire open` puts the token in the fragment: it never reaches a server or its logs.
  const hash = new URLSearchParams(location.hash.slice(1));
  const fromHash = hash.get("token");
  if (fromHash) {
    sessionStorage.setItem("fleetwire.token", fromHash);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("fleetwire.token");
}

function signOut(message) {
  sessionStorage.removeItem("fleetwire.token");
  state.token = null;
  if (state.ws) state.ws.close(1000);
  $("main").hidden = true; $("drawer").hidden = true; $("signin").hidden = false;
  $("signin-error").textContent = message || "";
}

// ---- REST ----------------------------------------------------------------------------------
async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(`/api/v1${path}`, {
    method: options.method || "GET", headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = new Error((body && (body.detail || body.title)) || response.statusText);
    error.status = response.status; error.code = body && body.code;
    throw error;
  }
  return body;
}

async function detectFeatures() {
  // Twin (§6) and jobs (§7) are shown when this server has them: its OpenAPI document says.
  try {
    const doc = await (await fetch("/openapi.json")).json();
    const paths = Object.keys(doc.paths || {});
    state.features.twin = paths.includes("/api/v1/devices/{device_id}/twin");
    state.features.jobs = paths.includes("/api/v1/jobs");
  } catch (e) { /* no OpenAPI: neither */ }
  $("jobs").hidden = !state.features.jobs;
}

async function loadDevices() {
  let cursor = null;
  do {
    const page = await api(`/devices?limit=1000${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    for (const item of page.items) putDevice(item);
    cursor = page.next_cursor;
  } while (cursor);
  sortIds();
}

function putDevice(item) {
  const known = state.devices.get(item.id);
  const conn = item.connection || {};
  const device = known || { id: item.id, seq: 0, connected: false, last_seen_at: null };
  device.name = item.name || "";
  device.tags = item.tags || [];
  device.disabled = !!item.disabled;
  if (item.status !== undefined) device.status = item.status;
  if (!known) {
    device.connected = !!conn.connected;
    device.last_seen_at = conn.last_seen_at || null;  // `seq` comes from the snapshot: the record's is older
  }
  for (const tag of device.tags) addTag(tag);
  if (!known) state.devices.set(item.id, device);
  return !known;
}

function addTag(tag) {
  if (state.tags.has(tag)) return;
  state.tags.add(tag);
  const select = $("f-tag");
  const option = el("option", null, tag); option.value = tag;
  const after = [...select.options].slice(1).find((o) => o.value > tag);
  select.insertBefore(option, after || null);
}

function sortIds() { state.ids = [...state.devices.keys()].sort(); }

// ---- the live session ----------------------------------------------------------------------
function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws/client?access_token=${encodeURIComponent(state.token)}`);
  state.ws = ws;
  setLive("connecting", "warn");
  ws.onmessage = (message) => onMessage(JSON.parse(message.data));
  ws.onclose = (close) => {
    state.wsOpen = false;
    for (const { reject } of state.pending.values()) reject(new Error("disconnected"));
    state.pending.clear();
    if (state.ws !== ws || !state.token) return;
    if (close.code === 4001 || close.code === 4003) {
      signOut(close.code === 4001 ? "Your token expired: sign in again." : "Access revoked (4003).");
      return;
    }
    setLive(`reconnecting (${close.code} ${close.reason || ""})`, "bad");
    const delay = Math.random() * state.backoff;          // full jitter
    state.backoff = Math.min(state.backoff * 2, 15000);
    setTimeout(() => { if (state.token) connect(); }, delay);
  };
}

function request(message) {
  const id = String(state.nextId++);
  return new Promise((resolve, reject) => {
    if (!state.wsOpen) { reject(new Error("not connected")); return; }
    state.pending.set(id, { resolve, reject });
    state.ws.send(JSON.stringify({ ...message, id }));
  });
}

function onMessage(message) {
  switch (message.type) {
    case "welcome":
      state.wsOpen = true;
      state.role = message.role;
      subscribe();
      break;
    case "ack": case "error": {
      const waiter = state.pending.get(message.id);
      if (waiter) { state.pending.delete(message.id); waiter.resolve(message); }
      break;
    }
    case "event": state.queue.push(message); schedule(); break;
    case "command_result": commandState(message.command_id, message.device_id, null, message.state, message); break;
    case "job": jobSeen(message); break;
    case "token_expiring": setToken(message.expires_at, "warn"); break;
  }
}

async function subscribe() {
  const resume = {};
  // Only after a reconnect: the first snapshot is the starting point, nothing was missed yet.
  const seen = !state.subscribed ? [] : state.ids.filter((id) => state.devices.get(id).seq > 0)
    .sort((a, b) => state.devices.get(b).seq - state.devices.get(a).seq).slice(0, RESUME_MAX);
  for (const id of seen) resume[id] = state.devices.get(id).seq;
  const events = state.features.twin ? [...EVENT_CLASSES, "twin"] : EVENT_CLASSES;
  const message = { type: "subscribe", devices: ["*"], events };
  if (seen.length) message.resume = resume;
  if (state.features.jobs) message.jobs = true;
  const ack = await request(message);
  if (ack.type === "error") { setLive(`subscribe refused: ${ack.message}`, "bad"); return; }
  state.backoff = 1000;
  state.subscribed = true;
  setLive("live", "ok");
  let added = false;
  for (const row of ack.snapshot) {
    let device = state.devices.get(row.device_id);
    if (!device) { putDevice({ id: row.device_id }); device = state.devices.get(row.device_id); added = true; }
    device.connected = row.connected;
    device.last_seen_at = row.last_seen_at;
    device.status = row.status;
    if (!seen.length || !(row.device_id in resume)) device.seq = row.seq;  // replays follow for resumed ones
  }
  if (added) sortIds();
  if (ack.recovered) {
    const lost = Object.keys(ack.recovered).filter((id) => !ack.recovered[id]);
    tailLine("rec", null, `resumed ${Object.keys(ack.recovered).length} devices: ${lost.length ? `history lost for ${lost.join(", ")}` : "all recovered"}`);
  }
  refilter();
}

function setLive(text, cls) { const pill = $("h-live"); pill.textContent = `live: ${text}`; pill.className = `pill ${cls}`; }

// ---- events, batched per animation frame ---------------------------------------------------
function schedule() { if (!state.frame) state.frame = requestAnimationFrame(flush); }

function flush() {
  state.frame = 0;
  const events = state.queue; state.queue = [];
  let membership = false;   // a change that may move a device in or out of the filter
  let registry = false;
  for (const event of events) {
    let device = state.devices.get(event.device_id);
    if (!device && event.event !== "device.deleted") {
      putDevice({ id: event.device_id }); device = state.devices.get(event.device_id); registry = true;
    }
    if (device) {
      if (device.seq && event.seq > device.seq + 1) {
        tailLine("gap", event, `seq gap on ${event.device_id}: ${device.seq} → ${event.seq} (${event.seq - device.seq - 1} missed)`);
      }
      if (event.seq <= device.seq) continue;  // a replayed duplicate
      device.seq = event.seq;
      device.flash = performance.now();
    }
    const data = event.data || {};
    switch (event.event) {
      case "device.connected": device.connected = true; device.last_seen_at = event.at; membership = true; break;
      case "device.disconnected": device.connected = false; device.last_seen_at = event.at; membership = true; break;
      case "device.status": device.status = data.status; membership = true; break;
      case "device.telemetry": device.last_seen_at = event.at; break;
      case "device.registered": case "device.updated": putDevice(data); registry = true; membership = true; break;
      case "device.deleted": state.devices.delete(event.device_id); registry = true; break;
      case "command.updated": commandState(data.command_id, event.device_id, data.name, data.state, data); break;
    }
    tailEvent(event);
    if (state.drawer && state.drawer.id === event.device_id) drawerEvent(event);
  }
  if (registry) sortIds();
  if (membership || registry) refilter(); else { renderRows(); renderTiles(); }
}

// ---- fleet tiles and table -----------------------------------------------------------------
function category(device, now) {
  if (device.disabled) return "disabled";
  if (device.connected) return "connected";
  if (!device.last_seen_at) return "never";
  return now - Date.parse(device.last_seen_at) > STALE_MS ? "stale" : "offline";
}

function globRegex(glob) {
  let source = "";
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i];
    if (c === "*") source += ".*";
    else if (c === "?") source += ".";
    else if (c === "[") {
      const end = glob.indexOf("]", i + 2);
      if (end < 0) { source += "\\["; continue; }
      let set = glob.slice(i + 1, end).replace(/\\/g, "\\\\");
      if (set[0] === "!") set = "^" + set.slice(1);
      source += `[${set}]`; i = end;
    } else source += c.replace(/[.+^${}()|\\\]]/g, "\\$&");
  }
  return new RegExp(`^${source}$`);
}

function refilter() {
  const { glob, tag, status } = state.filter;
  const now = Date.now();
  const pattern = !glob ? null : /[*?[]/.test(glob) ? globRegex(glob) : null;
  state.shown = state.ids.filter((id) => {
    const device = state.devices.get(id);
    if (pattern ? !pattern.test(id) : glob && !id.includes(glob)) return false;
    if (tag && !device.tags.includes(tag)) return false;
    if (status) {
      const cat = category(device, now);
      if (status === "offline" ? !(cat === "offline" || cat === "stale" || cat === "never") : cat !== status) return false;
    }
    return true;
  });
  $("spacer").style.height = `${state.shown.length * ROW_H}px`;
  $("shown").textContent = `${state.shown.length} of ${state.ids.length}`;
  renderRows(true);
  renderTiles();
}

function renderTiles() {
  const counts = { connected: 0, disabled: 0, never: 0, stale: 0, offline: 0 };
  const now = Date.now();
  for (const device of state.devices.values()) counts[category(device, now)]++;
  $("t-registered").textContent = state.devices.size;
  $("t-connected").textContent = counts.connected;
  $("t-offline").textContent = counts.offline + counts.stale + counts.never;
  $("t-disabled").textContent = counts.disabled;
  $("t-never").textContent = counts.never;
  $("t-stale").textContent = counts.stale;
}

const rowPool = [];
function renderRows() {
  const table = $("table");
  const first = Math.max(0, Math.floor(table.scrollTop / ROW_H) - 5);
  const count = Math.ceil(table.clientHeight / ROW_H) + 10;
  const now = Date.now();
  const perf = performance.now();
  while (rowPool.length < count) {
    const row = el("div", "row");
    for (let i = 0; i < 7; i++) row.appendChild(el("span"));
    row.addEventListener("click", () => openDrawer(row.dataset.id));
    table.appendChild(row); rowPool.push(row);
  }
  for (let i = 0; i < rowPool.length; i++) {
    const row = rowPool[i];
    const id = i < count ? state.shown[first + i] : undefined;
    if (id === undefined) { row.hidden = true; continue; }
    const device = state.devices.get(id);
    row.hidden = false;
    row.dataset.id = id;
    row.style.top = `${(first + i) * ROW_H}px`;
    const cells = row.children;
    const cat = category(device, now);
    cells[0].textContent = id;
    cells[1].textContent = device.name;
    cells[2].textContent = { connected: "online", disabled: "disabled", never: "never seen", stale: "stale", offline: "offline" }[cat];
    cells[2].className = `dot ${{ connected: "on", disabled: "dis", never: "never" }[cat] || "off"}`;
    cells[3].textContent = device.status || "";
    cells[4].textContent = device.last_seen_at ? ago(now - Date.parse(device.last_seen_at)) : "";
    cells[5].textContent = device.tags.join(", ");
    cells[6].textContent = device.seq;
    row.classList.toggle("flash", device.flash !== undefined && perf - device.flash < 800);
  }
}

function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

// ---- live tail -----------------------------------------------------------------------------
function describe(event) {
  const d = event.data || {};
  switch (event.event) {
    case "device.connected": return `connected (node ${d.node})`;
    case "device.disconnected": return `disconnected: ${d.reason} after ${d.connected_for_s} s`;
    case "device.status": return `status ${d.previous_status ?? "—"} → ${d.status} (${d.source})`;
    case "device.telemetry": return `telemetry ${JSON.stringify(d.values)}`;
    case "command.updated": return `command ${d.name} ${d.state}${d.error ? `: ${d.error.code}` : ""}`;
    case "twin.updated": return `twin v${d.version} delta ${JSON.stringify(d.delta)}`;
    default: return event.event;
  }
}

function tailEvent(event) {
  if (event.event === "device.telemetry" && !state.tail.telemetry) return;
  tailLine("", event, `${event.device_id} #${event.seq} ${describe(event)}`);
}

function tailLine(cls, event, text) {
  const li = el("li", cls);
  li.appendChild(el("time", null, (event ? new Date(event.at) : new Date()).toISOString().slice(11, 23)));
  li.appendChild(document.createTextNode(text));
  if (state.tail.paused) {
    state.tail.held.push(li);
    if (state.tail.held.length > TAIL_MAX) state.tail.held.shift();
    $("tail-held").textContent = `${state.tail.held.length} held`;
    return;
  }
  prepend($("tail"), li, TAIL_MAX);
}

function prepend(list, li, max) {
  list.insertBefore(li, list.firstChild);
  while (list.childElementCount > max) list.lastChild.remove();
}

// ---- health, rates, presence, jobs (polled) --------------------------------------------------
async function poll() {
  if (!state.token) return;
  try {
    const response = await fetch("/readyz");
    const ready = await response.json();
    pill("h-ready", `ready: ${ready.status}`, response.ok ? "ok" : "bad");
    pill("h-store", `store ${ready.checks.store}`, ready.checks.store === "ok" ? "ok" : "bad");
    pill("h-broker", `broker ${ready.checks.broker}`, ready.checks.broker === "ok" ? "ok" : "bad");
  } catch (e) { pill("h-ready", "ready: unreachable", "bad"); }
  try {
    const overview = await api("/overview?minutes=15");
    pill("h-version", `v${overview.version}`, "");
    pill("h-uptime", `up ${ago(overview.uptime_s * 1000).replace(" ago", "")}`, "");
    const nodes = new Set([overview.node_id, ...overview.activity.nodes]);
    pill("h-nodes", `nodes ${nodes.size}: ${[...nodes].join(", ")}`, "");
    renderActivity(overview.activity);
  } catch (e) {
    if (e.status === 401) { signOut("The server refused the token: sign in again."); return; }
  }
  if (state.features.jobs) {
    try {
      const page = await api("/jobs?limit=20");
      for (const job of page.items) mergeJob(job);
      renderJobs();
    } catch (e) { /* shown next time */ }
  }
  renderTiles();  // "stale" moves with the clock
}

function pill(id, text, cls) { const node = $(id); node.textContent = text; node.className = `pill ${cls}`; }

function svgNode(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function chart(id, label, series) {
  // One minute per slot, the series side by side within it; the last slot is the current minute.
  const box = $(id); box.replaceChildren();
  const legend = el("div");
  legend.appendChild(el("div", null, label));
  const names = el("div", "legend");
  for (const s of series) { const name = el("span", null, `■ ${s.name} `); name.style.color = s.color; names.appendChild(name); }
  legend.appendChild(names);
  box.appendChild(legend);
  const slots = series[0].values.length;
  const max = Math.max(1, ...series.flatMap((s) => s.values));
  const svg = svgNode("svg", { viewBox: `0 0 ${slots * series.length * 4} 34`, preserveAspectRatio: "none" });
  series.forEach((s, j) => s.values.forEach((v, i) => {
    const h = (v / max) * 32;
    svg.appendChild(svgNode("rect", { x: (i * series.length + j) * 4 + 0.4, width: 3.2, y: 34 - h, height: h, fill: s.color }));
  }));
  box.appendChild(svg);
  box.appendChild(el("div", "n", series.map((s) => s.values[s.values.length - 1]).join(" / ")));
}

function renderActivity(activity) {
  const m = activity.minutes;
  const col = (k) => m.map((row) => row[k]);
  $("rates-minutes").textContent = m.length;
  $("rates-since").textContent = `per minute, counted since ${activity.since.slice(0, 16).replace("T", " ")} UTC`;
  chart("c-presence", "connects / disconnects", [
    { name: "connects", values: col("connects"), color: "#3fb97f" },
    { name: "disconnects", values: col("disconnects"), color: "#e5534b" }]);
  chart("c-telemetry", "telemetry records", [{ name: "records", values: col("telemetry"), color: "#4c9be8" }]);
  chart("c-commands", "commands", [
    { name: "issued", values: col("commands_issued"), color: "#8593a3" },
    { name: "succeeded", values: col("commands_succeeded"), color: "#3fb97f" },
    { name: "failed", values: col("commands_failed"), color: "#e5534b" },
    { name: "timed out", values: col("commands_timed_out"), color: "#e0a43a" }]);
  const reasons = $("reasons"); reasons.replaceChildren();
  const entries = Object.entries(activity.disconnect_reasons);
  const max = Math.max(1, ...entries.map(([, n]) => n));
  if (!entries.length) reasons.appendChild(el("p", "legend", "none"));
  for (const [reason, n] of entries) {
    const row = el("div");
    row.appendChild(el("span", null, reason));
    const bar = el("i"); bar.style.width = `${(n / max) * 100}%`; row.appendChild(bar);
    row.appendChild(el("span", "n", n));
    reasons.appendChild(row);
  }
  $("flap-threshold").textContent = `(≥ ${activity.flapping_threshold} disconnects)`;
  const list = $("flapping"); list.replaceChildren();
  if (!activity.flapping.length) list.appendChild(el("li", "legend", "none"));
  for (const row of activity.flapping) {
    const li = el("li");
    const link = el("a", null, row.device_id); link.addEventListener("click", () => openDrawer(row.device_id));
    li.appendChild(link);
    li.appendChild(el("span", null, `${row.disconnects}×, last ${ago(Date.now() - Date.parse(row.last_at))}`));
    list.appendChild(li);
  }
}

// A job's snapshots arrive from two places: `job` frames on the socket (state and counts only)
// and the REST poll (the whole job). A REST reply can be older than a frame that overtook it,
// so a snapshot replaces the one shown only if it is not behind it: a job's executions only
// move forward (pending → sent → final), so 2·final + sent never decreases, and a finished
// state is never followed by a running one.
const JOB_FINAL_STATES = new Set(["succeeded", "completed", "aborted", "canceled"]);
const JOB_FINAL_COUNTS = ["succeeded", "failed", "timed_out", "expired", "skipped", "canceled"];
function jobProgress(job) {
  const c = job.counts || {};
  return [JOB_FINAL_STATES.has(job.state) ? 1 : 0, 2 * JOB_FINAL_COUNTS.reduce((n, k) => n + (c[k] || 0), 0) + (c.sent || 0)];
}
function mergeJob(snapshot) {
  const known = state.jobs.get(snapshot.job_id);
  if (known) {
    const [knownFinal, knownMoved] = jobProgress(known), [final, moved] = jobProgress(snapshot);
    const behind = final < knownFinal || (final === knownFinal && moved < knownMoved);
    // A stale snapshot still brings what the frames lack (the command, created_at).
    state.jobs.set(snapshot.job_id, behind ? { ...snapshot, ...known } : { ...known, ...snapshot });
  } else state.jobs.set(snapshot.job_id, snapshot);
}
function jobSeen(frame) {
  const { type, at, ...snapshot } = frame;
  const unknown = !state.jobs.has(frame.job_id);
  mergeJob(snapshot);
  renderJobs();
  // A job created after the last poll: fetch it once for its command and creation time.
  if (unknown) api(`/jobs/${encodeURIComponent(frame.job_id)}`).then((job) => { mergeJob(job); renderJobs(); }, () => {});
}

function renderJobs() {
  const list = $("job-list"); list.replaceChildren();
  const jobs = [...state.jobs.values()].sort((a, b) => (b.created_at || "").localeCompare(a.created_at || "")).slice(0, 20);
  if (!jobs.length) list.appendChild(el("li", "legend", "no jobs"));
  for (const job of jobs) {
    const c = job.counts || {};
    const total = Math.max(1, c.total || 0);
    const li = el("li"); li.dataset.job = job.job_id; li.title = job.job_id;
    li.appendChild(el("span", "name", `${(job.command && job.command.name) || job.job_id}`));
    const bar = el("div", "progress");
    for (const [cls, n] of [["s", c.succeeded || 0], ["f", (c.failed || 0) + (c.timed_out || 0)],
      ["o", (c.expired || 0) + (c.skipped || 0) + (c.canceled || 0)], ["p", c.sent || 0]]) {
      const part = el("i", cls); part.style.width = `${(n / total) * 100}%`; bar.appendChild(part);
    }
    li.appendChild(bar);
    li.appendChild(el("span", `state ${job.state}`, `${job.state} ${(c.succeeded || 0)}/${c.total || 0}`));
    const parts = [["succeeded", c.succeeded], ["sent", c.sent], ["failed", c.failed], ["timed out", c.timed_out],
      ["expired", c.expired], ["skipped", c.skipped], ["canceled", c.canceled]].filter(([, n]) => n > 0);
    li.appendChild(el("span", "counts legend", parts.map(([label, n]) => `${n} ${label}`).join(" · ")));
    list.appendChild(li);
  }
}

// ---- the device drawer ---------------------------------------------------------------------
async function openDrawer(id) {
  if (!id) return;
  state.drawer = { id, latest: new Map(), commands: new Map(), twin: null };
  $("drawer").hidden = false;
  $("d-title").textContent = id;
  for (const list of ["d-latest", "d-events", "d-commands", "d-conn"]) $(list).replaceChildren();
  $("d-toggle-msg").textContent = "";
  $("d-command").hidden = !["operator", "admin"].includes(state.role);
  const drawer = state.drawer;
  try {
    const [device, latest, history] = await Promise.all([
      api(`/devices/${encodeURIComponent(id)}`),
      api(`/devices/${encodeURIComponent(id)}/telemetry/latest`),
      api(`/devices/${encodeURIComponent(id)}/events?since=${Math.max(0, (state.devices.get(id)?.seq || 0) - DRAWER_EVENTS)}&limit=${DRAWER_EVENTS}`),
    ]);
    if (state.drawer !== drawer) return;
    renderConnection(device);
    await loadLatest(drawer, latest);
    for (const event of history.items) drawerEvent(event, true);
    if (state.features.twin) loadTwin(drawer);
  } catch (e) {
    $("d-events").appendChild(el("li", "gap", `could not load: ${e.message}`));
  }
}

function renderConnection(device) {
  const conn = device.connection || {};
  const dl = $("d-conn"); dl.replaceChildren();
  const rows = [["connected", conn.connected ? "yes" : "no"], ["session", conn.session_id], ["node", conn.node],
    ["connected at", conn.connected_at], ["last seen", conn.last_seen_at], ["status", device.status],
    ["type", device.type], ["tags", (device.tags || []).join(", ")], ["disabled", device.disabled ? "yes" : "no"]];
  for (const [k, v] of rows) { dl.appendChild(el("dt", null, k)); dl.appendChild(el("dd", null, v ?? "—")); }
  const toggle = $("d-toggle");
  toggle.textContent = device.disabled ? "enable" : "disable";
  toggle.dataset.disabled = device.disabled ? "1" : "";
  toggle.hidden = state.role !== "admin";
}

async function loadLatest(drawer, latest) {
  const entries = Object.entries(latest.values || latest);
  for (const [key, value] of entries) drawer.latest.set(key, { value: value.value, ts: value.ts, points: [] });
  const numeric = entries.filter(([, v]) => typeof v.value === "number").slice(0, 12);
  await Promise.all(numeric.map(async ([key]) => {
    const page = await api(`/devices/${encodeURIComponent(drawer.id)}/telemetry?key=${encodeURIComponent(key)}&limit=${SPARK_POINTS}`);
    const items = page.items || [];
    drawer.latest.get(key).points = items.map((r) => (r.data ? r.data[key] : r.value)).filter((v) => typeof v === "number").reverse();
  }));
  renderLatest(drawer);
}

function spark(points) {
  const svg = svgNode("svg", { viewBox: "0 0 120 20", preserveAspectRatio: "none" });
  if (points.length > 1) {
    const min = Math.min(...points), max = Math.max(...points), span = max - min || 1;
    svg.appendChild(svgNode("polyline", {
      points: points.map((p, i) => `${(i / (points.length - 1)) * 120},${19 - ((p - min) / span) * 18}`).join(" "),
      fill: "none", stroke: "#4c9be8", "stroke-width": "1.5", "vector-effect": "non-scaling-stroke",
    }));
  }
  return svg;
}

function renderLatest(drawer) {
  const table = $("d-latest"); table.replaceChildren();
  for (const [key, v] of [...drawer.latest.entries()].sort()) {
    const tr = el("tr"); tr.dataset.key = key;
    tr.appendChild(el("td", null, key));
    tr.appendChild(el("td", "value", typeof v.value === "string" ? v.value : JSON.stringify(v.value)));
    const cell = el("td"); cell.appendChild(spark(v.points)); tr.appendChild(cell);
    tr.appendChild(el("td", "legend", v.ts ? v.ts.slice(11, 19) : ""));
    table.appendChild(tr);
  }
}

async function loadTwin(drawer) {
  try {
    const twin = await api(`/devices/${encodeURIComponent(drawer.id)}/twin`);
    if (state.drawer !== drawer) return;
    drawer.twin = twin; renderTwin(twin);
  } catch (e) { $("d-twin-box").hidden = true; }
}

function renderTwin(twin) {
  $("d-twin-box").hidden = false;
  $("d-twin-version").textContent = `version ${twin.version}`;
  $("d-desired").textContent = JSON.stringify(twin.desired, null, 1);
  $("d-reported").textContent = JSON.stringify(twin.reported, null, 1);
  $("d-delta").textContent = JSON.stringify(twin.delta, null, 1);
}

function drawerEvent(event, fromHistory = false) {
  const drawer = state.drawer;
  const d = event.data || {};
  prepend($("d-events"), tailItem(event), DRAWER_EVENTS);
  if (event.event === "device.telemetry") {
    for (const [key, value] of Object.entries(d.values || {})) {
      const entry = drawer.latest.get(key) || { points: [] };
      entry.value = value; entry.ts = d.ts;
      if (typeof value === "number") { entry.points.push(value); if (entry.points.length > SPARK_POINTS) entry.points.shift(); }
      drawer.latest.set(key, entry);
    }
    if (!fromHistory) renderLatest(drawer);
  } else if (event.event === "command.updated") {
    commandState(d.command_id, event.device_id, d.name, d.state, d);
  } else if (event.event === "twin.updated" && drawer.twin) {
    loadTwin(drawer);
  } else if (!fromHistory && ["device.connected", "device.disconnected", "device.status", "device.updated"].includes(event.event)) {
    api(`/devices/${encodeURIComponent(drawer.id)}`).then((device) => { if (state.drawer === drawer) renderConnection(device); }, () => {});
  }
}

function tailItem(event) {
  const li = el("li");
  li.appendChild(el("time", null, new Date(event.at).toISOString().slice(11, 23)));
  li.appendChild(document.createTextNode(`#${event.seq} ${describe(event)}`));
  return li;
}

function commandState(commandId, deviceId, name, commandStateName, detail) {
  if (!commandId) return;
  const command = state.commands.get(commandId) || { device_id: deviceId, name, state: null };
  if (name) command.name = name;
  const final = ["succeeded", "failed", "timed_out", "expired"];
  if (!(final.includes(command.state) && !final.includes(commandStateName))) command.state = commandStateName;
  if (detail && (detail.result !== undefined || detail.error !== undefined)) { command.result = detail.result; command.error = detail.error; }
  state.commands.set(commandId, command);
  if (state.commands.size > 2000) state.commands.delete(state.commands.keys().next().value);
  const drawer = state.drawer;
  if (drawer && drawer.id === command.device_id) renderCommand(commandId, command);
}

function renderCommand(commandId, command) {
  const list = $("d-commands");
  let li = list.querySelector(`li[data-command="${CSS.escape(commandId)}"]`);
  if (!li) { li = el("li"); li.dataset.command = commandId; list.insertBefore(li, list.firstChild); }
  li.replaceChildren();
  li.appendChild(el("span", `state ${command.state}`, command.state));
  li.appendChild(el("span", null, command.name || ""));
  const outcome = command.error ? `${command.error.code}: ${command.error.message}` : command.result ? JSON.stringify(command.result) : "";
  li.appendChild(el("code", null, outcome));
  li.title = commandId;
}

async function sendCommand(event) {
  event.preventDefault();
  const drawer = state.drawer;
  const name = $("c-name").value.trim();
  let params = {};
  const list = $("d-commands");
  const li = el("li"); list.insertBefore(li, list.firstChild);
  const show = (cls, text) => { li.replaceChildren(el("span", `state ${cls}`, cls), el("span", null, name), el("code", null, text)); };
  try { params = $("c-params").value.trim() ? JSON.parse($("c-params").value) : {}; } catch (e) { show("error", `params: ${e.message}`); return; }
  show("sending", "");
  const ack = await request({
    type: "command", device_id: drawer.id, name, params, timeout_s: Number($("c-timeout").value) || 30,
    queue: $("c-queue").checked, idempotency_key: crypto.randomUUID(),
  }).catch((e) => ({ type: "error", code: "disconnected", message: e.message }));
  if (ack.type === "error") { show("error", `${ack.code}: ${ack.message}`); return; }
  li.dataset.command = ack.command_id;
  const known = state.commands.get(ack.command_id);
  commandState(ack.command_id, drawer.id, name, known && known.state ? known.state : ack.state, null);
}

async function toggleDisabled() {
  const drawer = state.drawer;
  const disable = !$("d-toggle").dataset.disabled;
  try {
    const device = await api(`/devices/${encodeURIComponent(drawer.id)}`, { method: "PATCH", body: { disabled: disable } });
    renderConnection(device);
  } catch (e) { $("d-toggle-msg").textContent = e.message; }
}

// ---- start ---------------------------------------------------------------------------------
function setToken(expiresAt, cls) {
  const left = Date.parse(expiresAt) - Date.now();
  pill("h-token", `token ${state.claims ? state.claims.sub : ""} (${state.claims ? state.claims.role : ""}), ${left > 0 ? `expires in ${ago(left).replace(" ago", "")}` : "expired"}`, cls);
}

async function start(token) {
  state.token = token;
  state.claims = decodeClaims(token);
  $("signin").hidden = true; $("main").hidden = false;
  if (state.claims && state.claims.exp) setToken(new Date(state.claims.exp * 1000).toISOString(), "");
  await detectFeatures();
  try {
    await loadDevices();
  } catch (e) {
    signOut(e.status === 401 || e.status === 403 ? `The server refused the token: ${e.message}` : `Could not load devices: ${e.message}`);
    return;
  }
  refilter();
  connect();
  poll();
}

function wire() {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("signin-token").value.trim();
    sessionStorage.setItem("fleetwire.token", token);
    $("signin-token").value = "";
    start(token);
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  $("table").addEventListener("scroll", () => { if (!state.frame) state.frame = requestAnimationFrame(() => { state.frame = 0; renderRows(); }); }, { passive: true });
  let typing = 0;
  $("f-glob").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { state.filter.glob = $("f-glob").value.trim(); refilter(); }, 60);
  });
  $("f-tag").addEventListener("change", () => { state.filter.tag = $("f-tag").value; refilter(); });
  $("f-status").addEventListener("change", () => { state.filter.status = $("f-status").value; refilter(); });
  for (const tile of document.querySelectorAll(".tile")) {
    tile.addEventListener("click", () => {
      const value = tile.dataset.filter === "all" ? "" : tile.dataset.filter;
      $("f-status").value = value; state.filter.status = value; refilter();
    });
  }
  $("tail-pause").addEventListener("click", () => {
    state.tail.paused = !state.tail.paused;
    $("tail-pause").textContent = state.tail.paused ? "resume" : "pause";
    if (!state.tail.paused) {
      for (const li of state.tail.held) prepend($("tail"), li, TAIL_MAX);
      state.tail.held = []; $("tail-held").textContent = "";
    }
  });
  $("tail-telemetry").addEventListener("change", () => { state.tail.telemetry = $("tail-telemetry").checked; });
  $("d-close").addEventListener("click", () => { $("drawer").hidden = true; state.drawer = null; });
  $("d-command").addEventListener("submit", sendCommand);
  $("d-toggle").addEventListener("click", toggleDisabled);
  window.addEventListener("resize", () => renderRows());
  setInterval(poll, 5000);
  setInterval(() => { if (state.claims && state.claims.exp && state.token) setToken(new Date(state.claims.exp * 1000).toISOString(), ""); }, 30000);
  const token = takeToken();
  if (token) start(token); else $("signin").hidden = false;
}

wire();
