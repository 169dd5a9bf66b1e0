"""The event-loop delay probe on a real in-process gateway: a blocked loop shows on /metrics."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from gateway.settings import Settings
from tests.support.gateway import InProcessGateway
from tests.support.polling import async_wait_until

pytestmark = pytest.mark.timeout(60)


def _value(exposition: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", exposition, re.M)
    assert found is not None, f"{name} not on /metrics"
    return float(found.group(1))


async def test_a_stalled_loop_is_on_metrics_once_then_the_gauge_falls_back() -> None:
    async with InProcessGateway(Settings()) as gw, httpx.AsyncClient(base_url=gw.http_url) as http:
        lag = gw.gateway.loop_lag
        await async_wait_until(lambda: lag.longest > 0, 5, "the probe measuring a first (tiny) delay")
        await http.get("/metrics")  # resets the gauge
        stalls_before = lag.stalls
        time.sleep(0.7)  # noqa: ASYNC251 - blocks the loop the gateway runs on, as a long callback does
        await async_wait_until(lambda: lag.stalls > stalls_before, 5, "the probe waking after the stall")
        first = (await http.get("/metrics")).text
        assert _value(first, "broadcaster_event_loop_lag_seconds") >= 0.55
        assert _value(first, "broadcaster_event_loop_stalls_total") == stalls_before + 1
        second = (await http.get("/metrics")).text  # the longest delay since the previous scrape
        assert _value(second, "broadcaster_event_loop_lag_seconds") < 0.5
        assert _value(second, "broadcaster_event_loop_stalls_total") == stalls_before + 1
