"""A worked example plugin for an LLM chat backend.

Load it with ``broadcaster-gateway --plugin examples.plugins.chat_summary:setup``
(run from the repository root, or install the module anywhere on ``PYTHONPATH``).

It shows the four hooks a plugin has, none of which touches a socket:

* an *interceptor* that annotates every ``llm.delta`` with the length of its text;
* an interceptor that, when an ``llm.done`` arrives, publishes a derived
  ``timeline.summary`` event. Its id is derived from the original event's id, so
  replays and several gateways running the same plugin publish it once
  (idempotency), not once per gateway;
* ``on_subscribe`` / ``on_unsubscribe`` callbacks that keep a viewer count per
  conversation and publish it as a keyed state entry (``viewers``);
* a periodic emitter that publishes ``debug.tick`` only to conversations where
  somebody watches with the ``debug`` profile (producers skip costly debug events
  nobody watches).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from typing import Any

from broadcaster.envelope import Envelope
from broadcaster.hooks import PluginContext, SubscriptionInfo

log = logging.getLogger("examples.chat_summary")
TICK_SECONDS = 1.0


def setup(ctx: PluginContext) -> None:
    """Register this plugin's hooks on ``ctx``."""
    viewers: Counter[str] = Counter()
    background: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    @ctx.intercept
    def count_delta_chars(env: Envelope) -> Envelope:
        if env.type == "llm.delta" and isinstance(env.data, dict) and isinstance(env.data.get("text"), str):
            return dataclasses.replace(env, data={**env.data, "chars": len(env.data["text"])})
        return env

    @ctx.intercept
    def summarise_on_done(env: Envelope) -> Envelope:
        if env.type == "llm.done":
            text = env.data.get("text", "") if isinstance(env.data, dict) else ""
            summary = {"of_seq": env.seq, "words": len(str(text).split())}
            spawn(ctx.publisher.publish(env.conv, "timeline.summary", summary, id=f"{env.id}:summary"))
        return env

    async def publish_viewers(conv: str) -> None:
        await ctx.publisher.publish(conv, "chat.viewers", {"count": viewers[conv]}, key="viewers")

    @ctx.on_subscribe
    async def joined(info: SubscriptionInfo) -> None:
        viewers[info.conv_id] += 1
        await publish_viewers(info.conv_id)

    @ctx.on_unsubscribe
    async def left(info: SubscriptionInfo) -> None:
        viewers[info.conv_id] -= 1
        if viewers[info.conv_id] <= 0:
            del viewers[info.conv_id]
        else:
            await publish_viewers(info.conv_id)

    async def tick() -> None:
        for conv in list(viewers):
            if await ctx.publisher.has_subscribers(conv, profile="debug"):
                await ctx.publisher.publish(conv, "debug.tick", {"gateway": ctx.gateway_id})

    ctx.every(TICK_SECONDS, tick)
