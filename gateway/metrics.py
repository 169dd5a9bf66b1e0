"""Prometheus metrics. Counters live as plain ints in the pool, hub and backend; a
collector reads them at scrape time, so the hot path never takes a metrics lock.

The collector knows nothing of the gateway: it is handed a :class:`MetricSources`, the
three counter objects and a few live readings, and reads only those."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from broadcaster.backend import BackendStats
    from broadcaster.hub import HubStats
    from broadcaster.presence import JoinLeave
    from gateway.connection import PoolStats

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class MetricSources:
    """Everything the collector reads: the components' counter objects (mutated in place, read
    at scrape time) and the live readings that are not counters."""

    pool: PoolStats
    hub: HubStats
    backend: BackendStats
    connections: Callable[[], int]
    """Open connections: websockets and SSE streams."""
    subscriptions: Callable[[], int]
    """Subscriptions of the open connections."""
    conversations: Callable[[], int]
    """Conversations this process watches."""
    draining: Callable[[], bool]
    backend_connected: Callable[[], bool]
    handshakes_pending: Callable[[], int] = lambda: 0
    """Websocket handshakes in progress (gateway.admission)."""
    handshakes_refused: Callable[[], int] = lambda: 0
    """Handshakes refused with 503 because that many were in progress."""


class GatewayCollector(Collector):
    """Turns the gateway's counters into metric families on each scrape."""

    def __init__(self, sources: MetricSources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        src = self._sources
        pool, hub, backend = src.pool, src.hub, src.backend
        yield GaugeMetricFamily("broadcaster_connections", "Open connections (websockets and SSE streams)",
                                value=src.connections())
        yield GaugeMetricFamily("broadcaster_subscriptions", "Subscriptions of open connections",
                                value=src.subscriptions())
        yield GaugeMetricFamily("broadcaster_conversations", "Conversations watched in this process",
                                value=src.conversations())
        yield GaugeMetricFamily("broadcaster_queued_bytes", "Bytes queued for connections", value=pool.queued_bytes)
        yield GaugeMetricFamily("broadcaster_draining", "1 while draining", value=int(src.draining()))
        yield GaugeMetricFamily("broadcaster_backend_connected", "1 while the backend delivers live events",
                                value=int(src.backend_connected()))
        yield GaugeMetricFamily("broadcaster_policy_conflict",
                                "1 while Redis applies another gateway's namespace policy (docs/namespaces.md)",
                                value=backend.policy_conflict)
        yield GaugeMetricFamily("broadcaster_handshakes_pending", "Websocket handshakes in progress",
                                value=src.handshakes_pending())
        yield CounterMetricFamily("broadcaster_handshakes_refused",
                                  "Handshakes refused 503 at --max-pending-handshakes", value=src.handshakes_refused())
        counters = {
            "broadcaster_connections_opened": ("Websocket connections accepted", pool.connections_opened),
            "broadcaster_events_in": ("Live payloads received from the backend", hub.events_in),
            "broadcaster_events_dispatched": ("Events dispatched in seq order", hub.events_delivered),
            "broadcaster_events_out": ("Event objects queued to connections", hub.deliveries),
            "broadcaster_profile_renders": ("Event renders (once per event and profile)", hub.renders),
            "broadcaster_frames_written": ("Websocket frames written", pool.frames_written),
            "broadcaster_objects_written": ("JSON objects written (several per frame)", pool.objects_written),
            "broadcaster_bytes_written": ("Payload bytes written", pool.bytes_written),
            "broadcaster_slow_consumer_closes": ("Connections closed 4408", pool.slow_consumer_closes),
            "broadcaster_gap_repairs": ("History reads that filled a gap", hub.gap_repairs),
            "broadcaster_resets": ("ws.reset broadcasts", hub.resets),
            "broadcaster_backend_reconnects": ("Pub/sub reconnects", backend.reconnects),
            "broadcaster_decode_errors": ("Payloads that could not be decoded", backend.decode_errors),
            "broadcaster_state_evictions": ("State entries evicted by the cap", backend.state_evictions),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        drops = CounterMetricFamily("broadcaster_drops", "Objects not delivered, by reason", labels=["reason"])
        reasons = dict(pool.dropped)
        reasons["duplicate"] = hub.duplicates_dropped
        reasons["stale_epoch"] = hub.stale_dropped
        reasons["render_error"] = hub.render_errors
        reasons["intercepted"] = hub.intercept_drops
        reasons["undecodable"] = backend.decode_errors
        for reason, value in sorted(reasons.items()):
            drops.add_metric([reason], value)
        yield drops


@dataclass(frozen=True, slots=True)
class TransportSources:
    """What :class:`TransportCollector` reads: the pool's counters (every transport) and the SSE
    streams' own; the websocket numbers are the difference."""

    pool: PoolStats
    connections: Callable[[], int]
    """Open connections of every transport."""
    sse_connections: Callable[[], int]
    sse_opened: Callable[[], int]
    sse_slow_consumer_closes: Callable[[], int]
    sse_objects_written: Callable[[], int]
    sse_bytes_written: Callable[[], int]


class TransportCollector(Collector):
    """The connection metrics split by ``transport`` (``ws``, ``sse``), next to the unlabelled totals
    (``broadcaster_connections`` and friends keep their names and now count both transports)."""

    def __init__(self, sources: TransportSources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        src, pool = self._sources, self._sources.pool
        gauge = GaugeMetricFamily("broadcaster_transport_connections", "Open connections by transport",
                                  labels=["transport"])
        sse = src.sse_connections()
        gauge.add_metric(["ws"], max(0, src.connections() - sse))
        gauge.add_metric(["sse"], sse)
        yield gauge
        counters = {
            "broadcaster_transport_connections_opened": ("Connections accepted, by transport",
                                                         pool.connections_opened, src.sse_opened()),
            "broadcaster_transport_slow_consumer_closes": ("Slow readers closed (ws: 4408), by transport",
                                                           pool.slow_consumer_closes, src.sse_slow_consumer_closes()),
            "broadcaster_transport_objects_written": ("JSON objects written, by transport", pool.objects_written,
                                                      src.sse_objects_written()),
            "broadcaster_transport_bytes_written": ("Payload bytes written, by transport", pool.bytes_written,
                                                    src.sse_bytes_written()),
        }
        for name, (doc, total, sse_value) in counters.items():
            family = CounterMetricFamily(name, doc, labels=["transport"])
            family.add_metric(["ws"], max(0, total - sse_value))
            family.add_metric(["sse"], sse_value)
            yield family


class LoopHistogram(Collector):
    """A Prometheus histogram for the event loop's thread: ``observe`` is a bisect and two additions.

    prometheus_client's ``Histogram`` takes a lock per observation; observed once per
    frame written, that was about 7 % of the gateway's CPU in the broadcast shape
    (BENCHMARKS.md). Only the loop thread observes, so plain numbers do; a scrape may see
    the count and the sum a few observations apart, as with any lock-free exporter.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # bucket "le" bound: value <= bound
        self._sum += value

    def observe_many(self, value: float, count: int) -> None:
        """``count`` observations of ``value`` (the pool's flush pass: every frame of a pass waited as long)."""
        self._counts[bisect_left(self._bounds, value)] += count
        self._sum += value * count

    def collect(self) -> Iterator[Metric]:
        counts, cumulative, buckets = list(self._counts), 0, []
        for bound, count in zip((*map(str, self._bounds), "+Inf"), counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=self._sum)


class LoopCounter(Collector):
    """A labelled Prometheus counter for the event loop's thread: ``inc("ws")`` is one dict update.

    ``series``: the label values exported from the start (at 0), so a rate over them exists
    before the first increment; :meth:`inc` with other values adds a series.
    """

    def __init__(self, name: str, documentation: str, labels: Sequence[str], series: Iterable[Sequence[str]],
                 registry: CollectorRegistry) -> None:
        self._name, self._documentation, self._labels = name, documentation, tuple(labels)
        self._counts: dict[tuple[str, ...], int] = {}
        for values in series:
            self._counts[self._key(values)] = 0
        registry.register(self)

    def _key(self, values: Sequence[str]) -> tuple[str, ...]:
        if len(values) != len(self._labels):
            raise ValueError(f"{self._name} takes {len(self._labels)} label values {self._labels}, got {values!r}")
        return tuple(values)

    def inc(self, *values: str) -> None:
        key = self._key(values)
        self._counts[key] = self._counts.get(key, 0) + 1

    def value(self, *values: str) -> int:
        return self._counts.get(self._key(values), 0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for values, count in sorted(self._counts.items()):
            family.add_metric(values, count)
        yield family


REFRESH_OUTCOMES = ("ok", "narrowed", "bad_refresh", "forbidden", "expired")
"""``ws.refresh`` outcomes: accepted; accepted, some subscriptions ended ``forbidden``; refused
(ws.error bad_refresh, the old token stays); the profile no longer allowed (closed 4403); too late
(closed 4401, also counted in the token expiry closes)."""


class JoinLeaveCollector(Collector):
    """``ws.join`` / ``ws.leave`` objects sent to this gateway's subscribers, and the transitions
    this gateway announced to every gateway (:class:`broadcaster.presence.JoinLeave`'s counts)."""

    def __init__(self, join_leave: JoinLeave) -> None:
        self._join_leave = join_leave

    def collect(self) -> Iterator[Metric]:
        sent = CounterMetricFamily("broadcaster_presence_sent", "ws.join / ws.leave sent to subscribers, by kind",
                                   labels=["kind"])
        announced = CounterMetricFamily("broadcaster_presence_announced",
                                        "Joins / leaves this gateway announced to all gateways, by kind",
                                        labels=["kind"])
        for kind, count in sorted(self._join_leave.sent.items()):
            sent.add_metric([kind], count)
        for kind, count in sorted(self._join_leave.announced_by_kind.items()):
            announced.add_metric([kind], count)
        yield sent
        yield announced


class Metrics:
    """The registry of one gateway (not the global one: tests run several apps per process).

    The counters bumped at their call sites, one ``inc`` each: ``token_expiry_closes.inc(transport)``
    where a connection is closed 4401 "token expired" (``"ws"``, ``"sse"``), ``refreshes.inc(outcome)``
    once per ``ws.refresh`` (an outcome of :data:`REFRESH_OUTCOMES`). :meth:`watch_join_leave` exports
    a :class:`~broadcaster.presence.JoinLeave`'s counts.
    """

    def __init__(self, sources: MetricSources) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(GatewayCollector(sources))
        self.dispatch_latency = LoopHistogram(
            "broadcaster_publish_to_dispatch_seconds", "From publish (event ts) to hand-off to connection queues",
            LATENCY_BUCKETS, self.registry)
        self.queue_wait = LoopHistogram(
            "broadcaster_queue_wait_seconds", "From first queued object to its frame being written",
            LATENCY_BUCKETS, self.registry)
        self.token_expiry_closes = LoopCounter(
            "broadcaster_token_expiry_closes", "Connections closed 4401 token expired, by transport", ["transport"],
            [("ws",), ("sse",)], self.registry)
        self.refreshes = LoopCounter(
            "broadcaster_token_refreshes", "ws.refresh requests, by outcome", ["outcome"],
            [(outcome,) for outcome in REFRESH_OUTCOMES], self.registry)

    def watch_join_leave(self, join_leave: JoinLeave) -> None:
        """Export ``join_leave``'s counts (call it once per gateway: twice would export each series twice)."""
        self.registry.register(JoinLeaveCollector(join_leave))
