"""The gateway's lock-free histogram exports exactly what prometheus_client's own would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import LATENCY_BUCKETS, LoopHistogram

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
