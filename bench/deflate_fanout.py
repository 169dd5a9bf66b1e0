"""permessage-deflate A/B: ``--ws-compression deflate`` (context takeover) against ``shared``.

    python bench/deflate_fanout.py [--modes deflate,shared] [--rounds 3] [--sockets 2000] [--fanout 500]
                                   [--events 300] [--rate 20] [--gateway-root PATH]

Per round, each mode in turn (interleaved): a gateway subprocess (embedded backend,
``--ping-interval 0``), ``--sockets`` websockets clients offering permessage-deflate (the
first ``--fanout`` on one conversation, the rest idle on others) and one client offering
nothing that records every payload. Measured per run:

* idle RSS per socket: the gateway's RSS once every socket got its hello, less its RSS
  before the first connect, over ``--sockets``;
* CPU per delivery: ``--events`` events published over HTTP at ``--rate``/s, alternating a
  ~150 B chat event and a ~110 B LLM delta of one token (payloads as sent; the envelope
  alone is ~95 B); gateway user + system CPU over the fan-out, over
  the deliveries (``--fanout`` + 1 per event), and the bytes it wrote (``wchar`` of
  ``/proc/PID/io``: socket writes included) per delivery;
* once, from the recorded payloads: the bytes of each kind of event on the wire under each
  mode (context takeover: one compressor for the whole sequence, as websockets keeps per
  socket; shared: a fresh one per message, the plain frame where that is not smaller).

Loopback only, bounded in sockets, events and time. Prints one JSON line per run and a
summary table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets
from scenario_support import ROOT, Supervised, cpu_seconds, free_port, log, raise_nofile, rss_bytes
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

WINDOW = 12
SETTINGS = {"memLevel": 5}  # uvicorn's (and gateway.deflate's) compressor settings
FAN = "fan"
CHAT = {"user": "u-1042", "text": "see you at the standup"}
"""Data of the chat event (~150 B with its envelope)."""


def delta(i: int) -> dict[str, Any]:
    """Data of the LLM delta: one token (~110 B with its envelope)."""
    return {"t": f"tok{i % 10} "}


def wchar(pid: int) -> int:
    """Bytes ``pid`` wrote through write(2) and friends, sockets included (0 if unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Reader:
    """Reads one fan-out socket, counting event objects (and keeping them, for the recorder)."""

    def __init__(self, ws: Any, keep: bool, target: int) -> None:
        self.ws = ws
        self.events = 0
        self.kept: list[bytes] = []
        self.keep = keep
        self.target = target
        self.done = asyncio.Event()

    async def run(self) -> None:
        try:
            async for frame in self.ws:
                data = frame.encode() if isinstance(frame, str) else frame
                for line in data.split(b"\n"):
                    if line and not line.startswith(b'{"type":"ws.'):
                        self.events += 1
                        if self.keep:
                            self.kept.append(line)
                if self.events >= self.target:
                    self.done.set()
        except websockets.ConnectionClosed:
            pass


async def connect_all(url: str, count: int) -> list[Any]:
    """``count`` deflate-offering sockets, the first ``--fanout`` of the caller's on FAN, 50 at a time."""
    sockets: list[Any] = []
    for start in range(0, count, 50):
        batch = await asyncio.gather(*(websockets.connect(url(i), compression="deflate", max_size=None,
                                                          open_timeout=30)
                                       for i in range(start, min(count, start + 50))))
        for ws in batch:
            await asyncio.wait_for(ws.recv(), 30)  # the hello (and subscribed): the gateway holds the socket
        sockets += batch
    return sockets


async def one_run(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    port = free_port()
    command = [sys.executable, "-m", "gateway.cli", "--host", "127.0.0.1", "--port", str(port), "--ws-compression",
               mode, "--ping-interval", "0", "--max-pending-handshakes", "0", "--log-level", "warning"]
    gateway = Supervised(f"gateway-{mode}", command, f"/tmp/deflate-fanout-{port}.log",
                         cwd=args.gateway_root or ROOT).start()
    base = f"http://127.0.0.1:{port}"
    try:
        gateway.wait_until(lambda: _ready(base), 30, what="ready")
        rss0 = rss_bytes(gateway.pid)
        sockets = await connect_all(
            lambda i: f"ws://127.0.0.1:{port}/ws?conv_id={FAN if i < args.fanout else f'idle{i % 200}'}",
            args.sockets)
        negotiated = sum(1 for ws in sockets if ws.protocol.extensions)
        rss1 = rss_bytes(gateway.pid)
        recorder_ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws?conv_id={FAN}", compression=None,
                                               max_size=None)
        readers = [Reader(ws, False, args.events) for ws in sockets[:args.fanout]]
        readers.append(Reader(recorder_ws, True, args.events))
        tasks = [asyncio.create_task(r.run()) for r in readers]
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            cpu0, wrote0, began = cpu_seconds(gateway.pid), wchar(gateway.pid), time.perf_counter()
            for i in range(args.events):
                await asyncio.sleep(max(0.0, began + i / args.rate - time.perf_counter()))
                body = {"type": "chat.message", "data": CHAT} if i % 2 == 0 else {"type": "llm.delta", "data": delta(i)}
                (await http.post(f"/v1/conversations/{FAN}/events", json=body)).raise_for_status()
            await asyncio.wait([asyncio.ensure_future(r.done.wait()) for r in readers], timeout=60)
            cpu, wrote = cpu_seconds(gateway.pid) - cpu0, wchar(gateway.pid) - wrote0
        deliveries = sum(r.events for r in readers)
        for task in tasks:
            task.cancel()
        return {"mode": mode, "sockets": args.sockets, "negotiated": negotiated,
                "kib_per_idle_socket": round((rss1 - rss0) / args.sockets / 1024, 2),
                "deliveries": deliveries, "expected": args.events * len(readers),
                "cpu_us_per_delivery": round(1e6 * cpu / max(1, deliveries), 2),
                "bytes_written_per_delivery": round(wrote / max(1, deliveries), 1),
                "payloads": [p.decode() for p in readers[-1].kept]}
    finally:
        gateway.kill()


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wire_bytes(payloads: list[bytes]) -> dict[str, float]:
    """Mean payload bytes on the wire (frame header excluded) per message of ``payloads``, in order: as sent,
    with context takeover (one compressor) and without (a fresh one per message; plain if not smaller)."""
    takeover = PerMessageDeflate(False, False, WINDOW, WINDOW, dict(SETTINGS))
    kept = sum(len(takeover.encode(Frame(Opcode.TEXT, p)).data) for p in payloads)
    fresh = 0
    for p in payloads:
        squeezer = zlib.compressobj(wbits=-WINDOW, **SETTINGS)
        fresh += min(len(p), len(squeezer.compress(p) + squeezer.flush(zlib.Z_SYNC_FLUSH)) - 4)
    n = max(1, len(payloads))
    return {"plain": sum(map(len, payloads)) / n, "deflate": kept / n, "shared": fresh / n}


def summary(runs: list[dict[str, Any]], payloads: list[bytes]) -> None:
    modes = sorted({r["mode"] for r in runs})
    print(f"\n| metric | {' | '.join(modes)} |\n|---|{'---|' * len(modes)}")
    for key in ("kib_per_idle_socket", "cpu_us_per_delivery", "bytes_written_per_delivery"):
        cells = []
        for mode in modes:
            values = [r[key] for r in runs if r["mode"] == mode]
            cells.append(" / ".join(f"{v:g}" for v in values) + f" (median {statistics.median(values):g})")
        print(f"| {key} | {' | '.join(cells)} |")
    chat = [p for p in payloads if b'"chat.message"' in p]
    deltas = [p for p in payloads if b'"llm.delta"' in p]
    print("\n| payload (mean bytes) | as sent | deflate (context takeover) | shared (no context takeover) |")
    print("|---|---|---|---|")
    for name, group in (("chat event", chat), ("LLM delta", deltas)):
        sizes = wire_bytes(group)
        print(f"| {name} | {sizes['plain']:.1f} | {sizes['deflate']:.1f} ({sizes['deflate'] / sizes['plain']:.2f}) "
              f"| {sizes['shared']:.1f} ({sizes['shared'] / sizes['plain']:.2f}) |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="deflate,shared")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sockets", type=int, default=2000, help="deflate-offering sockets (fan-out ones included)")
    parser.add_argument("--fanout", type=int, default=500, help="of those, subscribers of the fan-out conversation")
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--gateway-root", help="checkout whose gateway to run (default: this one)")
    args = parser.parse_args()
    args.fanout = min(args.fanout, args.sockets)
    raise_nofile()
    log(f"load {os.getloadavg()}")
    runs: list[dict[str, Any]] = []
    payloads: list[bytes] = []
    for round_ in range(args.rounds):
        for mode in args.modes.split(","):
            result = await one_run(args, mode)
            kept = result.pop("payloads")
            payloads = payloads or [p.encode() for p in kept]
            result["round"], result["load"] = round_, round(os.getloadavg()[0], 2)
            print(orjson.dumps(result).decode(), flush=True)
            runs.append(result)
    summary(runs, payloads)


if __name__ == "__main__":
    asyncio.run(main())
