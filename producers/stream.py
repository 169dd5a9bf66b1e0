"""``Producer.stream`` / ``AsyncProducer.stream``: stream one growing message into a keyed entry.

```python
with producer.stream("conv-1", "answer-7", "llm.message") as s:
    for token in llm_tokens():
        s.append(token)                      # {"text": token}; or s.append({"text": t, "n": 3})
# on exit: what is still buffered goes out, then one final upsert of the whole message
```

Appends made within ``window`` seconds (default 0.02) of the first one still buffered
are coalesced into one ``op="append"`` publish (string fields concatenated, others
replaced): at 50 tokens/s that is about one publish per token, at 500 tokens/s one per
ten. The entry ends with a full upsert of everything appended (plus ``final`` fields),
so the state holds one ordinary event and clients can tell the message is complete.
docs/streaming.md measures the trade-off.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from producers.entities import merge_append

if TYPE_CHECKING:
    from producers.producer import AsyncProducer, Producer

DEFAULT_WINDOW = 0.02
"""Seconds appends are coalesced over (see the module docstring)."""


def _chunk(value: str | dict[str, Any], field: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {field: value}
    if isinstance(value, dict) and value:
        return value
    raise TypeError("append a str or a non-empty dict")


def _conflicts(buffered: dict[str, Any], chunk: dict[str, Any]) -> bool:
    """True when merging ``chunk`` into the buffer would not equal applying the two one after another
    (a string arriving where the buffer holds a non-string): the buffer must go out first."""
    return any(isinstance(v, str) and k in buffered and not isinstance(buffered[k], str) for k, v in chunk.items())


class _Base:
    def __init__(self, conv: str, key: str, type: str, window: float, field: str,
                 final: dict[str, Any] | None) -> None:
        if window < 0:
            raise ValueError("window must be 0 or more seconds")
        self.conv, self.key, self.type, self.window, self.field = conv, key, type, window, field
        self.final = dict(final or {})
        """Fields added to the whole message in the final upsert (e.g. ``{"done": True}``)."""
        self.message: dict[str, Any] = {}
        """Everything appended so far, merged: the data of the final upsert."""
        self.publishes = 0
        """Append publishes sent so far (coalescing makes them fewer than ``append`` calls)."""
        self._buffer: dict[str, Any] = {}
        self._first = 0.0  # monotonic time the oldest buffered chunk came

    def _take(self) -> dict[str, Any] | None:
        buffered, self._buffer = self._buffer, {}
        return buffered or None

    def _add(self, chunk: dict[str, Any]) -> bool:
        """Buffer ``chunk``; True if the buffer must go out now (before it: see :func:`_conflicts`)."""
        self.message = merge_append(self.message, chunk)
        if not self._buffer:
            self._first = time.monotonic()
        self._buffer = merge_append(self._buffer, chunk)
        return time.monotonic() - self._first >= self.window


class Stream(_Base):
    """A blocking stream (``Producer.stream``); a timer thread sends what waited ``window`` seconds."""

    def __init__(self, producer: Producer, conv: str, key: str, type: str, window: float = DEFAULT_WINDOW,
                 field: str = "text", final: dict[str, Any] | None = None) -> None:
        super().__init__(conv, key, type, window, field, final)
        self._producer = producer
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._error: BaseException | None = None

    def append(self, value: str | dict[str, Any]) -> None:
        """Append ``value`` (a str goes to ``field``); sent within ``window`` seconds."""
        chunk = _chunk(value, self.field)
        with self._lock:
            self._raise_error()
            if _conflicts(self._buffer, chunk):
                self._flush_locked()
            due = self._add(chunk)
            if due:
                self._flush_locked()
            elif self._timer is None:
                self._timer = threading.Timer(self.window, self._on_timer)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Send what is buffered now."""
        with self._lock:
            self._flush_locked()
            self._raise_error()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            try:
                self._flush_locked()
            except BaseException as exc:  # raised on the next append or at the end
                self._error = exc

    def _flush_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        chunk = self._take()
        if chunk is not None:
            self._producer.publish(self.conv, self.type, chunk, key=self.key, op="append")
            self.publishes += 1

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Send what is buffered, then the final upsert of the whole message."""
        self.flush()
        self._producer.publish(self.conv, self.type, {**self.message, **self.final}, key=self.key)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:  # the message is cut short: send what came, no final upsert (the state shows it unfinished)
            with self._lock:
                self._flush_locked()


class AsyncStream(_Base):
    """An asyncio stream (``AsyncProducer.stream``); a task sends what waited ``window`` seconds."""

    def __init__(self, producer: AsyncProducer, conv: str, key: str, type: str, window: float = DEFAULT_WINDOW,
                 field: str = "text", final: dict[str, Any] | None = None) -> None:
        super().__init__(conv, key, type, window, field, final)
        self._producer = producer
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    async def append(self, value: str | dict[str, Any]) -> None:
        chunk = _chunk(value, self.field)
        async with self._lock:
            self._raise_error()
            if _conflicts(self._buffer, chunk):
                await self._flush_locked()
            if self._add(chunk):
                await self._flush_locked()
            elif self._timer is None:
                self._timer = asyncio.create_task(self._on_timer())

    async def flush(self) -> None:
        async with self._lock:
            await self._flush_locked()
            self._raise_error()

    async def _on_timer(self) -> None:
        await asyncio.sleep(self.window)
        async with self._lock:
            if self._timer is asyncio.current_task():
                self._timer = None
            try:
                await self._flush_locked()
            except Exception as exc:
                self._error = exc

    async def _flush_locked(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        chunk = self._take()
        if chunk is not None:
            await self._producer.publish(self.conv, self.type, chunk, key=self.key, op="append")
            self.publishes += 1

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    async def close(self) -> None:
        await self.flush()
        await self._producer.publish(self.conv, self.type, {**self.message, **self.final}, key=self.key)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc_type is None:
            await self.close()
        else:
            async with self._lock:
                await self._flush_locked()
