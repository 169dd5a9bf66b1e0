"""Identity on the live socket (issue #16): expiry, ws.refresh, per-subscription errors, revocation at
connect, the publish endpoint's Content-Type rule and dot-only conversation ids.

Real uvicorn gateways (in process, ``--auth-secret``), real websocket, SSE and HTTP clients. Tokens
live 2-3 s so the expiry tests stay short; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt
import pytest
import websockets

from broadcaster.errors import ValidationError
from broadcaster.validation import is_valid_conv_id, validate_conv_id
from gateway import sse, ws_endpoint
from gateway.settings import Settings
from producers import AsyncProducer
from tests.support.gateway import InProcessGateway
from tests.support.polling import async_wait_until
from tests.support.sseclient import SseClient
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)

SECRET = "identity-session-secret-" + "x" * 32
CLOSE_SLACK = 1.5
"""How late after ``exp`` a connection may close."""


def token(*, sub: str = "alice", ttl: float = 300, convs: list[str] | None = None,
          profiles: list[str] | None = None, secret: str = SECRET, **extra: Any) -> tuple[str, int]:
    """(token, exp): ``exp`` is a whole second ``ttl`` seconds from now, rounded up."""
    exp = int(time.time() + ttl + 0.999)
    claims: dict[str, Any] = {"sub": sub, "exp": exp, "convs": ["*"] if convs is None else convs,
                              "profiles": ["default"] if profiles is None else profiles, **extra}
    return jwt.encode(claims, secret, algorithm="HS256"), exp


def auth_gateway(**kwargs: Any) -> InProcessGateway:
    return InProcessGateway(Settings(auth_secret=SECRET, **kwargs))


async def connect(gw: InProcessGateway, tok: str, *convs: str) -> WsClient:
    """A socket subscribed to ``convs`` (the first by the URL, the others by ws.subscribe)."""
    query = f"token={tok}" + (f"&conv_id={convs[0]}" if convs else "")
    client = await WsClient.connect(gw.ws_url(query))
    assert (await client.next())["type"] == "ws.hello"
    if convs:
        assert (await client.expect("ws.subscribed"))["conv_id"] == convs[0]
    for conv in convs[1:]:
        await client.send_json({"type": "ws.subscribe", "conv_id": conv})
        assert (await client.expect("ws.subscribed"))["conv_id"] == conv
    return client


async def closed(client: WsClient, timeout: float = 10.0) -> tuple[int | None, str, list[dict[str, Any]], float]:
    """Read until the server closes: (code, reason, objects received, wall time of the close)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            got.append(await client.next(timeout=max(0.01, deadline - time.monotonic())))
    except websockets.ConnectionClosed:
        at = time.time()
        rcvd = client.ws.protocol.close_rcvd
        return (rcvd.code if rcvd else None), (rcvd.reason if rcvd else ""), got, at


async def publish(gw: InProcessGateway, conv: str, data: Any = None) -> int:
    return (await gw.gateway.backend.publish(conv, "chat.msg", data)).seq


async def receives(gw: InProcessGateway, client: WsClient, conv: str) -> None:
    """``client`` gets an event published to ``conv`` now."""
    seq = await publish(gw, conv, {"alive": conv})
    event = (await client.events(1))[0]
    assert (event["conv_id"], event["seq"]) == (conv, seq), event


async def until_time(wall: float) -> None:
    """Let the clock reach ``wall`` (a point in time is what is awaited here, not a condition)."""
    await asyncio.sleep(max(0.0, wall - time.time()))


# ---- expiry ------------------------------------------------------------------------------------


async def test_socket_closes_4401_at_exp_and_events_after_exp_never_arrive() -> None:
    async with auth_gateway() as gw:
        tok, exp = token(ttl=2)
        client = await connect(gw, tok, "exp-a")
        await receives(gw, client, "exp-a")
        published_after: list[int] = []

        async def publisher() -> None:
            while time.time() < exp + CLOSE_SLACK:
                began = time.time()
                seq = await publish(gw, "exp-a", {"t": began})
                # the timer fires in the first loop pass that starts after exp: a publish in a pass
                # that started before exp (and was held up, on a loaded machine) may still go out
                if began >= exp + 0.25:
                    published_after.append(seq)
                await asyncio.sleep(0.05)

        task = asyncio.create_task(publisher())
        code, reason, got, at = await closed(client)
        await task
        assert (code, reason) == (4401, "token expired")
        assert exp - 0.05 <= at <= exp + CLOSE_SLACK, (at - exp)
        assert published_after, "the publisher ran past exp"
        assert not [o for o in got if o.get("seq") in published_after], got
        await async_wait_until(lambda: len(gw.gateway.pool) == 0, 5, "the expired socket leaving the pool")
        assert "exp-a" not in gw.gateway.hub.conversations()


async def test_subscribe_after_exp_is_refused_even_before_the_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    async with auth_gateway() as gw:
        tok, exp = token(ttl=2)
        client = await connect(gw, tok, "late-a")
        # without the timer, the clock check at subscribe is what refuses
        monkeypatch.setattr(ws_endpoint.Session, "arm_expiry", lambda self: None)
        lagging = await connect(gw, tok, "late-b")
        late_refresh = await connect(gw, tok, "late-e")
        await until_time(exp + 0.05)
        for c, conv in ((client, "late-c"), (lagging, "late-d")):
            try:
                await c.send_json({"type": "ws.subscribe", "conv_id": conv})
            except websockets.ConnectionClosed:
                pass  # the timer closed it first
            code, reason, got, _ = await closed(c)
            assert (code, reason) == (4401, "token expired"), (conv, code, reason)
            assert not [o for o in got if o.get("conv_id") == conv], got
        assert not {"late-c", "late-d"} & set(gw.gateway.hub.conversations())
        # a refresh after exp comes too late as well: the connection ended with its token
        fresh, _ = token(ttl=60)
        await late_refresh.send_json({"type": "ws.refresh", "token": fresh})
        code, reason, got, _ = await closed(late_refresh)
        assert (code, reason) == (4401, "token expired") and not [o for o in got if o["type"] == "ws.refreshed"]


async def test_sse_stream_ends_at_exp() -> None:
    async with auth_gateway() as gw:
        tok, exp = token(ttl=2)
        async with await SseClient.open(gw.settings.port, f"/sse?conv_id=sse-a&token={tok}") as stream:
            assert stream.status == 200
            await stream.expect("ws.hello")
            await stream.expect("ws.subscribed")
            seq = await publish(gw, "sse-a", {"before": True})
            assert (await stream.events(1))[0].id is not None and seq == 1
            rest = await stream.read_to_end(timeout=exp - time.time() + CLOSE_SLACK + 1)
            ended_at = time.time()
            assert stream.ended
            assert exp - 0.05 <= ended_at <= exp + CLOSE_SLACK, ended_at - exp
            assert all(e.event != "chat.msg" for e in rest), rest
        assert gw.gateway.metrics.token_expiry_closes.value("sse") == 1
        await async_wait_until(lambda: len(gw.gateway.pool) == 0, 5, "the expired stream leaving the pool")
        # EventSource's reconnect resends the expired token: refused, the client needs a new one
        async with await SseClient.open(gw.settings.port, f"/sse?conv_id=sse-a&token={tok}") as again:
            assert again.status == 401 and "expired" in again.json()["message"]


def expiry_timers() -> int:
    """Live (not cancelled) expiry timers of websockets and SSE streams in this loop (white box)."""
    loop: Any = asyncio.get_running_loop()
    count = 0
    for handle in loop._scheduled:
        callback = getattr(handle, "_callback", None)  # None once cancelled
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, ws_endpoint.Session) or callback is sse._expire:
            count += 1
    return count


async def test_one_timer_per_connection_replaced_on_refresh_cancelled_at_disconnect() -> None:
    async with auth_gateway() as gw:
        assert expiry_timers() == 0
        tok, _ = token(ttl=3600)
        sockets = [await connect(gw, tok, f"t-{i}") for i in range(20)]
        async with await SseClient.open(gw.settings.port, f"/sse?conv_id=t-0&token={tok}") as stream:
            await stream.expect("ws.hello")
            assert expiry_timers() == 21
        await async_wait_until(expiry_timers, 5, "the SSE stream's timer cancelled", until=lambda n: n == 20)
        fresh, new_exp = token(ttl=7200)
        for client in sockets[:5]:
            await client.send_json({"type": "ws.refresh", "token": fresh})
            assert (await client.expect("ws.refreshed"))["exp"] == new_exp
        assert expiry_timers() == 20  # replaced, not added
        for client in sockets:
            await client.close()
        await async_wait_until(lambda: len(gw.gateway.pool), 5, "the sockets leaving the pool", until=lambda n: n == 0)
        assert expiry_timers() == 0
    async with InProcessGateway() as open_gw:  # auth off: no timer at all
        client = await connect(open_gw, "x", "t-open")
        assert expiry_timers() == 0
        await client.close()


# ---- ws.refresh ------------------------------------------------------------------------------------


async def test_refresh_extends_life_past_the_old_exp() -> None:
    async with auth_gateway() as gw:
        tok, exp = token(ttl=2)
        client = await connect(gw, tok, "ref-a")
        fresh, new_exp = token(ttl=30)
        await client.send_json({"type": "ws.refresh", "token": fresh})
        refreshed = await client.expect("ws.refreshed")
        assert refreshed == {"type": "ws.refreshed", "exp": new_exp}
        assert gw.gateway.metrics.refreshes.value("ok") == 1
        await until_time(exp + CLOSE_SLACK)
        await receives(gw, client, "ref-a")  # still open, still subscribed
        await client.send_json({"type": "ws.subscribe", "conv_id": "ref-b"})
        assert (await client.expect("ws.subscribed"))["conv_id"] == "ref-b"
        await client.close()


async def test_bad_refresh_is_an_error_and_the_old_exp_stays() -> None:
    async with auth_gateway() as gw:
        tok, exp = token(ttl=3)
        client = await connect(gw, tok, "bad-a")
        other_sub, _ = token(sub="mallory", ttl=60)
        expired, _ = token(ttl=-5)
        wrong_key, _ = token(ttl=60, secret="another-secret-" + "y" * 32)
        for bad, why in ((other_sub, "another sub"), ("garbage", "invalid token"), (expired, "expired"),
                         (wrong_key, "invalid token")):
            await client.send_json({"type": "ws.refresh", "token": bad})
            error = await client.expect("ws.error")
            assert error["code"] == "bad_refresh" and why in error["message"], (why, error)
        for malformed in ({"type": "ws.refresh"}, {"type": "ws.refresh", "token": 7}):
            await client.send_json(malformed)
            assert (await client.expect("ws.error"))["code"] == "bad_refresh"
        await receives(gw, client, "bad-a")
        code, reason, _, at = await closed(client)
        assert (code, reason) == (4401, "token expired")
        assert exp - 0.05 <= at <= exp + CLOSE_SLACK, at - exp
        metrics = gw.gateway.metrics
        assert (metrics.refreshes.value("bad_refresh"), metrics.refreshes.value("ok")) == (4, 0)
        assert metrics.token_expiry_closes.value("ws") == 1


async def test_refresh_narrowing_convs_ends_disallowed_subscriptions_only() -> None:
    async with auth_gateway() as gw:
        tok, _ = token(ttl=60, convs=["n-*"])
        client = await connect(gw, tok, "n-a", "n-b", "n-c")
        narrow, new_exp = token(ttl=60, convs=["n-a", "n-c"])
        await client.send_json({"type": "ws.refresh", "token": narrow})
        got = await client.until(lambda objs: bool(objs) and objs[-1]["type"] == "ws.refreshed")
        assert got == [{"type": "ws.unsubscribed", "conv_id": "n-b", "reason": "forbidden"},
                       {"type": "ws.refreshed", "exp": new_exp}]
        assert gw.gateway.metrics.refreshes.value("narrowed") == 1
        assert "n-b" not in gw.gateway.hub.conversations()
        await publish(gw, "n-b", {"hidden": True})
        await receives(gw, client, "n-a")  # the n-b event, published first, would have come before
        await receives(gw, client, "n-c")
        # the new scope applies to later subscribes too
        await client.send_json({"type": "ws.subscribe", "conv_id": "n-b"})
        error = await client.expect("ws.error")
        assert (error["code"], error["conv_id"]) == ("forbidden", "n-b")
        # a refresh that no longer allows the connection's profile closes it 4403
        no_default, _ = token(ttl=60, profiles=["debug"])
        await client.send_json({"type": "ws.refresh", "token": no_default})
        code, _, _, _ = await closed(client)
        assert code == 4403


async def test_refresh_with_auth_off_is_an_error() -> None:
    async with InProcessGateway() as gw:
        client = await WsClient.connect(gw.ws_url("conv_id=open-a"))
        await client.expect("ws.subscribed")
        await client.send_json({"type": "ws.refresh", "token": "anything"})
        error = await client.expect("ws.error")
        assert error["code"] == "bad_refresh" and "auth is off" in error["message"]
        await receives(gw, client, "open-a")


# ---- per-subscription errors ----------------------------------------------------------------------


async def test_forbidden_later_subscribe_is_an_error_and_the_other_subscriptions_stay() -> None:
    async with auth_gateway(max_subscriptions=10) as gw:
        convs = [f"room-{i}" for i in range(10)]
        tok, _ = token(ttl=60, convs=["room-*", "extra"])
        client = await connect(gw, tok, *convs)
        await client.send_json({"type": "ws.subscribe", "conv_id": "secret"})
        error = await client.expect("ws.error")
        assert (error["code"], error["conv_id"]) == ("forbidden", "secret") and "secret" in error["message"]
        assert "secret" not in gw.gateway.hub.conversations()
        await client.send_json({"type": "ws.subscribe", "conv_id": "extra"})  # allowed, but the 11th
        error = await client.expect("ws.error")
        assert (error["code"], error["conv_id"]) == ("too_many_subscriptions", "extra")
        await client.send_json({"type": "ws.subscribe", "conv_id": "room-3", "since": 0})  # held: not counted twice
        assert (await client.expect("ws.subscribed"))["conv_id"] == "room-3"
        seqs = {conv: await publish(gw, conv, {"to": conv}) for conv in convs}
        events = await client.events(10)
        assert {e["conv_id"]: e["seq"] for e in events} == seqs


async def test_subscription_errors_name_their_conv_id() -> None:
    async with auth_gateway() as gw:
        tok, _ = token(ttl=60)
        client = await connect(gw, tok)
        cases: list[tuple[dict[str, Any], str, str | None]] = [
                 ({"type": "ws.subscribe", "conv_id": "c-1", "since": -1}, "bad_subscribe", "c-1"),
                 ({"type": "ws.subscribe", "conv_id": "c-1", "epoch": "no!"}, "bad_subscribe", "c-1"),
                 ({"type": "ws.subscribe", "conv_id": "bad id"}, "bad_subscribe", "bad id"),
                 ({"type": "ws.subscribe", "conv_id": "..."}, "bad_subscribe", "..."),
                 ({"type": "ws.unsubscribe", "conv_id": ".."}, "bad_unsubscribe", ".."),
                 ({"type": "ws.subscribe", "conv_id": "x" * 500}, "bad_subscribe", None),
                 ({"type": "ws.subscribe", "conv_id": 5}, "bad_subscribe", None)]
        for message, code, conv in cases:
            await client.send_json(message)
            error = await client.expect("ws.error")
            assert error["code"] == code and error.get("conv_id") == conv, (message, error)
        await client.send_json({"type": "ws.subscribe", "conv_id": "c-ok"})
        assert (await client.expect("ws.subscribed"))["conv_id"] == "c-ok"


# ---- revocation at connect -------------------------------------------------------------------------


async def test_refused_subject_is_4403_on_ws_403_on_sse_and_a_refresh_error() -> None:
    async with auth_gateway() as gw:
        alice, _ = token(ttl=60)
        client = await connect(gw, alice, "rv-a")
        gw.gateway.auth.refuse_subject = lambda sub: "subject revoked" if sub == "alice" else None
        refused = await WsClient.connect(gw.ws_url(f"conv_id=rv-a&token={alice}"))
        code, reason, got, _ = await closed(refused)
        assert (code, reason, got) == (4403, "subject revoked", [])
        async with await SseClient.open(gw.settings.port, f"/sse?conv_id=rv-a&token={alice}") as sse:
            assert sse.status == 403 and sse.json()["message"] == "subject revoked"
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            read = await http.get("/v1/conversations/rv-a/state", headers={"authorization": f"Bearer {alice}"})
            assert (read.status_code, read.json()["error"]) == (403, "forbidden")
        fresh, _ = token(ttl=120)
        await client.send_json({"type": "ws.refresh", "token": fresh})
        error = await client.expect("ws.error")
        assert error["code"] == "bad_refresh" and "subject revoked" in error["message"]
        bob, _ = token(sub="bob", ttl=60)
        await connect(gw, bob, "rv-a")  # others are not refused
        garbage = await WsClient.connect(gw.ws_url("conv_id=rv-a&token=garbage"))
        assert (await closed(garbage))[0] == 4401  # a bad token is still 4401


# ---- publish: Content-Type ------------------------------------------------------------------------


async def test_publish_needs_json_content_type() -> None:
    async with InProcessGateway() as gw, httpx.AsyncClient(base_url=gw.http_url) as http:
        body = b'{"type": "chat.msg", "data": 1}'
        for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"},
                        {"content-type": "multipart/form-data; boundary=x"}, {}, {"content-type": ""},
                        {"content-type": "application/jsonx"}):
            r = await http.post("/v1/conversations/ct/events", content=body, headers=headers)
            assert r.status_code == 415, (headers, r.status_code, r.text)
            assert r.json()["error"] == "unsupported_media_type" and "application/json" in r.json()["message"]
        form = await http.post("/v1/conversations/ct/events", data={"type": "chat.msg"})
        assert form.status_code == 415
        for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"):
            ok = await http.post("/v1/conversations/ct/events", content=body, headers={"content-type": ctype})
            assert ok.status_code == 200, (ctype, ok.text)
        assert (await http.post("/v1/conversations/ct/events", json={"type": "chat.msg"})).status_code == 200
        history = (await http.get("/v1/conversations/ct/events")).json()
        assert history["seq"] == 4  # the refused requests published nothing


async def test_publish_415_comes_before_the_body_is_read() -> None:
    async with InProcessGateway() as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.settings.port)
        # a declared body that never comes: the answer cannot wait for it
        writer.write(b"POST /v1/conversations/ct/events HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 415"), head
        writer.close()


# ---- dot-only conversation ids ---------------------------------------------------------------------


def test_dot_only_ids_are_not_conversation_ids() -> None:
    for bad in (".", "..", "...", "." * 128):
        assert not is_valid_conv_id(bad)
        with pytest.raises(ValidationError):
            validate_conv_id(bad)
    for good in ("a.", ".a", "..a..", "v1.2", "a"):
        assert is_valid_conv_id(good) and validate_conv_id(good) == good


async def test_dot_only_ids_refused_on_ws_http_sse_and_the_sdk() -> None:
    async with InProcessGateway() as gw:
        for conv in ("..", "..."):
            client = await WsClient.connect(gw.ws_url(f"conv_id={conv}"))
            code, reason, got, _ = await closed(client)
            assert code == 4400 and "dots" in reason and got == [], (conv, code, reason)
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            # "%2E%2E": clients resolve a literal ".." in a path before sending it
            for path in ("...", "%2E%2E", "%2E"):
                r = await http.post(f"/v1/conversations/{path}/events", json={"type": "chat.msg"})
                assert r.status_code == 422 and r.json()["field"] == "conv_id", (path, r.status_code, r.text)
                for read in ("events", "state"):
                    r = await http.get(f"/v1/conversations/{path}/{read}")
                    assert r.status_code == 422, (path, read, r.status_code)
        async with await SseClient.open(gw.settings.port, "/sse?conv_id=...") as sse:
            assert sse.status == 400
        async with AsyncProducer.from_url(gw.http_url) as sdk:
            with pytest.raises((ValueError, ValidationError)):
                await sdk.publish("..", "chat.msg", {})
        assert ".." not in gw.gateway.hub.conversations()
