"""Conversation state: keyed upserts, /state, and hydrate over real websockets, on memory and Redis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from broadcaster.backend import Backend, BackendSettings
from broadcaster.envelope import PublishRequest
from broadcaster.profiles import ProfileRegistry
from gateway.settings import Settings
from tests.support.gateway import InProcessGateway
from tests.support.polling import async_wait_until
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(90)

PROFILES = ProfileRegistry.from_mapping({"profiles": {
    "lean": {"include": ["timeline.*"], "drop_fields": ["raw"]},
    "full": {"include": ["*"]},
}})


def make_backend(kind: str, settings: BackendSettings, key_prefix: str, redis_url: str) -> Backend:
    if kind == "memory":
        from broadcaster.backends.memory import MemoryBackend

        return MemoryBackend(settings)
    from broadcaster.backends.redis import RedisBackend

    return RedisBackend(redis_url, key_prefix=key_prefix, settings=settings)


@pytest.fixture(params=["memory", "redis"])
async def gateway(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[InProcessGateway]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    settings = Settings(state_max_entries=50)
    backend_settings = BackendSettings(state_max_entries=50, history_size=100_000)
    backend = make_backend(request.param, backend_settings, key_prefix, redis_url)
    async with InProcessGateway(settings, backend=backend, profiles=PROFILES) as gw:
        yield gw


async def test_state_holds_latest_per_key_and_hydrate_continues_exactly(gateway: InProcessGateway) -> None:
    backend = gateway.gateway.backend
    rng = random.Random(7)
    expected: dict[str, dict[str, int]] = {}
    batch: list[PublishRequest] = []
    for i in range(5000):
        if i % 5 == 4:
            batch.append(PublishRequest("s1", "chat.other", {"i": i}))
        else:
            key = f"msg-{rng.randrange(40)}"
            data = {"i": i, "key": key}
            expected[key] = data
            batch.append(PublishRequest("s1", "timeline.delta", data, key=key))
    for start in range(0, len(batch), 500):
        await backend.publish_many(batch[start:start + 500])
    assert len(expected) == 40

    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        state = (await http.get("/v1/conversations/s1/state", params={"profile": "full"})).json()
    assert state["seq"] == 5000
    assert {k: v["data"] for k, v in state["entities"].items()} == expected
    assert all(v["key"] == k for k, v in state["entities"].items())

    # hydrate while another task keeps publishing: ws.state, then every later event once, in order
    stop = asyncio.Event()
    published = [0]  # live publishes so far

    async def keep_publishing() -> int:
        while not stop.is_set():
            n = published[0]
            await backend.publish("s1", "timeline.delta", {"live": n}, key=f"msg-{n % 40}")
            published[0] = n + 1
            await asyncio.sleep(0)
        return published[0]

    publisher = asyncio.create_task(keep_publishing())
    # The hydrate must happen mid-stream: wait until the publisher is going, not for a while.
    await async_wait_until(lambda: published[0] >= 20, timeout=15, message="the live publisher to get going")
    client = await WsClient.connect(gateway.ws_url("conv_id=s1&profile=full&hydrate=1"))
    subscribed = await client.expect("ws.subscribed", timeout=15)
    snapshot = await client.next(timeout=15)
    assert snapshot["type"] == "ws.state" and snapshot["seq"] == subscribed["seq"]
    assert len(snapshot["entities"]) == 40
    # Keep publishing past the snapshot: 200 more events follow it live.
    at_snapshot = snapshot["seq"] - 5000  # live publishes the snapshot includes
    await async_wait_until(lambda: published[0] >= at_snapshot + 200, timeout=30,
                           message="200 live events after the snapshot")
    stop.set()
    await publisher
    head = (await backend.head("s1")).seq
    later = await client.events(head - snapshot["seq"], timeout=30)
    assert [e["seq"] for e in later] == list(range(snapshot["seq"] + 1, head + 1))
    # the snapshot plus the later events rebuild exactly the final state
    rebuilt = {k: v["data"] for k, v in snapshot["entities"].items()}
    for e in later:
        rebuilt[e["key"]] = e["data"]
    final = (await backend.state("s1")).entities
    assert rebuilt == {k: env.data for k, env in final.items()}


async def test_two_profiles_hydrate_to_their_own_views(gateway: InProcessGateway) -> None:
    backend = gateway.gateway.backend
    await backend.publish("v1", "timeline.item", {"text": "a", "raw": "secret"}, key="a")
    await backend.publish("v1", "chat.note", {"text": "b"}, key="b")
    lean = await WsClient.connect(gateway.ws_url("conv_id=v1&profile=lean&hydrate=1"))
    full = await WsClient.connect(gateway.ws_url("conv_id=v1&profile=full&hydrate=1"))
    lean_state = await lean.expect("ws.state")
    full_state = await full.expect("ws.state")
    assert {k: v["data"] for k, v in lean_state["entities"].items()} == {"a": {"text": "a"}}
    assert {k: v["data"] for k, v in full_state["entities"].items()} == {"a": {"text": "a", "raw": "secret"},
                                                                         "b": {"text": "b"}}
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        over_http = (await http.get("/v1/conversations/v1/state", params={"profile": "lean"})).json()
    assert over_http["entities"] == lean_state["entities"]


async def test_delete_entry_and_cap_evicts_oldest_updated(gateway: InProcessGateway) -> None:
    backend = gateway.gateway.backend
    await backend.publish("d1", "timeline.item", {"v": 1}, key="gone")
    deleted = await backend.publish("d1", "timeline.item", None, key="gone")
    state = await backend.state("d1")
    assert "gone" not in state.entities and state.seq == deleted.seq
    for i in range(50):
        await backend.publish("d1", "timeline.item", {"v": i}, key=f"k{i}")
    await backend.publish("d1", "timeline.item", {"v": "again"}, key="k0")  # k0 is now the newest
    result = await backend.publish("d1", "timeline.item", {"v": "new"}, key="k50")
    assert result.evicted == 1
    state = await backend.state("d1")
    assert len(state.entities) == 50
    assert "k1" not in state.entities and "k0" in state.entities and "k50" in state.entities
    assert backend.stats.state_evictions >= 1  # counted for the metrics


async def test_client_away_past_history_resets_then_rehydrates_then_live(redis_url: str, key_prefix: str) -> None:
    """A hydrating Python client that was away longer than the history ends with the right state."""
    from broadcaster.backends.redis import RedisBackend
    from producers.client import BroadcasterClient, Event, Reset, State
    from tests.support.gateway import GatewayProcess

    backend = RedisBackend(redis_url, key_prefix=key_prefix, settings=BackendSettings(history_size=20))
    await backend.start()
    gw = GatewayProcess("--redis-url", redis_url, "--key-prefix", key_prefix, "--history-size", "20").start()
    client = BroadcasterClient(gw.ws_url(), ["away"], hydrate=True, backoff_max=0.3)
    items: list[object] = []

    async def collect() -> None:
        async for item in client:
            items.append(item)

    async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        await async_wait_until(lambda: condition() or items[-3:], timeout=timeout, message=what,
                               until=lambda seen: seen is True)

    reader = asyncio.create_task(collect())
    try:
        await wait_for(lambda: any(isinstance(i, State) for i in items), "initial state")
        await backend.publish("away", "timeline.item", {"v": 0}, key="a")
        await wait_for(lambda: any(isinstance(i, Event) and i.seq == 1 for i in items), "first event")
        gw.kill()  # the client is away now
        for i in range(100):  # far past the 20 events of history
            await backend.publish("away", "timeline.item", {"v": i}, key=f"k{i % 5}")
        await backend.publish("away", "timeline.item", None, key="a")  # the entry it had is deleted
        gw = GatewayProcess("--redis-url", redis_url, "--key-prefix", key_prefix, "--history-size", "20",
                            port=gw.port).start()
        await wait_for(lambda: any(isinstance(i, State) and i.seq >= 102 for i in items), "re-hydration")
        resets = [i for i in items if isinstance(i, Reset)]
        assert resets and resets[0].reason == "history_truncated"
        state = next(i for i in items if isinstance(i, State) and i.seq >= 102)
        assert items.index(resets[0]) < items.index(state)
        assert {k: e.data for k, e in state.entities.items()} == {f"k{j}": {"v": 95 + j} for j in range(5)}
        await backend.publish("away", "timeline.item", {"v": "live"}, key="k0")
        await wait_for(lambda: isinstance(items[-1], Event) and items[-1].seq == 103, "live event after state")
        after = [i for i in items[items.index(state) + 1:] if isinstance(i, Event)]
        assert [e.seq for e in after] == [103]
    finally:
        await client.close()
        reader.cancel()
        gw.stop()
        await backend.close()


async def test_state_survives_a_redis_restart_with_aof(key_prefix: str) -> None:
    from broadcaster.backends.redis import RedisBackend
    from tests.support.redis_server import RedisServer

    server = RedisServer(appendonly=True).start()
    backend = RedisBackend(server.url, key_prefix=key_prefix)
    await backend.start()
    try:
        for i in range(30):
            await backend.publish("aof", "timeline.item", {"v": i}, key=f"k{i % 7}")
        before = await backend.state("aof")
        server.kill()
        server.restart()
        after = await async_wait_until(lambda: backend.state("aof"), timeout=20,
                                       message="the backend to come back", ignore=(Exception,))
        assert (after.epoch, after.seq) == (before.epoch, before.seq) == (before.epoch, 30)
        assert {k: e.data for k, e in after.entities.items()} == {k: e.data for k, e in before.entities.items()}
        nxt = await backend.publish("aof", "timeline.item", {"v": "next"}, key="k0")
        assert (nxt.seq, nxt.epoch) == (31, before.epoch)
    finally:
        await backend.close()
        server.stop()


async def test_foreign_payload_json_cannot_carry_is_skipped_not_a_500(redis_url: str, key_prefix: str) -> None:
    """A raw producer stores msgpack bin data: HTTP reads and hydrate skip that event and keep serving."""
    import msgpack

    from broadcaster.backends.base import PreparedPublish
    from broadcaster.backends.redis import RedisBackend

    backend = RedisBackend(redis_url, key_prefix=key_prefix)
    async with InProcessGateway(Settings(key_prefix=key_prefix), backend=backend) as gw:
        await backend.publish("bin", "timeline.item", {"ok": 1}, key="good")
        raw = PreparedPublish("bin", "timeline.item", "raw-1", "bad", msgpack.packb({"b": b"\x00\xff"}), 600, True)
        await backend.commands.publish_many([raw])
        await backend.publish("bin", "timeline.item", {"ok": 3}, key="good2")
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            hist = await http.get("/v1/conversations/bin/events", params={"since": 0})
            state = await http.get("/v1/conversations/bin/state")
        assert hist.status_code == 200 and [e["seq"] for e in hist.json()["events"]] == [1, 3]
        assert state.status_code == 200 and set(state.json()["entities"]) == {"good", "good2"}
        client = await WsClient.connect(gw.ws_url("conv_id=bin&hydrate=1"))
        snapshot = await client.expect("ws.state")
        assert set(snapshot["entities"]) == {"good", "good2"} and snapshot["seq"] == 3
        assert gw.gateway.hub.stats.render_errors >= 3


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_state_byte_cap_evicts_oldest_updated(kind: str, key_prefix: str, request: pytest.FixtureRequest) -> None:
    # the policy is fixed when a backend is built (its namespaces' policy): one with a 4000-byte cap
    redis_url = request.getfixturevalue("redis_url") if kind == "redis" else ""
    backend = make_backend(kind, BackendSettings(state_max_bytes=4000), key_prefix, redis_url)
    await backend.start()
    try:
        await _byte_cap_scenario(backend)
    finally:
        await backend.close()


async def _byte_cap_scenario(backend: Backend) -> None:
    blob = "x" * 1000  # each entry below is ~1.1 KB encoded
    for i in range(3):
        await backend.publish("b1", "timeline.item", {"blob": blob, "i": i}, key=f"k{i}")
    await backend.publish("b1", "timeline.item", {"blob": blob, "i": "again"}, key="k0")  # k0 is now the newest
    result = await backend.publish("b1", "timeline.item", {"blob": blob, "i": 3}, key="k3")
    assert result.evicted == 1
    state = await backend.state("b1")
    assert set(state.entities) == {"k0", "k2", "k3"}
    await backend.publish("b1", "timeline.item", None, key="k2")  # deleting frees its bytes
    result = await backend.publish("b1", "timeline.item", {"blob": blob, "i": 4}, key="k4")
    assert result.evicted == 0
    assert set((await backend.state("b1")).entities) == {"k0", "k3", "k4"}
