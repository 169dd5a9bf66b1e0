"""The control channel and the deny list of every backend (Backend.publish_control, revoke, revocations).

Memory in one process; the local Redis (two backends on one prefix, one on another);
a Redis of the test's own whose pub/sub connection is killed; a real 3-master Redis
Cluster (sharded pub/sub).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from broadcaster.backend import Backend, BackendSettings
from broadcaster.backends.memory import MemoryBackend
from broadcaster.backends.redis import RedisBackend
from broadcaster.control import MAX_CONTROL_BYTES, now_ms
from broadcaster.errors import ValidationError
from broadcaster.keys import KeyLayout
from tests.support.polling import async_wait_until
from tests.support.redis_server import RedisClusterNodes, RedisServer

SETTINGS = BackendSettings(unsubscribe_delay=0)


class Box:
    """A control listener that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    def kinds(self) -> list[Any]:
        return [m.get("kind") for m in self.messages]


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    made: list[Backend] = []
    yield made
    for backend in made:
        await backend.close()


async def redis_backend(made: list[Backend], url: str, prefix: str, **options: Any) -> RedisBackend:
    backend = RedisBackend(url, key_prefix=prefix, settings=SETTINGS, **options)
    made.append(backend)
    await backend.start()
    return backend


# --- memory --------------------------------------------------------------------------


async def test_memory_every_listener_gets_every_message(backends: list[Backend]) -> None:
    b = MemoryBackend(SETTINGS)
    backends.append(b)
    await b.start()
    first, second = Box(), Box()
    calls: list[str] = []

    def failing(message: dict[str, Any]) -> None:
        calls.append("failing")
        raise RuntimeError("a broken listener")

    b.add_control_listener(first)
    b.add_control_listener(failing)
    b.add_control_listener(second)
    await b.publish_control({"kind": "join", "conv": "c", "user": "u1"})
    assert first.messages == []  # delivered soon, never inside the publishing call
    await b.publish_control({"kind": "disconnect", "sub": "u1"})
    await async_wait_until(lambda: len(second.messages) == 2, timeout=5, message="both messages")
    assert first.kinds() == second.kinds() == ["join", "disconnect"] and calls == ["failing", "failing"]
    assert first.messages[1] == {"kind": "disconnect", "sub": "u1"}


async def test_memory_refuses_what_is_not_a_small_json_object() -> None:
    b = MemoryBackend(SETTINGS)
    await b.start()
    try:
        with pytest.raises(ValidationError):
            await b.publish_control({"kind": "x", "bad": object()})
        with pytest.raises(ValidationError):
            await b.publish_control(["not", "an", "object"])  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            await b.publish_control({"kind": "x", "pad": "a" * MAX_CONTROL_BYTES})
        with pytest.raises(ValidationError):
            await b.revoke("", now_ms() + 1000)
    finally:
        await b.close()


async def test_memory_deny_list_expires_and_lifts() -> None:
    b = MemoryBackend(SETTINGS)
    await b.start()
    try:
        far = now_ms() + 3_600_000
        await b.revoke("u1", far)
        await b.revoke("u2", now_ms() + 300)
        await b.revoke("u3", far)
        assert await b.revocations() == {"u1": far, "u2": (await b.revocations())["u2"], "u3": far}
        await b.revoke("u3", 0)  # an until in the past lifts it
        await async_wait_until(b.revocations, until=lambda found: found == {"u1": far}, timeout=5,
                               message="u2 expired and u3 lifted")
    finally:
        await b.close()


async def test_a_backend_without_its_own_control_channel_serves_this_process() -> None:
    """Backend's defaults (a backend written for tests, no control code of its own): in-process delivery."""
    from tests.test_hub_races import GatedBackend

    b = GatedBackend()
    box = Box()
    b.add_control_listener(box)
    await b.publish_control({"kind": "disconnect", "sub": "u1"})
    await async_wait_until(lambda: box.messages, timeout=5, message="the message")
    assert box.messages == [{"kind": "disconnect", "sub": "u1"}]
    until = now_ms() + 60_000
    await b.revoke("u1", until)
    await b.revoke("u2", now_ms() - 1)
    assert await b.revocations() == {"u1": until}


# --- Redis ---------------------------------------------------------------------------


async def test_redis_same_prefix_shares_messages_other_prefix_does_not(
    redis_url: str, key_prefix: str, backends: list[Backend]
) -> None:
    one = await redis_backend(backends, redis_url, key_prefix)
    two = await redis_backend(backends, redis_url, key_prefix)
    other = await redis_backend(backends, redis_url, key_prefix + "x")
    boxes = {name: Box() for name in ("one", "two", "other")}
    one.add_control_listener(boxes["one"])
    two.add_control_listener(boxes["two"])
    other.add_control_listener(boxes["other"])
    await one.publish_control({"kind": "disconnect", "sub": "u1", "n": 1})
    await two.publish_control({"kind": "leave", "n": 2})
    await async_wait_until(lambda: len(boxes["one"].messages) == 2 and len(boxes["two"].messages) == 2,
                           timeout=5, message="both messages on both backends of the prefix")
    assert boxes["one"].messages == boxes["two"].messages == [
        {"kind": "disconnect", "sub": "u1", "n": 1}, {"kind": "leave", "n": 2}]
    # The other prefix's own message arrives on the same connection after ours would have: none came.
    await other.publish_control({"kind": "marker"})
    await async_wait_until(lambda: boxes["other"].messages, timeout=5, message="the other prefix's marker")
    assert boxes["other"].kinds() == ["marker"]
    assert boxes["one"].kinds() == ["disconnect", "leave"]


async def test_redis_undecodable_control_message_is_counted_and_dropped(
    redis_url: str, key_prefix: str, backends: list[Backend]
) -> None:
    b = await redis_backend(backends, redis_url, key_prefix)
    box = Box()
    b.add_control_listener(box)
    channel = KeyLayout(key_prefix).control()
    with contextlib.closing(redis.Redis.from_url(redis_url)) as raw:
        for garbage in (b"\xff not json", b"[1, 2]", b"\"a string\""):
            raw.publish(channel, garbage)
    await b.publish_control({"kind": "after"})
    await async_wait_until(lambda: box.messages, timeout=5, message="the valid message after the garbage")
    assert box.kinds() == ["after"] and b.stats.decode_errors == 3 and b.connected


async def test_redis_deny_list_is_shared_and_pruned(redis_url: str, key_prefix: str, backends: list[Backend]) -> None:
    one = await redis_backend(backends, redis_url, key_prefix)
    two = await redis_backend(backends, redis_url, key_prefix)
    far = now_ms() + 3_600_000
    soon = now_ms() + 300
    await one.revoke("u1", far)
    await one.revoke("u2", soon)
    await one.revoke("gone", far)
    assert await two.revocations() == {"u1": far, "u2": soon, "gone": far}
    await two.revoke("gone", now_ms() - 1)  # lifted from any process
    await async_wait_until(two.revocations, until=lambda found: found == {"u1": far}, timeout=5,
                           message="u2 expired")
    with contextlib.closing(redis.Redis.from_url(redis_url)) as raw:
        assert raw.hgetall(KeyLayout(key_prefix).revoked()) == {b"u1": str(far).encode()}  # pruned in Redis too
        raw.delete(KeyLayout(key_prefix).revoked())


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test only: its pub/sub connections get killed."""
    with RedisServer() as server:
        yield server


async def test_redis_control_channel_survives_a_reconnect(own_redis: RedisServer, backends: list[Backend]) -> None:
    listener = await redis_backend(backends, own_redis.url, "bc")
    sender = await redis_backend(backends, own_redis.url, "bc")
    box = Box()
    listener.add_control_listener(box)
    reloaded: list[dict[str, int]] = []

    async def reload() -> None:  # what the gateway does after a reconnect: read the deny list again
        reloaded.append(await listener.revocations())

    listener.add_reconnect_callback(reload)
    await sender.publish_control({"kind": "before"})
    await async_wait_until(lambda: box.kinds() == ["before"], timeout=5, message="the message before the kill")

    with contextlib.closing(own_redis.client()) as c:
        until = now_ms() + 3_600_000
        c.hset("bc:revoked", "missed", str(until))  # as if revoked while the connection is down
        assert c.client_kill_filter(_type="pubsub") == 2
    await async_wait_until(lambda: reloaded, timeout=10, message="the reconnect hook")
    assert reloaded == [{"missed": until}]
    assert listener.connected and listener.stats.reconnects == 1
    await sender.publish_control({"kind": "after"})
    await async_wait_until(lambda: box.kinds() == ["before", "after"], timeout=5,
                           message="the control channel subscribed again")


# --- Redis Cluster -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    with RedisClusterNodes(masters=3) as nodes:
        yield nodes


async def test_cluster_control_channel_is_sharded_and_shared(
    cluster: RedisClusterNodes, backends: list[Backend]
) -> None:
    prefix = "t" + secrets.token_hex(4)
    one = await redis_backend(backends, cluster.url, prefix)
    two = await redis_backend(backends, cluster.url, prefix)
    boxes = [Box(), Box()]
    one.add_control_listener(boxes[0])
    two.add_control_listener(boxes[1])
    channel = KeyLayout(prefix).control().encode()
    owner = cluster.node_for_slot(key_slot(channel))
    with contextlib.closing(owner.client()) as c:
        assert c.execute_command("PUBSUB", "SHARDNUMSUB", channel) == [channel, 2]
    await one.publish_control({"kind": "disconnect", "conv_id": "c"})
    await two.publish_control({"kind": "join"})
    await async_wait_until(lambda: all(len(b.messages) == 2 for b in boxes), timeout=5,
                           message="both messages on both backends")
    assert boxes[0].messages == boxes[1].messages == [{"kind": "disconnect", "conv_id": "c"}, {"kind": "join"}]
    until = now_ms() + 60_000
    await one.revoke("u1", until)
    assert await two.revocations() == {"u1": until}
    await asyncio.wait_for(two.revoke("u1", 0), 5)
    assert await one.revocations() == {}


async def test_cluster_control_channel_follows_its_slot(cluster: RedisClusterNodes, backends: list[Backend]) -> None:
    """Resharding moves the control channel's slot: both backends subscribe it again on the new owner."""
    from tests.test_redis_cluster_gateway import migrate_slot

    prefix = "t" + secrets.token_hex(4)
    one = await redis_backend(backends, cluster.url, prefix)
    two = await redis_backend(backends, cluster.url, prefix)
    box = Box()
    two.add_control_listener(box)
    channel = KeyLayout(prefix).control().encode()
    slot = key_slot(channel)
    src = cluster.node_for_slot(slot)
    dst = next(n for n in cluster.nodes if n is not src)
    await asyncio.to_thread(migrate_slot, cluster, slot, src, dst)

    def subscribers_on_dst() -> object:
        with contextlib.closing(dst.client()) as c:
            return c.execute_command("PUBSUB", "SHARDNUMSUB", channel)

    await async_wait_until(subscribers_on_dst, until=lambda got: got == [channel, 2], timeout=15,
                           message="both backends subscribed on the new owner")
    await one.publish_control({"kind": "after-move"})
    await async_wait_until(lambda: box.kinds() == ["after-move"], timeout=5, message="the message after the move")
    assert one.stats.reconnects == two.stats.reconnects == 0
