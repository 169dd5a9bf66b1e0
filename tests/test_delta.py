"""Delta upserts (#17 item 2): the patch format, and /ws subscribers with delta=1 on real gateways."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broadcaster.backend import BackendSettings
from broadcaster.backends.memory import MemoryBackend
from broadcaster.delta import apply_patch, make_patch
from broadcaster.namespaces import parse_namespaces
from broadcaster.profiles import ProfileRegistry
from gateway.settings import Settings
from producers.entities import EntityMap
from tests.support.gateway import InProcessGateway
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text("ab$", max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("ab$", max_size=3), inner, max_size=3),
    max_leaves=8)
objects = st.dictionaries(st.text("ab$", max_size=3), json_values, max_size=4)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(old=objects, new=objects)
def test_a_patch_takes_the_old_version_to_the_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    patch = make_patch(old, new)
    assert patch is not None
    assert apply_patch(old, patch) == new


def test_namespaces_delta_field() -> None:
    table = BackendSettings(namespaces=tuple(parse_namespaces(
        {"namespaces": {"d-*": {"delta": True, "history_size": 5}, "*": {"delta": True}}}))).policy_table()
    assert table.resolve("d-1").delta and table.resolve("d-1").policy.history_size == 5
    assert table.resolve("other").delta
    plain = BackendSettings().policy_table()
    assert not plain.resolve("d-1").delta
    assert "delta" not in table.describe()  # not part of the Redis policy or its fingerprint
    with pytest.raises(ValueError, match="delta must be true or false"):
        parse_namespaces({"namespaces": {"a-*": {"delta": 1}}})


def test_patch_format() -> None:
    assert make_patch({"text": "Hel", "n": 1, "gone": 2, "m": {"a": 1}},
                      {"text": "Hello", "n": None, "m": {"a": 1, "b": {"c": 1}}, "new": [1]}) == {
        "gone": None, "text": {"$append": "lo"}, "n": {"$set": None}, "m": {"b": {"$set": {"c": 1}}}, "new": [1]}
    assert make_patch([1], {"a": 1}) is None
    assert apply_patch({"t": "a"}, {"t": {"$append": "b"}, "u": {"$set": {"$append": "literal"}}}) == {
        "t": "ab", "u": {"$append": "literal"}}


N = 120
LONG = "x" * 300  # a delta is sent only when smaller than the whole event
PROFILES = ProfileRegistry.from_mapping({"profiles": {"lean": {"include": ["llm.*"], "drop_fields": ["raw"]}}})


@pytest.fixture
async def gateway() -> AsyncIterator[InProcessGateway]:
    namespaces = tuple(parse_namespaces({"namespaces": {"d-*": {"delta": True}}}))
    backend = MemoryBackend(BackendSettings(namespaces=namespaces))
    async with InProcessGateway(Settings(), backend=backend, profiles=PROFILES) as gw:
        yield gw


async def read_all(ws: WsClient, last_seq: int) -> list[dict[str, Any]]:
    return await ws.until(lambda got: any(o.get("seq") == last_seq and not o["type"].startswith("ws.") for o in got))


@pytest.mark.parametrize("profile", ["default", "lean"])
async def test_full_upserts_reach_delta_subscribers_as_deltas(gateway: InProcessGateway, profile: str) -> None:
    backend = gateway.gateway.backend
    conv = f"d-{profile}"
    await backend.publish(conv, "llm.message", {"text": "start", "raw": "r0"}, key="m")
    delta_ws = await WsClient.connect(gateway.ws_url(f"conv_id={conv}&hydrate=1&delta=1&profile={profile}"))
    plain_ws = await WsClient.connect(gateway.ws_url(f"conv_id={conv}&hydrate=1&profile={profile}"))
    subscribed = await delta_ws.expect("ws.subscribed")
    assert subscribed["delta"] is True
    assert "delta" not in (await plain_ws.expect("ws.subscribed"))

    text = "start"
    for i in range(N):
        text += f" token{i}"
        await backend.publish(conv, "llm.message", {"text": text, "raw": f"r{i}", "i": i}, key="m")
    got_delta, got_plain = await read_all(delta_ws, N + 1), await read_all(plain_ws, N + 1)
    events = [o for o in got_delta if not o["type"].startswith("ws.")]
    # the first live upsert goes out whole (ws.state is not a base); later ones as deltas once that is
    # smaller (a delta of a short text is not)
    ops = [o.get("op") for o in events]
    assert ops[0] is None and ops[-30:] == ["delta"] * 30
    first = ops.index("delta")
    assert ops[first:] == ["delta"] * (N - first)
    assert events[first]["base"] == events[first - 1]["seq"]
    assert events[first]["data"]["text"] == {"$append": f" token{first}"}
    assert ("raw" in events[0]["data"]) == (profile == "default")  # a delta of what this profile rendered
    assert all(o.get("op") is None for o in got_plain if not o["type"].startswith("ws."))
    delta_bytes = sum(len(str(o)) for o in events)
    plain_bytes = sum(len(str(o)) for o in got_plain if not o["type"].startswith("ws."))
    assert delta_bytes * 3 < plain_bytes

    maps = [EntityMap(), EntityMap()]
    for m, objs in zip(maps, (got_delta, got_plain), strict=True):
        for o in objs:
            m.apply(o)
    assert maps[0].snapshot() == maps[1].snapshot()
    assert maps[0]["m"]["data"]["text"] == text and maps[0]["m"]["seq"] == N + 1
    for ws in (delta_ws, plain_ws):
        await ws.close()


async def test_no_delta_where_the_namespace_does_not_allow_it_nor_after_a_reset(gateway: InProcessGateway) -> None:
    backend = gateway.gateway.backend
    other = await WsClient.connect(gateway.ws_url("conv_id=x-1&delta=1"))
    assert "delta" not in (await other.expect("ws.subscribed"))
    for i in range(3):
        await backend.publish("x-1", "llm.message", {"text": "a" * (i + 1)}, key="m")
    assert [o.get("op") for o in await other.events(3)] == [None] * 3

    ws = await WsClient.connect(gateway.ws_url("conv_id=d-r&delta=1"))
    await ws.expect("ws.subscribed")
    for i in range(2):
        await backend.publish("d-r", "llm.message", {"text": LONG + "b" * (i + 1)}, key="m")
    assert [o.get("op") for o in await ws.events(2)] == [None, "delta"]
    # a resubscription with a stale epoch: ws.reset, and the next upsert goes out whole again
    await ws.send_json({"type": "ws.subscribe", "conv_id": "d-r", "since": 2, "epoch": "stale", "delta": True})
    await ws.expect("ws.reset")
    await backend.publish("d-r", "llm.message", {"text": LONG + "bbb"}, key="m")
    await backend.publish("d-r", "llm.message", {"text": LONG + "bbbb"}, key="m")
    events = await ws.events(2)
    assert [(o["seq"], o.get("op")) for o in events] == [(3, None), (4, "delta")]
    # an append or a delete leaves no base: the next upsert is whole
    from broadcaster.envelope import PublishRequest

    await backend.publish_many([PublishRequest("d-r", "llm.message", {"text": "!"}, key="m", op="append")])
    await backend.publish("d-r", "llm.message", {"text": LONG + "bbbb!?"}, key="m")
    assert [o.get("op") for o in await ws.events(2)] == ["append", None]
    for w in (other, ws):
        await w.close()


async def test_a_subscriber_that_missed_the_base_gets_the_whole_upsert(gateway: InProcessGateway) -> None:
    """Two delta subscribers in one group: the one that joined after version 1 (live only, so it never
    got it) receives version 2 whole while the other receives it as a delta."""
    backend = gateway.gateway.backend
    first = await WsClient.connect(gateway.ws_url("conv_id=d-m&delta=1"))
    await first.expect("ws.subscribed")
    await backend.publish("d-m", "llm.message", {"text": LONG + "1"}, key="m")
    assert (await first.events(1))[0].get("op") is None
    late = await WsClient.connect(gateway.ws_url("conv_id=d-m&delta=1"))
    await late.expect("ws.subscribed")
    await backend.publish("d-m", "llm.message", {"text": LONG + "12"}, key="m")
    assert (await first.events(1))[0]["op"] == "delta"
    assert (await late.events(1))[0].get("op") is None
    await backend.publish("d-m", "llm.message", {"text": LONG + "123"}, key="m")
    assert (await late.events(1))[0]["op"] == "delta"  # from here it holds the base
    for ws in (first, late):
        await ws.close()


async def test_a_reset_forgets_what_each_delta_subscriber_held() -> None:
    """A ws.reset (history_truncated, same epoch) empties the client's entities: the next upsert is whole."""
    from broadcaster.hub import Hub
    from broadcaster.profiles import ProfileRegistry as Registry

    backend = MemoryBackend(BackendSettings())
    await backend.start()
    hub = Hub(backend, gateway_id="g")
    sent: list[dict[str, Any]] = []

    class Sub:
        connection_id = "c"

        def send(self, data: bytes) -> None:
            import orjson

            sent.append(orjson.loads(data))

    profile = Registry.from_mapping({}).get("default")
    assert profile is not None
    await hub.subscribe(Sub(), "d-h", profile, delta=True)
    for i in range(3):
        await backend.publish("d-h", "llm.message", {"text": LONG + "0123"[:i + 1]}, key="m")
    from tests.support.polling import async_wait_until

    await async_wait_until(lambda: len([o for o in sent if o["type"] == "llm.message"]) == 3, 5.0, "three events")
    feed = hub._feeds["d-h"]
    hub._broadcast_reset(feed, "history_truncated", feed.epoch, feed.last_seq)
    await backend.publish("d-h", "llm.message", {"text": LONG + "01234"}, key="m")
    await async_wait_until(lambda: len([o for o in sent if o["type"] == "llm.message"]) == 4, 5.0, "the fourth")
    ops = [o.get("op") for o in sent if o["type"] == "llm.message"]
    assert ops == [None, "delta", "delta", None]
    await hub.close()
    await backend.close()
