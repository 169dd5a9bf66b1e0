"""The presence heartbeat is spread over its interval, and still refreshes every conversation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from broadcaster.presence import PresenceReporter
from tests.support.polling import async_wait_until


class FakeHub:
    def __init__(self, convs: list[str]) -> None:
        self.convs = convs
        self.dirty: set[str] = set()

    def conversations(self) -> list[str]:
        return list(self.convs)

    def take_dirty(self) -> set[str]:
        dirty, self.dirty = self.dirty, set()
        return dirty

    def presence_counts(self, conv: str) -> dict[str, int]:
        return {"default": 1} if conv in self.convs else {}


class RecordingBackend:
    def __init__(self) -> None:
        self.calls: list[set[str]] = []

    async def report_presence(self, gateway_id: str, counts: Mapping[str, Mapping[str, int]], ttl: float) -> None:
        self.calls.append(set(counts))


async def test_heartbeat_is_sliced_and_covers_every_conversation() -> None:
    convs = [f"c{i}" for i in range(1000)]
    hub, backend = FakeHub(convs), RecordingBackend()
    reporter = PresenceReporter(hub, backend, "g", heartbeat=0.5, ttl=1.5, flush_interval=0.01)  # type: ignore[arg-type]
    task = asyncio.create_task(reporter.run())
    try:
        await async_wait_until(lambda: sum(len(c) for c in backend.calls), timeout=15,
                               message="every conversation to be refreshed", until=lambda n: n >= len(convs))
        hub.dirty.add("c1")  # a change goes out with the next tick, whatever the slice
        calls_before = len(backend.calls)
        await async_wait_until(lambda: any("c1" in c for c in backend.calls[calls_before:]), timeout=15,
                               message="the change to be flushed")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    first_pass: set[str] = set()
    for call in backend.calls:
        first_pass |= call
        if len(first_pass) == len(convs):
            break
    assert first_pass == set(convs)
    slice_size = -(-len(convs) // 50)  # 0.5 s heartbeat / 0.01 s ticks
    assert max(len(c) for c in backend.calls) <= slice_size + 1, "a tick refreshed more than its slice"
