"""How late the event loop runs: the gauge and counter an operator alerts on before sockets time out.

One task per gateway sleeps ``interval`` seconds over and over; how much later than asked it
wakes is the loop's delay (a long callback, a full garbage collection, CPU starvation).
Exported on ``/metrics``: ``broadcaster_event_loop_lag_seconds``, the longest delay since the
previous scrape (so a short stall between two scrapes is not lost), and
``broadcaster_event_loop_stalls_total``, delays of ``stall`` seconds or more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

INTERVAL = 0.1
"""Seconds between two wake-ups of the probe (ten timer callbacks a second: nothing to measure)."""
STALL = 0.5
"""A delay of at least this many seconds counts as a stall."""


class LoopLag(Collector):
    """The probe (:meth:`run`, a task for the gateway's life) and its two metrics."""

    def __init__(self, registry: CollectorRegistry | None = None, *, interval: float = INTERVAL,
                 stall: float = STALL) -> None:
        self.interval, self.stall = interval, stall
        self.longest = 0.0
        """The longest delay since the previous scrape (reset by :meth:`collect`)."""
        self.stalls = 0
        if registry is not None:
            registry.register(self)

    def record(self, delay: float) -> None:
        if delay > self.longest:
            self.longest = delay
        if delay >= self.stall:
            self.stalls += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.record(max(0.0, loop.time() - asked))

    def collect(self) -> Iterator[Metric]:
        longest, self.longest = self.longest, 0.0
        yield GaugeMetricFamily("broadcaster_event_loop_lag_seconds",
                                "Longest event-loop delay since the previous scrape (a 0.1 s timer's lateness)",
                                value=longest)
        stalls = CounterMetricFamily("broadcaster_event_loop_stalls",
                                     f"Event-loop delays of {self.stall:g} s or more")
        stalls.add_metric([], self.stalls)
        yield stalls
