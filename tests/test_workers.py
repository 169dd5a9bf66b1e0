"""``broadcaster-gateway --workers N``: real supervisor and workers on one port, the local Redis, real sockets.

What gateway/workers.py promises: every worker serves the shared port (SO_REUSEPORT) with a
gateway id of its own, events reach the clients of every worker, ``/metrics`` on the shared
port is every worker's (labelled ``worker``), SIGTERM drains them all (1012, exit 0), a
SIGKILLed worker is started again in its slot, a start-up failure of a worker stops the
whole start with its status, and the workers die with their supervisor.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import Settings, settings_from, worker_count
from tests.support.gateway import GatewayProcess, free_port
from tests.support.polling import async_wait_until, wait_until
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(120)

DRAIN = 3.0
CLIENTS = 40
READY_LINE = re.compile(r"worker (\d+) ready: pid (\d+), gateway id (\S+)")


def log_text(gw: GatewayProcess) -> str:
    """The whole log of the supervisor and its workers (``output()`` is only its tail)."""
    return Path(gw.log).read_text(errors="replace")


def ready_workers(gw: GatewayProcess) -> list[tuple[int, int, str]]:
    """(index, pid, gateway id) of every "worker N ready" line so far, in order."""
    return [(int(i), int(pid), gid) for i, pid, gid in READY_LINE.findall(log_text(gw))]


def current_workers(gw: GatewayProcess, count: int, timeout: float = 20.0) -> dict[int, tuple[int, str]]:
    """index -> (pid, gateway id) of the latest ready worker of each slot, once all ``count`` are ready."""
    def latest() -> dict[int, tuple[int, str]]:
        return {index: (pid, gid) for index, pid, gid in ready_workers(gw)}

    return wait_until(latest, timeout, f"{count} workers ready", until=lambda got: len(got) == count)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped yet) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def samples(text: str, name: str) -> dict[str, float]:
    """worker label -> value of the unlabelled-otherwise metric ``name`` (a sample name) in ``text``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and set(s.labels) == {"worker"}:
                out[s.labels["worker"]] = s.value
    return out


@pytest.fixture
def workers2(redis_url: str, key_prefix: str) -> Iterator[GatewayProcess]:
    gw = GatewayProcess("--workers", "2", "--redis-url", redis_url, "--key-prefix", key_prefix,
                        "--drain-seconds", str(DRAIN), "--gateway-id", "wk")
    try:
        yield gw.start(timeout=30)
    finally:
        gw.stop()


@pytest.fixture
async def http(workers2: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=workers2.http_url, timeout=10) as client:
        yield client


async def connect_clients(gw: GatewayProcess, conv: str, count: int) -> tuple[list[WsClient], list[str]]:
    clients = list(await asyncio.gather(*(WsClient.connect(gw.ws_url(f"conv_id={conv}")) for _ in range(count))))
    hellos = [await c.expect("ws.hello") for c in clients]
    for c in clients:
        await c.expect("ws.subscribed")
    return clients, [h["gateway_id"] for h in hellos]


async def test_two_workers_share_the_port_events_metrics_and_drain(workers2: GatewayProcess,
                                                                   http: httpx.AsyncClient) -> None:
    gw = workers2
    workers = current_workers(gw, 2)
    ids = {gid for _, gid in workers.values()}
    assert ids == {"wk-w0", "wk-w1"}
    clients, hello_ids = await connect_clients(gw, "shared", CLIENTS)
    assert set(hello_ids) == ids, "the kernel put every socket on one worker"

    for i in range(3):  # each publish goes to whichever worker accepts it
        r = await http.post("/v1/conversations/shared/events", json={"type": "chat.msg", "data": {"i": i}})
        assert r.status_code == 200, r.text
    for c in clients:
        got = await c.events(3, timeout=15)
        assert [e["data"]["i"] for e in got] == [0, 1, 2] and [e["seq"] for e in got] == [1, 2, 3]

    per_worker = {gid: hello_ids.count(gid) for gid in ids}
    want = {str(index): float(per_worker[gid]) for index, (_, gid) in workers.items()}
    for _ in range(6):  # any worker may answer a scrape: every one gives the whole picture
        text = (await http.get("/metrics")).text
        assert samples(text, "broadcaster_worker_up") == {"0": 1.0, "1": 1.0}
        assert samples(text, "broadcaster_connections") == want
        assert samples(text, "broadcaster_worker_restarts_total") == {"0": 0.0, "1": 0.0}
        opened = samples(text, "broadcaster_connections_opened_total")
        assert sum(opened.values()) >= CLIENTS
    presence = await async_wait_until(
        lambda: http.get("/v1/conversations/shared/presence"), 20, "presence over both workers",
        until=lambda r: r.json()["connections"] == CLIENTS)
    assert presence.json()["by_profile"] == {"default": CLIENTS}

    started = time.monotonic()
    gw.signal(signal.SIGTERM)
    await async_wait_until(lambda: http.get("/readyz"), DRAIN, "readyz 503 while draining",
                           until=lambda r: r.status_code == 503)
    assert (await http.get("/healthz")).status_code == 200
    codes = await asyncio.gather(*(c.close_code(timeout=DRAIN + 3) for c in clients))
    assert codes == [1012] * CLIENTS
    code = await asyncio.to_thread(gw.wait, DRAIN + 8)
    assert code == 0, gw.output()[-3000:]
    assert time.monotonic() - started < DRAIN + 5
    for pid, _ in workers.values():
        assert not alive(pid)
    for index, (pid, _) in workers.items():
        assert f"worker {index} (pid {pid}) exited with status 0" in log_text(gw)


async def test_a_sigkilled_worker_is_restarted_in_its_slot(workers2: GatewayProcess,
                                                           http: httpx.AsyncClient) -> None:
    gw = workers2
    workers = current_workers(gw, 2)
    clients, hello_ids = await connect_clients(gw, "kill", CLIENTS)
    victim_pid, victim_id = workers[1]
    survivors = [c for c, gid in zip(clients, hello_ids, strict=True) if gid != victim_id]
    dropped = [c for c, gid in zip(clients, hello_ids, strict=True) if gid == victim_id]
    assert survivors and dropped

    os.kill(victim_pid, signal.SIGKILL)
    for c in dropped:  # no close frame from a killed process: the socket just ends
        assert await c.close_code(timeout=10) in (None, 1006)
    restarted = wait_until(lambda: [w for w in ready_workers(gw) if w[0] == 1], 20, "worker 1 ready again",
                           until=lambda found: len(found) == 2)
    _, new_pid, new_id = restarted[-1]
    assert new_pid != victim_pid and new_id == victim_id  # same slot, same gateway id
    assert f"worker 1 (pid {victim_pid}, gateway id wk-w1) exited with signal SIGKILL" in log_text(gw)
    assert alive(workers[0][0]), "the other worker must not be taken down"

    r = await http.post("/v1/conversations/kill/events", json={"type": "chat.msg", "data": {"n": 1}})
    assert r.status_code == 200
    for c in survivors:
        (event,) = await c.events(1, timeout=15)
        assert event["data"] == {"n": 1}

    def scraped() -> str:
        return httpx.get(gw.http_url + "/metrics", timeout=5).text

    text = wait_until(scraped, 15, "both workers up, one restart counted",
                      until=lambda t: samples(t, "broadcaster_worker_up") == {"0": 1.0, "1": 1.0}
                      and samples(t, "broadcaster_worker_restarts_total") == {"0": 0.0, "1": 1.0})
    assert samples(text, "broadcaster_connections")["0"] == len(survivors)
    late, late_ids = await connect_clients(gw, "kill", 20)  # the restarted worker takes connections again
    assert new_id in late_ids
    for c in late + survivors:
        await c.close()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTER_")}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "--host", "127.0.0.1", *args], capture_output=True,
                          text=True, timeout=timeout, env={**environ, **(env or {})})


@pytest.mark.parametrize("args, env, message", [
    (["--workers", "0"], {}, "--workers must be a positive integer or auto, not '0'"),
    (["--workers", "-2"], {}, "--workers must be a positive integer or auto, not '-2'"),
    (["--workers", "many"], {}, "--workers must be a positive integer or auto, not 'many'"),
    ([], {"BROADCASTER_WORKERS": "0"}, "--workers must be a positive integer or auto"),
    (["--workers", "2"], {}, "--workers 2 needs --redis-url: on the embedded memory backend"),
    ([], {"BROADCASTER_WORKERS": "auto"}, "--workers auto needs --redis-url"),
])
def test_bad_worker_counts_are_refused(args: list[str], env: dict[str, str], message: str) -> None:
    result = run_cli(*args, env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_worker_count_values() -> None:
    assert worker_count("1") == 1 and worker_count(" 4 ") == 4
    assert worker_count("auto") == len(os.sched_getaffinity(0))
    assert settings_from({"workers": "auto", "redis_url": "redis://x:6379/0"}, {}).workers == "auto"
    assert settings_from({}, {"BROADCASTER_WORKERS": "3", "BROADCASTER_REDIS_URL": "redis://x/0"}).workers == "3"
    assert Settings().workers == "1"
    assert settings_from({"workers": "1"}, {}).redis_url is None  # one worker on the memory backend is fine


def test_a_worker_failing_at_start_up_stops_the_start_with_its_status(redis_url: str, key_prefix: str) -> None:
    result = run_cli("--workers", "2", "--redis-url", redis_url, "--key-prefix", key_prefix,
                     "--port", str(free_port()), "--plugin", "nowhere_module:setup")
    assert result.returncode == 2, result.stderr
    assert "nowhere_module:setup" in result.stderr and "before it was ready" in result.stderr


def test_a_taken_port_is_a_start_up_failure(redis_url: str, key_prefix: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--workers", "2", "--redis-url", redis_url, "--key-prefix", key_prefix, "--port", str(port))
    assert result.returncode == 3, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_workers_drain_and_exit_when_the_supervisor_is_killed(workers2: GatewayProcess) -> None:
    workers = current_workers(workers2, 2)
    workers2.kill()  # SIGKILL the supervisor: the kernel SIGTERMs its workers (PR_SET_PDEATHSIG)
    pids = [pid for pid, _ in workers.values()]
    wait_until(lambda: not any(alive(pid) for pid in pids), DRAIN + 10, f"workers {pids} to exit")


def test_a_worker_that_keeps_dying_makes_the_supervisor_give_up(workers2: GatewayProcess) -> None:
    gw = workers2
    survivor_pid = current_workers(gw, 2)[0][0]
    killed: list[int] = []
    for _ in range(5):  # each exit within 30 s of its start: the 5th in a row is the last
        pid = wait_until(lambda: [p for i, p, _ in ready_workers(gw) if i == 1 and p not in killed], 30,
                         "worker 1 ready (again)")[-1]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    code = gw.wait(DRAIN + 15)
    assert code == 70, log_text(gw)[-3000:]
    assert "5 exits in a row" in log_text(gw)
    assert f"worker 0 (pid {survivor_pid}) exited with status 0" in log_text(gw)  # drained, not killed
