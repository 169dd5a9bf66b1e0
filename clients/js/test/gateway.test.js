// End-to-end tests of the client against a real gateway subprocess (in-memory backend).
//
// The gateway is found as test-support/gateway.js says (the repository's .venv first). When
// there is none, every test here fails with a message saying how to install one: a suite
// that did not run is never counted as passed.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket from "ws";

import { BroadcasterClient } from "../broadcaster-client.js";
import { Gateway, findGateway } from "../test-support/gateway.js";
import { nextEmit, record, sleep, waitFor } from "../test-support/util.js";

const found = findGateway();
if ("error" in found) console.error(`gateway tests cannot run: ${found.error}`);

let counter = 0;
const newConv = () => `js-${process.pid}-${Date.now().toString(36)}-${++counter}`;
const seqs = (events) => events.map((e) => e.seq);

/** A client plus bookkeeping; closed by the caller (or at the end of the suite). */
const clients = [];
function makeClient(urls, options = {}) {
  const client = new BroadcasterClient({
    urls: Array.isArray(urls) ? urls : [urls],
    WebSocket,
    backoff: { initialMs: 50, maxMs: 300 },
    pingIntervalMs: 0,
    ...options,
  });
  clients.push(client);
  return client;
}

/** Subscribe and wait for the server's ws.subscribed (or ws.state with hydrate). */
async function subscribed(client, conv, options = {}) {
  const done = nextEmit(client, options.hydrate ? "state" : "subscribed", (m) => m.conv_id === conv, 10_000);
  client.subscribe(conv, options);
  return done;
}

describe("against a real gateway", { timeout: 120_000 }, () => {
  /** @type {Gateway} */
  let gw;

  before(async () => {
    // conversations jsdelta-* may get delta upserts (docs/streaming.md)
    const namespaces = join(tmpdir(), `broadcaster-js-test-${process.pid}.toml`);
    writeFileSync(namespaces, '[namespaces."jsdelta-*"]\ndelta = true\n');
    gw = await Gateway.start({ args: ["--drain-seconds", "1", "--namespaces", namespaces] });
  });

  after(async () => {
    for (const c of clients) c.close();
    await gw?.stop();
  });

  test("events published over HTTP arrive once, in order, with their data", async () => {
    const conv = newConv();
    const client = makeClient(gw.ws);
    const events = record(client, "event");
    const sub = await subscribed(client, conv);
    assert.equal(sub.seq, 0);
    assert.equal(typeof sub.epoch, "string");
    const results = [];
    for (let i = 1; i <= 5; i++) results.push(await gw.publish(conv, "chat.message", { i, text: `m${i}\nline` }));
    assert.deepEqual(results.map((r) => r.seq), [1, 2, 3, 4, 5]);
    assert.ok(results.every((r) => r.epoch === sub.epoch && r.duplicate === false));
    await waitFor(() => events.length === 5, { what: "5 events" });
    assert.deepEqual(seqs(events), [1, 2, 3, 4, 5]);
    assert.deepEqual(events[1].data, { i: 2, text: "m2\nline" });
    assert.equal(events[1].type, "chat.message");
    assert.equal(events[1].id, results[1].id);
    assert.equal(typeof events[1].ts, "number");
    client.close();
  });

  test("a burst of concurrent publishes is delivered gap-free and without duplicates", async () => {
    const conv = newConv();
    const client = makeClient(gw.ws);
    const events = record(client, "event");
    await subscribed(client, conv);
    const n = 200;
    await Promise.all(Array.from({ length: n }, (_, i) => gw.publish(conv, "llm.delta", { i })));
    await waitFor(() => events.length === n, { timeoutMs: 20_000, what: `${n} events` });
    assert.deepEqual(seqs(events), Array.from({ length: n }, (_, i) => i + 1));
    client.close();
  });

  test("entities: a client hydrating mid-answer holds the whole message, then every append (#17)", async () => {
    const conv = newConv();
    for (const text of ["The ", "quick "]) await gw.publish(conv, "llm.message", { text }, { key: "a", op: "append" });
    const client = makeClient(gw.ws);
    const changes = record(client, "entity");
    await subscribed(client, conv, { hydrate: true });
    assert.equal(client.entity(conv, "a").data.text, "The quick ");
    for (const text of ["brown ", "fox"]) await gw.publish(conv, "llm.message", { text }, { key: "a", op: "append" });
    await waitFor(() => client.entity(conv, "a")?.seq === 4);
    assert.deepEqual(client.entity(conv, "a").data, { text: "The quick brown fox" });
    await gw.publish(conv, "llm.message", null, { key: "a" });
    await waitFor(() => changes.length === 4);
    assert.deepEqual(changes.map((c) => c.entity?.data.text ?? null), ["The quick ", "The quick brown ", "The quick brown fox", null]);
    assert.equal(client.entities(conv).size, 0);
  });

  test("delta upserts: the entity map applies them and ends equal to the whole upserts (#17)", async () => {
    const conv = `jsdelta-${newConv()}`;
    const long = "x".repeat(300);
    await gw.publish(conv, "llm.message", { text: long, n: 0 }, { key: "a" });
    const client = makeClient(gw.ws);
    const events = record(client, "event");
    const subscribedMsg = nextEmit(client, "subscribed", (m) => m.conv_id === conv, 10_000);
    await subscribed(client, conv, { hydrate: true, delta: true });
    assert.equal((await subscribedMsg).delta, true);
    let text = long;
    for (let i = 1; i <= 5; i++) {
      text += ` t${i}`;
      await gw.publish(conv, "llm.message", { text, n: i }, { key: "a" });
    }
    await waitFor(() => events.length === 5);
    assert.deepEqual(events.map((e) => e.op ?? null), [null, "delta", "delta", "delta", "delta"]);
    assert.deepEqual(events[1].data, { text: { $append: " t2" }, n: 2 });
    assert.deepEqual(client.entity(conv, "a").data, { text, n: 5 });
    assert.equal(client.entity(conv, "a").seq, 6);
  });

  test("an idempotent publish (same id) fans out once", async () => {
    const conv = newConv();
    const client = makeClient(gw.ws);
    const events = record(client, "event");
    await subscribed(client, conv);
    const first = await gw.publish(conv, "chat.message", { a: 1 }, { id: "msg-1" });
    const again = await gw.publish(conv, "chat.message", { a: 1 }, { id: "msg-1" });
    assert.equal(again.duplicate, true);
    assert.equal(again.seq, first.seq);
    await gw.publish(conv, "chat.message", { a: 2 });
    await waitFor(() => events.length === 2);
    await sleep(100);
    assert.deepEqual(seqs(events), [1, 2]);
    client.close();
  });

  test("resuming with since + epoch replays exactly the missed events", async () => {
    const conv = newConv();
    const first = makeClient(gw.ws);
    const seen = record(first, "event");
    await subscribed(first, conv);
    for (let i = 1; i <= 3; i++) await gw.publish(conv, "chat.message", { i });
    await waitFor(() => seen.length === 3);
    const position = first.position(conv);
    first.close();
    for (let i = 4; i <= 6; i++) await gw.publish(conv, "chat.message", { i });

    const second = makeClient(gw.ws);
    const events = record(second, "event");
    const resets = record(second, "reset");
    await subscribed(second, conv, { since: position.seq, epoch: position.epoch });
    await waitFor(() => events.length === 3);
    await gw.publish(conv, "chat.message", { i: 7 });
    await waitFor(() => events.length === 4);
    assert.deepEqual(seqs(events), [4, 5, 6, 7]);
    assert.deepEqual(resets, []);
    second.close();
  });

  test("a resume with a foreign epoch is answered by ws.reset epoch_changed", async () => {
    const conv = newConv();
    await gw.publish(conv, "chat.message", { i: 1 });
    const client = makeClient(gw.ws);
    const events = record(client, "event");
    const reset = nextEmit(client, "reset", () => true, 10_000);
    client.subscribe(conv, { since: 1, epoch: "notTheEpoch0" });
    const r = await reset;
    assert.equal(r.reason, "epoch_changed");
    assert.equal(r.conv_id, conv);
    assert.notEqual(r.epoch, "notTheEpoch0");
    assert.deepEqual(client.position(conv), { convId: conv, seq: r.seq, epoch: r.epoch });
    await gw.publish(conv, "chat.message", { i: 2 });
    await waitFor(() => events.length === 1);
    assert.equal(events[0].seq, r.seq + 1);
    client.close();
  });

  test("hydrate delivers ws.state consistent with GET /state, then live events", async () => {
    const conv = newConv();
    await gw.publish(conv, "timeline.upsert", { text: "a" }, { key: "m1" });
    await gw.publish(conv, "timeline.upsert", { text: "b" }, { key: "m2" });
    await gw.publish(conv, "timeline.upsert", { text: "a2" }, { key: "m1" });
    await gw.publish(conv, "timeline.upsert", null, { key: "m2" });
    const expected = await gw.getJson(`/v1/conversations/${conv}/state`);
    assert.deepEqual(Object.keys(expected.entities), ["m1"]);
    assert.deepEqual(expected.entities.m1.data, { text: "a2" });
    const client = makeClient(gw.ws);
    const events = record(client, "event");
    const state = await subscribed(client, conv, { hydrate: true });
    assert.equal(state.type, "ws.state");
    assert.equal(state.seq, 4);
    assert.equal(state.epoch, expected.epoch);
    assert.deepEqual(state.entities, expected.entities);
    await gw.publish(conv, "timeline.upsert", { text: "c" }, { key: "m3" });
    await waitFor(() => events.length === 1);
    assert.deepEqual(seqs(events), [5]);
    assert.equal(events[0].key, "m3");
    client.close();
  });

  test("types narrows the subscription", async () => {
    const conv = newConv();
    const client = makeClient(gw.ws);
    const events = record(client, "event");
    await subscribed(client, conv, { types: ["chat.*"] });
    await gw.publish(conv, "llm.delta", { x: 1 });
    await gw.publish(conv, "chat.message", { x: 2 });
    await waitFor(() => events.length === 1);
    await sleep(100);
    assert.deepEqual(
      events.map((e) => [e.seq, e.type]),
      [[2, "chat.message"]],
    );
    client.close();
  });

  test("the default profile hides debug.* events; the debug profile shows them", async () => {
    const conv = newConv();
    const plain = makeClient(gw.ws);
    const debug = makeClient(gw.ws, { profile: "debug" });
    const plainEvents = record(plain, "event");
    const debugEvents = record(debug, "event");
    await subscribed(plain, conv);
    await subscribed(debug, conv);
    await gw.publish(conv, "debug.trace", { x: 1 });
    await gw.publish(conv, "chat.message", { x: 2 });
    await waitFor(() => plainEvents.length === 1 && debugEvents.length === 2);
    assert.deepEqual(seqs(plainEvents), [2]);
    assert.deepEqual(seqs(debugEvents), [1, 2]);
    plain.close();
    debug.close();
  });

  test("an unknown profile is refused with 4404 and the client stops", async () => {
    const client = makeClient(gw.ws, { profile: "no-such-profile" });
    const failed = nextEmit(client, "status", (s) => s.status === "failed", 10_000);
    client.subscribe(newConv());
    assert.equal((await failed).code, 4404);
    await sleep(300);
    assert.equal(client.stats.connects, 1);
  });

  test("ws.ping is answered by ws.pong", async () => {
    const client = makeClient(gw.ws, { pingIntervalMs: 100 });
    const pong = nextEmit(client, "pong", () => true, 10_000);
    client.connect();
    assert.equal(typeof (await pong).server_time, "number");
    client.close();
  });

  test("presence counts the client's connection", async () => {
    const conv = newConv();
    const client = makeClient(gw.ws, { profile: "debug" });
    await subscribed(client, conv);
    const presence = await waitFor(
      async () => {
        const p = await gw.getJson(`/v1/conversations/${conv}/presence`);
        return p.connections === 1 ? p : null;
      },
      { timeoutMs: 10_000, what: "presence 1" },
    );
    assert.equal(presence.conv_id, conv);
    assert.equal(presence.by_profile.debug, 1);
    client.close();
    await waitFor(async () => (await gw.getJson(`/v1/conversations/${conv}/presence`)).connections === 0, {
      timeoutMs: 10_000,
      what: "presence 0",
    });
  });

  test("the demo page is served at / and the client module at /client/broadcaster-client.js", async () => {
    const page = await fetch(`${gw.http}/`);
    assert.equal(page.status, 200);
    assert.match(page.headers.get("content-type") ?? "", /text\/html/);
    const html = await page.text();
    for (const id of ["conv", "profile", "connect", "status", "events", "pub-type", "pub-data", "publish", "presence"]) {
      assert.match(html, new RegExp(`id="${id}"`), `element #${id}`);
    }
    const mod = await fetch(`${gw.http}/client/broadcaster-client.js`);
    assert.equal(mod.status, 200);
    assert.match(mod.headers.get("content-type") ?? "", /javascript/);
    assert.match(await mod.text(), /export class BroadcasterClient/);
  });
});

describe("gateway restarts and draining", { timeout: 180_000 }, () => {
  const started = [];
  after(async () => {
    for (const c of clients) c.close();
    await Promise.all(started.map((g) => g.stop("SIGKILL")));
  });

  test("after a gateway restart the client reconnects and reports the lost history as ws.reset", async () => {
    const gw = await Gateway.start();
    started.push(gw);
    const conv = newConv();
    const client = makeClient(gw.ws, { backoff: { initialMs: 100, maxMs: 500 } });
    const events = record(client, "event");
    await subscribed(client, conv);
    for (let i = 1; i <= 3; i++) await gw.publish(conv, "chat.message", { i });
    await waitFor(() => events.length === 3);
    const before = client.position(conv);

    await gw.stop("SIGKILL");
    await waitFor(() => client.status === "closed" || client.status === "connecting", { what: "disconnect" });
    const reset = nextEmit(client, "reset", (r) => r.conv_id === conv, 30_000);
    const again = await Gateway.start({ port: gw.port });
    started.push(again);
    const r = await reset;
    assert.equal(r.reason, "epoch_changed");
    assert.notEqual(r.epoch, before.epoch);
    await again.publish(conv, "chat.message", { i: "new" });
    await waitFor(() => events.length === 4, { what: "event after the restart" });
    assert.deepEqual(seqs(events), [1, 2, 3, r.seq + 1]);
    assert.deepEqual(events[3].data, { i: "new" });
    client.close();
  });

  test("a draining gateway closes with 1012 and the client moves to the next URL at once", async () => {
    const a = await Gateway.start({ args: ["--drain-seconds", "2"] });
    const b = await Gateway.start();
    started.push(a, b);
    const conv = newConv();
    // A backoff this long would time the test out: 1012 must not wait for it.
    const client = makeClient([a.ws, b.ws], { backoff: { initialMs: 120_000, maxMs: 120_000 } });
    await subscribed(client, conv);
    assert.equal(client.url, a.ws);
    const closed = nextEmit(client, "status", (s) => s.status === "closed", 30_000);
    const resubscribed = nextEmit(client, "subscribed", (m) => m.conv_id === conv, 30_000);
    a.stop("SIGTERM");
    const status = await closed;
    assert.equal(status.code, 1012);
    assert.equal(status.delayMs, 0);
    await resubscribed;
    assert.equal(client.url, b.ws);
    client.close();
  });
});
