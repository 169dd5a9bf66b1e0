"""``--workers N``: N gateway processes on one port, under a small supervisor.

The supervisor (the ``broadcaster-gateway`` process itself) runs no gateway: it starts N
workers, each ``python -m gateway.cli`` with the same options plus ``--workers 1`` and a
``--gateway-id`` of its own (``<base>-w<index>``, base = ``--gateway-id`` or
host-pid-random). Each worker is a whole gateway (its own backend connections, hub, pool
and presence) that binds its own listening socket with ``SO_REUSEPORT``: the kernel
spreads new connections evenly over the workers' sockets. A worker only starts listening
once its gateway started (uvicorn listens after the lifespan), so a worker that is still
connecting to Redis gets no connections.

Contracts:

* Start: every worker must come up once. If one exits before it was ready (bad
  configuration, Redis unreachable, port taken), the others are stopped and the supervisor
  exits with that worker's status (2, 69, 3: the same as without ``--workers``).
* A worker that exits later, by a crash, a SIGKILL or any signal not sent by the supervisor,
  is started again in its slot (same index and gateway id) after a backoff: 0.5 s, doubled
  for each exit within :data:`STABLE_SECONDS` of its start, at most 30 s. After
  :data:`MAX_QUICK_EXITS` such quick exits in a row the supervisor gives up: it drains the
  other workers and exits :data:`EXIT_WORKERS_FAILED`, so the orchestrator sees a failing
  pod instead of a gateway quietly short of workers.
* SIGTERM / SIGINT: the supervisor sends SIGTERM to every worker once; each runs the
  drain of gateway.server (``/readyz`` 503, sockets closed 1012 over the drain time, exit
  0). The supervisor exits 0 when every worker did, 1 otherwise. A second signal is passed
  on (workers then exit at once); workers still running ``--drain-seconds`` + 10 s after
  the first one are killed.
* A worker dies with its supervisor (Linux ``PR_SET_PDEATHSIG``: it gets SIGTERM, and drains).
* ``/metrics`` on the shared port is the whole process group's, whichever worker answers:
  each worker also serves its own registry on a private unix socket (a directory only the
  supervisor's user can read), and the one asked merges its siblings' families into its own,
  every sample labelled ``worker="<index>"``, plus ``broadcaster_worker_up{worker}`` (0 for a
  worker that did not answer within :data:`SIBLING_TIMEOUT`) and
  ``broadcaster_worker_restarts{worker}``. Without ``--workers`` nothing changes.

The supervisor tells a worker its slot in the environment variable :data:`SLOT_ENV` (JSON);
it is internal, not an option.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import Settings
from gateway.worker_metrics import MergedCollector, MergedMetrics

log = logging.getLogger("gateway.workers")

SLOT_ENV = "_BROADCASTER_WORKER_SLOT"
STABLE_SECONDS = 30.0
"""A worker that ran this long before exiting is restarted after the shortest backoff."""
MAX_QUICK_EXITS = 5
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
KILL_GRACE = 10.0
"""Seconds after ``--drain-seconds`` before workers still draining are killed."""
SIBLING_TIMEOUT = 2.0
EXIT_WORKERS_FAILED = 70  # sysexits.h EX_SOFTWARE
EXIT_STARTUP_FAILED = 3  # as gateway.cli
LISTEN_BACKLOG = 2048  # uvicorn's default


# ---------------------------------------------------------------------------- the worker side


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """What the supervisor tells one worker: its index among ``count``, where the siblings'
    metrics sockets are, the pipe to report readiness on, and how often this slot restarted."""

    index: int
    count: int
    directory: str
    ready_fd: int
    supervisor_pid: int
    restarts: int = 0

    def encode(self) -> str:
        return json.dumps({"index": self.index, "count": self.count, "directory": self.directory,
                           "ready_fd": self.ready_fd, "supervisor_pid": self.supervisor_pid,
                           "restarts": self.restarts})

    @classmethod
    def decode(cls, raw: str) -> WorkerSlot:
        data = json.loads(raw)
        return cls(int(data["index"]), int(data["count"]), str(data["directory"]), int(data["ready_fd"]),
                   int(data["supervisor_pid"]), int(data.get("restarts", 0)))

    def metrics_path(self, index: int) -> Path:
        return Path(self.directory) / f"worker-{index}.sock"


def current_slot(environ: dict[str, str] | None = None) -> WorkerSlot | None:
    """This process's slot when a supervisor started it as a worker, else None."""
    raw = (os.environ if environ is None else environ).get(SLOT_ENV)
    return WorkerSlot.decode(raw) if raw else None


def die_with_supervisor(slot: WorkerSlot) -> None:
    """Ask Linux to SIGTERM this worker (a drain) when the supervisor dies; exit now if it already did."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != slot.supervisor_pid:  # died before the prctl
        raise SystemExit(EXIT_WORKERS_FAILED)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, not listening yet; OSError if that fails."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.set_inheritable(False)
    except BaseException:
        sock.close()
        raise
    return sock


class WorkerTag(logging.Filter):
    """Starts every log message of a worker with ``[worker N]``: the workers share the supervisor's stderr."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.prefix = f"[worker {index}] "

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.prefix + record.getMessage(), None
        return True


class Worker:
    """One worker's side of the supervisor: its socket, its readiness report and the merged ``/metrics``."""

    def __init__(self, slot: WorkerSlot, settings: Settings) -> None:
        self.slot = slot
        self.settings = settings
        for handler in logging.getLogger().handlers:  # gateway.logs.configure's one handler
            handler.addFilter(WorkerTag(slot.index))

    def prepare(self, app: Any) -> list[socket.socket]:
        """Wire ``app`` (the gateway's FastAPI app, not started) for this slot; the sockets to serve.

        Binding fails here, before the gateway starts: a message and exit 3 (a start-up failure).
        """
        try:
            sock = reuseport_socket(self.settings.host, self.settings.port)
        except OSError as exc:
            print(f"broadcaster-gateway: worker {self.slot.index} cannot listen on "
                  f"{self.settings.host}:{self.settings.port}: {exc.strerror or exc}", file=sys.stderr)
            raise SystemExit(EXIT_STARTUP_FAILED) from None
        registry: CollectorRegistry = app.state.gateway.metrics.registry
        app.router.lifespan_context = self._lifespan(app.router.lifespan_context, registry)
        app.add_middleware(MergedMetrics, merged=lambda: self.merged(registry))
        return [sock]

    def _lifespan(self, inner: Callable[[Any], AbstractAsyncContextManager[Any]], registry: CollectorRegistry
                  ) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
        """``inner``, then this worker's metrics socket and the readiness report once the gateway started."""

        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[Any]:
            async with inner(app) as state:
                path = self.slot.metrics_path(self.slot.index)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # the socket of this slot's previous worker

                async def own_metrics(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    try:
                        writer.write(generate_latest(registry))
                        await writer.drain()
                    except OSError:
                        pass
                    finally:
                        writer.close()

                server = await asyncio.start_unix_server(own_metrics, path=str(path))
                self._report_ready()
                try:
                    yield state
                finally:
                    server.close()
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

        return lifespan

    def _report_ready(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.slot.ready_fd, b"ready\n")
            os.close(self.slot.ready_fd)

    async def sibling_text(self, index: int) -> str | None:
        """Sibling ``index``'s own metrics (exposition text), None when it does not answer in time."""
        try:
            async with asyncio.timeout(SIBLING_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(self.slot.metrics_path(index)))
                try:
                    data = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return None
        return data.decode()

    async def merged(self, registry: CollectorRegistry) -> bytes:
        """Every worker's metrics as one exposition (see the module docstring)."""
        siblings = [i for i in range(self.slot.count) if i != self.slot.index]
        texts = await asyncio.gather(*(self.sibling_text(i) for i in siblings))
        parts: dict[int, list[Metric] | None] = {self.slot.index: list(registry.collect())}
        for index, text in zip(siblings, texts, strict=True):
            try:
                parts[index] = list(text_string_to_metric_families(text)) if text else None
            except ValueError:  # a truncated answer: the worker died while writing
                parts[index] = None
        restarts = self.restarts()
        merged = MergedCollector(parts, restarts)
        out = CollectorRegistry(auto_describe=False)
        out.register(merged)
        return generate_latest(out)

    def restarts(self) -> dict[int, int]:
        """Restarts per slot, as the supervisor last wrote them (this worker's own count if none)."""
        try:
            raw = json.loads((Path(self.slot.directory) / "restarts.json").read_text())
            return {int(k): int(v) for k, v in raw.items()}
        except (OSError, ValueError):
            return {self.slot.index: self.slot.restarts}


# ---------------------------------------------------------------------------- the supervisor side


@dataclass(slots=True)
class Slot:
    """One worker slot of the supervisor: the process running in it now, and its history."""

    index: int
    gateway_id: str
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    ready: bool = False
    was_ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    quick_exits: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def worker_command(argv: Sequence[str], gateway_id: str) -> list[str]:
    """The command of a worker: the supervisor's own options, one worker, its own gateway id."""
    return [sys.executable, "-m", "gateway.cli", *argv, "--workers", "1", "--gateway-id", gateway_id]


def status_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"status {code}"


class Supervisor:
    """Runs ``count`` workers until a signal (see the module docstring); :meth:`run` returns the exit status."""

    def __init__(self, settings: Settings, argv: Sequence[str], count: int) -> None:
        from gateway.state import default_gateway_id

        self.settings, self.argv, self.count = settings, list(argv), count
        base = settings.gateway_id or default_gateway_id()
        self.slots = [Slot(i, f"{base}-w{i}") for i in range(count)]
        self.directory = ""
        self.draining = False
        self.kill_at: float | None = None
        self.status: int | None = None
        self._signals: list[int] = []
        self._wakeup_r = self._wakeup_w = -1

    # -- process management

    def _spawn(self, slot: Slot) -> None:
        ready_r, ready_w = os.pipe()
        info = WorkerSlot(slot.index, self.count, self.directory, ready_w, os.getpid(), slot.restarts)
        env = {**os.environ, SLOT_ENV: info.encode()}
        try:
            # Own process group: a terminal's Ctrl-C reaches only the supervisor, which passes on one SIGTERM
            # (a second signal would make the workers skip their drain).
            slot.proc = subprocess.Popen(worker_command(self.argv, slot.gateway_id), env=env, pass_fds=(ready_w,),
                                         stdin=subprocess.DEVNULL, process_group=0)
        finally:
            os.close(ready_w)
        slot.ready_fd, slot.ready, slot.started_at, slot.restart_at = ready_r, False, time.monotonic(), None
        log.info("worker %d started: pid %d, gateway id %s", slot.index, slot.proc.pid, slot.gateway_id)

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.running and slot.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    def _begin_drain(self, why: str) -> None:
        if self.draining:
            return
        self.draining = True
        self.kill_at = time.monotonic() + self.settings.drain_seconds + KILL_GRACE
        live = sum(s.running for s in self.slots)
        log.info("%s: draining %d worker(s) within %.1fs", why, live, self.settings.drain_seconds)
        self._signal_all(signal.SIGTERM)

    def _write_restarts(self) -> None:
        path = Path(self.directory) / "restarts.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({s.index: s.restarts for s in self.slots}))
        tmp.replace(path)

    def _on_exit(self, slot: Slot, code: int) -> None:
        assert slot.proc is not None
        pid, lived = slot.proc.pid, time.monotonic() - slot.started_at
        self._close_ready(slot)
        if self.draining:
            if code == -signal.SIGTERM and not slot.ready:  # still importing: stopped with nothing to drain
                log.info("worker %d (pid %d) stopped before it was ready", slot.index, pid)
                code = 0
            else:
                log.info("worker %d (pid %d) exited with %s", slot.index, pid, status_text(code))
            slot.exit_codes.append(code)
            return
        slot.exit_codes.append(code)
        if not slot.was_ready:
            log.error("worker %d (pid %d) exited with %s before it was ready: stopping the others",
                      slot.index, pid, status_text(code))
            self.status = code if code > 0 else EXIT_STARTUP_FAILED
            self._begin_drain("start-up failed")
            return
        slot.quick_exits = slot.quick_exits + 1 if lived < STABLE_SECONDS else 0
        if slot.quick_exits >= MAX_QUICK_EXITS:
            log.error("worker %d (pid %d) exited with %s: %d exits in a row, each within %.0fs of its start; "
                      "giving up", slot.index, pid, status_text(code), slot.quick_exits, STABLE_SECONDS)
            self.status = EXIT_WORKERS_FAILED
            self._begin_drain("a worker keeps failing")
            return
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(0, slot.quick_exits - 1))
        slot.restart_at = time.monotonic() + delay
        log.warning("worker %d (pid %d, gateway id %s) exited with %s after %.1fs: restarting it in %.1fs",
                    slot.index, pid, slot.gateway_id, status_text(code), lived, delay)

    def _close_ready(self, slot: Slot) -> None:
        if slot.ready_fd is not None:
            os.close(slot.ready_fd)
            slot.ready_fd = None

    def _read_ready(self, fd: int) -> None:
        slot = next(s for s in self.slots if s.ready_fd == fd)
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if b"ready" in data and slot.proc is not None:
            slot.ready = slot.was_ready = True
            log.info("worker %d ready: pid %d, gateway id %s", slot.index, slot.proc.pid, slot.gateway_id)
            if all(s.was_ready for s in self.slots) and not self.draining:
                log.info("%d workers serving %s:%d", self.count, self.settings.host, self.settings.port)
        self._close_ready(slot)  # one line per worker; EOF (worker gone) closes it too

    # -- the loop

    def _on_signal(self, sig: int, frame: object) -> None:
        self._signals.append(sig)

    def _install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_w, False)
        os.set_blocking(self._wakeup_r, False)
        signal.set_wakeup_fd(self._wakeup_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, self._on_signal)  # only to wake the loop up

    def _timeout(self) -> float:
        due = [s.restart_at for s in self.slots if s.restart_at is not None and not self.draining]
        if self.kill_at is not None:
            due.append(self.kill_at)
        now = time.monotonic()
        # A bounded wait also covers a SIGCHLD that came before the wakeup fd was watched.
        return max(0.0, min([now + 1.0, *due]) - now)

    def _step(self) -> None:
        fds = [self._wakeup_r, *(s.ready_fd for s in self.slots if s.ready_fd is not None)]
        try:
            readable, _, _ = select.select(fds, [], [], self._timeout())
        except InterruptedError:
            readable = []
        if self._wakeup_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wakeup_r, 512):
                    pass
        for fd in readable:
            if fd != self._wakeup_r:
                self._read_ready(fd)
        signals, self._signals[:] = list(self._signals), []
        for sig in signals:
            if sig == signal.SIGCHLD:
                continue
            if not self.draining:
                self._begin_drain(f"got {signal.Signals(sig).name}")
            else:
                log.info("got %s again: workers stop without finishing their drain", signal.Signals(sig).name)
                self._signal_all(signal.SIGTERM)
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                code = slot.proc.poll()
                if code is not None:
                    self._on_exit(slot, code)
        now = time.monotonic()
        if not self.draining:
            for slot in self.slots:
                if slot.restart_at is not None and now >= slot.restart_at:
                    slot.restarts += 1
                    self._write_restarts()
                    self._spawn(slot)
        elif self.kill_at is not None and now >= self.kill_at and any(s.running for s in self.slots):
            log.warning("workers still running %.0fs after the drain time: killing them", KILL_GRACE)
            self._signal_all(signal.SIGKILL)
            self.kill_at = None

    def run(self) -> int:
        self.directory = tempfile.mkdtemp(prefix="broadcaster-workers-")
        self._install_signals()
        log.info("starting %d workers on %s:%d (SO_REUSEPORT), supervisor pid %d", self.count, self.settings.host,
                 self.settings.port, os.getpid())
        try:
            self._write_restarts()
            for slot in self.slots:
                self._spawn(slot)
            while not self.draining or any(s.running for s in self.slots):
                self._step()
        finally:
            if not self.draining:  # an exception in the loop itself: leave no worker behind
                self._signal_all(signal.SIGTERM)
            for slot in self.slots:
                if slot.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        slot.proc.wait(timeout=self.settings.drain_seconds + KILL_GRACE)
                self._close_ready(slot)
            signal.set_wakeup_fd(-1)
            shutil.rmtree(self.directory, ignore_errors=True)
        if self.status is not None:
            return self.status
        last = [s.exit_codes[-1] for s in self.slots if s.exit_codes]
        failed = [code for code in last if code != 0]
        if failed:
            log.warning("%d worker(s) did not exit 0 after the drain: %s", len(failed),
                        ", ".join(status_text(c) for c in failed))
            return 1
        return 0


def supervise(settings: Settings, argv: Sequence[str], count: int) -> int:
    """Run ``count`` workers with ``argv`` (the supervisor's own command-line options) until drained."""
    if not hasattr(socket, "SO_REUSEPORT"):
        print("broadcaster-gateway: --workers needs SO_REUSEPORT (Linux, BSD, macOS)", file=sys.stderr)
        return 2
    return Supervisor(settings, argv, count).run()
