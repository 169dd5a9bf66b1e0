"""Gateway processes on a 3-master Redis Cluster (``--redis-url redis+cluster://...``).

Conversations whose hash slots live on each of the three masters are delivered and
resume with since/epoch; each gateway holds sharded subscriptions (SSUBSCRIBE) only for
the conversations its own clients watch, on the master owning them, and drops them when
the last client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any, TypeVar

import httpx
import pytest
from redis.crc import key_slot

from broadcaster.keys import KeyLayout
from tests.support.gateway import GatewayProcess, start_gateways
from tests.support.polling import async_wait_until
from tests.support.redis_server import RedisClusterNodes, RedisServer
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    with RedisClusterNodes(masters=3) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def prefix() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def gateways(redis_cluster: RedisClusterNodes, prefix: str) -> Iterator[list[GatewayProcess]]:
    """Two gateways on the cluster: ``watcher`` (clients connect here) and ``publisher`` (HTTP publishes only)."""
    procs = start_gateways(2, "--redis-url", redis_cluster.url, "--key-prefix", prefix, "--drain-seconds", "1")
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def convs_by_master(cluster: RedisClusterNodes, layout: KeyLayout, tag: str, per_master: int) -> dict[int, list[str]]:
    """``per_master`` fresh conversation ids on each master (by port), placed by the slot of ``P:{C}:live``."""
    found: dict[int, list[str]] = {n.port: [] for n in cluster.nodes}
    i = 0
    while any(len(v) < per_master for v in found.values()):
        conv = f"{tag}-{i}"
        slot = key_slot(layout.live(conv).encode())
        assert all(key_slot(k.encode()) == slot for k in (layout.log(conv), layout.state(conv), layout.meta(conv)))
        node = cluster.node_for_slot(slot)
        if len(found[node.port]) < per_master:
            found[node.port].append(conv)
        i += 1
    return found


def shard_channels(node: RedisServer, prefix: str) -> set[str]:
    """Our prefix's conversation channels with a sharded subscriber on ``node`` (PUBSUB SHARDCHANNELS; not the
    control channel ``prefix:control``, subscribed from start)."""
    with contextlib.closing(node.client()) as c:
        reply: list[bytes] = c.execute_command("PUBSUB", "SHARDCHANNELS", f"{prefix}:{{*")  # type: ignore[no-untyped-call]
    return {ch.decode() for ch in reply}


def shard_subscribers(node: RedisServer, channel: str) -> int:
    with contextlib.closing(node.client()) as c:
        reply: list[Any] = c.execute_command("PUBSUB", "SHARDNUMSUB", channel)  # type: ignore[no-untyped-call]
    return int(reply[1])


async def poll_until(fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float, what: str) -> T:
    """``await fetch()`` until ``ok`` accepts its value; AssertionError with the last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {value!r})")
        await asyncio.sleep(0.05)


async def get_json(http: httpx.AsyncClient, url: str) -> Any:
    return (await http.get(url)).json()


async def publish(http: httpx.AsyncClient, base: str, conv: str, i: int) -> dict[str, object]:
    r = await http.post(f"{base}/v1/conversations/{conv}/events", json={"type": "chat.msg", "data": {"i": i}})
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


async def test_every_shard_delivers_and_only_watched_channels_are_subscribed(
        redis_cluster: RedisClusterNodes, gateways: list[GatewayProcess], prefix: str) -> None:
    watcher, publisher = gateways
    layout = KeyLayout(prefix)
    by_master = convs_by_master(redis_cluster, layout, "shard", per_master=3)
    watched = {port: convs[:2] for port, convs in by_master.items()}  # the third stays unwatched
    unwatched = [convs[2] for convs in by_master.values()]
    all_watched = [c for convs in watched.values() for c in convs]

    # One client per watched conversation (conv_id in the URL) and one following all of them (ws.subscribe).
    singles = {conv: await WsClient.connect(watcher.ws_url(f"conv_id={conv}")) for conv in all_watched}
    for c in singles.values():
        await c.expect("ws.subscribed")
    multi = await WsClient.connect(watcher.ws_url())
    for conv in all_watched:
        await multi.send_json({"type": "ws.subscribe", "conv_id": conv})
    subscribed = await multi.until(lambda got: len(got) == len(all_watched), timeout=10,
                                   keep=lambda o: o["type"] == "ws.subscribed")
    assert {s["conv_id"] for s in subscribed} == set(all_watched)

    events = 5
    async with httpx.AsyncClient(timeout=5) as http:
        for i in range(events):
            for conv in all_watched + unwatched:  # interleaved over the three shards, through the other gateway
                await publish(http, publisher.http_url, conv, i)
        for conv, client in singles.items():
            got = await client.events(events, timeout=10)
            assert [(e["conv_id"], e["seq"], e["data"]["i"]) for e in got] == [
                (conv, i + 1, i) for i in range(events)]
        got = await multi.events(events * len(all_watched), timeout=10)
        for conv in all_watched:
            assert [e["seq"] for e in got if e["conv_id"] == conv] == list(range(1, events + 1))

        # The watcher holds exactly one sharded subscription per watched conversation, on its master; the
        # publisher gateway (no clients) holds none; unwatched conversations have no subscriber anywhere.
        for node in redis_cluster.nodes:
            expected = {layout.live(conv) for conv in watched[node.port]}
            assert shard_channels(node, prefix) == expected, node.address
            for channel in expected:
                assert shard_subscribers(node, channel) == 1, channel
        # Presence counted on the conversations' own shards: the single client and the multi one.
        for conv in all_watched:
            want = {"conv_id": conv, "connections": 2, "by_profile": {"default": 2}}
            url = f"{publisher.http_url}/v1/conversations/{conv}/presence"
            await poll_until(partial(get_json, http, url), partial(operator.eq, want), timeout=20,
                             what=f"presence of {conv}")
        for conv in unwatched:
            node = redis_cluster.node_for_slot(key_slot(layout.live(conv).encode()))
            assert shard_subscribers(node, layout.live(conv)) == 0
            body = (await http.get(f"{publisher.http_url}/v1/conversations/{conv}/events?since=0")).json()
            assert [e["seq"] for e in body["events"]] == list(range(1, events + 1))  # published all the same

    # The last client of one conversation per master leaves: after the unsubscribe delay only the
    # channels still watched remain.
    dropped = [convs[0] for convs in watched.values()]
    for conv in dropped:
        await singles.pop(conv).close()
        await multi.send_json({"type": "ws.unsubscribe", "conv_id": conv})
    await multi.until(lambda got: len(got) == len(dropped), timeout=10, keep=lambda o: o["type"] == "ws.unsubscribed")

    def snapshot() -> dict[int, set[str]]:
        return {node.port: shard_channels(node, prefix) for node in redis_cluster.nodes}

    kept = {port: {layout.live(c) for c in convs[1:]} for port, convs in watched.items()}
    await poll_until(lambda: asyncio.to_thread(snapshot), lambda now: now == kept, timeout=15,
                     what="sharded subscriptions dropped after the last client left")
    for c in [*singles.values(), multi]:
        await c.close()


async def test_resume_with_since_and_epoch_on_every_shard(
        redis_cluster: RedisClusterNodes, gateways: list[GatewayProcess], prefix: str) -> None:
    watcher, publisher = gateways
    layout = KeyLayout(prefix)
    convs = [group[0] for group in convs_by_master(redis_cluster, layout, "resume", per_master=1).values()]
    async with httpx.AsyncClient(timeout=5) as http:
        heads = {}
        for conv in convs:
            for i in range(6):
                heads[conv] = await publish(http, publisher.http_url, conv, i)
        for conv in convs:
            epoch = str(heads[conv]["epoch"])
            client = await WsClient.connect(watcher.ws_url(f"conv_id={conv}&since=2&epoch={epoch}"))
            sub = await client.expect("ws.subscribed")
            assert (sub["seq"], sub["epoch"]) == (6, epoch)
            missed = await client.events(4, timeout=10)
            assert [e["seq"] for e in missed] == [3, 4, 5, 6]
            await publish(http, watcher.http_url, conv, 6)  # live after the replay, no gap, no duplicate
            (live,) = await client.events(1, timeout=10)
            assert live["seq"] == 7 and live["data"]["i"] == 6
            await client.close()

            # A stale epoch is not silently replayed from: the client is told to reset.
            other = ("y" if epoch[0] == "x" else "x") + epoch[1:]
            stale = await WsClient.connect(watcher.ws_url(f"conv_id={conv}&since=3&epoch={other}"))
            reset = await stale.expect("ws.reset")
            assert (reset["reason"], reset["epoch"], reset["seq"]) == ("epoch_changed", epoch, 7)
            await stale.close()

            # History over the HTTP API of either gateway reads the same shard.
            body = (await http.get(f"{watcher.http_url}/v1/conversations/{conv}/events?since=5")).json()
            assert [e["seq"] for e in body["events"]] == [6, 7] and body["epoch"] == epoch


def node_id(node: RedisServer) -> str:
    with contextlib.closing(node.client()) as c:
        return str(c.execute_command("CLUSTER", "MYID").decode())  # type: ignore[no-untyped-call]


def migrate_slot(cluster: RedisClusterNodes, slot: int, src: RedisServer, dst: RedisServer) -> None:
    """Move one slot and its keys from ``src`` to ``dst`` (what ``redis-cli --cluster reshard`` does per slot)."""
    src_id, dst_id = node_id(src), node_id(dst)
    with contextlib.closing(src.client()) as s, contextlib.closing(dst.client()) as d:
        d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)  # type: ignore[no-untyped-call]
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)  # type: ignore[no-untyped-call]
        while keys := s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):  # type: ignore[no-untyped-call]
            s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)  # type: ignore[no-untyped-call]
    for node in [dst, src, *(n for n in cluster.nodes if n not in (src, dst))]:
        with contextlib.closing(node.client()) as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)  # type: ignore[no-untyped-call]


async def test_watched_conversation_survives_a_slot_migration(
        redis_cluster: RedisClusterNodes, gateways: list[GatewayProcess], prefix: str) -> None:
    """Resharding moves a watched conversation's slot: Redis drops the shard subscription (SUNSUBSCRIBE); the
    gateway subscribes again on the new owner and repairs from history — no gap, no reset."""
    watcher, publisher = gateways
    layout = KeyLayout(prefix)
    conv = f"moving-{secrets.token_hex(3)}"
    slot = key_slot(layout.live(conv).encode())
    src = redis_cluster.node_for_slot(slot)
    dst = next(n for n in redis_cluster.nodes if n is not src)
    client = await WsClient.connect(watcher.ws_url(f"conv_id={conv}"))
    await client.expect("ws.subscribed")
    events = 120
    published = [0]
    async with httpx.AsyncClient(timeout=10) as http:
        async def produce() -> None:
            for i in range(events):
                await publish(http, publisher.http_url, conv, i)
                published[0] = i + 1
                await asyncio.sleep(0.005)

        producing = asyncio.create_task(produce())
        # Migrate mid-stream at any speed: once a fifth of the events are out, not after a while.
        await async_wait_until(lambda: published[0] >= events // 5 or producing.done(), timeout=30,
                               message="the producer to get going")
        assert not producing.done(), "the producer finished before the migration"
        await asyncio.to_thread(migrate_slot, redis_cluster, slot, src, dst)
        await producing
    got = await client.until(lambda got: sum(not o["type"].startswith("ws.") for o in got) >= events, timeout=15)
    assert [o["seq"] for o in got] == list(range(1, events + 1)), [o for o in got if o["type"].startswith("ws.")]
    assert redis_cluster.node_for_slot(slot) is dst
    await poll_until(lambda: asyncio.to_thread(shard_channels, dst, prefix), lambda chans: layout.live(conv) in chans,
                     timeout=15, what="subscription on the slot's new owner")
    await poll_until(lambda: asyncio.to_thread(shard_channels, src, prefix),
                     lambda chans: layout.live(conv) not in chans, timeout=15,
                     what="no subscription left on the old owner")
    await client.close()
