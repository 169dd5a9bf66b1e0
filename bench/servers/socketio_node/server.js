// The Node socket.io peer of bench/run.py (server `sionode`): socket.io 4.8 with
// @socket.io/redis-adapter 8 on node-redis 4, as their READMEs set them up.
//
//   node server.js --port 8003 --redis-url redis://127.0.0.1:6379/0 --prefix bc
//
// One namespace ("/"), websocket transport only (the load clients open
// /socket.io/?EIO=4&transport=websocket directly), rooms = conversations: a client
// sends ["join", room] with an ack and is acked once it is in the room. Events come
// from @socket.io/redis-emitter (emitter.js) through the adapter, whose key is the
// run's prefix. GET /healthz answers 200 once the adapter's Redis clients are connected.
"use strict";

const http = require("node:http");
const { parseArgs } = require("node:util");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const { values } = parseArgs({
  options: {
    port: { type: "string", default: "8003" },
    "redis-url": { type: "string", default: "redis://127.0.0.1:6379/0" },
    prefix: { type: "string", default: "bc" },
  },
});

async function main() {
  const pubClient = createClient({ url: values["redis-url"] });
  const subClient = pubClient.duplicate();
  for (const client of [pubClient, subClient]) {
    client.on("error", (err) => console.error("redis:", err.message));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer((req, res) => {
    const ok = req.url === "/healthz";
    res.writeHead(ok ? 200 : 404, { "Content-Type": "text/plain" });
    res.end(ok ? "ok" : "not found");
  });
  const io = new Server(httpServer, {
    transports: ["websocket"],
    serveClient: false,
    adapter: createAdapter(pubClient, subClient, { key: `${values.prefix}-socketio` }),
  });
  io.on("connection", (socket) => {
    socket.on("join", (room, ack) => {
      socket.join(String(room));
      if (typeof ack === "function") ack("joined");
    });
  });
  httpServer.listen(Number(values.port), "127.0.0.1", 2048);
  const stop = () => {
    io.close();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
