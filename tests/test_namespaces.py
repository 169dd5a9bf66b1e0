"""Namespaces (#14): retention and limits set once, on the gateways, for every producer.

Real Redis (the shared one with a random key prefix, or an own redis-server / cluster),
real gateways (in-process uvicorn, or ``broadcaster-gateway`` subprocesses), real
websocket clients, and every producer path: the HTTP API, the SDK straight to Redis
(sync and async), ``broadcaster-publish --url redis://``, the README's raw FCALL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis

from broadcaster.backend import BackendSettings
from broadcaster.backends import scripts
from broadcaster.backends.memory import MemoryBackend
from broadcaster.backends.redis import RedisBackend
from broadcaster.errors import BackendUnavailable, PayloadTooLarge
from broadcaster.namespaces import compile_glob, load_namespaces, parse_namespaces
from gateway.settings import Settings
from gateway.state import Gateway, StartupError
from producers import AsyncProducer, Producer
from tests.support.gateway import GatewayProcess, InProcessGateway
from tests.support.policy import drop_library
from tests.support.redis_server import RedisClusterNodes, RedisServer
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

ISSUE_FILE = """\
[namespaces."support-*"]
history_size = 200
history_ttl = 3600
state_max_entries = 500

[namespaces."bulk-*"]
history_size = 50
max_data_bytes = 16384
"""


def wait_for(probe: Callable[[], T], timeout: float, message: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {message}"
        time.sleep(0.05)


async def async_wait_for(probe: Callable[[], Awaitable[T]], timeout: float, message: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {message}"
        await asyncio.sleep(0.05)


@pytest.fixture
def prefix(redis_url: str, key_prefix: str) -> Iterator[str]:
    """A key prefix of this test; its keys and function library are removed afterwards."""
    yield key_prefix
    with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
        keys = list(client.scan_iter(match=f"{key_prefix}:*"))
        if keys:
            client.delete(*keys)
    drop_library(redis_url, key_prefix)


def namespaces_file(tmp_path: Path, text: str, name: str = "namespaces.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def redis_settings(redis_url: str, prefix: str, **options: Any) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=prefix, **options)


# --- the file: parsed, compiled, refused with the file, table and field named --------------------------


@pytest.mark.parametrize(("text", "message"), [
    ('[namespaces."a-*"]\nhistory_sise = 5\n', r'\[namespaces\."a-\*"\]: unknown field \'history_sise\''),
    ('[namespaces."a-*"]\nhistory_size = 0\n', r'\[namespaces\."a-\*"\]: history_size must be a positive integer'),
    ('[namespaces."a-*"]\nhistory_ttl = "1h"\n', r"history_ttl must be a positive integer, not '1h'"),
    ('[namespaces."a-*"]\nhistory_size = true\n', r"history_size must be a positive integer"),
    ('[namespaces."a b"]\nhistory_size = 5\n', r'\[namespaces\."a b"\]: bad glob'),
    ('[namespaces."a-[z-a]"]\nhistory_size = 5\n', r"bad glob: range z-a"),
    ('[namespaces."a-[xy"]\nhistory_size = 5\n', r"bad glob: '\[' at 2 is not closed"),
    ('[namespace."a-*"]\nhistory_size = 5\n', r"unknown top-level key\(s\) \['namespace'\]"),
    ('[namespaces."a-*"\nhistory_size = 5\n', r"not valid TOML"),
])
def test_a_bad_file_is_refused_at_start_naming_file_table_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = namespaces_file(tmp_path, text)
    with pytest.raises(StartupError, match=message) as caught:
        Gateway(Settings(namespaces=path))
    assert path in str(caught.value)


def test_the_gateway_cli_refuses_a_bad_file_and_takes_the_env_variable(tmp_path: Path) -> None:
    path = namespaces_file(tmp_path, '[namespaces."a-*"]\nmax_data_bytez = 5\n')
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "--port", "1"], capture_output=True, text=True,
                          timeout=60, env={"BROADCASTER_NAMESPACES": path, "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert path in done.stderr and "max_data_bytez" in done.stderr


GLOB_CASES = [
    ("support-*", ["support-1", "support-", "support-a.b:c"], ["support", "xsupport-1", "Support-1"]),
    ("a.b", ["a.b"], ["axb", "a.bc"]),
    ("conv-??", ["conv-12", "conv-ab"], ["conv-1", "conv-123"]),
    ("t[0-9]x", ["t5x"], ["tax", "t55x"]),
    ("t[!0-9]x", ["tax", "t-x"], ["t5x"]),
    ("[a-c.]*", ["a1", "c", ".x"], ["d1", "-a"]),
    ("x-[-.]-*", ["x---", "x-.-y"], ["x-a-y"]),
    ("*:debug", ["svc:debug", ":debug"], ["svc:debugx", "svc.debug"]),
]


def test_globs_match_alike_in_lua_and_python(redis_url: str, prefix: str) -> None:
    """Each glob compiles to a Lua pattern (the publish function) and a regex (memory backend, gateway)."""
    with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
        for glob, matching, other in GLOB_CASES:
            lua, regex = compile_glob(glob)
            for conv in matching + other:
                in_lua = client.eval("return string.find(ARGV[1], ARGV[2]) and 1 or 0", 0, conv, lua) == 1
                in_python = re.match(regex, conv) is not None
                assert in_lua == in_python == (conv in matching), (glob, conv, lua)
    assert compile_glob("support-*")[0] == "^support%-.*$"
    # and in the library: first match in file order wins, on the server as in the process
    namespaces = tuple(parse_namespaces(tomllib.loads(
        "".join(f'[namespaces."{glob}"]\nhistory_size = {i + 1}\n' for i, (glob, _, _) in enumerate(GLOB_CASES)))))
    table = BackendSettings(namespaces=namespaces).policy_table()
    library = scripts.build_library(prefix, table)
    with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
        client.function_load(library.code, replace=True)
        for conv in [c for _, matching, other in GLOB_CASES for c in matching + other]:
            reply = client.fcall_ro(library.policy_function, 1, f"{prefix}:{{{conv}}}:meta", conv)
            assert (reply[1].decode(), reply[2]) == (table.resolve(conv).namespace,
                                                     table.resolve(conv).policy.history_size), conv


# --- the issue's scenario: a gateway with --history-size 100, an SDK with no options ------------------


def test_sdk_without_options_gets_the_gateways_history_size(redis_url: str, prefix: str) -> None:
    """Before: the SDK's 1000 won and a resume from seq 5 after 300 events was answered in full."""
    with GatewayProcess("--redis-url", redis_url, "--key-prefix", prefix, "--history-size", "100") as gw:
        with Producer.from_url(redis_url, key_prefix=prefix) as producer:
            results = producer.publish_many([("story", "chat.msg", {"i": i}) for i in range(300)])
        assert results[-1].seq == 300
        epoch = results[-1].epoch

        async def resume() -> dict[str, Any]:
            client = await WsClient.connect(gw.ws_url(f"conv_id=story&since=5&epoch={epoch}"))
            await client.expect("ws.subscribed")
            reset = await client.expect("ws.reset")
            await client.close()
            return reset

        reset = asyncio.run(resume())
        assert (reset["reason"], reset["seq"], reset["epoch"]) == ("history_truncated", 300, epoch)
        page = httpx.get(f"{gw.http_url}/v1/conversations/story/events?since=0&limit=1000").json()
        assert page["truncated"] and 100 <= len(page["events"]) <= 200  # XTRIM MAXLEN ~ 100: whole stream nodes
        policy = httpx.get(f"{gw.http_url}/v1/conversations/story/policy").json()
        assert policy["namespace"] is None and policy["policy"]["history_size"] == 100 and not policy["conflict"]


async def test_every_producer_path_gets_its_namespace_policy(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """Two namespaces with different sizes in one run; HTTP, sync SDK, async SDK and the CLI all follow them."""
    path = namespaces_file(tmp_path, '[namespaces."small-*"]\nhistory_size = 100\n'
                                     '[namespaces."big-*"]\nhistory_size = 600\n')
    settings = redis_settings(redis_url, prefix, namespaces=path, history_size=1000)
    async with InProcessGateway(settings) as gw, httpx.AsyncClient(base_url=gw.http_url) as http:
        with Producer.from_url(redis_url, key_prefix=prefix) as sync_producer:
            await asyncio.to_thread(sync_producer.publish_many, [("small-sync", "t.x", i) for i in range(800)])
            await asyncio.to_thread(sync_producer.publish_many, [("big-sync", "t.x", i) for i in range(800)])
        async with AsyncProducer.from_url(redis_url, key_prefix=prefix) as async_producer:
            await async_producer.publish_many([("small-async", "t.x", i) for i in range(800)])
            await async_producer.publish_many([("big-async", "t.x", i) for i in range(800)])
        for i in range(800):
            assert (await http.post("/v1/conversations/small-http/events", json={"type": "t.x", "data": i})).is_success
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "producers.cli", "small-sync", "t.x", "1", "--url", redis_url,
                             "--key-prefix", prefix], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        for conv, size in [("small-sync", 100), ("small-async", 100), ("small-http", 100),
                           ("big-sync", 600), ("big-async", 600)]:
            # a resume from seq 400 (of 800): gone where 100 are kept, there where 600 are
            page = (await http.get(f"/v1/conversations/{conv}/events?since=400&limit=1")).json()
            assert page["truncated"] is (size == 100), conv
            policy = (await http.get(f"/v1/conversations/{conv}/policy")).json()
            assert policy["policy"]["history_size"] == size
            assert policy["namespace"] == conv.split("-")[0] + "-*"
        other = (await http.get("/v1/conversations/other/policy")).json()
        assert other["namespace"] is None and other["policy"]["history_size"] == 1000


async def test_state_caps_and_data_size_per_namespace(redis_url: str, prefix: str, tmp_path: Path) -> None:
    path = namespaces_file(tmp_path, '[namespaces."cap-*"]\nstate_max_entries = 2\nmax_data_bytes = 300\n')
    settings = redis_settings(redis_url, prefix, namespaces=path, state_max_entries=100)
    async with InProcessGateway(settings) as gw, httpx.AsyncClient(base_url=gw.http_url) as http:
        async with AsyncProducer.from_url(redis_url, key_prefix=prefix) as producer:
            capped = [await producer.publish("cap-1", "t.x", k, key=k) for k in "abcd"]
            free = [await producer.publish("free-1", "t.x", k, key=k) for k in "abcd"]
            assert [r.evicted for r in capped] == [0, 0, 1, 1]
            assert [r.evicted for r in free] == [0, 0, 0, 0]
            # data over the namespace's max_data_bytes: refused by the publish function itself, no seq taken
            with pytest.raises(PayloadTooLarge, match="max_data_bytes 300"):
                await producer.publish("cap-1", "t.x", "x" * 400)
            assert (await producer.publish("cap-1", "t.x", "x" * 100)).seq == 5
            assert (await producer.publish("free-1", "t.x", "x" * 400)).seq == 5
        assert set((await http.get("/v1/conversations/cap-1/state")).json()["entities"]) == {"c", "d"}
        assert len((await http.get("/v1/conversations/free-1/state")).json()["entities"]) == 4
        refused = await http.post("/v1/conversations/cap-2/events", json={"type": "t.x", "data": "x" * 400})
        assert refused.status_code == 413, refused.text
        assert (await http.post("/v1/conversations/free-2/events", json={"type": "t.x", "data": "x" * 400})).is_success
    with Producer.from_url(redis_url, key_prefix=prefix) as sync_producer, \
            pytest.raises(PayloadTooLarge, match="max_data_bytes 300"):
        sync_producer.publish_many([("cap-3", "t.x", 1), ("cap-3", "t.x", "y" * 400)])
    with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
        assert client.hget(f"{prefix}:{{cap-3}}:meta", "seq") == b"1"  # the event before it stays, numbered


async def test_memory_backend_applies_the_namespaces(tmp_path: Path) -> None:
    path = namespaces_file(tmp_path, ISSUE_FILE)
    settings = Settings(namespaces=path, history_size=100)
    async with InProcessGateway(settings) as gw, httpx.AsyncClient(base_url=gw.http_url) as http:
        backend = gw.gateway.backend
        assert isinstance(backend, MemoryBackend)
        for conv in ("support-1", "bulk-1", "other"):
            await backend.publish_many([_request(conv, i) for i in range(300)])
        kept = {conv: len((await backend.history(conv)).events) for conv in ("support-1", "bulk-1", "other")}
        assert kept == {"support-1": 200, "bulk-1": 50, "other": 100}
        with pytest.raises(PayloadTooLarge):
            await backend.publish("bulk-1", "t.x", "x" * 20000)
        assert (await backend.publish("other", "t.x", "x" * 20000)).seq == 301
        assert (await http.post("/v1/conversations/bulk-2/events", json={"type": "t.x", "data": "x" * 20000})
                ).status_code == 413
        for i in range(600):
            await backend.publish("support-2", "t.x", i, key=f"k{i}")
        assert len((await backend.state("support-2")).entities) == 500
        policy = (await http.get("/v1/conversations/support-9/policy")).json()
        assert policy["namespace"] == "support-*"
        assert policy["policy"] == {"history_size": 200, "history_ttl": 3600, "state_max_entries": 500,
                                    "state_max_bytes": 8 * 1024 * 1024, "max_data_bytes": 1024 * 1024}


def _request(conv: str, i: int) -> Any:
    from broadcaster.envelope import PublishRequest

    return PublishRequest(conv, "t.x", i)


def test_memory_expiry_follows_the_namespace_ttl(tmp_path: Path) -> None:
    now = [0.0]
    namespaces = tuple(load_namespaces(namespaces_file(tmp_path, '[namespaces."short-*"]\nhistory_ttl = 10\n')))
    backend = MemoryBackend(BackendSettings(history_ttl=1000, namespaces=namespaces), clock=lambda: now[0])

    async def run() -> tuple[int, int]:
        await backend.publish("short-1", "t.x", 1)
        await backend.publish("long-1", "t.x", 1)
        now[0] = 11.0
        return len((await backend.history("short-1")).events), len((await backend.history("long-1")).events)

    assert asyncio.run(run()) == (0, 1)


# --- Redis Cluster -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    with RedisClusterNodes(masters=3) as nodes:
        yield nodes


async def test_namespaces_on_a_redis_cluster(cluster: RedisClusterNodes, tmp_path: Path) -> None:
    path = namespaces_file(tmp_path, ISSUE_FILE)
    settings = Settings(redis_url=cluster.url, key_prefix="ns", namespaces=path, history_size=100)
    convs = [f"support-{i}" for i in range(6)] + [f"bulk-{i}" for i in range(6)]
    async with InProcessGateway(settings) as gw, httpx.AsyncClient(base_url=gw.http_url) as http:
        library = scripts.library_name("ns")
        for node in cluster.nodes:  # loaded on every primary: any slot's publish finds it
            client = node.client()
            assert [entry[b"library_name"] if isinstance(entry, dict) else entry[1]
                    for entry in client.function_list(library)] == [library.encode()]
            client.close()
        slots = {redis.crc.key_slot(f"ns:{{{c}}}:meta".encode()) for c in convs}
        assert len({cluster.node_for_slot(s).port for s in slots}) == 3  # every node is used
        with Producer.from_url(cluster.url, key_prefix="ns") as producer:
            await asyncio.to_thread(producer.publish_many, [(c, "t.x", i) for c in convs for i in range(400)])
        async with AsyncProducer.from_url(cluster.url, key_prefix="ns") as async_producer:
            with pytest.raises(PayloadTooLarge):
                await async_producer.publish("bulk-0", "t.x", "x" * 20000)
            await async_producer.publish("support-0", "t.x", "x" * 20000)
        for conv in convs:
            size = 200 if conv.startswith("support") else 50
            page = (await http.get(f"/v1/conversations/{conv}/events?since=0&limit=1000")).json()
            assert size <= len(page["events"]) <= size + 100, conv  # MAXLEN ~: within a stream node
            policy = (await http.get(f"/v1/conversations/{conv}/policy")).json()
            assert policy["policy"]["history_size"] == size and not policy["conflict"]
        assert await gw.gateway.backend.check_policy() == []  # type: ignore[attr-defined]
        # one primary loses the library (a node replaced empty): the gateway's check loads it again there
        victim = cluster.nodes[0]
        client = victim.client()
        client.function_delete(library)
        on_victim = next(c for c in convs if cluster.node_for_slot(
            redis.crc.key_slot(f"ns:{{{c}}}:meta".encode())) is victim)
        async with AsyncProducer.from_url(cluster.url, key_prefix="ns", retry_budget=15) as async_producer:
            assert (await async_producer.publish(on_victim, "t.x", "after")).seq == 401 + (on_victim == "support-0")
        assert client.function_list(library)
        client.close()


# --- the README's raw call, as written ---------------------------------------------------------------


def _readme_blocks() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Publishing from another language", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```sh\n")[1:]]


async def test_the_readme_fcall_publishes_with_the_namespace_policy(tmp_path: Path) -> None:
    publish, policy = (next(b for b in _readme_blocks() if b.startswith(f"redis-cli {name} "))
                       for name in ("FCALL", "FCALL_RO"))
    with RedisServer() as server:
        namespaces = tuple(load_namespaces(namespaces_file(tmp_path, '[namespaces."conv-*"]\nhistory_size = 3\n')))
        backend = RedisBackend(server.url, settings=BackendSettings(namespaces=namespaces))  # key prefix bc
        await backend.start()
        try:
            def run(command: str) -> list[str]:
                command = command.replace("redis-cli", f"redis-cli -p {server.port}", 1)
                return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True,
                                      timeout=30, check=True).stdout.split()

            first, again = run(publish), run(publish)
            assert first[0] == "1" and first[2:] == ["0", "0"]  # seq 1, not a duplicate, nothing evicted
            assert again[0] == "1" and again[2] == "1"  # the same id: a duplicate of seq 1
            page = await backend.history("conv-1")
            assert [(e.seq, e.id, e.type, e.data) for e in page.events] == [(1, "evt-42", "chat.message",
                                                                              {"text": "hi"})]
            assert run(policy) == [backend.library.fingerprint, "conv-*", "3", "86400", "10000", "8388608",
                                   "1048576"]
            client = server.client()
            assert 0 < client.ttl("bc:{conv-1}:id:evt-42") <= 86400  # the id TTL capped at the namespace's
            client.close()
        finally:
            await backend.close()


# --- losing the library, and a producer with no gateway ------------------------------------------------


async def test_a_library_lost_by_redis_is_loaded_again(redis_url: str, prefix: str) -> None:
    settings = redis_settings(redis_url, prefix, history_size=100)
    async with InProcessGateway(settings):
        async with AsyncProducer.from_url(redis_url, key_prefix=prefix, retry_budget=15) as producer:
            await producer.publish("c", "t.x", 1)
            drop_library(redis_url, prefix)  # what a restart without persistence, or FUNCTION FLUSH, does
            began = time.monotonic()
            assert (await producer.publish("c", "t.x", 2)).seq == 2  # retried until the gateway reloaded it
            assert time.monotonic() - began < 10


def test_a_producer_with_no_gateway_says_what_is_missing(redis_url: str, prefix: str) -> None:
    with Producer.from_url(redis_url, key_prefix=prefix, retry_budget=0.5) as producer, \
            pytest.raises(BackendUnavailable, match=f"key prefix '{prefix}'.*a gateway") as caught:
        producer.publish("c", "t.x", 1)
    assert "--key-prefix" in str(caught.value)
    done = subprocess.run([sys.executable, "-m", "producers.cli", "c", "t.x", "1", "--url", redis_url,
                           "--key-prefix", prefix, "--retry-budget", "0.3"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "must have started against it" in done.stderr


def test_retention_options_are_refused_by_the_sdk() -> None:
    for option in ("history_size", "history_ttl", "state_max_entries", "state_max_bytes", "max_data_bytes"):
        with pytest.raises(TypeError, match="namespace"):
            Producer.from_url("redis://127.0.0.1:6379/0", **{option: 5})
        with pytest.raises(TypeError, match="--namespaces"):
            AsyncProducer.from_url("http://127.0.0.1:8000", **{option: 5})


# --- conflicts and changes -----------------------------------------------------------------------------


async def test_conflicting_gateways_are_reported(redis_url: str, prefix: str, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    first_file = namespaces_file(tmp_path, '[namespaces."support-*"]\nhistory_size = 200\n', "a.toml")
    second_file = namespaces_file(tmp_path, '[namespaces."support-*"]\nhistory_size = 1000\n', "b.toml")
    caplog.set_level(logging.WARNING, logger="broadcaster.backend.redis")
    async with InProcessGateway(redis_settings(redis_url, prefix, namespaces=first_file)) as first, \
            httpx.AsyncClient() as http:
        async def conflict_metric(gw: InProcessGateway) -> float:
            text = (await http.get(f"{gw.http_url}/metrics")).text
            line = next(ln for ln in text.splitlines() if ln.startswith("broadcaster_policy_conflict "))
            return float(line.split()[1])

        assert await conflict_metric(first) == 0
        async with InProcessGateway(redis_settings(redis_url, prefix, namespaces=second_file)) as second:
            # the one started last loaded its policy; the other notices within its check interval
            await async_wait_for(lambda: _eq(conflict_metric(first), 1), 10, "the first gateway to see the conflict")
            assert await conflict_metric(second) == 0
            assert any("support-* history_size: 200 here, 1000 loaded" in r.getMessage() for r in caplog.records)
            policy = (await http.get(f"{first.http_url}/v1/conversations/support-1/policy")).json()
            assert policy["conflict"] is True and policy["policy"]["history_size"] == 1000
            assert (await http.get(f"{first.http_url}/readyz")).status_code == 200  # a rolling update: still ready
        # the second gateway is gone, its policy stays loaded: restarting the first (as an operator would,
        # with one file for all) applies its file to new publishes at once
    async with InProcessGateway(redis_settings(redis_url, prefix, namespaces=first_file)) as restarted, \
            httpx.AsyncClient(base_url=restarted.http_url) as http:
        policy = (await http.get("/v1/conversations/support-1/policy")).json()
        assert policy["policy"]["history_size"] == 200 and policy["conflict"] is False
        async with AsyncProducer.from_url(redis_url, key_prefix=prefix) as producer:
            await producer.publish_many([("support-1", "t.x", i) for i in range(1500)])
        page = (await http.get("/v1/conversations/support-1/events?since=1000&limit=1")).json()
        assert page["truncated"]  # about 200 kept (1000 would still have seq 1001)


async def _eq(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


def test_the_deployment_files_ship_a_namespaces_file() -> None:
    path = ROOT / "deploy/k8s/base/namespaces.toml"
    assert load_namespaces(str(path)) == []  # as shipped: every conversation in the default namespace
    example = "\n".join(line[2:] for line in path.read_text().splitlines()
                        if re.match(r"# (\[namespaces\.|[a-z_]+ = )", line))
    assert [ns.glob for ns in parse_namespaces(tomllib.loads(example))] == ["support-*", "bulk-*"]
    assert "BROADCASTER_NAMESPACES: /etc/broadcaster/namespaces.toml" in (ROOT / "docker-compose.yml").read_text()
    assert "- namespaces.toml" in (ROOT / "deploy/k8s/base/kustomization.yaml").read_text()
    assert "value: /etc/broadcaster/namespaces.toml" in (ROOT / "deploy/k8s/base/deployment.yaml").read_text()


async def test_a_prefix_with_other_characters_gets_a_hex_named_library(redis_url: str, key_prefix: str) -> None:
    odd = f"{key_prefix}-app.v1"  # function names allow only [A-Za-z0-9_]
    assert scripts.library_name(odd) == "broadcaster_h_" + odd.encode().hex()
    assert scripts.library_name(key_prefix) == f"broadcaster_p_{key_prefix}"
    backend = RedisBackend(redis_url, key_prefix=odd, settings=BackendSettings(history_size=7))
    await backend.start()
    try:
        async with AsyncProducer.from_url(redis_url, key_prefix=odd) as producer:
            assert (await producer.publish("c-1", "t.x", 1)).seq == 1
        assert (await backend.policy("c-1")).policy.history_size == 7
        with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
            # keys of another prefix are refused: the function only numbers its own prefix's conversations
            with pytest.raises(redis.ResponseError, match="not the meta key"):
                client.fcall(backend.library.publish_function, 6, *[f"{key_prefix}:{{c-1}}:{k}" for k in
                             ("meta", "log", "live", "state", "state_order", "id:x")],
                             "c-1", "x", "t.x", b"\x01", "", "", "", 10, "", "", "0", "")
            assert client.hget(f"{odd}:{{c-1}}:meta", "seq") == b"1"
            for key in client.scan_iter(match=f"{odd}:*"):
                client.delete(key)
    finally:
        await backend.close()
        drop_library(redis_url, odd)
