"""Users in presence (issue #16 point 5) and the join / leave bookkeeping under it, below the gateway.

The namespace options; the hub's incremental user counts; the backends' user reports
and reads (memory on a controllable clock, real Redis on its own clock): sums across
gateways, info, expiry, the caps, and the debounced transitions of
``presence_users_report.lua`` and its Python twin.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from broadcaster import backend as backend_module
from broadcaster.backend import Backend, BackendSettings, PresenceTransition, UserReport
from broadcaster.backends import scripts
from broadcaster.backends.memory import MemoryBackend
from broadcaster.backends.redis import RedisBackend
from broadcaster.hub import Hub
from broadcaster.namespaces import PolicyTable, parse_namespaces
from broadcaster.presence import JoinLeave, PresenceReporter
from broadcaster.profiles import GlobSet, Profile
from tests.support.polling import async_wait_until

pytestmark = pytest.mark.timeout(60)


# ---- namespace options -------------------------------------------------------------------


def test_options_parse_resolve_and_stay_out_of_the_fingerprint() -> None:
    doc = {"namespaces": {"room-*": {"presence_users": True, "join_leave": True, "history_size": 5},
                          "*": {"presence_users": True}}}
    namespaces = parse_namespaces(doc)
    default = BackendSettings().default_policy()
    table = PolicyTable(default, namespaces)
    room, other = table.resolve("room-1"), table.resolve("lobby")
    assert (room.presence_users, room.join_leave, room.delta) == (True, True, False)
    assert (other.presence_users, other.join_leave) == (True, False)
    plain = PolicyTable(default, parse_namespaces({"namespaces": {"room-*": {"history_size": 5}, "*": {}}}))
    assert plain.fingerprint == table.fingerprint, "delivery options must not change the storage policy"
    assert not PolicyTable(default).resolve("room-1").join_leave


@pytest.mark.parametrize("field", ["presence_users", "join_leave"])
@pytest.mark.parametrize("value", [1, "yes", 0])
def test_options_must_be_booleans(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf'\[namespaces\."a-\*"\]: {field} must be true or false'):
        parse_namespaces({"namespaces": {"a-*": {field: value}}})


def test_unknown_field_names_the_new_options() -> None:
    with pytest.raises(ValueError, match=r"known: .*presence_users, join_leave"):
        parse_namespaces({"namespaces": {"a-*": {"join_leaves": True}}})


# ---- the hub counts users as members join and leave --------------------------------------


@dataclass(eq=False)
class FakeSub:
    connection_id: str
    user: str | None = None
    info: Any = None

    def __post_init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


async def test_hub_counts_users_incrementally_and_sends_control_objects_by_filter() -> None:
    backend = MemoryBackend()
    await backend.start()
    hub = Hub(backend, gateway_id="g")
    try:
        plain, hidden = Profile("default"), Profile("quiet", exclude=GlobSet(["ws.*"]))
        a1, a2 = FakeSub("1", "alice", {"name": "A"}), FakeSub("2", "alice")
        bob, anon, quiet = FakeSub("3", "bob"), FakeSub("4"), FakeSub("5", "carol")
        narrow = FakeSub("6", "dave")
        for sub in (a1, a2, bob, anon):
            await hub.subscribe(sub, "room", plain)
        await hub.subscribe(quiet, "room", hidden)
        await hub.subscribe(narrow, "room", plain, types=GlobSet(["chat.*"]))
        assert hub.presence_users("room") == {"alice": (2, {"name": "A"}), "bob": (1, None), "carol": (1, None),
                                              "dave": (1, None)}
        a1.user = "mallory"  # read once, at subscribe: a later change does not move the counts
        await hub.unsubscribe(a1, "room")
        await hub.unsubscribe(bob, "room")
        assert hub.presence_users("room") == {"alice": (1, {"name": "A"}), "carol": (1, None), "dave": (1, None)}

        assert hub.broadcast_control("room", "ws.join", user="zed") == 2  # a2 and anon; not quiet, not narrow
        assert a2.sent[-1] == b'{"type":"ws.join","conv_id":"room","user":"zed"}'
        assert anon.sent[-1] == a2.sent[-1]
        assert not any(b"ws.join" in m for m in quiet.sent + narrow.sent)
        assert hub.broadcast_control("nobody-here", "ws.join", user="zed") == 0
        for sub in (a2, anon, quiet, narrow):
            await hub.unsubscribe(sub, "room")
        assert hub.presence_users("room") == {}
    finally:
        await hub.close()
        await backend.close()


async def test_a_member_replaying_history_gets_the_control_object_queued_in_order() -> None:
    backend = MemoryBackend()
    await backend.start()
    hub = Hub(backend, gateway_id="g")
    try:
        for i in range(3):
            await backend.publish("room", "chat.msg", {"i": i})
        watcher = FakeSub("w", "walt")
        await hub.subscribe(watcher, "room", Profile("default"))
        late = FakeSub("l", "lisa")
        original = backend.history
        gate = asyncio.Event()

        async def slow_history(conv: str, since: int = 0, limit: int | None = None) -> Any:
            page = await original(conv, since, limit)
            await gate.wait()
            return page

        backend.history = slow_history  # type: ignore[method-assign]
        task = asyncio.create_task(hub.subscribe(late, "room", Profile("default"), since=0))
        await async_wait_until(lambda: any(b"ws.subscribed" in m for m in late.sent), timeout=5,
                               message="the late subscriber's preamble to start")
        assert hub.broadcast_control("room", "ws.leave", user="zed") == 2
        gate.set()
        await task
        kinds = [m.split(b'"type":"')[1].split(b'"')[0] for m in late.sent]
        assert kinds == [b"ws.subscribed", b"chat.msg", b"chat.msg", b"chat.msg", b"ws.leave"]
    finally:
        await hub.close()
        await backend.close()


# ---- backends: users, expiry, caps, transitions --------------------------------------------


@dataclass
class Rig:
    """A backend and a way to let time pass: the memory backend's clock moves, Redis' clock is waited for."""

    backend: Backend
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
async def rig(request: pytest.FixtureRequest, redis_url: str, key_prefix: str) -> AsyncIterator[Rig]:
    if request.param == "memory":
        now = [1000.0]

        async def move(seconds: float) -> None:
            now[0] += seconds

        backend: Backend = MemoryBackend(clock=lambda: now[0])
        advance = move
    else:
        backend = RedisBackend(redis_url, key_prefix=key_prefix)

        async def wait(seconds: float) -> None:
            end = time.monotonic() + seconds
            await async_wait_until(lambda: time.monotonic() >= end, timeout=seconds + 5,
                                   message=f"{seconds}s of Redis time to pass", interval=0.01)

        advance = wait
    await backend.start()
    try:
        yield Rig(backend, advance)
    finally:
        await backend.close()


async def test_users_are_summed_over_gateways_with_info_and_expire(rig: Rig) -> None:
    b = rig.backend
    await b.report_presence_users("g1", {"room": {"alice": (2, {"name": "Alice"}), "bob": (1, None)}}, 0.6,
                                  leave_delay=0)
    await b.report_presence_users("g2", {"room": {"alice": (1, None), "carol": (3, [1, "x"])}}, 30, leave_delay=0)
    found = await b.presence_users("room")
    assert [(u.user, u.connections, u.info) for u in found.users] == [
        ("alice", 3, {"name": "Alice"}), ("carol", 3, [1, "x"]), ("bob", 1, None)]
    assert (found.total, found.truncated) == (3, False)
    top = await b.presence_users("room", limit=1)
    assert ([u.user for u in top.users], top.total, top.truncated) == (["alice"], 3, True)

    await b.report_presence_users("g2", {"room": {"carol": (0, None)}}, 30, leave_delay=0)  # zero: gone
    await rig.advance(0.8)  # g1's report (ttl 0.6 s) expires: a crashed gateway's users vanish
    found = await b.presence_users("room")
    assert [(u.user, u.connections) for u in found.users] == [("alice", 1)]
    assert (await b.presence_users("elsewhere")).total == 0


async def test_info_too_large_or_not_json_is_left_out(rig: Rig) -> None:
    huge = {"blob": "x" * (backend_module.MAX_INFO_BYTES + 10)}
    await rig.backend.report_presence_users("g", {"room": {"a": (1, huge), "b": (1, object())}}, 30, leave_delay=0)
    assert {(u.user, u.info) for u in (await rig.backend.presence_users("room")).users} == {("a", None), ("b", None)}


async def test_caps_reported_users_and_stored_fields(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scripts, "MAX_REPORTED_USERS", 5)
    monkeypatch.setattr(scripts, "MAX_USER_FIELDS", 8)
    from broadcaster.backends import memory

    monkeypatch.setattr(memory, "MAX_REPORTED_USERS", 5)
    monkeypatch.setattr(memory, "MAX_USER_FIELDS", 8)
    many = {f"u{i:02}": (100 - i, None) for i in range(20)}
    await rig.backend.report_presence_users("g1", {"room": many}, 30, leave_delay=0)
    found = await rig.backend.presence_users("room")
    assert [u.user for u in found.users] == ["u00", "u01", "u02", "u03", "u04"], "the most connected are reported"
    await rig.backend.report_presence_users("g2", {"room": many}, 30, leave_delay=0)
    found = await rig.backend.presence_users("room")
    assert found.total == 5 and sum(u.connections for u in found.users) == sum(100 - i for i in range(5)) + sum(
        100 - i for i in range(3)), "past 8 fields, g2's new users are not stored"
    await rig.backend.report_presence_users("g1", {"room": {u: (0, None) for u in many}}, 30, leave_delay=0)
    await rig.backend.report_presence_users("g2", {"room": many}, 30, leave_delay=0)  # fields freed: all five in
    assert [u.connections for u in (await rig.backend.presence_users("room")).users] == [100, 99, 98, 97, 96]


def kinds(report: UserReport) -> list[tuple[str, str]]:
    return sorted((t.kind, t.user) for t in report.transitions)


async def test_joins_and_debounced_leaves(rig: Rig) -> None:
    b, delay = rig.backend, 0.5

    async def report(gateway: str, users: dict[str, tuple[int, Any]]) -> UserReport:
        return (await b.report_presence_users(gateway, {"room": users}, 30, leave_delay=delay,
                                              announce={"room"}))["room"]

    first = await report("g1", {"alice": (1, {"n": 1}), "bob": (1, None)})
    assert kinds(first) == [("join", "alice"), ("join", "bob")]
    assert {t.user: t.info for t in first.transitions} == {"alice": {"n": 1}, "bob": None}
    assert first.next_check is None
    assert kinds(await report("g2", {"alice": (1, None)})) == [], "a second connection elsewhere: no second join"
    assert kinds(await report("g1", {"alice": (0, None), "bob": (1, None)})) == [], "alice still on g2"
    gone = await report("g2", {"alice": (0, None)})
    assert kinds(gone) == [] and gone.next_check is not None and 0 < gone.next_check <= delay, \
        "alice's leave waits for the delay"
    back = await report("g2", {"alice": (1, None)})
    assert kinds(back) == [] and back.next_check is None, "back within the delay: no leave, no join"
    await rig.advance(delay + 0.2)
    assert kinds(await report("g1", {"bob": (1, None)})) == []
    left = await report("g2", {"alice": (0, None)})
    assert kinds(left) == []
    started = time.monotonic()
    await rig.advance(delay + 0.1)
    after = await report("g1", {"bob": (1, None)})
    assert kinds(after) == [("leave", "alice")] and after.next_check is None
    assert isinstance(rig.backend, MemoryBackend) or time.monotonic() - started >= delay
    assert kinds(await report("g1", {"bob": (1, None)})) == [], "a leave is found once"
    assert kinds(await report("g3", {"alice": (1, None)})) == [("join", "alice")], "a new visit joins again"


async def test_a_crashed_gateways_users_leave_after_its_ttl(rig: Rig) -> None:
    b = rig.backend
    await b.report_presence_users("g1", {"room": {"u3": (1, None)}}, 0.5, leave_delay=0.2, announce={"room"})
    quiet = await b.report_presence_users("g2", {"room": {"u1": (1, None)}}, 30, leave_delay=0.2, announce={"room"})
    assert kinds(quiet["room"]) == [("join", "u1")]
    await rig.advance(0.6)  # g1 died: its field expires, g2's sweep notices, the leave waits for the delay
    assert [u.user for u in (await b.presence_users("room")).users] == ["u1"], "a read skips (never drops) it"
    noticed = (await b.report_presence_users("g2", {"room": {"u1": (1, None)}}, 30, leave_delay=0.2,
                                             announce={"room"}))["room"]
    assert kinds(noticed) == [] and noticed.next_check is not None
    await rig.advance(0.3)
    late = await b.report_presence_users("g2", {"room": {"u1": (1, None)}}, 30, leave_delay=0.2, announce={"room"})
    assert kinds(late["room"]) == [("leave", "u3")]


async def test_transitions_are_capped_per_report(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scripts, "MAX_TRANSITIONS", 3)
    from broadcaster.backends import memory

    monkeypatch.setattr(memory, "MAX_TRANSITIONS", 3)
    users = {f"u{i}": (1, None) for i in range(7)}
    seen: list[tuple[str, str]] = []
    for _ in range(3):
        found = (await rig.backend.report_presence_users("g", {"room": users}, 30, leave_delay=0,
                                                         announce={"room"}))["room"]
        seen += kinds(found)
        if len(seen) < 7:
            assert len(found.transitions) == 3 and found.next_check == 0, "cut: report again at once"
    assert sorted(seen) == [("join", f"u{i}") for i in range(7)]


async def test_without_announce_nothing_is_tracked(rig: Rig) -> None:
    found = await rig.backend.report_presence_users("g", {"room": {"a": (1, None)}}, 30, leave_delay=0)
    assert found["room"] == UserReport()
    joined = await rig.backend.report_presence_users("g", {"room": {"a": (1, None)}}, 30, leave_delay=0,
                                                     announce={"room"})
    assert kinds(joined["room"]) == [("join", "a")], "never announced before: the first sweep joins"


# ---- the reporter and JoinLeave ----------------------------------------------------------


async def test_reporter_reports_users_schedules_leaves_and_announces() -> None:
    policies = PolicyTable(BackendSettings().default_policy(),
                           parse_namespaces({"namespaces": {"jl-*": {"join_leave": True},
                                                            "pu-*": {"presence_users": True}}}))
    backend = MemoryBackend()
    await backend.start()
    hub = Hub(backend, gateway_id="g")
    join_leave = JoinLeave(backend, hub, policies)
    announced: list[PresenceTransition] = []

    async def sink(transitions: list[PresenceTransition]) -> None:
        announced.extend(transitions)
        await join_leave.announce(transitions)

    reporter = PresenceReporter(hub, backend, "g", heartbeat=5, ttl=15, flush_interval=0.02, policies=policies,
                                leave_delay=0.3, on_transitions=sink)
    received: list[dict[str, Any]] = []
    backend.add_control_listener(received.append)
    join_leave.listen()
    task = asyncio.create_task(reporter.run())
    try:
        watcher, alice = FakeSub("w", "walt"), FakeSub("a", "alice", {"x": 1})
        await hub.subscribe(watcher, "jl-1", Profile("default"))
        await hub.subscribe(alice, "jl-1", Profile("default"))
        await hub.subscribe(FakeSub("p", "pat"), "pu-1", Profile("default"))
        await hub.subscribe(FakeSub("o", "olga"), "other", Profile("default"))
        await async_wait_until(lambda: b'{"type":"ws.join","conv_id":"jl-1","user":"alice","info":{"x":1}}'
                               in watcher.sent, timeout=5, message="alice's join to reach walt")
        assert {"kind": "join", "conv_id": "jl-1", "user": "alice", "info": {"x": 1}} in received
        assert [u.user for u in (await backend.presence_users("pu-1")).users] == ["pat"]
        assert (await backend.presence_users("other")).total == 0, "options off: users not reported"
        assert all(t.conv == "jl-1" for t in announced), "presence_users alone announces nothing"
        await hub.unsubscribe(alice, "jl-1")
        left_at = time.monotonic()
        await async_wait_until(lambda: b'{"type":"ws.leave","conv_id":"jl-1","user":"alice"}' in watcher.sent,
                               timeout=5, message="alice's leave, brought forward to the end of the delay")
        assert time.monotonic() - left_at >= 0.25
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await hub.close()
        await backend.close()


@pytest.fixture
async def redis_b(redis_url: str, key_prefix: str) -> AsyncIterator[RedisBackend]:
    """A started RedisBackend under the test's key prefix, closed after."""
    b = RedisBackend(redis_url, key_prefix=key_prefix)
    await b.start()
    try:
        yield b
    finally:
        await b.close()


ROOM_ANNOUNCED: dict[str, Any] = {"leave_delay": 0, "announce": {"room"}}


async def outlive(seconds: float, what: str) -> None:
    """Return once ``seconds`` have passed (a report's ttl running out)."""
    end = time.monotonic() + seconds
    await async_wait_until(lambda: time.monotonic() >= end, timeout=5, message=what)


async def test_a_report_without_sweep_leaves_expired_fields_to_a_later_one(redis_b: RedisBackend) -> None:
    b, args = redis_b, ROOM_ANNOUNCED
    await b.report_presence_users("g1", {"room": {"gone": (1, None)}}, 0.3, **args)
    await b.report_presence_users("g2", {"room": {"stay": (1, None)}}, 30, **args)
    await outlive(0.5, "g1's report to expire")
    partial = await b.report_presence_users("g2", {"room": {}}, 30, sweep=(), **args)
    assert kinds(partial["room"]) == [], "no sweep: the expired field is not looked at"
    swept = await b.report_presence_users("g2", {"room": {}}, 30, **args)
    assert kinds(swept["room"]) == [("leave", "gone")]


async def test_every_gateway_gone_for_a_ttl_then_one_back(redis_b: RedisBackend) -> None:
    """The users hash expired whole while users were announced: the next report departs them all."""
    b, args = redis_b, ROOM_ANNOUNCED
    await b.report_presence_users("g1", {"room": {"old": (1, None)}}, 0.3, **args)
    await outlive(0.5, "everything to expire")
    back = await b.report_presence_users("g2", {"room": {"new": (1, None)}}, 30, **args)
    assert kinds(back["room"]) == [("join", "new"), ("leave", "old")]


class RecordingMemory(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.user_reports: list[tuple[dict[str, dict[str, int]], Any]] = []

    async def report_presence_users(self, gateway_id: str, reports: Any, ttl: float, *, leave_delay: float,
                                    announce: Any = (), sweep: Any = None) -> dict[str, UserReport]:
        self.user_reports.append(({c: {u: n for u, (n, _) in users.items()} for c, users in reports.items()},
                                  None if sweep is None else set(sweep)))
        return await super().report_presence_users(gateway_id, reports, ttl, leave_delay=leave_delay,
                                                   announce=announce, sweep=sweep)


async def test_reporter_sends_changes_on_flush_and_everyone_on_heartbeat() -> None:
    policies = PolicyTable(BackendSettings().default_policy(),
                           parse_namespaces({"namespaces": {"*": {"presence_users": True}}}))
    backend = RecordingMemory()
    await backend.start()
    hub = Hub(backend, gateway_id="g")
    reporter = PresenceReporter(hub, backend, "g", heartbeat=60, ttl=180, flush_interval=0.01, policies=policies)
    try:
        subs = [FakeSub(str(i), f"u{i}") for i in range(3)]
        for sub in subs:
            await hub.subscribe(sub, "room", Profile("default"))
        await reporter.report(hub.take_dirty(), full={"room"})
        assert backend.user_reports[-1] == ({"room": {"u0": 1, "u1": 1, "u2": 1}}, {"room"})
        await hub.subscribe(FakeSub("x", "u1"), "room", Profile("default"))
        await hub.unsubscribe(subs[2], "room")
        await reporter.report(hub.take_dirty(), full=set())
        assert backend.user_reports[-1] == ({"room": {"u1": 2, "u2": 0}}, set()), "only the changes"
        assert {u.user: u.connections for u in (await backend.presence_users("room")).users} == {"u0": 1, "u1": 2}
        await reporter.withdraw()
        assert backend.user_reports[-1][0] == {"room": {"u0": 0, "u1": 0}}
        assert (await backend.presence_users("room")).total == 0
    finally:
        await hub.close()
        await backend.close()


async def test_users_read_is_shared_for_a_second() -> None:
    backend = MemoryBackend()
    await backend.start()
    calls = 0
    original = backend.presence_users

    async def counting(conv: str, limit: int = 100) -> Any:
        nonlocal calls
        calls += 1
        return await original(conv, limit)

    backend.presence_users = counting  # type: ignore[method-assign]
    reporter = PresenceReporter(Hub(backend, gateway_id="g"), backend, "g")
    try:
        await backend.report_presence_users("g", {"room": {"a": (1, None)}}, 30, leave_delay=0)
        reads = await asyncio.gather(*(reporter.read_users("room", 10) for _ in range(20)))
        assert calls == 1 and all(r.total == 1 for r in reads)
        await reporter.read_users("room", 5)
        assert calls == 2, "another limit is another read"
    finally:
        await backend.close()


async def test_too_many_changes_between_flushes_make_a_full_report(monkeypatch: pytest.MonkeyPatch) -> None:
    from broadcaster import hub as hub_module

    monkeypatch.setattr(hub_module, "MAX_USER_CHANGES", 5)
    policies = PolicyTable(BackendSettings().default_policy(),
                           parse_namespaces({"namespaces": {"*": {"join_leave": True}}}))
    backend = RecordingMemory()
    await backend.start()
    hub = Hub(backend, gateway_id="g")
    reporter = PresenceReporter(hub, backend, "g", policies=policies)
    try:
        await hub.subscribe(FakeSub("a", "alice"), "room", Profile("default"))
        assert hub.take_user_changes("room") == {"alice": (1, None)}
        assert hub.take_user_changes("room") == {}
        for i in range(8):
            await hub.subscribe(FakeSub(str(i), f"u{i}"), "room", Profile("default"))
        assert hub.take_user_changes("room") is None, "past the cap: no list, report everyone"
        await hub.subscribe(FakeSub("b", "bob"), "room", Profile("default"))
        for i in range(8):
            await hub.subscribe(FakeSub(f"x{i}", f"v{i}"), "room", Profile("default"))
        await reporter.report(hub.take_dirty(), full=set())
        reported = backend.user_reports[-1][0]["room"]
        assert len(reported) == 18 and set(reported) >= {"alice", "bob", "v7"}
        found = await backend.report_presence_users("g", {"room": {}}, 30, leave_delay=0, announce={"room"})
        assert found["room"].transitions == [], "every user was joined by the full report"
    finally:
        await hub.close()
        await backend.close()


def test_every_presence_users_key_shares_the_conversations_slot() -> None:
    from redis.crc import key_slot

    from broadcaster.keys import KeyLayout

    layout, conv = KeyLayout("bc"), "c-1"
    names = [layout.meta(conv), layout.presence(conv), layout.presence_users(conv), layout.presence_announced(conv),
             layout.presence_leaving(conv), layout.presence_gateways(conv), layout.presence_sweep(conv)]
    assert len({key_slot(n.encode()) for n in names}) == 1


async def test_user_reports_on_a_cluster_one_pipeline_over_every_shard() -> None:
    import secrets

    from redis.crc import key_slot

    from tests.support.redis_server import RedisClusterNodes

    with RedisClusterNodes(masters=3) as cluster:
        b = RedisBackend(cluster.url, key_prefix="t" + secrets.token_hex(4))
        await b.start()
        try:
            convs = [f"room-{i}" for i in range(12)]
            slots = {key_slot(b.layout.presence_users(c).encode()) * 3 // 16384 for c in convs}
            assert len(slots) == 3, "the conversations cover every shard"
            reports = {conv: {"alice": (1, {"c": conv}), f"own-{conv}": (2, None)} for conv in convs}
            found = await b.report_presence_users("g1", reports, 30, leave_delay=0, announce=set(convs))
            assert all(kinds(found[c]) == [("join", "alice"), ("join", f"own-{c}")] for c in convs)
            for conv in convs:
                users = await b.presence_users(conv)
                assert [(u.user, u.connections, u.info) for u in users.users] == [
                    (f"own-{conv}", 2, None), ("alice", 1, {"c": conv})]
            gone = await b.report_presence_users("g1", {c: {"alice": (0, None)} for c in convs}, 30, leave_delay=0,
                                                 announce=set(convs))
            assert all(kinds(gone[c]) == [("leave", "alice")] for c in convs)
        finally:
            await b.close()


async def test_join_leave_drops_a_failed_batch_and_ignores_other_messages() -> None:
    policies = PolicyTable(BackendSettings().default_policy(),
                           parse_namespaces({"namespaces": {"jl-*": {"join_leave": True}}}))
    backend = MemoryBackend()
    await backend.start()
    hub = Hub(backend, gateway_id="g")
    calls = 0

    async def failing(message: Any) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("redis down")

    backend.publish_control = failing  # type: ignore[method-assign]
    join_leave = JoinLeave(backend, hub, policies)
    try:
        await join_leave.announce([PresenceTransition("join", "jl-1", f"u{i}") for i in range(50)])
        assert calls == 1 and join_leave.announced == 0, "the first failure drops the batch"
        watcher = FakeSub("w", "walt")
        await hub.subscribe(watcher, "jl-1", Profile("default"))
        await hub.subscribe(watcher, "off-1", Profile("default"))
        before = len(watcher.sent)
        ignored: list[dict[str, Any]] = [
            {"kind": "disconnect", "conv_id": "jl-1", "user": "x"}, {"kind": "join", "conv_id": "jl-1"},
            {"kind": "join", "conv_id": "off-1", "user": "x"}, {"kind": "leave", "conv_id": 5, "user": "x"}]
        for message in ignored:
            join_leave.on_control(message)
        assert len(watcher.sent) == before
        join_leave.on_control({"kind": "leave", "conv_id": "jl-1", "user": "x", "info": {"ignored": True}})
        assert watcher.sent[-1] == b'{"type":"ws.leave","conv_id":"jl-1","user":"x"}'
    finally:
        await hub.close()
        await backend.close()


async def test_redis_scripts_and_memory_backend_agree_on_random_reports(redis_url: str, key_prefix: str) -> None:
    """The same random reports (3 gateways, 6 users, partial and full, no expiry, delay 0) on both backends:
    the same transitions at every step, the same users read."""
    import random

    memory, redis_backend = MemoryBackend(), RedisBackend(redis_url, key_prefix=key_prefix)
    await memory.start()
    await redis_backend.start()
    rng = random.Random(16)
    seen: set[str] = set()
    try:
        for step in range(150):
            gateway = f"g{rng.randrange(3)}"
            users = {f"u{i}": (rng.choice([0, 0, 1, 2]), {"i": i} if i % 2 else None)
                     for i in rng.sample(range(6), rng.randrange(1, 4))}
            args: dict[str, Any] = {"leave_delay": 0, "announce": {"room"}, "sweep": rng.choice([None, ()])}
            a = (await memory.report_presence_users(gateway, {"room": users}, 600, **args))["room"]
            b = (await redis_backend.report_presence_users(gateway, {"room": users}, 600, **args))["room"]
            assert sorted((t.kind, t.user, repr(t.info)) for t in a.transitions) == \
                sorted((t.kind, t.user, repr(t.info)) for t in b.transitions), step
            seen |= {t.kind for t in a.transitions}
            ra, rb = await memory.presence_users("room"), await redis_backend.presence_users("room")
            assert [(u.user, u.connections) for u in ra.users] == [(u.user, u.connections) for u in rb.users], step
        assert seen == {"join", "leave"}
    finally:
        await memory.close()
        await redis_backend.close()
