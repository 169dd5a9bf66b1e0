"""Resumes read history in batches: many clients resuming at once share a few backend calls.

The backend's ``history`` and ``history_many`` are wrapped (instance attributes) to count
the calls the hub makes and to hold batches at chosen moments. Every resumer must still
get exactly ``ws.subscribed``, the events after its ``since`` and the live ones, once each,
in order - including the live events published while its history read was held.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar

import pytest

from broadcaster.backend import Backend, BackendSettings, HistoryPage, HistoryRead
from broadcaster.backends.memory import MemoryBackend
from broadcaster.backends.redis import RedisBackend
from broadcaster.errors import BackendUnavailable
from broadcaster.hub import Hub
from broadcaster.profiles import ProfileRegistry
from tests.support.polling import async_wait_until
from tests.support.sink import Sink

pytestmark = pytest.mark.timeout(60)

_profile = ProfileRegistry().get("default")
assert _profile is not None
DEFAULT = _profile

_IN_BATCH: ContextVar[bool] = ContextVar("in_batch", default=False)


class Reads:
    """Counts a backend's history calls: ``single`` (``history`` called directly) and ``batches``
    (the size of each ``history_many``). ``hold`` (an Event, set = open) holds every batch, and
    ``held_convs`` the batches reading one of those conversations; ``fail`` fails every batch."""

    def __init__(self, backend: Backend) -> None:
        self.single = 0
        self.batches: list[int] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.held_convs: set[str] = set()
        self.unheld = asyncio.Event()
        self.fail = False
        one, many = backend.history, backend.history_many

        async def history(conv: str, since: int = 0, limit: int | None = None) -> HistoryPage:
            if not _IN_BATCH.get():
                self.single += 1
            return await one(conv, since, limit)

        async def history_many(reads: Sequence[HistoryRead]) -> list[HistoryPage]:
            self.batches.append(len(reads))
            await self.hold.wait()
            if self.held_convs & {read.conv for read in reads}:
                await self.unheld.wait()
            if self.fail:
                raise BackendUnavailable("injected: history unavailable")
            token = _IN_BATCH.set(True)  # the default history_many calls self.history per read
            try:
                return await many(reads)
            finally:
                _IN_BATCH.reset(token)

        backend.history = history  # type: ignore[method-assign]
        backend.history_many = history_many  # type: ignore[method-assign]




@contextlib.asynccontextmanager
async def backend_of(kind: str, redis_url: str, key_prefix: str) -> AsyncIterator[Backend]:
    settings = BackendSettings(history_ttl=600)
    backend: Backend = (MemoryBackend(settings=settings) if kind == "memory"
                        else RedisBackend(redis_url, key_prefix=key_prefix, settings=settings))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def publish(backend: Backend, conv: str, count: int) -> None:
    for i in range(count):
        await backend.publish(conv, "chat.msg", {"i": i})


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_many_concurrent_resumes_share_a_few_batched_reads_and_get_exactly_their_events(
        kind: str, redis_url: str, key_prefix: str) -> None:
    convs, per_conv, before, during, after = 20, 10, 30, 5, 2
    async with backend_of(kind, redis_url, key_prefix) as backend:
        hub = Hub(backend, gateway_id="g")
        watchers = {conv: Sink(f"w-{conv}") for conv in (f"c{i}" for i in range(convs))}
        for conv, watcher in watchers.items():  # the feeds stay open and live
            await hub.subscribe(watcher, conv, DEFAULT)
            await publish(backend, conv, before)
        await async_wait_until(lambda: all(len(w.seqs) == before for w in watchers.values()), timeout=10,
                               message="the watchers got 1..30 live")
        reads = Reads(backend)
        reads.hold.clear()
        rng = random.Random(7)
        resumers = [(Sink(f"r{n}"), conv, rng.randrange(0, before)) for n, conv in
                    enumerate(c for c in watchers for _ in range(per_conv))]
        tasks = [asyncio.create_task(hub.subscribe(sink, conv, DEFAULT, since=since))
                 for sink, conv, since in resumers]
        total = len(resumers)
        await async_wait_until(lambda: sum(reads.batches) == total, timeout=10,
                               message=f"the {total} resume reads to reach the backend")
        for conv in watchers:  # live events while every resume's history read is held
            await publish(backend, conv, during)
        await async_wait_until(lambda: all(len(w.seqs) == before + during for w in watchers.values()),
                               timeout=10, message="the watchers got 31..35 live")
        reads.hold.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
        for conv in watchers:
            await publish(backend, conv, after)
        last = before + during + after
        await async_wait_until(lambda: all(s.seqs[-1:] == [last] for s, _, _ in resumers), timeout=10,
                               message="every resumer to reach the last seq")

        assert reads.single == 0, "a resume read history outside a batch"
        assert len(reads.batches) <= 8, reads.batches  # 200 reads: 4 batches of 50 (4 at a time)
        for sink, conv, since in resumers:
            first = sink.objects[0]
            assert first["type"] == "ws.subscribed" and first["seq"] == before, first
            assert sink.seqs == list(range(since + 1, last + 1)), (conv, since)
            assert not [o for o in sink.objects[1:] if o["type"].startswith("ws.")]
        await hub.close()


async def test_resumes_do_not_wait_behind_a_repair_that_holds_every_repair_read() -> None:
    async with backend_of("memory", "", "") as backend:
        hub = Hub(backend, gateway_id="g", repair_concurrency=1)
        stuck, free = Sink("stuck"), Sink("free")
        await hub.subscribe(stuck, "stuck", DEFAULT)
        await publish(backend, "free", 3)
        reads = Reads(backend)
        reads.held_convs.add("stuck")
        await hub.repair(["stuck"])  # its read is held: the one repair batch allowed is busy
        await async_wait_until(lambda: reads.batches == [1], timeout=5, message="the repair read held")
        await asyncio.wait_for(hub.subscribe(free, "free", DEFAULT, since=0), timeout=5)
        assert free.seqs == [1, 2, 3]
        assert reads.single == 0
        reads.unheld.set()
        await hub.close()


async def test_a_failed_batch_fails_each_resume_in_it_and_registers_none() -> None:
    async with backend_of("memory", "", "") as backend:
        hub = Hub(backend, gateway_id="g")
        watcher = Sink("w")
        await hub.subscribe(watcher, "c", DEFAULT)
        await publish(backend, "c", 5)
        reads = Reads(backend)
        reads.fail = True
        results = await asyncio.gather(*(hub.subscribe(Sink(f"r{n}"), "c", DEFAULT, since=n) for n in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, BackendUnavailable) for r in results), results
        assert hub.presence_counts("c") == {"default": 1}  # only the watcher
        reads.fail = False
        again = Sink("again")
        await hub.subscribe(again, "c", DEFAULT, since=2)
        assert again.seqs == [3, 4, 5]
        await hub.close()


async def test_close_ends_a_resume_whose_batched_read_is_in_flight() -> None:
    async with backend_of("memory", "", "") as backend:
        hub = Hub(backend, gateway_id="g")
        await hub.subscribe(Sink("w"), "c", DEFAULT)
        await publish(backend, "c", 2)
        reads = Reads(backend)
        reads.hold.clear()
        resuming = asyncio.create_task(hub.subscribe(Sink("r"), "c", DEFAULT, since=0))
        await async_wait_until(lambda: reads.batches == [1], timeout=5, message="the resume read held")
        await asyncio.wait_for(hub.close(), timeout=5)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(resuming, timeout=5)
