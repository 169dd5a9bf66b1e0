"""What ``storm.py``, ``many_sockets.py`` and ``run.py`` share: JSON-line children, /proc sampling, Redis INFO, tables.

Runs with the project's python or bench's tools venv (``run.py``): it needs only orjson, the
standard library, ``hist`` and ``devtools.procs`` (psutil is optional: /proc is read directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(BENCH), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import hist  # noqa: E402

from devtools.procs import Supervised, free_port, redis_ping  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_nofile() -> tuple[int, int]:
    """Lift the soft open-files limit to the hard one (children inherit it); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def renice(pid: int, niceness: int) -> None:
    """Give ``pid`` priority ``niceness`` (negative: ahead of other work on the box; needs root)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, niceness)
    except OSError as exc:
        log(f"warning: cannot renice {pid} to {niceness}: {exc}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (a /proc scan), in pid order."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return sorted(out)


class ProcGroup:
    """Processes measured as one (a ``--workers`` supervisor and its workers): summed CPU, RSS and open files."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids)

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in self.pids)

    def fds(self) -> int:
        return sum(fd_count(p) for p in self.pids)


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "python": sys.version.split()[0], "kernel": os.uname().release,
            "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE))}


class Child:
    """A helper process spoken to in JSON lines over its stdin / stdout (stderr to ``logfile``)."""

    def __init__(self, name: str, argv: Sequence[str], logfile: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.logfile, self.env = name, list(argv), logfile, env
        self.proc: asyncio.subprocess.Process | None = None
        self.hello: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, niceness: int = 0) -> Child:
        """Start it (reniced to ``niceness`` unless 0) and read its first line into ``hello``."""
        with self.logfile.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                env=self.env, cwd=str(ROOT), limit=256 * 1024 * 1024)
        if niceness:
            renice(self.proc.pid, niceness)
        self.hello = await self._read(60)
        return self

    async def call(self, message: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(message) + b"\n")
        await self.proc.stdin.drain()
        return await self._read(timeout)

    async def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            tail = self.logfile.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited (code {await self.proc.wait()}): {tail}")
        reply: dict[str, Any] = orjson.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    async def finish(self, message: dict[str, Any], timeout: float) -> None:
        """Send ``message`` (its goodbye: close / quit), then stop it; a child already gone is not an error."""
        try:
            await self.call(message, timeout=timeout)
        except (RuntimeError, TimeoutError, OSError):
            pass
        await self.stop()


async def finish_all(clients: Sequence[Child], publisher: Child, close_timeout: float) -> None:
    """Close every load client (``close``, ``close_timeout`` each), then the publisher (``quit``)."""
    for c in clients:
        await c.finish({"cmd": "close"}, close_timeout)
    await publisher.finish({"cmd": "quit"}, 30)


def merge_checks(checks: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """The clients' ``check`` answers summed over ``keys``, with the first five examples."""
    merged: dict[str, Any] = {k: sum(c[k] for c in checks) for k in keys}
    merged["examples"] = [e for c in checks for e in c["examples"]][:5]
    return merged


async def drain(count: Callable[[], Awaitable[int]], expected: int, limit: float, interval: float) -> int:
    """Poll ``count()`` until it reaches ``expected``, stays put for 2 s or ``limit`` s pass; its last value."""
    got, last, changed = 0, -1, time.monotonic()
    deadline = time.monotonic() + limit
    while True:
        got = await count()
        now = time.monotonic()
        if got != last:
            last, changed = got, now
        if got >= expected or now - changed > 2.0 or now > deadline:
            return got
        await asyncio.sleep(interval)


async def gather_calls(children: Sequence[Child], message: dict[str, Any], timeout: float = 120) -> list[
        dict[str, Any]]:
    return list(await asyncio.gather(*(c.call(message, timeout) for c in children)))


@contextlib.contextmanager
def private_redis(logdir: Path) -> Iterator[tuple[str, int]]:
    """A redis-server of our own on a free loopback port (no persistence): (url, pid)."""
    port = free_port()
    data = logdir / "redis"
    data.mkdir(exist_ok=True)
    proc = Supervised("redis-server", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(data), "--maxclients", "10000"],
                      logdir / "redis.log").start()
    try:
        proc.wait_until(lambda: redis_ping(port) == b"+PONG", 10, what="answering PING")
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        proc.stop(signal.SIGTERM, timeout=10)


class RedisInfo:
    """One raw connection asking ``INFO clients`` / ``INFO stats`` (no client library needed)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def sample(self) -> dict[str, int]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(b"INFO clients\r\nINFO stats\r\n")
        out: dict[str, int] = {}
        for _ in range(2):
            head = await self.reader.readline()
            size = int(head[1:].strip())
            body = await self.reader.readexactly(size + 2)
            for line in body.decode().splitlines():
                key, _, value = line.partition(":")
                if key in ("connected_clients", "instantaneous_ops_per_sec", "total_commands_processed",
                           "blocked_clients", "pubsub_clients"):
                    out[key] = int(value)
        return out

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


def latency(maps: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """Merged percentiles (ms) of the clients' bucket maps under ``key`` ("phase/group")."""
    merged = hist.merge(m.get(key, {}) for m in maps)
    s = hist.summary(merged)
    return {k: s[k] for k in ("count", "p50_ms", "p99_ms", "p999_ms", "max_ms")}


def quantiles(values: Sequence[float], qs: Sequence[float] = (0.5, 0.99, 1.0)) -> dict[str, float | None]:
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for q in qs:
        name = "max" if q == 1.0 else f"p{round(q * 100):d}"
        out[name] = round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None
    return out


def table(rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table: the first row is the header."""
    text = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(text[0]) + " |", "|" + "|".join("---" for _ in text[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in text[1:]]
    return lines


def write_outputs(results: dict[str, Any], summary: str, json_path: str | None, md_path: str | None,
                  logdir: Path) -> Path:
    out = Path(json_path) if json_path else logdir / "results.json"
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    if md_path:
        Path(md_path).write_text(summary)
    print(summary)
    log(f"results: {out}")
    return out
