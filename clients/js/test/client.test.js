// Unit tests of the client against a scripted fake server (no gateway needed).

import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:net";
import WebSocket from "ws";

import { BroadcasterClient } from "../broadcaster-client.js";
import { ev } from "../test-support/fake-server.js";
import { fakeServerFixture } from "../test-support/fixtures.js";
import { nextEmit, record, sleep, waitFor } from "../test-support/util.js";

const { startServer, makeClient } = fakeServerFixture();

const seqs = (events) => events.map((e) => e.seq);

test("an NDJSON frame carrying several objects is split and handled in order", async () => {
  const server = await startServer();
  const client = makeClient({ urls: [server.url] });
  const events = record(client, "event");
  client.subscribe("c1");
  const conn = await server.connection(0);
  await conn.waitMessage((m) => m.type === "ws.subscribe");
  conn.sendRaw(
    [ev("c1", 1), ev("c1", 2), ev("c1", 3, "chat.edit", { text: "a\\nb" })].map((e) => JSON.stringify(e)).join("\n") +
      "\n\n",
  );
  await waitFor(() => events.length === 3, { what: "3 events" });
  assert.deepEqual(seqs(events), [1, 2, 3]);
  assert.equal(events[2].type, "chat.edit");
  assert.deepEqual(events[2].data, { text: "a\\nb" });
});

test("an unparsable line is reported as an error; the rest of the frame is delivered", async () => {
  const server = await startServer();
  const client = makeClient({ urls: [server.url] });
  const events = record(client, "event");
  const errors = record(client, "error");
  client.subscribe("c1");
  const conn = await server.connection(0);
  await conn.waitMessage((m) => m.type === "ws.subscribe");
  conn.sendRaw(`${JSON.stringify(ev("c1", 1))}\n{not json\n${JSON.stringify(ev("c1", 2))}`);
  await waitFor(() => events.length === 2, { what: "2 events" });
  assert.deepEqual(seqs(events), [1, 2]);
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, "bad_frame");
  assert.equal(client.stats.badLines, 1);
});

test("events are deduplicated by seq, per conversation", async () => {
  const server = await startServer();
  const client = makeClient({ urls: [server.url] });
  const events = record(client, "event");
  client.subscribe("a").subscribe("b");
  const conn = await server.connection(0);
  await waitFor(() => conn.messages("ws.subscribe").length === 2);
  conn.send(ev("a", 1), ev("a", 2), ev("a", 2), ev("b", 1), ev("a", 1));
  conn.send(ev("a", 3), ev("b", 1), ev("b", 2));
  await waitFor(() => events.length === 5, { what: "5 events" });
  await sleep(30);
  assert.deepEqual(
    events.map((e) => `${e.conv_id}:${e.seq}`),
    ["a:1", "a:2", "b:1", "a:3", "b:2"],
  );
  assert.equal(client.stats.duplicatesDropped, 3);
  assert.deepEqual(client.position("a"), { convId: "a", seq: 3, epoch: "E1" });
});

test("a live-only subscription starts after the seq reported by ws.subscribed", async () => {
  const server = await startServer({ head: () => ({ epoch: "E9", seq: 5 }) });
  const client = makeClient({ urls: [server.url] });
  const events = record(client, "event");
  const subscribed = nextEmit(client, "subscribed");
  client.subscribe("c1");
  const conn = await server.connection(0);
  assert.deepEqual(await subscribed, { type: "ws.subscribed", conv_id: "c1", epoch: "E9", seq: 5 });
  conn.send(ev("c1", 5), ev("c1", 6));
  await waitFor(() => events.length === 1);
  await sleep(30);
  assert.deepEqual(seqs(events), [6]);
});

test("since and epoch given by the application are sent on the first subscribe", async () => {
  const server = await startServer();
  const client = makeClient({ urls: [server.url], profile: "chat" });
  client.subscribe("c1", { since: 41, epoch: "E7", types: ["chat.*", "llm.*"] });
  const conn = await server.connection(0);
  const sub = await conn.waitMessage((m) => m.type === "ws.subscribe");
  assert.deepEqual(sub, { type: "ws.subscribe", conv_id: "c1", since: 41, epoch: "E7", types: "chat.*,llm.*" });
  assert.equal(conn.url.searchParams.get("profile"), "chat");
  assert.equal(conn.url.searchParams.get("token"), null);
});

test("after a server-side close the client reconnects and resubscribes every conversation with since + epoch", async () => {
  const server = await startServer({ head: (conv) => ({ epoch: `E-${conv}`, seq: 2 }) });
  const client = makeClient({ urls: [server.url] });
  const events = record(client, "event");
  const statuses = record(client, "status");
  client.subscribe("a");
  client.subscribe("b", { types: "chat.*" });
  const first = await server.connection(0);
  await waitFor(() => first.messages("ws.subscribe").length === 2);
  await waitFor(() => client.position("a").epoch && client.position("b").epoch, { what: "ws.subscribed" });
  first.send(ev("a", 3), ev("a", 4), ev("b", 3));
  await waitFor(() => events.length === 3);
  first.close(1011, "internal error");

  const second = await server.connection(1);
  await waitFor(() => second.messages("ws.subscribe").length === 2, { what: "resubscribes" });
  const subs = Object.fromEntries(second.messages("ws.subscribe").map((m) => [m.conv_id, m]));
  assert.deepEqual(subs.a, { type: "ws.subscribe", conv_id: "a", since: 4, epoch: "E-a" });
  assert.deepEqual(subs.b, { type: "ws.subscribe", conv_id: "b", since: 3, epoch: "E-b", types: "chat.*" });

  // What the server replays is delivered once: 4 was seen already.
  second.send(ev("a", 4), ev("a", 5));
  await waitFor(() => events.length === 4);
  assert.deepEqual(
    events.map((e) => `${e.conv_id}:${e.seq}`),
    ["a:3", "a:4", "b:3", "a:5"],
  );
  const closed = statuses.find((s) => s.status === "closed");
  assert.equal(closed.code, 1011);
  assert.equal(closed.willReconnect, true);
  assert.ok(closed.delayMs >= 0 && closed.delayMs <= 20);
  assert.deepEqual(
    statuses.map((s) => s.status),
    ["connecting", "open", "closed", "connecting", "open"],
  );
});

test("an abnormal drop (1006) is followed by a reconnect", async () => {
  const server = await startServer();
  const client = makeClient({ urls: [server.url] });
  client.subscribe("c1");
  const first = await server.connection(0);
  await first.waitMessage((m) => m.type === "ws.subscribe");
  const closed = nextEmit(client, "status", (s) => s.status === "closed");
  first.terminate();
  assert.equal((await closed).code, 1006);
  const second = await server.connection(1);
  await second.waitMessage((m) => m.type === "ws.subscribe" && m.since === 0 && m.epoch === "E1");
});

for (const code of [4400, 4401, 4403, 4404]) {
  test(`close code ${code} is fatal: status "failed", no reconnect`, async () => {
    const server = await startServer();
    const client = makeClient({ urls: [server.url, server.url], backoff: { initialMs: 1, maxMs: 1 } });
    client.subscribe("c1");
    const conn = await server.connection(0);
    await conn.waitMessage((m) => m.type === "ws.subscribe");
    const failed = nextEmit(client, "status", (s) => s.status === "failed");
    conn.close(code, "refused");
    const status = await failed;
    assert.equal(status.code, code);
    assert.equal(status.reason, "refused");
    assert.equal(status.willReconnect, false);
    await sleep(150);
    assert.equal(server.connections.length, 1);
    assert.equal(client.status, "failed");
    // The application may start again on purpose.
    client.connect();
    await server.connection(1);
  });
}

test("close code 1012 (draining) reconnects at once to the next URL", async () => {
  const a = await startServer();
  const b = await startServer();
  // A backoff this long would fail the test: 1012 must not wait for it.
  const client = makeClient({ urls: [a.url, b.url], backoff: { initialMs: 60_000, maxMs: 60_000 } });
  const events = record(client, "event");
  client.subscribe("c1");
  const onA = await a.connection(0);
  await onA.waitMessage((m) => m.type === "ws.subscribe");
  onA.send(ev("c1", 1));
  await waitFor(() => events.length === 1);
  const closed = nextEmit(client, "status", (s) => s.status === "closed");
  onA.close(1012, "draining");
  const status = await closed;
  assert.equal(status.code, 1012);
  assert.equal(status.delayMs, 0);
  const onB = await b.connection(0, 2000);
  await onB.waitMessage((m) => m.type === "ws.subscribe" && m.since === 1 && m.epoch === "E1");
  assert.equal(a.connections.length, 1);
  assert.equal(client.url, b.url);
});

test("URLs are tried round-robin with backoff while they fail", async () => {
  const deadUrl = `ws://127.0.0.1:${await closedPort()}/ws`;
  const server = await startServer();
  const client = makeClient({ urls: [deadUrl, server.url], backoff: { initialMs: 10, maxMs: 10 } });
  const statuses = record(client, "status");
  client.subscribe("c1");
  const conn = await server.connection(0);
  await conn.waitMessage((m) => m.type === "ws.subscribe");
  const tried = statuses.filter((s) => s.status === "connecting").map((s) => s.url);
  assert.deepEqual(tried, [deadUrl, server.url]);
  const closed = statuses.find((s) => s.status === "closed");
  assert.equal(closed.willReconnect, true);
  assert.ok(closed.delayMs >= 5 && closed.delayMs <= 10, `delay ${closed.delayMs}`);
});

test("ws.reset is surfaced and moves the position, even backwards", async () => {
  const server = await startServer();
  const client = makeClient({ urls: [server.url] });
  const events = record(client, "event");
  const resets = record(client, "reset");
  client.subscribe("c1");
  const first = await server.connection(0);
  await first.waitMessage((m) => m.type === "ws.subscribe");
  first.send(ev("c1", 1), ev("c1", 2), ev("c1", 3));
  first.send({ type: "ws.reset", conv_id: "c1", reason: "epoch_changed", epoch: "E2", seq: 0 }, ev("c1", 1, "chat.new"));
  await waitFor(() => events.length === 4);
  assert.equal(resets.length, 1);
  assert.equal(resets[0].reason, "epoch_changed");
  assert.equal(resets[0].rehydrate, false);
  assert.deepEqual(seqs(events), [1, 2, 3, 1]);
  assert.equal(events[3].type, "chat.new");
  assert.deepEqual(client.position("c1"), { convId: "c1", seq: 1, epoch: "E2" });
  // No new subscribe for a non-hydrate subscription; a reconnect resumes in the new epoch.
  assert.equal(first.messages("ws.subscribe").length, 1);
  first.close(1001, "going away");
  const second = await server.connection(1);
  await second.waitMessage((m) => m.type === "ws.subscribe" && m.since === 1 && m.epoch === "E2");
});

test("history_truncated reset on resume: live from reset.seq", async () => {
  const server = await startServer({ head: () => ({ epoch: "E1", seq: 500 }) });
  const client = makeClient({ urls: [server.url] });
  const events = record(client, "event");
  const reset = nextEmit(client, "reset");
  client.subscribe("c1", { since: 3, epoch: "E1" });
  const conn = await server.connection(0);
  await conn.waitMessage((m) => m.type === "ws.subscribe");
  conn.send({ type: "ws.reset", conv_id: "c1", reason: "history_truncated", epoch: "E1", seq: 500 });
  assert.equal((await reset).seq, 500);
  conn.send(ev("c1", 4), ev("c1", 501));
  await waitFor(() => events.length === 1);
  await sleep(30);
  assert.deepEqual(seqs(events), [501]);
});

test("hydrate: ws.state sets the position, a reset asks for a fresh state, a reconnect resumes with since", async () => {
  const server = await startServer({ head: () => ({ epoch: "E1", seq: 7 }) });
  const client = makeClient({ urls: [server.url] });
  const events = record(client, "event");
  const states = record(client, "state");
  client.subscribe("c1", { hydrate: true, types: "timeline.*" });
  const first = await server.connection(0);
  const sub = await first.waitMessage((m) => m.type === "ws.subscribe");
  assert.deepEqual(sub, { type: "ws.subscribe", conv_id: "c1", hydrate: true, types: "timeline.*" });
  const entity = ev("c1", 6, "timeline.upsert", { text: "x" }, { key: "m1" });
  first.send({ type: "ws.state", conv_id: "c1", epoch: "E1", seq: 7, entities: { m1: entity } });
  first.send(ev("c1", 7), ev("c1", 8, "timeline.upsert", null, { key: "m1" }));
  await waitFor(() => events.length === 1);
  assert.equal(states.length, 1);
  assert.deepEqual(states[0].entities, { m1: entity });
  assert.deepEqual(seqs(events), [8]);
  assert.equal(events[0].key, "m1");
  assert.equal(events[0].data, null);

  // The backend lost the conversation: the client reports it and hydrates again.
  const reset = nextEmit(client, "reset");
  first.send({ type: "ws.reset", conv_id: "c1", reason: "epoch_changed", epoch: "E2", seq: 0 });
  assert.equal((await reset).rehydrate, true);
  await waitFor(() => first.messages("ws.subscribe").length === 2, { what: "re-hydrate subscribe" });
  assert.deepEqual(first.messages("ws.subscribe")[1], { type: "ws.subscribe", conv_id: "c1", hydrate: true, types: "timeline.*" });
  first.send({ type: "ws.subscribed", conv_id: "c1", epoch: "E2", seq: 2 });
  first.send({ type: "ws.state", conv_id: "c1", epoch: "E2", seq: 2, entities: {} });
  await waitFor(() => states.length === 2);
  assert.deepEqual(client.position("c1"), { convId: "c1", seq: 2, epoch: "E2" });

  // Once the state is held, a reconnect resumes (no second snapshot needed).
  first.close(1011);
  const second = await server.connection(1);
  const resub = await second.waitMessage((m) => m.type === "ws.subscribe");
  assert.deepEqual(resub, { type: "ws.subscribe", conv_id: "c1", since: 2, epoch: "E2", types: "timeline.*" });
});

test("hydrate: a connection lost before ws.state arrived asks for hydrate again", async () => {
  const server = await startServer();
  const client = makeClient({ urls: [server.url] });
  const subscribed = nextEmit(client, "subscribed");
  client.subscribe("c1", { hydrate: true });
  const first = await server.connection(0);
  await first.waitMessage((m) => m.type === "ws.subscribe");
  await subscribed;
  first.close(1011);
  const second = await server.connection(1);
  const resub = await second.waitMessage((m) => m.type === "ws.subscribe");
  assert.deepEqual(resub, { type: "ws.subscribe", conv_id: "c1", hydrate: true });
});

test("ping: ws.ping is sent periodically and ws.pong surfaced", async () => {
  const server = await startServer();
  const client = makeClient({ urls: [server.url], pingIntervalMs: 30, pongTimeoutMs: 1000 });
  const pongs = record(client, "pong");
  client.connect();
  const conn = await server.connection(0);
  await waitFor(() => pongs.length >= 2, { what: "2 pongs" });
  assert.ok(conn.messages("ws.ping").length >= 2);
  assert.equal(typeof pongs[0].server_time, "number");
  assert.equal(server.connections.length, 1);
});

test("ping: a server that stays silent after a ping is dropped and the client reconnects", async () => {
  const server = await startServer({ answerPings: false });
  const client = makeClient({ urls: [server.url], pingIntervalMs: 30, pongTimeoutMs: 60 });
  const closed = nextEmit(client, "status", (s) => s.status === "closed");
  client.subscribe("c1");
  await server.connection(0);
  const status = await closed;
  assert.equal(status.reason, "ping timeout");
  await server.connection(1);
});

test("ws.error is surfaced and the connection stays open", async () => {
  const server = await startServer();
  const client = makeClient({ urls: [server.url] });
  const events = record(client, "event");
  client.subscribe("c1");
  const conn = await server.connection(0);
  await conn.waitMessage((m) => m.type === "ws.subscribe");
  const error = nextEmit(client, "error");
  conn.send({ type: "ws.error", code: "bad_request", message: "unknown type" });
  assert.deepEqual(await error, { type: "ws.error", code: "bad_request", message: "unknown type" });
  conn.send(ev("c1", 1));
  await waitFor(() => events.length === 1);
  assert.equal(client.status, "open");
});

test("the URL carries profile, token and extra params; a token function is called on every connect", async () => {
  const server = await startServer();
  let calls = 0;
  const client = makeClient({
    urls: [server.url],
    profile: "debug",
    token: async () => `tok-${++calls}`,
    params: { lang: "en" },
  });
  client.connect();
  const first = await server.connection(0);
  assert.equal(first.url.pathname, "/ws");
  assert.equal(first.url.searchParams.get("profile"), "debug");
  assert.equal(first.url.searchParams.get("token"), "tok-1");
  assert.equal(first.url.searchParams.get("lang"), "en");
  first.close(1011);
  const second = await server.connection(1);
  assert.equal(second.url.searchParams.get("token"), "tok-2");
});

test("unsubscribe sends ws.unsubscribe and later events of that conversation are ignored", async () => {
  const server = await startServer();
  const client = makeClient({ urls: [server.url] });
  const events = record(client, "event");
  const unsubscribed = nextEmit(client, "unsubscribed");
  client.subscribe("a").subscribe("b");
  const conn = await server.connection(0);
  await waitFor(() => conn.messages("ws.subscribe").length === 2);
  assert.equal(client.unsubscribe("a"), true);
  assert.equal(client.unsubscribe("a"), false);
  await conn.waitMessage((m) => m.type === "ws.unsubscribe" && m.conv_id === "a");
  assert.equal((await unsubscribed).conv_id, "a");
  conn.send(ev("a", 1), ev("b", 1));
  await waitFor(() => events.length === 1);
  await sleep(30);
  assert.deepEqual(events.map((e) => e.conv_id), ["b"]);
  assert.deepEqual(client.subscriptions, ["b"]);
  assert.equal(client.position("a"), undefined);
});

test("close() stops the client for good: no reconnect", async () => {
  const server = await startServer();
  const client = makeClient({ urls: [server.url], backoff: { initialMs: 1, maxMs: 1 } });
  const statuses = record(client, "status");
  client.subscribe("c1");
  const conn = await server.connection(0);
  await conn.waitMessage((m) => m.type === "ws.subscribe");
  client.close();
  assert.equal(client.status, "closed");
  assert.equal((await conn.closed).code, 1000);
  await sleep(100);
  assert.equal(server.connections.length, 1);
  assert.deepEqual(statuses.at(-1), { status: "closed", code: 1000, reason: "client closed", willReconnect: false });
});

test("subscribe rejects invalid arguments", () => {
  const client = new BroadcasterClient({ url: "ws://127.0.0.1:1/ws", WebSocket, autoConnect: false });
  assert.throws(() => client.subscribe("bad id"), TypeError);
  assert.throws(() => client.subscribe("x".repeat(129)), TypeError);
  assert.throws(() => client.subscribe("ok", { since: -1 }), TypeError);
  assert.throws(() => client.subscribe("ok", { since: 1.5 }), TypeError);
  assert.equal(client.status, "idle");
  assert.throws(() => new BroadcasterClient({ urls: [], WebSocket }), TypeError);
  assert.throws(() => new BroadcasterClient({ url: "ftp://x/ws", WebSocket }), TypeError);
});

test("http(s) URLs are accepted and turned into ws(s)", async () => {
  const server = await startServer();
  const client = makeClient({ url: server.url.replace("ws://", "http://") });
  const open = nextEmit(client, "status", (s) => s.status === "open");
  client.connect();
  assert.equal((await open).url, server.url);
});

/** A TCP port on which nothing listens. */
async function closedPort() {
  const srv = createServer();
  await new Promise((resolve) => srv.listen(0, "127.0.0.1", resolve));
  const { port } = srv.address();
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

test("close() and connect() while a token is being fetched leave exactly one socket", async () => {
  const server = await startServer();
  let release;
  const gate = new Promise((resolve) => (release = resolve));
  let calls = 0;
  const client = makeClient({
    urls: [server.url],
    token: async () => {
      calls += 1;
      if (calls === 1) await gate;
      return `tok-${calls}`;
    },
  });
  client.connect();
  await waitFor(() => calls === 1);
  client.close();
  client.connect();
  release();
  const conn = await server.connection(0);
  await sleep(100);
  assert.equal(server.connections.length, 1);
  assert.equal(conn.url.searchParams.get("token"), "tok-2");
});

test("a failing token provider is reported and retried with backoff", async () => {
  const server = await startServer();
  let calls = 0;
  const client = makeClient({
    urls: [server.url],
    token: () => {
      calls += 1;
      if (calls === 1) throw new Error("auth service down");
      return "good";
    },
  });
  const error = nextEmit(client, "error");
  client.connect();
  assert.equal((await error).code, "token");
  const conn = await server.connection(0);
  assert.equal(conn.url.searchParams.get("token"), "good");
});

test("maxAttempts turns endless failures into status failed", async () => {
  const deadUrl = `ws://127.0.0.1:${await closedPort()}/ws`;
  const client = makeClient({ urls: [deadUrl], maxAttempts: 2, backoff: { initialMs: 5, maxMs: 5 } });
  const failed = nextEmit(client, "status", (s) => s.status === "failed");
  client.connect();
  const status = await failed;
  assert.equal(status.attempts, 2);
  assert.equal(client.stats.connects, 3);
});
