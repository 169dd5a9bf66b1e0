"""Load-generator process: many websocket clients, counted per step.

    python bench/client.py [--impl auto|picows|sansio]

Driven by the orchestrator (``run.py``) over stdin / stdout, one JSON object per
line each way. Commands:

* ``{"cmd": "connect", "urls": [...], "concurrency": 200}`` -> ``{"ok", "failed", "errors"}``
* ``{"cmd": "ready"}`` -> ``{"ready": connections that received an event, "open", "closed_by_server", "codes"}``
* ``{"cmd": "count", "step": S}`` -> ``{"count": events of step S received so far}``
* ``{"cmd": "take", "step": S}`` -> ``{"count", "buckets": latency bucket map (see hist.py), "frames"}``
* ``{"cmd": "close"}`` -> closes every connection, answers ``{"closed"}`` and exits.

Every server under test sends events as JSON objects (ours: several per text
frame, ``\\n``-separated; the peers: one per frame) whose ``data`` carries
``t`` (publish time, wall-clock microseconds) and ``s`` (step id). Per object the
client does one ``orjson.loads``, one subtraction and two appends; the
histogram is built after the step, outside the measured window.

Transport: picows (Cython websocket client) on uvloop when installed; else
websockets' sans-I/O ``ClientProtocol`` on a raw asyncio protocol (the smoke
test runs that way, with no extra package). ``http://…/sse?…`` URLs are read as
Server-Sent Events by :class:`SseClient` (raw asyncio protocol: chunked body, one
``data:`` line per object; the same per-object work as the websocket clients).

``ws://…/socket.io/?EIO=4&transport=websocket&room=R`` URLs (the socket.io peers)
speak socket.io v5 over engine.io v4 on the same transports (:class:`SioSession`):
the engine.io open packet ``0{…}`` is answered by the namespace connect ``40``, its
``40{…}`` by ``421["join","R"]``, and the connection counts as connected once that
join is acked (``431[…]``); pings ``2`` get ``3``; events arrive one per frame as
``42["event",{…}]`` whose object carries the same ``data`` as the other servers'.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import hist
import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - depends on the venv
    uvloop = None

try:
    import picows
except ImportError:  # pragma: no cover - depends on the venv
    picows = None

_time_ns = time.time_ns
_loads = orjson.loads
CONTROL_PREFIX = b'{"type":"ws.'


class Stats:
    """Counts and latency samples of every connection of this process, by step."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.samples: dict[int, Any] = {}
        self.frames = 0
        self.ready = 0
        self.closed_by_server = 0
        self.codes: Counter[str] = Counter()
        self.bad = 0

    def on_payload(self, conn: Any, payload: bytes) -> None:
        now = _time_ns() // 1000
        self.frames += 1
        lines = payload.split(b"\n") if b"\n" in payload else (payload,)
        for line in lines:
            if line.startswith(CONTROL_PREFIX):
                continue
            try:
                data = _loads(line)["data"]
                step, sent = data["s"], data["t"]
            except (ValueError, KeyError, TypeError):
                self.bad += 1
                continue
            self._record(conn, step, now - sent)

    def on_sio_event(self, conn: Any, payload: bytes) -> None:
        """One socket.io event packet, ``42["event",{…, "data": {…}}]``."""
        now = _time_ns() // 1000
        self.frames += 1
        try:
            data = _loads(payload[2:])[1]["data"]
            step, sent = data["s"], data["t"]
        except (ValueError, KeyError, TypeError, IndexError):
            self.bad += 1
            return
        self._record(conn, step, now - sent)

    def _record(self, conn: Any, step: int, latency_us: int) -> None:
        if not conn.got_event:
            conn.got_event = True
            self.ready += 1
        counts = self.counts
        if step in counts:
            counts[step] += 1
            self.samples[step].append(latency_us)
        else:
            counts[step] = 1
            arr = self.samples[step] = hist.new_samples()
            arr.append(latency_us)

    def on_server_close(self, code: int | str) -> None:
        self.closed_by_server += 1
        self.codes[str(code)] += 1


STATS = Stats()


class SioSession:
    """The socket.io side of one connection: answers the handshake and pings, joins the room, counts events.

    ``send`` writes one text frame. ``joined`` resolves once the server acked the join
    (or fails if the server refused the namespace).
    """

    def __init__(self, room: str, send: Callable[[bytes], None], joined: asyncio.Future[None]) -> None:
        self.join = b'421["join",' + orjson.dumps(room) + b"]"
        self.send = send
        self.joined = joined
        self.got_event = False

    def on_text(self, payload: bytes) -> None:
        head = payload[:2]
        if head == b"42":
            STATS.on_sio_event(self, payload)
        elif head[:1] == b"2":
            self.send(b"3")
        elif head[:1] == b"0":
            self.send(b"40")
        elif head == b"40":
            self.send(self.join)
        elif head == b"43":
            if not self.joined.done():
                self.joined.set_result(None)
        elif head == b"44" or head == b"41" or head[:1] == b"1":
            if not self.joined.done():
                self.joined.set_exception(ConnectionError(f"socket.io refused: {payload[:120]!r}"))


def sio_room(url: str) -> str | None:
    """The room of a socket.io URL (``…/socket.io/?…&room=R``), None for other URLs."""
    parts = urlsplit(url)
    if not parts.path.startswith("/socket.io/"):
        return None
    return parse_qs(parts.query).get("room", [""])[0]


# --- picows ----------------------------------------------------------------------------------

if picows is not None:

    class PicowsClient(picows.WSListener):  # type: ignore[misc]
        def __init__(self) -> None:
            self.got_event = False
            self.closing = False
            self.transport: Any = None

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            kind = frame.msg_type
            if kind == picows.WSMsgType.TEXT or kind == picows.WSMsgType.BINARY:
                STATS.on_payload(self, frame.get_payload_as_bytes())
            elif kind == picows.WSMsgType.CLOSE:
                if not self.closing:
                    STATS.on_server_close(frame.get_close_code().value)
                    self.closing = True
                transport.send_close(frame.get_close_code())
                transport.disconnect()

        def on_ws_disconnected(self, transport: Any) -> None:
            if not self.closing:
                self.closing = True
                STATS.on_server_close("eof")

        def close(self) -> None:
            if not self.closing and self.transport is not None:
                self.closing = True
                self.transport.send_close(picows.WSCloseCode.OK)
                self.transport.disconnect()

    async def connect_picows(url: str) -> Any:
        _, client = await picows.ws_connect(PicowsClient, url, websocket_handshake_timeout=30,
                                            max_frame_size=64 * 1024 * 1024)
        return client

    class SioPicowsClient(PicowsClient):  # type: ignore[misc]
        """A picows client carrying a :class:`SioSession`."""

        def __init__(self, room: str, joined: asyncio.Future[None]) -> None:
            super().__init__()
            self.sio = SioSession(room, self._send_text, joined)

        def _send_text(self, payload: bytes) -> None:
            if not self.closing:
                self.transport.send(picows.WSMsgType.TEXT, payload)

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type == picows.WSMsgType.TEXT:
                self.sio.on_text(frame.get_payload_as_bytes())
            else:
                super().on_ws_frame(transport, frame)

        def on_ws_disconnected(self, transport: Any) -> None:
            super().on_ws_disconnected(transport)
            if not self.sio.joined.done():
                self.sio.joined.set_exception(ConnectionError("disconnected before the join was acked"))

    async def connect_sio_picows(url: str) -> Any:
        joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        room = sio_room(url) or ""
        _, client = await picows.ws_connect(lambda: SioPicowsClient(room, joined), url,
                                            websocket_handshake_timeout=30, max_frame_size=64 * 1024 * 1024)
        try:
            async with asyncio.timeout(30):
                await joined
        except BaseException:
            client.close()
            raise
        return client


# --- websockets sans-I/O on a raw asyncio protocol ------------------------------------------


class SansioClient(asyncio.Protocol):
    """websockets' ClientProtocol driven by an asyncio.Protocol: no per-frame task, no queue."""

    def __init__(self, url: str, opened: asyncio.Future[None]) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.proto = ClientProtocol(parse_uri(url), max_size=None)
        self.opened = opened
        self.got_event = False
        self.closing = False
        self.transport: asyncio.Transport | None = None
        room = sio_room(url)
        self.sio = None if room is None else SioSession(room, self._send_text, opened.get_loop().create_future())

    def _send_text(self, payload: bytes) -> None:
        if not self.closing:
            self.proto.send_text(payload)
            self._flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proto.send_request(self.proto.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Opcode
        from websockets.http11 import Response

        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if isinstance(event, Response):
                if event.status_code == 101 and not self.opened.done():
                    self.opened.set_result(None)
                elif not self.opened.done():
                    self.opened.set_exception(ConnectionError(f"HTTP {event.status_code}"))
            elif event.opcode is Opcode.TEXT and self.sio is not None:
                self.sio.on_text(event.data)
            elif event.opcode is Opcode.TEXT or event.opcode is Opcode.BINARY:
                STATS.on_payload(self, event.data)
            elif event.opcode is Opcode.CLOSE and not self.closing:
                self.closing = True
                code = self.proto.close_rcvd.code if self.proto.close_rcvd is not None else "none"
                STATS.on_server_close(code)
        self._flush()

    def _flush(self) -> None:
        assert self.transport is not None
        for chunk in self.proto.data_to_send():
            if chunk:
                self.transport.write(chunk)
            elif self.transport.can_write_eof():
                self.transport.write_eof()
        if self.proto.close_expected():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost before the handshake: {exc}"))
        if self.sio is not None and not self.sio.joined.done():
            self.sio.joined.set_exception(ConnectionError(f"connection lost before the join was acked: {exc}"))
        if not self.closing:
            self.closing = True
            STATS.on_server_close("eof")

    def close(self) -> None:
        if not self.closing and self.transport is not None:
            self.closing = True
            with contextlib.suppress(Exception):
                self.proto.send_close(1000)
                self._flush()
            self.transport.close()


async def connect_sansio(url: str) -> SansioClient:
    from websockets.uri import parse_uri

    uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[None] = loop.create_future()
    _, client = await loop.create_connection(lambda: SansioClient(url, opened), uri.host, uri.port)
    try:
        async with asyncio.timeout(30):
            await opened
            if client.sio is not None:
                await client.sio.joined
    except BaseException:
        client.close()
        raise
    return client


# --- Server-Sent Events on a raw asyncio protocol -------------------------------------------


class SseClient(asyncio.Protocol):
    """``GET /sse``: the response head, then a chunked body of SSE events; each ``data:`` line is one object."""

    def __init__(self, host: str, target: str, opened: asyncio.Future[None]) -> None:
        self.request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
        self.opened = opened
        self.got_event = False
        self.closing = False
        self.transport: asyncio.Transport | None = None
        self._head = True
        self._raw = b""  # bytes not yet de-chunked
        self._left = 0  # bytes left in the current chunk (+2 for its CRLF)
        self._text = b""  # de-chunked SSE text not yet split into lines

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        raw = self._raw + data if self._raw else data
        if self._head:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self._raw = raw
                return
            status = raw[:end].split(b" ", 2)[1]
            if not self.opened.done():
                if status == b"200":
                    self.opened.set_result(None)
                else:
                    self.opened.set_exception(ConnectionError(f"HTTP {status.decode()}"))
            self._head = False
            raw = raw[end + 4:]
        text, pos, size = [], 0, len(raw)
        while pos < size:
            if self._left:
                take = min(self._left, size - pos)
                text.append(raw[pos:pos + take])
                pos += take
                self._left -= take
                continue
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            line = raw[pos:eol]
            pos = eol + 2
            if not line:
                continue  # the CRLF after a chunk's data
            length = int(line.split(b";", 1)[0], 16)
            if length == 0:
                self._end("end")
                return
            self._left = length
        self._raw = raw[pos:]
        if not text:
            return
        buf = self._text + b"".join(text)
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._text = buf
            return
        self._text = buf[cut + 2:]
        for line in buf[:cut].split(b"\n"):
            if line.startswith(b"data: "):
                STATS.on_payload(self, line[6:])

    def _end(self, why: str) -> None:
        if not self.closing:
            self.closing = True
            STATS.on_server_close(why)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost before the response: {exc}"))
        if not self.closing:
            self.closing = True
            STATS.on_server_close("eof")

    def close(self) -> None:
        if not self.closing and self.transport is not None:
            self.closing = True
            self.transport.close()


async def connect_sse(url: str) -> SseClient:
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[None] = loop.create_future()
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    _, client = await loop.create_connection(lambda: SseClient(parts.netloc, target, opened),
                                             parts.hostname or "127.0.0.1", parts.port or 80)
    try:
        async with asyncio.timeout(30):
            await opened
    except BaseException:
        client.close()
        raise
    return client


# --- command loop -----------------------------------------------------------------------------


CONNECT_ATTEMPTS = 4
"""Tries of one client's connect (backoff 0.2, 0.4, 0.8 s between them) before it counts as failed."""


class Driver:
    def __init__(self, impl: str) -> None:
        self.impl = impl
        self.clients: list[Any] = []

    async def connect(self, urls: list[str], concurrency: int) -> dict[str, Any]:
        connect = connect_picows if self.impl == "picows" else connect_sansio
        if urls and urls[0].startswith("http"):
            connect = connect_sse
        elif urls and sio_room(urls[0]) is not None and self.impl == "picows":
            connect = connect_sio_picows
        gate = asyncio.Semaphore(max(1, concurrency))
        errors: Counter[str] = Counter()
        retried: Counter[str] = Counter()

        async def one(url: str) -> None:
            # A refused connect (our gateway's 503 past --max-pending-handshakes, a full accept queue) is
            # tried again after a short backoff, as every real client does; the refusals are reported.
            for attempt in range(CONNECT_ATTEMPTS):
                async with gate:
                    try:
                        self.clients.append(await connect(url))
                        return
                    except Exception as exc:
                        why = f"{exc.__class__.__name__}: {exc}"[:160]
                if attempt == CONNECT_ATTEMPTS - 1:
                    errors[why] += 1
                else:
                    retried[why] += 1
                    await asyncio.sleep(0.2 * 2 ** attempt)

        await asyncio.gather(*(one(u) for u in urls))
        failed = sum(errors.values())
        return {"ok": len(urls) - failed, "failed": failed, "errors": dict(errors.most_common(5)),
                "retried": sum(retried.values()), "retry_reasons": dict(retried.most_common(3))}

    def handle(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        cmd = msg["cmd"]
        if cmd == "ready":
            return {"ready": STATS.ready, "open": len(self.clients) - STATS.closed_by_server,
                    "closed_by_server": STATS.closed_by_server, "codes": dict(STATS.codes), "bad": STATS.bad}
        if cmd == "count":
            return {"count": STATS.counts.get(msg["step"], 0)}
        if cmd == "take":
            step = msg["step"]
            samples = STATS.samples.pop(step, ())
            return {"count": STATS.counts.pop(step, 0), "buckets": hist.buckets(samples), "frames": STATS.frames,
                    "closed_by_server": STATS.closed_by_server, "codes": dict(STATS.codes)}
        return None

    async def close(self) -> int:
        for client in self.clients:
            client.close()
        await asyncio.sleep(0.3)
        return len(self.clients)


async def main(impl: str) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    driver = Driver(impl)
    out = sys.stdout.buffer

    def reply(obj: dict[str, Any]) -> None:
        out.write(orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS) + b"\n")
        out.flush()

    reply({"hello": impl})
    while True:
        line = await reader.readline()
        if not line:
            break
        msg = orjson.loads(line)
        if msg["cmd"] == "connect":
            reply(await driver.connect(msg["urls"], msg.get("concurrency", 200)))
        elif msg["cmd"] == "close":
            reply({"closed": await driver.close()})
            break
        else:
            answer = driver.handle(msg)
            reply(answer if answer is not None else {"error": f"unknown command {msg['cmd']!r}"})


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["auto", "picows", "sansio"], default="auto")
    args = parser.parse_args()
    chosen = args.impl
    if chosen == "auto":
        chosen = "picows" if picows is not None and uvloop is not None else "sansio"
    if chosen == "picows" and picows is None:
        sys.exit("picows is not installed")
    raise_nofile()
    if uvloop is not None:
        uvloop.run(main(chosen))
    else:
        asyncio.run(main(chosen))
