"""The floor: the least a Python process can do to fan Redis pub/sub out to websockets.

    python bench/servers/floor.py --port 8001 --redis-url redis://127.0.0.1:6379/0 --prefix bc

No framework: one ``asyncio.Protocol`` per socket on uvloop, the HTTP upgrade
parsed by hand, one Redis connection read with ``hiredis.Reader``, one
``SUBSCRIBE`` per conversation (on its first client; ``UNSUBSCRIBE`` after its
last). For each message on ``P:{C}:live`` it decodes the msgpack payload once,
encodes the event object once with orjson, builds ONE websocket frame and
``transport.write``s that same frame to every client of the conversation: one
frame per message per client, no queue, no batching, no per-client task, no
back-pressure (a slow client's transport buffer just grows), no seq checks, no
resume. It is the cost floor of "one frame per message", not a product.

``GET /healthz`` answers 200. The websocket URL is ``/ws?conv_id=C``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from typing import Any
from urllib.parse import parse_qs, urlparse

import hiredis
import msgpack
import orjson
from peer_cli import peer_args

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLOSE_FRAME = b"\x88\x02\x03\xe8"  # close, code 1000


def frame_header(length: int) -> bytes:
    """Header of an unmasked, final text frame of ``length`` bytes."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)


class Floor:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.clients: dict[bytes, set[asyncio.Transport]] = {}  # live channel -> transports
        self.redis: RedisSubscriber | None = None
        self.messages = 0
        self.bad = 0

    def channel(self, conv: str) -> bytes:
        return f"{self.prefix}:{{{conv}}}:live".encode()

    def join(self, channel: bytes, transport: asyncio.Transport) -> None:
        members = self.clients.get(channel)
        if members is None:
            members = self.clients[channel] = set()
            assert self.redis is not None
            self.redis.command(b"SUBSCRIBE", channel)
        members.add(transport)

    def leave(self, channel: bytes, transport: asyncio.Transport) -> None:
        members = self.clients.get(channel)
        if members is None:
            return
        members.discard(transport)
        if not members:
            del self.clients[channel]
            assert self.redis is not None
            self.redis.command(b"UNSUBSCRIBE", channel)

    def on_message(self, channel: bytes, payload: bytes) -> None:
        members = self.clients.get(channel)
        if not members:
            return
        self.messages += 1
        try:
            body = msgpack.unpackb(payload)
            obj = {"type": body["type"], "conv_id": body["conv"], "seq": body["seq"], "id": body["id"],
                   "ts": body["ts"], "data": body["data"]}
        except Exception:
            self.bad += 1
            return
        text = orjson.dumps(obj)
        frame = frame_header(len(text)) + text
        for transport in members:
            transport.write(frame)


class RedisSubscriber(asyncio.Protocol):
    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def command(self, *args: bytes) -> None:
        assert self.transport is not None
        self.transport.write(hiredis.pack_command(args))

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        on_message = self.floor.on_message
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if type(reply) is list and reply[0] == b"message":
                on_message(reply[1], reply[2])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class WsServerProtocol(asyncio.Protocol):
    """HTTP upgrade by hand, then only close frames are looked at."""

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.channel: bytes | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.open:
            self._handshake()
        else:
            self._frames()

    def _handshake(self) -> None:
        assert self.transport is not None
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > 16384:
                self.transport.close()
            return
        head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        target = urlparse(parts[1] if len(parts) > 1 else "/")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if target.path == "/healthz":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.transport.close()
            return
        key = headers.get("sec-websocket-key")
        conv = parse_qs(target.query).get("conv_id", [""])[0]
        if target.path != "/ws" or not key or not conv or headers.get("upgrade", "").lower() != "websocket":
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.open = True
        self.channel = self.floor.channel(conv)
        self.floor.join(self.channel, self.transport)
        if self.buffer:
            self._frames()

    def _frames(self) -> None:
        """Skip client frames (masked); answer a close frame with a close frame and hang up."""
        assert self.transport is not None
        buf = self.buffer
        while len(buf) >= 2:
            opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
            offset = 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, offset = struct.unpack("!H", buf[2:4])[0], 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length, offset = struct.unpack("!Q", buf[2:10])[0], 10
            if buf[1] & 0x80:
                offset += 4
            if len(buf) < offset + length:
                break
            buf = buf[offset + length :]
            if opcode == 0x8:
                self.transport.write(CLOSE_FRAME)
                self.transport.close()
                break
        self.buffer = buf

    def connection_lost(self, exc: Exception | None) -> None:
        if self.channel is not None and self.transport is not None:
            self.floor.leave(self.channel, self.transport)
            self.channel = None


async def serve(port: int, redis_url: str, prefix: str) -> None:
    loop = asyncio.get_running_loop()
    floor = Floor(prefix)
    parsed = urlparse(redis_url)
    _, redis = await loop.create_connection(lambda: RedisSubscriber(floor), parsed.hostname or "127.0.0.1",
                                            parsed.port or 6379)
    floor.redis = redis
    server = await loop.create_server(lambda: WsServerProtocol(floor), "127.0.0.1", port, backlog=2048)
    async with server:
        await redis.lost


def main() -> None:
    args = peer_args(__doc__, 8001)
    runner: Any
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - depends on the venv
        runner = asyncio.run
    runner(serve(args.port, args.redis_url, args.prefix))


if __name__ == "__main__":
    main()
