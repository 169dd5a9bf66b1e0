"""The behaviour every backend owes the hub (broadcaster.backend), as one reusable test class.

``tests/test_backends.py`` runs :class:`BackendSuite` on the memory backend, on
RedisBackend over fakeredis, and on RedisBackend over the real local Redis. A test
gets a :class:`Harness` (fixture ``harness``) and builds the backends it needs with
``await harness.make(settings)``; the harness starts them and closes them after the
test, and for Redis kinds uses a key prefix of its own and deletes its keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest

from broadcaster.backend import Backend, BackendSettings
from broadcaster.envelope import Envelope, PublishRequest
from broadcaster.errors import PayloadTooLarge, ValidationError

REDIS_URL = "redis://127.0.0.1:6379/0"
KINDS = ("memory", "fakeredis", "redis")


class Harness:
    """Builds started backends of one kind and cleans up after them."""

    def __init__(self, kind: str, redis_url: str = REDIS_URL) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.prefix = "t" + secrets.token_hex(6)
        self.backends: list[Backend] = []
        self._fake_server: Any = None

    async def make(self, settings: BackendSettings | None = None, **options: Any) -> Backend:
        """A started backend; every backend of one harness shares the same storage."""
        settings = settings or BackendSettings(unsubscribe_delay=0)
        backend: Backend
        if self.kind == "memory":
            from broadcaster.backends.memory import MemoryBackend

            if self.backends:  # the embedded backend cannot share storage across instances
                return self.backends[0]
            backend = MemoryBackend(settings)
        elif self.kind == "fakeredis":
            import fakeredis

            from broadcaster.backends.redis import RedisBackend

            if self._fake_server is None:
                self._fake_server = fakeredis.FakeServer()
            client = fakeredis.FakeAsyncRedis(server=self._fake_server)
            backend = RedisBackend.from_client(client, key_prefix=self.prefix, settings=settings, **options)
        elif self.kind == "redis":
            from broadcaster.backends.redis import RedisBackend

            backend = RedisBackend(self.redis_url, key_prefix=self.prefix, settings=settings, **options)
        else:
            raise ValueError(self.kind)
        await backend.start()
        self.backends.append(backend)
        return backend

    async def stored_keys(self) -> list[bytes] | None:
        """Keys under this harness' prefix (Redis kinds), or None for the memory backend."""
        if self.kind == "memory":
            return None
        backend = self.backends[0]
        client = backend.commands.client  # type: ignore[attr-defined]
        return sorted([k async for k in client.scan_iter(match=f"{self.prefix}:*")])

    async def close(self) -> None:
        for backend in self.backends:
            if self.kind == "redis":
                with contextlib.suppress(Exception):
                    client = backend.commands.client  # type: ignore[attr-defined]
                    keys = [k async for k in client.scan_iter(match=f"{self.prefix}:*", count=1000)]
                    if keys:
                        await client.delete(*keys)
            await backend.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``condition`` until true; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.005)


def seqs(events: list[Envelope]) -> list[int]:
    return [e.seq for e in events]


class BackendSuite:
    """Behavioural tests; subclasses provide a ``harness`` fixture."""

    # -- numbering --

    async def test_seq_counts_from_one(self, harness: Harness) -> None:
        b = await harness.make()
        results = [await b.publish("c1", "t.x", {"i": i}) for i in range(5)]
        assert [r.seq for r in results] == [1, 2, 3, 4, 5]
        assert len({r.epoch for r in results}) == 1
        assert all(not r.duplicate and r.conv_id == "c1" for r in results)
        other = await b.publish("c2", "t.x")
        assert other.seq == 1

    async def test_concurrent_producers_get_gapless_seqs(self, harness: Harness) -> None:
        b = await harness.make()
        producers, per_producer = 20, 10

        async def produce(p: int) -> list[int]:
            return [(await b.publish("hot", "t.x", {"p": p, "i": i})).seq for i in range(per_producer)]

        per = await asyncio.gather(*(produce(p) for p in range(producers)))
        total = producers * per_producer
        assert sorted(s for chunk in per for s in chunk) == list(range(1, total + 1))
        for chunk in per:  # each producer's own publishes are numbered in its order
            assert chunk == sorted(chunk)
        page = await b.history("hot", 0)
        assert seqs(page.events) == list(range(1, total + 1))

    async def test_publish_many_keeps_order(self, harness: Harness) -> None:
        b = await harness.make()
        requests = [PublishRequest("a" if i % 2 else "b", "t.x", i) for i in range(10)]
        results = await b.publish_many(requests)
        assert [r.conv_id for r in results] == [r.conv for r in requests]
        assert [r.seq for r in results if r.conv_id == "b"] == [1, 2, 3, 4, 5]
        assert [r.seq for r in results if r.conv_id == "a"] == [1, 2, 3, 4, 5]
        page = await b.history("b", 0)
        assert [e.data for e in page.events] == [0, 2, 4, 6, 8]
        assert await b.publish_many([]) == []

    async def test_head_creates_and_keeps_the_epoch(self, harness: Harness) -> None:
        b = await harness.make()
        first = await b.head("fresh")
        assert first.seq == 0 and first.epoch
        assert await b.head("fresh") == first
        result = await b.publish("fresh", "t.x")
        assert (result.seq, result.epoch) == (1, first.epoch)
        assert await b.head("fresh") == type(first)(first.epoch, 1)

    # -- idempotency --

    async def test_republishing_an_id_is_a_silent_duplicate(self, harness: Harness) -> None:
        b = await harness.make()
        got: list[Envelope] = []
        await b.subscribe("c", got.append)
        first = await b.publish("c", "t.x", {"v": 1}, id="evt-1")
        again = await b.publish("c", "t.x", {"v": 2}, id="evt-1")
        assert not first.duplicate
        assert again.duplicate and (again.seq, again.id, again.epoch) == (first.seq, "evt-1", first.epoch)
        sentinel = await b.publish("c", "t.x", {"v": 3})
        await wait_for(lambda: len(got) >= 2, what="sentinel delivered")
        assert seqs(got) == [first.seq, sentinel.seq] == [1, 2]
        page = await b.history("c", 0)
        assert [e.data for e in page.events] == [{"v": 1}, {"v": 3}]
        many = await b.publish_many([PublishRequest("c", "t.x", None, "evt-1"), PublishRequest("c", "t.x", 0, "evt-4")])
        assert [(r.seq, r.duplicate) for r in many] == [(1, True), (3, False)]

    # -- history --

    async def test_history_since_and_limit(self, harness: Harness) -> None:
        b = await harness.make()
        await b.publish_many([PublishRequest("h", "t.x", i) for i in range(1, 11)])
        page = await b.history("h", 4)
        assert seqs(page.events) == [5, 6, 7, 8, 9, 10] and page.seq == 10 and not page.truncated
        assert [e.data for e in page.events] == [5, 6, 7, 8, 9, 10]
        limited = await b.history("h", 4, limit=3)
        assert seqs(limited.events) == [5, 6, 7] and not limited.truncated
        assert (await b.history("h", 10)).events == []
        assert not (await b.history("h", 10)).truncated
        empty = await b.history("never", 0)
        assert (empty.seq, empty.events, empty.truncated) == (0, [], False)
        event = page.events[0]
        assert (event.conv, event.type, event.epoch) == ("h", "t.x", page.epoch)
        assert isinstance(event.ts, int) and abs(event.ts - time.time() * 1000) < 60_000

    async def test_history_is_truncated_beyond_history_size(self, harness: Harness) -> None:
        size = 5
        b = await harness.make(BackendSettings(history_size=size, unsubscribe_delay=0))
        # Redis trims approximately (XADD MAXLEN ~: whole stream nodes of 100
        # entries), so publish enough to drop at least two nodes.
        total = size + 250
        for start in range(0, total, 50):
            await b.publish_many([PublishRequest("t", "t.x", i) for i in range(start, min(start + 50, total))])
        page = await b.history("t", 0)
        assert page.truncated and page.seq == total
        kept = seqs(page.events)
        assert len(kept) >= size and kept[0] > 1
        assert kept == list(range(kept[0], total + 1))
        assert not (await b.history("t", kept[0] - 1)).truncated
        assert (await b.history("t", kept[0] - 2)).truncated
        tail = await b.history("t", total - 3)
        assert seqs(tail.events) == [total - 2, total - 1, total] and not tail.truncated

    # -- state --

    async def test_state_upsert_delete_and_consistency(self, harness: Harness) -> None:
        b = await harness.make()
        await b.publish("s", "timeline.msg", {"text": "a"}, key="m1")
        await b.publish("s", "timeline.msg", {"text": "b"}, key="m2")
        await b.publish("s", "llm.delta", {"text": "not state"})
        await b.publish("s", "timeline.msg", {"text": "a2"}, key="m1")
        snap = await b.state("s")
        assert snap.seq == 4 and snap.seq == (await b.head("s")).seq
        assert {k: e.data for k, e in snap.entities.items()} == {"m1": {"text": "a2"}, "m2": {"text": "b"}}
        assert snap.entities["m1"].seq == 4 and snap.entities["m1"].key == "m1"
        deleted = await b.publish("s", "timeline.delete", None, key="m2")
        snap = await b.state("s")
        assert set(snap.entities) == {"m1"} and snap.seq == deleted.seq == 5
        assert (await b.history("s", 4)).events[0].key == "m2"  # the delete is an event too
        assert (await b.state("nothing")).entities == {}

    async def test_state_cap_evicts_the_oldest_updated(self, harness: Harness) -> None:
        b = await harness.make(BackendSettings(state_max_entries=3, unsubscribe_delay=0))
        for key in ("a", "b", "c"):
            assert (await b.publish("cap", "t.x", key, key=key)).evicted == 0
        assert (await b.publish("cap", "t.x", "b2", key="b")).evicted == 0  # b is now the newest
        assert (await b.publish("cap", "t.x", "d", key="d")).evicted == 1  # evicts a
        assert set((await b.state("cap")).entities) == {"b", "c", "d"}
        assert (await b.publish("cap", "t.x", "e", key="e")).evicted == 1  # evicts c
        snap = await b.state("cap")
        assert {k: e.data for k, e in snap.entities.items()} == {"b": "b2", "d": "d", "e": "e"}
        assert b.stats.state_evictions == 2

    # -- presence --

    async def test_presence_report_read_and_expiry(self, harness: Harness) -> None:
        b = await harness.make()
        await b.report_presence("gw1", {"p": {"default": 2, "debug": 1}, "q": {"default": 1}}, ttl=30)
        # gw2's report must still be alive when read right after (a loaded box may stall a while), and
        # expire soon after: 1.5 s either way.
        await b.report_presence("gw2", {"p": {"default": 3}}, ttl=1.5)
        presence = await b.presence("p")
        assert (presence.connections, presence.by_profile) == (6, {"default": 5, "debug": 1})
        assert (await b.presence("q")).connections == 1
        assert (await b.presence("nobody")).connections == 0
        await b.report_presence("gw1", {"p": {"debug": 0}}, ttl=30)  # zero removes the entry
        deadline = time.monotonic() + 15
        while (presence := await b.presence("p")).connections != 2:  # gw2's report expires
            assert time.monotonic() < deadline, f"presence never expired: {presence}"
            await asyncio.sleep(0.02)
        assert presence.by_profile == {"default": 2}

    # -- live delivery --

    async def test_subscribe_delivers_in_order(self, harness: Harness) -> None:
        b = await harness.make()
        got: list[Envelope] = []
        await b.subscribe("live", got.append)
        assert b.connected
        sent = await b.publish_many([PublishRequest("live", "t.x", {"i": i}) for i in range(50)])
        for i in range(50, 60):
            sent.append(await b.publish("live", "t.x", {"i": i}, key="k" if i == 55 else None))
        await wait_for(lambda: len(got) >= 60, what="60 events delivered")
        assert seqs(got) == [r.seq for r in sent] == list(range(1, 61))
        assert [e.data["i"] for e in got] == list(range(60))
        assert got[55].key == "k" and got[54].key is None and got[0].epoch == sent[0].epoch and got[0].id == sent[0].id

    async def test_subscribers_of_other_backends_receive(self, harness: Harness) -> None:
        a, b = await harness.make(), await harness.make()
        got: list[Envelope] = []
        await b.subscribe("x", got.append)
        await a.publish("x", "t.x", 1)
        await wait_for(lambda: len(got) == 1, what="delivery across instances")

    async def test_unsubscribe_stops_delivery(self, harness: Harness) -> None:
        b = await harness.make()
        gone: list[Envelope] = []
        staying: list[Envelope] = []
        await b.subscribe("u", gone.append)
        await b.subscribe("u", staying.append)
        await b.publish("u", "t.x", 1)
        await wait_for(lambda: len(gone) == 1 and len(staying) == 1, what="first event")
        await b.unsubscribe("u", gone.append)
        await b.publish("u", "t.x", 2)
        await wait_for(lambda: len(staying) == 2, what="second event to the remaining listener")
        assert seqs(gone) == [1]
        await b.unsubscribe("u", staying.append)
        await b.unsubscribe("u", staying.append)  # unknown listener: no-op
        await b.subscribe("u", gone.append)  # resubscribing works after the channel was dropped
        await b.publish("u", "t.x", 3)
        await wait_for(lambda: len(gone) == 2, what="event after resubscribe")
        assert seqs(gone) == [1, 3]

    async def test_failing_listener_does_not_stop_others(self, harness: Harness) -> None:
        b = await harness.make()
        got: list[Envelope] = []

        def broken(env: Envelope) -> None:
            raise RuntimeError("boom")

        await b.subscribe("f", broken)
        await b.subscribe("f", got.append)
        await b.publish("f", "t.x", 1)
        await b.publish("f", "t.x", 2)
        await wait_for(lambda: len(got) == 2, what="both events despite a failing listener")

    # -- validation --

    @pytest.mark.parametrize(
        ("conv", "etype", "data", "options", "error"),
        [
            ("bad conv", "t.x", 1, {}, ValidationError),
            ("", "t.x", 1, {}, ValidationError),
            ("x" * 129, "t.x", 1, {}, ValidationError),
            ("c{1}", "t.x", 1, {}, ValidationError),
            ("ok", "ws.hello", 1, {}, ValidationError),
            ("ok", "bad type", 1, {}, ValidationError),
            ("ok", "t.x", b"bytes", {}, ValidationError),
            ("ok", "t.x", {1, 2}, {}, ValidationError),
            ("ok", "t.x", {1: "int key"}, {}, ValidationError),
            ("ok", "t.x", object(), {}, ValidationError),
            ("ok", "t.x", "x" * 2048, {}, PayloadTooLarge),
            ("ok", "t.x", 1, {"id": "has space"}, ValidationError),
            ("ok", "t.x", 1, {"id": ""}, ValidationError),
            ("ok", "t.x", 1, {"key": "bad key!"}, ValidationError),
        ],
    )
    async def test_bad_input_is_refused_before_storage(
        self, harness: Harness, conv: str, etype: str, data: Any, options: dict[str, Any], error: type[Exception]
    ) -> None:
        b = await harness.make(BackendSettings(max_data_bytes=1024, unsubscribe_delay=0))
        with pytest.raises(error):
            await b.publish(conv, etype, data, **options)
        with pytest.raises(error):  # one bad request stops the whole batch
            await b.publish_many([PublishRequest("ok", "t.x", 1), PublishRequest(conv, etype, data, **options)])
        keys = await harness.stored_keys()
        assert keys in (None, []), keys
        assert (await b.head("ok")).seq == 0
