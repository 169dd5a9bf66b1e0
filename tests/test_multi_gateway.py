"""Two gateway processes on one Redis: fan-out across both, presence over both, expiry after SIGKILL."""

from __future__ import annotations

import httpx
import pytest

from tests.support.gateway import start_gateways
from tests.support.polling import async_wait_until
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(90)


async def poll_presence(http_url: str, conv: str, want: dict[str, int], timeout: float) -> dict[str, object]:
    """Presence is eventually consistent (each gateway reports on its own): poll until it counts ``want``."""
    async with httpx.AsyncClient(base_url=http_url) as http:
        async def fetch() -> dict[str, object]:
            body: dict[str, object] = (await http.get(f"/v1/conversations/{conv}/presence")).json()
            return body

        return await async_wait_until(fetch, timeout=timeout, message=f"presence of {conv} to be {want}",
                                      until=lambda body: body.get("by_profile") == want)


async def test_two_gateways_share_events_and_presence(redis_url: str, key_prefix: str) -> None:
    gateways = start_gateways(2, "--redis-url", redis_url, "--key-prefix", key_prefix, "--presence-ttl", "2")
    try:
        a, b = gateways
        on_a = [await WsClient.connect(a.ws_url("conv_id=room")) for _ in range(3)]
        on_b = [await WsClient.connect(b.ws_url("conv_id=room&profile=debug")) for _ in range(2)]
        for c in on_a + on_b:
            await c.expect("ws.subscribed")
        presence = await poll_presence(a.http_url, "room", {"default": 3, "debug": 2}, timeout=15)
        assert presence == {"conv_id": "room", "connections": 5, "by_profile": {"default": 3, "debug": 2}}

        async with httpx.AsyncClient() as http:
            for i in range(50):
                target = a if i % 2 else b  # publish through both gateways' HTTP APIs
                r = await http.post(f"{target.http_url}/v1/conversations/room/events",
                                    json={"type": "chat.msg", "data": {"i": i}})
                assert r.status_code == 200
        for c in on_a + on_b:
            got = await c.events(50, timeout=15)
            assert [e["seq"] for e in got] == list(range(1, 51))
            assert [e["data"]["i"] for e in got] == list(range(50))

        b.kill()  # SIGKILL: no withdrawal; its counts must expire by TTL
        presence = await poll_presence(a.http_url, "room", {"default": 3}, timeout=20)
        assert presence["by_profile"] == {"default": 3} and presence["connections"] == 3
    finally:
        for g in gateways:
            g.stop()
