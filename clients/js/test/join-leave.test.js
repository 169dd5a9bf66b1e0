// ws.join / ws.leave: the client's "join" and "leave" events {conv_id, user, info?}, for subscribed
// conversations only, in stream order - over the fake websocket server, over a fake /sse fetch
// (`event: ws.join`, no `id:`, as the gateway writes them), then against a real gateway whose
// namespaces file turns join_leave on for jsjl-* (and off for jsplain-*), with a short
// --join-leave-delay. Every wait polls with a deadline.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket from "ws";

import { BroadcasterClient } from "../broadcaster-client.js";
import { ev } from "../test-support/fake-server.js";
import { Gateway, findGateway } from "../test-support/gateway.js";
import { fakeServerFixture } from "../test-support/fixtures.js";
import { nextEmit, record, subscribeAll, waitFor } from "../test-support/util.js";

const { startServer, makeClient } = fakeServerFixture();

/** Every "event", "join" and "leave" in the order emitted, as [name, detail]. */
function recordStream(client) {
  const seen = [];
  for (const name of ["event", "join", "leave"]) client.on(name, (detail) => seen.push([name, detail]));
  return seen;
}

const presenceOf = (seen) => seen.filter(([name]) => name !== "event");

/** What the gateway sends, in one frame: the objects of one conversation between two of its events. */
const SCRIPT = (conv) => [
  ev(conv, 1),
  { type: "ws.join", conv_id: conv, user: "u2", info: { name: "Two" } },
  { type: "ws.join", conv_id: "not-subscribed", user: "u3" },
  ev(conv, 2),
  { type: "ws.join", conv_id: conv, user: "u4" },
  { type: "ws.leave", conv_id: conv, user: "u2" },
  { type: "ws.leave", conv_id: conv },
  ev(conv, 3),
];
const EXPECTED = (conv) => [
  ["event", 1],
  ["join", { conv_id: conv, user: "u2", info: { name: "Two" } }],
  ["event", 2],
  ["join", { conv_id: conv, user: "u4" }],
  ["leave", { conv_id: conv, user: "u2" }],
  ["event", 3],
];
const summary = (seen) => seen.map(([name, detail]) => [name, name === "event" ? detail.seq : detail]);

test("websocket: join and leave in stream order, for subscribed conversations only", async () => {
  const server = await startServer();
  const client = makeClient({ url: server.url });
  const seen = recordStream(client);
  await subscribeAll(client, ["c1"]);
  const conn = await server.connection(0);
  conn.send(...SCRIPT("c1"));
  await waitFor(() => seen.length === 6, { what: "three events, two joins, one leave" });
  assert.deepEqual(summary(seen), EXPECTED("c1"));
  assert.ok(!("info" in seen[3][1]), "a join without info has no info field");

  // after unsubscribe(): nothing more for that conversation
  client.unsubscribe("c1");
  await nextEmit(client, "unsubscribed", (m) => m.conv_id === "c1");
  conn.send({ type: "ws.join", conv_id: "c1", user: "late" }, { type: "ws.pong", server_time: Date.now() });
  await nextEmit(client, "pong");
  assert.equal(seen.length, 6);
});

test("SSE: `event: ws.join` without an id line is emitted as join, in stream order", async () => {
  const calls = [];
  const fetchFn = async (url, init) => {
    let controller;
    const body = new ReadableStream({ start: (c) => void (controller = c) });
    init.signal?.addEventListener("abort", () => controller.error(new Error("aborted")));
    const conv = new URL(url).searchParams.get("conv_id");
    calls.push(conv);
    const blocks = [
      { type: "ws.hello", connection_id: "s0", gateway_id: "fake", profile: "default", server_time: Date.now() },
      { type: "ws.subscribed", conv_id: conv, epoch: "E1", seq: 0 },
      ...SCRIPT(conv),
    ].map((obj) => {
      const head = obj.type.startsWith("ws.") ? `event: ${obj.type}\n` : `event: ${obj.type}\nid: ${obj.seq}\n`;
      return `${head}data: ${JSON.stringify(obj)}\n\n`;
    });
    queueMicrotask(() => controller.enqueue(new TextEncoder().encode(blocks.join(""))));
    return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
  };
  const client = makeClient({ url: "ws://sse.test/ws", transport: "sse", fetch: fetchFn });
  const seen = recordStream(client);
  client.subscribe("c1");
  await waitFor(() => seen.length === 6, { what: "three events, two joins, one leave over SSE" });
  assert.deepEqual(summary(seen), EXPECTED("c1"));
  assert.deepEqual(calls, ["c1"]);
});

// ---- a real gateway -------------------------------------------------------------------------------

const found = findGateway();
if ("error" in found) console.error(`join/leave gateway tests cannot run: ${found.error}`);

const SECRET = "join-leave-js-secret-".padEnd(40, "x");
const DELAY_S = 0.5;
const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
function signedJwt(sub, info) {
  const claims = { sub, exp: Math.floor(Date.now() / 1000) + 600, convs: ["*"], profiles: ["default"] };
  if (info !== undefined) claims.info = info;
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64(claims);
  return `${head}.${body}.${createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url")}`;
}

describe("join and leave against a real gateway", { timeout: 90_000 }, () => {
  /** @type {Gateway} */
  let gw;
  const clients = [];
  const client = (options) => {
    const c = new BroadcasterClient({ url: gw.ws, WebSocket, backoff: { initialMs: 50, maxMs: 300 }, pingIntervalMs: 0, ...options });
    clients.push(c);
    return c;
  };

  before(async () => {
    const namespaces = join(tmpdir(), `broadcaster-js-join-leave-${process.pid}.toml`);
    writeFileSync(namespaces, '[namespaces."jsjl-*"]\njoin_leave = true\n\n[namespaces."jsplain-*"]\njoin_leave = false\n');
    gw = await Gateway.start({
      args: ["--auth-secret", SECRET, "--namespaces", namespaces, "--join-leave-delay", String(DELAY_S)],
    });
  });
  after(async () => {
    for (const c of clients) c.close();
    await gw?.stop();
  });

  test("watchers over ws and SSE see u2 join, then leave after it disconnects; none where the option is off", async () => {
    const convs = [`jsjl-${process.pid}`, `jsplain-${process.pid}`];
    const [on] = convs;
    const wsWatcher = client({ token: signedJwt("w1") });
    const sseWatcher = client({ token: signedJwt("w2"), transport: "sse" });
    const joins = [record(wsWatcher, "join"), record(sseWatcher, "join")];
    const leaves = [record(wsWatcher, "leave"), record(sseWatcher, "leave")];
    await Promise.all([subscribeAll(wsWatcher, convs), subscribeAll(sseWatcher, convs)]);

    const u2 = client({ token: signedJwt("u2", { name: "Two" }) });
    await subscribeAll(u2, convs);
    const byU2 = (list) => list.filter((d) => d.user === "u2");
    await waitFor(() => joins.every((j) => byU2(j).length > 0), { what: "u2's join on both watchers", timeoutMs: 10_000 });
    for (const j of joins) assert.deepEqual(byU2(j), [{ conv_id: on, user: "u2", info: { name: "Two" } }]);
    assert.deepEqual(leaves.map(byU2), [[], []]);

    u2.close();
    const closedAt = Date.now();
    await waitFor(() => leaves.every((l) => byU2(l).length > 0), { what: "u2's leave on both watchers", timeoutMs: 10_000 });
    assert.ok(Date.now() - closedAt >= DELAY_S * 1000 - 50, `leave ${Date.now() - closedAt} ms after the close`);
    for (const l of leaves) assert.deepEqual(byU2(l), [{ conv_id: on, user: "u2" }]);
    for (const j of joins) assert.deepEqual(byU2(j).length, 1, "no second join");
    // the conversation with join_leave = false: the same comings and goings announced nothing
    for (const list of [...joins, ...leaves]) assert.deepEqual(list.filter((d) => d.conv_id !== on), []);
  });
});
