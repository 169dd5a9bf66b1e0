"""Wait for a condition instead of sleeping: poll until it holds, fail loudly at a deadline.

Anything another task, thread or process updates (presence, metrics, counters, logs,
state read over HTTP) is eventually consistent: a test reads it through
:func:`wait_until` (blocking code) or :func:`async_wait_until` (asyncio), never once.

``probe`` is called until its value is accepted: by ``until(value)`` when given, else by
the value's truthiness. The accepted value is returned. At the deadline an
``AssertionError`` names ``message`` and shows the last value observed (or the last
exception ``probe`` raised, when that exception is listed in ``ignore``). Timeouts only
cost time when a test is failing, so they are generous; the poll interval is short.

:class:`RetryLog` makes retries observable: a test that must show "still retrying, not
failed" waits until a call has been retried a few times instead of sleeping a while.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

_NOTHING = object()


def _failure(message: str, timeout: float, last: object, error: BaseException | None) -> AssertionError:
    seen = "no value observed" if last is _NOTHING else f"last observed: {last!r}"
    if error is not None:
        seen += f"; the last probe raised {error!r}"
    return AssertionError(f"timed out after {timeout:g}s waiting for {message}; {seen}")


def wait_until(probe: Callable[[], T], timeout: float = 15.0, message: str = "the condition", *,
               until: Callable[[T], object] | None = None, interval: float = 0.02,
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``probe()`` until its value is accepted (see the module docstring); blocking."""
    deadline = time.monotonic() + timeout
    last: object = _NOTHING
    while True:
        error: BaseException | None = None
        try:
            value = probe()
        except ignore as exc:
            error = exc
        else:
            if until(value) if until is not None else value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise _failure(message, timeout, last, error)
        time.sleep(interval)  # the poll interval, not a wait for something to happen


@overload
async def async_wait_until(probe: Callable[[], Awaitable[T]], timeout: float = ..., message: str = ..., *,
                           until: Callable[[T], object] | None = ..., interval: float = ...,
                           ignore: tuple[type[BaseException], ...] = ()) -> T: ...


@overload
async def async_wait_until(probe: Callable[[], T], timeout: float = ..., message: str = ..., *,
                           until: Callable[[T], object] | None = ..., interval: float = ...,
                           ignore: tuple[type[BaseException], ...] = ()) -> T: ...


async def async_wait_until(probe: Callable[[], Any], timeout: float = 15.0,
                           message: str = "the condition", *, until: Callable[[Any], object] | None = None,
                           interval: float = 0.02, ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """Call (and await, when it returns an awaitable) ``probe()`` until its value is accepted; asyncio.

    An awaited probe is itself cut at the deadline, so a hung request fails the wait too.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = _NOTHING
    while True:
        error: BaseException | None = None
        try:
            result = probe()
            if inspect.isawaitable(result):
                async with asyncio.timeout_at(deadline):
                    result = await result
        except TimeoutError as exc:
            if loop.time() >= deadline:
                raise _failure(message, timeout, last, exc) from exc
            if not isinstance(exc, ignore):
                raise
            error = exc
        except ignore as exc:
            error = exc
        else:
            if until(result) if until is not None else result:
                return result
            last = result
        if loop.time() >= deadline:
            raise _failure(message, timeout, last, error)
        await asyncio.sleep(interval)  # the poll interval, not a wait for something to happen


class RetryLog(logging.Handler):
    """Counts the retries ``broadcaster.retry`` logs (one record per failed attempt about to be
    retried), by the thread and the asyncio task that made them. Use as a context manager."""

    LOGGER = "broadcaster.retry"

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._lock_records = threading.Lock()
        self.records: list[tuple[int | None, asyncio.Task[Any] | None]] = []
        self._saved_level = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        try:
            task: asyncio.Task[Any] | None = asyncio.current_task()
        except RuntimeError:  # no running loop in this thread
            task = None
        with self._lock_records:
            self.records.append((record.thread, task))

    def total(self) -> int:
        with self._lock_records:
            return len(self.records)

    def by_thread(self, thread: threading.Thread) -> int:
        with self._lock_records:
            return sum(ident == thread.ident for ident, _ in self.records)

    def by_task(self, task: asyncio.Task[Any]) -> int:
        with self._lock_records:
            return sum(t is task for _, t in self.records)

    def __enter__(self) -> RetryLog:
        logger = logging.getLogger(self.LOGGER)
        self._saved_level = logger.level
        if not logger.isEnabledFor(logging.DEBUG):  # every retry counts, whatever level it is logged at
            logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._saved_level)
