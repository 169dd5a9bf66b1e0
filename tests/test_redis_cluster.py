"""RedisBackend on a real 3-master Redis Cluster: sharded pub/sub, scripts per slot, per-node connections."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.crc import key_slot

from broadcaster.backend import BackendSettings
from broadcaster.backends.redis import RedisBackend
from broadcaster.envelope import PublishRequest
from broadcaster.keys import KeyLayout
from tests.backend_suite import wait_for
from tests.support.redis_server import RedisClusterNodes, RedisServer
from tests.test_redis_backend import Inbox


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    with RedisClusterNodes(masters=3) as nodes:
        yield nodes


@pytest.fixture
async def backend(cluster: RedisClusterNodes) -> AsyncIterator[RedisBackend]:
    b = RedisBackend(cluster.url, key_prefix="t" + secrets.token_hex(4), settings=BackendSettings(unsubscribe_delay=0))
    await b.start()
    yield b
    await b.close()


def convs_per_node(cluster: RedisClusterNodes, layout: KeyLayout, per_node: int = 2) -> dict[int, list[str]]:
    """``per_node`` conversation ids living on each node (by port)."""
    found: dict[int, list[str]] = {n.port: [] for n in cluster.nodes}
    i = 0
    while any(len(v) < per_node for v in found.values()):
        conv = f"conv-{i}"
        node = cluster.node_for_slot(key_slot(layout.live(conv).encode()))
        if len(found[node.port]) < per_node:
            found[node.port].append(conv)
        i += 1
    return found


def shard_channels(node: RedisServer) -> set[bytes]:
    with contextlib.closing(node.client()) as c:
        return set(c.execute_command("PUBSUB", "SHARDCHANNELS"))


def test_every_key_of_a_conversation_shares_one_slot() -> None:
    layout = KeyLayout("bc")
    conv = "c-1"
    names = [layout.meta(conv), layout.log(conv), layout.live(conv), layout.state(conv), layout.state_order(conv),
             layout.idempotency(conv, "evt"), layout.presence(conv)]
    assert len({key_slot(n.encode()) for n in names}) == 1


async def test_publish_and_deliver_on_every_shard(cluster: RedisClusterNodes, backend: RedisBackend) -> None:
    by_node = convs_per_node(cluster, backend.layout)
    convs = [c for group in by_node.values() for c in group]
    inboxes = {conv: Inbox() for conv in convs}
    for conv, inbox in inboxes.items():
        await backend.subscribe(conv, inbox)
    # One cluster pipeline spanning all three shards, interleaved, then single publishes.
    results = await backend.publish_many([PublishRequest(conv, "t.x", i) for i in range(3) for conv in convs])
    assert [r.seq for r in results] == [i + 1 for i in range(3) for _ in convs]
    for conv in convs:
        await backend.publish(conv, "t.x", 3, key="k")
    await wait_for(lambda: all(i.seqs == [1, 2, 3, 4] for i in inboxes.values()), what="delivery on all shards")
    for conv, inbox in inboxes.items():
        assert [e.data for e in inbox.events] == [0, 1, 2, 3] and inbox.events[0].conv == conv
        page = await backend.history(conv, 1)
        assert [e.seq for e in page.events] == [2, 3, 4] and not page.truncated
        snap = await backend.state(conv)
        assert snap.seq == 4 and set(snap.entities) == {"k"}
    duplicate = await backend.publish(convs[0], "t.x", 9, id=results[0].id)
    assert duplicate.duplicate and duplicate.seq == 1


async def test_only_channels_with_listeners_are_subscribed(cluster: RedisClusterNodes, backend: RedisBackend) -> None:
    by_node = convs_per_node(cluster, backend.layout)
    listened = {port: group[0] for port, group in by_node.items()}  # one of two per node
    inboxes = {conv: Inbox() for conv in listened.values()}
    for conv, inbox in inboxes.items():
        await backend.subscribe(conv, inbox)
    for node in cluster.nodes:
        ours = {ch for ch in shard_channels(node) if ch.startswith(backend.layout.prefix.encode())}
        assert ours == {backend.layout.live(listened[node.port]).encode()}
    for group in by_node.values():
        for conv in group:
            await backend.publish(conv, "t.x", None)
    await wait_for(lambda: all(len(i.events) == 1 for i in inboxes.values()), what="delivery to listened channels")
    for conv, inbox in inboxes.items():
        await backend.unsubscribe(conv, inbox)

    def all_dropped() -> bool:
        return not any(ch.startswith(backend.layout.prefix.encode()) for n in cluster.nodes for ch in shard_channels(n))

    await wait_for(all_dropped, what="channels dropped after the last listener left")


async def test_presence_across_shards(cluster: RedisClusterNodes, backend: RedisBackend) -> None:
    convs = [group[0] for group in convs_per_node(cluster, backend.layout, 1).values()]
    await backend.report_presence("gw-1", {conv: {"default": n + 1} for n, conv in enumerate(convs)}, ttl=30)
    assert [(await backend.presence(c)).connections for c in convs] == [1, 2, 3]


async def test_killed_shard_connection_reconnects(cluster: RedisClusterNodes, backend: RedisBackend) -> None:
    calls: list[int] = []

    async def on_reconnect() -> None:
        calls.append(1)

    backend.add_reconnect_callback(on_reconnect)
    by_node = convs_per_node(cluster, backend.layout, 1)
    inboxes = {group[0]: Inbox() for group in by_node.values()}
    for conv, inbox in inboxes.items():
        await backend.subscribe(conv, inbox)
    victim = cluster.nodes[1]
    with contextlib.closing(victim.client()) as c:
        assert c.client_kill_filter(_type="pubsub") >= 1
    await wait_for(lambda: len(calls) == 1 and backend.connected, what="reconnect after a shard link was killed")
    for conv in inboxes:
        await backend.publish(conv, "t.x", 1)
    await wait_for(lambda: all(len(i.events) == 1 for i in inboxes.values()), what="delivery after the reconnect")
