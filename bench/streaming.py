"""LLM answer streaming (#17): bytes on the wire per client and gateway CPU per delivery.

    python bench/streaming.py [--convs 50] [--viewers 4] [--tokens 1500] [--rate 50] [--modes upsert,append]

One gateway (a subprocess on the local Redis, key prefix of its own), ``convs`` x
``viewers`` websocket clients (``hydrate=1``), and a publisher that streams one answer
per conversation, ``tokens`` tokens at ``rate`` tokens/s each (all conversations tick
together: one ``publish_many`` of one token per conversation every 1/rate s), straight to
Redis with the SDK. Modes:

* ``upsert``: each token republishes the whole message so far as a keyed upsert;
* ``append``: each token is an ``op="append"`` of the token alone;
* ``stream``: the SDK's ``producer.stream`` helper (window 20 ms), then a final upsert;
* ``delta``: as ``upsert``, with the viewers subscribed ``delta=1`` (the gateway's namespaces
  file allows deltas everywhere): each upsert reaches them as a delta ``{"$append": token}``.

Reported per mode: bytes a client received (mean), deliveries, gateway CPU seconds and
CPU per delivery (µs), and that every client ended with the whole message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import redis
import websockets

from producers import AsyncProducer

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(i: int) -> str:
    return f"tok{i % 10} "  # 5 bytes, about an English token as text


class Viewer:
    def __init__(self, url: str) -> None:
        self.url = url
        self.bytes = 0
        self.deliveries = 0
        self.text: dict[str, str] = {}
        self.done = asyncio.Event()

    async def run(self, conv: str, final_text: str) -> None:
        async with websockets.connect(f"{self.url}&conv_id={conv}", max_size=None, compression=None) as ws:
            async for frame in ws:
                self.bytes += len(frame)
                for line in (frame if isinstance(frame, str) else frame.decode()).split("\n"):
                    obj = orjson.loads(line)
                    kind = obj.get("type")
                    if kind == "ws.state":
                        for key, entity in obj["entities"].items():
                            self.text[key] = entity["data"].get("text", "")
                    elif not kind.startswith("ws."):
                        self.deliveries += 1
                        key = obj["key"]
                        piece = obj["data"].get("text", "")
                        if obj.get("op") == "delta":
                            patch = obj["data"].get("text")
                            if isinstance(patch, dict):
                                self.text[key] = self.text.get(key, "") + patch["$append"]
                            elif isinstance(patch, str):
                                self.text[key] = patch
                        elif obj.get("op") == "append":
                            self.text[key] = self.text.get(key, "") + piece
                        else:
                            self.text[key] = piece
                        if self.text[key] == final_text and obj["data"].get("done"):
                            self.done.set()
                            return


async def run_mode(mode: str, url: str, ws_url: str, prefix: str, pid: int, convs: int, viewers: int,
                   tokens: int, rate: float) -> dict[str, float]:
    run = secrets.token_hex(3)
    names = [f"s{run}-{i}" for i in range(convs)]
    final_text = "".join(token(i) for i in range(tokens))
    clients = [Viewer(ws_url + ("&delta=1" if mode == "delta" else "")) for _ in range(convs * viewers)]
    tasks = [asyncio.create_task(v.run(names[i // viewers], final_text)) for i, v in enumerate(clients)]
    await asyncio.sleep(1.0)  # every socket open and subscribed (bench only: not a test)
    cpu0 = cpu_seconds(pid)
    began = time.perf_counter()
    async with AsyncProducer.from_url(url, key_prefix=prefix) as p:
        if mode == "stream":
            streams = [p.stream(c, "answer", "llm.message", final={"done": True}) for c in names]
            for i in range(tokens):
                tick = began + i / rate
                await asyncio.sleep(max(0.0, tick - time.perf_counter()))
                await asyncio.gather(*(s.append(token(i)) for s in streams))
            await asyncio.gather(*(s.close() for s in streams))
        else:
            so_far = ""
            for i in range(tokens):
                tick = began + i / rate
                await asyncio.sleep(max(0.0, tick - time.perf_counter()))
                so_far += token(i)
                last = i == tokens - 1
                if mode in ("upsert", "delta"):
                    data = {"text": so_far, **({"done": True} if last else {})}
                    await p.publish_many([(c, "llm.message", data, None, "answer") for c in names])
                else:
                    await p.publish_many([(c, "llm.message", {"text": token(i)}, None, "answer", "append")
                                          for c in names])
            if mode == "append":
                await p.publish_many([(c, "llm.message", {"text": final_text, "done": True}, None, "answer")
                                      for c in names])
    await asyncio.wait_for(asyncio.gather(*(v.done.wait() for v in clients)), 60)
    wall = time.perf_counter() - began
    cpu = cpu_seconds(pid) - cpu0
    for t in tasks:
        t.cancel()
    deliveries = sum(v.deliveries for v in clients)
    return {"bytes_per_client": sum(v.bytes for v in clients) / len(clients), "deliveries": deliveries,
            "gateway_cpu_s": cpu, "cpu_us_per_delivery": 1e6 * cpu / deliveries, "wall_s": wall}


async def run_all(args: argparse.Namespace, prefix: str, port: int, pid: int) -> None:
    ws_url = f"ws://127.0.0.1:{port}/ws?hydrate=1"
    results = {}
    for mode in args.modes.split(","):
        results[mode] = r = await run_mode(mode, args.url, ws_url, prefix, pid, args.convs, args.viewers,
                                           args.tokens, args.rate)
        print(f"{mode:7s} bytes/client {r['bytes_per_client']:12,.0f}  deliveries {r['deliveries']:7d}  "
              f"gateway cpu {r['gateway_cpu_s']:6.2f} s  {r['cpu_us_per_delivery']:6.1f} µs/delivery  "
              f"wall {r['wall_s']:5.1f} s", flush=True)
    if "upsert" in results:
        base = results["upsert"]
        for mode, r in results.items():
            print(f"{mode:7s} bytes ÷ upsert {r['bytes_per_client'] / base['bytes_per_client']:.4f} "
                  f"(1/{base['bytes_per_client'] / r['bytes_per_client']:.1f})  cpu/delivery ÷ upsert "
                  f"{r['cpu_us_per_delivery'] / base['cpu_us_per_delivery']:.2f}")


def run_with_gateway(args: argparse.Namespace) -> None:
    prefix = "bs" + secrets.token_hex(4)
    port = free_port()
    env = {**os.environ, "BROADCASTER_LOG_LEVEL": "warning"}
    namespaces = Path(f"/tmp/bench-streaming-{prefix}.toml")
    namespaces.write_text('[namespaces."*"]\ndelta = true\n')
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--port", str(port), "--redis-url", args.url, "--key-prefix", prefix,
         "--namespaces", str(namespaces)], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            if time.monotonic() > deadline:
                raise SystemExit("gateway did not start")
            time.sleep(0.1)
        time.sleep(0.5)
        asyncio.run(run_all(args, prefix, port, gateway.pid))
    finally:
        gateway.terminate()
        gateway.wait(15)
        namespaces.unlink(missing_ok=True)
        client = redis.Redis.from_url(args.url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
        with contextlib.suppress(redis.ResponseError):
            from broadcaster.backends.scripts import library_name

            client.function_delete(library_name(prefix))
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--convs", type=int, default=50)
    parser.add_argument("--viewers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--modes", default="upsert,append,stream,delta")
    run_with_gateway(parser.parse_args())


if __name__ == "__main__":
    main()
