"""The bench harness still works: a few clients, one short step, our gateway only.

Runs ``bench/run.py --no-venv`` with this python (no peer venvs, no picows or
hdrhistogram needed: the harness falls back to websockets' sans-I/O client and exact
percentiles) against the suite's Redis, and checks the result is well formed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


def test_bench_harness_smoke(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "bench.json"
    summary = tmp_path / "bench.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--no-venv", "--scenarios", "smoke", "--servers", "ours",
         "--redis-url", redis_url, "--client-procs", "1", "--quiet-budget", "0", "--retries", "0",
         "--json", str(out), "--markdown", str(summary)],
        capture_output=True, text=True, timeout=50, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads(out.read_text())
    assert result["machine"]["nproc"] >= 1 and result["machine"]["python"]
    run = result["shapes"]["smoke"]["ours"]
    assert run["connect"] == {**run["connect"], "connected": run["clients"], "failed": 0, "ready": run["clients"]}
    [step] = run["steps"]
    assert step["received"] > 0
    assert step["lost"] == 0 and step["received"] == step["expected"]
    assert step["events_per_s"] > 0 and step["dps"] > 0
    assert 0 <= step["p50_ms"] <= step["p99_ms"] <= step["p999_ms"] <= step["max_ms"]
    assert step["cpu_pct"]["server"] >= 0 and step["server_rss_mb"] > 0
    assert step["closed_by_server"] == 0 and not step["publish_errors"]
    assert re.search(r"^\|\s*smoke\s*\|\s*ours\s*\|", summary.read_text(), re.MULTILINE)
