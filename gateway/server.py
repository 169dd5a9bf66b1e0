"""Running the app on uvicorn, with a graceful drain on SIGTERM.

On the first SIGTERM (or SIGINT) the gateway starts draining: ``/readyz`` answers
503, new sockets are closed 1012, open ones are closed 1012 spread over half of
``--drain-seconds``; once they are gone (or the time is up) uvicorn shuts down and
the process exits 0. A second signal exits at once.

Before serving, :func:`uvicorn_config` runs the compatibility check of
:mod:`gateway.compat`: the protocol classes below use uvicorn and websockets
internals, and a missing one stops the start (or, with ``--compat``, turns its
feature off, logged at WARNING and exported as ``broadcaster_compat_fallback``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import weakref
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.protocol import State

from gateway import compat, gcpolicy
from gateway.compat import CompatCollector, CompatReport
from gateway.connection import DIRECT_FRAME, DIRECT_SEND, FRAME_KIND, enable_direct_send, text_frame
from gateway.deflate import PLAIN, frame_kind, shared_factories
from gateway.handshake import http_protocol
from gateway.inbox import Inbox, WriteGate
from gateway.keepalive import wheel_of
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
        if self.started:
            # Served and shut down (sockets drained, the gateway stopped, its backend closed): the
            # process ends here rather than in asyncio's teardown, which waits for every name lookup
            # still running in a resolver thread. With Redis gone (compose down, a deleted pod) a
            # lookup of its name can take the resolver's timeout several times over - longer than
            # the orchestrator's grace period, which then kills a gateway that had drained.
            exit_now()

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


_OPEN = State.OPEN  # an Enum member lookup per frame is not free

_SLOTTED = ("config", "app", "loop", "logger", "root_path", "asgi_version", "app_state", "connections", "tasks",
            "default_headers", "server", "client", "scheme", "close_timeout", "ping_interval", "ping_timeout",
            "pending_ping_payload", "ping_sent_at", "last_ping_rtt", "curr_msg_data_type", "handshake_initiated",
            "read_paused")
"""Fields uvicorn's protocol sets per socket that go to slots of our subclass instead of its ``__dict__``: with
more than 30 keys CPython gives each instance a dict of its own (~1.6 KB) instead of one sharing the class's keys.
Only names that are no class attribute of uvicorn's (a property there stays a property)."""


class DirectSendProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O websocket protocol, plus a synchronous text send for the connection pool.

    The scope of every accepted socket gets ``scope["extensions"][DIRECT_SEND]``:
    :meth:`send_text_now`, which does what ``await send({"type": "websocket.send",
    "text": ...})`` does when that would not wait - the same frame, written at
    once - and returns False when it would wait or fail (transport paused, close
    sent, peer gone), so the caller falls back to the ASGI send. It saves the
    pool a writer-task wake-up and the Starlette / ASGI call chain per frame:
    the largest cost after the socket write itself in py-spy profiles (BENCHMARKS.md).

    A socket that can share frames (no extensions, or permessage-deflate without server
    context takeover: :func:`gateway.deflate.frame_kind`) also gets
    ``scope["extensions"][DIRECT_FRAME]``: :meth:`write_frame`, which writes a frame the
    pool built once for every socket it goes to, when nothing could come between; and its
    kind as ``scope["extensions"][FRAME_KIND]``.

    With ``shared_deflate`` (``--ws-compression shared``) the permessage-deflate websockets
    negotiates is gateway.deflate's, without context takeover, instead of the one uvicorn
    builds per socket in its ``__init__`` (with it).
    """

    __slots__ = tuple(name for name in _SLOTTED if not hasattr(WebSocketsSansIOProtocol, name))

    direct_send: bool = True
    """Offer :meth:`send_text_now` (off when ``gateway.compat`` found what it needs missing)."""
    light_waits: bool = True
    """Replace uvicorn's per-socket ``asyncio.Queue`` and ``asyncio.Event`` with gateway.inbox's (same)."""
    shared_ping_timer: bool = True
    """Arm the next keepalive ping on gateway.keepalive's wheel rather than a TimerHandle per socket (same)."""
    shared_frames: bool = True
    """Offer :meth:`write_frame` to sockets that can share frames (same; only with ``direct_send``)."""
    shared_deflate: bool = False
    """Negotiate permessage-deflate without context takeover (``--ws-compression shared``; compat)."""
    deflate_frames: bool = True
    """Offer :meth:`write_frame` to sockets with permessage-deflate without server context takeover, whatever
    the mode negotiated it (a client may ask for it; compat ``shared_deflate``)."""
    paused = False
    """The transport asked us to stop writing (``pause_writing``) and has not resumed yet."""
    release_handshake: bool = True
    """Drop the handshake request and response once accepted (same)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.light_waits:
            self.queue = Inbox()  # type: ignore[assignment]
            self.writable = WriteGate(self.writable.is_set())  # type: ignore[assignment]
        if self.shared_deflate and self.conn.available_extensions:  # uvicorn's factory: ws_per_message_deflate
            self.conn.available_extensions = shared_factories()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.direct_send and not self.close_sent:  # close_sent: refused, uvicorn made no scope
            extensions: Any = self.scope["extensions"]
            extensions[DIRECT_SEND] = self.send_text_now
            kind = frame_kind(self.conn.extensions) if self.shared_frames else None  # negotiated by the accept
            if kind is not None and (kind == PLAIN or self.deflate_frames):
                extensions[DIRECT_FRAME] = self.write_frame
                if kind != PLAIN:
                    extensions[FRAME_KIND] = kind

    def pause_writing(self) -> None:
        self.paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        self.paused = False
        super().resume_writing()

    handshake_deadline: asyncio.TimerHandle | None = None
    """Closes the socket if the app neither accepts nor refuses in time (set by gateway.handshake)."""

    def start_keepalive(self) -> None:
        # Called once the handshake response is written: the handshake's request and response
        # objects (headers and all) are never read again; let them go (memory of idle sockets).
        # The request also lives on in websockets' parser generator (a local of its suspended
        # frame), so its headers are emptied in place rather than only dropped here; so are the
        # ASGI scope's (about 1 KB of tuples per socket).
        self._cancel_handshake_deadline()
        if self.release_handshake:
            if self.request is not None:
                self.request.headers.clear()
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]
            self.conn.available_extensions = None  # the permessage-deflate factory: read by the accept only
            headers = self.scope.get("headers") if isinstance(getattr(self, "scope", None), dict) else None
            if isinstance(headers, list):  # Starlette's WebSocket.headers is this same list: the app reads
                headers.clear()  # its headers before it accepts (gateway.ws_endpoint does), never after
        super().start_keepalive()

    def schedule_ping(self) -> None:
        if not self.shared_ping_timer or self.ping_interval is None:
            super().schedule_ping()
            return
        delay = max(0.0, self.ping_interval - self.last_ping_rtt)
        self.ping_timer = wheel_of(self.loop).call_later(delay, self)  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_handshake_deadline()
        super().connection_lost(exc)

    def _cancel_handshake_deadline(self) -> None:
        if self.handshake_deadline is not None:
            self.handshake_deadline.cancel()
            self.handshake_deadline = None

    def send_text_now(self, data: bytes) -> bool:
        """Write ``data`` (UTF-8 JSON) as one text frame now; False if it has to go through ``send``."""
        if (self.close_sent or self.disconnected or not self.handshake_complete or self.initial_response is not None
                or not self.writable.is_set()):
            return False
        conn = self.conn
        if conn.extensions or conn.writes:  # permessage-deflate, or output pending: websockets frames it, in order
            try:
                conn.send_text(data)
            except InvalidState:
                return False
            self.transport.write(b"".join(conn.data_to_send()))
            return True
        if conn.state is not _OPEN or conn.expect_continuation_frame:
            return False
        self.transport.write(text_frame(data))
        return True

    def write_frame(self, frame: bytes) -> bool:
        """Write ``frame`` (a whole text frame of this socket's frame kind) as it is now; False if
        it cannot go out unchanged and at once: paused, closing or closed, or websockets has output pending
        (the caller then sends the payload through :meth:`send_text_now` or the ASGI send, in order)."""
        if self.paused or self.close_sent or self.disconnected:
            return False
        conn = self.conn
        if conn.writes or conn.state is not _OPEN or conn.expect_continuation_frame:
            return False
        self.transport.write(frame)
        return True


def protocol_classes(settings: Settings, report: CompatReport) -> tuple[type[HttpToolsProtocol],
                                                                         type[DirectSendProtocol]]:
    """The HTTP and websocket protocol classes for ``settings``, each feature on only if ``report`` found
    what it needs (``--compat``); without ``request_deadline``, uvicorn's own httptools protocol."""
    http = (http_protocol(settings.handshake_timeout, handshake_deadline=report.ok("handshake_deadline"))
            if report.ok("request_deadline") else HttpToolsProtocol)
    ws = type("DirectSendProtocol", (DirectSendProtocol,), {
        "direct_send": report.ok("direct_send"), "release_handshake": report.ok("handshake_release"),
        "shared_frames": report.ok("direct_send") and report.ok("shared_frames"),
        "shared_deflate": settings.ws_compression == "shared" and report.ok("shared_deflate"),
        "deflate_frames": report.ok("shared_deflate"),
        "light_waits": report.ok("light_waits"), "shared_ping_timer": report.ok("shared_ping_timer")})
    return http, ws


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, CompatCollector] = weakref.WeakKeyDictionary()


def export_compat(app: FastAPI, report: CompatReport) -> None:
    """Expose ``report`` as ``broadcaster_compat_fallback`` on the app's /metrics (once per registry)."""
    registry: CollectorRegistry = app.state.gateway.metrics.registry
    collector = _collectors.get(registry)
    if collector is None:
        collector = _collectors[registry] = CompatCollector(report)
        registry.register(collector)
    collector.report = report


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's config for the gateway; runs the start-up compatibility check (:mod:`gateway.compat`)
    first: CompatError when an internal is missing, unless ``settings.compat`` allows the fallback."""
    report = compat.check(settings.compat)
    http, ws = protocol_classes(settings, report)
    enable_direct_send(report.ok("direct_send"))
    export_compat(app, report)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=http,
        ws=ws,
        ws_max_size=settings.max_client_message_bytes,
        ws_per_message_deflate=settings.ws_compression != "off",  # shared: DirectSendProtocol swaps the factory
        ws_ping_interval=settings.ping_interval or None,
        ws_ping_timeout=settings.ping_interval or None,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
        timeout_keep_alive=30,
    )


def exit_now(status: int = 0) -> None:
    """Flush the logs and standard streams, then end the process with ``status`` at once."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def serve(app: FastAPI, settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """Run until drained; returns normally (exit status 0) after a SIGTERM. A failed compatibility
    check prints its message and exits 2 (a configuration to fix: versions, or ``--compat``).
    ``sockets``: serve these (bound, not yet listening: uvicorn listens once the app started)
    instead of binding ``settings.host``:``settings.port`` (a ``--workers`` worker, gateway.workers)."""
    try:
        config = uvicorn_config(app, settings)
    except compat.CompatError as exc:
        print(f"broadcaster-gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    server = DrainingServer(config, app.state.gateway)
    pool = app.state.gateway.pool
    # a served process only: tests embedding the app keep the interpreter's collector
    gcpolicy.install(sockets=lambda: (pool.stats.connections_opened - len(pool), len(pool)))
    server.run(sockets=sockets)
