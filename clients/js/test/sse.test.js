// The SSE transport of the client (transport: "sse" | "auto") against real gateway subprocesses.
//
// /sse streams read with Node's fetch: events once and in order, the token as a bearer header,
// a refusal mapped to its close code (fatal), a killed gateway survived with an exact resume on
// the other one (both on the local Redis, a key prefix of their own), and "auto" falling back
// to SSE when the websocket cannot open (a stand-in WebSocket that never opens, as behind a
// proxy that refuses upgrades).

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";

import { BroadcasterClient, SseSocket } from "../broadcaster-client.js";
import { Gateway, findGateway } from "../test-support/gateway.js";
import { nextEmit, record, waitFor } from "../test-support/util.js";

const found = findGateway();
if ("error" in found) console.error(`sse tests cannot run: ${found.error}`);

const REDIS_URL = process.env.BROADCASTER_TEST_REDIS_URL ?? "redis://127.0.0.1:6379/0";
let counter = 0;
const newConv = () => `jsse-${process.pid}-${++counter}`;
const seqs = (events) => events.map((e) => e.seq);

/** A WebSocket that never opens: what a client sees when a proxy refuses the upgrade. */
class BlockedWebSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    setTimeout(() => {
      this.readyState = 3;
      this.onclose?.({ code: 1006, reason: "blocked" });
    }, 5);
  }
  send() {}
  close() {}
}

const clients = [];
function makeClient(urls, options = {}) {
  const client = new BroadcasterClient({
    urls,
    transport: "sse",
    backoff: { initialMs: 50, maxMs: 300 },
    pingIntervalMs: 0,
    ...options,
  });
  clients.push(client);
  return client;
}

describe("the SSE transport against real gateways", { timeout: 90_000 }, () => {
  /** @type {Gateway[]} */
  let gws = [];

  before(async () => {
    const prefix = "jsse" + randomBytes(4).toString("hex");
    const args = ["--redis-url", REDIS_URL, "--key-prefix", prefix, "--drain-seconds", "1",
                  "--auth-secret", "s".repeat(32)];
    gws = await Promise.all([Gateway.start({ args }), Gateway.start({ args })]);
  });

  after(async () => {
    for (const c of clients) c.close();
    await Promise.all(gws.map((g) => g.stop()));
  });

  const token = async (convs = ["*"]) => {
    // a dev token from the gateway's own CLI would need a subprocess; sign HS256 here (node:crypto)
    const { createHmac } = await import("node:crypto");
    const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
    const head = b64({ alg: "HS256", typ: "JWT" });
    const body = b64({ sub: "t", exp: Math.floor(Date.now() / 1000) + 600, convs, profiles: ["default"] });
    const sig = createHmac("sha256", "s".repeat(32)).update(`${head}.${body}`).digest("base64url");
    return `${head}.${body}.${sig}`;
  };

  test("events arrive once, in order, over /sse with a bearer token", async () => {
    const conv = newConv();
    const client = makeClient([gws[0].ws], { token: await token() });
    assert.equal(client.transport, "sse");
    const events = record(client, "event");
    const subscribed = nextEmit(client, "subscribed", (m) => m.conv_id === conv, 10_000);
    client.subscribe(conv);
    assert.equal((await subscribed).seq, 0);
    for (let i = 1; i <= 5; i++) await gws[0].publish(conv, "chat.message", { i });
    await waitFor(() => events.length === 5, { what: "5 events", timeoutMs: 10_000 });
    assert.deepEqual(seqs(events), [1, 2, 3, 4, 5]);
    assert.deepEqual(events[2].data, { i: 3 });
    assert.match(client.url, /^ws:/); // the configured /ws URL; the stream went to /sse next to it
    client.close();
  });

  test("a refused stream is fatal, with the close code /ws would use", async () => {
    const client = makeClient([gws[0].ws], { token: await token(["other-*"]) });
    const failed = nextEmit(client, "status", (s) => s.status === "failed", 10_000);
    client.subscribe(newConv());
    assert.equal((await failed).code, 4403);
  });

  test("a SIGKILLed gateway: the client resumes on the other one with no gap and no duplicate", async () => {
    const conv = newConv();
    const client = makeClient([gws[0].ws, gws[1].ws], { token: await token() });
    const events = record(client, "event");
    const hellos = record(client, "hello");
    const subscribed = nextEmit(client, "subscribed", (m) => m.conv_id === conv, 10_000);
    client.subscribe(conv);
    await subscribed;
    for (let i = 1; i <= 10; i++) await gws[1].publish(conv, "chat.message", { i });
    await waitFor(() => events.length === 10, { what: "the first 10", timeoutMs: 10_000 });
    await gws[0].stop("SIGKILL");
    for (let i = 11; i <= 20; i++) await gws[1].publish(conv, "chat.message", { i });
    await waitFor(() => events.length >= 20, { what: "20 events after the kill", timeoutMs: 20_000 });
    assert.deepEqual(seqs(events), Array.from({ length: 20 }, (_, i) => i + 1));
    assert.equal(client.stats.duplicatesDropped, 0);
    assert.ok(hellos.length >= 2 && hellos.at(-1).gateway_id !== hellos[0].gateway_id, JSON.stringify(hellos));
    client.close();
  });

  test('"auto" falls back to SSE when the websocket cannot open', async () => {
    const conv = newConv();
    const client = makeClient([gws[1].ws], { transport: "auto", WebSocket: BlockedWebSocket,
                                              token: await token() });
    assert.equal(client.transport, "websocket");
    const switched = nextEmit(client, "transport", () => true, 10_000);
    const events = record(client, "event");
    const subscribed = nextEmit(client, "subscribed", (m) => m.conv_id === conv, 10_000);
    client.subscribe(conv);
    assert.equal((await switched).transport, "sse");
    await subscribed;
    assert.equal(client.transport, "sse");
    await gws[1].publish(conv, "chat.message", { i: 1 });
    await waitFor(() => events.length === 1, { what: "the event over SSE", timeoutMs: 10_000 });
    client.close();
  });
});

test("SseSocket derives the /sse URL and keeps the token out of it", () => {
  const socket = new SseSocket("wss://example.test/base/ws?profile=chat&token=abc&_x=1", async () => {
    throw new Error("not called");
  });
  assert.equal(socket.url, "https://example.test/base/sse?profile=chat&_x=1");
  socket.close();
});
