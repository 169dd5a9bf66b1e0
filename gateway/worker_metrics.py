"""The ``/metrics`` of ``--workers``: every worker's families merged into one exposition.

Each sample is labelled ``worker="<index>"``; ``broadcaster_worker_up{worker}`` says which
workers answered the scrape and ``broadcaster_worker_restarts{worker}`` how often the
supervisor started each slot again (see :mod:`gateway.workers`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send


class MergedCollector(Collector):
    """The families of every worker, merged by name, each sample labelled with its worker's index."""

    def __init__(self, parts: dict[int, list[Metric] | None], restarts: dict[int, int]) -> None:
        self._parts, self._restarts = parts, restarts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for index in sorted(self._parts):
            for family in self._parts[index] or ():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                label = str(index)
                merged.samples.extend(s._replace(labels={**s.labels, "worker": label}) for s in family.samples)
        yield from families.values()
        up = GaugeMetricFamily("broadcaster_worker_up", "1 when this --workers worker answered this scrape",
                               labels=["worker"])
        restarts = CounterMetricFamily("broadcaster_worker_restarts",
                                       "Times the supervisor started this --workers slot again", labels=["worker"])
        for index in sorted(self._parts):
            up.add_metric([str(index)], 0 if self._parts[index] is None else 1)
            restarts.add_metric([str(index)], self._restarts.get(index, 0))
        yield up
        yield restarts


class MergedMetrics:
    """ASGI middleware: ``GET /metrics`` answers the merged exposition of every worker."""

    def __init__(self, app: ASGIApp, merged: Callable[[], Awaitable[bytes]]) -> None:
        self.app, self.merged = app, merged

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/metrics" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        body = await self.merged()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
