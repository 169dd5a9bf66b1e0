"""Paced publisher process for the load steps (runs with the project's python).

Driven by ``run.py`` over stdin / stdout (JSON lines). It publishes with the
project's atomic publish script exactly as a producer in any language would
(CONTRACT §6): ``EVALSHA`` with the KEYS / ARGV built by
``broadcaster.backends.scripts.publish_call`` from events validated and encoded by
``prepare_publish`` - the SDK's own code - written by hand on one pipelined
connection (``hiredis.pack_command``) so that the publisher costs little CPU on
a 2-core machine. (``bench/publish.py`` measures the SDK's ``publish_many`` itself.)

Each event also goes out as a JSON copy with ``PUBLISH P:{C}:json <event object>``
in the same write: encode/broadcaster's Redis backend ``.decode()``s every payload
as UTF-8 text, so it cannot read the msgpack of the live channel. The copy is
sent whichever server is measured, so every server sees the same Redis load.

Event ``data``: ``{"t": publish time (wall-clock µs), "s": step id, "p": padding,
"raw": {...}}``, ~100 bytes as JSON. Commands:

* ``{"cmd": "init", "url", "prefix", "convs", "history_size", "history_ttl", "payload_bytes", "json_copy"}``
* ``{"cmd": "probe", "step": 0}``: one event to every conversation.
* ``{"cmd": "run", "step", "rate", "duration"}``: ``rate`` events/s round-robin over the
  conversations for ``duration`` s; answers once Redis acknowledged every command:
  ``{"sent", "elapsed", "per_conv", "behind_ms", "errors"}``.
* ``{"cmd": "quit"}``
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any
from urllib.parse import urlparse

import hiredis
import orjson
from cmdloop import serve

from broadcaster.backend import BackendSettings
from broadcaster.backends import scripts
from broadcaster.backends.base import new_epoch, prepare_publish
from broadcaster.envelope import PublishRequest
from broadcaster.keys import KeyLayout

EVENT_TYPE = "bench.e"
MAX_OUTSTANDING_SECONDS = 0.5
"""Stop writing when Redis is this many seconds of events behind (the step is then publish-bound)."""


class RedisPipe(asyncio.Protocol):
    """One connection: commands written in batches, replies counted (and errors kept)."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.outstanding = 0
        self.errors: list[str] = []
        self.seq_mismatch = 0
        self.expect: deque[int | None] = deque()  # expected seq for EVALSHA replies, None for others
        self.idle = asyncio.Event()
        self.idle.set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, chunks: list[bytes], expected: list[int | None]) -> None:
        assert self.transport is not None
        self.outstanding += len(expected)
        self.expect.extend(expected)
        self.idle.clear()
        self.transport.write(b"".join(chunks))

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                break
            expected = self.expect.popleft()
            self.outstanding -= 1
            if isinstance(reply, hiredis.ReplyError):
                if len(self.errors) < 5:
                    self.errors.append(str(reply))
            elif expected is not None and (type(reply) is not list or reply[0] != expected):
                self.seq_mismatch += 1
        if self.outstanding == 0:
            self.idle.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.errors.append(f"connection lost: {exc}")
        self.idle.set()


class Publisher:
    def __init__(self, msg: dict[str, Any]) -> None:
        self.url = msg["url"]
        self.layout = KeyLayout(msg["prefix"])
        self.convs: list[str] = msg["convs"]
        self.json_copy: bool = msg.get("json_copy", True)
        self.settings = BackendSettings(history_size=msg.get("history_size", 100),
                                        history_ttl=msg.get("history_ttl", 600))
        self.seq = [0] * len(self.convs)
        self.json_channels = [f"{self.layout.tag(c)}:json" for c in self.convs]
        self.next_conv = 0
        self.epoch = new_epoch()
        pad = max(0, msg.get("payload_bytes", 100) - len(self._data(1_700_000_000_000_000, 1, "")))
        self.pad = "x" * pad
        self.pipe = RedisPipe()

    @staticmethod
    def _data(t: int, step: int, pad: str) -> dict[str, Any]:
        return {"t": t, "s": step, "p": pad, "raw": {"tokens": 12, "model": "m1"}}

    async def connect(self) -> None:
        parsed = urlparse(self.url)
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self.pipe, parsed.hostname or "127.0.0.1", parsed.port or 6379)
        db = (parsed.path or "/0").lstrip("/") or "0"
        self.pipe.send([hiredis.pack_command(("SELECT", db)),
                        hiredis.pack_command(("SCRIPT", "LOAD", scripts.PUBLISH.source))], [None, None])
        await self.pipe.idle.wait()
        if self.pipe.errors:
            raise RuntimeError(f"Redis refused the set-up: {self.pipe.errors}")

    def _batch(self, n: int, step: int, per_conv: list[int]) -> None:
        """Write ``n`` events (and their JSON copies) in one write."""
        t = time.time_ns() // 1000
        data = self._data(t, step, self.pad)
        ts = t // 1000
        chunks: list[bytes] = []
        expected: list[int | None] = []
        pack = hiredis.pack_command
        script = scripts.PUBLISH
        count = len(self.convs)
        for _ in range(n):
            index = self.next_conv
            self.next_conv = (index + 1) % count
            conv = self.convs[index]
            prepared = prepare_publish(PublishRequest(conv, EVENT_TYPE, data), self.settings.history_ttl)
            keys, args = scripts.publish_call(self.layout, prepared, self.settings, self.epoch, False)
            chunks.append(pack(script.command(keys, args)))
            seq = self.seq[index] = self.seq[index] + 1
            expected.append(seq)
            per_conv[index] += 1
            if self.json_copy:
                obj = {"type": EVENT_TYPE, "conv_id": conv, "seq": seq, "id": prepared.id, "ts": ts, "data": data}
                chunks.append(pack(("PUBLISH", self.json_channels[index], orjson.dumps(obj))))
                expected.append(None)
        self.pipe.send(chunks, expected)

    async def probe(self, step: int) -> dict[str, Any]:
        per_conv = [0] * len(self.convs)
        for start in range(0, len(self.convs), 500):
            self._batch(min(500, len(self.convs) - start), step, per_conv)
            await self.pipe.idle.wait()
        return {"sent": sum(per_conv), "per_conv": per_conv, "errors": self.pipe.errors[:5]}

    async def run(self, step: int, rate: float, duration: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        per_conv = [0] * len(self.convs)
        total = int(rate * duration)
        limit = max(100, int(rate * MAX_OUTSTANDING_SECONDS)) * (2 if self.json_copy else 1)
        start = loop.time()
        sent, behind = 0, 0.0
        tick = 0.002
        while sent < total:
            elapsed = loop.time() - start
            due = min(total, int(rate * elapsed) + 1) - sent
            if due > 0 and self.pipe.outstanding < limit:
                n = min(due, 2000)
                self._batch(n, step, per_conv)
                sent += n
            behind = max(behind, elapsed - sent / rate)
            await asyncio.sleep(tick)
        publish_elapsed = loop.time() - start
        await self.pipe.idle.wait()
        return {"sent": sent, "elapsed": publish_elapsed, "acked_after": loop.time() - start,
                "per_conv": per_conv, "behind_ms": round(behind * 1000, 1), "errors": self.pipe.errors[:5],
                "seq_mismatch": self.pipe.seq_mismatch}


def cleanup(publisher: Publisher) -> int:
    """Delete every key under the run's prefix (when the Redis is not the bench's own)."""
    import redis

    deleted = 0
    with redis.Redis.from_url(publisher.url) as client:
        batch = []
        for key in client.scan_iter(match=f"{publisher.layout.prefix}:*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
    return deleted


async def main() -> None:
    publisher: Publisher | None = None

    async def handle(msg: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal publisher
        cmd = msg["cmd"]
        if cmd == "init":
            publisher = Publisher(msg)
            await publisher.connect()
            return {"ok": True}
        if cmd == "probe" and publisher is not None:
            return await publisher.probe(msg["step"])
        if cmd == "run" and publisher is not None:
            return await publisher.run(msg["step"], msg["rate"], msg["duration"])
        if cmd == "quit":
            deleted = cleanup(publisher) if publisher is not None and msg.get("cleanup") else 0
            return {"bye": True, "deleted": deleted}
        return None

    await serve({"hello": "loadpub"}, handle, last=("quit",), dumps=orjson.dumps, loads=orjson.loads)


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # pragma: no cover - depends on the venv
        asyncio.run(main())
    else:
        uvloop.run(main())
