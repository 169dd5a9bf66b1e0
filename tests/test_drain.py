"""SIGTERM drains a real gateway process: /readyz 503, 1012 closes, exit 0 within the drain time."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from tests.support.gateway import GatewayProcess
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(60)


async def test_sigterm_drains_with_1012_and_exits_zero() -> None:
    drain = 4.0
    with GatewayProcess("--drain-seconds", str(drain)) as gw:
        clients = [await WsClient.connect(gw.ws_url(f"conv_id=d{i}")) for i in range(5)]
        for c in clients:
            await c.expect("ws.subscribed")
        started = time.monotonic()
        gw.signal(signal.SIGTERM)
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            deadline = time.monotonic() + drain
            status = 200
            while time.monotonic() < deadline:
                status = (await http.get("/readyz")).status_code
                if status == 503:
                    break
                await asyncio.sleep(0.02)
            assert status == 503, "readyz never reported draining"
            body = (await http.get("/readyz")).json()
            assert body["reason"] == "draining"
            assert (await http.get("/healthz")).status_code == 200
        late = await WsClient.connect(gw.ws_url("conv_id=late"))
        assert await late.close_code() == 1012
        codes = await asyncio.gather(*(c.close_code(timeout=drain + 2) for c in clients))
        assert codes == [1012] * len(clients)
        code = await asyncio.to_thread(gw.wait, drain + 5)
        assert code == 0, gw.output()
        assert time.monotonic() - started < drain + 3
