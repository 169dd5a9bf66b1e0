"""The gateway's lock-free histogram and counters export exactly what prometheus_client's own would;
the call-site counters (token expiry closes, ws.refresh outcomes, joins and leaves) from zero."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from broadcaster.backend import BackendSettings, PresenceTransition
from broadcaster.backends.memory import MemoryBackend
from broadcaster.hub import Hub
from broadcaster.namespaces import PolicyTable, parse_namespaces
from broadcaster.presence import JoinLeave
from broadcaster.profiles import Profile
from gateway.connection import PoolStats
from gateway.metrics import LATENCY_BUCKETS, REFRESH_OUTCOMES, LoopCounter, LoopHistogram, Metrics, MetricSources
from tests.support.polling import async_wait_until
from tests.support.sink import Sink

values = st.lists(st.sampled_from([0.0, *LATENCY_BUCKETS, 10.0]) | st.floats(0, 20, allow_nan=False), max_size=200)


def _exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@given(values)
def test_loop_histogram_matches_prometheus_client(observations: list[float]) -> None:
    reference, ours = CollectorRegistry(), CollectorRegistry()
    expected = Histogram("t_seconds", "doc", buckets=LATENCY_BUCKETS, registry=reference)
    actual = LoopHistogram("t_seconds", "doc", LATENCY_BUCKETS, ours)
    for value in observations:
        expected.observe(value)
        actual.observe(value)
    assert _exposition(ours) == _exposition(reference)


# ---- the call-site counters ------------------------------------------------------------------

labels = st.lists(st.sampled_from(["ws", "sse", "other"]), max_size=50)


@given(labels)
def test_loop_counter_matches_prometheus_client(increments: list[str]) -> None:
    """Preset series are exported at 0 from the start; each inc adds one, as a labelled Counter would."""
    reference, ours = CollectorRegistry(), CollectorRegistry()
    expected = Counter("t_closes", "doc", ["transport"], registry=reference)
    actual = LoopCounter("t_closes", "doc", ["transport"], [("ws",), ("sse",)], ours)
    expected.labels("ws")
    expected.labels("sse")
    for label in increments:
        expected.labels(label).inc()
        actual.inc(label)
    assert sorted(_exposition(ours)) == sorted(_exposition(reference))
    assert actual.value("ws") == increments.count("ws")


def test_loop_counter_refuses_a_wrong_number_of_label_values() -> None:
    counter = LoopCounter("t", "doc", ["outcome"], [], CollectorRegistry())
    with pytest.raises(ValueError, match="label values"):
        counter.inc("ok", "extra")


def _metrics(hub: Hub, backend: MemoryBackend) -> Metrics:
    return Metrics(MetricSources(pool=PoolStats(), hub=hub.stats, backend=backend.stats, connections=lambda: 0,
                                 subscriptions=lambda: 0, conversations=lambda: 0, draining=lambda: False,
                                 backend_connected=lambda: True))


def _samples(metrics: Metrics, name: str) -> dict[str, float]:
    """``label value -> value`` of the one-label family ``name`` (``_total`` samples)."""
    for family in metrics.registry.collect():
        if family.name == name:
            return {next(iter(s.labels.values())): s.value for s in family.samples if s.name.endswith("_total")}
    raise AssertionError(f"no metric {name}")


async def test_gateway_metrics_export_expiry_closes_and_refresh_outcomes_from_zero() -> None:
    backend = MemoryBackend()
    hub = Hub(backend, gateway_id="g")
    metrics = _metrics(hub, backend)
    assert _samples(metrics, "broadcaster_token_expiry_closes") == {"ws": 0, "sse": 0}
    assert _samples(metrics, "broadcaster_token_refreshes") == dict.fromkeys(REFRESH_OUTCOMES, 0)
    metrics.token_expiry_closes.inc("sse")
    for outcome in ("ok", "ok", "narrowed", "bad_refresh", "expired"):
        metrics.refreshes.inc(outcome)
    assert _samples(metrics, "broadcaster_token_expiry_closes") == {"ws": 0, "sse": 1}
    assert _samples(metrics, "broadcaster_token_refreshes") == {"ok": 2, "narrowed": 1, "bad_refresh": 1,
                                                               "forbidden": 0, "expired": 1}
    text = generate_latest(metrics.registry).decode()
    assert 'broadcaster_token_expiry_closes_total{transport="sse"} 1.0' in text
    assert 'broadcaster_token_refreshes_total{outcome="ok"} 2.0' in text
    await hub.close()


async def test_join_and_leave_counts_are_what_subscribers_were_sent_and_what_was_announced() -> None:
    """A real hub and JoinLeave on the memory backend: joins / leaves announced over the control
    channel reach two watchers of a join_leave conversation; one of a conversation without it gets none."""
    policies = PolicyTable(BackendSettings().default_policy(),
                           parse_namespaces({"namespaces": {"jl-*": {"join_leave": True}}}))
    backend = MemoryBackend()
    await backend.start()
    hub = Hub(backend, gateway_id="g")
    join_leave = JoinLeave(backend, hub, policies)
    join_leave.listen()
    metrics = _metrics(hub, backend)
    metrics.watch_join_leave(join_leave)
    try:
        assert _samples(metrics, "broadcaster_presence_sent") == {"join": 0, "leave": 0}
        watchers = [Sink("w1"), Sink("w2")]
        for sub in watchers:
            await hub.subscribe(sub, "jl-1", Profile("default"))
        await hub.subscribe(Sink("o"), "plain", Profile("default"))
        transitions = [("join", "jl-1", "alice"), ("join", "jl-1", "bob"), ("leave", "jl-1", "alice"),
                       ("join", "plain", "carl")]
        await join_leave.announce([PresenceTransition(*t) for t in transitions])
        await async_wait_until(lambda: _samples(metrics, "broadcaster_presence_sent") == {"join": 4, "leave": 2},
                               timeout=5, message="2 joins and 1 leave to each of the two watchers")
        assert _samples(metrics, "broadcaster_presence_announced") == {"join": 3, "leave": 1}
        assert all(len(sub.controls("ws.join")) == 2 and len(sub.controls("ws.leave")) == 1 for sub in watchers)
    finally:
        await hub.close()
        await backend.close()
