"""Benchmark harness: our gateway against encode/broadcaster, python-socketio, Node socket.io and a floor server.

    python bench/run.py                 # every scenario, every server (~45 min on a quiet 2-core box, estimated)
    python bench/run.py --quick         # fewer, shorter steps (~25 min, estimated)
    python bench/run.py --scenarios fanout,idle --servers ours,floor
    python bench/run.py --quick --scenarios fanout,idle --servers ours,socketio,sionode,floor
    python bench/run.py --no-venv --scenarios smoke --servers ours   # what tests/test_bench_smoke.py runs
    python bench/run.py --scenarios fanout,broadcast,idle --servers ours,sse   # SSE against /ws

Server ``sse`` is our gateway again, its clients on ``GET /sse`` (Server-Sent Events,
one conversation per stream) instead of ``/ws``; the summary then adds an "SSE ÷ /ws" table.

Run it with the project's python (the one where ``pip install -e .`` was done): that
python runs our gateway and the publisher. Unless ``--no-venv``, the harness then
makes virtualenvs under ``bench/.venv/`` (git-ignored) and re-executes itself in the
tools one:

* ``tools``  (``bench/requirements.txt``): the orchestrator and the load clients
  (picows on uvloop, hdrhistogram, psutil);
* ``encode`` (``bench/requirements-encode.txt``): PyPI ``broadcaster[redis]`` + Starlette
  on uvicorn - its own venv because that distribution is also called ``broadcaster``;
* ``floor``  (``bench/requirements-floor.txt``): the hand-written floor server;
* ``socketio`` (``bench/requirements-socketio.txt``): python-socketio's ``AsyncServer`` on
  uvicorn with ``AsyncRedisManager`` (``servers/socketio_app.py``) and its external emitter
  (``emit_socketio.py``, a write-only ``AsyncRedisManager``).

Server ``sionode`` is socket.io 4.8 on Node with ``@socket.io/redis-adapter`` 8
(``servers/socketio_node/server.js``), fed by ``@socket.io/redis-emitter``
(``servers/socketio_node/emitter.js``); ``npm ci`` installs its pinned
``package-lock.json`` into ``servers/socketio_node/node_modules`` (git-ignored) when
that is missing or older than the lock file. It needs ``node`` (18+) and ``npm``.

Our gateway, encode/broadcaster and the floor consume the same Redis publishes (see
``loadpub.py``); the socket.io peers are fed by their own emitters, at the same paced
rate, with the same ~100 B ``data`` carrying the same publish-time stamp, as each
ships (python-socketio: one JSON message per emit on one channel every server reads;
Node: msgpack on a channel per room). Their load clients speak socket.io over a plain
websocket (``client.py``) and join one room (= conversation) each.

Ladders: each capacity shape (fanout, chat, broadcast, profile) steps through its fixed
rates, then keeps doubling the rate until the server has failed ``--max-failures``
steps, the publisher can no longer keep the rate (the step is then publisher-bound and
higher rates would measure the publisher), or ``--max-dps``. Every step is bounded
(publishing at most 2 x its duration + 5 s, 15 s to drain; a step whose client or
publisher stops answering ends that server's ladder), so the run stops by itself. The
durations above are for the five default servers, estimated from the parts measured
(connecting 10,000 idle python-socketio sockets alone takes 1-3 min). By default a
private ``redis-server`` is started on a free loopback port (no persistence) and
killed at the end; ``--redis-url`` uses an existing one (keys go under a random
prefix and are deleted afterwards). All traffic stays on 127.0.0.1, every step is
bounded in time and the run stops by itself. Results: a JSON file and a markdown
summary (``--json`` / ``--markdown``; printed too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = BENCH / ".venv"
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(ROOT))  # devtools (standard library only: this may run in the tools venv)

import hist  # noqa: E402
from scenario_support import Child, drain, gather_calls  # noqa: E402

from devtools.procs import Supervised, free_port, http_status, redis_ping  # noqa: E402

try:
    import psutil
except ImportError:  # pragma: no cover - the fallback reads /proc
    psutil = None

_PROC_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, IndexError)
if psutil is not None:
    _PROC_ERRORS += (psutil.Error,)

SSE = "sse"
"""Our gateway with its clients on /sse instead of /ws (not in the default run: ``--servers ours,sse``)."""
SERVERS = ("ours", "encode", "socketio", "sionode", "floor")
LABELS = {"ours": "ours", "encode": "encode/broadcaster", "socketio": "python-socketio",
          "sionode": "socket.io (Node)", "floor": "floor", SSE: "ours on /sse"}
SOCKETIO = ("socketio", "sionode")
"""The socket.io peers: their clients speak socket.io, their own emitters feed them."""
NODE_DIR = BENCH / "servers" / "socketio_node"
OURS = ("ours", SSE)
SCENARIOS = ("fanout", "chat", "broadcast", "idle", "together", "profile", "publish")
P99_LIMIT_MS = 100.0


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- virtualenvs ------------------------------------------------------------------------------


def ensure_venv(name: str, requirements: Path) -> Path:
    """``bench/.venv/<name>`` with ``requirements`` installed (re-made when the file changes)."""
    directory = VENVS / name
    python = directory / "bin" / "python"
    marker = directory / ".requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if python.exists() and marker.exists() and marker.read_text() == digest:
        return python
    log(f"creating venv {directory} from {requirements.name}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(directory)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], check=True)
    marker.write_text(digest)
    return python


def ensure_node_modules() -> Path:
    """``node`` (18+), with the socket.io peer's pinned packages installed by ``npm ci`` when missing or stale."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        sys.exit("server sionode needs node (18+) and npm on PATH (e.g. apt-get install nodejs npm); "
                 "or leave it out of --servers")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    if int(re.sub(r"^v(\d+).*", r"\1", version) or 0) < 18:
        sys.exit(f"server sionode needs node 18 or newer (found {version})")
    lock = NODE_DIR / "package-lock.json"
    marker = NODE_DIR / "node_modules" / ".package-lock.sha256"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    if not marker.exists() or marker.read_text() != digest:
        log(f"npm ci in {NODE_DIR}")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True)
        marker.write_text(digest)
    return Path(node)


# --- processes ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    try:
        if psutil is not None:
            times = psutil.Process(pid).cpu_times()
            return float(times.user + times.system)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except _PROC_ERRORS:
        return 0.0


def sys_seconds(pid: int) -> float:
    """Kernel-mode CPU seconds of ``pid`` (socket writes and reads live here)."""
    try:
        if psutil is not None:
            return float(psutil.Process(pid).cpu_times().system)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[12]) / os.sysconf("SC_CLK_TCK")
    except _PROC_ERRORS:
        return 0.0


def rss_bytes(pid: int) -> int:
    try:
        if psutil is not None:
            return int(psutil.Process(pid).memory_info().rss)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except _PROC_ERRORS:
        pass
    return 0


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every core), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0


def renice(pid: int, niceness: int) -> None:
    """Give a measured process priority ``niceness`` (negative = ahead of other work; needs root)."""
    if niceness:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, niceness)
        except OSError as exc:
            log(f"warning: cannot renice {pid} to {niceness}: {exc}")


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def ephemeral_ports() -> int:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return high - low + 1
    except (OSError, ValueError):
        return 28232


@dataclass
class Server:
    kind: str
    ports: list[int]
    procs: list[Supervised]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def sys_cpu(self) -> float:
        return sum(sys_seconds(pid) for pid in self.pids)

    def rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids)

    def frames(self) -> tuple[float, float]:
        """Our gateway's (frames, objects) written so far, from /metrics (0, 0 for the peers)."""
        if self.kind not in OURS:
            return 0.0, 0.0
        frames = objects = 0.0
        for port in self.ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("broadcaster_frames_written"):
                    frames += float(line.split()[-1])
                elif line.startswith("broadcaster_objects_written"):
                    objects += float(line.split()[-1])
        return frames, objects

    def url(self, index: int, conv: str, profile: str | None) -> str:
        port = self.ports[index % len(self.ports)]
        if self.kind in SOCKETIO:
            return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket&room={conv}"
        query = f"conv_id={conv}" + (f"&profile={profile}" if profile else "")
        if self.kind == SSE:
            return f"http://127.0.0.1:{port}/sse?{query}"
        return f"ws://127.0.0.1:{port}/ws?{query}"

    def stop(self) -> None:
        """SIGTERM to every server process at once, SIGKILL to those still running 10 s later."""
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            if proc.proc is not None:
                proc.wait(max(0.1, deadline - time.monotonic()))


# --- the run's context ----------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    project_python: str
    tools_python: str
    peer_python: dict[str, str]
    """Interpreter of each peer: a venv's python, or ``node`` for ``sionode``."""
    redis_url: str
    redis_pid: int | None
    logdir: Path
    results: dict[str, Any] = field(default_factory=dict)
    quiet_budget: float = 0.0
    """Seconds left for waiting out (and re-running steps under) other work on the machine."""

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)


@dataclass(frozen=True)
class Shape:
    """Clients over conversations, and the delivery rates (deliveries/s) to step through."""

    name: str
    clients: int
    convs: int
    steps: tuple[int, ...]
    duration: float
    profile: str | None = None
    connect: str = "waves"  # "waves": one client per conversation first; "together": all at once
    grow: bool = False
    """After ``steps``, keep doubling the rate (see :func:`ladder`)."""

    @property
    def fanout(self) -> float:
        return self.clients / self.convs


def shapes(quick: bool) -> dict[str, Shape]:
    d = 3.0 if quick else 5.0
    fanout_steps = (10_000, 20_000, 40_000, 60_000, 80_000) if quick else (
        10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000, 120_000, 150_000)
    return {
        "fanout": Shape("fanout", 500, 50, fanout_steps, d, grow=True),
        "chat": Shape("chat", 5000, 5000, (2_500, 5_000, 10_000) if quick else
                      (2_500, 5_000, 7_500, 10_000, 12_500, 15_000, 20_000), d, grow=True),
        "broadcast": Shape("broadcast", 2000, 1, (20_000, 40_000, 80_000) if quick else
                           (10_000, 20_000, 30_000, 40_000, 60_000, 80_000, 100_000, 150_000), d, grow=True),
        "profile": Shape("profile", 500, 50, fanout_steps, d, profile="bench", grow=True),
        "together": Shape("together", 500, 50, (20_000,), 2.0, connect="together"),
        "smoke": Shape("smoke", 20, 4, (1_000,), 2.0),
    }


def ladder(shape: Shape, max_dps: int) -> Iterator[int]:
    """The shape's rates, then (if it grows) doubling from the last one up to ``max_dps``.

    The caller stops early: ``--max-failures`` failed steps, or a publisher that cannot keep the rate.
    """
    yield from shape.steps
    target = shape.steps[-1] * 2 if shape.grow and shape.steps else max_dps + 1
    while target <= max_dps:
        yield target
        target *= 2


def start_server(ctx: Context, kind: str, prefix: str, profile: str | None) -> Server:
    count = ctx.args.gateways if kind in OURS else 1
    env = dict(os.environ)
    procs, ports = [], []
    for index in range(count):
        port = free_port()
        if kind in OURS:
            argv = [ctx.args.gateway_python or ctx.project_python, "-m", "gateway.cli", "--host", "127.0.0.1",
                    "--port", str(port), "--redis-url", ctx.redis_url, "--key-prefix", prefix,
                    "--log-level", "warning", "--drain-seconds", "0", "--history-size", "100",
                    "--history-ttl", "600", "--gateway-id", f"bench-{index}"]
            if profile:
                argv += ["--profiles", str(BENCH / "servers" / "profiles.toml")]
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH / "servers"), env.get("PYTHONPATH")]))
        elif kind == "encode":
            argv = [ctx.peer_python["encode"], str(BENCH / "servers" / "encode_app.py"), "--port", str(port),
                    "--redis-url", ctx.redis_url, "--prefix", prefix]
        elif kind == "socketio":
            argv = [ctx.peer_python["socketio"], str(BENCH / "servers" / "socketio_app.py"), "--port", str(port),
                    "--redis-url", ctx.redis_url, "--prefix", prefix]
        elif kind == "sionode":
            argv = [ctx.peer_python["sionode"], str(NODE_DIR / "server.js"), "--port", str(port),
                    "--redis-url", ctx.redis_url, "--prefix", prefix]
        else:
            argv = [ctx.peer_python["floor"], str(BENCH / "servers" / "floor.py"), "--port", str(port),
                    "--redis-url", ctx.redis_url, "--prefix", prefix]
        cwd = ctx.args.gateway_root if kind in OURS and ctx.args.gateway_root else str(ROOT)
        logfile = ctx.logdir / f"server-{kind}-{port}.log"
        procs.append(Supervised(f"{kind} server on port {port}", argv, logfile, cwd=cwd, env=env).start())
        renice(procs[-1].pid, ctx.args.nice)
        ports.append(port)
    server = Server(kind, ports, procs)
    log(f"  {kind} server pid(s) {server.pids} on port(s) {ports}")
    deadline = time.monotonic() + 30
    try:
        for proc, port in zip(procs, ports, strict=True):
            url = f"http://127.0.0.1:{port}/healthz"
            proc.wait_until(lambda url=url: http_status(url) == 200, max(0.0, deadline - time.monotonic()),
                            what="answering /healthz", interval=0.1, details=lambda: f"(logs in {ctx.logdir})")
    except BaseException:
        server.stop()
        raise
    return server


# --- one shape against one server -----------------------------------------------------------------


class Load:
    """The publisher and the client processes of one (shape, server) measurement."""

    def __init__(self, ctx: Context, server: Server, shape: Shape, prefix: str) -> None:
        self.ctx, self.server, self.shape, self.prefix = ctx, server, shape, prefix
        self.convs = [f"c{i}" for i in range(shape.convs)]
        self.subs = [0] * shape.convs
        procs = max(1, min(ctx.args.client_procs, shape.clients))
        impl = ["--impl", ctx.args.client_impl]
        self.clients = [Child(f"client-{shape.name}-{server.kind}-{i}",
                              [ctx.tools_python, str(BENCH / "client.py"), *impl],
                              ctx.logdir / f"client-{shape.name}-{server.kind}-{i}.log") for i in range(procs)]
        if server.kind == "socketio":
            feeder = [ctx.peer_python["socketio"], str(BENCH / "emit_socketio.py")]
        elif server.kind == "sionode":
            feeder = [ctx.peer_python["sionode"], str(NODE_DIR / "emitter.js")]
        else:
            feeder = [ctx.project_python, str(BENCH / "loadpub.py")]
        self.publisher = Child(f"publisher-{shape.name}-{server.kind}", feeder,
                               ctx.logdir / f"publisher-{shape.name}-{server.kind}.log")
        self.impl = ""

    async def __aenter__(self) -> Load:
        await self.publisher.start(self.ctx.args.nice)
        await self.publisher.call({"cmd": "init", "url": self.ctx.redis_url, "prefix": self.prefix,
                                   "convs": self.convs, "history_size": 100, "history_ttl": 600,
                                   "payload_bytes": self.ctx.args.payload_bytes, "json_copy": True})
        started = await asyncio.gather(*(c.start(self.ctx.args.nice) for c in self.clients))
        self.impl = started[0].hello.get("hello", "?")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.call({"cmd": "close"}, timeout=30)
            await client.stop()
        with contextlib.suppress(Exception):
            await self.publisher.call({"cmd": "quit", "cleanup": self.ctx.args.redis_url is not None}, timeout=120)
        await self.publisher.stop()

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.clients]

    async def connect(self, indices: Sequence[int]) -> dict[str, int]:
        batches: list[list[str]] = [[] for _ in self.clients]
        for j in indices:
            conv_index = j % self.shape.convs
            self.subs[conv_index] += 1
            url = self.server.url(j, self.convs[conv_index], self.shape.profile)
            batches[j % len(self.clients)].append(url)
        replies = await asyncio.gather(*(c.call({"cmd": "connect", "urls": b, "concurrency": 100}, timeout=300)
                                         for c, b in zip(self.clients, batches, strict=True)))
        failed = sum(r["failed"] for r in replies)
        if failed:
            errors = [r["errors"] for r in replies if r["errors"]]
            log(f"  {failed} connections failed: {errors}")
        retried = sum(r.get("retried", 0) for r in replies)
        if retried:  # refused and tried again (a 503 past --max-pending-handshakes): part of connecting
            log(f"  {retried} connects refused and retried: {[r.get('retry_reasons') for r in replies]}")
        return {"ok": sum(r["ok"] for r in replies), "failed": failed}

    async def ready(self) -> dict[str, int]:
        replies = await asyncio.gather(*(c.call({"cmd": "ready"}) for c in self.clients))
        return {"ready": sum(r["ready"] for r in replies), "closed": sum(r["closed_by_server"] for r in replies)}

    async def probe_until_ready(self, want: int, timeout: float) -> int:
        """Publish one event per conversation until ``want`` connections received one (or time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            await self.publisher.call({"cmd": "probe", "step": 0})
            await asyncio.sleep(0.3)
            ready = (await self.ready())["ready"]
            if ready >= want or time.monotonic() > deadline:
                return ready

    async def establish(self) -> dict[str, Any]:
        n, c = self.shape.clients, self.shape.convs
        began = time.monotonic()
        if self.ctx.args.warmup_connection:
            # One extra socket on a conversation nobody publishes to, before everything else:
            # encode/broadcaster 0.3.1 loses its Redis listener on the very first subscription
            # (redis-py's listen() returns while that SUBSCRIBE is in flight) until a second one
            # comes; with a single conversation it would deliver nothing at all (BENCHMARKS.md).
            await self.clients[0].call({"cmd": "connect", "urls": [self.server.url(0, "warmup", None)]})
        if self.shape.connect == "together":
            connected = await self.connect(range(n))
            ready = await self.probe_until_ready(n, 5.0)
        else:
            first = await self.connect(range(min(n, c)))
            ready = await self.probe_until_ready(first["ok"], 30.0)
            connected = first
            if n > c:
                rest = await self.connect(range(c, n))
                connected = {"ok": first["ok"] + rest["ok"], "failed": first["failed"] + rest["failed"]}
                ready = await self.probe_until_ready(connected["ok"], 30.0)
        return {"connected": connected["ok"], "failed": connected["failed"], "ready": ready,
                "seconds": round(time.monotonic() - began, 1)}

    def samplers(self) -> dict[str, float]:
        out = {"server": self.server.cpu(), "server_sys": self.server.sys_cpu(),
               "clients": sum(cpu_seconds(p) for p in self.pids),
               "publisher": cpu_seconds(self.publisher.pid)}
        if self.ctx.redis_pid is not None:
            out["redis"] = cpu_seconds(self.ctx.redis_pid)
        out["machine"] = busy_seconds()
        return out

    async def wait_quiet(self) -> float:
        """Wait (within the run's budget) until the rest of the machine uses under ``--max-others`` % of a core.

        A shared 2-core box is the norm here; a step measured while something else burns a
        core measures that instead. Returns the last measured share.
        """
        limit = self.ctx.args.max_others
        while True:
            before, wall0 = self.samplers(), time.monotonic()
            await asyncio.sleep(1.0)
            after, wall = self.samplers(), time.monotonic() - wall0
            ours = sum(after[k] - before[k] for k in after if k not in ("machine", "server_sys"))
            others = 100 * (after["machine"] - before["machine"] - ours) / wall
            if others <= limit or self.ctx.quiet_budget <= 0:
                return others
            log(f"  machine busy with other work ({others:.0f}% of a core): waiting")
            self.ctx.quiet_budget -= wall

    async def step(self, index: int, target: int) -> dict[str, Any]:
        rate = target / self.shape.fanout  # events/s
        frames0, objects0 = self.server.frames()
        before, wall0 = self.samplers(), time.monotonic()
        published = await self.publisher.call({"cmd": "run", "step": index, "rate": rate,
                                               "duration": self.shape.duration,
                                               "max_seconds": 2 * self.shape.duration + 5},
                                              timeout=3 * self.shape.duration + 120)
        after, wall = self.samplers(), time.monotonic() - wall0
        expected = sum(n * s for n, s in zip(published["per_conv"], self.subs, strict=True))

        async def counted() -> int:
            counts = await gather_calls(self.clients, {"cmd": "count", "step": index})
            return sum(r["count"] for r in counts)

        await drain(counted, expected, limit=15, interval=0.1)  # the step's deliveries in, or stalled
        frames1, objects1 = self.server.frames()
        takes = await asyncio.gather(*(c.call({"cmd": "take", "step": index}) for c in self.clients))
        received = sum(t["count"] for t in takes)
        lat = hist.summary(hist.merge(t["buckets"] for t in takes))
        closed = sum(t["closed_by_server"] for t in takes)
        codes: dict[str, int] = {}
        for t in takes:
            for code, k in t["codes"].items():
                codes[code] = codes.get(code, 0) + k
        elapsed = max(published["elapsed"], self.shape.duration)  # events are spread over [0, duration)
        cpu = {k: round(100 * (after[k] - before[k]) / wall, 1) for k in after}
        # CPU the rest of the machine used meanwhile (other work on a shared box skews every number)
        ours = sum(v for k, v in cpu.items() if k not in ("machine", "server_sys"))
        cpu["others"] = round(cpu.pop("machine") - ours, 1)
        deliveries = received
        server_cpu_s = after["server"] - before["server"]
        lost = max(0, expected - received)
        passed = (lost == 0 and lat["p99_ms"] < P99_LIMIT_MS and not published["errors"])
        bound = "publisher" if published["behind_ms"] > 250 else ""
        kept_rate = published["sent"] / elapsed >= 0.75 * rate
        return {
            "step": index, "target_dps": target, "events_per_s": round(published["sent"] / elapsed),
            "expected": expected, "received": received, "lost": lost,
            "dps": round(deliveries / elapsed), "p50_ms": round(float(lat["p50_ms"]), 2),
            "p99_ms": round(float(lat["p99_ms"]), 2), "p999_ms": round(float(lat["p999_ms"]), 2),
            "max_ms": round(float(lat["max_ms"]), 2), "cpu_pct": cpu,
            "server_us_per_delivery": round(1e6 * server_cpu_s / deliveries, 2) if deliveries else None,
            "server_rss_mb": round(self.server.rss() / 2**20, 1), "closed_by_server": closed, "codes": codes,
            "objects_per_frame": round((objects1 - objects0) / (frames1 - frames0), 2) if frames1 > frames0 else None,
            "publisher_behind_ms": published["behind_ms"], "publish_errors": published["errors"],
            "bound": bound, "pass": passed, "hist_engine": lat["engine"], "publisher_kept_rate": kept_rate,
        }


async def measure_shape(ctx: Context, kind: str, shape: Shape) -> dict[str, Any]:
    prefix = "bench" + secrets.token_hex(4)
    server = start_server(ctx, kind, prefix, shape.profile)
    out: dict[str, Any] = {"server": kind, "shape": shape.name, "clients": shape.clients, "convs": shape.convs,
                           "gateways": len(server.procs), "steps": []}
    try:
        await asyncio.sleep(0.5)
        out["rss_idle_mb"] = round(server.rss() / 2**20, 1)
        async with Load(ctx, server, shape, prefix) as load:
            out["client_impl"] = load.impl
            out["connect"] = await load.establish()
            out["rss_connected_mb"] = round(server.rss() / 2**20, 1)
            log(f"  {kind} {shape.name}: {out['connect']}")
            if shape.connect == "together":
                return out
            failures = 0
            out["ladder_end"] = "end of ladder"
            for index, target in enumerate(ladder(shape, ctx.args.max_dps), start=1):
                error = ""
                for attempt in range(ctx.args.retries + 1):
                    quiet = await load.wait_quiet()
                    began = time.monotonic()
                    try:
                        result = await load.step(index * 10 + attempt, target)
                    except (TimeoutError, RuntimeError) as exc:  # a swamped client or a crashed process
                        error = f"error at {target:,} d/s: {exc.__class__.__name__}: {exc}"[:500]
                        break
                    result["attempt"], result["others_before_pct"] = attempt, round(quiet, 1)
                    if result["cpu_pct"]["others"] <= ctx.args.max_others or ctx.quiet_budget <= 0:
                        break
                    if attempt < ctx.args.retries:
                        ctx.quiet_budget -= time.monotonic() - began
                        log(f"  {kind} {shape.name} step {target:,}: other work used "
                            f"{result['cpu_pct']['others']}% of a core meanwhile; measuring again")
                if error:
                    out["ladder_end"] = error
                    log(f"  {kind} {shape.name}: {error}; the ladder stops")
                    break
                result["contended"] = result["cpu_pct"]["others"] > ctx.args.max_others
                out["steps"].append(result)
                log(f"  {kind} {shape.name} step {target:>7,} d/s: {result['dps']:>7,} d/s lost={result['lost']} "
                    f"p50={result['p50_ms']}ms p99={result['p99_ms']}ms p99.9={result['p999_ms']}ms "
                    f"cpu={result['cpu_pct']} us/d={result['server_us_per_delivery']} "
                    f"{'PASS' if result['pass'] else 'FAIL'} {result['bound']}")
                if not result["pass"]:
                    failures += 1
                    if failures >= ctx.args.max_failures:
                        out["ladder_end"] = "failed"
                        break
                if index > len(shape.steps) and not result["publisher_kept_rate"]:
                    out["ladder_end"] = "publisher-bound"
                    log(f"  {kind} {shape.name}: the publisher cannot keep {target:,} d/s; the ladder stops")
                    break
    finally:
        server.stop()
    passing = [s for s in out["steps"] if s["pass"]]
    best = max(passing, key=lambda s: s["dps"], default=None)
    out["capacity_dps"] = best["dps"] if best else 0
    out["capacity_step"] = best["target_dps"] if best else 0
    out["capacity_publisher_bound"] = bool(best and best["bound"])
    return out


async def measure_idle(ctx: Context, kind: str, clients: int, convs: int) -> dict[str, Any]:
    prefix = "bench" + secrets.token_hex(4)
    server = start_server(ctx, kind, prefix, None)
    shape = Shape("idle", clients, convs, (), 0.0)
    try:
        await asyncio.sleep(1.0)
        rss0 = server.rss()
        async with Load(ctx, server, shape, prefix) as load:
            connect = await load.establish()
            await asyncio.sleep(2.0)
            rss1 = server.rss()
        per = (rss1 - rss0) / max(1, connect["connected"])
        log(f"  {kind} idle: {connect} rss {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB = {per / 1024:.1f} KiB/conn")
        return {"server": kind, "clients": clients, "convs": convs, "connect": connect,
                "rss_before_mb": round(rss0 / 2**20, 1), "rss_after_mb": round(rss1 / 2**20, 1),
                "kib_per_connection": round(per / 1024, 2)}
    finally:
        server.stop()


def measure_publish(ctx: Context) -> dict[str, Any]:
    script = BENCH / "publish.py"
    if not script.exists():
        return {"skipped": "bench/publish.py does not exist"}
    events = 5000 if ctx.quick else 20000
    argv = [ctx.project_python, str(script), "--url", ctx.redis_url, "--events", str(events)]
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    rates = {}
    for line in done.stdout.splitlines():
        match = re.match(r"^(\S.*?)\s{2,}([\d,]+)$", line.strip())
        if match:
            rates[match.group(1)] = int(match.group(2).replace(",", ""))
    log(f"  publish: {rates}")
    return {"events": events, "rates": rates, "seconds": round(time.monotonic() - began, 1),
            "stdout": done.stdout}


# --- redis ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_for(args: argparse.Namespace, logdir: Path) -> Any:
    if args.redis_url:
        yield args.redis_url, None
        return
    binary = shutil.which("redis-server")
    if binary is None:
        log("redis-server not on PATH: using redis://127.0.0.1:6379/0")
        yield "redis://127.0.0.1:6379/0", None
        return
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    proc = Supervised("the private redis-server",
                      [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                       "--dir", str(data), "--logfile", str(logdir / "redis.log")], logdir / "redis.out").start()
    try:
        proc.wait_until(lambda: redis_ping(port) == b"+PONG", 10, what="answering PING",
                        details=lambda: _tail(logdir / "redis.log"))
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        proc.stop(signal.SIGTERM, timeout=10)
        shutil.rmtree(data, ignore_errors=True)


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no {path})"


def redis_pid(url: str) -> int | None:
    match = re.match(r"redis://([^:/]+):?(\d+)?", url)
    if not match:
        return None
    try:
        with socket.create_connection((match.group(1), int(match.group(2) or 6379)), timeout=2) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while not re.search(rb"process_id:\d+\r\n", data) and len(data) < 65536:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        found = re.search(rb"process_id:(\d+)", data)
        return int(found.group(1)) if found else None
    except OSError:
        return None


# --- report -----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_start": os.getloadavg()}


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "n/a"
    return f"{a / b:.2f}"


def ladder_mark(run: dict[str, Any] | None) -> str:
    """How a run's ladder ended, when not by failing: `` (publisher-bound)``, `` (end of ladder)``, `` (error)``."""
    end = str((run or {}).get("ladder_end", "failed"))
    if not run or end == "failed":
        return ""
    return " (error)" if end.startswith("error") else f" ({end})"


def first_failure(run: dict[str, Any] | None) -> int | None:
    """The lowest target rate (deliveries/s) of a step the server failed, None if it failed none."""
    failed = [s["target_dps"] for s in (run or {}).get("steps", []) if not s["pass"]]
    return min(failed, default=None)


def step_at(run: dict[str, Any] | None, target: int) -> dict[str, Any] | None:
    if not run:
        return None
    return next((s for s in run.get("steps", []) if s["target_dps"] == target), None)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(rows: list[tuple[Any, ...]]) -> list[str]:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    out = []
    for i, row in enumerate(cells):
        out.append("| " + " | ".join(c.ljust(widths[k]) for k, c in enumerate(row)) + " |")
        if i == 0:
            out.append("| " + " | ".join("-" * w for w in widths) + " |")
    return out


def _sse_table(results: dict[str, Any], run_of: Any) -> list[str]:
    """SSE (``/sse``) against ``/ws`` on the same gateway, when the run had both."""
    shapes_ = results.get("shapes", {})
    if not any(SSE in by for by in shapes_.values()) and SSE not in results.get("idle", {}):
        return []
    rows: list[tuple[Any, ...]] = [("metric", "better", "/ws", "/sse", "SSE ÷ ws")]
    for shape in ("fanout", "chat", "broadcast", "smoke"):
        ws, sse = run_of(shape, "ours"), run_of(shape, SSE)
        if ws and sse:
            rows.append((f"capacity, {shape} {ws['clients']:,}/{ws['convs']:,} (deliveries/s)", "higher",
                         _fmt(ws["capacity_dps"]), _fmt(sse["capacity_dps"]),
                         ratio(sse["capacity_dps"], ws["capacity_dps"])))
            for step in ws.get("steps", []):
                other = step_at(sse, step["target_dps"])
                if other:
                    rows.append((f"server CPU per delivery at {step['target_dps']:,} d/s, {shape} (µs)", "lower",
                                 step["server_us_per_delivery"], other["server_us_per_delivery"],
                                 ratio(other["server_us_per_delivery"], step["server_us_per_delivery"])))
    idle = results.get("idle", {})
    if "ours" in idle and SSE in idle:
        rows.append((f"RSS per idle connection at {results['args']['idle_connections']:,} (KiB)", "lower",
                     idle["ours"]["kib_per_connection"], idle[SSE]["kib_per_connection"],
                     ratio(idle[SSE]["kib_per_connection"], idle["ours"]["kib_per_connection"])))
    return ["", "SSE against the websocket, same gateway (server `sse` = ours with its clients on /sse):", "",
            *_table(rows)]


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    m, a = results["machine"], results["args"]
    lines.append(f"Machine: {m['nproc']} cores ({m['cpu']}), Python {m['python']}, kernel {m['kernel']}; "
                 f"load average {m['loadavg_start'][0]:.2f} at start, {m.get('loadavg_end', [0])[0]:.2f} at end; "
                 f"client: {results.get('client_impl')} x {a['client_procs']} processes; "
                 f"{'quick' if a['quick'] else 'full'} mode; {results['started']} - {results.get('finished')}.")
    lines.append("")
    shapes_ = results.get("shapes", {})

    def run_of(shape: str, server: str) -> dict[str, Any] | None:
        run: dict[str, Any] | None = shapes_.get(shape, {}).get(server)
        return run

    in_run = set(a.get("servers") or SERVERS)
    cols = ["ours", *[s for s in SERVERS[1:] if s in in_run]]
    peers = cols[1:]
    rows: list[tuple[Any, ...]] = [("metric", "better", *[LABELS[s] for s in cols],
                                    *[f"ours ÷ {LABELS[p]}" for p in peers])]

    def add(label: str, better: str, vals: list[Any], marks: list[str] | None = None) -> None:
        marks = marks or [""] * len(cols)
        rows.append((label, better, *[_fmt(v) + mk for v, mk in zip(vals, marks, strict=True)],
                     *[ratio(vals[0], v) for v in vals[1:]]))

    for shape, label in (("fanout", "capacity, 500 clients / 50 convs (deliveries/s)"),
                         ("chat", "capacity, 5,000 clients / 5,000 convs (deliveries/s)"),
                         ("broadcast", "capacity, 2,000 clients / 1 conv (deliveries/s)")):
        runs = [run_of(shape, s) for s in cols]
        if any(runs):
            add(label, "higher", [r["capacity_dps"] if r else None for r in runs],
                ["*" if r and r.get("capacity_publisher_bound") else "" for r in runs])
            add(f"first failed step, {shape} (deliveries/s)", "higher", [first_failure(r) for r in runs],
                [ladder_mark(r) for r in runs])
    for shape, target, what in (("fanout", 20_000, "p99 latency"), ("fanout", 40_000, "p99 latency"),
                                ("fanout", 20_000, "server CPU per delivery"),
                                ("fanout", 40_000, "server CPU per delivery"),
                                ("chat", 5_000, "server CPU per delivery"),
                                ("broadcast", 20_000, "server CPU per delivery")):
        steps = [step_at(run_of(shape, s), target) for s in cols]
        if not any(steps):
            continue
        if what == "p99 latency":
            add(f"p99 latency at {target:,} d/s, {shape} (ms)", "lower", [st["p99_ms"] if st else None for st in steps])
        else:
            add(f"server CPU per delivery at {target:,} d/s, {shape} (µs)", "lower",
                [st["server_us_per_delivery"] if st else None for st in steps])
    idle = results.get("idle", {})
    if idle:
        add(f"RSS per idle connection at {a['idle_connections']:,} (KiB)", "lower",
            [idle.get(s, {}).get("kib_per_connection") for s in cols])
    together = results.get("together", {})
    if together:
        frac = []
        for s in cols:
            t = together.get(s)
            frac.append(f"{t['connect']['ready']}/{t['connect']['connected']}" if t else "-")
        rows.append(("sockets receiving after 500 connect at once (50 convs)", "higher", *frac, *[""] * len(peers)))
    lines += _table(rows)
    lines += _sse_table(results, run_of)
    for what, error in results.get("errors", {}).items():
        lines.append("")
        lines.append(f"- {what}: not measured ({error.splitlines()[0][:300]})")
    lines.append("")
    lines.append("`*` the highest passing step was publisher-bound (the publisher fell behind its rate): the server's "
                 "own limit is at least that. Capacity = the highest step with nothing lost and p99 < 100 ms. "
                 "First failed step: the lowest rate the server failed; \"(publisher-bound)\" = the ladder stopped "
                 "because the publisher could not keep a higher rate, \"(end of ladder)\" = it passed every step "
                 "up to --max-dps. Ratios are ours ÷ the peer for every row (higher is better for ours where "
                 "higher is better, lower where lower is).")
    prof = results.get("profile")
    base = run_of("fanout", "ours")
    if prof:
        lines.append("")
        lines.append(f"Profile with drop_fields + an enrich hook (ours, 500/50): capacity {prof['capacity_dps']:,} "
                     f"d/s vs {_fmt(base['capacity_dps']) if base else '-'} with the default profile "
                     f"(ratio {ratio(prof['capacity_dps'], base['capacity_dps'] if base else None)}).")
        for target in (10_000, 20_000, 40_000):
            x, y = step_at(base, target), step_at(prof, target)
            if x and y:
                lines.append(f"- at {target:,} d/s: server CPU {x['server_us_per_delivery']} -> "
                             f"{y['server_us_per_delivery']} µs/delivery, p99 {x['p99_ms']} -> {y['p99_ms']} ms")
    pub = results.get("publish")
    if pub and pub.get("rates"):
        lines.append("")
        lines.append(f"publish throughput (bench/publish.py, {pub['events']:,} events of ~100 B, one process, "
                     "events/s): " + ", ".join(f"{k}: {v:,}" for k, v in pub["rates"].items()))
    lines.append("")
    lines.append("Raw steps (d/s = deliveries per second; CPU in % of one core over the step; others = the rest "
                 "of the machine; † = other work above --max-others during the step):")
    lines.append("")
    raw: list[tuple[Any, ...]] = [("shape", "server", "target d/s", "events/s", "achieved d/s", "lost", "p50 ms",
                                   "p99 ms", "p99.9 ms", "server cpu % (sys)", "server µs/delivery",
                                   "server RSS MiB", "objects / frame", "clients cpu %", "redis cpu %",
                                   "publisher cpu %", "others %", "pass")]
    every = [(shape, server, run) for shape, by in shapes_.items() for server, run in by.items()]
    if prof:
        every.append(("fanout+profile", "ours", prof))
    for shape, server, run in every:
        for st in run.get("steps", []):
            c = st["cpu_pct"]
            verdict = ("yes" if st["pass"] else "NO") + (f" ({st['bound']}-bound)" if st["bound"] else "")
            raw.append((shape, server, _fmt(st["target_dps"]), _fmt(st["events_per_s"]), _fmt(st["dps"]),
                        st["lost"], st["p50_ms"], st["p99_ms"], st["p999_ms"],
                        f"{c.get('server')} ({c.get('server_sys')})", st["server_us_per_delivery"],
                        st["server_rss_mb"], _fmt(st.get("objects_per_frame")), c.get("clients"),
                        c.get("redis", "-"), c.get("publisher"),
                        f"{c.get('others')}{' †' if st.get('contended') else ''}", verdict))
    if len(raw) > 1:
        lines += _table(raw)
    if idle:
        lines.append("")
        idle_rows: list[tuple[Any, ...]] = [("idle", "connected", "RSS before MiB", "RSS after MiB",
                                             "KiB per connection")]
        for server, r in idle.items():
            idle_rows.append((server, r["connect"]["connected"], r["rss_before_mb"], r["rss_after_mb"],
                              r["kib_per_connection"]))
        lines += _table(idle_rows)
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------


async def guarded(results: dict[str, Any], what: str, measurement: Awaitable[dict[str, Any]]) -> dict[str, Any] | None:
    """``measurement``'s result, or None with the error kept in ``results["errors"]``: one server's crash or
    timeout (e.g. a peer that cannot take 10,000 sockets in time) must not lose the rest of the run."""
    try:
        return await measurement
    except Exception as exc:
        log(f"  {what}: FAILED: {exc.__class__.__name__}: {exc}"[:2000])
        results.setdefault("errors", {})[what] = f"{exc.__class__.__name__}: {exc}"[:2000]
        return None


async def run_all(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "redis_url": ctx.redis_url,
                               "shapes": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    all_shapes = shapes(args.quick)
    if args.steps or args.step_seconds:
        steps = tuple(int(x) for x in args.steps.split(",")) if args.steps else None
        all_shapes = {k: dataclasses.replace(v, steps=steps or v.steps, duration=args.step_seconds or v.duration,
                                             grow=v.grow and steps is None)
                      for k, v in all_shapes.items()}
    scenarios = args.scenarios
    servers = args.servers
    for name in ("smoke", "fanout", "chat", "broadcast"):
        if name not in scenarios:
            continue
        results["shapes"][name] = {}
        for kind in servers:
            log(f"{name}: {kind}")
            run = await guarded(results, f"{name} {kind}", measure_shape(ctx, kind, all_shapes[name]))
            if run is not None:
                results["shapes"][name][kind] = run
                results["client_impl"] = run.get("client_impl")
    if "profile" in scenarios and "ours" in servers:
        log("profile: ours with drop_fields + enrich")
        prof = await guarded(results, "profile ours", measure_shape(ctx, "ours", all_shapes["profile"]))
        if prof is not None:
            results["profile"] = prof
    if "together" in scenarios:
        results["together"] = {}
        for kind in servers:
            log(f"together: {kind}")
            together = await guarded(results, f"together {kind}", measure_shape(ctx, kind, all_shapes["together"]))
            if together is not None:
                results["together"][kind] = together
    if "idle" in scenarios:
        n = args.idle_connections
        results["idle"] = {}
        if n + 1000 > ephemeral_ports():
            log(f"warning: {ephemeral_ports()} ephemeral ports for {n} connections")
        for kind in servers:
            log(f"idle: {kind} x {n}")
            idle = await guarded(results, f"idle {kind}", measure_idle(ctx, kind, n, max(1, n // 10)))
            if idle is not None:
                results["idle"][kind] = idle
    if "publish" in scenarios:
        log("publish: bench/publish.py")
        results["publish"] = measure_publish(ctx)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter steps")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of {', '.join((*SCENARIOS, 'smoke'))}")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="comma-separated, of ours, encode, socketio (python-socketio), sionode (socket.io on "
                             "Node), floor, sse (ours on /sse)")
    parser.add_argument("--client-procs", type=int, default=2, help="load-generator processes")
    parser.add_argument("--client-impl", choices=["auto", "picows", "sansio"], default="auto")
    parser.add_argument("--gateways", type=int, default=1, help="our gateway processes (clients spread over them)")
    parser.add_argument("--gateway-python", help="python that runs our gateway (default: the project's)")
    parser.add_argument("--gateway-root", help="run our gateway from this source tree (e.g. another checkout, to A/B)")
    parser.add_argument("--idle-connections", type=int, default=10_000)
    parser.add_argument("--payload-bytes", type=int, default=100, help="event data size as JSON")
    parser.add_argument("--max-failures", type=int, help="failed steps before a server's ladder stops "
                        "(default 2, quick 1)")
    parser.add_argument("--steps", help="override the ladder: comma-separated deliveries/s (e.g. 20000,40000); "
                        "no doubling after it")
    parser.add_argument("--max-dps", type=int, default=5_120_000,
                        help="the doubling ladders stop below this many deliveries/s")
    parser.add_argument("--step-seconds", type=float, help="override the publishing time of each step")
    parser.add_argument("--redis-url", help="use this Redis (default: start a private redis-server)")
    parser.add_argument("--no-warmup-connection", dest="warmup_connection", action="store_false",
                        help="skip the extra first socket on an unused conversation (see Load.establish)")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of every measured process (server, clients, publisher, the private Redis); "
                             "e.g. -5 on a shared box, so other work disturbs the steps less (needs root)")
    parser.add_argument("--max-others", type=float, default=30.0,
                        help="%% of a core other work may use during a step before it is measured again")
    parser.add_argument("--retries", type=int, default=2, help="re-measurements of a step run under other work")
    parser.add_argument("--quiet-budget", type=float, default=300.0,
                        help="seconds the whole run may spend waiting out / re-running under other work")
    parser.add_argument("--no-venv", action="store_true", help="run everything with this python (no peers)")
    parser.add_argument("--json", help="write the results here (default: a temp file)")
    parser.add_argument("--markdown", help="write the summary here")
    args = parser.parse_args(argv)
    if args.max_failures is None:
        args.max_failures = 1 if args.quick else 2
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.scenarios) - {*SCENARIOS, "smoke"} | set(args.servers) - {*SERVERS, SSE}
    if unknown:
        parser.error(f"unknown scenario or server: {sorted(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    project_python = os.environ.get("BENCH_PROJECT_PYTHON", sys.executable)
    if not args.no_venv and os.environ.get("BENCH_IN_TOOLS_VENV") != "1":
        check = subprocess.run([sys.executable, "-c", "import gateway, producers, hiredis"], cwd="/",
                               capture_output=True, text=True)
        if check.returncode != 0:
            sys.exit(f"run the harness with the project's python (pip install -e .): {check.stderr.strip()}")
        tools = ensure_venv("tools", BENCH / "requirements.txt")
        env = dict(os.environ, BENCH_PROJECT_PYTHON=sys.executable, BENCH_IN_TOOLS_VENV="1")
        os.execve(str(tools), [str(tools), str(Path(__file__).resolve()), *(argv or sys.argv[1:])], env)
    peers: dict[str, str] = {}
    if args.no_venv:
        if set(args.servers) - set(OURS):
            sys.exit("--no-venv runs our gateway only (the peers need their own venvs)")
    else:
        if "encode" in args.servers:
            peers["encode"] = str(ensure_venv("encode", BENCH / "requirements-encode.txt"))
        if "floor" in args.servers:
            peers["floor"] = str(ensure_venv("floor", BENCH / "requirements-floor.txt"))
        if "socketio" in args.servers:
            peers["socketio"] = str(ensure_venv("socketio", BENCH / "requirements-socketio.txt"))
        if "sionode" in args.servers:
            peers["sionode"] = str(ensure_node_modules())
    limit = raise_nofile()
    if "idle" in args.scenarios and limit < args.idle_connections + 1000:
        log(f"warning: open-files limit {limit} is low for {args.idle_connections} connections")
    logdir = Path(tempfile.mkdtemp(prefix="broadcaster-bench-"))
    log(f"logs in {logdir}")
    with redis_for(args, logdir) as (url, pid):
        if pid is not None:
            renice(pid, args.nice)
        ctx = Context(args, project_python, sys.executable, peers, url, pid or redis_pid(url), logdir,
                      quiet_budget=args.quiet_budget)
        results = asyncio.run(run_all(ctx))
    out = Path(args.json) if args.json else logdir / "results.json"
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    summary = markdown(results)
    if args.markdown:
        Path(args.markdown).write_text(summary)
    print(summary)
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
