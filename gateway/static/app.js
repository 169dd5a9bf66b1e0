// Demo page of the gateway: a small live inspector around one BroadcasterClient.
//
// Every event row shows its seq, publish time and the gateway that delivered it; seqs the
// profile (or the types filter) hides are shown as a marker row, so a gap never looks like
// a loss. Connects, reconnects, resumes and ws.reset appear in the list as they happen.
// The side panel polls presence and draws events per second (a canvas, no dependencies).
// The state panel (hydrate) shows the client's entities whole: an answer streamed with
// op=append grows in one entry (its data.text as a message), and a reload mid-answer shows
// the whole message so far, then the rest (docs/streaming.md).
//
// Query parameters (for links and browser tests): conv, profile, types, token,
// history=0 (live only), hydrate=1, autoconnect=0 (wait for the Connect button; the page
// connects on load otherwise; autoconnect=1 is accepted too).

import { BroadcasterClient } from "/client/broadcaster-client.js";

const MAX_ROWS = 1000;
const PRESENCE_EVERY_MS = 2000;
const RATE_WINDOW_S = 60;

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("connect-form"),
  conv: $("conv"),
  profile: $("profile"),
  types: $("types"),
  token: $("token"),
  history: $("history"),
  hydrate: $("hydrate"),
  connect: $("connect"),
  disconnect: $("disconnect"),
  status: $("status"),
  statusDetail: $("status-detail"),
  presence: $("presence"),
  presenceProfiles: $("presence-profiles"),
  events: $("events"),
  clear: $("clear"),
  statePanel: $("state-panel"),
  stateSeq: $("state-seq"),
  state: $("state"),
  pubForm: $("publish-form"),
  pubType: $("pub-type"),
  pubData: $("pub-data"),
  pubEntity: $("pub-entity"),
  pubKey: $("pub-key"),
  publish: $("publish"),
  pubResult: $("pub-result"),
  stat: {
    gateway: $("stat-gateway"),
    latest: $("stat-latest"),
    shown: $("stat-shown"),
    hidden: $("stat-hidden"),
    reconnects: $("stat-reconnects"),
    resets: $("stat-resets"),
  },
  rate: $("rate"),
  rateNow: $("rate-now"),
  ratePeak: $("rate-peak"),
  rateTotal: $("rate-total"),
};

/** The open session: its client, conversation, filter description and what it has seen. */
let session = null;
/** Keyed state entries of the hydrated conversation (key -> whole entity): the client's entity map. */
let entities = new Map();

const wsUrl = () => {
  const url = new URL("/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
};
const apiUrl = (conv, tail) => new URL(`/v1/conversations/${encodeURIComponent(conv)}/${tail}`, location.href);

// ---- events per second -------------------------------------------------------------------------

/** Counts per whole second, the last RATE_WINDOW_S of them (oldest first). */
const rate = {
  shown: new Array(RATE_WINDOW_S).fill(0),
  hidden: new Array(RATE_WINDOW_S).fill(0),
  second: Math.floor(Date.now() / 1000),
  peak: 0,
};

function rateAdvance() {
  const now = Math.floor(Date.now() / 1000);
  const steps = Math.min(RATE_WINDOW_S, now - rate.second);
  for (let i = 0; i < steps; i++) {
    rate.shown.shift();
    rate.shown.push(0);
    rate.hidden.shift();
    rate.hidden.push(0);
  }
  if (steps > 0) rate.second = now;
}

function rateCount(kind, n = 1) {
  rateAdvance();
  rate[kind][RATE_WINDOW_S - 1] += n;
}

function drawRate() {
  rateAdvance();
  const canvas = ui.rate;
  const ctx = canvas.getContext("2d");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(width * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const totals = rate.shown.map((n, i) => n + rate.hidden[i]);
  const top = Math.max(1, ...totals);
  const style = getComputedStyle(document.documentElement);
  const bar = width / RATE_WINDOW_S;
  ctx.strokeStyle = style.getPropertyValue("--border").trim() || "#ddd";
  ctx.beginPath();
  ctx.moveTo(0, height - 0.5);
  ctx.lineTo(width, height - 0.5);
  ctx.stroke();
  for (let i = 0; i < RATE_WINDOW_S; i++) {
    const shownH = (rate.shown[i] / top) * (height - 4);
    const hiddenH = (rate.hidden[i] / top) * (height - 4);
    ctx.fillStyle = style.getPropertyValue("--accent").trim() || "#2f6fde";
    ctx.fillRect(i * bar + 1, height - shownH, Math.max(1, bar - 2), shownH);
    ctx.fillStyle = style.getPropertyValue("--muted").trim() || "#999";
    ctx.fillRect(i * bar + 1, height - shownH - hiddenH, Math.max(1, bar - 2), hiddenH);
  }
  // "now" is the last complete second: the current one is still filling up.
  const now = totals[RATE_WINDOW_S - 2];
  rate.peak = Math.max(rate.peak, ...totals.slice(0, -1));
  const total = totals.reduce((a, b) => a + b, 0);
  ui.rateNow.textContent = String(now);
  ui.ratePeak.textContent = String(rate.peak);
  ui.rateTotal.textContent = String(total);
  canvas.dataset.total = String(total);
}

// ---- connection ----------------------------------------------------------------------------

function connect() {
  disconnect();
  const conv = ui.conv.value.trim();
  if (!ui.conv.checkValidity() || !conv) {
    ui.conv.reportValidity();
    return;
  }
  const profile = ui.profile.value.trim() || "default";
  const token = ui.token.value.trim();
  const types = ui.types.value.trim();
  const hydrate = ui.hydrate.checked;

  clearEvents();
  entities = new Map();
  ui.state.replaceChildren();
  ui.stateSeq.textContent = "";
  ui.statePanel.hidden = !hydrate;

  const client = new BroadcasterClient({ url: wsUrl(), profile, token: token || null });
  const options = { types: types || null, hydrate };
  // Replay what history holds (since 0) unless hydrating or asked for live events only.
  if (!hydrate && ui.history.checked) options.since = 0;
  const filter = types ? `profile '${profile}' and types ${types}` : `profile '${profile}'`;
  const current = {
    client,
    conv,
    filter,
    hydrate,
    /** True while a connection is up (between its hello and its close). */
    open: false,
    presenceTimer: null,
    /** Seq of the last position shown (event, state or reset); null until the stream is positioned. */
    lastSeq: hydrate ? null : (options.since ?? null),
    stats: { gateway: null, latest: null, shown: 0, hidden: 0, reconnects: 0, resets: 0, hellos: 0 },
  };
  session = current;
  renderStats();
  const mine = (handler) => (detail) => {
    if (session === current) handler(current, detail);
  };
  client.on("status", mine(onStatus));
  client.on("hello", mine(onHello));
  client.on("subscribed", mine(onSubscribed));
  client.on("event", mine(onEvent));
  client.on("state", mine(onState));
  client.on("reset", mine(onReset));
  client.on("entity", mine((s, change) => {
    if (change.convId !== s.conv) return;
    entities = client.entities(s.conv);
    ui.stateSeq.textContent = change.entity ? `as of seq ${change.entity.seq}` : ui.stateSeq.textContent;
    renderState();
  }));
  client.on("error", mine((s, err) => note(`error ${err.code ?? ""}: ${err.message ?? ""}`, "error")));
  try {
    client.subscribe(conv, options);
  } catch (err) {
    note(String(err.message ?? err), "error");
    client.close();
    session = null;
    return;
  }
  current.presenceTimer = setInterval(pollPresence, PRESENCE_EVERY_MS);
  pollPresence();
  ui.disconnect.disabled = false;
  syncQuery(conv, profile);
}

function disconnect() {
  if (!session) return;
  clearInterval(session.presenceTimer);
  session.client.close();
  session = null;
  ui.disconnect.disabled = true;
  setStatus("closed", "");
}

const CLOSE_MEANINGS = {
  1000: "closed",
  1001: "going away",
  1006: "connection lost",
  1011: "no pong in time",
  1012: "gateway draining",
  1013: "backend unavailable",
  4408: "too slow",
  4429: "too many messages",
};

function onStatus(s, st) {
  let detail = "";
  if (st.status === "connecting") detail = st.attempt ? `attempt ${st.attempt + 1}` : "";
  else if (st.status === "closed" && st.willReconnect) {
    detail = `code ${st.code}, retrying in ${st.delayMs} ms`;
    const meaning = CLOSE_MEANINGS[st.code] ?? st.reason ?? "";
    const why = `close ${st.code}${meaning ? `: ${meaning}` : ""}`;
    if (s.open) note(`disconnected from ${s.stats.gateway} (${why}); reconnecting in ${st.delayMs} ms`, "connection");
    else note(`could not connect (${why}); retrying in ${st.delayMs} ms`, "connection");
    s.open = false;
  } else if (st.status === "failed") {
    detail = `code ${st.code}${st.reason ? `: ${st.reason}` : ""}`;
    note(`gave up: close ${st.code}${st.reason ? ` (${st.reason})` : ""}`, "error");
  }
  setStatus(st.status, detail);
}

function onHello(s, hello) {
  s.stats.hellos += 1;
  const again = s.stats.hellos > 1;
  if (again) s.stats.reconnects += 1;
  s.stats.gateway = hello.gateway_id;
  s.open = true;
  const pos = s.client.position(s.conv);
  const where = again && pos?.seq !== null && pos?.seq !== undefined ? `; resuming after seq ${pos.seq}` : "";
  note(`${again ? "reconnected" : "connected"} to gateway ${hello.gateway_id} (connection ${hello.connection_id})${where}`,
    "connection");
  renderStats();
  pollPresence();
}

function onSubscribed(s, sub) {
  if (typeof sub.seq === "number") s.stats.latest = Math.max(s.stats.latest ?? 0, sub.seq);
  // Live only (no since, no hydrate): nothing older than this will come.
  if (s.lastSeq === null && !s.hydrate && typeof sub.seq === "number") s.lastSeq = sub.seq;
  if (s.stats.hellos > 1) note(`resubscribed to ${sub.conv_id} on ${s.stats.gateway}: latest seq ${sub.seq}, ` +
    `epoch ${sub.epoch}`, "connection");
  renderStats();
  // Count this page as soon as the gateway has it (again, after a reconnect), not at the next poll.
  pollPresence();
}

function setStatus(status, detail) {
  ui.status.textContent = status;
  ui.status.dataset.status = status;
  ui.statusDetail.textContent = detail;
}

// ---- rendering -------------------------------------------------------------------------------

function onEvent(s, event) {
  if (s.lastSeq !== null && event.seq > s.lastSeq + 1) gap(s, s.lastSeq + 1, event.seq - 1);
  s.lastSeq = event.seq;
  s.stats.shown += 1;
  s.stats.latest = Math.max(s.stats.latest ?? 0, event.seq);
  rateCount("shown");
  const row = document.createElement("li");
  row.className = "event";
  row.dataset.seq = String(event.seq);
  row.dataset.type = event.type;
  row.append(
    cell("seq", String(event.seq)),
    cell("time", clock(event.ts)),
    cell("gateway", s.stats.gateway ?? "?"),
    cell("type", event.type),
    cell("data", JSON.stringify(event.data)),
  );
  if (event.key !== undefined) row.append(cell("key", event.op === "append" ? `append to ${event.key}` : `key ${event.key}`));
  row.title = `id ${event.id} · published ${new Date(event.ts).toISOString()} · via ${s.stats.gateway ?? "?"}`;
  append(row);
  renderStats();
}

/** A marker for seqs from..to, which the profile or types filter kept from this page. */
function gap(s, from, to) {
  const count = to - from + 1;
  s.stats.hidden += count;
  rateCount("hidden", count);
  const row = document.createElement("li");
  row.className = "gap";
  row.dataset.from = String(from);
  row.dataset.to = String(to);
  const seqs = count === 1 ? `seq ${from}` : `seqs ${from}–${to}`;
  row.textContent = `${seqs}: ${count} event${count === 1 ? "" : "s"} hidden by ${s.filter} (not lost)`;
  append(row);
}

function onState(s, state) {
  s.lastSeq = state.seq;
  s.stats.latest = Math.max(s.stats.latest ?? 0, state.seq);
  entities = s.client.entities(s.conv);
  ui.stateSeq.textContent = `as of seq ${state.seq}`;
  renderState();
  note(`state: ${entities.size} entities as of seq ${state.seq} (epoch ${state.epoch})`, "state");
  renderStats();
}

function onReset(s, reset) {
  s.lastSeq = reset.seq;
  s.stats.resets += 1;
  s.stats.latest = reset.seq;
  const what = reset.reason === "epoch_changed" ? "the conversation's data was lost" : "older events are gone";
  note(`ws.reset (${reset.reason}): ${what}; continuing from seq ${reset.seq}, epoch ${reset.epoch}`, "reset");
  renderStats();
}

function renderStats() {
  const st = session?.stats;
  ui.stat.gateway.textContent = st?.gateway ?? "–";
  ui.stat.latest.textContent = st?.latest === null || st?.latest === undefined ? "–" : String(st.latest);
  ui.stat.shown.textContent = String(st?.shown ?? 0);
  ui.stat.hidden.textContent = String(st?.hidden ?? 0);
  ui.stat.reconnects.textContent = String(st?.reconnects ?? 0);
  ui.stat.resets.textContent = String(st?.resets ?? 0);
}

function renderState() {
  const rows = [];
  for (const [key, event] of entities) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.dataset.key = key;
    const text = event.data?.text;
    if (typeof text === "string") {
      // a message (streamed with op=append, or upserted whole): its text as it reads
      const { text: _text, ...rest } = event.data;
      const message = document.createElement("p");
      message.className = "message";
      message.textContent = text;
      dd.append(`${event.type} ${Object.keys(rest).length ? JSON.stringify(rest) : ""}`, message);
    } else {
      dd.textContent = `${event.type} ${JSON.stringify(event.data)}`;
    }
    rows.push(dt, dd);
  }
  ui.state.replaceChildren(...rows);
}

function note(text, kind) {
  const row = document.createElement("li");
  row.className = `note ${kind}`;
  const time = cell("time", clock(Date.now()));
  row.append(time, document.createTextNode(text));
  append(row);
}

function cell(kind, text) {
  const span = document.createElement("span");
  span.className = kind;
  span.textContent = text;
  return span;
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

/** Local wall-clock time with milliseconds, e.g. 14:03:07.215. */
function clock(ms) {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function append(row) {
  const list = ui.events;
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.append(row);
  while (list.childElementCount > MAX_ROWS) list.firstElementChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function clearEvents() {
  ui.events.replaceChildren();
}

// ---- presence and publishing -------------------------------------------------------------

async function pollPresence() {
  const current = session;
  if (!current) return;
  try {
    const res = await fetch(apiUrl(current.conv, "presence"));
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const body = await res.json();
    if (session !== current) return;
    ui.presence.textContent = String(body.connections);
    const byProfile = Object.entries(body.by_profile ?? {}).map(([profile, n]) => `${profile}: ${n}`).join(", ");
    ui.presence.title = byProfile;
    ui.presenceProfiles.textContent = byProfile ? `(${byProfile})` : "";
  } catch (err) {
    if (session === current) ui.presence.textContent = "?";
  }
}

async function publish() {
  const conv = ui.conv.value.trim();
  const type = ui.pubType.value.trim();
  let data;
  try {
    data = ui.pubData.value.trim() === "" ? null : JSON.parse(ui.pubData.value);
  } catch (err) {
    showPublishResult(`invalid JSON: ${err.message}`, true);
    return;
  }
  const body = { type, data };
  const entity = ui.pubEntity.value.trim();
  if (entity) body.key = entity;
  const headers = { "content-type": "application/json" };
  const key = ui.pubKey.value.trim();
  if (key) headers.authorization = `Bearer ${key}`;
  ui.publish.disabled = true;
  try {
    const res = await fetch(apiUrl(conv, "events"), { method: "POST", headers, body: JSON.stringify(body) });
    const answer = await res.json().catch(() => ({}));
    if (!res.ok) {
      showPublishResult(`HTTP ${res.status}: ${answer.message ?? answer.error ?? res.statusText}`, true);
      return;
    }
    showPublishResult(`published seq ${answer.seq}${answer.duplicate ? " (duplicate)" : ""}`, false);
  } catch (err) {
    showPublishResult(`failed: ${err.message}`, true);
  } finally {
    ui.publish.disabled = false;
  }
}

function showPublishResult(text, isError) {
  ui.pubResult.textContent = text;
  ui.pubResult.classList.toggle("error", isError);
}

// ---- wiring ------------------------------------------------------------------------------

function syncQuery(conv, profile) {
  const url = new URL(location.href);
  url.searchParams.set("conv", conv);
  url.searchParams.set("profile", profile);
  history.replaceState(null, "", url);
}

function init() {
  const q = new URLSearchParams(location.search);
  if (q.has("conv")) ui.conv.value = q.get("conv");
  if (q.has("profile")) ui.profile.value = q.get("profile");
  if (q.has("types")) ui.types.value = q.get("types");
  if (q.has("token")) ui.token.value = q.get("token");
  if (q.get("history") === "0") ui.history.checked = false;
  if (q.get("hydrate") === "1") ui.hydrate.checked = true;
  // A hydrated subscription starts from the state snapshot, not from history.
  const syncHistoryBox = () => (ui.history.disabled = ui.hydrate.checked);
  ui.hydrate.addEventListener("change", syncHistoryBox);
  syncHistoryBox();

  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  ui.disconnect.addEventListener("click", disconnect);
  ui.clear.addEventListener("click", clearEvents);
  ui.pubForm.addEventListener("submit", (e) => {
    e.preventDefault();
    publish();
  });
  setInterval(drawRate, 1000);
  drawRate();
  if (q.get("autoconnect") === "0") {
    setStatus("idle", "not connected: press Connect (the link has autoconnect=0)");
  } else {
    connect();
  }
}

init();
