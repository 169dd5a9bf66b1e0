"""Delivery guarantees: resume, gap repair, epochs and Redis link loss (docs/delivery.md).

Two levels:

* the hub alone, on the memory backend, with payloads injected straight into its
  listener and history reads held at chosen moments (deterministic interleavings);
* real gateways (uvicorn on a free port) on the memory backend, the local Redis or a
  redis-server of the test's own, with real websocket clients.

Every client check is exact: the seqs received must be precisely the expected range,
in order, once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from broadcaster.backend import BackendSettings, HistoryPage, Listener
from broadcaster.backends import scripts
from broadcaster.backends.base import new_epoch, prepare_publish
from broadcaster.backends.memory import MemoryBackend
from broadcaster.backends.redis import RedisBackend
from broadcaster.codec import encode_envelope
from broadcaster.envelope import Envelope, PublishRequest
from broadcaster.hub import Hub
from broadcaster.keys import KeyLayout
from broadcaster.profiles import ProfileRegistry
from gateway.settings import Settings
from tests.backend_suite import wait_for
from tests.support.gateway import InProcessGateway
from tests.support.polling import async_wait_until
from tests.support.redis_server import RedisServer
from tests.support.sink import Sink
from tests.support.tcp_proxy import TcpProxy
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)


def proxy_to(redis_url: str) -> TcpProxy:
    """A TcpProxy in front of the Redis at ``redis_url``."""
    target = urlsplit(redis_url)
    return TcpProxy(target.port or 6379, target.hostname or "127.0.0.1")

DEFAULT = ProfileRegistry().get("default")
assert DEFAULT is not None


# --- the hub alone --------------------------------------------------------------------------




class ControlledBackend(MemoryBackend):
    """The memory backend with knobs: mute live fan-out, hold reads, inject payloads, fake a reconnect.

    ``muted``: publishes are numbered and stored but reach no listener (lost on the wire).
    ``hold_history`` / ``hold_head``: a read computes its answer, then waits for the event
    to be set before returning it - a read that was answered before what happens next.
    With ``hold_before``, a history read waits first and then computes its answer - a
    read answered after what happened meanwhile.
    """

    def __init__(self, settings: BackendSettings | None = None) -> None:
        super().__init__(settings or BackendSettings(unsubscribe_delay=0))
        self.muted = False
        self.listeners: dict[str, Listener] = {}
        self.hold_history: asyncio.Event | None = None
        self.hold_head: asyncio.Event | None = None
        self.hold_before = False
        self.history_reads = 0
        self.head_reads = 0
        self.callbacks: list[Any] = []

    def _fan_out(self, env: Envelope | None) -> None:
        if not self.muted:
            super()._fan_out(env)

    async def subscribe(self, conv: str, listener: Listener) -> None:
        self.listeners[conv] = listener
        await super().subscribe(conv, listener)

    async def history(self, conv: str, since: int = 0, limit: int | None = None) -> HistoryPage:
        hold = self.hold_history
        if hold is not None and self.hold_before:
            self.history_reads += 1
            await hold.wait()
            return await super().history(conv, since, limit)
        page = await super().history(conv, since, limit)
        self.history_reads += 1
        if hold is not None:
            await hold.wait()
        return page

    async def head(self, conv: str) -> Any:
        head = await super().head(conv)
        self.head_reads += 1
        if self.hold_head is not None:
            await self.hold_head.wait()
        return head

    def add_reconnect_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    async def reconnected(self) -> None:
        for callback in self.callbacks:
            await callback()

    def inject(self, env: Envelope) -> None:
        """Hand ``env`` to the conversation's listener, as if it had come over pub/sub."""
        self.listeners[env.conv](env)

    async def envelopes(self, conv: str) -> dict[int, Envelope]:
        page = await MemoryBackend.history(self, conv, 0)
        return {e.seq: e for e in page.events}


@pytest.fixture
async def controlled() -> AsyncIterator[ControlledBackend]:
    backend = ControlledBackend()
    await backend.start()
    yield backend
    await backend.close()


async def publish_n(backend: MemoryBackend, conv: str, n: int) -> None:
    for _ in range(n):
        await backend.publish(conv, "chat.msg", {"n": 1})


async def test_hub_fills_a_gap_from_history_and_drops_late_and_repeated_payloads(
    controlled: ControlledBackend,
) -> None:
    hub = Hub(controlled, gateway_id="g")
    sink = Sink()
    await hub.subscribe(sink, "c", DEFAULT)
    await publish_n(controlled, "c", 3)
    await wait_for(lambda: sink.seqs == [1, 2, 3], what="live 1..3")
    controlled.muted = True
    await publish_n(controlled, "c", 5)  # 4..8: stored, never seen live
    envs = await controlled.envelopes("c")
    for seq in (6, 4, 6, 8, 5, 2, 3, 8):  # a jump, then late, repeated and shuffled copies
        controlled.inject(envs[seq])
    await wait_for(lambda: len(sink.seqs) >= 8, what="gap 4..8 filled")
    controlled.muted = False
    await publish_n(controlled, "c", 1)
    await wait_for(lambda: len(sink.seqs) >= 9, what="live 9")
    assert sink.seqs == list(range(1, 10))
    assert hub.stats.gap_repairs == 1
    assert hub.stats.duplicates_dropped == 8
    assert sink.controls("ws.reset") == []


async def test_hub_resets_live_subscribers_when_the_epoch_changes(controlled: ControlledBackend) -> None:
    hub = Hub(controlled, gateway_id="g")
    sink = Sink()
    await hub.subscribe(sink, "c", DEFAULT)
    await publish_n(controlled, "c", 4)
    await wait_for(lambda: sink.seqs == [1, 2, 3, 4], what="live 1..4")
    old_epoch = sink.controls("ws.subscribed")[0]["epoch"]
    controlled._convs.pop("c")  # the backend lost the conversation (Redis restarted empty:
    controlled._salt = b"restarted"  # a new run id, so a new epoch)
    await publish_n(controlled, "c", 3)  # 1..3 of a new epoch
    await wait_for(lambda: len(sink.seqs) >= 7, what="new epoch 1..3")
    new_epoch_ = (await controlled.head("c")).epoch
    assert new_epoch_ != old_epoch
    tail = [(o["type"], o.get("seq"), o.get("epoch")) for o in sink.objects[-4:]]
    assert tail == [("ws.reset", 0, new_epoch_), ("chat.msg", 1, None), ("chat.msg", 2, None), ("chat.msg", 3, None)]
    assert sink.controls("ws.reset")[0]["reason"] == "epoch_changed"


async def test_hub_repairs_again_after_a_reconnect_during_a_repair(controlled: ControlledBackend) -> None:
    """A reconnect while a repair's history read is in flight must trigger another read.

    The read in flight was answered before the events lost during the outage were
    published; finishing the repair with it alone would leave them undelivered until
    the next event.
    """
    hub = Hub(controlled, gateway_id="g")
    sink = Sink()
    await hub.subscribe(sink, "c", DEFAULT)
    await publish_n(controlled, "c", 3)
    await wait_for(lambda: sink.seqs == [1, 2, 3], what="live 1..3")
    controlled.muted = True
    await publish_n(controlled, "c", 2)  # 4, 5
    hold = controlled.hold_history = asyncio.Event()
    reads = controlled.history_reads
    controlled.inject((await controlled.envelopes("c"))[5])  # gap: repair starts, its read answers up to 5
    await wait_for(lambda: controlled.history_reads > reads, what="repair read issued")
    await publish_n(controlled, "c", 2)  # 6, 7: lost while the pub/sub link was down
    await controlled.reconnected()  # the link is back: the backend calls the hub's repair
    controlled.hold_history = None
    hold.set()
    controlled.muted = False
    await wait_for(lambda: len(sink.seqs) >= 7, timeout=3, what="6 and 7 repaired without a new publish")
    assert sink.seqs == list(range(1, 8))


async def test_hub_repairs_a_gap_found_while_opening_a_feed(controlled: ControlledBackend) -> None:
    """A live payload past the head read while the feed opens must start a repair, not stall the feed."""
    await publish_n(controlled, "c", 3)
    hub = Hub(controlled, gateway_id="g")
    sink = Sink()
    hold = controlled.hold_head = asyncio.Event()
    subscribing = asyncio.create_task(hub.subscribe(sink, "c", DEFAULT))
    await wait_for(lambda: controlled.head_reads == 1, what="head read")  # answered: seq 3
    controlled.muted = True
    await publish_n(controlled, "c", 2)  # 4 lost, 5 seen
    controlled.inject((await controlled.envelopes("c"))[5])
    controlled.hold_head = None
    hold.set()
    await subscribing
    assert sink.objects[0]["type"] == "ws.subscribed" and sink.objects[0]["seq"] == 3
    controlled.muted = False
    await publish_n(controlled, "c", 1)
    await wait_for(lambda: len(sink.seqs) >= 3, timeout=3, what="4..6 after the feed opened")
    assert sink.seqs == [4, 5, 6]


@pytest.mark.parametrize("answered", ["before", "after"])
async def test_hub_resume_merges_history_and_live_events_arriving_during_the_read(
    controlled: ControlledBackend, answered: str
) -> None:
    """Live events arrive while a resume's history read is in flight; the read's answer
    predates them (no overlap) or includes them (overlap: each must go out once)."""
    controlled.hold_before = answered == "after"
    hub = Hub(controlled, gateway_id="g")
    watcher = Sink("watcher")  # keeps the feed open and live
    await hub.subscribe(watcher, "c", DEFAULT)
    await publish_n(controlled, "c", 10)
    await wait_for(lambda: len(watcher.seqs) == 10, what="live 1..10")
    hold = controlled.hold_history = asyncio.Event()
    resumer = Sink("resumer")
    subscribing = asyncio.create_task(hub.subscribe(resumer, "c", DEFAULT, since=4))
    await wait_for(lambda: controlled.history_reads == 1, what="replay read issued")
    await publish_n(controlled, "c", 5)  # 11..15 arrive live while the replay is held
    await wait_for(lambda: len(watcher.seqs) == 15, what="live 11..15")
    controlled.hold_history = None
    hold.set()
    await subscribing
    await publish_n(controlled, "c", 2)
    await wait_for(lambda: len(resumer.seqs) >= 13, what="resumer caught up")
    assert resumer.objects[0] == {"type": "ws.subscribed", "conv_id": "c", "epoch": resumer.objects[0]["epoch"],
                                  "seq": 10}
    assert resumer.seqs == list(range(5, 18))
    assert watcher.seqs == list(range(1, 18))


# --- real gateways: resume ------------------------------------------------------------------


def events_of(objects: list[dict[str, Any]]) -> list[int]:
    return [o["seq"] for o in objects if not o["type"].startswith("ws.")]


@contextlib.asynccontextmanager
async def gateway_on(kind: str, redis_url: str, key_prefix: str, **options: Any) -> AsyncIterator[InProcessGateway]:
    """An in-process gateway on the memory backend or on the local Redis (own key prefix)."""
    settings = Settings(redis_url=redis_url if kind == "redis" else None, key_prefix=key_prefix, history_ttl=600,
                        **options)
    async with InProcessGateway(settings) as gw:
        yield gw


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_resume_with_since_while_a_publisher_keeps_publishing(kind: str, redis_url: str,
                                                                    key_prefix: str) -> None:
    """Clients resume from random points while events keep arriving: each gets exactly since+1..N."""
    total = 600
    async with gateway_on(kind, redis_url, key_prefix) as gw:
        backend = gw.gateway.backend
        watcher = await WsClient.connect(gw.ws_url("conv_id=r&since=0"))  # the feed stays open and live
        await watcher.expect("ws.subscribed")

        resumers: list[tuple[int, WsClient]] = []

        def joined(count: int) -> bool:
            return len(resumers) >= count

        async def publisher() -> None:
            for i in range(total):
                # Resumers join mid-stream at any speed: the publisher never runs more than two
                # resumers' worth (40 events) ahead of them, so one is always joining while it publishes.
                need = min(25, i // 20 - 1)
                if len(resumers) < need:
                    await async_wait_until(functools.partial(joined, need), timeout=30,
                                           message=f"{need} resumers to join mid-stream")
                await backend.publish("r", "chat.msg", {"i": i})
                await asyncio.sleep(0.001)

        task = asyncio.create_task(publisher())
        rng = random.Random(7)
        while not task.done() and len(resumers) < 25:
            head = (await backend.head("r")).seq
            since = rng.randint(max(0, head - 80), head)  # in the past, up to right now
            resumers.append((since, await WsClient.connect(gw.ws_url(f"conv_id=r&since={since}"))))
            await asyncio.sleep(0.01)
        await task
        assert len(resumers) >= 10, "the publisher finished before enough clients resumed mid-stream"
        for since, client in [(0, watcher), *resumers]:
            got = await client.until(lambda objs: bool(objs) and objs[-1].get("seq") == total
                                     and not objs[-1]["type"].startswith("ws."), timeout=20)
            if client is not watcher:
                assert [o["type"] for o in got[:2]] == ["ws.hello", "ws.subscribed"]
            assert events_of(got) == list(range(since + 1, total + 1)), f"resumed after {since}"
            assert not [o for o in got if o["type"] == "ws.reset"]
            await client.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_resume_older_than_history_resets_history_truncated_then_live(kind: str, redis_url: str,
                                                                            key_prefix: str) -> None:
    async with gateway_on(kind, redis_url, key_prefix, history_size=10) as gw:
        backend = gw.gateway.backend
        # Redis trims the stream approximately (XADD MAXLEN ~), whole nodes of ~100 entries at a time.
        await backend.publish_many([PublishRequest("t", "chat.msg", {"i": i}) for i in range(400)])
        head = await backend.head("t")
        client = await WsClient.connect(gw.ws_url("conv_id=t&since=1"))
        assert (await client.next())["type"] == "ws.hello"
        assert await client.next() == {"type": "ws.subscribed", "conv_id": "t", "epoch": head.epoch, "seq": 400}
        assert await client.next() == {"type": "ws.reset", "conv_id": "t", "reason": "history_truncated",
                                       "epoch": head.epoch, "seq": 400}
        await backend.publish("t", "chat.msg", {"i": "live"})
        live = await client.next()
        assert (live["seq"], live["data"]) == (401, {"i": "live"})
        await client.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_resume_with_another_epoch_resets_epoch_changed_then_live(kind: str, redis_url: str,
                                                                         key_prefix: str) -> None:
    async with gateway_on(kind, redis_url, key_prefix) as gw:
        backend = gw.gateway.backend
        for i in range(5):
            await backend.publish("e", "chat.msg", {"i": i})
        epoch = (await backend.head("e")).epoch
        client = await WsClient.connect(gw.ws_url("conv_id=e&since=3&epoch=0ld3p0ch"))
        await client.expect("ws.hello")
        assert await client.next() == {"type": "ws.subscribed", "conv_id": "e", "epoch": epoch, "seq": 5}
        assert await client.next() == {"type": "ws.reset", "conv_id": "e", "reason": "epoch_changed",
                                       "epoch": epoch, "seq": 5}
        await backend.publish("e", "chat.msg", {"i": 5})
        assert (await client.next())["seq"] == 6
        # the same epoch resumes normally: 4, 5, then live
        same = await WsClient.connect(gw.ws_url(f"conv_id=e&since=3&epoch={epoch}"))
        got = await same.until(lambda objs: len(events_of(objs)) >= 3)
        assert events_of(got) == [4, 5, 6] and not [o for o in got if o["type"] == "ws.reset"]
        await client.close()
        await same.close()


# --- real gateways: gap repair over Redis -----------------------------------------------------


def publish_history_only(client: redis.Redis, layout: KeyLayout, conv: str, count: int) -> None:
    """Publish with the real script, but fan out on a channel nobody listens to.

    The events are numbered and stored exactly as usual; the gateway just never sees
    them live (as if their pub/sub messages were lost).
    """
    settings = BackendSettings()
    for i in range(count):
        prepared = prepare_publish(PublishRequest(conv, "chat.msg", {"hidden": i}), settings.history_ttl)
        keys, args = scripts.publish_call(layout, prepared, settings, new_epoch(), sharded=False)
        keys[2] = layout.tag(conv) + ":muted"
        client.eval(scripts.PUBLISH.source, len(keys), *keys, *args)


async def test_gap_repair_with_duplicated_and_shuffled_raw_payloads_on_redis(redis_url: str,
                                                                             key_prefix: str) -> None:
    layout = KeyLayout(key_prefix)
    live = layout.live("g")
    async with gateway_on("redis", redis_url, key_prefix) as gw:
        backend = gw.gateway.backend
        clients = [await WsClient.connect(gw.ws_url(f"conv_id=g{'&profile=debug' if i % 2 else ''}"))
                   for i in range(4)]
        for c in clients:
            await c.expect("ws.subscribed")
        for i in range(5):
            await backend.publish("g", "chat.msg", {"i": i})  # 1..5 live
        raw = redis.Redis.from_url(redis_url)
        try:
            await asyncio.to_thread(publish_history_only, raw, layout, "g", 10)  # 6..15: history only
            stored = {e.seq: e for e in (await backend.history("g", 0)).events}
            assert sorted(stored) == list(range(1, 16))
            # late, repeated and out-of-order copies of real envelopes, with a jump to 15 first
            for seq in (15, 12, 12, 6, 3, 15, 9, 1, 14):
                await asyncio.to_thread(raw.publish, live, encode_envelope(stored[seq]))
            for c in clients:
                got = await c.events(15, timeout=10)
                assert [e["seq"] for e in got] == list(range(1, 16))
            # more stale copies after the repair: all dropped; the next real event is 16
            for seq in (2, 15, 7):
                await asyncio.to_thread(raw.publish, live, encode_envelope(stored[seq]))
            await asyncio.to_thread(raw.publish, live, b"\x93not an envelope")
            await backend.publish("g", "chat.msg", {"i": "after"})
            for c in clients:
                nxt = (await c.events(1))[0]
                assert (nxt["seq"], nxt["data"]) == (16, {"i": "after"})
        finally:
            raw.close()
        stats = gw.gateway.hub.stats
        assert stats.gap_repairs >= 1
        assert stats.duplicates_dropped >= 11
        assert gw.gateway.backend.stats.decode_errors == 1
        for c in clients:
            await c.close()


# --- real gateways: losing Redis ------------------------------------------------------------


async def readyz_status(http: httpx.AsyncClient) -> int:
    try:
        return (await http.get("/readyz", timeout=2)).status_code
    except httpx.HTTPError:
        return 0


async def poll_readyz(http: httpx.AsyncClient, want: int, timeout: float) -> float:
    """Poll /readyz until it answers ``want``; the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    status = 0
    while time.monotonic() < deadline:
        status = await readyz_status(http)
        if status == want:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"/readyz stayed {status}, not {want}, for {timeout}s")


async def test_redis_link_lost_clients_stay_connected_and_get_what_they_missed(redis_url: str,
                                                                              key_prefix: str) -> None:
    with proxy_to(redis_url) as proxy:
        backend = RedisBackend(proxy.url, key_prefix=key_prefix, probe_interval=1.0, probe_timeout=1.0,
                               retry_budget=3.0, settings=BackendSettings(history_ttl=600))
        publisher = RedisBackend(redis_url, key_prefix=key_prefix, settings=BackendSettings(history_ttl=600))
        await publisher.start()
        try:
            async with InProcessGateway(Settings(key_prefix=key_prefix), backend=backend) as gw, \
                    httpx.AsyncClient(base_url=gw.http_url) as http:
                convs = ["l1", "l2"]
                clients = [await WsClient.connect(gw.ws_url(f"conv_id={conv}")) for conv in convs for _ in range(3)]
                for c in clients:
                    await c.expect("ws.subscribed")
                for i in range(10):
                    for conv in convs:
                        await publisher.publish(conv, "chat.msg", {"i": i})
                assert await readyz_status(http) == 200

                proxy.block()  # the gateway loses Redis; Redis and the publisher keep going
                await poll_readyz(http, 503, timeout=10)
                assert (await http.get("/readyz")).json()["reason"]
                refused = proxy.accepted
                for i in range(10, 40):
                    for conv in convs:
                        await publisher.publish(conv, "chat.msg", {"i": i})
                # Still cut off, nothing new can arrive: rather than waiting a while, wait until the
                # gateway came back to the proxy and was turned away a few more times.
                await async_wait_until(lambda: proxy.accepted - refused >= 3, timeout=15,
                                       message="the gateway to retry Redis through the blocked proxy")
                assert await readyz_status(http) == 503
                proxy.unblock()
                await poll_readyz(http, 200, timeout=10)
                # what was missed arrives after the reconnect by itself, before anything new is published
                got = {id(c): await c.until(lambda objs: len(events_of(objs)) >= 40, timeout=10) for c in clients}
                for i in range(40, 50):
                    for conv in convs:
                        await publisher.publish(conv, "chat.msg", {"i": i})
                for c in clients:
                    got[id(c)] += await c.events(10)
                    assert events_of(got[id(c)]) == list(range(1, 51))
                    assert [o["data"]["i"] for o in got[id(c)]] == list(range(50))
                    assert not [o for o in got[id(c)] if o["type"].startswith("ws.")], "no reset, no re-hello"
                assert gw.gateway.backend.stats.reconnects >= 1
                for c in clients:
                    assert c.ws.close_code is None  # never disconnected
                    await c.close()
        finally:
            await publisher.close()


async def test_redis_restarted_empty_resets_live_subscribers_to_a_new_epoch(key_prefix: str) -> None:
    with RedisServer() as server:
        publisher = RedisBackend(server.url, key_prefix=key_prefix, retry_budget=15.0)
        await publisher.start()
        try:
            async with InProcessGateway(Settings(redis_url=server.url, key_prefix=key_prefix)) as gw, \
                    httpx.AsyncClient(base_url=gw.http_url) as http:
                clients = [await WsClient.connect(gw.ws_url("conv_id=x&since=0")) for _ in range(3)]
                epochs = {(await c.expect("ws.subscribed"))["epoch"] for c in clients}
                assert len(epochs) == 1
                old = epochs.pop()
                for i in range(8):
                    await publisher.publish("x", "chat.msg", {"i": i})
                for c in clients:
                    assert [e["seq"] for e in await c.events(8)] == list(range(1, 9))

                await asyncio.to_thread(server.kill)
                await poll_readyz(http, 503, timeout=5)
                await asyncio.to_thread(server.restart)  # no persistence: everything is gone
                await poll_readyz(http, 200, timeout=10)
                # the gateway's repair after the reconnect finds the conversation gone: reset before any publish
                resets = [await c.next(timeout=10) for c in clients]
                new = resets[0]["epoch"]
                assert new != old
                assert resets == [{"type": "ws.reset", "conv_id": "x", "reason": "epoch_changed", "epoch": new,
                                   "seq": 0}] * len(clients)
                results = [await publisher.publish("x", "chat.msg", {"new": i}) for i in range(5)]
                assert {r.epoch for r in results} == {new} and [r.seq for r in results] == [1, 2, 3, 4, 5]
                for c in clients:
                    got = await c.events(5)
                    assert [e["seq"] for e in got] == [1, 2, 3, 4, 5]
                    assert [e["data"] for e in got] == [{"new": i} for i in range(5)]
                    await c.close()
        finally:
            await publisher.close()
