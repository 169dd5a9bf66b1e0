"""The worked example plugin, loaded by name as --plugin would, on a real gateway."""

from __future__ import annotations

import httpx
import pytest

from gateway.settings import Settings
from tests.support.gateway import InProcessGateway
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)


async def test_example_plugin_annotates_derives_counts_and_ticks() -> None:
    settings = Settings(plugin=["examples.plugins.chat_summary:setup"], presence_ttl=3)
    async with InProcessGateway(settings) as gw:
        watcher = await WsClient.connect(gw.ws_url("conv_id=p&profile=debug"))
        await watcher.expect("ws.subscribed")
        viewers = await watcher.expect("chat.viewers")
        assert viewers["data"] == {"count": 1} and viewers["key"] == "viewers"

        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            await http.post("/v1/conversations/p/events", json={"type": "llm.delta", "data": {"text": "hello"}})
            done = await http.post("/v1/conversations/p/events",
                                   json={"type": "llm.done", "data": {"text": "two words"}, "id": "d1"})
        delta = await watcher.expect("llm.delta")
        assert delta["data"] == {"text": "hello", "chars": 5}
        summary = await watcher.expect("timeline.summary")
        assert summary["data"] == {"of_seq": done.json()["seq"], "words": 2}
        assert summary["id"] == "d1:summary"
        tick = await watcher.expect("debug.tick", timeout=10)  # emitted only because a debug viewer watches
        assert tick["data"] == {"gateway": gw.gateway.gateway_id}

        second = await WsClient.connect(gw.ws_url("conv_id=p"))
        await second.expect("ws.subscribed")
        assert (await watcher.expect("chat.viewers"))["data"] == {"count": 2}
        await second.close()
        assert (await watcher.expect("chat.viewers"))["data"] == {"count": 1}
        state = (await gw.gateway.backend.state("p")).entities
        assert state["viewers"].data == {"count": 1}
