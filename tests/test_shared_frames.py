"""Shared frames: one websocket frame built per (event, profile), written as it is to every uncompressed
socket whose queue holds just that event (gateway.connection's pool flush, gateway.server's write_frame).

Real gateways on free ports and real clients; the white-box checks read the live connections and
count what the pool framed and wrote, so each test fails if the shared path is not taken (or is
taken where it must not be).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import websockets
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from broadcaster.envelope import PublishRequest
from gateway import compat, connection
from gateway.connection import Connection, text_frame
from gateway.server import DirectSendProtocol, protocol_classes
from gateway.settings import Settings
from tests.support.gateway import InProcessGateway, json_lines
from tests.support.polling import async_wait_until
from tests.support.wsclient import StalledClient, WsClient

pytestmark = pytest.mark.timeout(60)

_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: t.invalid\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class FrameCounter:
    """Wraps ``gateway.connection.text_frame`` to count the frames the pool builds."""

    def __init__(self) -> None:
        self.built = 0

    def __call__(self, payload: bytes) -> bytes:
        self.built += 1
        return text_frame(payload)


@pytest.fixture
def frames_built(monkeypatch: pytest.MonkeyPatch) -> Iterator[FrameCounter]:
    counter = FrameCounter()
    monkeypatch.setattr(connection, "text_frame", counter)
    yield counter


def record_writes(conn: Connection) -> list[bytes]:
    """Every frame the pool hands to ``conn``'s shared-frame write, plain or compressed (and that it took)."""
    written: list[bytes] = []
    name = "_frame_write" if conn._frame_write is not None else "_deflate_write"  # plain, or compressed frames
    original = getattr(conn, name)
    assert original is not None, "this connection was not offered the shared-frame write"

    def write(frame: bytes) -> bool:
        ok = original(frame)
        if ok:
            written.append(frame)
        return ok

    setattr(conn, name, write)
    return written


async def publish_each(gw: InProcessGateway, conv: str, items: range, written: list[bytes]) -> None:
    """Publish ``{"i": i}`` for each item, one at a time: each waits until ``written`` has one more frame
    (so every event is alone in its socket queues when the pool flushes)."""
    for i in items:
        before = len(written)
        await gw.gateway.backend.publish(conv, "chat.msg", {"i": i})
        await async_wait_until(lambda before=before: len(written) > before, timeout=10,
                               message=f"event {i} written as a shared frame")


def protocol_of(conn: Connection) -> DirectSendProtocol:
    direct: Any = conn._direct
    assert direct is not None
    proto = direct.__self__
    assert isinstance(proto, DirectSendProtocol)
    return proto


async def subscribed(gw: InProcessGateway, conv: str, count: int) -> None:
    await async_wait_until(lambda: sum(gw.gateway.hub.presence_counts(conv).values()), timeout=15,
                           message=f"{count} subscribers of {conv}", until=lambda n: n >= count)


def server_frame(payload: bytes) -> bytes:
    """The frame websockets itself writes for ``payload`` on an accepted, uncompressed server connection."""
    server = ServerProtocol(max_size=None)
    server.receive_data(_UPGRADE)
    request = next(e for e in server.events_received() if isinstance(e, Request))
    server.send_response(server.accept(request))
    server.data_to_send()
    server.send_text(payload)
    return b"".join(server.data_to_send())


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_is_the_frame_websockets_writes(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert text_frame(payload) == server_frame(payload)


async def test_many_sockets_of_one_profile_get_one_shared_frame_per_event(frames_built: FrameCounter) -> None:
    clients_count, events = 25, 40
    async with InProcessGateway() as gw:
        clients = [await WsClient.connect(gw.ws_url("conv_id=shared"), compression=None)
                   for _ in range(clients_count)]
        for client in clients:
            await client.expect("ws.subscribed")
        await subscribed(gw, "shared", clients_count)
        conns = list(gw.gateway.pool.connections.values())
        writes = [record_writes(conn) for conn in conns]
        frames_before = gw.gateway.pool.stats.frames_written
        built_before = frames_built.built
        waits_before = sum(gw.gateway.metrics.queue_wait._counts)
        for i in range(events):  # one at a time: each pass queues a lone event per socket
            await gw.gateway.backend.publish("shared", "chat.msg", {"i": i, "text": "y" * (i * 5)})
            await async_wait_until(lambda i=i: all(len(w) > i for w in writes), timeout=10,
                                   message=f"event {i} written to every socket")
        for client in clients:
            got = await client.events(events, timeout=10)
            assert [e["seq"] for e in got] == list(range(1, events + 1))
            assert [e["data"]["i"] for e in got] == list(range(events))
        assert frames_built.built - built_before == events, "not one frame per event for the whole group"
        for index in range(events):
            first = writes[0][index]
            assert all(w[index] is first for w in writes), f"event {index}: not the same frame object"
            assert first == server_frame(json_payload(first))
        assert gw.gateway.pool.stats.frames_written - frames_before == events * clients_count
        # one queue-wait observation per frame, though the pass observes them in one call
        assert sum(gw.gateway.metrics.queue_wait._counts) - waits_before == events * clients_count
        for client in clients:
            await client.close()


def json_payload(frame: bytes) -> bytes:
    """The payload of an unmasked server text frame."""
    assert frame[0] == 0x81 and not frame[1] & 0x80
    length = frame[1]
    offset = 2 if length < 126 else 4 if length == 126 else 10
    return frame[offset:]


async def test_a_paused_socket_falls_back_to_its_own_path_in_order(frames_built: FrameCounter) -> None:
    async with InProcessGateway() as gw:
        fast = await WsClient.connect(gw.ws_url("conv_id=pause"), compression=None)
        await fast.expect("ws.subscribed")
        (fast_conn,) = gw.gateway.pool.connections.values()
        held = await WsClient.connect(gw.ws_url("conv_id=pause"), compression=None)
        await held.expect("ws.subscribed")
        await subscribed(gw, "pause", 2)
        (held_conn,) = (c for c in gw.gateway.pool.connections.values() if c is not fast_conn)
        fast_id = fast_conn.connection_id
        writes = {fast_id: record_writes(fast_conn), held_conn.connection_id: record_writes(held_conn)}
        proto = protocol_of(held_conn)
        await publish_each(gw, "pause", range(5), writes[fast_id])
        assert len(writes[held_conn.connection_id]) == 5
        proto.pause_writing()  # what the transport does when its buffer is full
        try:
            await publish_each(gw, "pause", range(5, 25), writes[fast_id])
            assert len(writes[held_conn.connection_id]) == 5, "a paused socket was written the shared frame"
            assert held_conn.queued_bytes > 0 or held_conn._sending, "the paused socket's events went nowhere"
        finally:
            proto.resume_writing()
        await publish_each(gw, "pause", range(25, 30), writes[fast_id])  # shared again, behind the writer's
        for client in (fast, held):
            got = await client.events(30, timeout=10)
            assert [e["data"]["i"] for e in got] == list(range(30))
            assert [e["seq"] for e in got] == list(range(1, 31))
        await async_wait_until(lambda: len(writes[held_conn.connection_id]) > 5, timeout=10,
                               message="the resumed socket back on shared frames")
        await fast.close()
        await held.close()


async def test_a_slow_reader_is_served_in_order_while_the_others_share_frames() -> None:
    size, most = 4000, 2000  # up to 8 MB: beyond a 4 KiB receive buffer, the kernel's and the transport's
    async with InProcessGateway(Settings(max_queue_bytes=32 * 1024 * 1024)) as gw:
        fast = await WsClient.connect(gw.ws_url("conv_id=late"), compression=None)
        await fast.expect("ws.subscribed")
        (fast_conn,) = gw.gateway.pool.connections.values()
        slow = StalledClient(gw.ws_url("conv_id=late"), gw.settings.port)
        await asyncio.to_thread(slow.handshake)
        await subscribed(gw, "late", 2)
        (slow_conn,) = (c for c in gw.gateway.pool.connections.values() if c is not fast_conn)
        fast_writes, slow_writes = record_writes(fast_conn), record_writes(slow_conn)
        slow_proto = protocol_of(slow_conn)
        got: list[dict[str, Any]] = []

        async def read_fast(count: int) -> None:
            while len(got) < count:
                got.extend(await fast.events(1, timeout=30))

        sent = 0
        while not slow_proto.paused and sent < most:  # until the slow socket's transport pushes back
            await gw.gateway.backend.publish_many(
                [PublishRequest("late", "chat.big", {"i": i, "blob": "z" * size}) for i in range(sent, sent + 10)])
            sent += 10
            await read_fast(sent)
        assert slow_proto.paused, f"the slow socket's transport never paused after {sent} events"
        assert not protocol_of(fast_conn).paused
        slow_taken = len(slow_writes)
        reader = asyncio.create_task(read_fast(sent + 20))
        await publish_each(gw, "late", range(sent, sent + 20), fast_writes)  # the fast one: shared frames
        await reader
        total = sent + 20
        assert [e["data"]["i"] for e in got] == list(range(total))
        assert len(slow_writes) == slow_taken, "the paused socket was written a shared frame"
        assert slow_conn.queued_bytes > 0 or slow_conn._sending
        events = await asyncio.to_thread(read_events, slow, total)
        assert [e["data"]["i"] for e in events] == list(range(total))
        assert [e["seq"] for e in events] == list(range(1, total + 1))
        assert gw.gateway.pool.stats.slow_consumer_closes == 0
        await fast.close()


def read_events(client: StalledClient, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Resume reading ``client``'s socket until ``count`` event objects arrived (control objects skipped)."""
    import time

    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    client.sock.settimeout(timeout)
    while len(events) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(events)} of {count} events")
        chunk = client.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed after {len(events)} events")
        client.protocol.receive_data(chunk)
        for frame in client.protocol.events_received():
            if getattr(frame, "opcode", None) is Opcode.TEXT:
                events += [o for o in json_lines(bytes(frame.data)) if not o["type"].startswith("ws.")]
    client.sock.close()
    return events


async def test_a_compressed_socket_gets_its_own_frames(frames_built: FrameCounter) -> None:
    async with InProcessGateway(Settings(ws_compression="deflate")) as gw:
        plain = await WsClient.connect(gw.ws_url("conv_id=mixed"), compression=None)
        await plain.expect("ws.subscribed")
        async with websockets.connect(gw.ws_url("conv_id=mixed"), compression="deflate", max_size=None) as deflated:
            assert [ext.name for ext in deflated.protocol.extensions] == ["permessage-deflate"]
            await subscribed(gw, "mixed", 2)
            conns = list(gw.gateway.pool.connections.values())
            with_frames = [c for c in conns if c._frame_write is not None]
            assert len(with_frames) == 1 and all(c._direct is not None for c in conns)
            writes = record_writes(with_frames[0])
            built = frames_built.built
            await publish_each(gw, "mixed", range(10), writes)
            assert frames_built.built - built == 10  # the plain socket's; the compressed one frames its own
            got = await plain.events(10)
            assert [e["data"]["i"] for e in got] == list(range(10))
            received: list[dict[str, Any]] = []
            while len(received) < 10:
                frame = await asyncio.wait_for(deflated.recv(), 10)
                received += [o for o in json_lines(frame) if not o["type"].startswith("ws.")]
            assert received == got  # the same objects, through websockets' own (compressed) framing
            assert len(writes) == 10
        await plain.close()


async def test_the_compat_fallback_turns_shared_frames_off(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patched:
        # websockets framing text differently from text_frame: the start-up check must notice
        patched.setattr(connection, "text_frame", lambda payload: b"\x01" + payload)
        with pytest.raises(compat.CompatError, match=r"shared_frames"):
            compat.check(allow_fallback=False)
        report = compat.check(allow_fallback=True)
        assert set(report.missing) == {"shared_frames"}
        _, ws = protocol_classes(Settings(), report)
        assert ws.shared_frames is False and ws.direct_send is True
        gw = InProcessGateway(Settings(compat=True))  # its config runs the check with the patch in place
    async with gw:
        client = await WsClient.connect(gw.ws_url("conv_id=fallback"), compression=None)
        await client.expect("ws.subscribed")
        await subscribed(gw, "fallback", 1)
        (conn,) = gw.gateway.pool.connections.values()
        assert conn._frame_write is None and conn._direct is not None  # the direct send still, framed per socket
        for i in range(5):
            await gw.gateway.backend.publish("fallback", "chat.msg", {"i": i})
        assert [e["data"]["i"] for e in await client.events(5)] == list(range(5))
        await client.close()
    compat.check(allow_fallback=False)  # leave the process's report as the other tests expect it


def test_payload_helper_reads_long_frames() -> None:
    payload = orjson.dumps({"x": "y" * 70000})
    assert json_payload(text_frame(payload)) == payload


def test_waits_of_a_pass_are_observed_once_per_histogram_and_one_by_one_otherwise() -> None:
    from prometheus_client import CollectorRegistry

    from gateway.connection import _observe
    from gateway.metrics import LATENCY_BUCKETS, LoopHistogram

    histogram = LoopHistogram("t_wait", "t", LATENCY_BUCKETS, CollectorRegistry())
    _observe(histogram.observe, 0.002, 7)
    assert sum(histogram._counts) == 7 and histogram._sum == pytest.approx(0.014)
    seen: list[float] = []
    _observe(seen.append, 0.5, 3)  # anything else: called once per frame
    _observe(None, 0.5, 3)
    assert seen == [0.5, 0.5, 0.5]
