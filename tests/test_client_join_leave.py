"""``ws.join`` / ``ws.leave`` in ``producers.client.BroadcasterClient``: :class:`Joined` / :class:`Left` items.

First against the scripted fake ``/ws`` of tests/test_client_tokens.py (exact stream order, an
unsubscribed conversation ignored), then against a real in-process gateway with
``--auth-secret``, a namespaces file turning ``join_leave`` on for ``jl-*`` (and explicitly off
for ``plain-*``) and a 0.5 s ``--join-leave-delay``: a watcher sees u2 join when u2 subscribes
and leave once u2 disconnected, and nothing of the kind on the conversation with the option off.
Every wait polls with a deadline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.settings import Settings
from producers.client import Event, Joined, Left
from tests.support.gateway import InProcessGateway
from tests.test_client import following, publish
from tests.test_client_tokens import FakeGateway, client_for, ev, running

pytestmark = pytest.mark.timeout(60)

SECRET = "client-join-leave-tests-".ljust(40, "x")
DELAY = 0.5


def token(sub: str, info: Any = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 600, "convs": ["*"], "profiles": ["default"]}
    if info is not None:
        claims["info"] = info
    return jwt.encode(claims, SECRET, algorithm="HS256")


def presence(items: list[Any], user: str | None = None) -> list[Joined | Left]:
    return [i for i in items if isinstance(i, Joined | Left) and (user is None or i.user == user)]


async def test_join_and_leave_come_in_stream_order_for_subscribed_conversations_only() -> None:
    async with FakeGateway() as fake:
        client = client_for(fake.url, ["a"])
        async with running(client) as got:
            conn = await fake.connection(0)
            await client.wait_subscribed(10)
            await conn.send(ev("a", 1),
                            {"type": "ws.join", "conv_id": "a", "user": "u2", "info": {"name": "Two"}},
                            {"type": "ws.join", "conv_id": "other", "user": "u3"},  # not subscribed: ignored
                            ev("a", 2),
                            {"type": "ws.join", "conv_id": "a", "user": "u4"},
                            {"type": "ws.leave", "conv_id": "a", "user": "u2"},
                            {"type": "ws.leave", "conv_id": "a"},  # no user: ignored
                            ev("a", 3))
            await got.wait(lambda: got.seqs("a") == [1, 2, 3], what="a's events")
            assert got.items == [got.items[0], Joined("a", "u2", {"name": "Two"}), got.items[2],
                                 Joined("a", "u4", None), Left("a", "u2"), got.items[5]]
            assert [type(i) for i in got.items] == [Event, Joined, Event, Joined, Left, Event]
            assert got.error is None


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    namespaces = tmp_path / "namespaces.toml"
    namespaces.write_text('[namespaces."jl-*"]\njoin_leave = true\n\n[namespaces."plain-*"]\njoin_leave = false\n')
    return Settings(auth_secret=SECRET, namespaces=str(namespaces), join_leave_delay=DELAY)


async def test_real_gateway_a_watcher_sees_u2_join_then_leave_and_nothing_where_the_option_is_off(
        settings: Settings) -> None:
    async with InProcessGateway(settings) as gw:
        watcher = client_for(gw.ws_url(), ["jl-room", "plain-room"], token=token("u1"))
        async with following(watcher) as a:
            other = client_for(gw.ws_url(), ["jl-room", "plain-room"], token=token("u2", {"name": "Two"}))
            async with following(other):
                await a.wait(lambda: bool(presence(a.items, "u2")), timeout=10, what="u2's join")
                assert presence(a.items, "u2") == [Joined("jl-room", "u2", {"name": "Two"})]
                await publish(gw, "jl-room", 1)  # an event between the join and the leave
                await a.wait(lambda: a.seqs("jl-room") == [1], what="the event")
            closed_at = time.monotonic()
            await a.wait(lambda: len(presence(a.items, "u2")) == 2, timeout=10, what="u2's leave")
            left_after = time.monotonic() - closed_at
            assert presence(a.items, "u2") == [Joined("jl-room", "u2", {"name": "Two"}), Left("jl-room", "u2")]
            assert left_after >= DELAY - 0.05, left_after
            order = [type(i).__name__ for i in a.items if not isinstance(i, Joined) or i.user == "u2"]
            assert order == ["Joined", "Event", "Left"]
            # the option is off for plain-*: the same connects and disconnects announced nothing there
            assert [i for i in presence(a.items) if i.conv_id != "jl-room"] == []
            # u1's own join (its subscription came first) is announced to itself, like any other
            assert presence(a.items, "u1") == [Joined("jl-room", "u1", None)]
