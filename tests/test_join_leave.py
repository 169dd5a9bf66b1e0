"""Users in presence and ws.join / ws.leave across THREE real gateway processes on the local Redis.

Each gateway: ``--auth-secret``, a namespaces file turning ``presence_users`` and
``join_leave`` on for ``jl-*`` only, a profile hiding ``ws.*``, a 2 s presence TTL and
a 1 s join/leave delay. Real websocket clients carry tokens whose ``sub`` is the user.
Every watcher's objects are recorded with their arrival time, so the test checks the
whole sequence at the end: one join per user however many connections it opens, a
leave only once its last connection is gone (and at least the delay later), nothing
for a reconnect within the delay, leaves for the users of a SIGKILLed gateway once its
presence expires, nothing for a profile excluding ``ws.*``, a ``types`` filter or a
conversation with the options off.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.support.gateway import GatewayProcess
from tests.support.polling import async_wait_until
from tests.support.wsclient import WsClient

pytestmark = pytest.mark.timeout(120)

SECRET = "join-leave-test-secret-of-some-length"
DELAY = 1.0
TTL = 2.0


def token(sub: str, info: Any = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 600, "convs": ["*"],
                              "profiles": ["default", "quiet"]}
    if info is not None:
        claims["info"] = info
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Watcher:
    """A websocket client whose every object is recorded, with its arrival time, by a reader task."""

    def __init__(self, client: WsClient) -> None:
        self.client = client
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, gateway: GatewayProcess, query: str) -> Watcher:
        watcher = cls(await WsClient.connect(gateway.ws_url(query)))
        await async_wait_until(lambda: watcher.kinds("ws.subscribed"), timeout=10, message=f"{query} subscribed")
        return watcher

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                obj = await self.client.next(timeout=3600)
                self.seen.append((time.monotonic(), obj))

    def kinds(self, *kinds: str) -> list[tuple[float, dict[str, Any]]]:
        return [(at, obj) for at, obj in self.seen if obj["type"] in kinds]

    def presence_events(self, user: str | None = None) -> list[tuple[str, str]]:
        return [(obj["type"], obj["user"]) for _, obj in self.kinds("ws.join", "ws.leave")
                if user is None or obj["user"] == user]

    async def wait_for(self, kind: str, user: str, timeout: float = 20.0) -> tuple[float, dict[str, Any]]:
        def found() -> tuple[float, dict[str, Any]] | None:
            hits = [(at, obj) for at, obj in self.kinds(kind) if obj["user"] == user]
            return hits[0] if hits else None

        hit = await async_wait_until(found, timeout=timeout, message=f"{kind} of {user}")
        assert hit is not None
        return hit

    async def close(self) -> None:
        await self.client.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def user_counts(http: httpx.AsyncClient, gateway: GatewayProcess, conv: str) -> dict[str, int]:
    body = (await http.get(f"{gateway.http_url}/v1/conversations/{conv}/presence",
                           params={"token": token("reader")})).json()
    return {u["user"]: u["connections"] for u in body.get("users", [])}


async def wait_counts(http: httpx.AsyncClient, gateway: GatewayProcess, conv: str, want: dict[str, int]
                      ) -> dict[str, int]:
    async def fetch() -> dict[str, int]:
        return await user_counts(http, gateway, conv)

    return await async_wait_until(fetch, timeout=20, message=f"users of {conv} to include {want}",
                                  until=lambda got: all(got.get(u, 0) == n for u, n in want.items()))


@pytest.fixture
def config(tmp_path: Path) -> list[str]:
    namespaces = tmp_path / "namespaces.toml"
    namespaces.write_text('[namespaces."jl-*"]\npresence_users = true\njoin_leave = true\n')
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[profiles.quiet]\nexclude = ["ws.*"]\n')
    return ["--auth-secret", SECRET, "--namespaces", str(namespaces), "--profiles", str(profiles),
            "--presence-ttl", str(TTL), "--join-leave-delay", str(DELAY)]


async def test_users_joins_and_leaves_across_three_gateways(redis_url: str, key_prefix: str,
                                                            config: list[str]) -> None:
    gateways = [GatewayProcess("--redis-url", redis_url, "--key-prefix", key_prefix, *config) for _ in range(3)]
    for g in gateways:
        g.process.start()
    g1, g2, g3 = gateways
    clients: list[Watcher] = []

    async def open_(gateway: GatewayProcess, user: str, conv: str = "jl-room", extra: str = "",
                    info: Any = None) -> Watcher:
        watcher = await Watcher.open(gateway, f"conv_id={conv}&token={token(user, info)}{extra}")
        clients.append(watcher)
        return watcher

    try:
        for g in gateways:
            g.wait_healthy(timeout=60)  # three processes starting at once on a loaded 2-core machine
        async with httpx.AsyncClient(timeout=10) as http:
            w = await open_(g1, "watch")
            quiet = await open_(g1, "hush", extra="&profile=quiet")
            typed = await open_(g1, "typed", extra="&types=chat.*")
            plain = await open_(g1, "plainwatch", conv="plain-room")
            plain_u1 = await open_(g2, "u1", conv="plain-room")

            # u1's first connection (gateway 2) is announced to the watcher on gateway 1, with its info
            u1a = await open_(g2, "u1", info={"name": "User One"})
            _, joined = await w.wait_for("ws.join", "u1")
            assert joined == {"type": "ws.join", "conv_id": "jl-room", "user": "u1", "info": {"name": "User One"}}

            # a second connection on gateway 3: counted in presence, no second join
            await open_(g3, "u1")  # dies with gateway 3
            counts = await wait_counts(http, g1, "jl-room", {"u1": 2, "watch": 1, "hush": 1, "typed": 1})
            assert "plainwatch" not in counts
            u2 = await open_(g2, "u2")
            await w.wait_for("ws.join", "u2")  # g2 and g3 reported u1 before: a second u1 join would be here
            body = (await http.get(f"{g3.http_url}/v1/conversations/jl-room/presence",
                                   params={"token": token("reader")})).json()
            assert body["users"][0] == {"user": "u1", "connections": 2, "info": {"name": "User One"}}
            assert body["users_total"] == 5 and body["users_truncated"] is False
            assert body["connections"] == 6
            cut = (await http.get(f"{g2.http_url}/v1/conversations/jl-room/presence",
                                  params={"token": token("reader"), "users_limit": "2"})).json()
            assert [u["user"] for u in cut["users"]] == ["u1", "hush"]
            assert (cut["users_total"], cut["users_truncated"]) == (5, True)
            off = (await http.get(f"{g1.http_url}/v1/conversations/plain-room/presence",
                                  params={"token": token("reader")})).json()
            assert off == {"conv_id": "plain-room", "connections": 2, "by_profile": {"default": 2}}

            # u1 closes one of two connections: no leave
            await u1a.close()
            await wait_counts(http, g1, "jl-room", {"u1": 1})

            # u2 flaps: gone from gateway 2, back on gateway 1 within the delay
            await u2.close()
            u2 = await open_(g1, "u2")
            await wait_counts(http, g1, "jl-room", {"u2": 1})

            # u3 on gateway 3, then gateway 3 is SIGKILLed holding u3 and u1's last connection
            await open_(g3, "u3")
            await w.wait_for("ws.join", "u3")
            killed = time.monotonic()
            g3.kill()
            left_u3, _ = await w.wait_for("ws.leave", "u3", timeout=TTL * 2 + DELAY + 15)
            left_u1, _ = await w.wait_for("ws.leave", "u1", timeout=10)
            assert left_u3 - killed >= DELAY and left_u1 - killed >= DELAY
            await wait_counts(http, g1, "jl-room", {"u1": 0, "u3": 0, "u2": 1})

            # u2's last connection goes: its leave comes at least the delay later
            gone = time.monotonic()
            await u2.close()
            left_u2, leave = await w.wait_for("ws.leave", "u2")
            assert leave == {"type": "ws.leave", "conv_id": "jl-room", "user": "u2"}
            assert left_u2 - gone >= DELAY * 0.9

            for user in ("u1", "u2", "u3"):
                assert w.presence_events(user) == [("ws.join", user), ("ws.leave", user)], user
            for watcher in (quiet, typed, plain, plain_u1):
                assert watcher.presence_events() == [], "excluded by profile, types, or the options off"
    finally:
        for watcher in clients:
            with contextlib.suppress(Exception):
                await watcher.close()
        for g in gateways:
            g.stop()


async def test_one_gateway_on_the_memory_backend(tmp_path: Path) -> None:
    """No Redis: the embedded backend keeps users and announces joins and leaves in process."""
    from broadcaster.backend import BackendSettings
    from broadcaster.backends.memory import MemoryBackend
    from broadcaster.namespaces import parse_namespaces
    from gateway.settings import Settings
    from tests.support.gateway import InProcessGateway
    from tests.support.sseclient import SseClient, SseEvent

    namespaces = tuple(parse_namespaces({"namespaces": {"jl-*": {"presence_users": True, "join_leave": True}}}))
    path = tmp_path / "namespaces.toml"
    path.write_text('[namespaces."jl-*"]\npresence_users = true\njoin_leave = true\n')
    settings = Settings(auth_secret=SECRET, namespaces=str(path), presence_ttl=TTL, join_leave_delay=0.3,
                        drain_seconds=0.5)
    async with InProcessGateway(settings, backend=MemoryBackend(BackendSettings(namespaces=namespaces))) as gw:
        w = await WsClient.connect(gw.ws_url(f"conv_id=jl-1&token={token('watch')}"))
        u = await WsClient.connect(gw.ws_url(f"conv_id=jl-1&token={token('u1', {'n': 1})}"))
        got = await w.until(lambda objs: bool(objs), 10,
                            keep=lambda o: o["type"] == "ws.join" and o["user"] == "u1")
        assert got[0]["info"] == {"n": 1}
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            body = (await http.get("/v1/conversations/jl-1/presence", params={"token": token("r")})).json()
        assert {x["user"]: x["connections"] for x in body["users"]} == {"u1": 1, "watch": 1}
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            exposition = (await http.get("/metrics")).text
        sent = re.search(r'^broadcaster_presence_sent_total\{kind="join"\} (\S+)$', exposition, re.M)
        assert sent is not None and float(sent.group(1)) >= 1, exposition[-2000:]
        await u.close()
        await w.until(lambda objs: bool(objs), 10, keep=lambda o: o["type"] == "ws.leave" and o["user"] == "u1")
        # an SSE stream is a subscriber like any other: it gets them as events without an id
        async with await SseClient.open(gw.settings.port, f"/sse?conv_id=jl-1&token={token('streamer')}") as sse:
            async def next_of(kind: str) -> SseEvent:
                while True:  # every read has its own deadline
                    event = await sse.next(10)
                    if event.event == kind:
                        return event

            await next_of("ws.subscribed")
            u2 = await WsClient.connect(gw.ws_url(f"conv_id=jl-1&token={token('u2')}"))
            event = await next_of("ws.join")
            while event.json()["user"] != "u2":  # the stream's own user joins first
                event = await next_of("ws.join")
            assert event.id is None and event.json() == {"type": "ws.join", "conv_id": "jl-1", "user": "u2"}
            await u2.close()
            event = await next_of("ws.leave")
            assert event.json() == {"type": "ws.leave", "conv_id": "jl-1", "user": "u2"}
        await w.close()
