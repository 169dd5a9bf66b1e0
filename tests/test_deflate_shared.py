"""``--ws-compression shared``: permessage-deflate without context takeover (no zlib state on idle
sockets) and one compressed frame per (event, profile, server window) for every such socket
(gateway.deflate, gateway.connection's pool flush, gateway.server).

Real gateways on free ports; real websockets clients offering deflate, a raw client offering
a bare ``permessage-deflate`` and clients offering nothing. The white-box checks count what the
pool compressed and wrote, so each test fails if the shared path is not taken.
"""

from __future__ import annotations

import asyncio
import base64
import random
import socket
import time
import zlib
from typing import Any

import pytest
import websockets
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from broadcaster.envelope import PublishRequest
from gateway import compat
from gateway.connection import Connection, text_frame
from gateway.deflate import WINDOW_BITS, deflate_frame, frame_kind, shared_factories
from gateway.settings import Settings
from tests.support.gateway import GatewayProcess, InProcessGateway, json_lines
from tests.support.polling import async_wait_until
from tests.support.wsclient import WsClient
from tests.test_shared_frames import protocol_of, record_writes

pytestmark = pytest.mark.timeout(90)

_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _upgrade(path: str = "/ws", extensions: str | None = None) -> bytes:
    head = (f"GET {path} HTTP/1.1\r\nHost: t.invalid\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n")
    if extensions is not None:
        head += f"Sec-WebSocket-Extensions: {extensions}\r\n"
    return (head + "\r\n").encode()


def _server(offer: str) -> ServerProtocol:
    """An accepted websockets server connection with the shared factories, for a client offering ``offer``."""
    server = ServerProtocol(extensions=shared_factories(), max_size=None)
    server.receive_data(_upgrade(extensions=offer))
    request = next(e for e in server.events_received() if isinstance(e, Request))
    server.send_response(server.accept(request))
    server.data_to_send()
    return server


PAYLOADS = [b'{"type":"chat.msg","seq":1,"data":{"text":"' + b"hello " * n + b'"}}' for n in (1, 20, 30, 11000)]


@pytest.mark.parametrize("bits", [9, 10, 12])
def test_a_shared_deflate_frame_is_the_frame_websockets_writes(bits: int) -> None:
    server = _server(f"permessage-deflate; server_max_window_bits={bits}")
    assert frame_kind(server.extensions) == bits
    for payload in PAYLOADS * 2:  # no context: the same bytes the second time
        server.send_text(payload)
        theirs, ours = b"".join(server.data_to_send()), deflate_frame(payload, bits)
        assert ours == theirs or (ours is None and len(theirs) - 2 >= len(payload))


@pytest.mark.parametrize("payload", [b"", b"x", b'{"type":"t","n":7}'])
def test_a_payload_that_does_not_shrink_gets_no_compressed_frame(payload: bytes) -> None:
    assert deflate_frame(payload, WINDOW_BITS) is None


def test_websockets_client_reads_compressed_and_plain_frames_under_deflate() -> None:
    """RSV1 clear means not compressed (RFC 7692 §6): the shared path's plain fallback is legal."""
    client = ClientProtocol(parse_uri("ws://t.invalid/ws"), extensions=[ClientPerMessageDeflateFactory()])
    request = client.connect()
    client.send_request(request)
    server = ServerProtocol(extensions=shared_factories())
    server.receive_data(b"".join(client.data_to_send()))
    (upgrade,) = server.events_received()
    assert isinstance(upgrade, Request)
    server.send_response(server.accept(upgrade))
    client.receive_data(b"".join(server.data_to_send()))
    client.events_received()
    assert client.state is State.OPEN and [e.name for e in client.extensions] == ["permessage-deflate"]
    squeezed = deflate_frame(PAYLOADS[1], WINDOW_BITS)
    assert squeezed is not None and squeezed[0] == 0xC1
    client.receive_data(squeezed + text_frame(b"plain") + squeezed)
    assert [bytes(f.data) for f in client.events_received()] == [PAYLOADS[1], b"plain", PAYLOADS[1]]


def test_shared_deflate_is_probed_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from websockets.extensions import permessage_deflate

    original = permessage_deflate.PerMessageDeflate.encode

    def keeps_state(self: Any, frame: Any) -> Any:  # a websockets that kept its compressor between messages
        out = original(self, frame)
        self.encoder = zlib.compressobj()
        return out

    with monkeypatch.context() as patched:
        patched.setattr(permessage_deflate.PerMessageDeflate, "encode", keeps_state)
        with pytest.raises(compat.CompatError, match="shared_deflate"):
            compat.check(allow_fallback=False)
        report = compat.check(allow_fallback=True)
        assert set(report.missing) == {"shared_deflate"}
        from gateway.server import protocol_classes

        _, ws = protocol_classes(Settings(), report)
        assert ws.shared_deflate is False and ws.deflate_frames is False and ws.shared_frames is True
    compat.check(allow_fallback=False)


def _handshake(port: int, offer: str | None) -> tuple[socket.socket, dict[str, str], bytes]:
    """A raw upgrade of /ws?conv_id=raw offering ``offer``: the socket, the response headers (lower-case
    names) and what came after them."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(_upgrade("/ws?conv_id=raw", offer))
    data = b""
    deadline = time.monotonic() + 10
    while b"\r\n\r\n" not in data:
        if time.monotonic() > deadline:
            raise TimeoutError(data)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(data)
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 101"), lines[0]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return sock, headers, rest


def _read_messages(sock: socket.socket, buffer: bytes, count: int, bits: int | None) -> list[tuple[bool, bytes]]:
    """``count`` text messages of unmasked server frames: (compressed, payload); decompressed with a fresh
    decompressor of ``bits`` each (no context takeover)."""
    out: list[tuple[bool, bytes]] = []
    deadline = time.monotonic() + 10
    while len(out) < count:
        if len(buffer) >= 2:
            first, length = buffer[0], buffer[1] & 0x7F
            offset = 2 if length < 126 else 4 if length == 126 else 10
            if len(buffer) >= offset:
                if length >= 126:
                    length = int.from_bytes(buffer[2:offset], "big")
                if len(buffer) >= offset + length:
                    data, buffer = buffer[offset:offset + length], buffer[offset + length:]
                    assert first & 0x0F == Opcode.TEXT.value and first & 0x80, hex(first)
                    squeezed = bool(first & 0x40)
                    if squeezed:
                        assert bits is not None, "a compressed frame without permessage-deflate"
                        data = zlib.decompressobj(wbits=-bits).decompress(data + b"\x00\x00\xff\xff")
                    out.append((squeezed, data))
                    continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(out)} of {count} messages")
        buffer += sock.recv(65536)
    return out


def shared_kind(conn: Connection) -> int:
    """0: takes plain shared frames; N: compressed ones of window N; -1: none (frames its own)."""
    if conn._frame_write is not None:
        assert conn._frame_kind == 0 and conn._deflate_write is None
        return 0
    return conn._frame_kind if conn._deflate_write is not None else -1


OFFERED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12"


@pytest.mark.parametrize("mode, bare, websockets_offer", [
    ("shared", OFFERED, OFFERED + "; client_max_window_bits=12"),
    ("deflate", "permessage-deflate; server_max_window_bits=12",
     "permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"),
    ("off", None, None),
])
async def test_negotiation_per_mode(mode: str, bare: str | None, websockets_offer: str | None) -> None:
    async with InProcessGateway(Settings(ws_compression=mode)) as gw:
        port = gw.settings.port
        raw, headers, rest = await asyncio.to_thread(_handshake, port, "permessage-deflate")
        assert headers.get("sec-websocket-extensions") == bare
        plain, plain_headers, plain_rest = await asyncio.to_thread(_handshake, port, None)
        assert "sec-websocket-extensions" not in plain_headers
        async with websockets.connect(gw.ws_url("conv_id=raw"), compression="deflate") as ws:
            assert ws.response.headers.get("Sec-WebSocket-Extensions") == websockets_offer
            await async_wait_until(lambda: len(gw.gateway.pool) == 3, timeout=10, message="three sockets")
            conns = list(gw.gateway.pool.connections.values())
            kinds = sorted(shared_kind(c) for c in conns)
            assert kinds == {"shared": [0, 12, 12], "deflate": [-1, -1, 0], "off": [0, 0, 0]}[mode]
            built = gw.gateway.pool.stats.deflated_built
            if mode == "shared":
                hello = await asyncio.to_thread(_read_messages, raw, rest, 1, WINDOW_BITS)
                assert hello[0][0] and b'"ws.hello"' in hello[0][1]  # websockets' own compressed frame
                rest = b""
            await gw.gateway.backend.publish("raw", "chat.msg", {"text": "squeeze me " * 10})
            got = await asyncio.wait_for(ws.recv(), 10)
            while "chat.msg" not in got:
                got = await asyncio.wait_for(ws.recv(), 10)
            (event,) = [o for o in json_lines(got) if o["type"] == "chat.msg"]
            assert event["data"] == {"text": "squeeze me " * 10}
            assert gw.gateway.pool.stats.deflated_built - built == (1 if mode == "shared" else 0)
            if mode == "shared":
                ((squeezed, payload),) = await asyncio.to_thread(_read_messages, raw, rest, 1, WINDOW_BITS)
                assert squeezed and json_lines(payload) == [event]
        (hello_plain, *_) = await asyncio.to_thread(_read_messages, plain, plain_rest, 1, None)
        assert not hello_plain[0]
        raw.close()
        plain.close()


async def test_deflate_mode_shares_frames_with_a_client_that_asks_for_no_server_context_takeover() -> None:
    asks = ClientPerMessageDeflateFactory(server_no_context_takeover=True, client_max_window_bits=True)
    async with InProcessGateway(Settings(ws_compression="deflate")) as gw:
        light = await WsClient.connect(gw.ws_url("conv_id=ask"), compression=None, extensions=[asks])
        heavy = await WsClient.connect(gw.ws_url("conv_id=ask"), compression="deflate")
        for client in (light, heavy):
            await client.expect("ws.subscribed")
        assert "server_no_context_takeover" in light.ws.response.headers["Sec-WebSocket-Extensions"]
        kinds = sorted(shared_kind(c) for c in gw.gateway.pool.connections.values())
        assert kinds == [-1, WINDOW_BITS]
        built = gw.gateway.pool.stats.deflated_built
        for i in range(3):
            await gw.gateway.backend.publish("ask", "chat.msg", {"i": i, "text": "again " * 30})
            await async_wait_until(lambda i=i: gw.gateway.pool.stats.deflated_built - built > i, timeout=10,
                                   message=f"event {i} compressed once for the shared path")
        for client in (light, heavy):
            assert [e["data"]["i"] for e in await client.events(3)] == [0, 1, 2]
            await client.close()


async def _events(client: WsClient, count: int) -> list[dict[str, Any]]:
    return await client.events(count, timeout=20)


def _noise(rng: random.Random, size: int) -> str:
    return base64.b64encode(rng.randbytes(size)).decode()


async def test_compressed_and_plain_sockets_get_every_event_in_order() -> None:
    """Lone events (the shared path), bursts (queues of several: websockets' own framing), events that do
    not shrink (the plain frame), large ones; sockets of two server windows and plain ones."""
    rng = random.Random(20)
    async with InProcessGateway(Settings(ws_compression="shared", max_queue_bytes=64 * 1024 * 1024)) as gw:
        conv = "mix"
        window10 = ClientPerMessageDeflateFactory(server_max_window_bits=10, client_max_window_bits=True)
        clients = [await WsClient.connect(gw.ws_url(f"conv_id={conv}"), compression="deflate") for _ in range(4)]
        clients += [await WsClient.connect(gw.ws_url(f"conv_id={conv}"), compression=None) for _ in range(3)]
        clients.append(await WsClient.connect(gw.ws_url(f"conv_id={conv}"), compression=None, extensions=[window10]))
        for client in clients:
            await client.expect("ws.subscribed")
        pool = gw.gateway.pool
        await async_wait_until(lambda: sum(gw.gateway.hub.presence_counts(conv).values()), timeout=15,
                               message="8 subscribers", until=lambda n: n >= 8)
        kinds = sorted(shared_kind(c) for c in pool.connections.values())
        assert kinds == [0, 0, 0, 10, 12, 12, 12, 12]
        stats = pool.stats
        built, written = stats.deflated_built, stats.deflated_written
        expected: list[Any] = []

        def settled() -> bool:  # nothing queued or pending anywhere: the next event is alone in every queue
            return all(c.queued_bytes == 0 and not c._sending and not protocol_of(c).paused
                       and not protocol_of(c).conn.writes for c in pool.connections.values())

        async def lone(data: dict[str, Any]) -> None:
            await async_wait_until(settled, timeout=10, message="every socket settled")
            before = stats.frames_written
            await gw.gateway.backend.publish(conv, "chat.msg", data)
            expected.append(data)
            await async_wait_until(lambda: stats.frames_written >= before + 8, timeout=10,
                                   message="a lone event written to every socket")

        for round_ in range(6):
            for i in range(5):
                await lone({"r": round_, "i": i, "text": "word " * rng.randrange(1, 60)})
            await lone({"r": round_, "noise": _noise(rng, 30)})  # short, random: may well not shrink
            burst = [{"r": round_, "b": j, "text": "burst " * j} for j in range(15)]
            sent = stats.objects_written
            await gw.gateway.backend.publish_many([PublishRequest(conv, "chat.burst", d) for d in burst])
            expected += burst
            await async_wait_until(lambda sent=sent: stats.objects_written >= sent + 8 * 15, timeout=10,
                                   message="the burst written to every socket")
            await lone({"r": round_, "big": _noise(rng, 48 * 1024), "pad": "z" * 70000})
        singles = 6 * 7  # lone events: compressed once per window (2 windows), written to 5 sockets each
        assert stats.deflated_built - built == 2 * singles
        assert stats.deflated_written - written == 5 * singles
        for client in clients:
            got = await _events(client, len(expected))
            assert [e["data"] for e in got] == expected
            assert [e["seq"] for e in got] == list(range(1, len(expected) + 1))
        for client in clients:
            await client.close()


async def test_a_payload_that_does_not_shrink_goes_plain_to_compressed_sockets() -> None:
    async with InProcessGateway(Settings(ws_compression="shared")) as gw:
        squeezing = await WsClient.connect(gw.ws_url("conv_id=p"), compression="deflate")
        plain = await WsClient.connect(gw.ws_url("conv_id=p"), compression=None)
        for client in (squeezing, plain):
            await client.expect("ws.subscribed")
        conns = list(gw.gateway.pool.connections.values())
        (deflating,) = [c for c in conns if c._frame_kind == WINDOW_BITS]
        writes = record_writes(deflating)
        built = gw.gateway.pool.stats.deflated_built
        payloads = [b'{"type":"t","n":7}', b'{"type":"t","s":"' + b"compress me " * 20 + b'"}']
        for payload in payloads:  # the same bytes object to every socket, as the hub queues it
            for conn in conns:
                conn.send(payload)
            await async_wait_until(lambda: all(c.queued_bytes == 0 for c in conns), timeout=10, message="flushed")
        assert gw.gateway.pool.stats.deflated_built - built == 2
        assert [frame[0] for frame in writes] == [0x81, 0xC1]
        assert writes[0] == text_frame(payloads[0])
        for client in (squeezing, plain):
            got = await client.until(lambda got: len(got) >= 2, keep=lambda o: o["type"] == "t")
            assert [o.get("n", o.get("s")) for o in got] == [7, "compress me " * 20]
            await client.close()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.timeout(180)
async def test_an_idle_socket_with_deflate_negotiated_keeps_no_zlib_state() -> None:
    """RSS per idle socket of a gateway process, every socket with permessage-deflate negotiated: under
    20 KiB (context takeover: ~47 KiB, BENCHMARKS.md; without deflate ~11.5)."""
    count = 400
    with GatewayProcess("--ws-compression", "shared", "--ping-interval", "0") as gw:
        assert gw.process.proc is not None
        pid = gw.process.proc.pid
        warm = [await websockets.connect(gw.ws_url("conv_id=warm"), compression="deflate") for _ in range(20)]
        for ws in warm:
            await asyncio.wait_for(ws.recv(), 10)
        before = _rss(pid)
        sockets: list[Any] = []
        for start in range(0, count, 50):
            batch = await asyncio.gather(*(websockets.connect(gw.ws_url(f"conv_id=idle{i % 40}"),
                                                              compression="deflate", max_queue=4)
                                           for i in range(start, start + 50)))
            sockets += batch
        for ws in sockets:
            assert ws.response.headers.get("Sec-WebSocket-Extensions", "").startswith("permessage-deflate;")
            await asyncio.wait_for(ws.recv(), 10)  # hello and subscribed: the app holds the socket
        per_socket = (_rss(pid) - before) / count
        for ws in (*warm, *sockets):
            await ws.close()
    assert per_socket < 20 * 1024, f"{per_socket / 1024:.1f} KiB per idle socket with deflate negotiated"
