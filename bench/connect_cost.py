"""Gateway CPU per resuming connect: accept, upgrade, hello, subscribe with ``since``, replay.

    python bench/connect_cost.py --clients 3000 [--redis-url redis://127.0.0.1:6379/0] [--jwt]
        [--mode query|message] [--rounds 3] [--gateway-root /tmp/a-checkout ...] [--py-spy out.txt]

Starts one gateway per ``--gateway-root`` (default: this checkout) on a free port, publishes
``--events`` events to each of ``--convs`` conversations, then, in each round and for each
gateway in turn (interleaved A/B: the box's load hits both alike), opens ``--clients``
websockets, at most ``--concurrency`` handshakes at once. Each resumes one conversation as a
reconnecting client does: ``since`` = its last seq less ``--replay``, with the epoch, either in
the ``/ws`` query (``query``: bench/wsload.py, the Python SDK's first subscribe) or as a
``ws.subscribe`` message after the hello (``message``: the JS client). A connect is done once
its socket got the hello, ``ws.subscribed`` and the ``--replay`` events it missed. The
gateway's user + system CPU over the round (``/proc``), divided by the connects, is the
figure: µs per connect. The sockets are then closed (their cost reported apart) and the next
round starts.

``--jwt``: the gateway verifies an HS256 token per connect (one per client, each its own ``sub``,
sent as the ``token`` query parameter, as the JS client does). ``--py-spy FILE``: profile the first
gateway's connect phases (raw folded stacks). ``--callgrind``: the gateways run under valgrind's
callgrind, instrumented during the rounds only, and report instructions per connect and per close:
repeatable on a busy box where CPU seconds are not (use a few hundred clients; ~50x slower).
Loopback only; every wait is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenario_support import cpu_seconds, log, raise_nofile

ROOT = Path(__file__).resolve().parent.parent
SECRET = "connect-cost-bench-secret-0123456789abcdef"


def mint(convs: list[str], sub: str) -> str:
    """An HS256 token of ``sub`` for ``convs`` (PyJWT, as gateway.auth.mint_token)."""
    import jwt

    claims = {"sub": sub, "exp": int(time.time()) + 3600, "convs": convs, "profiles": ["default"]}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gateway:
    """One gateway process from ``root`` (its ``gateway`` package first on the path)."""

    def __init__(self, root: Path, args: argparse.Namespace, logdir: Path, index: int) -> None:
        """Start it (not waiting for it to serve: :meth:`wait_ready`)."""
        self.root, self.port = root, free_port()
        self.name = f"{chr(ord('A') + index)}:{root}"
        argv = [sys.executable, "-m", "gateway.cli", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "warning", "--ping-interval", "0", "--drain-seconds", "0",
                "--max-pending-handshakes", str(max(args.concurrency * 2, 128)),
                "--gateway-id", f"cost-{index}"]
        if args.redis_url:
            argv += ["--redis-url", args.redis_url, "--key-prefix", f"cc{index}-{secrets.token_hex(3)}"]
        if args.jwt:
            argv += ["--auth-secret", SECRET]
        argv += args.gateway_arg or []
        if args.callgrind:  # instrumented only while a round runs (callgrind_control -i on / off)
            argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={logdir}/callgrind-{index}.out", *argv, "--handshake-timeout", "0"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        self.logfile = (logdir / f"gateway-{index}.log").open("wb")
        self.proc = subprocess.Popen(argv, cwd=root, env=env, stdout=self.logfile, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway {self.name} exited {self.proc.returncode} (log {self.logfile.name})")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gateway {self.name} not healthy within {timeout}s")

    def publish(self, conv: str, n: int) -> tuple[int, str]:
        """Publish ``n`` events to ``conv``; the last seq and the epoch."""
        result: dict[str, Any] = {}
        for i in range(n):
            body = orjson.dumps({"type": "chat.message", "data": {"text": f"event {i} " + "x" * 80}})
            request = urllib.request.Request(f"{self.base}/v1/conversations/{conv}/events", data=body,
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                result = json.loads(response.read())
        return int(result["seq"]), str(result["epoch"])

    def callgrind(self, *options: str) -> str:
        """Run ``callgrind_control`` on this gateway; its output."""
        done = subprocess.run(["callgrind_control", *options, str(self.proc.pid)], capture_output=True, text=True,
                              timeout=60, check=True)
        return done.stdout

    def instructions(self) -> int:
        """Instructions counted since the last zeroing, all threads."""
        lines = self.callgrind("-e", "Ir").splitlines()
        return sum(int(line.split()[2].replace(",", "")) for line in lines if line.strip().startswith("Th "))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.logfile.close()


def _masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame (masked, RFC 6455 §5.3); payloads here are small."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes((0x80 | opcode, 0x80 | size)) if size < 126 else struct.pack("!BBH", 0x80 | opcode, 0xFE, size)
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


class Client(asyncio.Protocol):
    """One resuming websocket; ``done`` resolves with None once replayed, or with an error string."""

    def __init__(self, request: bytes, subscribe: bytes | None, replay: int, done: asyncio.Future[str | None]) -> None:
        self.request, self.subscribe, self.replay, self.done = request, subscribe, replay, done
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.subscribed = False
        self.events = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def _finish(self, error: str | None) -> None:
        if not self.done.done():
            self.done.set_result(error)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[:12])
            if not status.startswith(b"HTTP/1.1 101"):
                self._finish(f"handshake {status.decode(errors='replace')}")
                return
            del self.buf[:end + 4]
            self.upgraded = True
        while len(self.buf) >= 2:
            opcode, size, offset = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
            if size == 126:
                if len(self.buf) < 4:
                    return
                size, offset = struct.unpack_from("!H", self.buf, 2)[0], 4
            elif size == 127:
                if len(self.buf) < 10:
                    return
                size, offset = struct.unpack_from("!Q", self.buf, 2)[0], 10
            if len(self.buf) < offset + size:
                return
            payload = bytes(self.buf[offset:offset + size])
            del self.buf[:offset + size]
            if opcode == 0x8:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
                self._finish(f"closed {code} {payload[2:].decode(errors='replace')}")
                return
            if opcode == 0x1:
                self._on_text(payload)

    def _on_text(self, payload: bytes) -> None:
        for line in payload.split(b"\n"):
            if line.startswith(b'{"type":"ws.'):
                kind = orjson.loads(line)["type"]
                if kind == "ws.hello" and self.subscribe is not None and self.transport is not None:
                    self.transport.write(self.subscribe)
                elif kind == "ws.subscribed":
                    self.subscribed = True
                elif kind in ("ws.error", "ws.reset"):
                    self._finish(line.decode(errors="replace")[:200])
                    return
            else:
                self.events += 1
        if self.subscribed and self.events >= self.replay:
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(f"connection lost: {exc}")


async def connect_all(gw: Gateway, args: argparse.Namespace, heads: dict[str, tuple[int, str]],
                      tokens: list[str] | None) -> tuple[list[Client], list[str]]:
    """Open ``args.clients`` resumed sockets to ``gw``; the clients and the errors of those that failed."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(args.concurrency)
    convs = list(heads)
    clients: list[Client] = []
    errors: list[str] = []

    async def one(i: int) -> None:
        conv = convs[i % len(convs)]
        seq, epoch = heads[conv]
        since = max(0, seq - args.replay)
        query = "profile=default"
        subscribe = None
        if args.mode == "query":
            query += f"&conv_id={conv}&since={since}&epoch={epoch}"
        else:
            subscribe = _masked(orjson.dumps({"type": "ws.subscribe", "conv_id": conv, "since": since,
                                              "epoch": epoch}))
        if tokens:
            query += f"&token={tokens[i]}"
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET /ws?{query} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                   "User-Agent: connect-cost\r\n\r\n").encode()
        async with gate:
            done: asyncio.Future[str | None] = loop.create_future()
            try:
                _, client = await loop.create_connection(
                    lambda: Client(request, subscribe, min(args.replay, seq), done), "127.0.0.1", gw.port)
                error = await asyncio.wait_for(done, args.timeout)
            except (TimeoutError, OSError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            clients.append(client)
            if error is not None:
                errors.append(error)

    await asyncio.gather(*(one(i) for i in range(args.clients)))
    return clients, errors


async def close_all(clients: list[Client], timeout: float) -> None:
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    pending = [c.done for c in clients if not c.done.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


async def settle(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` is idle (no CPU tick over 0.2 s), so a round's CPU is not the last one's tail."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        now = cpu_seconds(pid)
        if now - last < 0.011:
            return
        last = now


async def rounds(gateways: list[Gateway], args: argparse.Namespace, heads: dict[str, dict[str, tuple[int, str]]],
                 tokens: list[str] | None, results: dict[str, Any]) -> None:
    """The measured rounds, each gateway in turn within a round."""
    for round_ in range(args.rounds):
        for gw in gateways:
            pid = gw.proc.pid
            await settle(pid)
            if args.callgrind:
                gw.callgrind("-i", "on")
                gw.callgrind("-z")
            cpu0, t0 = cpu_seconds(pid), time.perf_counter()
            clients, errors = await connect_all(gw, args, heads[gw.name], tokens)
            t1 = time.perf_counter()
            await settle(pid, 2.0)
            cpu1 = cpu_seconds(pid)
            if args.callgrind:
                ir_connect = gw.instructions()
                gw.callgrind("-z")
            await close_all(clients, args.timeout)
            await settle(pid)
            cpu2 = cpu_seconds(pid)
            ok = sum(1 for c in clients if c.done.done() and c.done.result() is None)
            row = results["gateways"][gw.name]
            row["connect_us"].append(round((cpu1 - cpu0) / max(1, args.clients) * 1e6))
            row["close_us"].append(round((cpu2 - cpu1) / max(1, args.clients) * 1e6))
            row["connects_per_s"].append(round(args.clients / (t1 - t0)))
            row["errors"].extend(errors[:5])
            if args.callgrind:
                row.setdefault("connect_kinstr", []).append(round(ir_connect / max(1, args.clients) / 1000))
                row.setdefault("close_kinstr", []).append(round(gw.instructions() / max(1, args.clients) / 1000))
                gw.callgrind("-i", "off")
                log(f"  {gw.name}: {row['connect_kinstr'][-1]} k instructions/connect, "
                    f"{row['close_kinstr'][-1]} k/close (callgrind)")
            log(f"round {round_ + 1} {gw.name}: {row['connect_us'][-1]} us/connect, "
                f"{row['close_us'][-1]} us/close, {row['connects_per_s'][-1]} connects/s, "
                f"ok {ok}, errors {len(errors)}; load {os.getloadavg()[0]:.2f}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    roots = [Path(r).resolve() for r in (args.gateway_root or [str(ROOT)])]
    logdir = Path(tempfile.mkdtemp(prefix="connect-cost-"))
    gateways = [Gateway(root, args, logdir, i) for i, root in enumerate(roots)]
    results: dict[str, Any] = {"args": vars(args), "load": os.getloadavg(), "gateways": {}}
    spy: subprocess.Popen[bytes] | None = None
    try:
        for gw in gateways:
            gw.wait_ready(180 if args.callgrind else 30)
        convs = [f"cc-{i}" for i in range(args.convs)]
        heads = {gw.name: {conv: gw.publish(conv, args.events) for conv in convs} for gw in gateways}
        # one token per client, as in a storm (each user its own): no gateway sees a token twice
        tokens = [mint(["cc-*"], f"user-{i}") for i in range(args.clients)] if args.jwt else None
        for gw in gateways:
            results["gateways"][gw.name] = {"connect_us": [], "close_us": [], "connects_per_s": [], "errors": []}
        if args.py_spy:
            spy_bin = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
            spy = subprocess.Popen([spy_bin, "record", "--pid", str(gateways[0].proc.pid), "--rate", "250",
                                    "--format", "raw", "--nonblocking", "-o", args.py_spy],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        asyncio.run(rounds(gateways, args, heads, tokens, results))
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
        for gw in gateways:
            gw.stop()
    results["load_after"] = os.getloadavg()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--convs", type=int, default=200)
    parser.add_argument("--events", type=int, default=5, help="events published to each conversation first")
    parser.add_argument("--replay", type=int, default=3, help="events each resume has missed")
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes in progress at once")
    parser.add_argument("--mode", choices=("query", "message"), default="query")
    parser.add_argument("--jwt", action="store_true", help="gateway with --auth-secret; clients send a token")
    parser.add_argument("--redis-url", help="Redis backend (a fresh key prefix per gateway); default memory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gateway-root", action="append", help="run a gateway from this tree (repeat to A/B)")
    parser.add_argument("--gateway-arg", action="append", help="one more gateway argument (repeatable)")
    parser.add_argument("--py-spy", help="record the first gateway with py-spy (raw format) to this file")
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions per connect under callgrind (slow: fewer clients)")
    parser.add_argument("--timeout", type=float, default=60.0, help="bound of each wait (s)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results = run(args)
    for name, row in results["gateways"].items():
        if "connect_kinstr" in row:
            print(f"{name}: connect {row['connect_kinstr']} k instructions, close {row['close_kinstr']} k")
        print(f"{name}: connect {row['connect_us']} us, close {row['close_us']} us, "
              f"{row['connects_per_s']} connects/s, errors {len(row['errors'])}")
    print(f"load before {results['load'][0]:.2f}, after {results['load_after'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
