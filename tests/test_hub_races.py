"""Scripted interleavings: a resume whose history read is paused while the epoch changes,
and a re-subscribe the backend refuses.

The backend here is a small scripted one with a gate on history reads: the test decides
when a read computes its answer, so the order of events is the test's, not the
scheduler's.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest

from broadcaster.backend import (
    Backend,
    BackendSettings,
    BackendStats,
    Head,
    HistoryPage,
    Listener,
    Presence,
    ReconnectCallback,
    StateSnapshot,
)
from broadcaster.envelope import Envelope, PublishRequest, PublishResult
from broadcaster.errors import BackendUnavailable
from broadcaster.hub import Hub
from broadcaster.profiles import ProfileRegistry
from gateway.settings import Settings
from tests.support.gateway import InProcessGateway
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)

_default = ProfileRegistry().get("default")
assert _default is not None
DEFAULT = _default


async def poll(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class GatedBackend(Backend):
    """A small in-memory backend written for these scripts (no expiry, no state, no ids kept).

    ``gate_next_history()`` (``gate_next_state()``) makes the next history (state) read
    wait for ``open_gate()`` before it computes its answer (so it sees whatever happened
    meanwhile). ``lose(conv)`` drops a
    conversation and starts a new epoch for it (Redis restarted empty). ``fail_subscribes``:
    that many subscribes fail with BackendUnavailable. Live events reach listeners on the
    next loop iteration, as over pub/sub.
    """

    def __init__(self) -> None:
        self.settings = BackendSettings(unsubscribe_delay=0)
        self.stats = BackendStats()
        self._epochs: dict[str, str] = {}
        self._logs: dict[str, list[Envelope]] = {}
        self._listeners: dict[str, list[Listener]] = {}
        self._gate: asyncio.Event | None = None
        self._state_gate: asyncio.Event | None = None
        self._held: asyncio.Event | None = None
        self.gated_read_waiting = asyncio.Event()
        self.fail_subscribes = 0

    def gate_next_history(self) -> None:
        self._gate = self._held = asyncio.Event()

    def gate_next_state(self) -> None:
        self._state_gate = self._held = asyncio.Event()

    def open_gate(self) -> None:
        assert self._held is not None
        self._held.set()

    def lose(self, conv: str) -> None:
        self._epochs[conv] = secrets.token_hex(6)
        self._logs[conv] = []

    def _epoch(self, conv: str) -> str:
        return self._epochs.setdefault(conv, secrets.token_hex(6))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._listeners.clear()

    @property
    def connected(self) -> bool:
        return True

    async def ping(self) -> bool:
        return True

    async def publish(self, conv: str, type: str, data: Any = None, *, id: str | None = None,
                      key: str | None = None) -> PublishResult:
        return (await self.publish_many([PublishRequest(conv, type, data, id, key)]))[0]

    async def publish_many(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        results = []
        loop = asyncio.get_running_loop()
        for r in requests:
            log = self._logs.setdefault(r.conv, [])
            env = Envelope(r.conv, len(log) + 1, r.id or secrets.token_hex(8), r.type, int(time.time() * 1000),
                           r.data, self._epoch(r.conv))
            log.append(env)
            for listener in list(self._listeners.get(r.conv, [])):
                loop.call_soon(listener, env)
            results.append(PublishResult(r.conv, env.seq, env.id, env.epoch))
        return results

    async def subscribe(self, conv: str, listener: Listener) -> None:
        if self.fail_subscribes > 0:
            self.fail_subscribes -= 1
            raise BackendUnavailable("injected: subscribe refused")
        self._listeners.setdefault(conv, []).append(listener)

    async def unsubscribe(self, conv: str, listener: Listener) -> None:
        listeners = self._listeners.get(conv, [])
        if listener in listeners:
            listeners.remove(listener)

    def add_reconnect_callback(self, callback: ReconnectCallback) -> None:
        return None

    async def head(self, conv: str) -> Head:
        return Head(self._epoch(conv), len(self._logs.get(conv, [])))

    async def history(self, conv: str, since: int = 0, limit: int | None = None) -> HistoryPage:
        gate, self._gate = self._gate, None
        if gate is not None:
            self.gated_read_waiting.set()
            await gate.wait()
        log = self._logs.get(conv, [])
        events = [e for e in log if e.seq > since][:limit]
        return HistoryPage(self._epoch(conv), len(log), events, False)

    async def state(self, conv: str) -> StateSnapshot:
        gate, self._state_gate = self._state_gate, None
        if gate is not None:
            self.gated_read_waiting.set()
            await gate.wait()
        return StateSnapshot(self._epoch(conv), len(self._logs.get(conv, [])), {})

    async def report_presence(self, gateway_id: str, counts: Mapping[str, Mapping[str, int]], ttl: float) -> None:
        return None

    async def presence(self, conv: str) -> Presence:
        return Presence(0)


class Recorder:
    """A subscriber that keeps every object it is sent, decoded."""

    def __init__(self) -> None:
        self.connection_id = "rec"
        self.objects: list[dict[str, Any]] = []

    def send(self, data: bytes) -> None:
        self.objects.append(json.loads(data))


@pytest.fixture
async def backend() -> AsyncIterator[GatedBackend]:
    b = GatedBackend()
    await b.start()
    yield b
    await b.close()


async def publish(backend: GatedBackend, conv: str, n: int, epochs: dict[str, str]) -> None:
    for i in range(n):
        result = await backend.publish(conv, "chat.msg", {"i": i})
        epochs[result.id] = result.epoch


def script(objects: list[dict[str, Any]], epochs: dict[str, str]) -> list[tuple[str, str, int]]:
    """What the client saw as (type, epoch, seq): the epoch of an event is the one it was published in."""
    return [(o["type"], o["epoch"] if o["type"].startswith("ws.") else epochs[o["id"]], o["seq"]) for o in objects]


def never_an_untold_epoch(seen: list[tuple[str, str, int]]) -> None:
    told = None
    for kind, epoch, _ in seen:
        if kind in ("ws.subscribed", "ws.reset", "ws.state"):
            told = epoch
        else:
            assert epoch == told, f"an event of epoch {epoch} reached a client told {told}: {seen}"


async def test_epoch_changes_and_new_epoch_events_arrive_while_the_replay_read_is_paused(
        backend: GatedBackend) -> None:
    """The replay's read answers from the new epoch after the feed moved there: reset first, then its events."""
    hub = Hub(backend, gateway_id="g")
    epochs: dict[str, str] = {}
    watcher = Recorder()
    await hub.subscribe(watcher, "c", DEFAULT)  # keeps the feed open
    await publish(backend, "c", 3, epochs)
    await poll(lambda: len(watcher.objects) == 4, "1..3 live")
    old = watcher.objects[0]["epoch"]

    backend.gate_next_history()
    rec = Recorder()
    resume = asyncio.create_task(hub.subscribe(rec, "c", DEFAULT, since=1))
    await asyncio.wait_for(backend.gated_read_waiting.wait(), 5)
    backend.lose("c")
    await publish(backend, "c", 2, epochs)  # 1, 2 of a new epoch, live: the feed repairs and resets
    await poll(lambda: hub.stats.resets == 1 and len(watcher.objects) == 7, "the feed moved to the new epoch")
    new = watcher.objects[4]["epoch"]
    assert new != old
    backend.open_gate()
    await asyncio.wait_for(resume, 5)

    seen = script(rec.objects, epochs)
    assert seen == [("ws.subscribed", old, 3), ("ws.reset", new, 0), ("chat.msg", new, 1), ("chat.msg", new, 2)]
    assert rec.objects[1]["reason"] == "epoch_changed"
    await publish(backend, "c", 1, epochs)
    await poll(lambda: len(rec.objects) == 5, "live 3 of the new epoch")
    assert script(rec.objects, epochs)[-1] == ("chat.msg", new, 3)
    never_an_untold_epoch(script(rec.objects, epochs))
    await hub.close()


async def test_replay_read_answered_in_the_old_epoch_then_the_reset(backend: GatedBackend) -> None:
    """The read is answered before the change: the old epoch's events, then the reset, then the new ones."""
    hub = Hub(backend, gateway_id="g")
    epochs: dict[str, str] = {}
    watcher = Recorder()
    await hub.subscribe(watcher, "c", DEFAULT)
    await publish(backend, "c", 3, epochs)
    await poll(lambda: len(watcher.objects) == 4, "1..3 live")
    old = watcher.objects[0]["epoch"]

    page_ready = asyncio.Event()
    release = asyncio.Event()
    original = GatedBackend.history

    async def answered_then_held(self: GatedBackend, conv: str, since: int = 0,
                                 limit: int | None = None) -> HistoryPage:
        page = await original(self, conv, since, limit)  # no gate set: answered now
        if since == 1:  # the resume's read only
            page_ready.set()
            await release.wait()
        return page

    backend.history = answered_then_held.__get__(backend)  # type: ignore[method-assign]
    rec = Recorder()
    resume = asyncio.create_task(hub.subscribe(rec, "c", DEFAULT, since=1))
    await asyncio.wait_for(page_ready.wait(), 5)
    backend.lose("c")
    await publish(backend, "c", 2, epochs)
    await poll(lambda: hub.stats.resets == 1 and len(watcher.objects) == 7, "the feed moved to the new epoch")
    new = watcher.objects[4]["epoch"]
    release.set()
    await asyncio.wait_for(resume, 5)

    assert script(rec.objects, epochs) == [
        ("ws.subscribed", old, 3), ("chat.msg", old, 2), ("chat.msg", old, 3),
        ("ws.reset", new, 0), ("chat.msg", new, 1), ("chat.msg", new, 2),
    ]
    await hub.close()


async def test_history_in_a_new_epoch_the_feed_has_not_seen_yet_resets_through_the_feed(
        backend: GatedBackend) -> None:
    """No live event tells the feed: the resume's read does, and the reset comes once, from the feed."""
    hub = Hub(backend, gateway_id="g")
    epochs: dict[str, str] = {}
    watcher = Recorder()
    await hub.subscribe(watcher, "c", DEFAULT)
    await publish(backend, "c", 3, epochs)
    await poll(lambda: len(watcher.objects) == 4, "1..3 live")
    old = watcher.objects[0]["epoch"]

    backend.gate_next_history()
    rec = Recorder()
    resume = asyncio.create_task(hub.subscribe(rec, "c", DEFAULT, since=1))
    await asyncio.wait_for(backend.gated_read_waiting.wait(), 5)
    backend.lose("c")
    backend.open_gate()
    await asyncio.wait_for(resume, 5)
    await poll(lambda: len(rec.objects) == 2, "the reset")
    new = (await backend.head("c")).epoch
    await publish(backend, "c", 1, epochs)
    await poll(lambda: len(rec.objects) == 3, "live 1 of the new epoch")
    assert script(rec.objects, epochs) == [("ws.subscribed", old, 3), ("ws.reset", new, 0), ("chat.msg", new, 1)]
    assert script(watcher.objects, epochs)[-2:] == [("ws.reset", new, 0), ("chat.msg", new, 1)]
    await hub.close()


async def test_hydrate_snapshot_of_a_new_epoch_never_gets_the_old_epochs_queued_events(
        backend: GatedBackend) -> None:
    """Old-epoch events queued while the snapshot was read are not sent after a snapshot of the new epoch."""
    hub = Hub(backend, gateway_id="g")
    epochs: dict[str, str] = {}
    watcher = Recorder()
    await hub.subscribe(watcher, "c", DEFAULT)
    await publish(backend, "c", 3, epochs)
    await poll(lambda: len(watcher.objects) == 4, "1..3 live")
    old = watcher.objects[0]["epoch"]

    backend.gate_next_state()
    rec = Recorder()
    hydrate = asyncio.create_task(hub.subscribe(rec, "c", DEFAULT, hydrate=True))
    await asyncio.wait_for(backend.gated_read_waiting.wait(), 5)
    await publish(backend, "c", 2, epochs)  # 4, 5 of the old epoch, live: queued for the hydrating client
    await poll(lambda: len(watcher.objects) == 6, "4, 5 live")
    backend.lose("c")  # nothing published in the new epoch yet: the feed cannot know
    backend.open_gate()
    await asyncio.wait_for(hydrate, 5)
    new = (await backend.head("c")).epoch
    await poll(lambda: len(rec.objects) == 3, "the reset")
    assert script(rec.objects, epochs) == [("ws.subscribed", new, 0), ("ws.state", new, 0), ("ws.reset", new, 0)]
    assert new != old
    await publish(backend, "c", 1, epochs)
    await poll(lambda: len(rec.objects) == 4, "live 1 of the new epoch")
    never_an_untold_epoch(script(rec.objects, epochs))
    await hub.close()


# ---- a refused re-subscribe ----------------------------------------------------------------


def subscriptions(gw: InProcessGateway) -> int:
    return sum(len(c.convs) for c in gw.gateway.pool.connections.values())


async def test_a_failed_resubscribe_leaves_the_connection_unsubscribed_and_a_later_one_works() -> None:
    backend = GatedBackend()
    async with InProcessGateway(Settings(), backend=backend) as gw:
        client = await WsClient.connect(gw.ws_url("conv_id=r"))
        await client.expect("ws.subscribed")
        assert subscriptions(gw) == 1 and gw.gateway.hub.presence_counts("r") == {"default": 1}

        backend.fail_subscribes = 1
        await client.send_json({"type": "ws.subscribe", "conv_id": "r", "since": 0})
        error = await client.expect("ws.error")
        assert (error["code"], error["conv_id"]) == ("unavailable", "r")  # #16: it names its subscription
        # The hub ended the old subscription before the new one failed: nothing may count it any more.
        assert subscriptions(gw) == 0
        assert gw.gateway.hub.presence_counts("r") == {}
        assert "r" not in gw.gateway.hub.conversations()

        await client.send_json({"type": "ws.subscribe", "conv_id": "r"})
        await client.expect("ws.subscribed")
        assert subscriptions(gw) == 1 and gw.gateway.hub.presence_counts("r") == {"default": 1}
        result = await backend.publish("r", "chat.msg", {"after": True})
        event = await client.expect("chat.msg")
        assert event["seq"] == result.seq
        await client.close()
