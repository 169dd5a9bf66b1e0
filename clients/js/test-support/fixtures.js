// The fake-server fixture of the unit test files: servers and clients closed after each test.

import { afterEach } from "node:test";
import WebSocket from "ws";

import { BroadcasterClient } from "../broadcaster-client.js";
import { FakeServer } from "./fake-server.js";

/**
 * Register (in the calling test file) an afterEach that closes, last first, what the returned
 * `startServer` (a FakeServer) and `makeClient` (a BroadcasterClient on `ws`, fast backoff, no
 * pings) made during the test.
 */
export function fakeServerFixture() {
  const cleanups = [];
  afterEach(async () => {
    while (cleanups.length) await cleanups.pop()();
  });

  async function startServer(options) {
    const server = await FakeServer.start(options);
    cleanups.push(() => server.close());
    return server;
  }

  function makeClient(options) {
    const client = new BroadcasterClient({ WebSocket, backoff: { initialMs: 20, maxMs: 100 }, pingIntervalMs: 0, ...options });
    cleanups.push(() => client.close());
    return client;
  }

  return { startServer, makeClient };
}
