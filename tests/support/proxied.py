"""Clients of a gateway fleet behind a load balancer (nginx): a resuming websocket follower and a retried publish.

Shared by the loopback-cluster and the compose-cluster tests; both drive the same nginx.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets

from tests.support.wsclient import WsClient


@dataclass
class ResumingClient:
    """Follows one conversation through the load balancer: reconnects after any close, resuming with since/epoch.

    ``ws_url(query)`` is the balancer's ``/ws`` URL with that query string.
    """

    ws_url: Callable[[str], str]
    conv: str
    seqs: list[int] = field(default_factory=list)
    gateway_ids: list[str] = field(default_factory=list)  # one per ws.hello, in order
    closes: list[int | None] = field(default_factory=list)  # close code per lost connection (None: no close frame)
    resets: list[dict[str, Any]] = field(default_factory=list)
    epoch: str | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self) -> str:
        query = f"conv_id={self.conv}"
        if self.seqs:
            query += f"&since={self.seqs[-1]}"
        if self.epoch is not None:
            query += f"&epoch={self.epoch}"
        return self.ws_url(query)

    async def run(self, until_seq: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (self.seqs and self.seqs[-1] >= until_seq):
            if time.monotonic() > deadline:
                raise TimeoutError(f"client stuck at seq {self.seqs[-1:]} (closes {self.closes})")
            try:
                client = await WsClient.connect(self.url())
            except (OSError, websockets.InvalidHandshake, TimeoutError):
                await asyncio.sleep(random.uniform(0.05, 0.2))  # nginx 502 while no gateway takes it
                continue
            try:
                while not (self.seqs and self.seqs[-1] >= until_seq):
                    self._on(await client.next(timeout=max(0.1, deadline - time.monotonic())))
                await client.close()
            except websockets.ConnectionClosed:
                rcvd = client.ws.protocol.close_rcvd
                self.closes.append(rcvd.code if rcvd is not None else None)
                await asyncio.sleep(random.uniform(0.05, 0.3))  # a real client's jittered reconnect

    def _on(self, obj: dict[str, Any]) -> None:
        kind = obj["type"]
        if kind == "ws.hello":
            self.gateway_ids.append(obj["gateway_id"])
        elif kind == "ws.subscribed":
            assert self.epoch in (None, obj["epoch"]), obj
            self.epoch = obj["epoch"]
            self.connected.set()
        elif kind == "ws.reset":
            self.resets.append(obj)
        elif not kind.startswith("ws."):
            expected = self.seqs[-1] + 1 if self.seqs else 1
            assert obj["seq"] == expected, f"got seq {obj['seq']}, expected {expected} (closes {self.closes})"
            self.seqs.append(obj["seq"])


async def publish(http: httpx.AsyncClient, conv: str, i: int, deadline: float) -> dict[str, Any]:
    """Publish event ``i`` (id ``e{i}``) through the balancer until it lands (its id makes retries idempotent)."""
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = await http.post(f"/v1/conversations/{conv}/events",
                                json={"type": "chat.msg", "data": {"i": i}, "id": f"e{i}"})
            if r.status_code == 200:
                body: dict[str, Any] = r.json()
                return body
            last = (r.status_code, r.text[:200])
        except httpx.HTTPError as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise TimeoutError(f"publish {i} never succeeded: {last!r}")
