"""A loopback cluster (devtools.cluster): Redis, three gateway processes and the compose nginx.conf.

Clients connect through nginx and spread over the gateways; every client receives every
event; a gateway stopped mid-stream (SIGTERM: drain with 1012; SIGKILL: the socket just
dies) loses no client: each reconnects through nginx, resumes with since/epoch and ends
with exactly seq 1..N. Also the ``python -m devtools.cluster`` command itself, and its
refusal to run without nginx.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools import cluster as cluster_module
from devtools.cluster import ClusterError, LoopbackCluster
from tests.support.polling import async_wait_until
from tests.support.proxied import ResumingClient, publish
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)

DRAIN_SECONDS = 2.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    with LoopbackCluster(gateways=3, gateway_args=["--drain-seconds", str(DRAIN_SECONDS)],
                         stop_timeout=DRAIN_SECONDS + 8) as c:
        yield c


@pytest.fixture
def full_cluster(cluster: LoopbackCluster) -> LoopbackCluster:
    """The module's cluster with every gateway running (a previous test may have stopped one)."""
    for i, child in enumerate(cluster.gateways):
        if not child.running:
            cluster.start_gateway(i)
    assert cluster.check_running() == [], cluster.check_running()
    return cluster


def new_conv() -> str:
    return f"lb-{random.getrandbits(40):x}"


async def get_json(http: httpx.AsyncClient, path: str) -> Any:
    return (await http.get(path)).json()


async def test_clients_spread_over_gateways_and_all_receive_every_event(full_cluster: LoopbackCluster) -> None:
    conv, events = new_conv(), 30
    clients = [await WsClient.connect(full_cluster.ws_url(f"conv_id={conv}")) for _ in range(12)]
    hellos = [await c.expect("ws.hello") for c in clients]
    for c in clients:
        await c.expect("ws.subscribed")
    spread = Counter(h["gateway_id"] for h in hellos)
    assert len(spread) > 1, f"nginx sent every client to one gateway: {spread}"
    assert set(spread) <= {full_cluster.gateway_id(i) for i in range(3)}

    async with httpx.AsyncClient(base_url=full_cluster.url, timeout=5) as http:
        deadline = time.monotonic() + 20
        results = [await publish(http, conv, i, deadline) for i in range(events)]
        assert [r["seq"] for r in results] == list(range(1, events + 1))
        # /metrics is not served through the load balancer (a random gateway's numbers).
        assert (await http.get("/metrics")).status_code == 404
        # Counted over every gateway, asked through any. Each gateway reports its counts to
        # Redis on its own schedule, so the total converges after the ws.subscribed frames.
        presence = await async_wait_until(
            lambda: get_json(http, f"/v1/conversations/{conv}/presence"), timeout=20,
            message="presence to count the 12 clients of every gateway", until=lambda p: p.get("connections") == 12,
            ignore=(httpx.HTTPError, ValueError))
        assert presence["connections"] == 12
    for c in clients:
        got = await c.events(events, timeout=15)
        assert [e["seq"] for e in got] == list(range(1, events + 1))
        assert [e["data"]["i"] for e in got] == list(range(events))
        await c.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm-drain", "sigkill"])
async def test_stopped_gateway_clients_resume_through_nginx(full_cluster: LoopbackCluster, sig: int) -> None:
    conv, events = new_conv(), 60
    followers = [ResumingClient(full_cluster.ws_url, conv) for _ in range(9)]
    tasks = [asyncio.create_task(f.run(events, timeout=40)) for f in followers]
    try:
        await asyncio.wait_for(asyncio.gather(*(f.connected.wait() for f in followers)), 15)
        # The victim: the gateway holding the most of our clients.
        spread = Counter(f.gateway_ids[0] for f in followers)
        assert len(spread) > 1, spread
        victim_id, on_victim = spread.most_common(1)[0]
        victim = next(i for i in range(3) if full_cluster.gateway_id(i) == victim_id)

        async with httpx.AsyncClient(base_url=full_cluster.url, timeout=5) as http:
            deadline = time.monotonic() + 30
            for i in range(events // 3):
                await publish(http, conv, i, deadline)
            stopping = asyncio.create_task(asyncio.to_thread(full_cluster.stop_gateway, victim, sig))
            for i in range(events // 3, events):  # keep publishing through the stop
                await publish(http, conv, i, deadline)
                await asyncio.sleep(0.02)
            code = await stopping
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), full_cluster.logs(victim_id)

        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    for f in followers:
        assert f.seqs == list(range(1, events + 1)), f
        assert f.resets == [], f.resets
    moved = [f for f in followers if f.gateway_ids[0] == victim_id]
    assert len(moved) == on_victim > 0
    for f in moved:
        assert f.closes, f"a client of {victim_id} never lost its connection: {f}"
        expected_first_close = 1012 if sig == signal.SIGTERM else None  # SIGKILL: nginx just drops the socket
        assert f.closes[0] == expected_first_close, f.closes
        assert f.gateway_ids[-1] != victim_id, f.gateway_ids
    for f in followers:
        if f.gateway_ids[0] != victim_id:
            assert f.closes == [], f"a client of a healthy gateway was disconnected: {f}"


def test_cluster_command_runs_and_stops_on_sigint(tmp_path: Path) -> None:
    """``python -m devtools.cluster``: prints its URLs once ready, serves through nginx, stops cleanly on SIGINT."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.cluster", "--gateways", "2", "--port", "0", "--quiet", "--",
         "--drain-seconds", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 40
        while not any(line.startswith("Ctrl-C") for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"exited early: {lines}\n{proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, lines
            lines.append(line)
        text = "".join(lines)
        lb = re.search(r"demo page\s+(http://127\.0\.0\.1:\d+)/", text)
        gateway_urls = re.findall(r"gateway\d\s+(http://127\.0\.0\.1:\d+)", text)
        files = re.search(r"files\s+(\S+)", text)
        assert lb and files and len(gateway_urls) == 2, text
        assert httpx.get(lb.group(1) + "/readyz", timeout=5).status_code == 200
        assert httpx.get(lb.group(1) + "/nginx-healthz", timeout=5).text == "ok\n"
        assert Path(files.group(1), "nginx", "upstream.conf").read_text().count("server 127.0.0.1:") == 2
        assert Path(files.group(1), "redis", "appendonlydir").is_dir()  # its own Redis, append-only

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
        for url in [lb.group(1), *gateway_urls]:
            with pytest.raises(httpx.HTTPError):
                httpx.get(url + "/healthz", timeout=1)
        assert not Path(files.group(1)).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_missing_nginx_fails_clearly_before_starting_anything(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cluster_module, "_NGINX_CANDIDATES", ())
    c = LoopbackCluster(gateways=1)
    with pytest.raises(ClusterError, match=r"nginx is not installed.*no fallback"):
        c.start()
    assert c.redis is None and c.gateways == [] and c.dir is None

    result = subprocess.run([sys.executable, "-m", "devtools.cluster", "--nginx", str(tmp_path / "nginx")],
                            capture_output=True, text=True, timeout=30, env={**os.environ},
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1
    assert "is not an executable file" in result.stderr


def test_gateway_options_owned_by_the_cluster_are_refused() -> None:
    with pytest.raises(ValueError, match="--port"):
        LoopbackCluster(gateway_args=["--port", "9000"])
    with pytest.raises(ValueError, match="--redis-url"):
        LoopbackCluster(gateway_args=["--redis-url=redis://x"])


def test_port_in_use_fails_clearly_before_starting_anything() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        c = LoopbackCluster(gateways=1, port=taken.getsockname()[1])
        with pytest.raises(ClusterError, match="is in use"):
            c.start()
    assert c.redis is None and c.gateways == [] and c.dir is None
