"""Token lifetimes in ``producers.client.BroadcasterClient``: ``get_token``, ``ws.refresh`` ahead of
exp, the reconnect after 4401 ``token expired``, and per-subscription ``forbidden``.

First against a scripted fake ``/ws`` (a ``websockets`` server on a free port: hello on connect,
``ws.subscribed`` per ``ws.subscribe``, and whatever a test scripts), then against real in-process
gateways with ``--auth-secret`` and tokens minted with a few seconds to live. Tokens for the fake
are unsigned JWTs with a fractional exp (the client reads exp, never verifies). Every wait polls
with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from gateway.auth import mint_token
from gateway.settings import Settings
from producers import AsyncProducer
from producers.client import (
    BroadcasterClient,
    ClientClosed,
    Unsubscribed,
    refresh_delay,
    token_expiry,
)
from tests.support.gateway import InProcessGateway
from tests.support.polling import async_wait_until
from tests.test_client import Collector, following, publish

pytestmark = pytest.mark.timeout(60)

SECRET = "client-token-tests-".ljust(40, "x")


def fake_jwt(**claims: Any) -> str:
    """An unsigned JWT-shaped token: the fake gateway does not verify it, and the client never does."""
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.sig"


def ev(conv: str, seq: int) -> dict[str, Any]:
    return {"type": "chat.msg", "conv_id": conv, "seq": seq, "id": f"{conv}-{seq}", "ts": seq, "data": {"n": seq}}


@dataclass
class FakeConn:
    ws: ServerConnection
    index: int
    received: list[dict[str, Any]] = field(default_factory=list)

    @property
    def token(self) -> str | None:
        auth = self.ws.request.headers.get("Authorization") if self.ws.request is not None else None
        return auth.removeprefix("Bearer ") if auth else None

    def messages(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("type") == kind]

    async def send(self, *objects: dict[str, Any]) -> None:
        await self.ws.send("\n".join(orjson.dumps(o).decode() for o in objects))

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)


OnMessage = Callable[[FakeConn, dict[str, Any]], Awaitable[bool]]


class FakeGateway:
    """A scripted ``/ws``; ``on_message`` sees every client message first (True: it answered)."""

    def __init__(self, on_message: OnMessage | None = None,
                 refuse: Callable[[FakeConn], tuple[int, str] | None] | None = None) -> None:
        self.on_message = on_message
        self.refuse = refuse
        self.connections: list[FakeConn] = []
        self._server: Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    async def __aenter__(self) -> FakeGateway:
        self._server = await serve(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def connection(self, n: int) -> FakeConn:
        return await async_wait_until(lambda: self.connections[n] if len(self.connections) > n else None,
                                      timeout=10, message=f"connection #{n}")

    async def _handle(self, ws: ServerConnection) -> None:
        conn = FakeConn(ws, len(self.connections))
        self.connections.append(conn)
        refusal = self.refuse(conn) if self.refuse is not None else None
        if refusal is not None:
            await ws.close(*refusal)
            return
        await conn.send({"type": "ws.hello", "connection_id": f"c{conn.index}", "gateway_id": "fake",
                         "profile": "default", "server_time": int(time.time() * 1000)})
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                msg = orjson.loads(raw)
                conn.received.append(msg)
                if self.on_message is not None and await self.on_message(conn, msg):
                    continue
                if msg.get("type") == "ws.subscribe":
                    await conn.send({"type": "ws.subscribed", "conv_id": msg["conv_id"], "epoch": "E1", "seq": 0})


def answering_refresh(answer: Callable[[dict[str, Any], int], dict[str, Any] | None]) -> OnMessage:
    """An ``on_message`` answering the n-th ``ws.refresh`` (0-based) with ``answer(msg, n)``."""
    count = 0

    async def on_message(conn: FakeConn, msg: dict[str, Any]) -> bool:
        nonlocal count
        if msg.get("type") != "ws.refresh":
            return False
        reply = answer(msg, count)
        count += 1
        if reply is not None:
            await conn.send(reply)
        return True
    return on_message


def refreshed(msg: dict[str, Any]) -> dict[str, Any]:
    return {"type": "ws.refreshed", "exp": token_expiry(msg["token"])}


BAD_REFRESH = {"type": "ws.error", "code": "bad_refresh", "message": "token refused"}


def client_for(url: str, convs: list[str], **options: Any) -> BroadcasterClient:
    settings: dict[str, Any] = {"backoff_initial": 0.02, "backoff_max": 0.1, "ping_interval": None, **options}
    return BroadcasterClient(url, convs, **settings)


def running(client: BroadcasterClient) -> contextlib.AbstractAsyncContextManager[Collector]:
    """Collect ``client``'s items without waiting for its subscriptions; close after."""
    return following(client, wait_subscribed=False)


# ---- helpers ------------------------------------------------------------------------------------

def test_token_expiry_reads_exp_unverified_and_none_when_it_cannot() -> None:
    assert token_expiry(fake_jwt(sub="é", exp=1_900_000_000)) == 1_900_000_000.0
    assert token_expiry(fake_jwt(exp=17.5)) == 17.5
    for bad in (None, "", "opaque-key", "a.b", "a.!!!.c", "a.b.c.d", fake_jwt(sub="no exp"), fake_jwt(exp="1"),
                fake_jwt(exp=True), "x." + base64.urlsafe_b64encode(b"[1]").decode() + ".y"):
        assert token_expiry(bad) is None, bad


def test_refresh_delay_keeps_a_lead_and_jitters() -> None:
    assert refresh_delay(3600, lambda: 0) == pytest.approx(3595 * 0.8)
    assert refresh_delay(3600, lambda: 1) == pytest.approx(3595 * 0.9)
    assert refresh_delay(3, lambda: 0) == pytest.approx(1.6)
    assert refresh_delay(0) == 0 and refresh_delay(-1) == 0
    assert len({refresh_delay(600) for _ in range(50)}) > 10  # a fleet does not refresh in the same instant


def test_token_and_get_token_are_exclusive() -> None:
    with pytest.raises(ValueError):
        BroadcasterClient("ws://h:1", ["c"], token="t", get_token=lambda: "t")
    with pytest.raises(ValueError):
        BroadcasterClient("ws://h:1", ["c"], get_token="t")  # type: ignore[arg-type]


# ---- refresh ahead of exp (fake gateway) ----------------------------------------------------------

async def test_refresh_goes_out_ahead_of_each_exp_and_the_socket_lives_on() -> None:
    issued: list[str] = []

    async def get_token() -> str:  # async: awaited by the client
        issued.append(fake_jwt(sub="u", exp=time.time() + 2.5, n=len(issued)))
        return issued[-1]

    async with FakeGateway(answering_refresh(lambda msg, n: refreshed(msg))) as fake:
        client = client_for(fake.url, ["c1"], get_token=get_token)
        async with running(client):
            conn = await fake.connection(0)
            assert conn.token == issued[0]
            await async_wait_until(lambda: client.stats.refreshes >= 3, timeout=15, message="three refreshes")
            refreshes = conn.messages("ws.refresh")
            for i in range(3):
                assert refreshes[i]["token"] == issued[i + 1]
                sent_at = token_expiry(issued[i + 1]) - 2.5  # type: ignore[operator]  # minted as it went out
                exp = token_expiry(issued[i])
                assert exp is not None and exp - 2.5 + 1.0 < sent_at < exp - 0.3, (i, sent_at, exp)
            assert len(fake.connections) == 1 and client.stats.connections == 1
            assert client.stats.refresh_failures == 0


async def test_bad_refresh_and_a_raising_get_token_are_retried_before_exp() -> None:
    calls = 0
    exp0 = time.time() + 4

    def get_token() -> str:  # sync
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("identity provider down")
        return fake_jwt(sub="u", exp=exp0 if calls == 1 else time.time() + 60)

    on_message = answering_refresh(lambda msg, n: BAD_REFRESH if n < 2 else refreshed(msg))
    async with FakeGateway(on_message) as fake:
        client = client_for(fake.url, ["c1"], get_token=get_token)
        async with running(client):
            await async_wait_until(lambda: client.stats.refreshes == 1, timeout=10, message="the refresh to succeed")
            assert time.time() < exp0
            conn = await fake.connection(0)
            assert len(conn.messages("ws.refresh")) == 3
            assert client.stats.refresh_failures == 3  # bad_refresh, get_token raised, bad_refresh
            assert len(fake.connections) == 1



async def test_an_unanswered_refresh_counts_as_failed_and_is_retried() -> None:
    exp0 = time.time() + 4
    tokens = iter([fake_jwt(sub="u", exp=exp0)] + [fake_jwt(sub="u", exp=exp0 + 60, n=n) for n in range(5)])
    async with FakeGateway(answering_refresh(lambda msg, n: None if n == 0 else refreshed(msg))) as fake:
        client = client_for(fake.url, ["c1"], get_token=lambda: next(tokens))
        async with running(client):
            await async_wait_until(lambda: client.stats.refreshes == 1, timeout=10, message="the retried refresh")
            assert time.time() < exp0
            assert client.stats.refresh_failures == 1 and len(fake.connections) == 1
            conn = await fake.connection(0)
            assert len(conn.messages("ws.refresh")) == 2

async def test_a_gateway_without_refresh_is_asked_once_then_the_expiry_reconnects() -> None:
    unknown = {"type": "ws.error", "code": "unknown_type", "message": "unknown message type 'ws.refresh'"}
    tokens: list[str] = []

    def get_token() -> str:
        tokens.append(fake_jwt(sub="u", exp=time.time() + 2, n=len(tokens)))
        return tokens[-1]

    async with FakeGateway(answering_refresh(lambda msg, n: unknown)) as fake:
        client = client_for(fake.url, ["c1"], get_token=get_token)
        async with running(client) as got:
            conn0 = await fake.connection(0)
            await async_wait_until(lambda: conn0.messages("ws.subscribe"), timeout=10, message="subscribe")
            await conn0.send(ev("c1", 1), ev("c1", 2))
            await async_wait_until(lambda: conn0.messages("ws.refresh"), timeout=10, message="the refresh")
            first_exp = token_expiry(tokens[0])
            assert first_exp is not None
            await async_wait_until(lambda: time.time() >= first_exp, timeout=10, message="the first exp")
            assert len(conn0.messages("ws.refresh")) == 1  # no refresh loop against an old gateway
            await conn0.close(4401, "token expired")
            conn1 = await fake.connection(1)
            assert conn1.token == tokens[-1] != tokens[0]
            sub = await async_wait_until(lambda: conn1.messages("ws.subscribe"), timeout=10, message="resubscribe")
            assert (sub[0]["since"], sub[0]["epoch"]) == (2, "E1")
            await conn1.send(ev("c1", 3))
            await got.wait(lambda: got.seqs() == [1, 2, 3], what="events 1-3")


# ---- 4401 "token expired" (fake gateway) ----------------------------------------------------------

async def test_token_expired_reconnects_at_once_with_a_fresh_token_and_resumes_exactly() -> None:
    calls = 0

    def get_token() -> str:
        nonlocal calls
        calls += 1
        return fake_jwt(sub="u", exp=4_000_000_000, n=calls)

    async with FakeGateway() as fake:
        client = client_for(fake.url, ["a", "b"], get_token=get_token, backoff_initial=5, backoff_max=5)
        async with running(client) as got:
            conn0 = await fake.connection(0)
            await async_wait_until(lambda: len(conn0.messages("ws.subscribe")) == 2, timeout=10, message="subs")
            await conn0.send(ev("a", 1), ev("a", 2), ev("b", 1))
            await got.wait(lambda: len(got.events()) == 3, what="3 events")
            started = time.monotonic()
            await conn0.close(4401, "token expired")
            conn1 = await fake.connection(1)
            assert time.monotonic() - started < 2, "no backoff (5 s here) after an expiry"
            assert calls == 2 and conn1.token != conn0.token
            await async_wait_until(lambda: len(conn1.messages("ws.subscribe")) == 2, timeout=10, message="resubs")
            subs = {m["conv_id"]: m for m in conn1.messages("ws.subscribe")}
            assert [(subs[c]["since"], subs[c]["epoch"]) for c in "ab"] == [(2, "E1"), (1, "E1")]
            await conn1.send(ev("a", 2), ev("a", 3), ev("b", 2))  # a replay overlapping by one
            await got.wait(lambda: len(got.events()) == 5, what="5 events")
            assert [f"{e.conv_id}{e.seq}" for e in got.events()] == ["a1", "a2", "b1", "a3", "b2"]
            assert client.stats.duplicates == 1 and got.error is None
            assert client.stats.close_codes == [4401] and client.stats.failed_attempts == 0
            # after a hello with the fresh token, the next expiry is renewed again
            await conn1.close(4401, "token expired")
            await fake.connection(2)
            assert got.error is None


async def test_a_4401_right_after_a_fresh_token_is_fatal() -> None:
    calls = 0

    def get_token() -> str:
        nonlocal calls
        calls += 1
        return fake_jwt(exp=4_000_000_000, n=calls)

    async with FakeGateway(refuse=lambda conn: (4401, "invalid token: signature") if conn.index == 1 else None) as fake:
        client = client_for(fake.url, ["c1"], get_token=get_token)
        async with running(client) as got:
            conn0 = await fake.connection(0)
            await async_wait_until(lambda: conn0.messages("ws.subscribe"), timeout=10, message="subscribe")
            await conn0.close(4401, "token expired")
            await async_wait_until(lambda: got.task.done(), timeout=10, message="the client to stop")
            assert isinstance(got.error, ClientClosed)
            assert (got.error.code, got.error.reason) == (4401, "invalid token: signature")
            assert calls == 2 and len(fake.connections) == 2


@pytest.mark.parametrize(("options", "reason"), [
    ({"get_token": lambda: fake_jwt(exp=4_000_000_000)}, "invalid token"),
    ({"token": fake_jwt(exp=4_000_000_000)}, "token expired"),  # a static token cannot be renewed
])
async def test_other_4401s_and_a_static_token_expiry_are_fatal(options: dict[str, Any], reason: str) -> None:
    async with FakeGateway() as fake:
        client = client_for(fake.url, ["c1"], **options)
        async with running(client) as got:
            conn = await fake.connection(0)
            await async_wait_until(lambda: conn.messages("ws.subscribe"), timeout=10, message="subscribe")
            await conn.close(4401, reason)
            await async_wait_until(lambda: got.task.done(), timeout=10, message="the client to stop")
            assert isinstance(got.error, ClientClosed) and got.error.code == 4401
            assert len(fake.connections) == 1


# ---- per-subscription forbidden (fake gateway) ----------------------------------------------------

async def test_forbidden_ends_one_subscription_in_stream_order_and_is_not_resubscribed() -> None:
    async def on_message(conn: FakeConn, msg: dict[str, Any]) -> bool:
        if msg.get("type") == "ws.subscribe" and msg["conv_id"] == "secret":
            await conn.send({"type": "ws.error", "code": "forbidden", "conv_id": "secret",
                             "message": "token does not allow conversation 'secret'"})
            return True
        return False

    async with FakeGateway(on_message) as fake:
        client = client_for(fake.url, ["a", "b"], get_token=lambda: fake_jwt(exp=4_000_000_000))
        async with running(client) as got:
            conn0 = await fake.connection(0)
            await client.wait_subscribed(10)
            await conn0.send(ev("a", 1))
            await client.subscribe("secret")
            await got.wait(lambda: any(isinstance(i, Unsubscribed) for i in got.items), what="secret dropped")
            await client.wait_subscribed(10)  # what is left is subscribed
            # a refresh narrowed the token: the gateway ends b; a goes on
            await conn0.send(ev("a", 2), {"type": "ws.unsubscribed", "conv_id": "b", "reason": "forbidden"},
                             ev("b", 1), ev("a", 3))
            await got.wait(lambda: got.seqs("a") == [1, 2, 3], what="a's events")
            order = [(type(i).__name__, i.conv_id) for i in got.items]
            assert order == [("Event", "a"), ("Unsubscribed", "secret"), ("Event", "a"), ("Unsubscribed", "b"),
                             ("Event", "a")]
            assert got.items[1] == Unsubscribed("secret", "forbidden", "token does not allow conversation 'secret'")
            assert got.items[3] == Unsubscribed("b", "forbidden", "")
            assert got.error is None and client.stats.connections == 1
            await conn0.close(1011, "restart")
            conn1 = await fake.connection(1)
            await client.wait_subscribed(10)
            assert [m["conv_id"] for m in conn1.messages("ws.subscribe")] == ["a"]


# ---- real gateways ------------------------------------------------------------------------------

async def test_real_gateway_a_3s_token_refreshed_keeps_one_connection_for_10s() -> None:
    async with InProcessGateway(Settings(auth_secret=SECRET)) as gw:
        client = client_for(gw.ws_url(), ["live"], get_token=lambda: mint_token(SECRET, sub="u1", ttl=3))
        async with following(client) as got:
            for i in range(50):
                await publish(gw, "live", 1, start=i)
                await asyncio.sleep(0.2)  # the publisher's pace over 10 s, not a wait for a condition
            await got.wait(lambda: len(got.events()) == 50, what="50 events")
            assert got.seqs() == list(range(1, 51))
            assert client.stats.connections == 1, client.stats
            assert client.stats.refreshes >= 3 and client.stats.refresh_failures == 0, client.stats
            assert got.error is None


async def test_real_gateway_get_token_failing_until_expiry_reconnects_once_and_resumes() -> None:
    first_exp: float | None = None

    def get_token() -> str:
        nonlocal first_exp
        if first_exp is None:
            token = mint_token(SECRET, sub="u1", ttl=3)
            first_exp = token_expiry(token)
            return token
        if time.time() < first_exp:
            raise RuntimeError("no token before the first expiry")
        return mint_token(SECRET, sub="u1", ttl=600)

    async with InProcessGateway(Settings(auth_secret=SECRET)) as gw:
        client = client_for(gw.ws_url(), ["resume"], get_token=get_token)
        async with following(client) as got:
            for i in range(40):
                await publish(gw, "resume", 1, start=i)
                await asyncio.sleep(0.15)  # the publisher's pace, past the first exp
            await got.wait(lambda: len(got.events()) == 40, what="40 events")
            assert first_exp is not None and time.time() > first_exp + 1
            assert got.seqs() == list(range(1, 41)) and client.stats.duplicates == 0
            assert client.stats.connections == 2 and client.stats.close_codes == [4401], client.stats
            assert client.stats.refresh_failures >= 1 and got.error is None


async def test_real_gateway_a_narrower_refresh_and_a_refused_subscribe_end_one_subscription() -> None:
    narrow = False

    def get_token() -> str:
        return mint_token(SECRET, sub="u1", convs=["keep"] if narrow else ["*"], ttl=3)

    async with InProcessGateway(Settings(auth_secret=SECRET)) as gw:
        client = client_for(gw.ws_url(), ["keep", "lose"], get_token=get_token)
        async with following(client) as got:
            narrow = True
            await got.wait(lambda: any(isinstance(i, Unsubscribed) for i in got.items), timeout=10,
                           what="the narrowed refresh")
            assert [i for i in got.items if isinstance(i, Unsubscribed)] == [Unsubscribed("lose", "forbidden")]
            await publish(gw, "lose", 1)
            await publish(gw, "keep", 1)
            await got.wait(lambda: got.seqs("keep") == [1], what="keep's event")
            await client.subscribe("other")
            await got.wait(lambda: len([i for i in got.items if isinstance(i, Unsubscribed)]) == 2, what="refusal")
            refused = got.items[-1]
            assert isinstance(refused, Unsubscribed) and (refused.conv_id, refused.reason) == ("other", "forbidden")
            assert got.seqs("lose") == [] and client.stats.connections == 1 and got.error is None


async def test_real_gateway_a_revoked_user_stops_the_client_even_with_get_token() -> None:
    calls = 0

    def get_token() -> str:
        nonlocal calls
        calls += 1
        return mint_token(SECRET, sub="banned", ttl=60)

    async with InProcessGateway(Settings(auth_secret=SECRET)) as gw:
        other = client_for(gw.ws_url(), ["rv"], get_token=lambda: mint_token(SECRET, sub="fine", ttl=60))
        client = client_for(gw.ws_url(), ["rv"], get_token=get_token)
        async with following(other) as kept, following(client) as got:
            async with AsyncProducer.from_url(gw.http_url) as producer:
                await producer.disconnect("banned", until=60)
            await async_wait_until(lambda: got.task.done(), timeout=10, message="the revoked client to stop")
            assert isinstance(got.error, ClientClosed) and got.error.code == 4403, got.error
            assert calls == 1 and client.stats.connections == 1  # no reconnect, no new token asked for
            await publish(gw, "rv", 1)
            await kept.wait(lambda: kept.seqs() == [1], what="the other user's event")
            assert other.stats.connections == 1



async def test_real_gateway_too_many_subscriptions_ends_that_subscription_only() -> None:
    async with InProcessGateway(Settings(auth_secret=SECRET, max_subscriptions=1)) as gw:
        client = client_for(gw.ws_url(), ["first", "second"], get_token=lambda: mint_token(SECRET, ttl=60))
        async with following(client) as got:
            await got.wait(lambda: any(isinstance(i, Unsubscribed) for i in got.items), what="the refusal")
            dropped = [i for i in got.items if isinstance(i, Unsubscribed)]
            assert [(u.conv_id, u.reason) for u in dropped] == [("second", "too_many_subscriptions")]
            await publish(gw, "first", 1)
            await got.wait(lambda: got.seqs("first") == [1], what="first's event")
            assert client.stats.connections == 1 and got.error is None
