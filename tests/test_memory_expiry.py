"""The memory backend forgets as Redis does (issue #13 item 4): records expire with the
history TTL (refreshed on publish), the epoch and seq with the meta hash's longer TTL,
work per operation is bounded, and reads create nothing. A controllable clock stands in
for time.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

import orjson
import pytest

from broadcaster.backend import BackendSettings
from broadcaster.backends import memory
from broadcaster.backends.base import PreparedPublish
from broadcaster.backends.memory import EPOCH_PERIOD, SWEEP_PER_OPERATION, MemoryBackend
from broadcaster.envelope import PublishRequest
from broadcaster.hub import Hub
from broadcaster.profiles import ProfileRegistry
from gateway.settings import Settings
from tests.backend_suite import wait_for
from tests.support.gateway import InProcessGateway
from tests.support.wsclient import WsClient

TTL = 3600
DEFAULT = ProfileRegistry().get("default")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sink:
    def __init__(self) -> None:
        self.objects: list[dict[str, Any]] = []
        self.connection_id = "sink"

    def send(self, data: bytes) -> None:
        self.objects.append(orjson.loads(data))

    def kinds(self) -> list[tuple[str, int | None]]:
        return [(o["type"], o.get("seq")) for o in self.objects]


async def started(clock: Clock, ttl: int = TTL) -> MemoryBackend:
    backend = MemoryBackend(BackendSettings(history_ttl=ttl, unsubscribe_delay=0), clock=clock)
    await backend.start()
    return backend


async def traced() -> int:
    """Memory allocated now, once the fan-out callbacks publishing queued (each holds its event) have run."""
    await asyncio.sleep(0)  # one loop iteration: not a wait for time
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def test_50000_expired_conversations_are_swept_by_operations_and_live_ones_stay() -> None:
    clock = Clock()
    backend = await started(clock)
    tracemalloc.start()
    try:
        baseline = await traced()
        for start in range(0, 50_000, 1000):
            await backend.publish_many([PublishRequest(f"old-{i}", "t.x", {"i": i, "pad": "x" * 100},
                                                       f"id-{i}", "k" if i % 2 else None)
                                        for i in range(start, start + 1000)])
        live = [f"live-{i}" for i in range(100)]
        await backend.publish_many([PublishRequest(c, "t.x", 1) for c in live])
        old_epoch = (await backend.head("old-7")).epoch
        full = await traced() - baseline
        assert backend.records == 50_100

        clock.now += TTL - 10  # live conversations publish again: their TTL is refreshed
        await backend.publish_many([PublishRequest(c, "t.x", 2) for c in live])
        live_published_at = clock.now
        clock.now += 20  # the old ones are past their history TTL, the live ones are not
        operations = 0
        while len(backend._convs) > len(live) and operations <= 50_000 // SWEEP_PER_OPERATION:
            await backend.head(live[operations % len(live)])  # only ordinary operations sweep here
            operations += 1
        assert len(backend._convs) == len(live)  # bounded work per operation, and it keeps up
        numbering_only = await traced() - baseline
        assert backend.records == 50_100  # epoch and seq outlive the data (the meta hash's TTL)
        head = await backend.head("old-7")
        assert (head.epoch, head.seq) == (old_epoch, 1)
        page = await backend.history("old-7", since=0)
        assert (page.events, page.truncated) == ([], True)
        assert (await backend.state("old-8")).entities == {}
        for conv in live:
            page = await backend.history(conv, since=0)
            assert [e.data for e in page.events] == [1, 2]

        published = 2
        while clock.now < 1000 + EPOCH_PERIOD + TTL:  # past the numbering's TTL too; the live ones go on
            clock.now = live_published_at = live_published_at + TTL - 10
            published += 1
            await backend.publish_many([PublishRequest(c, "t.x", published) for c in live])
        backend.sweep()  # what the operations above have not swept yet
        assert backend.records == len(live)
        empty = await traced() - baseline
        head = await backend.head("old-7")
        assert head.seq == 0 and head.epoch != old_epoch  # created again, it would be another epoch
        print(f"\nmemory backend, 50,000 expired conversations + 100 live: {50_100} records before, "
              f"{backend.records} after; traced memory {full / 1e6:.1f} MB with data, "
              f"{numbering_only / 1e6:.1f} MB with epoch and seq only, {empty / 1e6:.2f} MB after the sweep; "
              f"{operations} operations swept the data")
        assert numbering_only < full / 4
        assert empty < full / 50  # what is left: the 100 live conversations
        for conv in live:
            page = await backend.history(conv, since=0)
            assert [e.data for e in page.events] == list(range(1, published + 1))
            assert {e.epoch for e in page.events} == {page.epoch}
    finally:
        tracemalloc.stop()
        await backend.close()


async def test_the_background_sweep_empties_an_idle_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "SWEEP_INTERVAL", 0.01)
    clock = Clock()
    backend = await started(clock, ttl=EPOCH_PERIOD)  # one stage: data and numbering go together
    try:
        await backend.publish_many([PublishRequest(f"c{i}", "t.x", i) for i in range(5000)])
        clock.now += EPOCH_PERIOD + 1
        await wait_for(lambda: backend.records == 0, what="idle records swept")
    finally:
        await backend.close()


async def test_reads_of_unknown_conversations_create_no_record() -> None:
    backend = await started(Clock())
    try:
        reads = (backend.head, backend.history, backend.state)
        answers = [await reads[i % 3](f"nobody-{i}") for i in range(10_000)]
        assert {a.seq for a in answers} == {0}
        assert backend.records == 0
        announced = (await backend.head("first")).epoch
        assert (await backend.history("first")).epoch == (await backend.state("first")).epoch == announced
        assert (await backend.publish("first", "t.x")).epoch == announced  # the first publish adopts it
    finally:
        await backend.close()


async def test_a_feed_open_across_expiry_is_reset_not_silently_skipped() -> None:
    """A subscriber holds (epoch, 3) while the conversation expires; its new seqs 1.. come after a reset."""
    clock = Clock()
    backend = await started(clock)
    hub = Hub(backend, gateway_id="g")
    sink = Sink()
    try:
        await hub.subscribe(sink, "c", DEFAULT)
        for i in range(3):
            await backend.publish("c", "t.x", i)
        await wait_for(lambda: len(sink.objects) == 4, what="events 1..3")
        clock.now += EPOCH_PERIOD + TTL  # everything of "c" expired
        for i in range(2):
            await backend.publish("c", "t.x", i)
        await wait_for(lambda: len(sink.objects) == 7, what="reset and events 1..2 of the new epoch")
        assert sink.kinds() == [("ws.subscribed", 0), ("t.x", 1), ("t.x", 2), ("t.x", 3), ("ws.reset", 0),
                                ("t.x", 1), ("t.x", 2)]
        assert sink.objects[4]["epoch"] != sink.objects[0]["epoch"]
    finally:
        await hub.close()
        await backend.close()


async def test_a_feed_open_while_only_the_events_expired_goes_on_in_its_epoch() -> None:
    """The history expired, the numbering did not: the next publish is seq 4 of the same epoch."""
    clock = Clock()
    backend = await started(clock)
    hub = Hub(backend, gateway_id="g")
    sink = Sink()
    try:
        await hub.subscribe(sink, "c", DEFAULT)
        for i in range(3):
            await backend.publish("c", "t.x", i)
        await wait_for(lambda: len(sink.objects) == 4, what="events 1..3")
        clock.now += TTL + 1
        assert (await backend.history("c", since=0)).events == []
        results = [await backend.publish("c", "t.x", i) for i in range(2)]
        epoch = sink.objects[0]["epoch"]
        assert [(r.seq, r.epoch) for r in results] == [(4, epoch), (5, epoch)]
        await wait_for(lambda: len(sink.objects) == 6, what="events 4..5")
        assert sink.kinds()[4:] == [("t.x", 4), ("t.x", 5)]
    finally:
        await hub.close()
        await backend.close()


async def test_a_subscriber_from_before_the_first_publish_gets_it_without_reset() -> None:
    async with InProcessGateway(Settings()) as gw:
        early = await WsClient.connect(gw.ws_url("conv_id=later&since=0"))
        subscribed = await early.expect("ws.subscribed")
        backend = gw.gateway.backend
        results = [await backend.publish("later", "chat.msg", {"i": i}) for i in range(3)]
        assert {r.epoch for r in results} == {subscribed["epoch"]}
        got = await early.until(lambda objs: len(objs) == 3)
        assert [(o["type"], o.get("seq")) for o in got] == [("chat.msg", 1), ("chat.msg", 2), ("chat.msg", 3)]
        await early.close()
        resumed = await WsClient.connect(gw.ws_url(f"conv_id=later&since=1&epoch={subscribed['epoch']}"))
        got = await resumed.until(lambda objs: len(objs) == 3, keep=lambda o: o["type"] != "ws.hello")
        assert [(o["type"], o.get("seq")) for o in got] == [("ws.subscribed", 3), ("chat.msg", 2), ("chat.msg", 3)]
        await resumed.close()


async def test_a_failed_event_takes_no_seq() -> None:
    backend = await started(Clock())
    try:
        assert (await backend.publish("c", "t.x", 1)).seq == 1
        broken = PreparedPublish("c", "t.x", "bad", None, b"\xc1", 60, True)  # 0xc1: never valid msgpack
        with pytest.raises(ValueError):
            backend._apply(broken)
        assert (await backend.head("c")).seq == 1
        assert (await backend.publish("c", "t.x", 2)).seq == 2
        assert [e.seq for e in (await backend.history("c", since=0)).events] == [1, 2]
    finally:
        await backend.close()


async def test_ids_are_forgotten_with_the_history_ttl() -> None:
    clock = Clock()
    backend = await started(clock)
    try:
        first = await backend.publish("c", "t.x", 1, id="evt")
        clock.now += TTL - 1
        assert (await backend.publish("c", "t.x", 2)).seq == 2  # keeps the conversation alive
        assert (await backend.publish("c", "t.x", 1, id="evt")).duplicate
        clock.now += 2  # the id's TTL ran from its first publish (a duplicate does not extend it)
        again = await backend.publish("c", "t.x", 1, id="evt")
        assert (again.duplicate, again.seq, again.epoch) == (False, 3, first.epoch)
        assert len(backend._convs["c"].ids) <= 2
    finally:
        await backend.close()


async def test_the_sweeper_task_stops_with_the_backend() -> None:
    backend = await started(Clock())
    await backend.close()
    await backend.start()
    await backend.close()
    assert backend._sweeper is None
