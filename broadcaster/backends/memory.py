"""The embedded backend: one process, nothing else to run.

Same semantics as the Redis backend (seq, epoch, history window and TTL,
idempotency, keyed state, presence expiry), kept in dicts. Live delivery is
scheduled with ``loop.call_soon`` so a listener that publishes is never re-entered.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from broadcaster.backend import (
    Backend,
    BackendSettings,
    BackendStats,
    Head,
    HistoryPage,
    Listener,
    Presence,
    ReconnectCallback,
    StateSnapshot,
)
from broadcaster.backends.base import ChannelRegistry, PreparedPublish, new_epoch, prepare_publish
from broadcaster.codec import encode_envelope
from broadcaster.envelope import Envelope, PublishRequest, PublishResult


@dataclass(slots=True)
class _Conversation:
    epoch: str
    seq: int = 0
    log: deque[Envelope] = field(default_factory=deque)
    state: OrderedDict[str, Envelope] = field(default_factory=OrderedDict)  # oldest-updated first
    state_sizes: dict[str, int] = field(default_factory=dict)  # key -> encoded payload bytes
    state_bytes: int = 0
    ids: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (seq, expires at)
    expires_at: float = 0.0


class MemoryBackend(Backend):
    """In-process backend; see the module docstring."""

    def __init__(self, settings: BackendSettings | None = None) -> None:
        self.settings = settings or BackendSettings()
        self.stats = BackendStats()
        self._convs: dict[str, _Conversation] = {}
        self._presence: dict[str, dict[str, tuple[int, float]]] = {}  # conv -> "gw|profile" -> (n, expiry)
        self._registry = ChannelRegistry(self._noop, self._noop, self.stats, self.settings.unsubscribe_delay)
        self._started = False

    @staticmethod
    async def _noop(conv: str) -> None:
        return None

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False
        await self._registry.close()

    @property
    def connected(self) -> bool:
        return self._started

    async def ping(self) -> bool:
        return self._started

    def _conversation(self, conv: str, now: float) -> _Conversation:
        """The live conversation record, created (with a new epoch) when absent or expired."""
        record = self._convs.get(conv)
        if record is None or record.expires_at <= now:
            record = self._convs[conv] = _Conversation(epoch=new_epoch(), expires_at=now + self.settings.history_ttl)
        return record

    def _apply(self, prepared: PreparedPublish) -> tuple[PublishResult, Envelope | None]:
        now = time.monotonic()
        record = self._conversation(prepared.conv, now)
        known = record.ids.get(prepared.id)
        if known is not None and known[1] > now:
            return PublishResult(prepared.conv, known[0], prepared.id, record.epoch, duplicate=True), None
        record.seq += 1
        data = msgpack.unpackb(prepared.data, raw=False)
        env = Envelope(prepared.conv, record.seq, prepared.id, prepared.type, int(time.time() * 1000), data,
                       record.epoch, prepared.key)
        record.log.append(env)
        while len(record.log) > self.settings.history_size:
            record.log.popleft()
        record.ids[prepared.id] = (record.seq, now + prepared.id_ttl)
        if len(record.ids) > 4 * self.settings.history_size:
            record.ids = {k: v for k, v in record.ids.items() if v[1] > now}
        evicted = 0
        if prepared.key is not None:
            if record.state.pop(prepared.key, None) is not None:
                record.state_bytes -= record.state_sizes.pop(prepared.key)
            if data is not None:
                size = len(encode_envelope(env))  # what the Redis backend stores for it
                record.state[prepared.key] = env
                record.state_sizes[prepared.key] = size
                record.state_bytes += size
                max_bytes = self.settings.state_max_bytes
                while len(record.state) > self.settings.state_max_entries or (
                        max_bytes > 0 and record.state_bytes > max_bytes and len(record.state) > 1):
                    oldest, _ = record.state.popitem(last=False)
                    record.state_bytes -= record.state_sizes.pop(oldest)
                    evicted += 1
        self.stats.state_evictions += evicted
        record.expires_at = now + self.settings.history_ttl
        return PublishResult(prepared.conv, record.seq, prepared.id, record.epoch, evicted=evicted), env

    def _fan_out(self, env: Envelope | None) -> None:
        if env is not None:
            asyncio.get_running_loop().call_soon(self._registry.dispatch, env)

    async def publish(
        self, conv: str, type: str, data: Any = None, *, id: str | None = None, key: str | None = None
    ) -> PublishResult:
        return (await self.publish_many([PublishRequest(conv, type, data, id, key)]))[0]

    async def publish_many(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        prepared = [prepare_publish(r, self.settings.history_ttl, self.settings.max_data_bytes) for r in requests]
        results = []
        for item in prepared:
            result, env = self._apply(item)
            self._fan_out(env)
            results.append(result)
        return results

    async def subscribe(self, conv: str, listener: Listener) -> None:
        await self._registry.add(conv, listener)

    async def unsubscribe(self, conv: str, listener: Listener) -> None:
        await self._registry.remove(conv, listener)

    def add_reconnect_callback(self, callback: ReconnectCallback) -> None:
        """The embedded backend never loses its connection: callbacks are never called."""

    async def head(self, conv: str) -> Head:
        record = self._conversation(conv, time.monotonic())
        return Head(record.epoch, record.seq)

    async def history(self, conv: str, since: int = 0, limit: int | None = None) -> HistoryPage:
        record = self._conversation(conv, time.monotonic())
        first_kept = record.log[0].seq if record.log else record.seq + 1
        events = [e for e in record.log if e.seq > since]
        if limit is not None:
            events = events[:limit]
        truncated = since < record.seq and first_kept > since + 1
        return HistoryPage(record.epoch, record.seq, events, truncated)

    async def state(self, conv: str) -> StateSnapshot:
        record = self._conversation(conv, time.monotonic())
        return StateSnapshot(record.epoch, record.seq, dict(record.state))

    async def report_presence(self, gateway_id: str, counts: Mapping[str, Mapping[str, int]], ttl: float) -> None:
        expires = time.monotonic() + ttl
        for conv, by_profile in counts.items():
            entries = self._presence.setdefault(conv, {})
            for profile, n in by_profile.items():
                field_name = f"{gateway_id}|{profile}"
                if n > 0:
                    entries[field_name] = (n, expires)
                else:
                    entries.pop(field_name, None)
            if not entries:
                del self._presence[conv]

    async def presence(self, conv: str) -> Presence:
        now = time.monotonic()
        entries = self._presence.get(conv, {})
        by_profile: dict[str, int] = {}
        for field_name, (n, expires) in list(entries.items()):
            if expires <= now:
                del entries[field_name]
                continue
            profile = field_name.split("|", 1)[1]
            by_profile[profile] = by_profile.get(profile, 0) + n
        return Presence(sum(by_profile.values()), by_profile)
