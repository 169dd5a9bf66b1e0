"""The pub/sub reply state machine, without sockets: commands out, parsed replies in, events back."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import MovedError, ResponseError

from broadcaster.backends.redis.protocol import (
    Broken,
    Ignored,
    Message,
    Pong,
    PubSubProtocol,
    Refused,
    StrayError,
    Subscribed,
    Unsubscribed,
)


def test_commands_are_built_and_recorded_in_order() -> None:
    plain, sharded = PubSubProtocol(sharded=False), PubSubProtocol(sharded=True)
    assert plain.subscribe([b"a", b"b"]) == ("SUBSCRIBE", b"a", b"b")
    assert plain.unsubscribe([b"a"]) == ("UNSUBSCRIBE", b"a")
    assert list(plain.pending) == [(True, b"a"), (True, b"b"), (False, b"a")]
    assert sharded.subscribe([b"c"]) == ("SSUBSCRIBE", b"c")
    assert sharded.unsubscribe([b"c"]) == ("SUNSUBSCRIBE", b"c")
    assert plain.ping() == ("PING",) and plain.pings == 1


def test_messages_of_both_kinds() -> None:
    p = PubSubProtocol(sharded=True)
    assert p.receive([b"message", b"ch", b"x"]) == Message(b"ch", b"x")
    assert p.receive([b"smessage", b"ch", b"y"]) == Message(b"ch", b"y")
    assert p.received == 2
    assert not p.pending


def test_confirmations_match_what_was_sent_and_tell_pushes_apart() -> None:
    p = PubSubProtocol(sharded=False)
    p.subscribe([b"a", b"b"])
    assert p.receive([b"subscribe", b"b", 1]) == Subscribed(b"b", True)  # out of order: still ours
    assert p.receive([b"subscribe", b"a", 2]) == Subscribed(b"a", True)
    assert p.receive([b"subscribe", b"a", 2]) == Subscribed(b"a", False)  # nothing left to answer
    p.unsubscribe([b"a"])
    assert p.receive([b"unsubscribe", b"a", 1]) == Unsubscribed(b"a", True)
    # The server dropping a channel by itself (sharded pub/sub: its slot moved).
    assert p.receive([b"sunsubscribe", b"b", 0]) == Unsubscribed(b"b", False)
    assert p.receive([b"unsubscribe", None, 0]) == Ignored([b"unsubscribe", None, 0])
    assert not p.pending


def test_a_confirmation_of_the_other_kind_does_not_consume_a_subscribe() -> None:
    p = PubSubProtocol(sharded=True)
    p.subscribe([b"a"])
    assert p.receive([b"sunsubscribe", b"a", 0]) == Unsubscribed(b"a", False)
    assert list(p.pending) == [(True, b"a")]


def test_error_replies_on_a_sharded_link_answer_the_oldest_command() -> None:
    p = PubSubProtocol(sharded=True)
    p.subscribe([b"a"])
    p.unsubscribe([b"b"])
    moved = MovedError("3999 127.0.0.1:7001")
    assert p.receive(moved) == Refused(b"a", True, moved)
    other = ResponseError("TRYAGAIN")
    assert p.receive(other) == Refused(b"b", False, other)
    assert p.receive(other) == StrayError(other)


def test_an_error_reply_on_a_plain_link_breaks_it() -> None:
    p = PubSubProtocol(sharded=False)
    p.subscribe([b"a"])
    error = ResponseError("ERR something")
    assert p.receive(error) == Broken(error)


def test_pongs_in_both_shapes_and_unasked() -> None:
    p = PubSubProtocol(sharded=False)
    p.ping()
    assert p.receive([b"pong", b""]) == Pong(True)
    assert p.receive(b"PONG") == Pong(False)
    p.ping()
    assert p.receive(b"PONG") == Pong(True) and p.pings == 0


def test_unknown_replies_are_ignored_but_counted() -> None:
    p = PubSubProtocol(sharded=False)
    assert p.receive([b"pmessage", b"*", b"ch", b"x"]) == Ignored([b"pmessage", b"*", b"ch", b"x"])
    assert p.receive(b"OK") == Ignored(b"OK")
    assert p.received == 2


def test_resubscription_round_and_reset() -> None:
    p = PubSubProtocol(sharded=False)
    p.begin_round([b"a", b"b"])
    assert not p.round_complete
    assert not p.settle(b"a")
    assert p.settle(b"b") and p.round_complete
    assert p.settle(b"zzz")  # settling what nobody waits for is harmless
    p.begin_round([b"c"])
    p.subscribe([b"c"])
    p.ping()
    p.reset()
    assert p.round_complete and not p.pending and p.pings == 0


channels = st.sampled_from([b"a", b"b", b"c", b"d"])
operations = st.lists(st.tuples(st.booleans(), st.lists(channels, min_size=1, max_size=3)), max_size=20)


@given(operations, st.randoms(use_true_random=False))
def test_every_command_sent_is_answered_exactly_once_in_any_order(ops: list[tuple[bool, list[bytes]]],
                                                                   rnd: random.Random) -> None:
    """Whatever the order the server confirms in, each confirmation consumes one sent command."""
    p = PubSubProtocol(sharded=False)
    sent: list[tuple[bool, bytes]] = []
    for subscribe, chans in ops:
        (p.subscribe if subscribe else p.unsubscribe)(chans)
        sent.extend((subscribe, c) for c in chans)
    replies = list(sent)
    rnd.shuffle(replies)
    for subscribe, channel in replies:
        kind = b"subscribe" if subscribe else b"unsubscribe"
        event = p.receive([kind, channel, 1])
        assert event == (Subscribed(channel, True) if subscribe else Unsubscribed(channel, True))
    assert not p.pending
    assert p.received == len(sent)


@given(st.lists(st.one_of(st.tuples(st.just("sub"), channels), st.tuples(st.just("err"), st.none()),
                          st.tuples(st.just("msg"), channels)), max_size=30))
def test_sharded_error_replies_pair_with_commands_in_order(script: list[tuple[str, bytes | None]]) -> None:
    """Error replies come back in command order: the n-th error names the n-th unanswered SSUBSCRIBE."""
    p = PubSubProtocol(sharded=True)
    outstanding: list[bytes] = []
    for action, channel in script:
        if action == "sub":
            assert channel is not None
            p.subscribe([channel])
            outstanding.append(channel)
        elif action == "msg":
            assert channel is not None
            assert p.receive([b"smessage", channel, b"x"]) == Message(channel, b"x")
        else:
            error = ResponseError("TRYAGAIN")
            event = p.receive(error)
            if outstanding:
                assert event == Refused(outstanding.pop(0), True, error)
            else:
                assert event == StrayError(error)
    assert [c for _, c in p.pending] == outstanding
