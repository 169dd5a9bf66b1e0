"""The metrics collector reads only the MetricSources it is handed (no gateway behind it), live at each scrape."""

from __future__ import annotations

from prometheus_client import generate_latest

from broadcaster.backend import BackendStats
from broadcaster.hub import HubStats
from gateway.connection import PoolStats
from gateway.metrics import Metrics, MetricSources


def _samples(metrics: Metrics) -> dict[str, float]:
    out = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_from_sources_alone() -> None:
    pool, hub, backend = PoolStats(), HubStats(), BackendStats()
    live = {"connections": 2, "subscriptions": 5, "conversations": 3, "draining": False, "connected": True}
    metrics = Metrics(MetricSources(
        pool=pool, hub=hub, backend=backend,
        connections=lambda: int(live["connections"]), subscriptions=lambda: int(live["subscriptions"]),
        conversations=lambda: int(live["conversations"]), draining=lambda: bool(live["draining"]),
        backend_connected=lambda: bool(live["connected"])))
    pool.frames_written, pool.queued_bytes, hub.deliveries, hub.duplicates_dropped = 11, 99, 7, 4
    backend.decode_errors, backend.reconnects = 2, 1
    pool.drop("queue_full", 3)

    got = _samples(metrics)
    assert got["broadcaster_connections"] == 2 and got["broadcaster_subscriptions"] == 5
    assert got["broadcaster_conversations"] == 3 and got["broadcaster_queued_bytes"] == 99
    assert got["broadcaster_draining"] == 0 and got["broadcaster_backend_connected"] == 1
    assert got["broadcaster_frames_written_total"] == 11 and got["broadcaster_events_out_total"] == 7
    assert got["broadcaster_backend_reconnects_total"] == 1 and got["broadcaster_decode_errors_total"] == 2
    assert got['broadcaster_drops_total{reason="queue_full"}'] == 3
    assert got['broadcaster_drops_total{reason="duplicate"}'] == 4
    assert got['broadcaster_drops_total{reason="undecodable"}'] == 2

    # Read at scrape time: later changes show up without telling the collector.
    live.update(connections=0, draining=True, connected=False)
    pool.frames_written += 1
    got = _samples(metrics)
    assert got["broadcaster_connections"] == 0 and got["broadcaster_draining"] == 1
    assert got["broadcaster_backend_connected"] == 0 and got["broadcaster_frames_written_total"] == 12
