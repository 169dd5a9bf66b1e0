"""A minimal websocket test client that reads NDJSON frames and keeps objects in order."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from tests.support.gateway import json_lines


class WsClient:
    """Connect with ``await WsClient.connect(url)``; read objects with :meth:`next` / :meth:`until`."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames = 0
        self._pending: deque[dict[str, Any]] = deque()

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> WsClient:
        ws = await websockets.connect(url, max_size=None, open_timeout=10, **kwargs)
        return cls(ws)

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next object; raises TimeoutError, or ConnectionClosed when the server closed."""
        if not self._pending:
            frame = await asyncio.wait_for(self.ws.recv(), timeout)
            self.frames += 1
            self._pending.extend(json_lines(frame))
        return self._pending.popleft()

    async def until(self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0,
                    keep: Callable[[dict[str, Any]], bool] = lambda o: True) -> list[dict[str, Any]]:
        """Read objects (those ``keep`` accepts) until ``done(objects)`` holds; TimeoutError at the deadline."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not done(got):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s; got {len(got)} objects: {got[-3:]}")
            obj = await self.next(remaining)
            if keep(obj):
                got.append(obj)
        return got

    async def events(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The next ``count`` non-control objects."""
        return await self.until(lambda got: len(got) >= count, timeout, keep=lambda o: not o["type"].startswith("ws."))

    async def expect(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """Skip to the next object of type ``kind``."""
        return (await self.until(lambda got: bool(got), timeout, keep=lambda o: o["type"] == kind))[0]

    async def send_json(self, obj: dict[str, Any]) -> None:
        import orjson

        await self.ws.send(orjson.dumps(obj).decode())

    async def close_code(self, timeout: float = 10.0) -> int | None:
        """Read until the server closes; the close code it sent."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - time.monotonic()))
        except websockets.ConnectionClosed:
            rcvd = self.ws.protocol.close_rcvd
            return rcvd.code if rcvd is not None else None
        raise TimeoutError("server did not close")

    async def close(self) -> None:
        await self.ws.close()


class StalledClient:
    """A websocket client on a raw socket that stops reading after the handshake.

    Its receive buffer is tiny, so the server's queue for it really fills. Uses the
    sans-I/O protocol of ``websockets`` to speak the handshake and parse frames later.
    """

    def __init__(self, url: str, port: int) -> None:
        import socket

        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(10)

    def handshake(self) -> None:
        from websockets.protocol import State

        self.protocol.send_request(self.protocol.connect())
        self.sock.sendall(b"".join(self.protocol.data_to_send()))
        deadline = time.monotonic() + 10
        while self.protocol.state is not State.OPEN:
            if time.monotonic() > deadline or self.protocol.handshake_exc is not None:
                raise RuntimeError(f"handshake failed: {self.protocol.handshake_exc}")
            self.protocol.receive_data(self.sock.recv(65536))
            self.protocol.events_received()

    def read_until_closed(self, timeout: float = 30.0) -> int | None:
        """Resume reading everything; the close code the server sent."""
        deadline = time.monotonic() + timeout
        while self.protocol.close_rcvd is None:
            if time.monotonic() > deadline:
                raise TimeoutError("no close frame")
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            self.protocol.receive_data(chunk)
            self.protocol.events_received()
        self.sock.close()
        return self.protocol.close_rcvd.code if self.protocol.close_rcvd is not None else None
