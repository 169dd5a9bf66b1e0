"""Revocation end to end (#16 point 4): POST /v1/disconnect closes sockets on every gateway; ``until`` refuses.

Three ``broadcaster-gateway`` processes share the local Redis (``key_prefix``), with
``--auth-secret`` and ``--publish-key``; clients are real websockets (and an SSE stream
on the in-process, memory-backend gateway).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
import redis
import websockets

from broadcaster.backends.scripts import library_name
from broadcaster.errors import ValidationError
from broadcaster.keys import KeyLayout
from gateway.revocation import Disconnect, Revocations
from gateway.settings import Settings
from producers import AsyncProducer, Producer
from producers.errors import PublishForbidden
from tests.conftest import REDIS_URL
from tests.support.gateway import GatewayProcess, InProcessGateway
from tests.support.polling import async_wait_until
from tests.support.sseclient import SseClient
from tests.support.tcp_proxy import TcpProxy
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(120)

SECRET = "revocation-secret-for-tests-" + "y" * 32
KEY = "publish-key-for-revocation-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}


def token(sub: str, ttl: int = 600) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + ttl, "convs": ["*"], "profiles": ["default"]},
                      SECRET, algorithm="HS256")


def gateway_args(redis_url: str, key_prefix: str) -> list[str]:
    return ["--redis-url", redis_url, "--key-prefix", key_prefix, "--auth-secret", SECRET, "--publish-key", KEY]


@pytest.fixture(scope="module")
def shared_prefix() -> Iterator[str]:
    """A prefix of this module's own, as the ``key_prefix`` fixture makes them: its three gateways serve
    the tests here (fewer processes to start on a busy machine); the function library is deleted after."""
    prefix = "t" + secrets.token_hex(6)
    yield prefix
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.function_delete(library_name(prefix))
        client.delete(KeyLayout(prefix).revoked())
    except redis.RedisError:
        pass
    finally:
        client.close()


@pytest.fixture(scope="module")
def three(shared_prefix: str) -> Iterator[list[GatewayProcess]]:
    gateways = [GatewayProcess(*gateway_args(REDIS_URL, shared_prefix)) for _ in range(3)]
    try:
        for g in gateways:
            g.process.start()
        for g in gateways:
            g.wait_healthy(timeout=60)  # seven other suites share two cores: starting can be slow
        yield gateways
    finally:
        for g in gateways:
            g.stop()


async def connect(url: str, sub: str, conv: str, *more: str) -> WsClient:
    """``sub``'s socket subscribed to ``conv`` (and ``more``), every subscription confirmed."""
    client = await WsClient.connect(url + f"?conv_id={conv}&token={token(sub)}")
    await client.expect("ws.subscribed")
    for other in more:
        await client.send_json({"type": "ws.subscribe", "conv_id": other})
        await client.expect("ws.subscribed")
    return client


async def closed_with(client: WsClient, timeout: float = 5.0) -> tuple[int | None, str | None]:
    """The close code and reason the server sent (reading whatever came before)."""
    try:
        while True:
            await asyncio.wait_for(client.ws.recv(), timeout)
    except websockets.ConnectionClosed:
        rcvd = client.ws.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)


async def post(url: str, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        if isinstance(body, (bytes, str)):
            return await http.post(f"{url}/v1/disconnect", content=body, headers=headers, **kw)
        return await http.post(f"{url}/v1/disconnect", json=body, headers=headers if headers is not None else AUTH)


async def publish(url: str, conv: str, data: Any) -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"{url}/v1/conversations/{conv}/events", json={"type": "chat.msg", "data": data},
                            headers=AUTH)
        assert r.status_code == 200, r.text
        seq: int = r.json()["seq"]
        return seq


async def receives(client: WsClient, seq: int) -> None:
    got = await client.events(1, timeout=10)
    assert got[0]["seq"] == seq, got


async def still_open(clients: list[WsClient], url: str, conv: str) -> None:
    """Every client in ``clients`` (subscribed to ``conv``) gets the next event of ``conv``."""
    seq = await publish(url, conv, {"alive": True})
    for c in clients:
        await receives(c, seq)


async def refused_at_connect(url: str, sub: str) -> tuple[int | None, str | None]:
    """What connecting as ``sub`` (a valid token) gets: 4403 and the refusal, if revoked."""
    client = await WsClient.connect(url + f"?conv_id=any&token={token(sub)}")
    try:
        first = await client.next(timeout=5)
    except websockets.ConnectionClosed:
        rcvd = client.ws.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)
    await client.close()
    return None, first.get("type")


async def test_disconnect_by_sub_closes_on_every_gateway_within_1s(three: list[GatewayProcess]) -> None:
    u1 = [await connect(g.ws_url(), "u1", f"room-{i}") for i, g in enumerate(three)]
    u1_second = await connect(three[2].ws_url(), "u1", "room-0")  # two sockets of u1 on one gateway
    u2 = [await connect(g.ws_url(), "u2", "room-0") for g in three]
    started = time.monotonic()
    r = await post(three[0].http_url, {"sub": "u1"})
    assert r.status_code == 202, r.text
    assert r.json() == {"sent": {"kind": "disconnect", "sub": "u1", "code": 4403, "reason": "revoked"},
                        "until": None}
    closes = await asyncio.gather(*(closed_with(c) for c in [*u1, u1_second]))
    elapsed = time.monotonic() - started
    assert closes == [(4403, "revoked")] * 4
    assert elapsed < 1.0, f"the closes took {elapsed:.3f}s"
    print(f"\ndisconnect by sub: 4 sockets on 3 gateways closed {elapsed * 1000:.0f} ms after the POST")
    await still_open(u2, three[1].http_url, "room-0")
    # No until: u1 may come back at once.
    back = await connect(three[1].ws_url(), "u1", "room-1")
    await still_open([back], three[0].http_url, "room-1")
    for c in [*u2, back]:
        await c.close()


async def test_disconnect_by_conversation_and_by_both(three: list[GatewayProcess]) -> None:
    on_c = [await connect(g.ws_url(), f"a{i}", "c") for i, g in enumerate(three)]
    on_c_and_d = await connect(three[1].ws_url(), "b", "d", "c")  # subscribed to c after d
    on_d = [await connect(g.ws_url(), f"d{i}", "d") for i, g in enumerate(three)]
    started = time.monotonic()
    r = await post(three[2].http_url, {"conv_id": "c", "code": 4000, "reason": "room closed"})
    assert r.status_code == 202, r.text
    assert await asyncio.gather(*(closed_with(c) for c in [*on_c, on_c_and_d])) == [(4000, "room closed")] * 4
    assert time.monotonic() - started < 1.0
    await still_open(on_d, three[0].http_url, "d")

    # Both: u3's sockets on e only; u3 elsewhere and others on e stay.
    u3_on_e = [await connect(g.ws_url(), "u3", "e") for g in three]
    u3_on_f = await connect(three[0].ws_url(), "u3", "f")
    u4_on_e = await connect(three[1].ws_url(), "u4", "e")
    r = await post(three[1].http_url, {"sub": "u3", "conv_id": "e", "code": 1008})
    assert r.status_code == 202, r.text
    assert await asyncio.gather(*(closed_with(c) for c in u3_on_e)) == [(1008, "revoked")] * 3
    await still_open([u4_on_e], three[2].http_url, "e")
    await still_open([u3_on_f], three[2].http_url, "f")
    await still_open(on_d, three[0].http_url, "d")
    for c in [*on_d, u3_on_f, u4_on_e]:
        await c.close()


async def test_until_refuses_on_every_gateway_then_admits(three: list[GatewayProcess], shared_prefix: str) -> None:
    u1 = [await connect(g.ws_url(), "u1", "r") for g in three]
    r = await post(three[0].http_url, {"sub": "u1", "until": 5})
    assert r.status_code == 202, r.text
    until_ms = r.json()["sent"]["until"]
    assert r.json()["until"].endswith("Z") and until_ms > time.time() * 1000
    assert await asyncio.gather(*(closed_with(c) for c in u1)) == [(4403, "revoked")] * 3
    for g in three:  # a still-valid token is refused everywhere
        code, reason = await refused_at_connect(g.ws_url(), "u1")
        assert code == 4403 and reason is not None and reason.startswith("user revoked until "), (code, reason)
    # A long one for u9, given as an ISO time: a gateway started afterwards loads it from Redis.
    later = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    r = await post(three[1].http_url, {"sub": "u9", "until": later})
    assert r.status_code == 202, r.text
    late = GatewayProcess(*gateway_args(REDIS_URL, shared_prefix))
    late.process.start()
    try:
        late.wait_healthy(timeout=60)
        assert (await refused_at_connect(late.ws_url(), "u9"))[0] == 4403
        assert (await refused_at_connect(late.ws_url(), "u2"))[1] == "ws.hello"
        async with httpx.AsyncClient(timeout=10, headers=AUTH) as http:
            listed = (await http.get(f"{three[2].http_url}/v1/revocations")).json()["revocations"]
            assert set(listed) >= {"u9"} and listed["u9"]["until_iso"].endswith("Z")
            lifted = await http.delete(f"{three[2].http_url}/v1/revocations/u9")
            assert lifted.status_code == 200 and lifted.json() == {"sub": "u9", "lifted": True}
            assert (await http.delete(f"{late.http_url}/v1/revocations/u9")).json()["lifted"] is False
        for g in [*three, late]:  # lifted everywhere at once (the lift message), not at the next reload
            await async_wait_until(lambda g=g: refused_at_connect(g.ws_url(), "u9"),
                                   until=lambda got: got == (None, "ws.hello"), timeout=5,
                                   message="u9 admitted after the lift")
        # After until, u1 is admitted on every gateway, the late one included.
        for g in [*three, late]:
            await async_wait_until(lambda g=g: refused_at_connect(g.ws_url(), "u1"),
                                   until=lambda got: got == (None, "ws.hello"), timeout=15,
                                   message="u1 admitted after its until")
    finally:
        late.stop()
    assert time.time() * 1000 >= until_ms


async def test_http_errors(redis_url: str, key_prefix: str) -> None:
    settings = Settings(redis_url=redis_url, key_prefix=key_prefix, auth_secret=SECRET, publish_key=[KEY])
    async with InProcessGateway(settings) as gw:
        url = gw.http_url
        assert (await post(url, {"sub": "u1"}, headers={})).status_code == 401
        assert (await post(url, {"sub": "u1"}, headers={"Authorization": "Bearer nope"})).status_code == 403
        r = await post(url, b'{"sub": "u1"}', headers={**AUTH, "Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
        assert (await post(url, b'{"sub": "u1"}', headers=AUTH)).status_code == 415  # no content type
        json_headers = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
        assert (await post(url, b'{"sub": "u1"}', headers=json_headers)).status_code == 202
        bad: list[tuple[Any, str]] = [
            ({}, "body"), ([], "body"), ({"sub": "u1", "extra": 1}, "body"),
            ({"sub": ""}, "sub"), ({"sub": 5}, "sub"), ({"conv_id": "bad conv"}, "conv_id"),
            ({"sub": "u1", "code": 1001}, "code"), ({"sub": "u1", "code": 3000}, "code"),
            ({"sub": "u1", "code": True}, "code"), ({"sub": "u1", "reason": "x" * 121}, "reason"),
            ({"conv_id": "c", "until": 10}, "until"), ({"sub": "u1", "until": 0}, "until"),
            ({"sub": "u1", "until": -5}, "until"), ({"sub": "u1", "until": 10**9}, "until"),
            ({"sub": "u1", "until": "tomorrow"}, "until"), ({"sub": "u1", "until": "2026-01-01T00:00:00"}, "until"),
            ({"sub": "u1", "until": "2000-01-01T00:00:00Z"}, "until"), ({"sub": "u1", "until": 1.5}, "until"),
        ]
        for body, field in bad:
            r = await post(url, body)
            assert r.status_code == 422, (body, r.status_code, r.text)
            assert r.json()["error"] == "invalid" and r.json()["field"] == field, (body, r.json())
        r = await post(url, b"{not json", headers=json_headers)
        assert r.status_code == 422 and r.json()["field"] == "body"
        r = await post(url, b'{"sub": "' + b"x" * 9000 + b'"}', headers=json_headers)
        assert r.status_code == 413
        assert await gw.gateway.backend.revocations() == {}  # nothing refused wrote to the deny list
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{url}/v1/revocations")).status_code == 401
            assert (await http.delete(f"{url}/v1/revocations/u1")).status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            assert (await http.delete(f"{url}/v1/revocations/u1", headers=wrong)).status_code == 403
            assert (await http.get(f"{url}/v1/revocations", headers=AUTH)).json() == {"revocations": {}}


async def test_memory_backend_in_one_process_websocket_and_sse() -> None:
    async with InProcessGateway(Settings(auth_secret=SECRET)) as gw:  # no publish key: open, as publishing
        u1_ws = await connect(gw.ws_url(), "u1", "m")
        u2_ws = await connect(gw.ws_url(), "u2", "m")
        async with await SseClient.open(gw.settings.port, f"/sse?conv_id=m&token={token('u1')}") as u1_sse:
            assert u1_sse.status == 200
            await u1_sse.expect("ws.hello")
            await u1_sse.expect("ws.subscribed")
            r = await post(gw.http_url, {"sub": "u1", "until": 60}, headers={})
            assert r.status_code == 202, r.text
            assert await closed_with(u1_ws) == (4403, "revoked")
            await u1_sse.read_to_end(timeout=5)
            assert u1_sse.ended
            async with await SseClient.open(gw.settings.port, f"/sse?conv_id=m&token={token('u1')}") as again:
                assert again.status == 403 and "user revoked until" in again.body.decode()
        assert (await refused_at_connect(gw.ws_url(), "u1"))[0] == 4403
        seq = (await gw.gateway.backend.publish("m", "chat.msg", {"after": True})).seq
        await receives(u2_ws, seq)
        assert gw.gateway.revocations.closed == 2
        assert set(await gw.gateway.backend.revocations()) == {"u1"}
        # A handshake that verified its token before the deny arrived is closed by the sweep.
        revocations, auth = gw.gateway.revocations, gw.gateway.auth
        auth.refuse_subject = None
        try:
            slipped = await connect(gw.ws_url(), "u1", "m")
        finally:
            auth.refuse_subject = revocations.refusal
        assert revocations.sweep() == 1
        assert await closed_with(slipped) == (4403, "revoked")
        async with httpx.AsyncClient() as http:
            scraped = (await http.get(gw.http_url + "/metrics")).text
        assert "broadcaster_revocation_closes_total 3.0" in scraped, scraped
        assert "broadcaster_disconnect_messages_total 1.0" in scraped
        assert "broadcaster_denied_subjects 1.0" in scraped


def test_disconnect_message_parsing() -> None:
    assert Disconnect.from_message({"kind": "disconnect", "sub": "u"}) == Disconnect(sub="u")
    for bad in ({"kind": "disconnect"}, {"kind": "disconnect", "sub": 3}, {"kind": "disconnect", "sub": "u",
                "code": 1001}, {"kind": "disconnect", "conv_id": "c", "until": 5},
                {"kind": "disconnect", "sub": "u", "until": "soon"}):
        assert Disconnect.from_message(bad) is None, bad
    assert Disconnect(sub="u", until=5).message() == {"kind": "disconnect", "sub": "u", "until": 5, "code": 4403,
                                                      "reason": "revoked"}
    assert callable(Revocations.refusal)


async def test_a_gateway_cut_from_redis_catches_up_on_reconnect(redis_url: str, key_prefix: str) -> None:
    """The disconnect message is lost for a gateway cut from Redis; the deny list reloaded on reconnect is not."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with TcpProxy(port) as proxy:
        cut_off = InProcessGateway(Settings(redis_url=proxy.url, key_prefix=key_prefix, auth_secret=SECRET))
        direct = InProcessGateway(Settings(redis_url=redis_url, key_prefix=key_prefix, auth_secret=SECRET))
        async with cut_off, direct:
            u1 = await connect(cut_off.ws_url(), "u1", "x")
            u2 = await connect(cut_off.ws_url(), "u2", "x")
            proxy.block()
            await async_wait_until(lambda: not cut_off.gateway.backend.connected, timeout=10,
                                   message="the cut-off gateway to notice")
            r = await post(direct.http_url, {"sub": "u1", "until": 60}, headers={})
            assert r.status_code == 202, r.text
            assert (await refused_at_connect(direct.ws_url(), "u1"))[0] == 4403
            assert cut_off.gateway.revocations.closed == 0 and "u1" not in cut_off.gateway.revocations.denied
            proxy.unblock()
            assert await closed_with(u1, timeout=20) == (4403, "revoked")
            assert "u1" in cut_off.gateway.revocations.denied
            assert (await refused_at_connect(cut_off.ws_url(), "u1"))[0] == 4403
            seq = (await direct.gateway.backend.publish("x", "chat.msg", {"after": True})).seq
            await receives(u2, seq)


async def test_producer_disconnect_over_redis_and_http(redis_url: str, key_prefix: str) -> None:
    settings = Settings(redis_url=redis_url, key_prefix=key_prefix, auth_secret=SECRET, publish_key=[KEY])
    async with InProcessGateway(settings) as gw:
        u1, u2, u3, u4, stays = [await connect(gw.ws_url(), sub, conv)
                                 for sub, conv in (("u1", "p1"), ("u2", "p2"), ("u3", "p3"), ("u4", "p4"),
                                                   ("u5", "p2"))]
        over_redis = Producer.from_url(redis_url, key_prefix=key_prefix)
        over_http = Producer.from_url(gw.http_url, publish_key=KEY)
        try:
            sent = await asyncio.to_thread(over_redis.disconnect, "u1")
            assert sent == {"kind": "disconnect", "sub": "u1", "code": 4403, "reason": "revoked"}
            assert await closed_with(u1) == (4403, "revoked")
            await asyncio.to_thread(over_http.disconnect, None, "p2", code=4000, reason="bye")
            assert await closed_with(u2) == (4000, "bye")
            assert (await closed_with(stays)) == (4000, "bye")  # u5 is on p2 too
            for bad in ({}, {"conv_id": "p1", "until": 5}, {"sub": "u", "until": datetime(2030, 1, 1)},
                        {"sub": "u", "code": 1001}, {"sub": "u", "until": -1}):
                with pytest.raises(ValidationError):
                    over_redis.disconnect(**bad)
        finally:
            over_redis.close()
            over_http.close()
        async with AsyncProducer.from_url(redis_url, key_prefix=key_prefix) as async_redis, \
                AsyncProducer.from_url(gw.http_url, publish_key=KEY) as async_http:
            sent = await async_redis.disconnect("u3", until=60)
            assert sent["until"] > time.time() * 1000
            assert await closed_with(u3) == (4403, "revoked")
            later = datetime.now(UTC) + timedelta(minutes=5)
            sent = await async_http.disconnect("u4", until=later)
            assert abs(sent["until"] - later.timestamp() * 1000) < 2
            assert await closed_with(u4) == (4403, "revoked")
            with pytest.raises(PublishForbidden):
                await AsyncProducer.from_url(gw.http_url, publish_key="wrong", retry_budget=1).disconnect("u9")
        for sub in ("u3", "u4"):
            assert (await refused_at_connect(gw.ws_url(), sub))[0] == 4403
        assert set(await gw.gateway.backend.revocations()) == {"u3", "u4"}


async def test_raw_disconnect_messages_from_other_producers() -> None:
    """A Go or Node producer PUBLISHes its own JSON: malformed ones are ignored, odd but valid ones obeyed."""
    async with InProcessGateway(Settings(auth_secret=SECRET)) as gw:
        backend, revocations = gw.gateway.backend, gw.gateway.revocations
        long_sub = "s" * 600  # over what the HTTP API accepts; a token may still carry it
        odd = await connect(gw.ws_url(), long_sub, "raw")
        other = await connect(gw.ws_url(), "u2", "raw")
        for junk in ({"kind": "disconnect"}, {"kind": "disconnect", "sub": 5}, {"kind": "disconnect", "sub": "u2",
                     "code": 1001}, {"kind": "join", "conv": "raw", "user": "u2"}, {"kind": "lift", "sub": 3}):
            await backend.publish_control(junk)
        await backend.publish_control({"kind": "disconnect", "sub": long_sub})
        assert await closed_with(odd) == (4403, "revoked")
        assert revocations.messages == 1  # the malformed disconnects and the join ignored
        seq = (await backend.publish("raw", "chat.msg", {"still": True})).seq
        await receives(other, seq)
