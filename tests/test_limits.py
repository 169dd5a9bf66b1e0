"""Every limit gives a clear answer to the client that hits it, while other clients keep receiving.

Real uvicorn servers on free ports; websocket clients are ``websockets`` clients or,
where a client must misbehave below the websocket layer, raw sockets.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import uvicorn
import websockets

from broadcaster.errors import PayloadTooLarge
from gateway.handshake import MAX_REQUEST_HEAD_BYTES, http_protocol
from gateway.server import DirectSendProtocol
from gateway.settings import Settings
from producers import AsyncProducer
from tests.support.gateway import InProcessGateway, free_port
from tests.support.polling import async_wait_until
from tests.support.wsclient import StalledClient, WsClient

pytestmark = pytest.mark.timeout(60)


async def watcher(gw: InProcessGateway, conv: str = "calm") -> WsClient:
    """A well-behaved client subscribed to ``conv``."""
    client = await WsClient.connect(gw.ws_url(f"conv_id={conv}"))
    await client.expect("ws.subscribed")
    return client


async def still_receives(gw: InProcessGateway, client: WsClient, conv: str = "calm") -> None:
    """``client`` (subscribed to ``conv``) gets an event published now, after the earlier ones."""
    result = await gw.gateway.backend.publish(conv, "chat.alive", {"t": time.monotonic()})
    got = await client.until(lambda objs: any(o["seq"] == result.seq for o in objs),
                             keep=lambda o: o["type"] == "chat.alive" and o["conv_id"] == conv)
    assert [o["seq"] for o in got] == sorted(o["seq"] for o in got)


async def wait_for(condition: Callable[[], bool], timeout: float = 15.0, message: str = "condition") -> None:
    await async_wait_until(condition, timeout=timeout, message=message)


# ---- websocket messages ------------------------------------------------------------------------


async def test_client_message_size_1009_single_and_fragmented() -> None:
    async with InProcessGateway(Settings(max_client_message_bytes=1024)) as gw:
        calm = await watcher(gw)
        at_limit = await watcher(gw)
        await at_limit.ws.send("x" * 1024)  # exactly the limit: parsed (and refused as JSON), connection kept
        assert (await at_limit.expect("ws.error"))["code"] == "bad_json"
        await still_receives(gw, at_limit)

        single = await watcher(gw)
        await single.ws.send("x" * 1025)
        assert await single.close_code() == 1009
        fragmented = await watcher(gw)
        await fragmented.ws.send(["y" * 600, "y" * 600])  # each frame small, the message too big
        assert await fragmented.close_code() == 1009
        binary = await watcher(gw)
        await binary.ws.send(b"\x00" * 5000)
        assert await binary.close_code() == 1009

        await still_receives(gw, calm)
        await wait_for(lambda: len(gw.gateway.pool) == 2, message="closed sockets leaving the pool")


async def test_subscriptions_per_connection_limit() -> None:
    async with InProcessGateway(Settings(max_subscriptions=3)) as gw:
        calm = await watcher(gw)
        greedy = await WsClient.connect(gw.ws_url("conv_id=g0"))
        await greedy.expect("ws.subscribed")
        for conv in ("g1", "g2", "g2"):  # re-subscribing to a conversation held does not count twice
            await greedy.send_json({"type": "ws.subscribe", "conv_id": conv})
            assert (await greedy.expect("ws.subscribed"))["conv_id"] == conv
        await greedy.send_json({"type": "ws.subscribe", "conv_id": "g3"})
        error = await greedy.expect("ws.error")  # #16: that subscription is refused, the socket stays
        assert (error["code"], error["conv_id"]) == ("too_many_subscriptions", "g3")
        await greedy.close()
        await still_receives(gw, calm)
        await wait_for(lambda: set(gw.gateway.hub.conversations()) == {"calm"}, message="greedy's feeds released")


async def test_client_message_rate_4429() -> None:
    async with InProcessGateway(Settings(client_messages_per_second=10)) as gw:
        calm = await watcher(gw)
        polite = await WsClient.connect(gw.ws_url())
        await polite.expect("ws.hello")
        for _ in range(30):  # within the burst of 4 x 10
            await polite.send_json({"type": "ws.ping"})
        pongs = await polite.until(lambda got: len(got) == 30, keep=lambda o: o["type"] == "ws.pong")
        assert len(pongs) == 30

        chatty = await WsClient.connect(gw.ws_url())
        await chatty.expect("ws.hello")
        for _ in range(100):
            try:
                await chatty.ws.send("ping")
            except websockets.ConnectionClosed:
                break
        pongs = 0
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                pongs += (await chatty.next())["type"] == "ws.pong"
        assert chatty.ws.protocol.close_rcvd is not None and chatty.ws.protocol.close_rcvd.code == 4429
        assert pongs <= 40, "more messages answered than the burst allows"
        await still_receives(gw, calm)
        await polite.send_json({"type": "ws.ping"})  # the polite client is not punished for the chatty one
        assert (await polite.expect("ws.pong"))["type"] == "ws.pong"


# ---- connections and events --------------------------------------------------------------------


async def test_connections_per_gateway_503_before_the_upgrade() -> None:
    async with InProcessGateway(Settings(max_connections=3)) as gw:
        clients = [await watcher(gw) for _ in range(3)]
        for _ in range(2):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await WsClient.connect(gw.ws_url("conv_id=calm"))
            assert refused.value.response.status_code == 503
            assert b"too many connections" in refused.value.response.body
        for client in clients:
            await still_receives(gw, client)
        async with httpx.AsyncClient(base_url=gw.http_url) as http:  # HTTP is not counted
            assert (await http.get("/healthz")).status_code == 200
        await clients[0].close()
        await wait_for(lambda: len(gw.gateway.pool) == 2, message="a slot freed")
        replacement = await watcher(gw)
        await still_receives(gw, replacement)


async def test_event_size_413_over_http_and_payload_too_large_in_process() -> None:
    async with InProcessGateway(Settings(max_event_bytes=2000)) as gw:
        calm = await watcher(gw)
        url = "/v1/conversations/calm/events"
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            ok = await http.post(url, json={"type": "chat.fits", "data": "x" * 1900})
            assert ok.status_code == 200
            too_big = await http.post(url, json={"type": "chat.big", "data": "x" * 2100})
            assert too_big.status_code == 413 and too_big.json()["error"] == "too_large"
            assert too_big.json()["field"] == "data"

            async def chunked() -> object:  # no Content-Length: refused while streaming, not after buffering
                for _ in range(200):
                    yield b"x" * 65536

            streamed = await http.post(url, content=chunked(),  # type: ignore[arg-type]
                                       headers={"content-type": "application/json"})
            assert streamed.status_code == 413
        with pytest.raises(PayloadTooLarge):
            await gw.gateway.backend.publish("calm", "chat.big", "x" * 2100)
        async with AsyncProducer.from_url(gw.http_url) as sdk:  # the SDK maps the gateway's 413
            with pytest.raises(PayloadTooLarge):
                await sdk.publish("calm", "chat.big", "x" * 2100)
        got = await calm.events(1)
        assert got[0]["type"] == "chat.fits"  # the refused events fanned out nothing
        await still_receives(gw, calm)


# ---- below the websocket: handshakes and pings -------------------------------------------------


def _raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _read_until_eof(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and the seconds that took. TimeoutError if it never does."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, time.monotonic() - started
            data += chunk
    finally:
        sock.close()


def _silent(port: int, timeout: float) -> float:
    return _read_until_eof(_raw(port), timeout)[1]


def _trickle(port: int, timeout: float) -> float:
    """Slowloris: a request head one byte every 0.1 s, never finished."""
    sock = _raw(port)
    started = time.monotonic()
    head = b"GET /ws?conv_id=calm HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" * 5
    try:
        for byte in head:
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
            if time.monotonic() - started > timeout:
                raise TimeoutError("the server let the trickle go on")
    except (BrokenPipeError, ConnectionResetError):
        pass
    _read_until_eof(sock, timeout)
    return time.monotonic() - started


def _slow_body(port: int, timeout: float) -> tuple[bytes, float]:
    sock = _raw(port)
    sock.sendall(b"POST /v1/conversations/calm/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"type\":")
    return _read_until_eof(sock, timeout)


def _request(port: int, data: bytes) -> bytes:
    sock = _raw(port)
    sock.sendall(data)
    return _read_until_eof(sock, 10)[0]


def _upgrade_head(path: str, extra: bytes = b"") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n").encode() + extra + b"\r\n"


@pytest.mark.timeout(30)
async def test_handshake_timeout_drops_silent_and_trickling_clients() -> None:
    timeout = 0.6
    async with InProcessGateway(Settings(handshake_timeout=timeout)) as gw:
        port = gw.settings.port
        calm = await watcher(gw)
        silent, trickle, slow_body = await asyncio.gather(
            asyncio.to_thread(_silent, port, 10), asyncio.to_thread(_trickle, port, 10),
            asyncio.to_thread(_slow_body, port, 10))
        assert timeout * 0.8 <= silent <= timeout + 2, silent
        assert timeout * 0.8 <= trickle <= timeout + 2, trickle
        assert slow_body[0] == b"" and timeout * 0.8 <= slow_body[1] <= timeout + 2, slow_body
        # An established websocket outlives the deadline many times over, and keeps receiving. The
        # server's own clock says when a deadline has passed: a silent socket opened now is dropped
        # by it (two in a row: two more deadlines), so no wait here depends on the box's speed.
        for _ in range(2):
            await asyncio.to_thread(_silent, port, 10)
        await still_receives(gw, calm)
        # so does a keep-alive HTTP connection between requests (uvicorn's keep-alive timer applies there)
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            assert (await http.get("/healthz")).status_code == 200
            await asyncio.to_thread(_silent, port, 10)  # a deadline passes between the two requests
            assert (await http.get("/healthz")).status_code == 200
        late = await watcher(gw)
        await still_receives(gw, late)


class _TrackedHttp(http_protocol(0.6)):  # type: ignore[misc, valid-type]
    """The gateway's HTTP protocol, with every instance remembered weakly."""

    instances: weakref.WeakSet[Any] = weakref.WeakSet()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.instances.add(self)


async def _accept_unless_stall(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app: websockets on /stall are never answered, others are accepted and held."""
    assert scope["type"] == "websocket"
    await receive()
    if scope["path"] != "/stall":
        await send({"type": "websocket.accept"})
    while (await receive())["type"] != "websocket.disconnect":
        pass


@pytest.mark.timeout(30)
async def test_the_handshake_deadline_covers_the_app_and_frees_the_http_protocol() -> None:
    """A socket whose app never answers the handshake is closed at the deadline; an accepted one
    outlives it, and its HTTP protocol (parser, request head) is freed at the upgrade, not later."""
    port = free_port()
    config = uvicorn.Config(_accept_unless_stall, host="127.0.0.1", port=port, loop="none", lifespan="off",
                            http=_TrackedHttp, ws=DirectSendProtocol, log_config=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and not task.done(), "server did not start"
            await asyncio.sleep(0.01)
        accepted = await asyncio.to_thread(_raw, port)
        await asyncio.to_thread(accepted.sendall, _upgrade_head("/ok"))
        accepted.settimeout(5)
        assert (await asyncio.to_thread(accepted.recv, 65536)).startswith(b"HTTP/1.1 101 ")
        gc.collect()
        assert len(_TrackedHttp.instances) == 0  # well before the 0.6 s deadline
        stalled = await asyncio.to_thread(_raw, port)
        await asyncio.to_thread(stalled.sendall, _upgrade_head("/stall"))
        data, seconds = await asyncio.to_thread(_read_until_eof, stalled, 10)
        assert data == b"" and 0.6 * 0.8 <= seconds <= 0.6 + 2, (data, seconds)
        accepted.settimeout(0.5)  # the accepted socket is still open well after the deadline
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(accepted.recv, 65536)
        accepted.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_oversized_request_heads_get_414_or_431() -> None:
    async with InProcessGateway() as gw:
        port = gw.settings.port
        calm = await watcher(gw)
        long_url = await asyncio.to_thread(_request, port, _upgrade_head("/ws?conv_id=calm&x=" + "a" * 9000))
        assert long_url.startswith(b"HTTP/1.1 414 "), long_url[:80]
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        many_headers = await asyncio.to_thread(_request, port, _upgrade_head("/ws?conv_id=calm", many))
        assert many_headers.startswith(b"HTTP/1.1 431 "), many_headers[:80]
        huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_REQUEST_HEAD_BYTES + 10) + b"\r\n\r\n"
        huge_head = await asyncio.to_thread(_request, port, huge)
        assert huge_head.startswith(b"HTTP/1.1 431 "), huge_head[:80]
        endless = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * (MAX_REQUEST_HEAD_BYTES + 5000)
        endless_head = await asyncio.to_thread(_request, port, endless)  # never finished: the raw count stops it
        assert endless_head.startswith(b"HTTP/1.1 431 "), endless_head[:80]
        async with httpx.AsyncClient(base_url=gw.http_url) as http:  # big but legitimate requests pass
            fits = await http.get("/healthz", headers={"X-Big": "a" * (MAX_REQUEST_HEAD_BYTES - 1000)})
            assert fits.status_code == 200
            big_body = await http.post("/v1/conversations/calm/events",
                                       json={"type": "chat.big", "data": "x" * 900_000})
            assert big_body.status_code == 200
        await still_receives(gw, calm)


@pytest.mark.timeout(30)
async def test_peer_that_never_answers_pings_is_closed_1011() -> None:
    interval = 0.3
    async with InProcessGateway(Settings(ping_interval=interval)) as gw:
        calm = await watcher(gw)  # websockets answers pings by itself
        dead = StalledClient(gw.ws_url("conv_id=calm"), gw.settings.port)  # reads, never writes a pong
        await asyncio.to_thread(dead.handshake)
        await wait_for(lambda: len(gw.gateway.pool) == 2, message="both connected")
        started = time.monotonic()
        code = await asyncio.to_thread(dead.read_until_closed, 10)
        assert code == 1011
        assert time.monotonic() - started <= 2 * interval + 2
        await wait_for(lambda: len(gw.gateway.pool) == 1, message="the dead peer leaving the pool")
        # Several ping rounds later the live client is still there. Ping rounds are counted, not
        # slept through: two more peers that never answer are closed, one after the other, each
        # after a ping round of its own.
        for _ in range(2):
            witness = StalledClient(gw.ws_url("conv_id=calm"), gw.settings.port)
            await asyncio.to_thread(witness.handshake)
            assert await asyncio.to_thread(witness.read_until_closed, 10) == 1011
        await wait_for(lambda: len(gw.gateway.pool) == 1, message="the witnesses leaving the pool")
        await still_receives(gw, calm)
        assert len(gw.gateway.pool) == 1
