// Start a real `broadcaster-gateway` as a subprocess for end-to-end tests.
//
// The command is BROADCASTER_GATEWAY_CMD (a shell command line; default `broadcaster-gateway`
// from PATH); `--port N` and any extra arguments are appended. The child runs in its own
// process group so that stopping it also stops whatever the command line started.

import { spawn } from "node:child_process";
import { accessSync, constants } from "node:fs";
import { createServer } from "node:net";
import { delimiter, join } from "node:path";
import { sleep } from "./util.js";

export const GATEWAY_CMD = process.env.BROADCASTER_GATEWAY_CMD || "broadcaster-gateway";

/** Why the gateway tests cannot run here, or null when they can. */
export function gatewayUnavailable() {
  if (process.env.BROADCASTER_GATEWAY_CMD) return null;
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    try {
      accessSync(join(dir, "broadcaster-gateway"), constants.X_OK);
      return null;
    } catch {
      /* not here */
    }
  }
  return "broadcaster-gateway is not on PATH (set BROADCASTER_GATEWAY_CMD, or `pip install -e .`)";
}

export async function freePort() {
  const srv = createServer();
  await new Promise((resolve) => srv.listen(0, "127.0.0.1", resolve));
  const { port } = srv.address();
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

export class Gateway {
  /**
   * Start a gateway and wait until /readyz answers 200.
   * @param {{port?: number, args?: string[], timeoutMs?: number}} [options]
   */
  static async start({ port, args = [], timeoutMs = 30_000 } = {}) {
    const gw = new Gateway(port ?? (await freePort()), args);
    await gw.#waitReady(timeoutMs);
    return gw;
  }

  constructor(port, args) {
    this.port = port;
    this.http = `http://127.0.0.1:${port}`;
    this.ws = `ws://127.0.0.1:${port}/ws`;
    this.output = "";
    const env = { ...process.env };
    // The tests rely on the embedded in-memory backend (one process, state lost on restart).
    delete env.BROADCASTER_REDIS_URL;
    delete env.BROADCASTER_PORT;
    delete env.BROADCASTER_HOST;
    const line = [GATEWAY_CMD, "--host", "127.0.0.1", "--port", String(port), ...args].join(" ");
    this.child = spawn(line, { shell: true, detached: true, env, stdio: ["ignore", "pipe", "pipe"] });
    const keep = (chunk) => {
      this.output = (this.output + chunk).slice(-20_000);
    };
    this.child.stdout.on("data", keep);
    this.child.stderr.on("data", keep);
    this.exited = new Promise((resolve) => this.child.once("exit", (code, signal) => resolve({ code, signal })));
    this.running = true;
    this.exited.then(() => {
      this.running = false;
    });
  }

  async #waitReady(timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (!this.running) throw new Error(`gateway exited before it was ready:\n${this.output}`);
      try {
        const res = await fetch(`${this.http}/readyz`);
        if (res.status === 200) return;
      } catch {
        /* not listening yet */
      }
      await sleep(100);
    }
    await this.stop("SIGKILL");
    throw new Error(`gateway not ready after ${timeoutMs} ms:\n${this.output}`);
  }

  /** Signal the gateway's process group and wait for the gateway to exit (SIGKILL after graceMs). */
  async stop(signal = "SIGTERM", graceMs = 20_000) {
    if (!this.running) return this.exited;
    this.#signal(signal);
    const timer = setTimeout(() => this.#signal("SIGKILL"), graceMs);
    const result = await this.exited;
    clearTimeout(timer);
    return result;
  }

  #signal(signal) {
    try {
      process.kill(-this.child.pid, signal);
    } catch {
      /* already gone */
    }
  }

  /** POST an event through the HTTP API; returns the parsed response body. */
  async publish(conv, type, data, { id, key } = {}) {
    const body = { type, data };
    if (id !== undefined) body.id = id;
    if (key !== undefined) body.key = key;
    const res = await fetch(`${this.http}/v1/conversations/${encodeURIComponent(conv)}/events`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    const text = await res.text();
    if (res.status !== 200) throw new Error(`publish ${conv} ${type}: HTTP ${res.status} ${text}`);
    return JSON.parse(text);
  }

  async getJson(path) {
    const res = await fetch(`${this.http}${path}`);
    if (res.status !== 200) throw new Error(`GET ${path}: HTTP ${res.status}`);
    return res.json();
  }
}
