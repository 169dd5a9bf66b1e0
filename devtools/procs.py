"""Free ports and supervised subprocesses: the one copy the loopback cluster, the bench and the tests use.

* :func:`free_port` — a loopback TCP port nothing listens on (``with_bus``: port + 10000
  is free too, for a Redis Cluster node's bus).
* :class:`Supervised` — one subprocess: output to a log file (optionally echoed to stdout,
  prefixed with its name), ``wait_until(check, timeout)`` polls a readiness check with a
  deadline and fails loudly (with the log's tail) when the process exits first,
  ``stop()`` sends SIGTERM (or any signal), then SIGKILL after a timeout.

Standard library only: ``bench/run.py`` imports it from its own tools venv, where neither
the gateway nor its dependencies are installed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"
REDIS_CLUSTER_BUS_OFFSET = 10000
PRINT_LOCK = threading.Lock()
"""Held while a line is written to stdout, so echoed process output and banners do not interleave."""


class ProcessFailed(RuntimeError):
    """A supervised process exited before it was ready."""


class ProcessTimeout(ProcessFailed, TimeoutError):
    """A supervised process was not ready within its deadline."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (a TIME_WAIT leftover does not count, as for nginx and Redis)."""
    with socket.socket(_family(host)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST, *, with_bus: bool = False) -> int:
    """A TCP port nothing listens on right now; ``with_bus``: port + 10000 too (a Redis Cluster node's bus port)."""
    for _ in range(200):
        with socket.socket(_family(host)) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if not with_bus:
            return port
        bus = port + REDIS_CLUSTER_BUS_OFFSET
        if bus <= 65535 and port_is_free(host, bus):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) found for a Redis Cluster node")


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status of ``GET url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def redis_ping(port: int, host: str = HOST, timeout: float = 0.5) -> bytes:
    """The first reply line to a raw PING (``b"+PONG"``, ``b"-LOADING ..."``), or b"" if nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(256).split(b"\r\n", 1)[0]
    except OSError:
        return b""


def die_with_parent_hook() -> Callable[[], None] | None:
    """Linux: a pre-exec hook asking the kernel to SIGTERM the child when its parent dies (even by SIGKILL).

    ``prctl`` is looked up here, before the fork, so the child runs no import. None where
    there is no ``prctl`` (macOS). The signal is tied to the *thread* that forks, so only a
    supervisor that starts everything from its main thread should use it.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return hook


class Supervised:
    """One subprocess with its output in ``log``; see the module docstring.

    ``echo``: also copy each output line to stdout as ``NAME | line``. ``own_group``: start
    it in a process group of its own, so a Ctrl-C in the terminal reaches only the
    supervisor (which then stops its children in order). ``die_with_parent``: see
    :func:`die_with_parent_hook`. ``env`` / ``cwd``: as for :class:`subprocess.Popen`.
    """

    def __init__(self, name: str, command: Sequence[str], log: str | os.PathLike[str], *,
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 echo: bool = False, own_group: bool = False, die_with_parent: bool = False) -> None:
        self.name = name
        self.command = list(command)
        self.log = Path(log)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.echo = echo
        self.own_group = own_group
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self._relay: threading.Thread | None = None

    def start(self) -> Supervised:
        hook = die_with_parent_hook() if self.die_with_parent else None
        group = 0 if self.own_group else None
        if self.echo:
            self.proc = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=group,
                                         preexec_fn=hook)
            assert self.proc.stdout is not None
            self._relay = threading.Thread(target=self._copy, args=(self.proc.stdout,), name=f"log-{self.name}",
                                           daemon=True)
            self._relay.start()
        else:
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=subprocess.STDOUT, process_group=group,
                                             preexec_fn=hook)
        return self

    def _copy(self, stream: IO[bytes]) -> None:
        with open(self.log, "ab") as out:
            for line in iter(stream.readline, b""):
                out.write(line)
                out.flush()
                with PRINT_LOCK:
                    sys.stdout.write(f"{self.name:>9} | {line.decode(errors='replace').rstrip()}\n")
                    sys.stdout.flush()
        stream.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def send_signal(self, sig: int) -> None:
        """Signal the process if it is running (a no-op otherwise)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:  # exited between poll() and kill()
                pass

    def wait(self, timeout: float) -> int:
        """Wait for the exit; SIGKILL after ``timeout`` seconds. The exit status (negative: killed by a signal)."""
        assert self.proc is not None, f"{self.name} was never started"
        try:
            code = self.proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        if self._relay is not None:
            self._relay.join(timeout=5)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` and wait, SIGKILL after ``timeout``; the exit status, None if it never started."""
        if self.proc is None:
            return None
        self.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> int | None:
        """SIGKILL and reap: no drain, no goodbye."""
        return self.stop(signal.SIGKILL)

    def wait_until(self, check: Callable[[], bool], timeout: float, *, what: str = "ready",
                   interval: float = 0.05, details: Callable[[], str] | None = None) -> None:
        """Poll ``check()`` until it is true; ProcessFailed if the process exits first, ProcessTimeout at the deadline.

        Both errors carry the tail of the log (and ``details()``, e.g. a server's own log file).
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise ProcessFailed(f"{self.name} exited with {self.returncode} before it was {what}:\n"
                                    f"{self._report(details)}")
            if check():
                if self.running:
                    return
                continue  # it answered and exited: report the exit
            if time.monotonic() > deadline:
                raise ProcessTimeout(f"{self.name} not {what} within {timeout:g}s:\n{self._report(details)}")
            time.sleep(interval)

    def _report(self, details: Callable[[], str] | None) -> str:
        return self.output() + (f"\n{details()}" if details is not None else "")

    def output(self, chars: int = 5000) -> str:
        """The tail of the process's output (stdout and stderr)."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
