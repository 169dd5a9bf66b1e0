"""Admission limit: at ``--max-pending-handshakes`` handshakes in progress a new websocket gets
HTTP 503 with ``Retry-After: 1`` before the upgrade; retried later, it is served, and nothing
is lost. Also: through nginx (compose's nginx.conf) the 503 reaches the client and no gateway
is taken out of rotation, and the clients retry a 503; and the open-files headroom (gateway.fdlimit): a gateway started
with a low ``ulimit -n`` lowers --max-connections and answers 503 instead of running out.

The slow part of a handshake is held on purpose: the backend's batched history reads (a
resume's replay) wait on an event the test sets.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from broadcaster.backend import BackendSettings, HistoryPage, HistoryRead
from broadcaster.backends.memory import MemoryBackend
from devtools.cluster import find_nginx, render_nginx_prefix
from devtools.procs import Supervised, free_port
from gateway.admission import Admission
from gateway.fdlimit import RESERVED_FDS, connection_cap, raise_open_files_limit
from gateway.settings import Settings, settings_from
from producers.client import BroadcasterClient, Event
from tests.support.gateway import InProcessGateway
from tests.support.polling import async_wait_until, wait_until
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)


class HeldBackend(MemoryBackend):
    """History reads wait while ``hold`` is clear; ``delay`` seconds more per batch (a slow Redis)."""

    def __init__(self) -> None:
        super().__init__(settings=BackendSettings(history_ttl=600))
        self.hold = asyncio.Event()
        self.hold.set()
        self.delay = 0.0
        self.waiting = 0

    async def history_many(self, reads: Sequence[HistoryRead]) -> list[HistoryPage]:
        self.waiting += len(reads)
        try:
            await self.hold.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.waiting -= len(reads)
        return await super().history_many(reads)


def seqs(objects: list[dict[str, Any]]) -> list[int]:
    return [o["seq"] for o in objects if not o["type"].startswith("ws.")]


async def publish(backend: MemoryBackend, conv: str, count: int) -> None:
    for i in range(count):
        await backend.publish(conv, "chat.msg", {"i": i})


async def refused(url: str) -> websockets.InvalidStatus:
    with pytest.raises(websockets.InvalidStatus) as caught:
        await WsClient.connect(url)
    return caught.value


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ---- the counter ---------------------------------------------------------------------------------


def test_admission_counts_slots_refuses_at_the_limit_and_releases_once() -> None:
    admission = Admission(2)
    first, second = admission.enter(), admission.enter()
    assert first is not None and second is not None and admission.pending == 2
    assert admission.enter() is None and admission.refused == 1
    first.release()
    first.release()  # idempotent: the endpoint releases after the initial subscribe and again at the end
    assert admission.pending == 1
    third = admission.enter()
    assert third is not None and admission.pending == 2
    unlimited = Admission(0)
    slots = [unlimited.enter() for _ in range(1000)]
    assert all(s is not None for s in slots) and unlimited.pending == 1000 and unlimited.refused == 0


def test_max_pending_handshakes_option_env_default_and_bounds() -> None:
    assert Settings().max_pending_handshakes == 128
    assert settings_from({}, {"BROADCASTER_MAX_PENDING_HANDSHAKES": "7"}).max_pending_handshakes == 7
    assert settings_from({"max_pending_handshakes": 0}, {}).max_pending_handshakes == 0
    with pytest.raises(ValueError, match="max-pending-handshakes"):
        settings_from({"max_pending_handshakes": -1}, {})


# ---- a real gateway --------------------------------------------------------------------------------


async def test_at_the_limit_a_handshake_gets_503_retry_after_and_succeeds_on_retry(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    backend = HeldBackend()
    async with InProcessGateway(Settings(max_pending_handshakes=2), backend=backend) as gw, \
            httpx.AsyncClient(base_url=gw.http_url) as http:
        admission = gw.gateway.admission
        watcher = await WsClient.connect(gw.ws_url("conv_id=c"))
        await watcher.expect("ws.subscribed")
        assert admission.pending == 0  # released once the initial subscribe ended
        await publish(backend, "c", 10)
        backend.hold.clear()
        resumers = [await WsClient.connect(gw.ws_url(f"conv_id=c&since={since}")) for since in (2, 6)]
        await async_wait_until(lambda: backend.waiting == 2, timeout=10, message="both replays held")
        assert admission.pending == 2

        for query in ("conv_id=c&since=0", "", "conv_id=other"):  # refused whatever it asks for
            refusal = await refused(gw.ws_url(query))
            assert refusal.response.status_code == 503
            assert refusal.response.headers["Retry-After"] == "1"
            assert b"too many handshakes" in refusal.response.body
        scraped = (await http.get("/metrics")).text
        assert metric(scraped, "broadcaster_handshakes_pending") == 2
        assert metric(scraped, "broadcaster_handshakes_refused_total") == 3
        assert (await http.get("/healthz")).status_code == 200  # HTTP is not counted

        await publish(backend, "c", 5)  # 11..15 live while the replays are held
        backend.hold.set()
        await async_wait_until(lambda: admission.pending == 0, timeout=10, message="the slots released")
        retried = await WsClient.connect(gw.ws_url("conv_id=c&since=0"))
        await publish(backend, "c", 2)
        for client, since in ((resumers[0], 2), (resumers[1], 6), (retried, 0), (watcher, 0)):
            got = await client.until(lambda objs: bool(seqs(objs)) and seqs(objs)[-1] == 17, timeout=10)
            assert seqs(got) == list(range(since + 1, 18)), since
            assert not [o for o in got if o["type"] == "ws.reset"]
        plain = await WsClient.connect(gw.ws_url())  # no initial subscribe: released after the hello
        await plain.expect("ws.hello")
        await async_wait_until(lambda: admission.pending == 0, timeout=5, message="the plain one released")
        assert admission.refused == 3
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, errors  # a refusal is no error (uvicorn's "without completing handshake" dropped)
        for client in (*resumers, retried, watcher, plain):
            await client.close()


async def test_a_client_gone_during_its_held_handshake_releases_its_slot() -> None:
    backend = HeldBackend()
    async with InProcessGateway(Settings(max_pending_handshakes=1), backend=backend) as gw:
        admission = gw.gateway.admission
        await publish(backend, "c", 3)
        backend.hold.clear()
        leaver = await WsClient.connect(gw.ws_url("conv_id=c&since=0"))
        await async_wait_until(lambda: admission.pending == 1, timeout=5, message="the slot taken")
        await leaver.close()
        assert (await refused(gw.ws_url("conv_id=c&since=0"))).response.status_code == 503
        backend.hold.set()
        await async_wait_until(lambda: admission.pending == 0 and len(gw.gateway.pool) == 0, timeout=10,
                               message="the slot and the connection released")
        back = await WsClient.connect(gw.ws_url("conv_id=c&since=1"))
        assert seqs(await back.until(lambda objs: len(seqs(objs)) == 2)) == [2, 3]
        await back.close()


async def test_many_concurrent_resumes_over_a_slow_backend_all_served_by_retrying() -> None:
    """Limit 2, a slow history read: 30 clients resume at once, retry a 503 with jittered backoff,
    and each ends with exactly its events; some were refused on the way."""
    backend = HeldBackend()
    backend.delay = 0.05
    clients, total = 30, 20
    async with InProcessGateway(Settings(max_pending_handshakes=2), backend=backend) as gw:
        watcher = await WsClient.connect(gw.ws_url("conv_id=s"))
        await watcher.expect("ws.subscribed")
        await publish(backend, "s", total)
        rng = random.Random(3)
        statuses: list[int] = []

        async def resume(since: int) -> list[int]:
            deadline = time.monotonic() + 30
            attempt = 0
            while True:
                try:
                    client = await WsClient.connect(gw.ws_url(f"conv_id=s&since={since}"))
                    break
                except websockets.InvalidStatus as exc:
                    statuses.append(exc.response.status_code)
                    assert time.monotonic() < deadline, "never admitted"
                    attempt += 1
                    await asyncio.sleep(rng.uniform(0, min(0.5, 0.02 * 2 ** attempt)))  # a client's backoff
            try:
                got = await client.until(lambda objs: len(seqs(objs)) >= total - since, timeout=20)
                return seqs(got)
            finally:
                await client.close()

        starts = [rng.randrange(0, total) for _ in range(clients)]
        results = await asyncio.wait_for(asyncio.gather(*(resume(s) for s in starts)), timeout=45)
        for since, got in zip(starts, results, strict=True):
            assert got == list(range(since + 1, total + 1)), since
        assert statuses and set(statuses) == {503}
        assert gw.gateway.admission.refused == len(statuses)
        assert gw.gateway.admission.pending == 0
        await watcher.close()


async def test_the_python_client_retries_a_503_and_resumes_without_loss() -> None:
    backend = HeldBackend()
    async with InProcessGateway(Settings(max_pending_handshakes=1), backend=backend) as gw:
        await publish(backend, "p", 4)
        backend.hold.clear()
        holder = await WsClient.connect(gw.ws_url("conv_id=p&since=0"))  # takes the one slot
        await async_wait_until(lambda: backend.waiting == 1, timeout=5, message="the holder's replay held")
        client = BroadcasterClient(gw.ws_url(), backoff_initial=0.05, backoff_max=0.2)
        await client.subscribe("p", since=1, epoch=None)
        await client.start()
        try:
            await async_wait_until(lambda: client.stats.failed_attempts >= 2, timeout=10,
                                   message="the client refused (503) and retrying")
            assert gw.gateway.admission.refused >= 2
            backend.hold.set()
            await publish(backend, "p", 2)
            got: list[int] = []
            while len(got) < 5:
                item = await asyncio.wait_for(client.get(), timeout=10)
                if isinstance(item, Event):
                    got.append(item.seq)
            assert got == [2, 3, 4, 5, 6]
        finally:
            await client.close()
            await holder.close()


# ---- nginx: a refused websocket goes back to the client, and no gateway is taken out ------------------


async def test_nginx_passes_a_503_to_the_client_and_keeps_every_gateway_in_rotation(tmp_path: Path) -> None:
    """Both gateways at their limit: through compose's nginx.conf the client gets the gateway's 503 with
    Retry-After (not nginx's 502 "no live upstreams"); once they have room the retries spread over both
    (a 503 retried by nginx would count as a failure and take the gateway out for fail_timeout)."""
    nginx = find_nginx()
    backends = [HeldBackend(), HeldBackend()]
    async with InProcessGateway(Settings(max_pending_handshakes=1, gateway_id="a"), backend=backends[0]) as a, \
            InProcessGateway(Settings(max_pending_handshakes=1, gateway_id="b"), backend=backends[1]) as b:
        holders = []
        for gw, backend in ((a, backends[0]), (b, backends[1])):
            await publish(backend, "n", 2)
            backend.hold.clear()
            holders.append(await WsClient.connect(gw.ws_url("conv_id=n&since=0")))  # direct: at its limit
        await async_wait_until(lambda: backends[0].waiting == backends[1].waiting == 1, timeout=5,
                               message="both holders' replays held")
        lb_port = free_port()
        conf = render_nginx_prefix(tmp_path, Path(__file__).parent.parent / "deploy" / "nginx" / "nginx.conf",
                                   "127.0.0.1", lb_port, [a.settings.port, b.settings.port])
        proxy = Supervised("nginx", [nginx, "-p", f"{tmp_path}/", "-c", str(conf), "-e", "stderr",
                                     "-g", "daemon off;"], str(tmp_path / "nginx.log"))
        proxy.start()
        clients: list[WsClient] = []
        try:
            def answers() -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{lb_port}/nginx-healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            await asyncio.to_thread(proxy.wait_until, answers, 10, what="nginx answering")
            refusal = await refused(f"ws://127.0.0.1:{lb_port}/ws")
            assert refusal.response.status_code == 503 and refusal.response.headers["Retry-After"] == "1"
            assert b"too many handshakes" in refusal.response.body
            assert a.gateway.admission.refused + b.gateway.admission.refused == 1  # not retried by nginx
            for backend in backends:
                backend.hold.set()
            await async_wait_until(lambda: a.gateway.admission.pending == b.gateway.admission.pending == 0,
                                   timeout=10, message="both gateways free")
            for _ in range(4):  # the client's retries: least_conn spreads them, no gateway was disabled
                client = await WsClient.connect(f"ws://127.0.0.1:{lb_port}/ws")
                clients.append(client)
                await client.expect("ws.hello")
            assert len(a.gateway.pool) >= 2 and len(b.gateway.pool) >= 2  # its holder and at least one more
        finally:
            proxy.stop()
            for backend in backends:
                backend.hold.set()
            for client in (*clients, *holders):
                await client.close()


# ---- open-files headroom ------------------------------------------------------------------------------


def test_connection_cap_leaves_reserved_descriptors() -> None:
    assert connection_cap(50_000, 20_000) == 20_000 - RESERVED_FDS
    assert connection_cap(1000, 20_000) == 1000  # fits: unchanged
    assert connection_cap(50_000, 300) == 300 - RESERVED_FDS
    assert connection_cap(50_000, 100) == 1  # a tiny limit still serves one
    assert connection_cap(50_000, None) == 50_000  # unlimited
    assert connection_cap(500, 1000, reserved=600) == 400


def test_raise_open_files_limit_reports_the_soft_limit_in_force() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = raise_open_files_limit()
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert limit == (None if now == resource.RLIM_INFINITY else now)
    assert now >= soft and (hard == resource.RLIM_INFINITY or now == hard)


def _low_open_files() -> None:  # runs in the child before exec: soft 200, hard 300
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300))


def test_gateway_with_few_open_files_clamps_max_connections_and_keeps_metrics_up(
        tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    """``ulimit -n`` 200 (hard 300): the gateway raises it to 300, lowers --max-connections to 44 with a
    warning, and answers 503 to the rest of 320 websockets while /metrics, Redis and publishes work."""
    port = free_port()
    log_path = tmp_path / "gateway.log"
    command = [sys.executable, "-m", "gateway.cli", "--host", "127.0.0.1", "--port", str(port),
               "--redis-url", redis_url, "--key-prefix", key_prefix, "--publish-key", "k", "--ping-interval", "0"]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_low_open_files)
    try:
        def ready() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return httpx.get(base + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=20, message="the gateway ready")
        cap = 300 - RESERVED_FDS
        assert f"--max-connections 50000 lowered to {cap}: the open-files limit is 300" in log_path.read_text()
        outcome = asyncio.run(_flood(port, 320))
        assert outcome["open"] == cap and outcome["refused"] == 320 - cap, outcome
        assert outcome["metrics"] == [200, 200, 200] and outcome["connections"] == cap, outcome
        assert outcome["received"] == cap, outcome  # a publish over HTTP reached every open socket (via Redis)
        assert proc.poll() is None
        assert "Too many open files" not in log_path.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def _flood(port: int, attempts: int) -> dict[str, Any]:
    """Open ``attempts`` websockets to conv f; scrape /metrics during and after; publish one event."""
    clients: list[WsClient] = []
    refused_count, metrics_status = 0, []
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        try:
            for n in range(attempts):
                try:
                    client = await WsClient.connect(f"ws://127.0.0.1:{port}/ws?conv_id=f")
                except websockets.InvalidStatus as exc:
                    assert exc.response.status_code == 503 and b"too many connections" in exc.response.body
                    refused_count += 1
                else:
                    await client.expect("ws.subscribed")
                    clients.append(client)
                if n in (attempts // 2, attempts - 1):
                    metrics_status.append((await http.get("/metrics")).status_code)
            scraped = await http.get("/metrics")
            metrics_status.append(scraped.status_code)
            published = await http.post("/v1/conversations/f/events", json={"type": "chat.msg", "data": 1},
                                        headers={"Authorization": "Bearer k"})
            assert published.status_code == 200, published.text
            received = 0
            for client in clients:
                if (await client.events(1, timeout=10))[0]["seq"] == 1:
                    received += 1
            return {"open": len(clients), "refused": refused_count, "metrics": metrics_status,
                    "connections": metric(scraped.text, "broadcaster_connections"), "received": received}
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
