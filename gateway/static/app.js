// Demo page of the gateway: one BroadcasterClient, a publish form and a presence counter.
//
// Query parameters (for links and browser tests): conv, profile, types, token,
// history=0 (live only), hydrate=1, autoconnect=1.

import { BroadcasterClient } from "/client/broadcaster-client.js";

const MAX_ROWS = 1000;
const PRESENCE_EVERY_MS = 2000;

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
};

/** The open session: its client, conversation and presence timer. */
let session = null;
/** Keyed state entries of the hydrated conversation (key -> event). */
let entities = new Map();

const wsUrl = () => {
  const url = new URL("/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
};
const apiUrl = (conv, tail) => new URL(`/v1/conversations/${encodeURIComponent(conv)}/${tail}`, location.href);

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
  client.on("status", onStatus);
  client.on("event", onEvent);
  client.on("state", onState);
  client.on("reset", onReset);
  // Count this page as soon as the gateway has it (again, after a reconnect), not at the next poll.
  client.on("subscribed", () => pollPresence());
  client.on("error", (err) => note(`error ${err.code ?? ""}: ${err.message ?? ""}`, "error"));

  const options = { types: types || null, hydrate };
  // Replay what history holds (since 0) unless hydrating or asked for live events only.
  if (!hydrate && ui.history.checked) options.since = 0;
  try {
    client.subscribe(conv, options);
  } catch (err) {
    note(String(err.message ?? err), "error");
    client.close();
    return;
  }
  session = { client, conv, presenceTimer: setInterval(pollPresence, PRESENCE_EVERY_MS) };
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

function onStatus(s) {
  let detail = "";
  if (s.status === "connecting") detail = s.attempt ? `attempt ${s.attempt + 1}` : "";
  else if (s.status === "closed" && s.willReconnect) detail = `code ${s.code}, retrying in ${s.delayMs} ms`;
  else if (s.status === "failed") detail = `code ${s.code}${s.reason ? `: ${s.reason}` : ""}`;
  setStatus(s.status, detail);
}

function setStatus(status, detail) {
  ui.status.textContent = status;
  ui.status.dataset.status = status;
  ui.statusDetail.textContent = detail;
}

// ---- rendering -------------------------------------------------------------------------------

function onEvent(event) {
  const row = document.createElement("li");
  row.className = "event";
  row.dataset.seq = String(event.seq);
  row.dataset.type = event.type;
  row.append(
    cell("seq", String(event.seq)),
    cell("type", event.type),
    cell("data", JSON.stringify(event.data)),
  );
  if (event.key !== undefined) {
    row.append(cell("key", `key ${event.key}`));
    applyEntity(event);
  }
  row.title = `id ${event.id} · ${new Date(event.ts).toISOString()}`;
  append(row);
}

function onState(state) {
  entities = new Map(Object.entries(state.entities ?? {}));
  ui.stateSeq.textContent = `as of seq ${state.seq}`;
  renderState();
  note(`state: ${entities.size} entities as of seq ${state.seq} (epoch ${state.epoch})`, "state");
}

function onReset(reset) {
  const what = reset.reason === "epoch_changed" ? "the conversation's data was lost" : "older events are gone";
  note(`reset (${reset.reason}): ${what}; continuing from seq ${reset.seq}, epoch ${reset.epoch}`, "reset");
}

function applyEntity(event) {
  if (event.data === null) entities.delete(event.key);
  else entities.set(event.key, event);
  ui.stateSeq.textContent = `as of seq ${event.seq}`;
  renderState();
}

function renderState() {
  const rows = [];
  for (const [key, event] of entities) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = `${event.type} ${JSON.stringify(event.data)}`;
    rows.push(dt, dd);
  }
  ui.state.replaceChildren(...rows);
}

function note(text, kind) {
  const row = document.createElement("li");
  row.className = `note ${kind}`;
  row.textContent = text;
  append(row);
}

function cell(kind, text) {
  const span = document.createElement("span");
  span.className = kind;
  span.textContent = text;
  return span;
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
    ui.presence.title = Object.entries(body.by_profile ?? {})
      .map(([profile, n]) => `${profile}: ${n}`)
      .join(", ");
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
  if (q.get("autoconnect") === "1") connect();
}

init();
