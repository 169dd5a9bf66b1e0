"""gateway.keepalive: a tick due for many pings sends them BATCH per loop callback, other callbacks run between
batches, each ping goes out once, and a socket that closes while its batch waits gets no ping."""

from __future__ import annotations

import asyncio

import pytest

from gateway.keepalive import BATCH, PingEntry, PingWheel
from tests.support.polling import async_wait_until

pytestmark = pytest.mark.timeout(30)


class Pinged:
    def __init__(self, log: list[object], index: int, on_ping: object = None) -> None:
        self.log, self.index, self.on_ping = log, index, on_ping

    def send_keepalive_ping(self) -> None:
        self.log.append(self.index)
        if callable(self.on_ping):
            self.on_ping()


async def test_a_crowded_tick_lets_other_callbacks_run_between_batches() -> None:
    loop = asyncio.get_running_loop()
    wheel = PingWheel(loop)
    log: list[object] = []
    count = 2 * BATCH + 50
    scheduled: list[bool] = []

    def first_ping() -> None:  # what a socket's I/O is: a callback queued while the pings go out
        if not scheduled:
            scheduled.append(True)
            loop.call_soon(log.append, "io")

    for i in range(count):
        wheel.call_later(0.01, Pinged(log, i, first_ping))
    await async_wait_until(lambda: len(log) == count + 1, timeout=5, message="every ping")
    assert log.index("io") == BATCH  # after the first batch, not after all of them
    assert sorted(x for x in log if x != "io") == list(range(count))  # each once
    assert len(wheel) == 0


async def test_a_ping_cancelled_while_its_batch_waits_is_not_sent() -> None:
    loop = asyncio.get_running_loop()
    wheel = PingWheel(loop)
    log: list[object] = []
    entries: list[PingEntry] = []
    cancelled: list[int] = []

    def close_some() -> None:  # sockets closing between two batches
        if not cancelled:
            waiting = [i for i, e in enumerate(entries) if e.pinger is not None]
            cancelled.extend(waiting[:10])
            for i in cancelled:
                entries[i].cancel()

    count = BATCH + 30
    for i in range(count):
        entries.append(wheel.call_later(0.01, Pinged(log, i, lambda: loop.call_soon(close_some))))
    await async_wait_until(lambda: len(log) == count - 10, timeout=5, message="the pings not cancelled")
    await asyncio.sleep(0.05)
    assert len(cancelled) == 10 and not set(cancelled) & set(log)  # type: ignore[arg-type]
    assert sorted(log) == sorted(set(range(count)) - set(cancelled))  # type: ignore[type-var]
