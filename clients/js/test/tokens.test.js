// Token lifetimes: getToken, ws.refresh ahead of exp, reconnect after 4401 "token expired", and
// per-subscription "forbidden" - against the scripted fake server (and a fake fetch for SSE), then
// against real gateways with --auth-secret (HS256 tokens signed here with node:crypto).
//
// Short-lived tokens (exp a few seconds ahead) keep the tests short; every wait polls with a
// deadline (waitFor / nextEmit), no sleep stands for a condition.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import WebSocket from "ws";

import { BroadcasterClient, refreshDelay, tokenExpiry } from "../broadcaster-client.js";
import { ev } from "../test-support/fake-server.js";
import { Gateway, findGateway } from "../test-support/gateway.js";
import { fakeServerFixture } from "../test-support/fixtures.js";
import { nextEmit, record, sleep, subscribeAll, waitFor } from "../test-support/util.js";

const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
/** An unsigned JWT-shaped token (the fake server does not verify; the client never does). */
const fakeJwt = (claims) => `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.sig`;
const SECRET = "token-tests-secret-".padEnd(40, "x");
/** An HS256 token the real gateway accepts; exp in whole seconds, `ttlS` from now. */
function signedJwt({ ttlS, sub = "u1", convs = ["*"] }) {
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ sub, exp: Math.floor(Date.now() / 1000) + ttlS, convs, profiles: ["default"] });
  const sig = createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}
const seqs = (events) => events.map((e) => e.seq);
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

const { startServer, makeClient } = fakeServerFixture();

/**
 * Subscribe `client` to c1 and wait for its "refreshed": it came before `exp0`, on the one connection,
 * after `refreshes` ws.refresh, with these error codes and `failures` counted.
 */
async function expectRefreshedBeforeExp(server, client, exp0, { refreshes, errors: codes, failures }) {
  const errors = record(client, "error");
  const ok = nextEmit(client, "refreshed", () => true, 10_000);
  client.subscribe("c1");
  const conn = await server.connection(0);
  await ok;
  assert.ok(Date.now() / 1000 < exp0, "refreshed before exp");
  assert.equal(conn.messages("ws.refresh").length, refreshes);
  assert.deepEqual(errors.map((e) => e.code), codes);
  assert.equal(client.stats.refreshFailures, failures);
  assert.equal(server.connections.length, 1);
}

/** A fake server answering ws.refresh as `answer(conn, msg, n)` says (n: 0-based count of refreshes so far). */
function refreshingServer(answer) {
  let n = 0;
  return startServer({
    onMessage(conn, msg) {
      if (msg.type !== "ws.refresh") return false;
      const reply = answer(conn, msg, n++);
      if (reply) conn.send(reply);
      return true;
    },
  });
}
const refreshed = (msg) => ({ type: "ws.refreshed", exp: tokenExpiry(msg.token) });
const badRefresh = { type: "ws.error", code: "bad_refresh", message: "token refused" };

// ---- helpers ------------------------------------------------------------------------------------

test("tokenExpiry reads exp from the payload, without verifying; null when it cannot", () => {
  assert.equal(tokenExpiry(fakeJwt({ sub: "é", exp: 1_900_000_000 })), 1_900_000_000);
  assert.equal(tokenExpiry(fakeJwt({ exp: 17.5 })), 17.5);
  const padded = `x.${Buffer.from(JSON.stringify({ exp: 55 })).toString("base64").replace(/\+/g, "-").replace(/\//g, "_")}.y`;
  assert.ok(padded.includes("="), padded);
  assert.equal(tokenExpiry(padded), 55);
  assert.equal(tokenExpiry(fakeJwt({ sub: "no exp" })), null);
  assert.equal(tokenExpiry(fakeJwt({ exp: "1900000000" })), null);
  for (const bad of [null, undefined, 42, "", "opaque-api-key", "a.b", "a.!!!.c", "a.b.c.d", `x.${b64([1])}.y`]) {
    assert.equal(tokenExpiry(bad), null, String(bad));
  }
});

test("refreshDelay: 80-90 % of the life left after a lead of min(5 s, a third), jittered", () => {
  assert.equal(refreshDelay(3_600_000, () => 0), Math.round(3_595_000 * 0.8));
  assert.equal(refreshDelay(3_600_000, () => 1), Math.round(3_595_000 * 0.9));
  assert.equal(refreshDelay(3_000, () => 0), 1_600);
  assert.equal(refreshDelay(3_000, () => 1), 1_800);
  assert.equal(refreshDelay(0), 0);
  assert.equal(refreshDelay(-5), 0);
  const spread = new Set(Array.from({ length: 50 }, () => refreshDelay(600_000)));
  assert.ok(spread.size > 10, "a fleet does not refresh in the same instant");
});

test("getToken and token are exclusive; getToken must be a function", () => {
  assert.throws(() => makeClient({ url: "ws://x/ws", token: "t", getToken: () => "t" }), TypeError);
  assert.throws(() => makeClient({ url: "ws://x/ws", getToken: "t" }), TypeError);
});

// ---- refresh ahead of exp ---------------------------------------------------------------------

test("ws.refresh goes out ahead of each exp with a fresh getToken(); the socket lives on", async () => {
  const server = await refreshingServer((conn, msg) => refreshed(msg));
  let calls = 0;
  const issued = [];
  const client = makeClient({
    url: server.url,
    getToken: async () => {
      calls += 1;
      const token = fakeJwt({ sub: "u", exp: Date.now() / 1000 + 2.5, n: calls });
      issued.push({ token, exp: tokenExpiry(token) });
      return token;
    },
  });
  const refreshedSeen = record(client, "refreshed");
  client.subscribe("c1");
  const conn = await server.connection(0);
  assert.equal(conn.url.searchParams.get("token"), issued[0].token);
  await waitFor(() => refreshedSeen.length >= 3, { what: "three refreshes", timeoutMs: 10_000 });
  const refreshes = conn.messages("ws.refresh");
  // each refresh carries the token getToken gave just then, and went out before the previous one expired
  for (let i = 0; i < 3; i++) {
    assert.equal(refreshes[i].token, issued[i + 1].token);
    const sentAt = issued[i + 1].exp - 2.5; // the token was minted when the refresh started
    assert.ok(sentAt < issued[i].exp - 0.3, `refresh ${i} too late: ${sentAt} vs exp ${issued[i].exp}`);
    assert.ok(sentAt > issued[i].exp - 2.5 + 1.0, `refresh ${i} too early`);
  }
  assert.deepEqual(refreshedSeen[0], { type: "ws.refreshed", exp: issued[1].exp });
  assert.equal(server.connections.length, 1);
  assert.equal(client.stats.refreshes, refreshedSeen.length);
  assert.equal(client.stats.refreshFailures, 0);
});

test("bad_refresh and a throwing getToken are retried before exp", async () => {
  // answers: bad_refresh, (getToken throws, nothing sent), bad_refresh, then ws.refreshed
  const server = await refreshingServer((conn, msg, n) => (n < 2 ? badRefresh : refreshed(msg)));
  let calls = 0;
  const exp0 = Date.now() / 1000 + 4;
  const client = makeClient({
    url: server.url,
    getToken: () => {
      calls += 1;
      if (calls === 3) throw new Error("identity provider down");
      return fakeJwt({ sub: "u", exp: calls === 1 ? exp0 : Date.now() / 1000 + 60 });
    },
  });
  await expectRefreshedBeforeExp(server, client, exp0, { refreshes: 3, errors: ["bad_refresh", "token", "bad_refresh"], failures: 3 });
});

test("an unanswered ws.refresh counts as failed and is retried before exp", async () => {
  const server = await refreshingServer((conn, msg, n) => (n === 0 ? null : refreshed(msg)));
  const exp0 = Date.now() / 1000 + 4;
  let calls = 0;
  const client = makeClient({
    url: server.url,
    getToken: () => fakeJwt({ sub: "u", exp: ++calls === 1 ? exp0 : exp0 + 60, n: calls }),
  });
  await expectRefreshedBeforeExp(server, client, exp0, { refreshes: 2, errors: ["refresh_timeout"], failures: 1 });
});

test("a gateway without ws.refresh (unknown_type): one try, then reconnect with a fresh token at exp", async () => {
  const server = await refreshingServer(() => ({ type: "ws.error", code: "unknown_type", message: "unknown message type 'ws.refresh'" }));
  const tokens = [];
  const client = makeClient({
    url: server.url,
    getToken: () => {
      const token = fakeJwt({ sub: "u", exp: Date.now() / 1000 + 2, n: tokens.length });
      tokens.push(token);
      return token;
    },
  });
  const events = record(client, "event");
  client.subscribe("c1");
  const conn0 = await server.connection(0);
  await conn0.waitMessage((m) => m.type === "ws.subscribe");
  conn0.send(ev("c1", 1), ev("c1", 2));
  await conn0.waitMessage((m) => m.type === "ws.refresh", 5_000);
  // the "gateway" closes at exp, as an older one cannot refresh either
  await waitFor(() => Date.now() / 1000 >= tokenExpiry(tokens[0]), { what: "exp", timeoutMs: 5_000 });
  assert.equal(conn0.messages("ws.refresh").length, 1, "no refresh loop against an old gateway");
  conn0.close(4401, "token expired");
  const conn1 = await server.connection(1);
  assert.equal(conn1.url.searchParams.get("token"), tokens.at(-1));
  assert.notEqual(tokens.at(-1), tokens[0]);
  const sub = await conn1.waitMessage((m) => m.type === "ws.subscribe");
  assert.equal(sub.since, 2);
  conn1.send(ev("c1", 3));
  await waitFor(() => events.length === 3, { what: "event 3" });
  assert.deepEqual(seqs(events), [1, 2, 3]);
});

// ---- 4401 "token expired" ---------------------------------------------------------------------

test('4401 "token expired": reconnect at once with a fresh token and resume, no gap, no duplicate', async () => {
  const server = await startServer();
  let calls = 0;
  const client = makeClient({ url: server.url, getToken: () => fakeJwt({ sub: "u", exp: 4_000_000_000, n: ++calls }) });
  const events = record(client, "event");
  const statuses = record(client, "status");
  client.subscribe("a").subscribe("b");
  const conn0 = await server.connection(0);
  await waitFor(() => conn0.messages("ws.subscribe").length === 2);
  conn0.send(ev("a", 1), ev("a", 2), ev("b", 1));
  await waitFor(() => events.length === 3);
  conn0.close(4401, "token expired");
  const conn1 = await server.connection(1);
  assert.equal(calls, 2);
  assert.notEqual(conn1.url.searchParams.get("token"), conn0.url.searchParams.get("token"));
  await waitFor(() => conn1.messages("ws.subscribe").length === 2);
  const subs = Object.fromEntries(conn1.messages("ws.subscribe").map((m) => [m.conv_id, m]));
  assert.deepEqual([subs.a.since, subs.a.epoch, subs.b.since, subs.b.epoch], [2, "E1", 1, "E1"]);
  conn1.send(ev("a", 2), ev("a", 3), ev("b", 2)); // a replay that overlaps by one
  await waitFor(() => events.length === 5);
  assert.deepEqual(events.map((e) => `${e.conv_id}${e.seq}`), ["a1", "a2", "b1", "a3", "b2"]);
  assert.equal(client.stats.duplicatesDropped, 1);
  const closed = statuses.find((s) => s.status === "closed");
  assert.deepEqual([closed.code, closed.willReconnect, closed.delayMs, closed.tokenExpired], [4401, true, 0, true]);
  assert.ok(!statuses.some((s) => s.status === "failed"));
  // the next expiry, after a hello with the fresh token, is renewed again
  conn1.close(4401, "token expired");
  await server.connection(2);
  assert.equal(client.status === "failed", false);
});

test("a 4401 right after a fresh token is fatal", async () => {
  const server = await startServer({ refuse: (conn, index) => (index === 1 ? [4401, "invalid token: signature"] : null) });
  let calls = 0;
  const client = makeClient({ url: server.url, getToken: () => fakeJwt({ exp: 4_000_000_000, n: ++calls }) });
  client.subscribe("c1");
  const conn0 = await server.connection(0);
  await conn0.waitMessage((m) => m.type === "ws.subscribe");
  const failed = nextEmit(client, "status", (s) => s.status === "failed");
  conn0.close(4401, "token expired");
  const detail = await failed;
  assert.deepEqual([detail.code, detail.reason], [4401, "invalid token: signature"]);
  assert.equal(calls, 2);
  assert.equal(server.connections.length, 2);
});

test("other 4401s stay fatal, and so does an expiry with a static token", async () => {
  for (const [options, reason] of [
    [{ getToken: () => fakeJwt({ exp: 4_000_000_000 }) }, "invalid token"],
    [{ token: fakeJwt({ exp: 4_000_000_000 }) }, "token expired"],
  ]) {
    const server = await startServer();
    const client = makeClient({ url: server.url, ...options });
    client.subscribe("c1");
    const conn = await server.connection(0);
    await conn.waitMessage((m) => m.type === "ws.subscribe");
    const failed = nextEmit(client, "status", (s) => s.status === "failed");
    conn.close(4401, reason);
    assert.equal((await failed).code, 4401);
    assert.equal(server.connections.length, 1, reason);
  }
});

test("a token function (the old option) also reconnects after an expiry, but never refreshes", async () => {
  const server = await refreshingServer((conn, msg) => refreshed(msg));
  let calls = 0;
  const client = makeClient({ url: server.url, token: () => fakeJwt({ exp: Date.now() / 1000 + 1.5, n: ++calls }) });
  client.subscribe("c1");
  const conn0 = await server.connection(0);
  await waitFor(() => Date.now() / 1000 > tokenExpiry(conn0.url.searchParams.get("token")), { what: "exp" });
  assert.equal(conn0.messages("ws.refresh").length, 0);
  conn0.close(4401, "token expired");
  const conn1 = await server.connection(1);
  await conn1.waitMessage((m) => m.type === "ws.subscribe");
  assert.equal(calls, 2);
});

// ---- per-subscription forbidden ---------------------------------------------------------------

test("forbidden ends one subscription (ws.error with conv_id, ws.unsubscribed reason), never resubscribed", async () => {
  const server = await startServer({
    onMessage(conn, msg) {
      if (msg.type !== "ws.subscribe" || msg.conv_id !== "secret") return false;
      conn.send({ type: "ws.error", code: "forbidden", conv_id: "secret", message: "token does not allow conversation 'secret'" });
      return true;
    },
  });
  const client = makeClient({ url: server.url, getToken: () => fakeJwt({ exp: 4_000_000_000 }) });
  const events = record(client, "event");
  const gone = record(client, "unsubscribed");
  const errors = record(client, "error");
  client.subscribe("a").subscribe("b");
  const conn0 = await server.connection(0);
  await waitFor(() => conn0.messages("ws.subscribe").length === 2);
  client.subscribe("secret");
  await waitFor(() => gone.length === 1, { what: "the forbidden subscription dropped" });
  assert.deepEqual(gone[0], { type: "ws.unsubscribed", conv_id: "secret", reason: "forbidden",
                              message: "token does not allow conversation 'secret'" });
  assert.equal(errors[0].conv_id, "secret");
  assert.deepEqual(client.subscriptions, ["a", "b"]);
  // after a refresh the server ends b: dropped too, a goes on
  conn0.send({ type: "ws.unsubscribed", conv_id: "b", reason: "forbidden" }, ev("a", 1), ev("b", 1));
  await waitFor(() => gone.length === 2 && events.length === 1);
  assert.deepEqual(client.subscriptions, ["a"]);
  assert.deepEqual(events.map((e) => `${e.conv_id}${e.seq}`), ["a1"]);
  assert.equal(client.status, "open");
  conn0.close(1011, "restart");
  const conn1 = await server.connection(1);
  await conn1.waitMessage((m) => m.type === "ws.subscribe");
  await sleep(50); // let any further ws.subscribe arrive: there must be none
  assert.deepEqual(conn1.messages("ws.subscribe").map((m) => m.conv_id), ["a"]);
});

// ---- SSE: a stream ended at exp ---------------------------------------------------------------

/** A fetch standing in for /sse: each call streams what `script(call)` writes (call: {url, headers, write, end}). */
function fakeSseFetch(script) {
  const calls = [];
  const fetchFn = async (url, init) => {
    let controller;
    const body = new ReadableStream({ start: (c) => void (controller = c) });
    const encoder = new TextEncoder();
    const call = {
      url: new URL(url),
      headers: init.headers,
      write: (obj) => controller.enqueue(encoder.encode(`data: ${JSON.stringify(obj)}\n\n`)),
      end: () => controller.close(),
    };
    init.signal?.addEventListener("abort", () => controller.error(new Error("aborted")));
    calls.push(call);
    queueMicrotask(() => script(call, calls.length - 1));
    return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
  };
  return { fetchFn, calls };
}

test("SSE: a stream the gateway ends at exp reconnects with a fresh getToken() and resumes", async () => {
  const tokens = [];
  const { fetchFn, calls } = fakeSseFetch((call, n) => {
    const conv = call.url.searchParams.get("conv_id");
    call.write({ type: "ws.hello", connection_id: `s${n}`, gateway_id: "fake", profile: "default", server_time: Date.now() });
    call.write({ type: "ws.subscribed", conv_id: conv, epoch: "E1", seq: n === 0 ? 0 : 2 });
    if (n === 0) {
      call.write(ev(conv, 1));
      call.write(ev(conv, 2));
      const exp = tokenExpiry(tokens[0]);
      waitFor(() => Date.now() / 1000 >= exp, { what: "exp", timeoutMs: 5_000 }).then(() => call.end());
    } else {
      call.write(ev(conv, 3));
    }
  });
  const client = makeClient({
    url: "ws://sse.test/ws",
    transport: "sse",
    fetch: fetchFn,
    getToken: () => {
      const token = fakeJwt({ exp: Date.now() / 1000 + 1, n: tokens.length });
      tokens.push(token);
      return token;
    },
  });
  const events = record(client, "event");
  const statuses = record(client, "status");
  client.subscribe("c1");
  await waitFor(() => events.length === 3, { what: "3 events over two streams", timeoutMs: 8_000 });
  assert.deepEqual(seqs(events), [1, 2, 3]);
  assert.equal(calls.length, 2);
  assert.equal(calls[0].headers.authorization, `Bearer ${tokens[0]}`);
  assert.equal(calls[1].headers.authorization, `Bearer ${tokens[1]}`);
  assert.equal(calls[1].url.searchParams.get("since"), "2");
  assert.equal(calls[1].url.searchParams.get("epoch"), "E1");
  const closed = statuses.find((s) => s.status === "closed");
  assert.deepEqual([closed.code, closed.reason, closed.delayMs], [4401, "token expired", 0]);
});

// ---- real gateways ----------------------------------------------------------------------------

const found = findGateway();
if ("error" in found) console.error(`token gateway tests cannot run: ${found.error}`);

describe("tokens against a real gateway", { timeout: 90_000, concurrency: true }, () => {
  /** @type {Gateway} */
  let gw;
  const clients = [];
  let counter = 0;
  const newConv = () => `jstok-${process.pid}-${++counter}`;

  before(async () => {
    gw = await Gateway.start({ args: ["--auth-secret", SECRET] });
  });
  after(async () => {
    for (const c of clients) c.close();
    await gw?.stop();
  });
  const client = (options) => {
    const c = new BroadcasterClient({ url: gw.ws, WebSocket, backoff: { initialMs: 50, maxMs: 300 }, pingIntervalMs: 0, ...options });
    clients.push(c);
    return c;
  };

  /** Publish `count` events, one every `everyMs`, to `conv`; resolves with the seqs published. */
  async function publishSteadily(conv, count, everyMs) {
    const published = [];
    for (let i = 0; i < count; i++) {
      published.push((await gw.publish(conv, "chat.message", { i })).seq);
      await sleep(everyMs); // pacing of the publisher, not a wait for a condition
    }
    return published;
  }

  /** Publish steadily to `conv` (subscribed, its events recorded in `events`): every one arrives once, in order. */
  async function publishAndCheck(conv, events, count, everyMs) {
    const published = await publishSteadily(conv, count, everyMs);
    await waitFor(() => events.length === published.length, { what: "every event", timeoutMs: 10_000 });
    assert.deepEqual(seqs(events), published);
  }

  test("a 3 s token refreshed on the open socket: events for 10 s over one connection", async () => {
    const conv = newConv();
    const c = client({ getToken: () => signedJwt({ ttlS: 3 }) });
    const events = record(c, "event");
    const hellos = record(c, "hello");
    await subscribeAll(c, [conv]);
    await publishAndCheck(conv, events, 50, 200);
    assert.equal(hellos.length, 1, "one connection for the whole time");
    assert.ok(c.stats.refreshes >= 3, `refreshes: ${c.stats.refreshes}`);
    assert.equal(c.stats.refreshFailures, 0);
    c.close();
  });

  test("getToken fails until the token expired: one reconnect, resumed without gap or duplicate", async () => {
    const conv = newConv();
    let firstExp = null;
    const c = client({
      getToken: () => {
        if (firstExp === null) {
          const token = signedJwt({ ttlS: 3 });
          firstExp = tokenExpiry(token);
          return token;
        }
        if (Date.now() / 1000 < firstExp) throw new Error("no token before the first expiry");
        return signedJwt({ ttlS: 600 });
      },
    });
    const events = record(c, "event");
    const hellos = record(c, "hello");
    const statuses = record(c, "status");
    await subscribeAll(c, [conv]);
    await publishAndCheck(conv, events, 40, 150);
    assert.ok(Date.now() / 1000 > firstExp + 1, "the test outlived the first token");
    assert.equal(hellos.length, 2, JSON.stringify(statuses));
    const closes = statuses.filter((s) => s.status === "closed");
    assert.deepEqual(closes.map((s) => [s.code, s.reason]), [[4401, "token expired"]]);
    assert.ok(c.stats.refreshFailures >= 1);
    c.close();
  });

  test("a refresh whose token no longer allows a conversation ends that subscription only", async () => {
    const keep = newConv();
    const lose = newConv();
    let narrow = false;
    const c = client({ getToken: () => signedJwt({ ttlS: 3, convs: narrow ? [keep] : ["*"] }) });
    const events = record(c, "event");
    const gone = record(c, "unsubscribed");
    await subscribeAll(c, [keep, lose]);
    narrow = true;
    await waitFor(() => gone.length === 1, { what: "the narrowed subscription ended", timeoutMs: 10_000 });
    assert.deepEqual([gone[0].conv_id, gone[0].reason], [lose, "forbidden"]);
    assert.deepEqual(c.subscriptions, [keep]);
    const seq = (await gw.publish(keep, "chat.message", { after: true })).seq;
    await gw.publish(lose, "chat.message", { after: true });
    await waitFor(() => events.some((e) => e.conv_id === keep && e.seq === seq), { what: "the kept conversation's event" });
    assert.ok(!events.some((e) => e.conv_id === lose));
    // a later subscribe the token does not allow: ws.error forbidden, the socket stays
    const other = newConv();
    c.subscribe(other);
    await waitFor(() => gone.length === 2, { what: "the refused subscribe", timeoutMs: 10_000 });
    assert.deepEqual([gone[1].conv_id, gone[1].reason], [other, "forbidden"]);
    assert.equal(c.status, "open");
    assert.equal(c.stats.connects, 1);
    c.close();
  });

  test("SSE: a stream ended at exp reconnects with a fresh token and resumes", async () => {
    const conv = newConv();
    const c = client({ transport: "sse", getToken: () => signedJwt({ ttlS: 2 }) });
    const events = record(c, "event");
    const statuses = record(c, "status");
    await subscribeAll(c, [conv]);
    await publishAndCheck(conv, events, 30, 150);
    const closes = statuses.filter((s) => s.status === "closed");
    assert.ok(closes.length >= 1 && closes.every((s) => s.code === 4401 && s.reason === "token expired"),
              JSON.stringify(closes));
    assert.notEqual(c.status, "failed");
    c.close();
  });
});
