"""Real gateways for tests: in-process uvicorn servers on free ports, and subprocesses.

Both listen on 127.0.0.1 only. Every wait polls with a deadline and fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import httpx
import uvicorn

from broadcaster.backend import Backend
from broadcaster.profiles import ProfileRegistry
from gateway.app import create_app
from gateway.server import uvicorn_config
from gateway.settings import Settings
from gateway.state import Gateway


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class InProcessGateway:
    """``async with InProcessGateway(settings) as gw:`` serves the app on a free port in this loop.

    ``gw.gateway`` is the live :class:`Gateway` (hub, pool, backend) for white-box checks.
    """

    def __init__(self, settings: Settings | None = None, *, backend: Backend | None = None,
                 profiles: ProfileRegistry | None = None) -> None:
        self.settings = settings or Settings()
        self.settings.port = free_port()
        self.settings.host = "127.0.0.1"
        self.app = create_app(self.settings, backend=backend, profiles=profiles)
        config = uvicorn_config(self.app, self.settings)
        config.loop = "none"
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def gateway(self) -> Gateway:
        gw: Gateway = self.app.state.gateway
        return gw

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def ws_url(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.settings.port}/ws" + (f"?{query}" if query else "")

    async def __aenter__(self) -> InProcessGateway:
        self._task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + 10
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("gateway exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("in-process gateway did not start within 10 s")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=10)


class GatewayProcess:
    """A ``broadcaster-gateway`` subprocess on a free port (SIGTERM / SIGKILL-able)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.log = tempfile.NamedTemporaryFile(prefix="gateway-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/ws" + (f"?{query}" if query else "")

    def start(self, timeout: float = 15.0) -> GatewayProcess:
        command = [sys.executable, "-m", "gateway.cli", "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 15.0, path: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.http_url + path, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"gateway on port {self.port} not ready within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-5000:]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no drain, no presence withdrawal."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_gateways(count: int, *args: str, env: dict[str, str] | None = None) -> list[GatewayProcess]:
    """Start ``count`` gateway processes at once and wait for all of them."""
    procs = [GatewayProcess(*args, env=env) for _ in range(count)]
    try:
        for p in procs:
            command: Sequence[str] = [sys.executable, "-m", "gateway.cli", "--host", "127.0.0.1", "--port",
                                      str(p.port), *p.args]
            p.proc = subprocess.Popen(command, env=p.env, stdout=p.log, stderr=subprocess.STDOUT)
        for p in procs:
            p.wait_healthy()
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


def json_lines(frame: str | bytes) -> list[dict[str, Any]]:
    """The objects of one NDJSON frame."""
    import orjson

    text = frame.decode() if isinstance(frame, bytes) else frame
    return [orjson.loads(line) for line in text.split("\n") if line]
