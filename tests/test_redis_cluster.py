"""RedisBackend on a real 3-master Redis Cluster: sharded pub/sub, scripts per slot, per-node connections."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path

import orjson
import pytest
from redis.crc import key_slot

from broadcaster.backend import BackendSettings
from broadcaster.backends.redis import RedisBackend
from broadcaster.envelope import PublishRequest
from broadcaster.errors import BackendUnavailable
from broadcaster.hub import Hub
from broadcaster.keys import KeyLayout
from broadcaster.profiles import builtin_profiles
from tests.backend_suite import wait_for
from tests.support.redis_server import RedisClusterNodes, RedisServer, free_port
from tests.test_redis_backend import Inbox
from tests.test_redis_cluster_gateway import migrate_slot


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    with RedisClusterNodes(masters=3) as nodes:
        yield nodes


@pytest.fixture
async def backend(cluster: RedisClusterNodes) -> AsyncIterator[RedisBackend]:
    b = RedisBackend(cluster.url, key_prefix="t" + secrets.token_hex(4), settings=BackendSettings(unsubscribe_delay=0))
    await b.start()
    yield b
    await b.close()


def convs_per_node(cluster: RedisClusterNodes, layout: KeyLayout, per_node: int = 2) -> dict[int, list[str]]:
    """``per_node`` conversation ids living on each node (by port)."""
    found: dict[int, list[str]] = {n.port: [] for n in cluster.nodes}
    i = 0
    while any(len(v) < per_node for v in found.values()):
        conv = f"conv-{i}"
        node = cluster.node_for_slot(key_slot(layout.live(conv).encode()))
        if len(found[node.port]) < per_node:
            found[node.port].append(conv)
        i += 1
    return found


def shard_channels(node: RedisServer) -> set[bytes]:
    with contextlib.closing(node.client()) as c:
        return set(c.execute_command("PUBSUB", "SHARDCHANNELS"))


def test_every_key_of_a_conversation_shares_one_slot() -> None:
    layout = KeyLayout("bc")
    conv = "c-1"
    names = [layout.meta(conv), layout.log(conv), layout.live(conv), layout.state(conv), layout.state_order(conv),
             layout.idempotency(conv, "evt"), layout.presence(conv)]
    assert len({key_slot(n.encode()) for n in names}) == 1


async def test_publish_and_deliver_on_every_shard(cluster: RedisClusterNodes, backend: RedisBackend) -> None:
    by_node = convs_per_node(cluster, backend.layout)
    convs = [c for group in by_node.values() for c in group]
    inboxes = {conv: Inbox() for conv in convs}
    for conv, inbox in inboxes.items():
        await backend.subscribe(conv, inbox)
    # One cluster pipeline spanning all three shards, interleaved, then single publishes.
    results = await backend.publish_many([PublishRequest(conv, "t.x", i) for i in range(3) for conv in convs])
    assert [r.seq for r in results] == [i + 1 for i in range(3) for _ in convs]
    for conv in convs:
        await backend.publish(conv, "t.x", 3, key="k")
    await wait_for(lambda: all(i.seqs == [1, 2, 3, 4] for i in inboxes.values()), what="delivery on all shards")
    for conv, inbox in inboxes.items():
        assert [e.data for e in inbox.events] == [0, 1, 2, 3] and inbox.events[0].conv == conv
        page = await backend.history(conv, 1)
        assert [e.seq for e in page.events] == [2, 3, 4] and not page.truncated
        snap = await backend.state(conv)
        assert snap.seq == 4 and set(snap.entities) == {"k"}
    first = await backend.publish(convs[0], "t.x", 9, id="evt-once")
    duplicate = await backend.publish(convs[0], "t.x", 10, id="evt-once")
    assert not first.duplicate and first.seq == 5
    assert duplicate.duplicate and duplicate.seq == 5


async def test_only_channels_with_listeners_are_subscribed(cluster: RedisClusterNodes, backend: RedisBackend) -> None:
    by_node = convs_per_node(cluster, backend.layout)
    listened = {port: group[0] for port, group in by_node.items()}  # one of two per node
    inboxes = {conv: Inbox() for conv in listened.values()}
    for conv, inbox in inboxes.items():
        await backend.subscribe(conv, inbox)
    for node in cluster.nodes:
        ours = {ch for ch in shard_channels(node) if ch.startswith(backend.layout.prefix.encode())
                and ch.endswith(b":live")}  # not the control channel, wanted from start
        assert ours == {backend.layout.live(listened[node.port]).encode()}
    for group in by_node.values():
        for conv in group:
            await backend.publish(conv, "t.x", None)
    await wait_for(lambda: all(len(i.events) == 1 for i in inboxes.values()), what="delivery to listened channels")
    for conv, inbox in inboxes.items():
        await backend.unsubscribe(conv, inbox)

    def all_dropped() -> bool:
        return not any(ch.startswith(backend.layout.prefix.encode()) and ch.endswith(b":live")
                       for n in cluster.nodes for ch in shard_channels(n))

    await wait_for(all_dropped, what="channels dropped after the last listener left")


async def test_presence_across_shards(cluster: RedisClusterNodes, backend: RedisBackend) -> None:
    convs = [group[0] for group in convs_per_node(cluster, backend.layout, 1).values()]
    await backend.report_presence("gw-1", {conv: {"default": n + 1} for n, conv in enumerate(convs)}, ttl=30)
    assert [(await backend.presence(c)).connections for c in convs] == [1, 2, 3]


async def test_killed_shard_connection_reconnects(cluster: RedisClusterNodes, backend: RedisBackend) -> None:
    calls: list[int] = []

    async def on_reconnect() -> None:
        calls.append(1)

    backend.add_reconnect_callback(on_reconnect)
    by_node = convs_per_node(cluster, backend.layout, 1)
    inboxes = {group[0]: Inbox() for group in by_node.values()}
    for conv, inbox in inboxes.items():
        await backend.subscribe(conv, inbox)
    victim = cluster.nodes[1]
    with contextlib.closing(victim.client()) as c:
        assert c.client_kill_filter(_type="pubsub") >= 1
    await wait_for(lambda: len(calls) == 1 and backend.connected, what="reconnect after a shard link was killed")
    for conv in inboxes:
        await backend.publish(conv, "t.x", 1)
    await wait_for(lambda: all(len(i.events) == 1 for i in inboxes.values()), what="delivery after the reconnect")


# --- one shard at a time ----------------------------------------------------------


DEFAULT = builtin_profiles()["default"]


class Reports:
    """Reconnect and resubscribe callbacks of one backend, recorded."""

    def __init__(self, backend: RedisBackend) -> None:
        self.reconnects = 0
        self.resubscribed: list[str] = []
        backend.add_reconnect_callback(self.on_reconnect)
        backend.add_resubscribe_callback(self.on_resubscribed)

    async def on_reconnect(self) -> None:
        self.reconnects += 1

    async def on_resubscribed(self, convs: Collection[str] | None) -> None:
        assert convs is not None
        self.resubscribed += convs


class Sink:
    """A hub subscriber keeping the seqs of the events it is sent."""

    connection_id = "sink"

    def __init__(self) -> None:
        self.seqs: list[int] = []

    def send(self, data: bytes) -> None:
        obj = orjson.loads(data)
        if not obj["type"].startswith("ws."):
            self.seqs.append(obj["seq"])


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterNodes]:
    """A cluster of this test only (a master is killed): serves the covered slots when one is down."""
    with RedisClusterNodes(masters=3) as nodes:
        for node in nodes.nodes:
            with contextlib.closing(node.client()) as c:
                c.config_set("cluster-require-full-coverage", "no")
        yield nodes


async def test_a_dead_master_pauses_only_its_own_shard(own_cluster: RedisClusterNodes) -> None:
    """SIGKILL one master: the other shards go on delivering live, the backend stays connected and
    answers PING; when the master is back only its own conversations are resubscribed and repaired."""
    backend = RedisBackend(own_cluster.url, key_prefix="t" + secrets.token_hex(4),
                           settings=BackendSettings(unsubscribe_delay=0), retry_budget=3)
    await backend.start()
    try:
        reports = Reports(backend)
        hub = Hub(backend, gateway_id="g")
        by_node = convs_per_node(own_cluster, backend.layout, 1)
        victim = own_cluster.nodes[1]
        lost = by_node[victim.port][0]
        healthy = [group[0] for port, group in by_node.items() if port != victim.port]
        sinks = {conv: Sink() for group in by_node.values() for conv in group}
        for conv, sink in sinks.items():
            await hub.subscribe(sink, conv, DEFAULT)
            await backend.publish(conv, "t.x", 0)
        await wait_for(lambda: all(s.seqs == [1] for s in sinks.values()), what="delivery before the kill")

        victim.kill()
        await wait_for(lambda: backend.down_nodes == [victim.address], what="the victim's link is down")
        began = time.monotonic()
        for i in (1, 2):
            for conv in healthy:
                await backend.publish(conv, "t.x", i)
        await wait_for(lambda: all(sinks[c].seqs == [1, 2, 3] for c in healthy), timeout=3,
                       what="live delivery on the healthy shards while one master is dead")
        assert time.monotonic() - began < 3
        assert backend.connected and await backend.ping()  # readiness holds for the shards still up
        late = Sink()  # a conversation of a healthy shard subscribed while the victim is down
        await hub.subscribe(late, healthy[0], DEFAULT)
        fresh = next(c for c in (f"dead-{i}" for i in range(10_000))
                     if own_cluster.node_for_slot(key_slot(backend.layout.live(c).encode())) is victim)
        with pytest.raises(BackendUnavailable):  # the dead shard cannot confirm a new subscription
            await backend.subscribe(fresh, Inbox())
        await backend.publish(healthy[0], "t.x", 3)
        await wait_for(lambda: late.seqs == [4], what="a new subscription on a healthy shard")
        assert backend.stats.reconnects == 0 and reports.reconnects == 0 and reports.resubscribed == []

        victim.restart()  # same port and nodes.conf: it rejoins with its slots, data lost
        await wait_for(lambda: backend.down_nodes == [], timeout=20, what="the victim's link is back")
        await wait_for(lambda: reports.resubscribed == [lost], timeout=5, what="only the victim's conversation")
        assert reports.reconnects == 1 and backend.stats.reconnects == 1
        await wait_for(lambda: hub.stats.gap_repairs == 1, what="one repair, of the victim's feed only")
        # The victim restarted empty: its conversation starts over, the others go on.
        result = await backend.publish(lost, "t.x", 9)
        assert result.seq == 1
        for conv in healthy:
            await backend.publish(conv, "t.x", 4)
        await wait_for(lambda: sinks[healthy[0]].seqs == [1, 2, 3, 4, 5] and sinks[healthy[1]].seqs == [1, 2, 3, 4],
                       what="healthy shards")
        await wait_for(lambda: sinks[lost].seqs[-1:] == [1], what="the restarted shard delivers again")
        assert hub.stats.gap_repairs == 1
        await hub.close()
    finally:
        await backend.close()


async def test_a_moved_slot_resubscribes_only_its_channel(cluster: RedisClusterNodes, backend: RedisBackend) -> None:
    """Resharding moves one watched slot: Redis drops that one shard subscription; only it is subscribed
    again (on the new owner) and only its conversation is reported — no reconnect, nothing rebuilt."""
    reports = Reports(backend)
    by_node = convs_per_node(cluster, backend.layout, 2)
    src = cluster.nodes[0]
    moving, staying = by_node[src.port]
    others = [group[0] for port, group in by_node.items() if port != src.port]
    slot = key_slot(backend.layout.live(moving).encode())
    assert slot != key_slot(backend.layout.live(staying).encode())
    dst = cluster.nodes[1]
    inboxes = {conv: Inbox() for conv in (moving, staying, *others)}
    for conv, inbox in inboxes.items():
        await backend.subscribe(conv, inbox)
    subscribes_before = {n.port: n.command_calls("ssubscribe") for n in cluster.nodes}

    await asyncio.to_thread(migrate_slot, cluster, slot, src, dst)
    await wait_for(lambda: reports.resubscribed == [moving], what="the moved conversation is reported")
    assert backend.layout.live(moving).encode() in shard_channels(dst)
    assert backend.layout.live(moving).encode() not in shard_channels(src)
    assert backend.layout.live(staying).encode() in shard_channels(src)
    assert backend.stats.reconnects == 0 and reports.reconnects == 0 and backend.down_nodes == []
    # One SSUBSCRIBE on the new owner (and at most one refused on the old one): nothing else resubscribed.
    assert dst.command_calls("ssubscribe") - subscribes_before[dst.port] == 1
    third = next(n for n in cluster.nodes if n not in (src, dst))
    assert third.command_calls("ssubscribe") == subscribes_before[third.port]
    for conv in inboxes:
        await backend.publish(conv, "t.x", 1)
    await wait_for(lambda: all(len(i.events) == 1 for i in inboxes.values()), what="delivery after the move")
    assert reports.resubscribed == [moving]


async def test_a_stale_slot_map_follows_moved_without_a_reconnect(
    cluster: RedisClusterNodes, backend: RedisBackend
) -> None:
    """A slot moved before we subscribe (our slot map is stale): the SSUBSCRIBE answered MOVED is sent
    to the new owner; the connection is not counted as lost."""
    reports = Reports(backend)
    conv = f"stale-{secrets.token_hex(3)}"
    slot = key_slot(backend.layout.live(conv).encode())
    src = cluster.node_for_slot(slot)
    dst = next(n for n in cluster.nodes if n is not src)
    await asyncio.to_thread(migrate_slot, cluster, slot, src, dst)
    inbox = Inbox()
    await backend.subscribe(conv, inbox)
    assert backend.layout.live(conv).encode() in shard_channels(dst)
    await backend.publish(conv, "t.x", 1)
    await wait_for(lambda: len(inbox.events) == 1, what="delivery from the new owner")
    assert backend.stats.reconnects == 0 and reports.reconnects == 0 and reports.resubscribed == []


# --- TLS ---------------------------------------------------------------------------


def _self_signed(directory: Path) -> Path:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return directory


class TlsClusterNodes(RedisClusterNodes):
    """A cluster whose nodes also listen with TLS (``tls_ports``); the cluster bus runs over TLS too.

    With ``tls-cluster yes`` a node announces its TLS port to TLS clients (``CLUSTER SLOTS``) and its
    plain port to the others, so the helpers of :class:`RedisClusterNodes` keep working in plain text.
    """

    def __init__(self, certs: Path, masters: int = 3) -> None:
        super().__init__(masters)
        self.tls_ports = [free_port(with_bus=True) for _ in range(masters)]
        for node, port in zip(self.nodes, self.tls_ports, strict=True):
            node.extra_args += ["--tls-port", str(port), "--tls-cert-file", str(certs / "cert.pem"),
                                "--tls-key-file", str(certs / "key.pem"), "--tls-ca-cert-file", str(certs / "cert.pem"),
                                "--tls-auth-clients", "no", "--tls-cluster", "yes"]

    def tls_url(self, query: str) -> str:
        return "rediss+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.tls_ports) + "?" + query


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsClusterNodes, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    certs = _self_signed(tmp_path_factory.mktemp("tls"))
    try:
        nodes = TlsClusterNodes(certs).start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"redis-server without TLS support: {exc}")
        raise
    try:
        yield nodes, certs / "cert.pem"
    finally:
        nodes.cleanup()


async def test_tls_cluster_delivers_on_every_shard(tls_cluster: tuple[TlsClusterNodes, Path]) -> None:
    nodes, ca = tls_cluster
    backend = RedisBackend(nodes.tls_url(f"ssl_ca_certs={ca}"), key_prefix="t" + secrets.token_hex(4),
                           settings=BackendSettings(unsubscribe_delay=0))
    await backend.start()
    try:
        by_node = convs_per_node(nodes, backend.layout, 1)
        inboxes = {group[0]: Inbox() for group in by_node.values()}
        for conv, inbox in inboxes.items():
            await backend.subscribe(conv, inbox)
        for conv in inboxes:
            await backend.publish(conv, "t.x", {"tls": True})
        await wait_for(lambda: all(len(i.events) == 1 for i in inboxes.values()), what="delivery over TLS")
        for node in nodes.nodes:  # one sharded subscription per master, made over its TLS port
            mine = {ch for ch in shard_channels(node) if ch.startswith(backend.layout.prefix.encode())
                    and ch.endswith(b":live")}
            assert len(mine) == 1
        assert backend.connected and await backend.ping()
        await backend.report_presence("gw", {conv: {"default": 1} for conv in inboxes}, ttl=30)
        assert [(await backend.presence(c)).connections for c in inboxes] == [1, 1, 1]
    finally:
        await backend.close()


async def test_tls_cluster_refuses_what_it_cannot_verify(tls_cluster: tuple[TlsClusterNodes, Path]) -> None:
    nodes, _ = tls_cluster
    for url in (nodes.tls_url("ssl_cert_reqs=required"),  # self-signed, no CA given: not trusted
                "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in nodes.tls_ports)):  # plain text to TLS ports
        backend = RedisBackend(url, retry_budget=0.5)
        with pytest.raises(BackendUnavailable):
            await backend.start()
        await backend.close()
