"""Real gateways for tests: in-process uvicorn servers on free ports, and subprocesses.

Both listen on 127.0.0.1 only. Every wait polls with a deadline and fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from typing import Any

import httpx
import uvicorn

from broadcaster.backend import Backend
from broadcaster.profiles import ProfileRegistry
from devtools.procs import Supervised, free_port
from gateway.app import create_app
from gateway.server import uvicorn_config
from gateway.settings import Settings
from gateway.state import Gateway

__all__ = ["GatewayProcess", "InProcessGateway", "free_port", "json_lines", "start_gateways"]


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
        fd, self.log = tempfile.mkstemp(prefix="gateway-", suffix=".log")
        os.close(fd)
        command = [sys.executable, "-m", "gateway.cli", "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        self.process = Supervised(f"gateway on port {self.port}", command, self.log, env=self.env)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/ws" + (f"?{query}" if query else "")

    def start(self, timeout: float = 15.0) -> GatewayProcess:
        self.process.start()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 15.0, path: str = "/readyz") -> None:
        """Poll ``path`` until 200: RuntimeError if the process exits first, TimeoutError at the deadline."""
        def answers() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.http_url + path, timeout=1.0).status_code == 200
            return False

        self.process.wait_until(answers, timeout, what=f"ready ({path})")

    def output(self) -> str:
        return self.process.output()

    def signal(self, sig: int) -> None:
        assert self.process.proc is not None
        self.process.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no drain, no presence withdrawal."""
        if self.process.running:
            self.process.kill()

    def wait(self, timeout: float) -> int:
        """Wait for the exit (subprocess.TimeoutExpired after ``timeout``; the process keeps running)."""
        assert self.process.proc is not None
        return self.process.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM (the gateway drains), SIGKILL after 15 s; the log file is removed."""
        if self.process.running:
            self.process.stop(signal.SIGTERM, timeout=15)
        with contextlib.suppress(OSError):
            os.unlink(self.log)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_gateways(count: int, *args: str, env: dict[str, str] | None = None) -> list[GatewayProcess]:
    """Start ``count`` gateway processes at once and wait for all of them."""
    procs = [GatewayProcess(*args, env=env) for _ in range(count)]
    try:
        for p in procs:
            p.process.start()
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
