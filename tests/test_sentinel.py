"""Redis Sentinel (#15): ``redis+sentinel://`` URLs everywhere, and failovers with real processes.

The failover tests run a master, two replicas and three ``redis-server --sentinel``
processes on loopback (``tests.support.sentinel``: down-after 500 ms, failover-timeout
2 s), gateways as subprocesses, resuming clients and a producer. They print
``FAULT-MATRIX`` lines (``-s``): the figures quoted in docs/delivery.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence

import httpx
import pytest
import redis

from broadcaster.backends import backend_from_url, scripts
from broadcaster.backends.redis import RedisBackend
from broadcaster.backends.redis.clients import make_async_client
from broadcaster.backends.redis.topology import MasterSwitches, Topology
from broadcaster.envelope import PublishResult
from broadcaster.errors import NotReplicated, ValidationError
from broadcaster.urls import redact_url, url_addresses
from producers import AsyncProducer, Producer
from producers.client import Event, Reset
from tests.support.redis_server import RedisServer
from tests.support.sentinel import SentinelSetup
from tests.test_faults import CONVS, Fleet, Tally, fleet, gateways, poll, readyz

pytestmark = pytest.mark.timeout(120)


# --- URLs ----------------------------------------------------------------------------------------


def test_sentinel_urls_are_parsed() -> None:
    target = scripts.parse_redis_url("redis+sentinel://127.0.0.1:26379/mymaster/0")
    assert target.is_sentinel and not target.is_cluster
    assert target.sentinel_nodes == (("127.0.0.1", 26379),) and target.service_name == "mymaster" and target.db == 0
    target = scripts.parse_redis_url("rediss+sentinel://u:p%40ss@a,b:26380,[::1]:7/svc/3"
                                     "?sentinel_username=su&sentinel_password=sp&ssl_cert_reqs=none")
    assert target.sentinel_nodes == (("a", 26379), ("b", 26380), ("::1", 7))
    assert (target.service_name, target.db, target.tls) == ("svc", 3, True)
    assert target.master_options() == {"db": 3, "username": "u", "password": "p@ss", "ssl": True,
                                       "ssl_cert_reqs": "none"}
    assert target.sentinel_options() == {"username": "su", "password": "sp", "ssl": True, "ssl_cert_reqs": "none"}
    assert "p@ss" not in repr(target) and "p%40ss" not in repr(target) and "'sp'" not in repr(target)


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel://a:1", "names the master's service"),
    ("redis+sentinel://a:1/", "names the master's service"),
    ("redis+sentinel:///svc", "no sentinel"),
    ("redis+sentinel://a/svc/x", "bad database number"),
    ("redis+sentinel://a/svc?foo=1", "unknown query parameter 'foo'"),
    ("redis+sentinel://a/svc?ssl_cert_reqs=none", "needs TLS: use rediss+sentinel://"),
    ("redis+sentinel://a:port/svc", "bad port"),
])
def test_bad_sentinel_urls_are_refused(url: str, says: str) -> None:
    with pytest.raises(ValidationError, match="url") as caught:
        scripts.parse_redis_url(url)
    assert says in str(caught.value)


def test_sentinel_urls_are_redacted_and_spelled_out() -> None:
    url = "redis+sentinel://u:secret@a,b:26380/svc/0?sentinel_password=hush"
    assert redact_url(url) == "redis+sentinel://u:***@a,b:26380/svc/0?sentinel_password=***"
    assert url_addresses(url) == "a:26379,b:26380"


def test_every_entry_point_takes_a_sentinel_url() -> None:
    url = "redis+sentinel://127.0.0.1:1/mymaster/0"
    assert isinstance(backend_from_url(url), RedisBackend)  # the gateway's --redis-url
    Producer.from_url(url).close()  # connections open lazily
    AsyncProducer.from_url(url)
    with pytest.raises(ValidationError, match="wait_replicas"):
        Producer.from_url("redis+cluster://127.0.0.1:1", wait_replicas=1)


# --- against real sentinels ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinels() -> SentinelSetup:  # type: ignore[misc]
    with SentinelSetup(replicas=2) as setup:
        yield setup


def test_publish_history_and_wait_through_sentinel(sentinels: SentinelSetup, key_prefix: str) -> None:
    from tests.support.policy import load_library

    master = sentinels.master()
    sentinels.wait_replicas_online(2, 30.0, master)
    load_library(master.url, key_prefix)
    with Producer.from_url(sentinels.url, key_prefix=key_prefix, wait_replicas=2, wait_timeout_ms=2000) as p:
        first = p.publish("s1", "chat.msg", {"n": 1})
        assert p.publish("s1", "chat.msg", {"n": 2}).seq == first.seq + 1
        assert p.presence("s1").connections == 0
    with Producer.from_url(sentinels.url, key_prefix=key_prefix, wait_replicas=3, wait_timeout_ms=100) as p, \
            pytest.raises(NotReplicated, match=r"2 of the 3 replica\(s\)") as caught:
        p.publish("s1", "chat.msg", {"n": 3})
    assert caught.value.results and caught.value.acked == 2  # applied, never reported as a success

    async def read() -> None:
        backend = RedisBackend(sentinels.url, key_prefix=key_prefix)
        async with AsyncProducer.from_url(sentinels.url, key_prefix=key_prefix, wait_replicas=1) as ap:
            await ap.publish("s1", "chat.msg", {"n": 4})
        await backend.start()
        try:
            page = await backend.history("s1", 0)
            assert [e.seq for e in page.events] == [1, 2, 3, 4]
            assert (await backend.state("s1")).seq == 4
        finally:
            await backend.close()

    asyncio.run(read())


# --- failovers under load ------------------------------------------------------------------------


async def publish_acknowledged(producer: AsyncProducer, rounds: int, faults: dict[int, object],
                               acked: dict[str, list[PublishResult]], counts: dict[str, int]) -> None:
    """``rounds`` rounds of one event per conversation, each with an id of its own.

    A round the SDK could not get acknowledged (its retry budget spent, or NotReplicated)
    is published again with the same ids: a kept event comes back as a duplicate with
    its first seq, so each event is acknowledged once.
    """
    for r in range(rounds):
        batch = [(c, "chat.msg", {"r": r}, f"{c}-{r}") for c in CONVS]
        while True:
            counts["published"] += len(batch)
            try:
                results = await producer.publish_many(batch)
                break
            except NotReplicated:
                counts["not_replicated"] += 1
        for res in results:  # a duplicate: applied by a call that was not acknowledged (NotReplicated)
            acked[res.conv_id].append(res)
            counts["duplicates"] += res.duplicate
        fault = faults.get(r)
        if fault is not None:
            await fault()  # type: ignore[operator]
        await asyncio.sleep(0.004)


async def final_history(gateway_url: str) -> dict[str, list[tuple[int, str]]]:
    """Every conversation's kept events as (seq, id), read through a gateway."""
    out = {}
    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as http:
        for conv in CONVS:
            out[conv] = []
            while True:
                since = out[conv][-1][0] if out[conv] else 0
                reply = await http.get(f"/v1/conversations/{conv}/events", params={"since": since, "limit": 1000})
                assert reply.status_code == 200, reply.text
                events = reply.json()["events"]
                if not events:
                    break
                out[conv] += [(e["seq"], e["id"]) for e in events]
    return out


def tally_told(name: str, fl: Fleet, acked: dict[str, list[PublishResult]], history: dict[str, list[tuple[int, str]]],
               extra: str) -> Tally:
    """Every acknowledged event is kept; each client has every event, or was told to reload (ws.reset) and then has
    every event of the new epoch: its stream after its last reset is exactly the conversation's history."""
    tally = Tally(published=sum(len(r) for r in acked.values()))
    lost_acked = 0
    for conv, results in acked.items():
        kept = dict(history[conv])
        lost_acked += sum(1 for r in results if kept.get(r.seq) != r.id)
    for f in fl.followers:
        expected = [seq for seq, _ in history[f.conv]]
        segments: list[list[int]] = [[]]
        for item in f.items:
            if isinstance(item, Reset):
                segments.append([])
            elif isinstance(item, Event):
                segments[-1].append(item.seq)
        tally.add(expected, segments[-1], f)
        tally.resets += len(f.resets())
        for segment in segments[:-1]:  # before a reset: no gap, no duplicate, in order
            assert segment == list(range(1, len(segment) + 1)), f"{f.conv}: {segment[:5]}..."
        assert segments[-1] == expected, (f"{f.conv}: {f.client.stats}; missing "
                                          f"{sorted(set(expected) - set(segments[-1]))[:10]}; "
                                          f"extra {sorted(set(segments[-1]) - set(expected))[:10]}")
    tally.report(f"{name} ({extra}; acknowledged events lost: {lost_acked})")
    assert lost_acked == 0
    assert tally.lost == tally.duplicated == tally.reordered == 0
    return tally


@pytest.mark.slow
async def test_master_sigkilled_then_failed_back_under_load(key_prefix: str) -> None:
    """Master SIGKILLed mid-stream (a gateway SIGKILLed with it: its clients resume during the failover),
    then ``SENTINEL FAILOVER`` back: every acknowledged event reaches every client once, in order.

    The producer waits for both replicas (``wait_replicas=2``): without it, the manual
    failover loses about a second of acknowledged writes (the old master takes them,
    the replica that is not promoted acknowledges them, both resync from the new master).
    Every publish it could not get both replicas to confirm is retried with the same id.
    """
    with SentinelSetup(replicas=2) as setup, gateways(3, setup.url, key_prefix) as procs:
        urls = [p.http_url for p in procs]
        acked: dict[str, list[PublishResult]] = {c: [] for c in CONVS}
        counts = {"published": 0, "not_replicated": 0, "duplicates": 0}
        timings: dict[str, float] = {}
        unready: set[str] = set()

        async def watch_ready(stop: asyncio.Event) -> None:
            while not stop.is_set():
                for url in urls[1:]:
                    if await readyz(url) == 503:
                        unready.add(url)
                await asyncio.sleep(0.02)

        async def all_ready(gateway_urls: Sequence[str]) -> bool:
            return all([await readyz(u) == 200 for u in gateway_urls])

        background: list[asyncio.Task[None]] = []

        async def recovered(old: RedisServer, started: float, key: str, restart: bool = False) -> None:
            await asyncio.to_thread(setup.wait_master_change, old.port)
            timings[f"{key}_promoted"] = time.monotonic() - started
            if restart:  # only once replaced: restarted empty before that, it would still be the master
                await asyncio.to_thread(old.restart)  # the sentinels make it a replica of the new master
            await poll(lambda: all_ready(urls[1:]), 30, "gateways ready on the new master")
            timings[f"{key}_ready"] = time.monotonic() - started

        async def kill_master() -> None:  # the publisher goes on meanwhile: its calls retry
            old = setup.master()
            started = time.monotonic()
            await asyncio.gather(asyncio.to_thread(old.kill), asyncio.to_thread(procs[0].kill))
            background.append(asyncio.create_task(recovered(old, started, "kill", restart=True)))

        async def fail_back() -> None:
            await asyncio.gather(*background)
            new = setup.master()
            await asyncio.to_thread(setup.wait_replicas_online, 2, 30.0, new)
            started = time.monotonic()
            background.append(asyncio.create_task(recovered(new, started, "failback")))
            background.append(asyncio.create_task(asyncio.to_thread(setup.failover)))  # type: ignore[arg-type]

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_ready(stop))
        try:
            async with fleet([p.ws_url() for p in procs], per_conv=6) as fl, \
                    AsyncProducer.from_url(setup.url, key_prefix=key_prefix, retry_budget=30,
                                           wait_replicas=2, wait_timeout_ms=1000) as prod:
                await publish_acknowledged(prod, 450, {150: kill_master, 300: fail_back}, acked, counts)
                await asyncio.gather(*background)
                final = {c: res[-1].seq for c, res in acked.items()}
                await fl.wait_until(lambda f: bool(f.seqs()) and f.seqs()[-1] >= final[f.conv], 60,
                                    "the last acknowledged event")
                history = await final_history(urls[1])
                tally_told("sentinel-sigkill-master-and-fail-back", fl, acked, history,
                            f"sent {counts['published']}, not replicated {counts['not_replicated']} calls, "
                            f"SIGKILL: promoted after {timings['kill_promoted']:.2f}s, gateways ready after "
                            f"{timings['kill_ready']:.2f}s; fail-back: promoted after "
                            f"{timings['failback_promoted']:.2f}s, ready after {timings['failback_ready']:.2f}s")
                assert sorted(unready) == sorted(urls[1:]), "/readyz was 503 while there was no master"
                assert await all_ready(urls[1:])
                on_killed = [f for f in fl.followers if f.client.stats.connections > 1]
                assert on_killed, "the clients of the SIGKILLed gateway resumed elsewhere"
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


@pytest.mark.slow
async def test_history_that_went_back_is_a_new_epoch_not_a_silent_skip(key_prefix: str) -> None:
    """The replica misses acknowledged writes (SIGSTOPped, its link cut), the master is SIGKILLed, the replica promoted:
    the seq counter went back. Each client is reset (``epoch_changed``) and then gets the new epoch whole;
    the reissued seqs are never dropped as already delivered."""
    with SentinelSetup(replicas=1) as setup, gateways(2, setup.url, key_prefix) as procs:
        replica = setup.servers[1]
        assert replica.process is not None
        async with fleet([p.ws_url() for p in procs], per_conv=3) as fl, \
                AsyncProducer.from_url(setup.url, key_prefix=key_prefix, retry_budget=30) as prod:
            for r in range(20):
                await prod.publish_many([(c, "chat.msg", {"r": r}) for c in CONVS])
            await asyncio.to_thread(setup.wait_replicas_online, 1, 20.0)
            await fl.wait_until(lambda f: len(f.seqs()) >= 20, 30, "the first 20 events")
            old = setup.master()
            replica.process.send_signal(signal.SIGSTOP)
            try:
                with contextlib.closing(old.client()) as admin:  # the master drops its (frozen) replica
                    assert admin.execute_command("CLIENT", "KILL", "TYPE", "replica") == 1
                for r in range(20, 30):  # acknowledged by the master alone
                    await prod.publish_many([(c, "chat.msg", {"r": r}) for c in CONVS])
                await fl.wait_until(lambda f: len(f.seqs()) >= 30, 30, "the 10 events the replica misses")
                started = time.monotonic()
                await asyncio.to_thread(old.kill)
            finally:
                replica.process.send_signal(signal.SIGCONT)
            await asyncio.to_thread(setup.wait_master_change, old.port)
            promoted = time.monotonic() - started
            after = []
            for r in range(30, 45):  # seqs 21.. again, in the same epoch unless a gateway changed it first
                after += await prod.publish_many([(c, "chat.msg", {"r": r}) for c in CONVS])
            history = await final_history(procs[0].http_url)
            assert all(len(events) == 35 for events in history.values()), "20 kept + 15 after the failover"
            await fl.wait_until(lambda f: bool(f.resets()) and f.seqs()[-1:] == [35], 30, "a reset, then seq 35")
            tally = Tally(published=45 * len(CONVS))
            for f in fl.followers:
                resets = f.resets()
                assert len(resets) == 1 and resets[0].reason == "epoch_changed", f.client.stats
                cut = f.items.index(resets[0])
                before = [i.seq for i in f.items[:cut] if isinstance(i, Event)]
                now = [i.seq for i in f.items[cut + 1:] if isinstance(i, Event)]
                assert before[:30] == list(range(1, 31)) and before == list(range(1, len(before) + 1))
                assert now == list(range(1, 36)), f"{f.conv}: the new epoch whole, reissued seqs included"
                tally.add(list(range(1, 36)), now, f)
                tally.resets += 1
            tally.report(f"sentinel-history-went-back (10 acknowledged events per conversation lost with the "
                         f"master; promoted after {promoted:.2f}s; every client reset, then the new epoch 1..35)")
            ids = {c: {i for _, i in h} for c, h in history.items()}
            assert all(r.id in ids[r.conv_id] for r in after)


def test_compose_sentinel_override_is_valid_and_points_everyone_at_the_sentinels() -> None:
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    override = repo / "docker-compose.sentinel.yml"
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", str(override)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load(override.read_text())["services"]
    base = yaml.safe_load((repo / "docker-compose.yml").read_text())["services"]
    users = {name for name, s in base.items() if "BROADCASTER_REDIS_URL" in (s.get("environment") or {})}
    assert users == {"gateway1", "gateway2", "gateway3", "producer"}
    for name in users:
        url = services[name]["environment"]["BROADCASTER_REDIS_URL"]
        target = scripts.parse_redis_url(url)
        assert target.service_name == "mymaster"
        assert {h for h, _ in target.sentinel_nodes} == {"sentinel-1", "sentinel-2", "sentinel-3"} <= set(services)
    assert "--replicaof" in services["redis-replica"]["command"]
    assert "--min-replicas-to-write" in services["redis"]["command"]


async def test_a_demoted_master_is_left_for_the_new_one(sentinels: SentinelSetup, key_prefix: str) -> None:
    """``SENTINEL FAILOVER`` leaves the old master up, as a replica: the pub/sub link must move off it
    (the sentinels are asked every second), and both SDKs publish across the switch without an error."""
    from tests.support.policy import load_library

    load_library(sentinels.master().url, key_prefix)
    backend = RedisBackend(sentinels.url, key_prefix=key_prefix, probe_interval=30, retry_budget=20)
    await backend.start()
    got: list[int] = []
    try:
        await backend.subscribe("d1", lambda env: got.append(env.seq))
        old = sentinels.master()
        with contextlib.closing(old.client()) as c:
            assert len(ours(c)) == 1
        with Producer.from_url(sentinels.url, key_prefix=key_prefix, retry_budget=20) as sync_producer:
            assert sync_producer.publish("d1", "chat.msg", {"n": 1}).seq == 1
            await poll(lambda: _true(got == [1]), 10, "seq 1 live")
            started = time.monotonic()
            new = await asyncio.to_thread(sentinels.failover)
            assert new.port != old.port
            with contextlib.closing(new.client()) as c:
                await poll(lambda: _true(len(ours(c)) == 1), 10,
                           "the pub/sub link on the new master")
            moved = time.monotonic() - started
            with contextlib.closing(old.client()) as c:
                await poll(lambda: _true(c.execute_command("ROLE")[0] == b"slave"), 20, "the old master demoted")
                await poll(lambda: _true(not ours(c)), 10, "nothing left on the old master")
            assert sync_producer.publish("d1", "chat.msg", {"n": 2}).seq == 2
        async with AsyncProducer.from_url(sentinels.url, key_prefix=key_prefix) as async_producer:
            assert (await async_producer.publish("d1", "chat.msg", {"n": 3})).seq == 3
        await poll(lambda: _true(got == [1, 2, 3]), 10, "seqs 2 and 3 live from the new master")
        print(f"\npub/sub link on the new master {moved:.2f}s after SENTINEL FAILOVER was asked")
        # Asking the sentinels every second: about 3 s. Without it the link stays on the demoted master
        # until the sentinels' CLIENT KILL there, about 11 s (the live events of that time are lost to it).
        assert moved < 7.0
        assert backend.connected and backend.stats.reconnects >= 1
    finally:
        await backend.close()


async def _true(value: bool) -> bool:
    return value


async def _moved_from(topology: Topology, old: tuple[str, int] | None) -> bool:
    return await topology.master_address() != old


def _switch_listeners(setup: SentinelSetup) -> list[int]:
    """Per sentinel, its clients subscribed to a channel (CLIENT LIST: PUBSUB is no sentinel command)."""
    counts = []
    for sentinel in setup.sentinels:
        with contextlib.closing(sentinel.client()) as c:
            listed = c.execute_command("CLIENT", "LIST")
        text = listed.decode() if isinstance(listed, bytes) else str(listed)
        counts.append(sum(" sub=1 " in f" {line} " for line in text.splitlines()))
    return counts


async def test_the_sentinels_announce_a_switch_no_later_than_they_name_the_new_master(
        sentinels: SentinelSetup) -> None:
    """Topology.master_switches(): the +switch-master of a SENTINEL FAILOVER arrives with the new master's
    address, no later than SENTINEL MASTERS (what redis-py's master_address asks) names it on a client of
    its own, and from then on the topology's master_address (what the next connection asks) names it too."""
    assert Topology(make_async_client(scripts.parse_redis_url(sentinels.master().url))).master_switches() is None
    client = make_async_client(scripts.parse_redis_url(sentinels.url))
    other = make_async_client(scripts.parse_redis_url(sentinels.url))
    topology = Topology(client)
    switches = topology.master_switches()
    assert isinstance(switches, MasterSwitches)
    baseline = _switch_listeners(sentinels)
    try:
        async with switches:
            await poll(lambda: _true(all(now > before for now, before in
                                         zip(_switch_listeners(sentinels), baseline, strict=True))),
                       10, "a +switch-master listener on every sentinel")
            old = await topology.master_address()
            assert await switches.wait(0.05) is None
            started = time.monotonic()
            named: list[float] = []

            async def ask_sentinels() -> None:  # what the subscriber's poll would see, every 50 ms
                await poll(lambda: _moved_from(Topology(other), old), 30, "SENTINEL MASTERS naming another master")
                named.append(time.monotonic() - started)

            async def listen() -> tuple[tuple[str, int] | None, float]:
                announced = None
                while announced is None and time.monotonic() - started < 30:
                    announced = await switches.wait(0.05)
                return announced, time.monotonic() - started

            asking, listening = asyncio.create_task(ask_sentinels()), asyncio.create_task(listen())
            new = await asyncio.to_thread(sentinels.failover)
            announced, heard = await asyncio.wait_for(listening, 30)
            assert await topology.master_address() == announced, "the announcing sentinel is asked first"
            await asyncio.wait_for(asking, 30)
            assert announced == ("127.0.0.1", new.port) and announced != old
            print(f"\n+switch-master heard {heard:.2f}s after SENTINEL FAILOVER was asked; "
                  f"SENTINEL MASTERS named the new master after {named[0]:.2f}s")
            assert heard <= named[0] + 0.25
        assert _switch_listeners(sentinels) == baseline, "closed: no listener left on the sentinels"
    finally:
        await client.aclose()
        await other.aclose()


def ours(client: redis.Redis) -> list[dict[str, str]]:
    """The pub/sub connections on a server other than the sentinels' own (named ``sentinel-...``)."""
    return [c for c in client.client_list(_type="pubsub") if not c.get("name", "").startswith("sentinel")]


def test_gateway_publishes_wait_for_replicas(sentinels: SentinelSetup, key_prefix: str) -> None:
    """``--redis-wait-replicas``: an HTTP publish the replicas did not confirm is a 503, never a 200."""
    from tests.support.gateway import GatewayProcess

    sentinels.wait_replicas_online(2, 30.0, sentinels.master())  # after a failover, the old master resyncs
    for wanted, status in ((2, 200), (3, 503)):
        gw = GatewayProcess("--redis-url", sentinels.url, "--key-prefix", key_prefix, "--redis-wait-replicas",
                            str(wanted), "--redis-wait-timeout-ms", "200", "--log-level", "warning").start()
        try:
            reply = httpx.post(f"{gw.http_url}/v1/conversations/w{wanted}/events",
                               json={"type": "chat.msg", "data": {"n": 1}}, timeout=10)
            assert reply.status_code == status, reply.text
            if status == 503:
                assert f"of the {wanted} replica(s)" in reply.json()["message"]
        finally:
            gw.stop()
