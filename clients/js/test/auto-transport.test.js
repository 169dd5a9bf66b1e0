// `transport: "auto"` against a real gateway subprocess (in-memory backend) behind a loopback
// proxy that answers a websocket upgrade with 503 (a gateway past --max-pending-handshakes or
// its connection limit), as told: one refusal must not cost the websocket, a proxy that never
// upgrades must end on SSE, and a client on SSE tries the websocket again on a later reconnect.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createServer, request as httpRequest } from "node:http";
import { connect } from "node:net";
import WebSocket from "ws";

import { AUTO_SSE_AFTER_FAILURES, BroadcasterClient } from "../broadcaster-client.js";
import { Gateway, findGateway } from "../test-support/gateway.js";
import { nextEmit, record, waitFor } from "../test-support/util.js";

const found = findGateway();
if ("error" in found) console.error(`auto transport tests cannot run: ${found.error}`);

let counter = 0;
const newConv = () => `jauto-${process.pid}-${++counter}`;
const seqs = (events) => events.map((e) => e.seq);

/**
 * An HTTP proxy to the gateway on `port`: plain requests (/sse) are forwarded; an upgrade is
 * refused with 503 while `refuse(n)` (n = upgrades seen before it) is true, else spliced through.
 */
class RefusingProxy {
  static async start(port, refuse) {
    const proxy = new RefusingProxy(port, refuse);
    await new Promise((resolve) => proxy.server.listen(0, "127.0.0.1", resolve));
    return proxy;
  }

  constructor(port, refuse) {
    this.refuse = refuse;
    /** What arrived, in order: "upgrade-refused", "upgrade", "sse". */
    this.log = [];
    this.sockets = new Set();
    this.server = createServer((req, res) => {
      this.log.push(req.url.startsWith("/sse") ? "sse" : "http");
      const upstream = httpRequest({ host: "127.0.0.1", port, path: req.url, method: req.method, headers: req.headers },
        (answer) => {
          res.writeHead(answer.statusCode ?? 502, answer.headers);
          answer.pipe(res);
        });
      upstream.on("error", () => res.destroy());
      res.on("close", () => upstream.destroy());
      req.pipe(upstream);
    });
    this.server.on("connection", (socket) => {
      this.sockets.add(socket);
      socket.on("close", () => this.sockets.delete(socket));
    });
    this.server.on("upgrade", (req, socket, head) => {
      const seen = this.log.filter((kind) => kind.startsWith("upgrade")).length;
      if (this.refuse(seen)) {
        this.log.push("upgrade-refused");
        socket.end("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
      }
      this.log.push("upgrade");
      const upstream = connect(port, "127.0.0.1", () => {
        const lines = [`${req.method} ${req.url} HTTP/1.1`];
        for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
        upstream.write(lines.join("\r\n") + "\r\n\r\n");
        upstream.write(head);
        socket.pipe(upstream).pipe(socket);
      });
      this.sockets.add(upstream);
      upstream.on("close", () => socket.destroy());
      socket.on("close", () => upstream.destroy());
      upstream.on("error", () => socket.destroy());
      socket.on("error", () => upstream.destroy());
    });
  }

  get ws() {
    return `ws://127.0.0.1:${this.server.address().port}/ws`;
  }

  /** Cut every connection through the proxy (the client sees its stream or socket drop). */
  cut() {
    for (const socket of this.sockets) socket.destroy();
  }

  async close() {
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

const clients = [];
function makeClient(url, options = {}) {
  const client = new BroadcasterClient({
    url, WebSocket, transport: "auto", backoff: { initialMs: 20, maxMs: 100 }, pingIntervalMs: 0, ...options,
  });
  clients.push(client);
  return client;
}

describe('transport "auto" behind a proxy answering 503 to upgrades', { timeout: 60_000 }, () => {
  /** @type {Gateway} */
  let gw;
  const proxies = [];
  const proxy = async (refuse) => {
    const p = await RefusingProxy.start(gw.port, refuse);
    proxies.push(p);
    return p;
  };

  before(async () => {
    gw = await Gateway.start();
  });

  after(async () => {
    for (const c of clients) c.close();
    await Promise.all(proxies.map((p) => p.close()));
    await gw?.stop();
  });

  async function subscribeAndReceive(client, conv, from, count) {
    const events = record(client, "event");
    const subscribed = nextEmit(client, "subscribed", (m) => m.conv_id === conv, 15_000);
    client.subscribe(conv);
    await subscribed;
    for (let i = from; i < from + count; i++) await gw.publish(conv, "chat.message", { i });
    await waitFor(() => events.length === count, { what: `${count} events`, timeoutMs: 10_000 });
    return events;
  }

  test("one refused upgrade, then accepted: it stays on the websocket", async () => {
    const p = await proxy((n) => n === 0);
    const client = makeClient(p.ws);
    const transports = record(client, "transport");
    const events = await subscribeAndReceive(client, newConv(), 1, 3);
    assert.deepEqual(seqs(events), [1, 2, 3]);
    assert.equal(client.transport, "websocket");
    assert.deepEqual(transports, []);
    assert.deepEqual(p.log, ["upgrade-refused", "upgrade"]);
  });

  test("a proxy that never upgrades: SSE after the websocket failed sseAfterFailures times in a row", async () => {
    const p = await proxy(() => true);
    const client = makeClient(p.ws);
    const switched = nextEmit(client, "transport", () => true, 15_000);
    const events = await subscribeAndReceive(client, newConv(), 1, 3);
    assert.equal((await switched).transport, "sse");
    assert.equal(client.transport, "sse");
    assert.deepEqual(seqs(events), [1, 2, 3]);
    const firstSse = p.log.indexOf("sse");
    assert.deepEqual(p.log.slice(0, firstSse), Array(AUTO_SSE_AFTER_FAILURES).fill("upgrade-refused"));
  });

  test("on SSE, a reconnect after websocketRetryMs tries the websocket again and keeps it", async () => {
    let refusing = true;
    const p = await proxy(() => refusing);
    const client = makeClient(p.ws, { sseAfterFailures: 2, websocketRetryMs: 200 });
    const transports = record(client, "transport");
    const conv = newConv();
    const events = await subscribeAndReceive(client, conv, 1, 2);
    assert.equal(client.transport, "sse");
    assert.deepEqual(p.log.slice(0, 3), ["upgrade-refused", "upgrade-refused", "sse"]);

    // still refusing: the retry fails once and the client is back on SSE at once
    const since = Date.now();
    await waitFor(() => Date.now() - since > 250, { what: "websocketRetryMs", timeoutMs: 2_000 });
    p.cut();
    await waitFor(() => transports.length === 3, { what: "retry, then back to SSE", timeoutMs: 10_000 });
    assert.deepEqual(transports.map((t) => t.transport), ["sse", "websocket", "sse"]);

    refusing = false;
    const again = Date.now();
    await waitFor(() => Date.now() - again > 250, { what: "websocketRetryMs", timeoutMs: 2_000 });
    await waitFor(() => client.status === "open", { what: "SSE open again", timeoutMs: 10_000 });
    p.cut();
    await waitFor(() => client.transport === "websocket" && client.status === "open",
                  { what: "the websocket open", timeoutMs: 10_000 });
    for (let i = 3; i <= 4; i++) await gw.publish(conv, "chat.message", { i });
    await waitFor(() => events.length === 4, { what: "events over the websocket", timeoutMs: 10_000 });
    assert.deepEqual(seqs(events), [1, 2, 3, 4]); // resumed across both switches: no gap, no duplicate
    assert.equal(transports.at(-1).transport, "websocket");
    assert.equal(p.log.at(-1), "upgrade");
  });
});
