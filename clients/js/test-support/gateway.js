// Start a real `broadcaster-gateway` as a subprocess for end-to-end tests.
//
// Which gateway (the first that applies; see findGateway):
//   1. BROADCASTER_GATEWAY_CMD - a shell command line, e.g. "python -m gateway.cli";
//   2. BROADCASTER_GATEWAY     - the path of a broadcaster-gateway executable;
//   3. the repository's own .venv/bin/broadcaster-gateway (the README's `pip install -e .`);
//   4. broadcaster-gateway on PATH.
// None of them: the end-to-end suites fail, saying what was tried - they never skip.
// `--port N` and any extra arguments are appended. The child runs in its own process
// group so that stopping it also stops whatever the command line started.

import { spawn } from "node:child_process";
import { accessSync, constants, statSync } from "node:fs";
import { createServer } from "node:net";
import { delimiter, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { sleep } from "./util.js";

/** The repository root (clients/js/test-support -> ../../..). */
export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const VENV_GATEWAY = join(REPO_ROOT, ".venv", "bin", "broadcaster-gateway");

function executable(path) {
  try {
    accessSync(path, constants.X_OK);
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

const shellQuote = (text) => `'${text.replace(/'/g, `'\\''`)}'`;

/**
 * The gateway the end-to-end tests start.
 * @param {NodeJS.ProcessEnv} [env]
 * @returns {{command: string, source: string} | {error: string}}
 *   command: a shell command line; source: where it came from. error: why none was found.
 */
export function findGateway(env = process.env) {
  if (env.BROADCASTER_GATEWAY_CMD) return { command: env.BROADCASTER_GATEWAY_CMD, source: "BROADCASTER_GATEWAY_CMD" };
  if (env.BROADCASTER_GATEWAY) {
    if (!executable(env.BROADCASTER_GATEWAY)) {
      return { error: `BROADCASTER_GATEWAY=${env.BROADCASTER_GATEWAY} is not an executable file` };
    }
    return { command: shellQuote(env.BROADCASTER_GATEWAY), source: "BROADCASTER_GATEWAY" };
  }
  if (executable(VENV_GATEWAY)) return { command: shellQuote(VENV_GATEWAY), source: "the repository's .venv" };
  for (const dir of (env.PATH ?? "").split(delimiter)) {
    if (dir && executable(join(dir, "broadcaster-gateway"))) {
      return { command: shellQuote(join(dir, "broadcaster-gateway")), source: "PATH" };
    }
  }
  return {
    error:
      `no broadcaster-gateway found: not at ${VENV_GATEWAY} nor on PATH, and neither BROADCASTER_GATEWAY (a path) ` +
      "nor BROADCASTER_GATEWAY_CMD (a command line) is set. Install it as the README says " +
      "(python3 -m venv .venv && .venv/bin/pip install -e . at the repository root), or run only the unit " +
      "tests: npm run test:unit",
  };
}

/** The gateway's command line; throws, saying what to do, when there is none. */
export function gatewayCommand(env = process.env) {
  const found = findGateway(env);
  if ("error" in found) throw new Error(found.error);
  return found.command;
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
    const line = [gatewayCommand(), "--host", "127.0.0.1", "--port", String(port), ...args].join(" ");
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
  async publish(conv, type, data, { id, key, op } = {}) {
    const body = { type, data };
    if (id !== undefined) body.id = id;
    if (key !== undefined) body.key = key;
    if (op !== undefined) body.op = op;
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
