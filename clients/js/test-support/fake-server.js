// A scriptable stand-in for the gateway's /ws endpoint, built on the `ws` package.
//
// By default it behaves like the real server for the control messages (hello on connect,
// ws.subscribed / ws.unsubscribed / ws.pong), and lets each test push arbitrary frames and
// close connections with any code.

import { WebSocketServer } from "ws";
import { waitFor } from "./util.js";

export class FakeConnection {
  constructor(socket, request) {
    this.socket = socket;
    this.url = new URL(request.url, "http://fake");
    /** Every JSON object received from the client, in order. */
    this.received = [];
    this.closed = new Promise((resolve) => socket.on("close", (code, reason) => resolve({ code, reason: String(reason) })));
  }

  /** Send objects as one NDJSON text frame. */
  send(...objects) {
    this.socket.send(objects.map((o) => JSON.stringify(o)).join("\n"));
  }

  sendRaw(text) {
    this.socket.send(text);
  }

  close(code, reason = "") {
    this.socket.close(code, reason);
  }

  terminate() {
    this.socket.terminate();
  }

  /** Messages of one type received so far. */
  messages(type) {
    return this.received.filter((m) => m.type === type);
  }

  /** Wait for a received message matching `predicate` (among those already received, too). */
  waitMessage(predicate, timeoutMs = 5000) {
    return waitFor(() => this.received.find(predicate), { timeoutMs, what: "a client message" });
  }
}

export class FakeServer {
  /**
   * @param {object} [options]
   * @param {boolean} [options.answerPings] reply ws.pong to ws.ping (default true)
   * @param {(conv: string) => {epoch: string, seq: number}} [options.head] what ws.subscribed reports
   * @param {(conn: FakeConnection, msg: object) => boolean} [options.onMessage] sees every client message
   *   first; returning true means it answered (the default reply is skipped)
   * @param {(conn: FakeConnection, index: number) => [number, string] | null} [options.refuse] close a new
   *   connection at once with [code, reason], before any ws.hello (a refused handshake), or null to accept it
   */
  static async start(options = {}) {
    const server = new FakeServer(options);
    await new Promise((resolve) => server.wss.once("listening", resolve));
    return server;
  }

  constructor({ answerPings = true, head = () => ({ epoch: "E1", seq: 0 }), onMessage = null, refuse = null } = {}) {
    this.answerPings = answerPings;
    this.head = head;
    this.onMessage = onMessage;
    this.refuse = refuse;
    /** @type {FakeConnection[]} */
    this.connections = [];
    this.wss = new WebSocketServer({ host: "127.0.0.1", port: 0, path: "/ws" });
    this.wss.on("connection", (socket, request) => {
      const conn = new FakeConnection(socket, request);
      this.connections.push(conn);
      socket.on("message", (data) => {
        const msg = JSON.parse(String(data));
        conn.received.push(msg);
        if (this.onMessage?.(conn, msg)) return;
        this.#reply(conn, msg);
      });
      const refusal = this.refuse?.(conn, this.connections.length - 1);
      if (refusal) {
        conn.close(...refusal);
        return;
      }
      conn.send({ type: "ws.hello", connection_id: `c${this.connections.length}`, gateway_id: "fake", profile: conn.url.searchParams.get("profile"), server_time: Date.now() });
    });
  }

  get url() {
    return `ws://127.0.0.1:${this.wss.address().port}/ws`;
  }

  /** The n-th connection (0-based) once it exists. */
  connection(n, timeoutMs = 5000) {
    return waitFor(() => this.connections[n], { timeoutMs, what: `connection #${n}` });
  }

  async close() {
    for (const conn of this.connections) conn.terminate();
    await new Promise((resolve) => this.wss.close(resolve));
  }

  #reply(conn, msg) {
    switch (msg.type) {
      case "ws.subscribe": {
        const { epoch, seq } = this.head(msg.conv_id);
        conn.send({ type: "ws.subscribed", conv_id: msg.conv_id, epoch, seq });
        break;
      }
      case "ws.unsubscribe":
        conn.send({ type: "ws.unsubscribed", conv_id: msg.conv_id });
        break;
      case "ws.ping":
        if (this.answerPings) conn.send({ type: "ws.pong", server_time: Date.now() });
        break;
      default:
        break;
    }
  }
}

/** An event object as the server sends it. */
export function ev(conv, seq, type = "chat.message", data = { n: seq }, extra = {}) {
  return { type, conv_id: conv, seq, id: `${conv}-${seq}`, ts: 1_700_000_000_000 + seq, data, ...extra };
}
