"""The scenario benchmarks still run and still check what they claim: storm.py and many_sockets.py in smoke mode.

* ``bench/storm.py --smoke``: three gateways behind nginx, 150 clients over 30 conversations,
  a paced publisher, one gateway SIGKILLed: every client must end with every event exactly
  once (no gap, no duplicate, no reset), every moved client must have recovered.
* ``bench/many_sockets.py --smoke``: 1,000 sockets on one gateway, then a little fan-out:
  every socket connected, nothing lost or duplicated, the event-loop stall probe answered.
  With ``--workers 2`` the same over two worker processes: sums over the supervisor and both
  workers, sockets on each worker, the probe's connections on each worker.

Each runs as a subprocess with this python (nginx and redis-server as the cluster tests use
them) and is judged on its JSON output. The seq checker of the load client
(``bench/wsload.py``) is tested on its own first: a benchmark whose checker saw no gaps would
pass for the wrong reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import wsload  # noqa: E402

pytestmark = pytest.mark.timeout(90)


def _event(conv: str, seq: int) -> bytes:
    return json.dumps({"type": "bench.e", "conv_id": conv, "seq": seq, "id": f"e{seq}", "ts": 0,
                       "data": {"t": 0, "s": 1}}).encode()


def test_load_client_counts_gaps_duplicates_and_resets() -> None:
    follower = wsload.Follower(0, "c")
    follower.on_object(b'{"type":"ws.subscribed","conv_id":"c","epoch":"e1","seq":3}', 0.0)
    for seq in (4, 5, 5, 7, 6, 8):  # 5 twice, 6 missing then late: one dup, one gap, one dup
        follower.on_object(_event("c", seq), 0.0)
    assert (follower.first_seq, follower.last_seq) == (3, 8)
    assert (follower.gaps, follower.gap_events, follower.dups) == (1, 1, 2)
    assert follower.query() == "conv_id=c&since=8&epoch=e1"

    driver = wsload.Driver()
    clean = wsload.Follower(1, "d")
    clean.on_object(b'{"type":"ws.subscribed","conv_id":"d","epoch":"e1","seq":0}', 0.0)
    for seq in (1, 2, 3):
        clean.on_object(_event("d", seq), 0.0)
    reset = wsload.Follower(2, "d")
    reset.on_object(b'{"type":"ws.subscribed","conv_id":"d","epoch":"e1","seq":0}', 0.0)
    reset.on_object(b'{"type":"ws.reset","conv_id":"d","reason":"history_truncated","epoch":"e1","seq":3}', 0.0)
    driver.followers = [follower, clean, reset]
    check = driver.check({"c": 9, "d": 3})
    assert (check["complete"], check["incomplete"]) == (1, 2)
    assert check["missing"] == 1 and check["resets"] == 1 and check["dups"] == 2


def test_backoff_delays() -> None:
    assert wsload.backoff_delay("none", 5, 0.5, 5.0) == 0.0
    assert all(0 <= wsload.backoff_delay("full", 0, 0.5, 5.0) <= 0.5 for _ in range(100))
    assert all(0.25 <= wsload.backoff_delay("equal", 0, 0.5, 5.0) <= 0.5 for _ in range(100))
    assert all(wsload.backoff_delay("full", 40, 0.5, 5.0) <= 5.0 for _ in range(100))


def _run(script: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{script}.json"
    summary = tmp_path / f"{script}.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), "--smoke", "--json", str(out),
                           "--markdown", str(summary), *extra],
                          capture_output=True, text=True, timeout=75, cwd=ROOT)
    assert out.exists(), done.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert summary.read_text().startswith(("Reconnect storm", "Many sockets")), summary.read_text()[:200]
    result["_returncode"], result["_stderr"] = done.returncode, done.stderr[-3000:]
    result["summary_head"] = summary.read_text()[:200]
    return result


def test_storm_smoke_every_client_has_every_event_once(tmp_path: Path) -> None:
    result = _run("storm", tmp_path)
    [run] = result["runs"]
    assert run["connect"]["failed"] == 0 and run["connect"]["ok"] == run["clients"] == 150, run["connect"]
    assert len(run["per_gateway"]) == 3, run["per_gateway"]  # least_conn spread them over all three
    assert run["moved"] > 0 and run["recovered"] == run["moved"], run
    check = run["check"]
    assert check["complete"] == 150 and check["incomplete"] == 0, check
    assert check["gaps"] == check["dups"] == check["resets"] == check["missing"] == 0, check
    assert check["received"] > 150, check
    assert run["publish"]["sent"] > 0 and not run["publish"]["errors"] and run["publish"]["seq_mismatch"] == 0
    assert run["latency_stay"]["before"]["count"] > 0 and run["latency_stay"]["after"]["count"] > 0
    assert run["redis"]["connected_before"]["max"] and run["redis"]["ops_storm"]["max"]
    assert run["all_recovered_s"] is not None and run["all_recovered_s"] < 15
    assert run["ok"] and result["ok"] and result["_returncode"] == 0, result["_stderr"]


def test_many_sockets_smoke_every_socket_connected_and_served(tmp_path: Path) -> None:
    result = _run("many_sockets", tmp_path)
    assert result["connected"] == result["target"] == 1000, result["ramp"]
    assert all(w["failed"] == 0 for w in result["ramp"])
    assert result["idle"]["open"] == 1000 and result["idle"]["closes"] == 0, result["idle"]
    assert result["gateway_after_ramp"]["kib_per_socket"] > 0
    steps = result["fanout"]
    assert steps and all(s["received"] > 0 and s["lost"] == 0 for s in steps), steps
    check = result["check"]
    assert check["complete"] == 1000 and check["incomplete"] == 0 and check["dups"] == check["gaps"] == 0, check
    lag = result["loop_lag"]
    assert lag["all"]["samples"] > 20 and lag["all"]["errors"] == 0 and lag["idle"]["samples"] > 0, lag["all"]
    assert lag["all"]["max_ms"] >= lag["all"]["p99_ms"] > 0, lag["all"]
    assert result["ok"] and result["_returncode"] == 0, result["_stderr"]


def test_many_sockets_smoke_over_two_workers(tmp_path: Path) -> None:
    result = _run("many_sockets", tmp_path, "--workers", "2")
    assert result["connected"] == result["target"] == 1000, result["ramp"]
    workers = result["per_worker"]
    assert [w["index"] for w in workers] == [0, 1], workers
    assert result["gateway_pids"]["supervisor"] not in [w["pid"] for w in workers]
    # SO_REUSEPORT spreads by a hash of the source port: neither worker is left out
    assert sum(w["sockets"] for w in workers) == 1000 and all(w["sockets"] > 200 for w in workers), workers
    assert sorted(result["sockets_per_gateway_id"]) == ["many-0-w0", "many-0-w1"], result["sockets_per_gateway_id"]
    # the sums cover both workers and the supervisor, not one process
    assert result["gateway_after_ramp"]["rss_mb"] > sum(w["rss_mb"] for w in workers), result["gateway_after_ramp"]
    assert result["gateway_after_ramp"]["open_files"] >= sum(w["sockets"] for w in workers)
    per_worker_lag = result["loop_lag"]["per_worker"]
    assert sorted(per_worker_lag) == sorted(str(w["pid"]) for w in workers)
    assert all(x["samples"] > 0 for x in per_worker_lag.values()), per_worker_lag
    check = result["check"]
    assert check["complete"] == 1000 and check["incomplete"] == 0 and check["dups"] == check["gaps"] == 0, check
    assert result["summary_head"].startswith("Many sockets on one gateway of 2 workers"), result["summary_head"]
    assert result["ok"] and result["_returncode"] == 0, result["_stderr"]
