"""The bench harness still works: a few clients, one short step, our gateway only.

Runs ``bench/run.py --no-venv`` with this python (no peer venvs, no picows or
hdrhistogram needed: the harness falls back to websockets' sans-I/O client and exact
percentiles) against the suite's Redis, and checks the result is well formed.

The socket.io peers need their own venv and node_modules, which the harness
downloads on first use; the suite never does. Their load clients' socket.io dialect is
tested against a scripted socket.io server here (the real ``bench/client.py`` process).
The harness against the real python-socketio and Node servers is not part of the suite
(it would download them): ``python bench/run.py --scenarios smoke --servers socketio,sionode``.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.support.polling import async_wait_until

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
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


class ClientProcess:
    """``bench/client.py --impl sansio`` spoken to over its stdin / stdout, as run.py does."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()
        reply: dict[str, Any] = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 20))
        return reply


async def scripted_socketio(ws: ServerConnection, seen: list[str], refuse: bool) -> None:
    """engine.io v4 open, socket.io connect (or refusal), the join's ack, a ping, then three events of step 7."""
    seen.append(ws.request.path if ws.request is not None else "")
    await ws.send('0{"sid":"e1","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}')
    seen.append(str(await ws.recv()))
    if refuse:
        await ws.send('44{"message":"not authorized"}')
        await ws.wait_closed()
        return
    await ws.send('40{"sid":"s1"}')
    seen.append(str(await ws.recv()))
    await ws.send('431["joined"]')
    await ws.send("2")
    seen.append(str(await ws.recv()))
    for seq in (1, 2, 3):
        data = {"t": time.time_ns() // 1000, "s": 7, "p": "", "raw": {"tokens": 1}}
        event = {"type": "bench.e", "conv_id": "c1", "seq": seq, "ts": 0, "data": data}
        await ws.send(f'42["event",{json.dumps(event)}]')
    await ws.wait_closed()


async def test_load_client_speaks_socketio() -> None:
    seen: list[str] = []
    async with serve(lambda ws: scripted_socketio(ws, seen, refuse=False), "127.0.0.1", 0) as server, \
            serve(lambda ws: scripted_socketio(ws, [], refuse=True), "127.0.0.1", 0) as refusing:
        port = server.sockets[0].getsockname()[1]
        refusing_port = refusing.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(BENCH / "client.py"), "--impl", "sansio", cwd=str(ROOT),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        client = ClientProcess(proc)
        try:
            assert proc.stdout is not None
            assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 20)) == {"hello": "sansio"}
            query = "/socket.io/?EIO=4&transport=websocket&room=c1"
            connected = await client.call({"cmd": "connect", "urls": [f"ws://127.0.0.1:{port}{query}"]})
            assert connected["ok"] == 1 and connected["failed"] == 0, connected
            assert seen[:3] == [query, "40", '421["join","c1"]']

            async def count() -> int:
                return int((await client.call({"cmd": "count", "step": 7}))["count"])

            await async_wait_until(count, 15, "the three socket.io events counted", until=lambda n: n == 3)
            assert seen[3] == "3"  # the ping was answered
            taken = await client.call({"cmd": "take", "step": 7})
            assert taken["count"] == 3 and taken["closed_by_server"] == 0
            ready = await client.call({"cmd": "ready"})
            assert ready["ready"] == 1 and ready["bad"] == 0

            refused = await client.call({"cmd": "connect", "urls": [f"ws://127.0.0.1:{refusing_port}{query}"]})
            assert refused["failed"] == 1 and "socket.io refused" in json.dumps(refused["errors"]), refused
            assert (await client.call({"cmd": "close"}))["closed"] == 1
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


def _bench_run_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules.get("bench_run")
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_run"] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return module


def test_ladders_double_past_their_fixed_steps() -> None:
    run = _bench_run_module()
    fanout = run.shapes(True)["fanout"]
    assert list(run.ladder(fanout, 700_000)) == [*fanout.steps, 160_000, 320_000, 640_000]
    assert list(run.ladder(run.shapes(True)["smoke"], 10**9)) == [1_000]  # the smoke does not grow


def test_summary_has_ours_over_every_peer() -> None:
    run = _bench_run_module()

    def shape_run(capacity: int, us: float) -> dict[str, Any]:
        common = {"events_per_s": 2_000, "dps": 20_000, "lost": 0, "p50_ms": 1.0, "p999_ms": 9.0,
                  "server_us_per_delivery": us, "server_rss_mb": 50.0, "objects_per_frame": None, "bound": "",
                  "cpu_pct": {"server": 50.0, "server_sys": 10.0, "clients": 20.0, "publisher": 5.0, "others": 1.0}}
        steps = [{**common, "target_dps": 20_000, "pass": True, "p99_ms": 5.0},
                 {**common, "target_dps": 40_000, "pass": False, "p99_ms": 500.0}]
        return {"capacity_dps": capacity, "ladder_end": "failed", "steps": steps}

    results = {
        "machine": {"nproc": 2, "cpu": "x", "python": "3", "kernel": "k", "loadavg_start": [0.0], "loadavg_end": [0.0]},
        "args": {"client_procs": 2, "quick": True, "idle_connections": 10, "servers": ["ours", "socketio", "sionode"]},
        "started": "s", "finished": "f",
        "shapes": {"fanout": {"ours": shape_run(80_000, 10.0), "socketio": shape_run(20_000, 40.0),
                              "sionode": shape_run(40_000, 20.0)}},
    }
    text = run.markdown(results)
    header = next(line for line in text.splitlines() if line.startswith("| metric"))
    assert "ours ÷ python-socketio" in header and "ours ÷ socket.io (Node)" in header and "encode" not in header
    capacity = next(line for line in text.splitlines() if line.startswith("| capacity, 500"))
    assert [c.strip() for c in capacity.strip("|").split("|")][-2:] == ["4.00", "2.00"]
    cpu = next(line for line in text.splitlines() if line.startswith("| server CPU per delivery at 20,000"))
    assert [c.strip() for c in cpu.strip("|").split("|")][-2:] == ["0.25", "0.50"]
