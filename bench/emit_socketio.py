"""The external emitter feeding the python-socketio peer (runs in ``bench/.venv/socketio``).

Driven by ``run.py`` over stdin / stdout (JSON lines) exactly like ``loadpub.py``:
``init`` / ``probe`` / ``run`` / ``quit``, the same answers. It emits the way
python-socketio's documentation tells an external process to:
``socketio.AsyncRedisManager(url, channel=..., write_only=True)`` and
``await manager.emit("event", obj, room=conv)`` - one ``PUBLISH`` of the JSON-encoded
message on the single channel every server reads. ``obj`` is what ``loadpub.py``'s JSON
copy carries (``type``, ``conv_id``, ``seq``, ``ts``, ``data``), ``data`` being
``{"t": publish time in wall-clock µs, "s": step id, "p": padding, "raw": {...}}``
padded to ``payload_bytes`` as JSON.

Pacing is loadpub.py's: every 2 ms the events due are emitted, at most 0.5 s of events
unacknowledged; the emits of a batch run concurrently, ``CONCURRENCY`` at a time (each
on a pooled connection: ``emit`` awaits its publish's reply).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import socketio
from cmdloop import serve

EVENT_TYPE = "bench.e"
MAX_OUTSTANDING_SECONDS = 0.5
CONCURRENCY = 64


def _data(t: int, step: int, pad: str) -> dict[str, Any]:
    return {"t": t, "s": step, "p": pad, "raw": {"tokens": 12, "model": "m1"}}


class Emitter:
    def __init__(self, msg: dict[str, Any]) -> None:
        self.convs: list[str] = msg["convs"]
        self.seq = [0] * len(self.convs)
        self.next_conv = 0
        self.errors: list[str] = []
        sample = json.dumps(_data(1_700_000_000_000_000, 1, ""), separators=(",", ":"))
        self.pad = "x" * max(0, msg.get("payload_bytes", 100) - len(sample))
        self.manager = socketio.AsyncRedisManager(msg["url"], channel=f"{msg['prefix']}-socketio", write_only=True)
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.outstanding = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.workers = [asyncio.ensure_future(self._worker()) for _ in range(CONCURRENCY)]

    async def _worker(self) -> None:
        while True:
            conv, obj = await self.queue.get()
            try:
                await self.manager.emit("event", obj, room=conv, namespace="/")
            except Exception as exc:  # the manager logs and swallows Redis errors itself
                if len(self.errors) < 5:
                    self.errors.append(f"{exc.__class__.__name__}: {exc}")
            self.outstanding -= 1
            if self.outstanding == 0:
                self.idle.set()

    async def connect(self) -> None:
        """One emit to a room nobody is in: the manager connects lazily, fail here rather than mid-step."""
        await self.manager.emit("event", {}, room="bench-nobody", namespace="/")
        if not self.manager.connected:
            raise RuntimeError("the write-only AsyncRedisManager did not connect")

    def _batch(self, n: int, step: int, per_conv: list[int]) -> None:
        t = time.time_ns() // 1000
        data = _data(t, step, self.pad)
        ts = t // 1000
        count = len(self.convs)
        for _ in range(n):
            index = self.next_conv
            self.next_conv = (index + 1) % count
            conv = self.convs[index]
            seq = self.seq[index] = self.seq[index] + 1
            per_conv[index] += 1
            self.queue.put_nowait((conv, {"type": EVENT_TYPE, "conv_id": conv, "seq": seq, "ts": ts, "data": data}))
        self.outstanding += n
        self.idle.clear()

    async def probe(self, step: int) -> dict[str, Any]:
        per_conv = [0] * len(self.convs)
        self._batch(len(self.convs), step, per_conv)
        await self.idle.wait()
        return {"sent": sum(per_conv), "per_conv": per_conv, "errors": self.errors[:5]}

    async def run(self, step: int, rate: float, duration: float, max_seconds: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        per_conv = [0] * len(self.convs)
        total = int(rate * duration)
        limit = max(100, int(rate * MAX_OUTSTANDING_SECONDS))
        start = loop.time()
        sent, behind = 0, 0.0
        while sent < total:
            elapsed = loop.time() - start
            if elapsed > max_seconds:
                break
            due = min(total, int(rate * elapsed) + 1) - sent
            if due > 0 and self.outstanding < limit:
                n = min(due, 2000, limit - self.outstanding)
                self._batch(n, step, per_conv)
                sent += n
            behind = max(behind, elapsed - sent / rate)
            await asyncio.sleep(0.002)
        publish_elapsed = loop.time() - start
        await self.idle.wait()
        return {"sent": sent, "elapsed": publish_elapsed, "acked_after": loop.time() - start,
                "per_conv": per_conv, "behind_ms": round(behind * 1000, 1), "errors": self.errors[:5],
                "seq_mismatch": 0}


async def main() -> None:
    emitter: Emitter | None = None

    async def handle(msg: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal emitter
        cmd = msg["cmd"]
        if cmd == "init":
            emitter = Emitter(msg)
            await emitter.connect()
            return {"ok": True}
        if cmd == "probe" and emitter is not None:
            return await emitter.probe(msg["step"])
        if cmd == "run" and emitter is not None:
            duration = msg["duration"]
            return await emitter.run(msg["step"], msg["rate"], duration, msg.get("max_seconds", duration * 2 + 5))
        if cmd == "quit":
            return {"bye": True, "deleted": 0}
        return None

    await serve({"hello": "socketio-emitter"}, handle, last=("quit",))


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # pragma: no cover - depends on the venv
        asyncio.run(main())
    else:
        uvloop.run(main())
