"""Faults under load, with real processes: gateways and Redis killed, pub/sub cut, links frozen.

Each test streams events to many ``BroadcasterClient`` consumers, breaks something in
the middle of the stream, and then checks every client's stream exactly: the seqs of
its conversation, 1..N, once each, in order (or, when Redis lost everything, the old
epoch's prefix, one ``ws.reset`` ``epoch_changed`` and the new epoch's 1..M).

Each test prints a ``FAULT-MATRIX`` line (run with ``-s`` to see them): events
published, events per client, lost, duplicated, reordered - the numbers quoted in
docs/delivery.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from broadcaster.backend import BackendSettings
from broadcaster.backends.redis import RedisBackend
from broadcaster.envelope import PublishResult
from gateway.settings import Settings
from producers import AsyncProducer
from producers.client import BroadcasterClient, Event, Item, Reset
from tests.support.gateway import GatewayProcess, InProcessGateway, start_gateways
from tests.support.redis_server import RedisServer
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)


def proxy_to(redis_url: str) -> TcpProxy:
    """A TcpProxy in front of the Redis at ``redis_url``."""
    target = urlsplit(redis_url)
    return TcpProxy(target.port or 6379, target.hostname or "127.0.0.1")

CONVS = [f"f{i}" for i in range(5)]
HISTORY = ("--history-size", "5000", "--history-ttl", "600")


# --- load: a fleet of resuming clients and a paced publisher -----------------------------------


@dataclass
class Follower:
    """One client following one conversation from seq 1, and what it handed out."""

    conv: str
    client: BroadcasterClient
    items: list[Item] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def read(self) -> None:
        async for item in self.client:
            self.items.append(item)

    def seqs(self) -> list[int]:
        return [i.seq for i in self.items if isinstance(i, Event)]

    def resets(self) -> list[Reset]:
        return [i for i in self.items if isinstance(i, Reset)]


class Fleet:
    """``per_conv`` clients per conversation, spread over ``urls`` (client i starts at URL i)."""

    def __init__(self, urls: Sequence[str], convs: Sequence[str], per_conv: int) -> None:
        self.followers = []
        for i in range(len(convs) * per_conv):
            client = BroadcasterClient(urls, start_at=i, backoff_initial=0.05, backoff_max=1.0, ping_interval=5,
                                       ping_timeout=5)
            self.followers.append(Follower(convs[i % len(convs)], client))

    async def start(self, timeout: float = 30) -> None:
        for f in self.followers:
            await f.client.subscribe(f.conv, since=0)  # everything from seq 1, whenever it connects
            await f.client.start()
            f.task = asyncio.create_task(f.read())
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(f.client.wait_subscribed() for f in self.followers))

    async def wait_until(self, done: Callable[[Follower], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            pending = [f for f in self.followers if not done(f)]
            if not pending:
                return
            if time.monotonic() > deadline:
                f = pending[0]
                raise AssertionError(f"{len(pending)} client(s) short of {what} after {timeout}s; e.g. {f.conv}: "
                                     f"{len(f.seqs())} events, last {f.seqs()[-3:]}, stats {f.client.stats}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for f in self.followers:
            await f.client.close()
        for f in self.followers:
            if f.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(f.task, 5)


@contextlib.asynccontextmanager
async def fleet(urls: Sequence[str], per_conv: int) -> AsyncIterator[Fleet]:
    made = Fleet(urls, CONVS, per_conv)
    try:
        await made.start()
        yield made
    finally:
        await made.close()


Fault = Callable[[], Awaitable[list[PublishResult] | None]]


async def stream(producer: AsyncProducer, rounds: int, *, pace: float = 0.004,
                 at: dict[int, Fault] | None = None) -> dict[str, list[PublishResult]]:
    """Publish ``rounds`` rounds of one event per conversation (one pipelined call each round).

    ``at[r]`` runs (awaited) right after round ``r`` - the fault; what it publishes
    itself, it returns. A publish that fails is retried by the SDK with the same ids;
    the results say what each event became.
    """
    results: dict[str, list[PublishResult]] = {c: [] for c in CONVS}
    started = time.monotonic()
    for r in range(rounds):
        for res in await producer.publish_many([(c, "chat.msg", {"r": r}) for c in CONVS]):
            results[res.conv_id].append(res)
        if at and r in at:
            for res in await at[r]() or []:
                results[res.conv_id].append(res)
        await asyncio.sleep(pace)
    print(f"\nstream of {rounds * len(CONVS)} events took {time.monotonic() - started:.1f}s")
    return results


@dataclass
class Tally:
    """The fault-matrix numbers of one test."""

    published: int = 0
    per_client: set[int] = field(default_factory=set)
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    wire_duplicates: int = 0
    reconnects: int = 0
    resets: int = 0

    def add(self, expected: Sequence[int], got: Sequence[int], follower: Follower) -> None:
        self.per_client.add(len(got))
        self.lost += len(set(expected) - set(got))
        self.duplicated += len(got) - len(set(got))
        self.reordered += sum(1 for a, b in itertools.pairwise(got) if b < a)
        self.wire_duplicates += follower.client.stats.duplicates
        self.reconnects += max(0, follower.client.stats.connections - 1)

    def report(self, name: str) -> None:
        print(f"\nFAULT-MATRIX {name}: published={self.published} per_client={sorted(self.per_client)} "
              f"lost={self.lost} duplicated={self.duplicated} reordered={self.reordered} "
              f"wire_duplicates_dropped_by_client={self.wire_duplicates} reconnects={self.reconnects} "
              f"resets={self.resets}")


def check_exact(name: str, fl: Fleet, results: dict[str, list[PublishResult]]) -> Tally:
    """Every client got exactly 1..N of its conversation, no reset; prints and returns the tally."""
    tally = Tally(published=sum(len(r) for r in results.values()))
    for f in fl.followers:
        n = results[f.conv][-1].seq
        tally.add(range(1, n + 1), f.seqs(), f)
        tally.resets += len(f.resets())
    tally.report(name)
    for f in fl.followers:
        n = results[f.conv][-1].seq
        assert f.seqs() == list(range(1, n + 1)), f"{f.conv}: {f.client.stats}"
        assert not f.resets()
    assert tally.lost == tally.duplicated == tally.reordered == 0
    return tally


def final_seqs(results: dict[str, list[PublishResult]]) -> dict[str, int]:
    return {conv: res[-1].seq for conv, res in results.items()}


def reached(final: dict[str, int]) -> Callable[[Follower], bool]:
    return lambda f: bool(f.seqs()) and f.seqs()[-1] >= final[f.conv]


async def poll(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll an async condition; the seconds it took. AssertionError at the deadline."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def readyz(url: str) -> int:
    try:
        async with httpx.AsyncClient() as http:
            return (await http.get(url + "/readyz", timeout=2)).status_code
    except httpx.HTTPError:
        return 0


@contextlib.contextmanager
def gateways(count: int, redis_url: str, key_prefix: str) -> Any:
    procs = start_gateways(count, "--redis-url", redis_url, "--key-prefix", key_prefix, *HISTORY,
                           "--log-level", "warning")
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


# --- gateways -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_sigkill_one_of_three_gateways_mid_stream(redis_url: str, key_prefix: str) -> None:
    """5,000 events over 5 conversations to 60 clients; one gateway SIGKILLed a third of the way."""
    with gateways(3, redis_url, key_prefix) as procs:
        victim: GatewayProcess = procs[0]
        async with fleet([p.ws_url() for p in procs], per_conv=12) as fl, \
                AsyncProducer.from_url(redis_url, key_prefix=key_prefix) as prod:
            on_victim = [f for f in fl.followers if f.client.url == victim.ws_url()]
            assert len(on_victim) == 20

            async def kill() -> None:
                await asyncio.to_thread(victim.kill)
                return None

            results = await stream(prod, 1000, at={330: kill})
            final = final_seqs(results)
            assert final == {c: 1000 for c in CONVS}
            await fl.wait_until(reached(final), timeout=60, what="the last event")
            check_exact("sigkill-gateway", fl, results)
            for f in on_victim:
                assert f.client.stats.close_codes == [1006]
                assert f.client.stats.connections == 2 and f.client.url != victim.ws_url()
            others = [f for f in fl.followers if f not in on_victim]
            assert all(f.client.stats.connections == 1 for f in others)


# --- Redis ----------------------------------------------------------------------------------


async def redis_outage(server: RedisServer, gateway_urls: Sequence[str]) -> Fault:
    """A fault that SIGKILLs ``server``, waits until every gateway reports 503, and restarts it in the background."""
    restarted: list[asyncio.Task[Any]] = []

    async def fault() -> None:
        await asyncio.to_thread(server.kill)
        for url in gateway_urls:
            await poll(lambda url=url: _is(readyz(url), 503), 20, f"{url}/readyz 503 while Redis is down")
        restarted.append(asyncio.create_task(asyncio.to_thread(server.restart)))
        return None

    return fault


async def _is(status: Awaitable[int], want: int) -> bool:
    return await status == want


@pytest.mark.slow
async def test_redis_sigkilled_and_restarted_with_appendonly_mid_stream(key_prefix: str) -> None:
    with RedisServer(appendonly=True) as server, gateways(2, server.url, key_prefix) as procs:
        urls = [p.http_url for p in procs]
        async with fleet([p.ws_url() for p in procs], per_conv=6) as fl, \
                AsyncProducer.from_url(server.url, key_prefix=key_prefix, retry_budget=30) as prod:
            fault = await redis_outage(server, urls)
            results = await stream(prod, 500, at={150: fault})
            assert len({r.epoch for res in results.values() for r in res}) == len(CONVS), "no epoch changed"
            final = final_seqs(results)
            assert final == {c: 500 for c in CONVS}
            await fl.wait_until(reached(final), timeout=60, what="the last event")
            check_exact("redis-restart-appendonly", fl, results)
            assert all(f.client.stats.connections == 1 for f in fl.followers), "clients never noticed"
            for url in urls:
                assert await readyz(url) == 200


@pytest.mark.slow
async def test_redis_restarted_empty_mid_stream_resets_to_the_new_epoch(key_prefix: str) -> None:
    with RedisServer(appendonly=False) as server, gateways(2, server.url, key_prefix) as procs:
        urls = [p.http_url for p in procs]
        async with fleet([p.ws_url() for p in procs], per_conv=6) as fl, \
                AsyncProducer.from_url(server.url, key_prefix=key_prefix, retry_budget=30) as prod:
            fault = await redis_outage(server, urls)
            results = await stream(prod, 500, at={150: fault})
            epochs = {c: list(dict.fromkeys(r.epoch for r in res)) for c, res in results.items()}
            assert all(len(e) == 2 for e in epochs.values()), "per conversation: one epoch before, one after"
            new = {c: e[1] for c, e in epochs.items()}
            final = final_seqs(results)
            old_last = {c: max(r.seq for r in res if r.epoch == epochs[c][0]) for c, res in results.items()}
            assert all(r.epoch == new[c] for c, res in results.items() for r in res[151:])
            await fl.wait_until(reached(final), timeout=60, what="the last event of the new epoch")

            tally = Tally(published=sum(len(r) for r in results.values()))
            for f in fl.followers:
                resets = f.resets()
                assert resets == [Reset(f.conv, "epoch_changed", new[f.conv], 0)], f.client.stats
                cut = f.items.index(resets[0])
                before = [i.seq for i in f.items[:cut] if isinstance(i, Event)]
                after = [i.seq for i in f.items[cut + 1:] if isinstance(i, Event)]
                assert before == list(range(1, len(before) + 1)) and len(before) <= old_last[f.conv]
                assert after == list(range(1, final[f.conv] + 1))
                tally.add(list(range(1, old_last[f.conv] + 1)), before, f)
                tally.add(list(range(1, final[f.conv] + 1)), after, f)
                tally.resets += 1
            tally.per_client = {len(f.seqs()) for f in fl.followers}
            tally.report(f"redis-restart-empty (old epoch published up to {sorted(set(old_last.values()))}, "
                         f"new epoch 1..{sorted(set(final.values()))})")
            assert tally.duplicated == tally.reordered == 0
            assert all(f.client.stats.connections == 1 for f in fl.followers), "clients stayed connected"


@pytest.mark.slow
async def test_pubsub_connections_killed_mid_stream(key_prefix: str) -> None:
    with RedisServer() as server, gateways(2, server.url, key_prefix) as procs:
        admin = server.client()
        try:
            async with fleet([p.ws_url() for p in procs], per_conv=6) as fl, \
                    AsyncProducer.from_url(server.url, key_prefix=key_prefix) as prod:
                before = {c["id"] for c in admin.client_list(_type="pubsub")}
                assert len(before) == 2, "one pub/sub connection per gateway"

                async def kill_pubsub() -> None:
                    killed = await asyncio.to_thread(admin.execute_command, "CLIENT", "KILL", "TYPE", "pubsub")
                    assert killed == 2
                    return None

                async def kill_pubsub_then_publish() -> list[PublishResult]:
                    # The last round goes out while no gateway is subscribed, and nothing follows it:
                    # only the repair the gateways run after resubscribing can deliver it.
                    await kill_pubsub()
                    return await prod.publish_many([(c, "chat.msg", {"r": "last"}) for c in CONVS])

                results = await stream(prod, 500, at={150: kill_pubsub, 300: kill_pubsub,
                                                      499: kill_pubsub_then_publish})
                assert final_seqs(results) == {c: 501 for c in CONVS}
                final = final_seqs(results)
                await fl.wait_until(reached(final), timeout=60, what="the last event")
                check_exact("client-kill-pubsub", fl, results)
                after = {c["id"] for c in admin.client_list(_type="pubsub")}
                assert len(after) == 2 and not after & before, "both gateways reconnected their pub/sub"
                assert all(f.client.stats.connections == 1 for f in fl.followers), "clients never noticed"
        finally:
            admin.close()


@pytest.mark.slow
async def test_frozen_redis_link_is_noticed_by_the_idle_probe_and_recovered(redis_url: str,
                                                                           key_prefix: str) -> None:
    """The link between a gateway and Redis goes silent (no FIN, no RST); the probe notices, the gateway recovers."""
    interval, timeout = 0.5, 0.5
    with proxy_to(redis_url) as proxy:
        backend = RedisBackend(proxy.url, key_prefix=key_prefix, probe_interval=interval, probe_timeout=timeout,
                               retry_budget=2.0, settings=BackendSettings(history_size=5000, history_ttl=600))
        async with InProcessGateway(Settings(key_prefix=key_prefix), backend=backend) as gw, \
                fleet([gw.ws_url()], per_conv=4) as fl, \
                AsyncProducer.from_url(redis_url, key_prefix=key_prefix) as prod:
            noticed: list[float] = []

            async def freeze() -> list[PublishResult]:
                proxy.pause()
                took = await poll(lambda: _false(backend.connected), interval + timeout + 2.0,
                                  "the probe noticing the silent link")
                noticed.append(took)
                async with httpx.AsyncClient(base_url=gw.http_url) as http:
                    ready = await http.get("/readyz")
                assert (ready.status_code, ready.json()["reason"]) == (503, "backend disconnected")
                published: list[PublishResult] = []
                # The publisher goes on meanwhile, for 30 rounds (a count, not a time span: a slow box
                # publishes the same events, later); the link stays down throughout.
                for _ in range(30):
                    await asyncio.sleep(0.05)  # the publisher's pace
                    assert not backend.connected
                    published += await prod.publish_many([(c, "chat.msg", {"frozen": True}) for c in CONVS])
                proxy.resume()
                return published

            results = await stream(prod, 300, at={100: freeze})
            final = final_seqs(results)
            assert all(n > 300 for n in final.values())
            await fl.wait_until(reached(final), timeout=30, what="the last event")
            for f in fl.followers:
                assert f.seqs()[-1] == final[f.conv]
            tally = Tally(published=sum(len(r) for r in results.values()))
            for f in fl.followers:
                tally.add(range(1, final[f.conv] + 1), f.seqs(), f)
            tally.report(f"frozen-redis-link (noticed after {noticed[0]:.2f}s)")
            for f in fl.followers:
                assert f.seqs() == list(range(1, final[f.conv] + 1))
                assert f.client.stats.connections == 1 and not f.resets()
            assert noticed[0] <= interval + timeout + 1.0
            assert backend.stats.reconnects >= 1 and backend.connected


async def _false(value: bool) -> bool:
    return not value


# --- producers ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_producer_retry_after_a_timeout_publishes_once(redis_url: str, key_prefix: str) -> None:
    """The publish is applied but its reply never comes back: the SDK times out, retries with the
    same id, and gets the first seq back as a duplicate. One event in history, one delivery."""
    settings = Settings(redis_url=redis_url, key_prefix=key_prefix, history_ttl=600)
    with proxy_to(redis_url) as proxy:
        async with InProcessGateway(settings) as gw, \
                AsyncProducer.from_url(proxy.url, key_prefix=key_prefix) as prod:
            client = BroadcasterClient(gw.ws_url(), ["once"])
            follower = Follower("once", client)
            await client.start()
            follower.task = asyncio.create_task(follower.read())
            await client.wait_subscribed(10)
            await prod.publish("once", "chat.msg", {"n": 0})  # opens the producer's connection
            proxy.pause(upstream=False, drop=True)  # requests reach Redis; replies are lost
            started = time.monotonic()
            publishing = asyncio.create_task(prod.publish("once", "chat.msg", {"n": 1}, id="order-42"))
            head = gw.gateway.backend.head
            await poll(lambda: _is_seq(head("once"), 2), 15, "the publish applied in Redis")
            proxy.resume()  # the retry goes through; the first reply is gone for good
            result = await asyncio.wait_for(publishing, 30)
            took = time.monotonic() - started
            assert result.duplicate and result.seq == 2 and result.id == "order-42"
            assert took >= 4.0, "the first attempt timed out (redis socket timeout) before the retry"
            await prod.publish("once", "chat.msg", {"n": 2})
            await poll(lambda: _true(len(follower.seqs()) >= 3), 10, "three events")
            history = await gw.gateway.backend.history("once", 0)
            assert [(e.seq, e.id == "order-42") for e in history.events] == [(1, False), (2, True), (3, False)]
            assert follower.seqs() == [1, 2, 3]
            print(f"\nFAULT-MATRIX producer-timeout-retry: published=3 (one retried after {took:.1f}s) "
                  f"per_client=[{len(follower.seqs())}] lost=0 duplicated={client.stats.duplicates} reordered=0")
            await client.close()


async def _is_seq(head: Awaitable[Any], seq: int) -> bool:
    return int((await head).seq) == seq


async def _true(value: bool) -> bool:
    return value
