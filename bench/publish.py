"""Publish throughput from one process to Redis, through the producer SDK.

    python bench/publish.py [--url redis://127.0.0.1:6379/0] [--events 20000] [--batch 100] [--concurrency 32]

Each event carries ~100 bytes of data and goes through the full path: validation,
msgpack, the publish script (seq, history stream, idempotency key, PUBLISH). Runs
blocking and asyncio producers, one by one and with publish_many, and prints
events/s. Keys go under a random prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable

import redis

from broadcaster.backend import BackendSettings
from broadcaster.backends import scripts
from broadcaster.namespaces import load_namespaces
from producers import AsyncProducer, Producer

DATA = {"text": "x" * 84, "n": 1}  # ~100 bytes as JSON
CONVS = [f"bench-{i}" for i in range(10)]
BATCH_TASKS = 4  # concurrent publish_many calls: the SDK builds one batch while Redis runs another


def _items(n: int) -> list[tuple[str, str, object]]:
    return [(CONVS[i % len(CONVS)], "bench.event", DATA) for i in range(n)]


def bench_sync(url: str, prefix: str, events: int, batch: int) -> dict[str, float]:
    out = {}
    with Producer.from_url(url, key_prefix=prefix) as p:
        p.publish("warm-up", "bench.event", DATA)
        began = time.perf_counter()
        for conv, etype, data in _items(events):
            p.publish(conv, etype, data)
        out["sync publish"] = events / (time.perf_counter() - began)
        items = _items(events)
        began = time.perf_counter()
        for i in range(0, events, batch):
            p.publish_many(items[i : i + batch])
        out[f"sync publish_many({batch})"] = events / (time.perf_counter() - began)
    return out


async def bench_async(url: str, prefix: str, events: int, batch: int, concurrency: int) -> dict[str, float]:
    out = {}
    async with AsyncProducer.from_url(url, key_prefix=prefix) as p:
        await p.publish("warm-up", "bench.event", DATA)

        async def timed(label: str, run: Callable[[], Awaitable[None]]) -> None:
            began = time.perf_counter()
            await run()
            out[label] = events / (time.perf_counter() - began)

        async def sequential() -> None:
            for conv, etype, data in _items(events):
                await p.publish(conv, etype, data)

        async def concurrent() -> None:
            items = _items(events)

            async def worker(k: int) -> None:
                for conv, etype, data in items[k::concurrency]:
                    await p.publish(conv, etype, data)

            await asyncio.gather(*(worker(k) for k in range(concurrency)))

        async def batched() -> None:
            items = _items(events)
            for i in range(0, events, batch):
                await p.publish_many(items[i : i + batch])

        async def batched_concurrently() -> None:
            items = _items(events)
            chunks = [items[i : i + batch] for i in range(0, events, batch)]

            async def worker(k: int) -> None:
                for chunk in chunks[k::BATCH_TASKS]:
                    await p.publish_many(chunk)

            await asyncio.gather(*(worker(k) for k in range(BATCH_TASKS)))

        await timed("async publish", sequential)
        await timed(f"async publish x{concurrency} tasks", concurrent)
        await timed(f"async publish_many({batch})", batched)
        await timed(f"async publish_many({batch}) x{BATCH_TASKS} tasks", batched_concurrently)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--namespaces", help="namespaces file the publish function applies (as a gateway's)")
    args = parser.parse_args()
    prefix = "bench" + secrets.token_hex(4)
    namespaces = tuple(load_namespaces(args.namespaces)) if args.namespaces else ()
    library = scripts.build_library(prefix, BackendSettings(namespaces=namespaces).policy_table())
    with contextlib.closing(redis.Redis.from_url(args.url)) as client:
        client.function_load(library.code, replace=True)  # what a gateway on this prefix does at start
    try:
        results = bench_sync(args.url, prefix, args.events, args.batch)
        results |= asyncio.run(bench_async(args.url, prefix, args.events, args.batch, args.concurrency))
    finally:
        with contextlib.closing(redis.Redis.from_url(args.url)) as client:
            for key_batch in _chunks(list(client.scan_iter(match=f"{prefix}:*", count=1000)), 1000):
                client.delete(*key_batch)
            client.function_delete(library.name)
    width = max(len(k) for k in results)
    print(f"{args.events} events of ~100 B to {args.url}, one process")
    print(f"{'mode':<{width}}  {'events/s':>10}")
    for label, rate in results.items():
        print(f"{label:<{width}}  {rate:>10,.0f}")


def _chunks(items: list[bytes], size: int) -> list[list[bytes]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


if __name__ == "__main__":
    main()
