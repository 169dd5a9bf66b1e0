"""The hub's live-group fast path (broadcaster.hub ``_Live``): a group whose members are all live in one
epoch gets each event through their cached sends, without a look at each member; anything that changes a
member (join, leave, going live, a reset) makes the group be looked at again. On the memory backend, with
hub-level subscribers (tests.support.sink): every check is the exact list of seqs received."""

from __future__ import annotations

from typing import Any

import pytest

from broadcaster.backend import BackendSettings
from broadcaster.backends.memory import MemoryBackend
from broadcaster.codec import decode_envelope, encode_envelope
from broadcaster.envelope import Envelope, PublishRequest, make_envelope
from broadcaster.hub import NOT_LIVE, Hub
from broadcaster.profiles import ProfileRegistry
from tests.support.polling import async_wait_until
from tests.support.sink import Sink

pytestmark = pytest.mark.timeout(30)

DEFAULT = ProfileRegistry().get("default")
assert DEFAULT is not None


class EventSink(Sink):
    """A subscriber with ``send_event`` (as an SSE stream has): the hub tells it each event's type and seq."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.told: list[tuple[str, int]] = []

    def send_event(self, data: bytes, kind: str, seq: int, epoch: str) -> None:
        self.told.append((kind, seq))
        self.send(data)


async def publish(backend: MemoryBackend, conv: str, count: int) -> int:
    """Publish ``count`` events to ``conv``; the last seq."""
    results = await backend.publish_many([PublishRequest(conv, "chat.message", {"i": i}) for i in range(count)])
    return results[-1].seq


async def received(sinks: list[Sink], last: int) -> None:
    await async_wait_until(lambda: all(s.seqs and s.seqs[-1] >= last for s in sinks), timeout=5)


@pytest.fixture
async def hub() -> Any:
    backend = MemoryBackend(BackendSettings(unsubscribe_delay=0))
    await backend.start()
    hub = Hub(backend, gateway_id="gw-test")
    yield hub
    await hub.close()
    await backend.close()


async def test_live_group_gets_every_event_once_through_the_fast_path(hub: Hub) -> None:
    sinks = [Sink(f"s{i}") for i in range(3)] + [EventSink("e")]
    for sink in sinks:
        await hub.subscribe(sink, "c", DEFAULT)
    last = await publish(hub.backend, "c", 5)  # type: ignore[arg-type]
    await received(sinks, last)
    group = next(iter(hub._feeds["c"].groups.values()))
    assert group.live is not None and group.live is not NOT_LIVE
    assert len(group.live.sends) == 3 and len(group.live.event_sends) == 1
    assert all(s.seqs == [1, 2, 3, 4, 5] for s in sinks)
    assert sinks[-1].told == [("chat.message", seq) for seq in range(1, 6)]  # type: ignore[attr-defined]
    assert hub.stats.deliveries == 20


async def test_member_joining_a_live_group_resumes_without_gap_or_duplicate(hub: Hub) -> None:
    first = Sink("first")
    await hub.subscribe(first, "c", DEFAULT)
    await publish(hub.backend, "c", 3)  # type: ignore[arg-type]
    await received([first], 3)
    late = Sink("late")
    await hub.subscribe(late, "c", DEFAULT, since=1)
    last = await publish(hub.backend, "c", 3)  # type: ignore[arg-type]
    await received([first, late], last)
    assert first.seqs == [1, 2, 3, 4, 5, 6]
    assert late.seqs == [2, 3, 4, 5, 6]


async def test_member_ahead_of_the_feed_gets_nothing_it_has(hub: Hub) -> None:
    """A client that says it has seq 4 when the feed is at 0: the others get 1-4, it gets 5 on; the group
    goes back to the fast path once past it."""
    steady, ahead = Sink("steady"), Sink("ahead")
    await hub.subscribe(steady, "c", DEFAULT)
    await hub.subscribe(ahead, "c", DEFAULT, since=4)
    last = await publish(hub.backend, "c", 6)  # type: ignore[arg-type]
    await received([steady, ahead], last)
    assert steady.seqs == [1, 2, 3, 4, 5, 6]
    assert ahead.seqs == [5, 6]


async def test_member_that_left_gets_nothing_more(hub: Hub) -> None:
    stay, leave = Sink("stay"), Sink("leave")
    await hub.subscribe(stay, "c", DEFAULT)
    await hub.subscribe(leave, "c", DEFAULT)
    await publish(hub.backend, "c", 2)  # type: ignore[arg-type]
    await received([stay, leave], 2)
    assert await hub.unsubscribe(leave, "c")
    last = await publish(hub.backend, "c", 2)  # type: ignore[arg-type]
    await received([stay], last)
    assert stay.seqs == [1, 2, 3, 4]
    assert leave.seqs == [1, 2]


async def test_reset_to_a_new_epoch_reaches_the_live_group(hub: Hub) -> None:
    """Events of an epoch the members were not told are not sent (the fast path checks the epoch), and after
    the feed's reset they get the new epoch's events."""
    sinks = [Sink("a"), Sink("b")]
    for sink in sinks:
        await hub.subscribe(sink, "c", DEFAULT)
    await publish(hub.backend, "c", 2)  # type: ignore[arg-type]
    await received(sinks, 2)
    feed = hub._feeds["c"]
    stranger = make_envelope("c", 3, "x", "chat.message", 0, {}, "another-epoch")
    hub._on_envelope(feed, stranger)  # another epoch: the feed repairs from history, which is still its own
    last = await publish(hub.backend, "c", 1)  # type: ignore[arg-type]
    await received(sinks, last)
    assert all(s.seqs == [1, 2, 3] for s in sinks)
    epoch = feed.epoch
    hub._broadcast_reset(feed, "epoch_changed", "new-epoch", 0)
    feed.epoch, feed.last_seq = "new-epoch", 0
    hub._on_envelope(feed, make_envelope("c", 1, "n1", "chat.message", 0, {}, "new-epoch"))
    hub._on_envelope(feed, make_envelope("c", 2, "n2", "chat.message", 0, {}, epoch))  # old epoch: dropped
    for sink in sinks:
        assert [o["type"] for o in sink.objects[-2:]] == ["ws.reset", "chat.message"]
        assert sink.seqs == [1, 2, 3, 1]


def test_make_envelope_is_the_dataclass() -> None:
    args = ("c", 3, "id-1", "chat.message", 17, "text", "ep", "k", "append")
    made, built = make_envelope(*args), Envelope(*args)
    assert made == built and hash(made) == hash(built) and repr(made) == repr(built)
    assert decode_envelope(encode_envelope(built)) == built
    assert type(decode_envelope(encode_envelope(built))) is Envelope
    with pytest.raises(AttributeError):
        made.seq = 4  # type: ignore[misc]
