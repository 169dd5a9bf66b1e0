"""``producers.client.BroadcasterClient`` against real gateways (uvicorn on free ports, real sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from broadcaster.envelope import PublishRequest
from gateway.auth import mint_token
from gateway.settings import Settings
from producers.client import BroadcasterClient, ClientClosed, Event, Item, Reset, State, _ws_url
from tests.support.gateway import InProcessGateway, free_port
from tests.support.polling import async_wait_until

pytestmark = pytest.mark.timeout(60)


class Collector:
    """Reads a client's items in a task, so a test can publish and check concurrently."""

    def __init__(self, client: BroadcasterClient) -> None:
        self.client = client
        self.items: list[Item] = []
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for item in self.client:
                self.items.append(item)
        except ClientClosed as exc:
            self.error = exc

    def events(self, conv: str | None = None) -> list[Event]:
        return [i for i in self.items if isinstance(i, Event) and (conv is None or i.conv_id == conv)]

    def seqs(self, conv: str | None = None) -> list[int]:
        return [e.seq for e in self.events(conv)]

    async def wait(self, condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.task.done() and not condition():
                raise AssertionError(f"client stopped ({self.error!r}) before {what}; items: {self.items[-3:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not met within {timeout}s; items: {self.items[-3:]}")
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def following(client: BroadcasterClient, timeout: float = 10.0, *,
                    wait_subscribed: bool = True) -> AsyncIterator[Collector]:
    """Start ``client``, wait until every conversation is subscribed (unless not ``wait_subscribed``), collect its
    items; close after."""
    async with client:
        collector = Collector(client)
        if wait_subscribed:
            await client.wait_subscribed(timeout)
        try:
            yield collector
        finally:
            await client.close()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(collector.task, 5)


async def publish(gw: InProcessGateway, conv: str, count: int, etype: str = "chat.msg", start: int = 0) -> None:
    await gw.gateway.backend.publish_many([PublishRequest(conv, etype, {"i": start + i}) for i in range(count)])


def close_all(gw: InProcessGateway, code: int) -> int:
    """Close every websocket of ``gw`` with ``code`` (server side); how many there were."""
    connections = list(gw.gateway.pool.connections.values())
    for conn in connections:
        conn.close(code, "test")
    return len(connections)


def test_urls_are_normalised() -> None:
    assert _ws_url("ws://h:1", "default") == "ws://h:1/ws"
    assert _ws_url("http://h:1/", "chat") == "ws://h:1/ws?profile=chat"
    assert _ws_url("https://h/ws?profile=x&a=b", "default") == "wss://h/ws?a=b"
    with pytest.raises(ValueError):
        _ws_url("redis://h:1", "default")
    with pytest.raises(ValueError):
        BroadcasterClient([], ["c"])
    with pytest.raises(ValueError):
        BroadcasterClient("ws://h:1", ["bad id"])


async def test_several_conversations_in_order_with_positions() -> None:
    async with InProcessGateway() as gw:
        await publish(gw, "a", 3)  # before the client: not delivered (it starts live)
        client = BroadcasterClient(gw.ws_url(), ["a", "b"])
        async with following(client) as got:
            epoch_a = (await gw.gateway.backend.head("a")).epoch
            assert client.position("a") == (epoch_a, 3)
            for i in range(50):
                await publish(gw, "a" if i % 2 else "b", 1, start=i)
            await got.wait(lambda: len(got.events()) == 50, what="50 events")
            assert got.seqs("a") == list(range(4, 29)) and got.seqs("b") == list(range(1, 26))
            first = got.events("b")[0]
            assert (first.type, first.data, first.key, first.conv_id) == ("chat.msg", {"i": 0}, None, "b")
            assert isinstance(first.ts, int) and first.id
            assert client.position("a") == (epoch_a, 28)
            assert client.stats.connections == 1 and client.stats.duplicates == 0
            assert client.stats.gateway_ids == [gw.gateway.gateway_id]
            # a burst is batched into multi-object frames; every object still comes out, in order
            await publish(gw, "a", 500)
            await got.wait(lambda: len(got.events("a")) == 525, what="burst")
            assert got.seqs("a") == list(range(4, 529))
            # unsubscribe: nothing more from b
            await client.unsubscribe("b")
            await publish(gw, "b", 3)
            await publish(gw, "a", 1)
            await got.wait(lambda: got.seqs("a")[-1] == 529, what="a after unsubscribing b")
            assert got.seqs("b") == list(range(1, 26))


@pytest.mark.parametrize("code", [1012, 1013, 4408, 4429, 1011])
async def test_reconnects_after_a_retryable_close_and_resumes_exactly(code: int) -> None:
    async with InProcessGateway() as gw:
        client = BroadcasterClient(gw.ws_url(), ["r"], backoff_initial=0.05)
        async with following(client) as got:
            await publish(gw, "r", 10)
            await got.wait(lambda: len(got.events()) == 10, what="first 10")
            assert close_all(gw, code) == 1
            await publish(gw, "r", 10, start=10)  # published while the client is away or coming back
            await got.wait(lambda: len(got.events()) == 20, what="20 after reconnecting")
            await publish(gw, "r", 5, start=20)
            await got.wait(lambda: len(got.events()) == 25, what="25")
            assert got.seqs() == list(range(1, 26))
            assert [e.data["i"] for e in got.events()] == list(range(25))
            assert client.stats.connections == 2 and client.stats.close_codes == [code]
            assert client.stats.duplicates == 0 and not [i for i in got.items if isinstance(i, Reset)]


async def test_fails_over_to_the_next_url_and_resumes_there(redis_url: str, key_prefix: str) -> None:
    dead = f"ws://127.0.0.1:{free_port()}/ws"  # nothing listens there
    settings = dict(redis_url=redis_url, key_prefix=key_prefix, history_ttl=600)
    async with InProcessGateway(Settings(**settings)) as one, InProcessGateway(Settings(**settings)) as two:
        client = BroadcasterClient([dead, one.ws_url(), two.ws_url()], ["f1", "f2"], start_at=0,
                                   backoff_initial=0.05)
        async with following(client) as got:
            assert client.stats.failed_attempts >= 1  # the dead URL first
            assert client.stats.gateway_ids == [one.gateway.gateway_id]
            for i in range(20):
                await publish(one, "f1" if i % 2 else "f2", 1, start=i)
            await got.wait(lambda: len(got.events()) == 20, what="20 via gateway one")
            close_all(one, 1012)  # draining: go elsewhere
            for i in range(20, 40):  # published through the other gateway while the client moves
                await publish(two, "f1" if i % 2 else "f2", 1, start=i)
            await got.wait(lambda: len(got.events()) == 40, what="40 after failing over")
            assert client.stats.gateway_ids == [one.gateway.gateway_id, two.gateway.gateway_id]
            assert got.seqs("f1") == list(range(1, 21)) and got.seqs("f2") == list(range(1, 21))
            assert client.stats.duplicates == 0


@pytest.mark.parametrize("query, code", [("profile", 4404), ("token", 4401), ("profile_not_allowed", 4403)])
async def test_stops_on_close_codes_a_retry_cannot_cure(query: str, code: int) -> None:
    # (A conversation the token does not allow ends that subscription only: tests/test_client_tokens.py.)
    secret = "s" * 32
    async with InProcessGateway(Settings(auth_secret=secret)) as gw:
        options: dict[str, Any] = {"token": mint_token(secret, convs=["allowed-*"])}
        conv = "allowed-1"
        if query == "profile":
            options["profile"] = "nope"
        elif query == "token":
            options["token"] = "not-a-jwt"
        else:
            options["profile"] = "debug"  # the token allows "default" only
        client = BroadcasterClient(gw.ws_url(), [conv], backoff_initial=0.05, **options)
        async with client:
            with pytest.raises(ClientClosed) as info:
                async with asyncio.timeout(10):
                    async for _ in client:
                        pass
            assert info.value.code == code
            with pytest.raises(ClientClosed):  # and it stays ended
                await client.get()
            # No second attempt can come: the connection loop itself has ended (not just been
            # quiet for a while).
            task = client._task
            assert task is not None
            await async_wait_until(task.done, timeout=10, message="the client's connection loop to end")
            assert not task.cancelled() and task.exception() is None
            assert client.stats.close_codes == [code]
            assert client.stats.connections + client.stats.failed_attempts <= 1  # no second attempt


async def test_token_and_types_and_profile_options() -> None:
    secret = "s" * 32
    async with InProcessGateway(Settings(auth_secret=secret)) as gw:
        token = mint_token(secret, profiles=["default", "debug"])
        narrowed = BroadcasterClient(gw.ws_url(), ["o"], token=token, types=["chat.*"])
        debug = BroadcasterClient(gw.ws_url(), ["o"], token=token, profile="debug")
        async with following(narrowed) as n, following(debug) as d:
            for etype in ("chat.msg", "tool.call", "debug.trace", "chat.msg"):
                await publish(gw, "o", 1, etype=etype)
            await d.wait(lambda: len(d.events()) == 4, what="debug sees all four")
            await n.wait(lambda: len(n.events()) == 2, what="chat.* only")
            assert [(e.seq, e.type) for e in n.events()] == [(1, "chat.msg"), (4, "chat.msg")]
            assert [e.type for e in d.events()] == ["chat.msg", "tool.call", "debug.trace", "chat.msg"]


async def test_resets_are_items_in_the_stream() -> None:
    async with InProcessGateway(Settings(history_size=10)) as gw:
        await publish(gw, "t", 30)
        head = await gw.gateway.backend.head("t")
        client = BroadcasterClient(gw.ws_url())
        await client.subscribe("t", since=2, epoch=head.epoch)  # older than the 10 kept
        await client.subscribe("e", since=2, epoch="0ld")  # another epoch
        async with following(client) as got:
            await publish(gw, "t", 1)
            await publish(gw, "e", 1)
            await got.wait(lambda: len(got.events()) == 2, what="live after the resets")
            e_epoch = (await gw.gateway.backend.head("e")).epoch
            assert got.items == [
                Reset("t", "history_truncated", head.epoch, 30),
                Reset("e", "epoch_changed", e_epoch, 0),
                got.events("t")[0], got.events("e")[0],
            ]
            assert got.seqs("t") == [31] and got.seqs("e") == [1]
            assert client.stats.resets == 2


async def test_hydrate_gives_the_state_first_and_resumes_with_since_afterwards() -> None:
    async with InProcessGateway() as gw:
        backend = gw.gateway.backend
        await backend.publish("h", "timeline.entity", {"v": 1}, key="e1")
        await backend.publish("h", "timeline.entity", {"v": 2}, key="e2")
        await backend.publish("h", "timeline.entity", {"v": 3}, key="e1")
        client = BroadcasterClient(gw.ws_url(), ["h"], hydrate=True)
        async with following(client) as got:
            await got.wait(lambda: bool(got.items), what="state")
            state = got.items[0]
            assert isinstance(state, State) and state.seq == 3
            assert {k: (v.seq, v.data) for k, v in state.entities.items()} == {"e1": (3, {"v": 3}), "e2": (2, {"v": 2})}
            await publish(gw, "h", 2)
            await got.wait(lambda: len(got.events()) == 2, what="live 4, 5")
            close_all(gw, 1012)
            await publish(gw, "h", 2)
            await got.wait(lambda: len(got.events()) == 4, what="6, 7 after reconnecting")
            assert got.seqs() == [4, 5, 6, 7]
            assert [type(i).__name__ for i in got.items] == ["State"] + ["Event"] * 4  # no second state


async def test_duplicates_from_the_wire_are_dropped_and_counted() -> None:
    async with InProcessGateway() as gw:
        client = BroadcasterClient(gw.ws_url(), ["d"])
        async with following(client) as got:
            await publish(gw, "d", 5)
            await got.wait(lambda: len(got.events()) == 5, what="5 events")
            # make the server replay 1..5 on the same connection, behind the client's back
            assert client._ws is not None
            await client._ws.send('{"type":"ws.subscribe","conv_id":"d","since":0}')
            await got.wait(lambda: client.stats.duplicates == 5, what="the replay of 1..5 dropped")
            await publish(gw, "d", 1)
            await got.wait(lambda: len(got.events()) == 6, what="event 6")
            assert got.seqs() == [1, 2, 3, 4, 5, 6]
            assert client.stats.duplicates == 5


async def test_backoff_grows_while_no_gateway_answers() -> None:
    port = free_port()
    client = BroadcasterClient(f"ws://127.0.0.1:{port}/ws", ["w"], backoff_initial=0.05, backoff_max=0.4)
    began = time.monotonic()
    async with client:
        # Count attempts, not seconds: wait for 12 failed attempts (a capped backoff gets there in
        # a few seconds, an uncapped one would not), then check they were spread out. The n-th
        # wait is uniform in [0, min(0.4, 0.05 * 2**n)]: the 11 waits between the 12 attempts
        # average ~1.95 s (sd ~0.35 s); without backoff they would take a few milliseconds. A
        # loaded box only makes them longer.
        await async_wait_until(lambda: client.stats.failed_attempts >= 12, timeout=30,
                               message="12 failed connection attempts")
        took = time.monotonic() - began
        assert took >= 0.6, f"{client.stats.failed_attempts} attempts in {took:.2f}s: no backoff"
        settings = Settings()
        settings.port = port
        gw = InProcessGateway(settings)
        gw.settings.port = port  # InProcessGateway picks a free port; take the one the client is dialling
        gw.server.config.port = port
        async with gw:
            await client.wait_subscribed(timeout=5)
            await publish(gw, "w", 1)
            item = await asyncio.wait_for(client.get(), 5)
            assert isinstance(item, Event) and item.seq == 1
