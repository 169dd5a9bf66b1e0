"""Latency histograms that merge across processes.

A client process keeps the raw latencies of a step (microseconds, in an
``array``: appending is the only work on the hot path) and, once the step is over,
hands the orchestrator a *bucket map* ``{value_us: count}`` with values rounded to
three significant digits (what HdrHistogram does with 3 significant figures), so
a map stays small whatever the number of deliveries. The orchestrator merges the
maps and reads percentiles from an ``HdrHistogram`` (PyPI ``hdrhistogram``) when it
is installed, or exactly from the merged buckets otherwise (the smoke test runs
without it).
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable, Mapping

try:  # the bench tools venv has it; the project's test venv need not
    from hdrh.histogram import HdrHistogram
except ImportError:  # pragma: no cover - depends on the venv
    HdrHistogram = None

MAX_US = 600_000_000  # 10 minutes: anything above is clamped


def _round3(value: int) -> int:
    """``value`` rounded down to 3 significant digits (exact below 1000)."""
    if value < 1000:
        return max(value, 0)
    scale = 10 ** (len(str(value)) - 3)
    return value // scale * scale


def buckets(samples: Iterable[int]) -> dict[int, int]:
    """A bucket map of latency samples in microseconds."""
    counts = Counter(samples)
    out: dict[int, int] = {}
    for value, n in counts.items():
        key = _round3(min(int(value), MAX_US))
        out[key] = out.get(key, 0) + n
    return out


def merge(maps: Iterable[Mapping[int | str, int]]) -> dict[int, int]:
    """Add bucket maps (keys may arrive as strings from JSON)."""
    out: dict[int, int] = {}
    for m in maps:
        for key, n in m.items():
            k = int(key)
            out[k] = out.get(k, 0) + int(n)
    return out


def summary(bucket_map: Mapping[int, int]) -> dict[str, float | int | str]:
    """Count, p50, p99, p99.9 and max in milliseconds."""
    total = sum(bucket_map.values())
    if total == 0:
        return {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0, "max_ms": 0.0, "engine": "none"}
    if HdrHistogram is not None:
        hist = HdrHistogram(1, MAX_US, 3)
        for value, n in bucket_map.items():
            hist.record_value(max(int(value), 1), n)
        pct = {q: hist.get_value_at_percentile(q) for q in (50.0, 99.0, 99.9)}
        top = hist.get_max_value()
        engine = "hdrhistogram"
    else:
        ordered = sorted(bucket_map.items())
        pct = {}
        for q in (50.0, 99.0, 99.9):
            rank, seen = q / 100.0 * total, 0
            for value, n in ordered:
                seen += n
                if seen >= rank:
                    pct[q] = value
                    break
        top = ordered[-1][0]
        engine = "exact-buckets"
    return {"count": total, "p50_ms": pct[50.0] / 1000, "p99_ms": pct[99.0] / 1000,
            "p999_ms": pct[99.9] / 1000, "max_ms": top / 1000, "engine": engine}


def new_samples() -> array[int]:
    return array("q")
