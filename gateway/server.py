"""Running the app on uvicorn, with a graceful drain on SIGTERM.

On the first SIGTERM (or SIGINT) the gateway starts draining: ``/readyz`` answers
503, new sockets are closed 1012, open ones are closed 1012 spread over half of
``--drain-seconds``; once they are gone (or the time is up) uvicorn shuts down and
the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from gateway.protocol import CLOSE_DRAINING
from gateway.settings import Settings
from gateway.state import Gateway

log = logging.getLogger("gateway.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain described in the module docstring."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._drain_task is not None or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        seconds = self.gateway.settings.drain_seconds
        log.info("draining %d connections within %.1fs", len(self.gateway.pool), seconds)
        await self.gateway.pool.drain(seconds, CLOSE_DRAINING, "gateway draining; reconnect elsewhere")
        self.should_exit = True


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_max_size=settings.max_client_message_bytes,
        ws_ping_interval=settings.ping_interval or None,
        ws_ping_timeout=settings.ping_interval or None,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
        timeout_keep_alive=30,
    )


def serve(app: FastAPI, settings: Settings) -> None:
    """Run until drained; returns normally (exit status 0) after a SIGTERM."""
    server = DrainingServer(uvicorn_config(app, settings), app.state.gateway)
    server.run()
