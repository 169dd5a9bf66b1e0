"""5,000 feeds repairing at once after a pub/sub reconnect: bounded connections, no retry storm.

One hub on its own ``redis-server`` watches 5,000 conversations (one lightweight
subscriber each). The pub/sub link is killed (``CLIENT KILL TYPE pubsub``) and held
down while events are published on half of them; once it is back every feed repairs
from history. Measured: every subscriber gets every event exactly once and in order,
the Redis connections open during the repair (sampled with ``CLIENT LIST``), and the
retry log lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from broadcaster.backend import BackendSettings
from broadcaster.backends.redis import RedisBackend
from broadcaster.envelope import PublishRequest
from broadcaster.hub import Hub
from broadcaster.profiles import ProfileRegistry
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

FEEDS = 5000
CONNECTION_BOUND = 12
"""Redis connections the gateway may hold during the repair: pub/sub + a few batched reads + publishes."""

_default = ProfileRegistry().get("default")
assert _default is not None
DEFAULT = _default


class Seqs:
    """A subscriber keeping the seqs of the events it gets, and any control object but ws.subscribed."""

    __slots__ = ("connection_id", "controls", "seqs")

    def __init__(self, n: int) -> None:
        self.connection_id = f"s{n}"
        self.seqs: list[int] = []
        self.controls: list[dict[str, Any]] = []

    def send(self, data: bytes) -> None:
        obj = json.loads(data)
        if obj["type"].startswith("ws."):
            if obj["type"] != "ws.subscribed":
                self.controls.append(obj)
        else:
            self.seqs.append(obj["seq"])


async def poll(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def in_chunks(calls: list[Callable[[], Awaitable[Any]]], size: int) -> None:
    for i in range(0, len(calls), size):
        await asyncio.gather(*(call() for call in calls[i : i + size]))


class ConnectionSampler:
    """Samples the server's client count (minus itself) every few ms; ``peak`` is the highest seen."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.peak = 0
        self.samples = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def count(self) -> int:
        listing = await self.client.execute_command("CLIENT", "LIST")  # type: ignore[no-untyped-call]
        text = listing.decode() if isinstance(listing, bytes) else str(listing)
        return sum(1 for line in text.splitlines() if line.strip()) - 1  # not this sampler

    async def _run(self) -> None:
        while not self._stopping.is_set():
            self.peak = max(self.peak, await self.count())
            self.samples += 1
            await asyncio.sleep(0.002)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        # A flag, not Task.cancel(): redis-py may swallow a cancellation that lands inside a
        # command on a single-connection client, and the sampler would then loop forever.
        assert self._task is not None
        self._stopping.set()
        await asyncio.wait_for(self._task, timeout=10)


async def test_5000_feeds_repair_after_a_pubsub_kill_with_bounded_connections(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with RedisServer() as server:
        backend = RedisBackend(server.url, key_prefix=f"st{secrets.token_hex(3)}",
                               settings=BackendSettings(unsubscribe_delay=0))
        await backend.start()
        admin = aioredis.Redis.from_url(server.url, single_connection_client=True)
        hub = Hub(backend, gateway_id="g")
        try:
            convs = [f"c{i}" for i in range(FEEDS)]
            subs = [Seqs(i) for i in range(FEEDS)]
            published = dict.fromkeys(convs, 0)

            async def publish(targets: list[str]) -> None:
                for i in range(0, len(targets), 500):
                    batch = targets[i : i + 500]
                    await backend.publish_many([PublishRequest(c, "chat.msg", {"n": published[c]}) for c in batch])
                    for c in batch:
                        published[c] += 1

            def delivered() -> bool:
                return all(len(s.seqs) + 1 == published[c] for s, c in zip(subs, convs, strict=True))

            # Seq 1 before anyone subscribes: every conversation has its epoch stored, none is still unborn.
            await publish(convs)
            def subscribe(sub: Seqs, conv: str) -> Callable[[], Awaitable[None]]:
                return lambda: hub.subscribe(sub, conv, DEFAULT)

            await in_chunks([subscribe(s, c) for s, c in zip(subs, convs, strict=True)], 250)
            await publish(convs)  # seq 2 everywhere, live
            await poll(delivered, "seq 2 live on every feed")

            # Hold the pub/sub link down once it is killed: it may connect again only when the test says.
            subscriber = backend._subscriber
            may_connect = asyncio.Event()
            establish = subscriber._establish

            async def held_establish(link: Any) -> None:
                await may_connect.wait()
                await establish(link)

            subscriber._establish = held_establish  # type: ignore[method-assign]
            reconnects = backend.stats.reconnects
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
            await poll(lambda: not backend.connected, "the pub/sub link to drop")
            outage = convs[::2]
            await publish(outage)  # seq 3 on half the feeds: lost on the wire
            await publish(outage)  # seq 4
            assert not any(len(s.seqs) > 1 for s in subs), "an event published during the outage arrived live"

            # Close the command connections the 5,000 subscribes opened (they reconnect on use): what is
            # open during the repair is then what the repair itself needs.
            client = backend.commands.client
            assert isinstance(client, aioredis.Redis)
            await client.connection_pool.disconnect()
            caplog.clear()
            sampler = ConnectionSampler(admin)
            sampler.start()
            repairs_before = hub.stats.gap_repairs
            began = time.monotonic()
            may_connect.set()
            await poll(lambda: backend.stats.reconnects > reconnects, "the pub/sub link to come back")
            await poll(delivered, "every feed repaired", timeout=60)
            repaired_in = time.monotonic() - began
            await sampler.stop()

            assert hub.stats.gap_repairs - repairs_before == FEEDS  # every resubscribed feed repaired
            for s, c in zip(subs, convs, strict=True):
                assert s.seqs == list(range(2, published[c] + 1)), c
                assert s.controls == [], c
            retry_lines = [r for r in caplog.records if r.name == "broadcaster.retry"]
            failures = [r for r in caplog.records if r.name == "broadcaster.hub" and r.levelno >= logging.WARNING]
            print(f"\nrepair of {FEEDS} feeds: {repaired_in:.2f}s, peak {sampler.peak} Redis connection(s) "
                  f"over {sampler.samples} samples, {hub._repair_reads.batches} batched reads, "
                  f"{len(retry_lines)} retry log line(s)")
            assert retry_lines == [], retry_lines[:3]
            assert failures == [], failures[:3]
            assert sampler.samples >= 3
            assert sampler.peak <= CONNECTION_BOUND, f"{sampler.peak} connections during the repair"
            assert hub._repair_reads.batches <= FEEDS // 10  # batched, not one read per feed

            await publish(convs)  # and live again everywhere
            await poll(delivered, "live after the repair")
        finally:
            await hub.close()
            await backend.close()
            await admin.aclose()
