"""Acknowledged means replicated: ``WAIT`` after each publish (``wait_replicas``), for the gateway and the SDKs.

Replication is asynchronous: a write the master acknowledged may be missing on the
replica a failover promotes. With ``wait_replicas=N`` each publish round is followed, in
the same write on the same connection, by ``WAIT N timeout_ms``; a publish call whose
last WAIT counted fewer than N replicas raises :class:`NotReplicated` instead of
reporting success (the events are applied on the master; publishing them again with the
same ids is safe). Standalone and Sentinel targets only: a cluster routes one call over
several connections.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

from redis.asyncio import Redis

from broadcaster.backends import scripts
from broadcaster.backends.redis.commands import RedisCommands, send_on_one_connection
from broadcaster.envelope import PublishResult
from broadcaster.errors import NotReplicated, ValidationError

ACKS: ContextVar[list[Any] | None] = ContextVar("broadcaster_wait_acks", default=None)
"""The WAIT replies of the publish call running in this task (set by :meth:`WaitingCommands.publish_many`)."""


def wait_command(target: scripts.RedisTarget | None, wait_replicas: int, timeout_ms: int) -> scripts.Command | None:
    """``WAIT n timeout`` to send after each publish round, or None (``wait_replicas`` 0).

    ValidationError for a cluster target or a negative timeout.
    """
    if wait_replicas <= 0:
        return None
    if target is not None and target.is_cluster:
        raise ValidationError("wait_replicas", "not supported on a Redis Cluster URL (use redis://, redis+sentinel://)")
    if timeout_ms < 0:
        raise ValidationError("wait_timeout_ms", "must be >= 0 (0 waits for ever)")
    return ("WAIT", wait_replicas, timeout_ms)


def check_replicated(results: list[PublishResult], acks: list[Any], wanted: int, timeout_ms: int) -> None:
    """Raise NotReplicated unless the last WAIT of the call counted ``wanted`` replicas."""
    acked = acks[-1] if acks and isinstance(acks[-1], int) else 0
    if acked < wanted:
        seqs = ", ".join(f"{r.conv_id}#{r.seq}" for r in results[:5])
        raise NotReplicated(f"published ({seqs}) but {acked} of the {wanted} replica(s) asked for confirmed within "
                            f"{timeout_ms} ms: not acknowledged; publish again with the same id(s) to be sure",
                            list(results), acked)


class WaitingCommands(RedisCommands):
    """:class:`RedisCommands` whose publishes are followed by ``WAIT`` on the same connection."""

    def __init__(self, client: Any, wait: scripts.Command, **options: Any) -> None:
        super().__init__(client, **options)
        self.wait = wait

    async def publish_many(self, prepared: Sequence[Any]) -> list[PublishResult]:
        acks: list[Any] = []
        token = ACKS.set(acks)
        try:
            results = await super().publish_many(prepared)
        finally:
            ACKS.reset(token)
        check_replicated(results, acks, int(self.wait[1]), int(self.wait[2]))
        return results

    async def _send(self, commands: Sequence[scripts.Command]) -> list[Any]:
        acks = ACKS.get()
        if acks is None or not isinstance(self.client, Redis):
            return await super()._send(commands)
        replies = await send_on_one_connection(self.client.connection_pool, [*commands, self.wait])
        acks.append(replies.pop())
        return replies
