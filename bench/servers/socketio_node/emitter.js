// The external emitter feeding the `sionode` peer: @socket.io/redis-emitter 5 on
// node-redis 4, driven by bench/run.py over stdin / stdout (JSON lines) exactly like
// bench/loadpub.py: {"cmd": "init" | "probe" | "run" | "quit", ...}, same answers.
//
// Each event is emitter.to(conv).emit("event", object), where object is what
// loadpub.py's JSON copy carries ({"type", "conv_id", "seq", "ts", "data"}), data
// being {"t": publish time in wall-clock µs, "s": step id, "p": padding, "raw": {...}}
// padded to payload_bytes as JSON. Publishes are paced like loadpub.py's (a 2 ms tick,
// no more than 0.5 s of events unacknowledged); node-redis pipelines them on one
// connection and a PING after each batch tells when Redis has read them.
"use strict";

const readline = require("node:readline");
const { performance } = require("node:perf_hooks");
const { createClient } = require("redis");
const { Emitter } = require("@socket.io/redis-emitter");

const MAX_OUTSTANDING_SECONDS = 0.5;
const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class Publisher {
  constructor(msg) {
    this.url = msg.url;
    this.key = `${msg.prefix}-socketio`;
    this.convs = msg.convs;
    this.seq = new Array(this.convs.length).fill(0);
    this.next = 0;
    this.outstanding = 0;
    this.errors = [];
    this.waiters = [];
    const sample = JSON.stringify(Publisher.data(1_700_000_000_000_000, 1, ""));
    this.pad = "x".repeat(Math.max(0, (msg.payload_bytes ?? 100) - sample.length));
  }

  static data(t, step, pad) {
    return { t, s: step, p: pad, raw: { tokens: 12, model: "m1" } };
  }

  async connect() {
    this.client = createClient({ url: this.url });
    this.client.on("error", (err) => this.error(`redis: ${err.message}`));
    await this.client.connect();
    this.emitter = new Emitter(this.client, { key: this.key });
  }

  error(text) {
    if (this.errors.length < 5) this.errors.push(text);
  }

  batch(n, step, perConv) {
    const t = nowUs();
    const data = Publisher.data(t, step, this.pad);
    const ts = Math.floor(t / 1000);
    for (let i = 0; i < n; i++) {
      const index = this.next;
      this.next = (index + 1) % this.convs.length;
      const conv = this.convs[index];
      const seq = (this.seq[index] += 1);
      perConv[index] += 1;
      this.emitter.to(conv).emit("event", { type: "bench.e", conv_id: conv, seq, ts, data });
    }
    this.outstanding += n;
    this.client
      .ping()
      .catch((err) => this.error(`ping: ${err.message}`))
      .finally(() => {
        this.outstanding -= n;
        if (this.outstanding === 0) this.waiters.splice(0).forEach((wake) => wake());
      });
  }

  idle() {
    return this.outstanding === 0 ? Promise.resolve() : new Promise((wake) => this.waiters.push(wake));
  }

  async probe(step) {
    const perConv = new Array(this.convs.length).fill(0);
    for (let start = 0; start < this.convs.length; start += 500) {
      this.batch(Math.min(500, this.convs.length - start), step, perConv);
      await this.idle();
    }
    return { sent: perConv.reduce((a, b) => a + b, 0), per_conv: perConv, errors: this.errors.slice(0, 5) };
  }

  async run(step, rate, duration, maxSeconds) {
    const perConv = new Array(this.convs.length).fill(0);
    const total = Math.floor(rate * duration);
    const limit = Math.max(100, Math.floor(rate * MAX_OUTSTANDING_SECONDS));
    const start = performance.now();
    let sent = 0;
    let behind = 0;
    while (sent < total) {
      const elapsed = (performance.now() - start) / 1000;
      if (elapsed > maxSeconds) break;
      const due = Math.min(total, Math.floor(rate * elapsed) + 1) - sent;
      if (due > 0 && this.outstanding < limit) {
        const n = Math.min(due, 2000);
        this.batch(n, step, perConv);
        sent += n;
      }
      behind = Math.max(behind, elapsed - sent / rate);
      await sleep(2);
    }
    const publishElapsed = (performance.now() - start) / 1000;
    await this.idle();
    return {
      sent, elapsed: publishElapsed, acked_after: (performance.now() - start) / 1000, per_conv: perConv,
      behind_ms: Math.round(behind * 10000) / 10, errors: this.errors.slice(0, 5), seq_mismatch: 0,
    };
  }
}

async function main() {
  const reply = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  let publisher = null;
  reply({ hello: "sionode-emitter" });
  for await (const line of lines) {
    const msg = JSON.parse(line);
    if (msg.cmd === "init") {
      publisher = new Publisher(msg);
      await publisher.connect();
      reply({ ok: true });
    } else if (msg.cmd === "probe" && publisher) {
      reply(await publisher.probe(msg.step));
    } else if (msg.cmd === "run" && publisher) {
      reply(await publisher.run(msg.step, msg.rate, msg.duration, msg.max_seconds ?? msg.duration * 2 + 5));
    } else if (msg.cmd === "quit") {
      if (publisher) await publisher.client.quit();
      reply({ bye: true, deleted: 0 });
      break;
    } else {
      reply({ error: `bad command ${JSON.stringify(msg.cmd)}` });
    }
  }
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
