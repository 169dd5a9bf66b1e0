"""The stream helper's coalescing window against publishes and latency (#17 item 4).

    python bench/stream_window.py [--url redis://127.0.0.1:6379/0] [--tokens 1500]

Streams one answer of ``tokens`` 5-byte tokens through ``AsyncProducer.stream`` straight to
Redis, at several token rates and windows, and prints for each: append publishes, tokens
per publish, and the longest a token waited in the buffer before its publish was sent.
Keys go under a random prefix and are deleted afterwards (the prefix's function library
is loaded as a gateway would, and dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time

import redis

from broadcaster.backend import BackendSettings
from broadcaster.backends import scripts
from producers import AsyncProducer


async def one(url: str, prefix: str, tokens: int, rate: float, window: float) -> tuple[int, float]:
    waited = 0.0
    async with AsyncProducer.from_url(url, key_prefix=prefix) as p:
        conv = f"w{secrets.token_hex(3)}"
        began = time.perf_counter()
        async with p.stream(conv, "answer", "llm.message", window=window) as s:
            pending: list[float] = []
            sent = 0
            for i in range(tokens):
                await asyncio.sleep(max(0.0, began + i / rate - time.perf_counter()))
                pending.append(time.perf_counter())
                await s.append(f"tok{i % 10} ")
                if s.publishes > sent:  # the buffer went out: every token in it waited until now
                    now = time.perf_counter()
                    waited = max(waited, now - pending[0])
                    pending, sent = [], s.publishes
        return s.publishes, waited


async def main_async(args: argparse.Namespace) -> None:
    prefix = "sw" + secrets.token_hex(4)
    library = scripts.build_library(prefix, BackendSettings().policy_table())
    client = redis.Redis.from_url(args.url)
    client.function_load(scripts.library_code(library, bool(client.execute_command(*scripts.SCRIPTS_HAVE_SHA1))),
                         replace=True)
    try:
        print(f"{'tokens/s':>8} {'window':>7} {'publishes':>9} {'tokens/publish':>14} {'max wait (append)':>18}")
        for rate in (50.0, 200.0, 500.0):
            for window in (0.0, 0.02, 0.1):
                publishes, waited = await one(args.url, prefix, args.tokens, rate, window)
                print(f"{rate:8.0f} {window * 1000:5.0f}ms {publishes:9d} {args.tokens / publishes:14.1f} "
                      f"{waited * 1000:15.1f} ms", flush=True)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.function_delete(library.name)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--tokens", type=int, default=1500)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
