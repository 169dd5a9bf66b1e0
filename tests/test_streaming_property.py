"""Property (#17 item 5): whatever the interleaving of upserts, appends and deletes, and wherever a
client joins (hydrate), resumes (since) or is reset (a stale epoch), with profiles (drop_fields,
include), ``types=`` narrowing, delta upserts (``delta=1``) and live events the gateway lost and
repaired from history, the entity map every client reconstructs equals the one built from full
upserts - on the memory backend and on Redis (publish.lua's merge)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broadcaster.backend import Backend, BackendSettings
from broadcaster.backends.memory import MemoryBackend
from broadcaster.envelope import PublishRequest, apply_append
from broadcaster.namespaces import parse_namespaces
from broadcaster.profiles import ProfileRegistry
from gateway.settings import Settings
from producers.client import BroadcasterClient, Event
from tests.conftest import REDIS_URL
from tests.support.gateway import InProcessGateway
from tests.support.policy import drop_library
from tests.support.polling import async_wait_until

pytestmark = pytest.mark.timeout(120)

PROFILES = ProfileRegistry.from_mapping(
    {"profiles": {"lean": {"include": ["llm.*", "tool.*"], "drop_fields": ["raw"]}}})
DELTA_NAMESPACES = tuple(parse_namespaces({"namespaces": {"*": {"delta": True}}}))
DELTAS_SEEN = [0]  # deltas the clients received, over all examples: the property must exercise them
KEY_TYPES = {"k0": "llm.message", "k1": "llm.message", "k2": "tool.call", "k3": "debug.trace"}
ALLOWED = {"default": lambda t: not t.startswith("debug."), "lean": lambda t: t.startswith(("llm.", "tool."))}

BODY = "x" * 200  # a large unchanging field: a delta is smaller than the whole upsert
text = st.text(alphabet="ab é€\n\"", max_size=4)
chunk_text = st.text(alphabet="ab é€\n\"", min_size=1, max_size=4)
keys = st.sampled_from(["k0", "k0", "k0", "k1", "k2", "k3"])  # one key often: long messages
value = st.one_of(text, st.integers(-3, 3), st.none(), st.lists(st.integers(0, 2), max_size=2))
fields = st.sampled_from(["text", "n", "raw", "extra"])
# a large unchanging field makes a delta smaller than the whole upsert, so deltas are sent
upsert = st.tuples(st.just("upsert"), keys, st.builds(lambda d, big: {**d, **({"body": BODY} if big else {})},
                                                      st.dictionaries(fields, value, max_size=3), st.booleans()))
append = st.tuples(st.just("append"), keys,
                   st.dictionaries(fields, st.one_of(chunk_text, chunk_text, st.integers(0, 5)),
                                   min_size=1, max_size=2))
delete = st.tuples(st.just("delete"), keys, st.none())
plain = st.tuples(st.just("plain"), st.just(""), st.none())
ops = st.lists(st.one_of(append, append, upsert, upsert, delete, plain), min_size=1, max_size=30)
DELTA_EXAMPLE = [("upsert", "k0", {"n": 0, "body": BODY}), ("upsert", "k0", {"n": 1, "body": BODY}),
                 ("upsert", "k2", {"text": "a", "body": BODY}), ("upsert", "k0", {"n": 2, "body": BODY}),
                 ("upsert", "k2", {"text": "b", "body": BODY}), ("append", "k0", {"text": "t"}),
                 ("upsert", "k0", {"text": "tt", "body": BODY}),
                 ("upsert", "k0", {"text": "ttt", "raw": "r", "body": BODY}),
                 ("delete", "k2", None), ("upsert", "k2", {"body": BODY}), ("upsert", "k2", {"body": BODY, "z": 1})]

Model = dict[str, tuple[Any, int]]  # key -> (data, seq of its last change)


def to_request(conv: str, op: tuple[str, str, Any]) -> PublishRequest:
    kind, key, data = op
    if kind == "plain":
        return PublishRequest(conv, "chat.note", {"plain": True})
    if kind == "append":
        return PublishRequest(conv, KEY_TYPES[key], data, key=key, op="append")
    return PublishRequest(conv, KEY_TYPES[key], data if kind == "upsert" else None, key=key)


def run_model(ops_: list[tuple[str, str, Any]], upto: int) -> Model:
    """The entities after the first ``upto`` ops, from full values: what each key would hold had every
    append been published as a full upsert of the message so far."""
    model: Model = {}
    for seq, (kind, key, data) in enumerate(ops_[:upto], start=1):
        if kind == "upsert":
            model[key] = (data, seq)
        elif kind == "append":
            model[key] = (apply_append(model[key][0] if key in model else None, data), seq)
        elif kind == "delete":
            model.pop(key, None)
    return model


def shaped(model: Model, profile: str, types: tuple[str, ...] | None) -> dict[str, tuple[Any, int]]:
    out = {}
    for key, (data, seq) in model.items():
        etype = KEY_TYPES[key]
        if not ALLOWED[profile](etype) or (types is not None and not any(etype.startswith(t[:-1]) for t in types)):
            continue
        if profile == "lean" and isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "raw"}
        out[key] = (data, seq)
    return out


CLIENTS = [  # profile, types, how it joins, delta upserts
    ("default", None, "hydrate", False),
    ("lean", None, "hydrate", False),
    ("default", ("llm.*",), "hydrate", False),
    ("lean", None, "resume", False),
    ("default", ("tool.*", "llm.*"), "reset", False),
    ("lean", ("llm.*",), "resume", False),
    ("default", None, "hydrate", True),
    ("lean", None, "resume", True),
    ("default", ("tool.*", "llm.*"), "reset", True),
    ("lean", ("llm.*",), "hydrate", True),
]


async def check(ops_: list[tuple[str, str, Any]], split: int, resume_at: int, backend_kind: str,
                lose: frozenset[int] = frozenset()) -> None:
    if backend_kind != "redis":
        await _check(ops_, split, resume_at, MemoryBackend(BackendSettings(namespaces=DELTA_NAMESPACES)), lose)
        return
    import redis

    from broadcaster.backends.redis import RedisBackend

    prefix = "tp" + secrets.token_hex(5)
    try:
        await _check(ops_, split, resume_at, RedisBackend(REDIS_URL, key_prefix=prefix,
                                                                settings=BackendSettings(namespaces=DELTA_NAMESPACES)),
                     lose)
    finally:  # the Redis is shared: leave nothing behind
        drop_library(REDIS_URL, prefix)
        client = redis.Redis.from_url(REDIS_URL)
        stored = list(client.scan_iter(match=f"{prefix}:*"))
        if stored:
            client.delete(*stored)
        client.close()


async def _check(ops_: list[tuple[str, str, Any]], split: int, resume_at: int, backend: Backend,
                 lose: frozenset[int]) -> None:
    """``lose``: seqs of live events the gateway's listener never gets (a lost pub/sub message): the
    next event shows the gap and the hub repairs it from history."""
    async with InProcessGateway(Settings(), backend=backend, profiles=PROFILES) as gw:
        b = gw.gateway.backend
        hub = gw.gateway.hub
        deliver, lost = hub._on_envelope, set()

        def losing(feed: Any, env: Any) -> None:
            if env.seq in lose and env.seq not in lost and env.type != "llm.end":
                lost.add(env.seq)
                return
            deliver(feed, env)

        hub._on_envelope = losing  # type: ignore[method-assign]
        conv = "prop"
        split = min(split, len(ops_))
        resume_at = min(resume_at, split)
        first = await b.publish_many([to_request(conv, op) for op in ops_[:split]]) if split else []
        epoch = first[0].epoch if first else (await b.head(conv)).epoch
        clients = []
        for profile, types, how, delta in CLIENTS:
            c = BroadcasterClient(gw.http_url, profile=profile, types=list(types) if types else None,
                                  hydrate=how != "resume", backoff_initial=0.01, delta=delta)
            if how == "resume":  # it held the entities as of resume_at, and resumes from there
                seeded = shaped(run_model(ops_, resume_at), profile, types)
                c.entities(conv).apply({"type": "ws.state", "entities": {
                    k: {"type": KEY_TYPES[k], "conv_id": conv, "seq": s, "data": d, "key": k}
                    for k, (d, s) in seeded.items()}})
                await c.subscribe(conv, since=resume_at, epoch=epoch)
            elif how == "reset":  # a stale epoch: ws.reset, then the client hydrates again
                await c.subscribe(conv, since=resume_at, epoch="stale0epoch")
            else:
                await c.subscribe(conv)
            await c.start()
            clients.append(c)
        try:
            await asyncio.gather(*(c.wait_subscribed(10) for c in clients))
            if split < len(ops_):
                await b.publish_many([to_request(conv, op) for op in ops_[split:]])
            end = await b.publish(conv, "llm.end", {"done": True})

            async def drain(c: BroadcasterClient) -> None:
                while True:  # consume items so the client's queue never fills
                    item = await c.get()
                    if isinstance(item, Event) and item.op == "delta":
                        DELTAS_SEEN[0] += 1

            drains = [asyncio.create_task(drain(c)) for c in clients]
            await async_wait_until(lambda: all(c.position(conv)[1] == end.seq for c in clients), 15.0,
                                   "every client at the last seq")
            for d in drains:
                d.cancel()
            if lost:
                assert hub.stats.gap_repairs > 0
            expected_all = run_model(ops_, len(ops_))
            for c, (profile, types, how, delta) in zip(clients, CLIENTS, strict=True):
                got = {k: (e.get("data"), e["seq"]) for k, e in c.entities(conv).snapshot().items()}
                assert got == shaped(expected_all, profile, types), (profile, types, how, delta)

        finally:
            for c in clients:
                await c.close()


PROPERTY = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def test_entity_maps_equal_full_upserts_memory() -> None:
    @PROPERTY
    @given(ops_=ops, split=st.integers(0, 30), resume_at=st.integers(0, 30),
           lose=st.frozensets(st.integers(1, 30), max_size=3))
    @example(ops_=DELTA_EXAMPLE, split=1, resume_at=1, lose=frozenset({4}))
    def run(ops_: list[tuple[str, str, Any]], split: int, resume_at: int, lose: frozenset[int]) -> None:
        asyncio.run(check(ops_, split, resume_at, "memory", lose))

    DELTAS_SEEN[0] = 0
    run()
    assert DELTAS_SEEN[0] > 0, "no example sent a delta: the strategy no longer exercises them"


@settings(PROPERTY, max_examples=15)
@given(ops_=ops, split=st.integers(0, 30), resume_at=st.integers(0, 30))
@example(ops_=[("append", "k0", {"text": "a"}), ("append", "k0", {"text": "b", "raw": "r"}), ("upsert", "k1", {"n": 1}),
               ("append", "k1", {"n": "x"}), ("append", "k1", {"n": "y"})], split=5, resume_at=2)
def test_entity_maps_equal_full_upserts_redis(ops_: list[tuple[str, str, Any]], split: int, resume_at: int) -> None:
    asyncio.run(check(ops_, split, resume_at, "redis"))
