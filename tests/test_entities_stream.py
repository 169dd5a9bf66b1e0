"""Whole entities in the Python client (#17 item 3) and the streaming helper (item 4)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from broadcaster.envelope import PublishRequest
from gateway.settings import Settings
from producers import AsyncProducer, Producer
from producers.client import BroadcasterClient, Entity, Event
from producers.entities import EntityMap
from tests.support.gateway import InProcessGateway
from tests.support.polling import async_wait_until

pytestmark = pytest.mark.timeout(60)


def event(seq: int, key: str, data: Any, op: str | None = None, type: str = "llm.message") -> dict[str, Any]:
    obj: dict[str, Any] = {"type": type, "conv_id": "c", "seq": seq, "id": f"e{seq}", "ts": seq, "data": data,
                           "key": key}
    if op is not None:
        obj["op"] = op
    return obj


def test_entity_map_applies_state_upserts_appends_deletes_and_resets() -> None:
    m = EntityMap()
    assert m.apply({"type": "ws.state", "conv_id": "c", "epoch": "e", "seq": 2,
                    "entities": {"a": event(1, "a", {"text": "He"}), "b": event(2, "b", {"x": 1})}}) == [
        ("a", event(1, "a", {"text": "He"})), ("b", event(2, "b", {"x": 1}))]
    changes = m.apply(event(3, "a", {"text": "llo", "n": 1}, "append"))
    assert changes == [("a", event(3, "a", {"text": "Hello", "n": 1}))] and "op" not in changes[0][1]
    assert m.apply(event(4, "c", {"text": "new"}, "append")) == [("c", event(4, "c", {"text": "new"}))]
    assert m.apply(event(5, "b", None)) == [("b", None)] and "b" not in m
    assert m.apply(event(6, "b", None)) == []
    assert m.apply({"type": "chat.other", "conv_id": "c", "seq": 7, "data": 1}) == []
    assert m.data() == {"a": {"text": "Hello", "n": 1}, "c": {"text": "new"}}
    assert m.apply({"type": "ws.reset", "conv_id": "c", "reason": "history_truncated", "epoch": "e", "seq": 9}) == [
        ("a", None), ("c", None)]
    assert len(m) == 0


async def test_client_keeps_whole_entities_hydrating_mid_answer() -> None:
    async with InProcessGateway(Settings()) as gw:
        backend = gw.gateway.backend
        await backend.publish_many([PublishRequest("c", "llm.message", {"text": t}, key="m", op="append")
                                    for t in ("The ", "quick ")])
        seen: list[tuple[str, str, Entity | None]] = []
        client = BroadcasterClient(gw.http_url, ["c"], hydrate=True,
                                   on_entity=lambda conv, key, entity: seen.append((conv, key, entity)))
        async with client:
            first = await client.get()
            assert type(first).__name__ == "State"
            assert client.entity("c", "m") is not None and client.entity("c", "m")["data"] == {"text": "The quick "}
            await backend.publish_many([PublishRequest("c", "llm.message", {"text": t}, key="m", op="append")
                                        for t in ("brown ", "fox")])
            items = [await client.get(), await client.get()]
            assert all(isinstance(i, Event) and i.op == "append" for i in items)
            assert client.entity("c", "m")["data"] == {"text": "The quick brown fox"}  # type: ignore[index]
            assert client.entity("c", "m")["seq"] == 4  # type: ignore[index]
            await backend.publish("c", "llm.message", None, key="m")
            await client.get()
            assert client.entity("c", "m") is None
        assert [e["data"]["text"] if e else None for _, _, e in seen] == [
            "The quick ", "The quick brown ", "The quick brown fox", None]


async def test_async_stream_coalesces_within_the_window_and_ends_with_a_full_upsert() -> None:
    async with InProcessGateway(Settings()) as gw, AsyncProducer.from_url(gw.http_url) as p:
        tokens = [f"t{i} " for i in range(40)]
        async with p.stream("s", "m", "llm.message", window=10.0, final={"done": True}) as s:
            for t in tokens[:20]:
                await s.append(t)
            assert s.publishes == 0  # all inside the window
            await s.flush()
            for t in tokens[20:]:
                await s.append({"text": t, "n": 1})
        assert s.publishes == 2
        snapshot = await gw.gateway.backend.state("s")
        assert snapshot.entities["m"].data == {"text": "".join(tokens), "n": 1, "done": True}
        assert snapshot.entities["m"].op is None and snapshot.seq == 3

        async with p.stream("s", "m2", "llm.message", window=0.05) as s2:  # the timer sends what waited
            await s2.append("x")
            await async_wait_until(lambda: s2.publishes == 1, 5.0, "the timer's flush")
        history = await gw.gateway.backend.history("s", since=3)
        assert [(e.op, e.data) for e in history.events] == [("append", {"text": "x"}), (None, {"text": "x"})]


async def test_sync_stream_window_zero_sends_every_append_and_timer_flushes() -> None:
    async with InProcessGateway(Settings()) as gw:
        def run() -> tuple[int, int]:
            with Producer.from_url(gw.http_url) as p:
                with p.stream("y", "m", "llm.message", window=0) as s:
                    for t in ("a", "b", "c"):
                        s.append(t)
                with p.stream("y", "n", "llm.message", window=0.05) as s2:
                    s2.append("z")
                    deadline = time.monotonic() + 5
                    while s2.publishes == 0 and time.monotonic() < deadline:
                        time.sleep(0.005)
                return s.publishes, s2.publishes

        assert await asyncio.to_thread(run) == (3, 1)
        snapshot = await gw.gateway.backend.state("y")
        assert {k: e.data for k, e in snapshot.entities.items()} == {"m": {"text": "abc"}, "n": {"text": "z"}}
        assert snapshot.seq == 3 + 1 + 1 + 1
