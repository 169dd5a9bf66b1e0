"""A raw HTTP/1.1 Server-Sent Events client for tests: no HTTP or SSE library, the stream parsed here.

``async with await SseClient.open(port, "/sse?conv_id=c") as s`` sends the request, reads the
status line and headers, then :meth:`SseClient.next` decodes the chunked body into SSE events
by the rules of the HTML standard (``field: value`` lines, ``:`` comments, a blank line ends
an event, ``data`` lines joined by newlines). Every read has a deadline.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class SseEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None
    """The ``id`` field of this event (None: it had none)."""
    retry: int | None = None

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass(slots=True)
class SseClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    headers: dict[str, str]
    body: bytes = b""
    """The whole body when the response is not a stream (refusals)."""
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    ended: bool = False
    """The chunked body ended with its last chunk (the server ended the stream)."""
    _buffer: bytes = b""
    _chunked: bool = False

    @classmethod
    async def open(cls, port: int, target: str, *, headers: dict[str, str] | None = None,
                   timeout: float = 10.0, rcvbuf: int | None = None, host: str = "127.0.0.1") -> SseClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect: the window the server sees is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
        # a small limit: a reader that is not read stops reading the socket at 2 x limit (StreamReader pauses it)
        limit = 2 ** 20 if rcvbuf is None else 4096
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        parsed = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                parsed[name.strip().lower()] = value.strip()
        client = cls(reader, writer, status, parsed)
        client._chunked = parsed.get("transfer-encoding", "").lower() == "chunked"
        if not client._chunked and "content-length" in parsed:
            client.body = await asyncio.wait_for(reader.readexactly(int(parsed["content-length"])), timeout)
        return client

    def json(self) -> Any:
        return orjson.loads(self.body)

    async def _more(self, deadline: float) -> bool:
        """Read one more chunk of the body into the buffer; False at its end."""
        remaining = max(0.01, deadline - time.monotonic())
        if not self._chunked:
            data = await asyncio.wait_for(self.reader.read(65536), remaining)
            if not data:
                self.ended = True
                return False
            self._buffer += data
            return True
        size_line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), remaining)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            await asyncio.wait_for(self.reader.readuntil(b"\r\n"), remaining)
            self.ended = True
            return False
        chunk = await asyncio.wait_for(self.reader.readexactly(size + 2), remaining)
        self._buffer += chunk[:-2]
        return True

    async def next(self, timeout: float = 10.0) -> SseEvent:
        """The next dispatched event (comments and ``retry:`` recorded on the way); EOFError at the end."""
        deadline = time.monotonic() + timeout
        current = SseEvent()
        data: list[str] = []
        has_data = False
        while True:
            while b"\n" not in self._buffer:
                if not await self._more(deadline):
                    raise EOFError("the stream ended")
            raw, _, self._buffer = self._buffer.partition(b"\n")
            line = raw.decode().rstrip("\r")
            if not line:
                if has_data:
                    current.data = "\n".join(data)
                    return current
                current, data = SseEvent(), []
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
                has_data = True
            elif name == "event":
                current.event = value
            elif name == "id":
                current.id = value
            elif name == "retry" and value.isdigit():
                self.retry = current.retry = int(value)

    async def events(self, count: int, timeout: float = 10.0, *, skip_controls: bool = True) -> list[SseEvent]:
        """The next ``count`` events (control events ``ws.*`` skipped unless ``skip_controls`` is False)."""
        deadline = time.monotonic() + timeout
        got: list[SseEvent] = []
        while len(got) < count:
            event = await self.next(max(0.01, deadline - time.monotonic()))
            if skip_controls and event.event.startswith("ws."):
                continue
            got.append(event)
        return got

    async def expect(self, kind: str, timeout: float = 10.0) -> SseEvent:
        event = await self.next(timeout)
        assert event.event == kind, f"expected {kind}, got {event}"
        return event

    async def read_to_end(self, timeout: float = 10.0) -> list[SseEvent]:
        """Every event until the server ends the stream (TimeoutError if it does not in time)."""
        deadline = time.monotonic() + timeout
        got: list[SseEvent] = []
        while True:
            try:
                got.append(await self.next(max(0.01, deadline - time.monotonic())))
            except EOFError:
                return got

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, TimeoutError):
            pass

    async def __aenter__(self) -> SseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
