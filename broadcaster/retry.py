"""The retry policy for transient backend errors, shared by the backends and the SDK.

One policy, usable from sync and async code: exponential backoff with jitter, each
wait cut so the last attempt starts when the budget runs out, then
:class:`BackendUnavailable`. Only errors a retry can cure are retried
(connection loss, timeouts, a server loading its data or failing over); anything
else — a script error, a wrong password — propagates at once.

Retrying a publish is safe because the caller reuses the same event id: an attempt
that was applied although its reply was lost comes back as a duplicate, never as a
second event.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity
from redis import exceptions as rx

from broadcaster.errors import BackendUnavailable

log = logging.getLogger("broadcaster.retry")

T = TypeVar("T")
Predicate = Callable[[BaseException], bool]

#: Redis errors that say "try again later", not "you asked for something wrong".
REDIS_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    rx.ConnectionError,  # includes BusyLoadingError (LOADING) and MaxConnectionsError
    rx.TimeoutError,
    rx.TryAgainError,  # TRYAGAIN during a slot migration
    rx.ClusterDownError,  # CLUSTERDOWN, MASTERDOWN
    rx.ReadOnlyError,  # a replica promoted/demoted under us during a failover
    rx.SlotNotCoveredError,  # topology being refreshed after a failover
    OSError,
    TimeoutError,  # asyncio.wait_for / socket timeouts
)

#: Redis errors that are never transient although they subclass ConnectionError.
_REDIS_FATAL: tuple[type[BaseException], ...] = (rx.AuthenticationError, rx.AuthorizationError)


def is_transient_redis_error(exc: BaseException) -> bool:
    """True when retrying the same Redis call later may succeed."""
    if isinstance(exc, _REDIS_FATAL):
        return False
    if isinstance(exc, REDIS_TRANSIENT_ERRORS):
        return True
    # "BUSY Redis is busy running a script" has no exception class of its own.
    return isinstance(exc, rx.ResponseError) and str(exc).startswith("BUSY")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry transient failures for at most ``budget`` seconds, then raise BackendUnavailable.

    Waits grow exponentially from ``initial_wait`` up to ``max_wait`` with random
    jitter (so many clients cut off together do not come back in lockstep).
    ``budget=0`` means a single attempt, no retry.
    """

    budget: float = 10.0
    initial_wait: float = 0.05
    max_wait: float = 1.0
    is_transient: Predicate = is_transient_redis_error

    def _wait(self, budget: float) -> Callable[[tenacity.RetryCallState], float]:
        def wait(state: tenacity.RetryCallState) -> float:
            backoff = _backoff(state.attempt_number, self.initial_wait, self.max_wait)
            left = budget - (state.seconds_since_start or 0.0)
            return max(0.0, min(backoff, left))

        return wait

    def _options(self, began: float) -> dict[str, Any]:
        budget = max(0.0, self.budget - (time.monotonic() - began))
        return {
            "stop": tenacity.stop_after_delay(budget),
            "wait": self._wait(budget),
            "retry": tenacity.retry_if_exception(self.is_transient),
            "before_sleep": _log_retry,
        }

    # The first attempt runs outside tenacity (the common case costs one try/except);
    # after a transient failure, tenacity retries for what is left of the budget.

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` under the policy (blocking sleeps)."""
        began = time.monotonic()
        try:
            return fn()
        except Exception as exc:
            if not self.is_transient(exc):
                raise
            if self.budget <= 0:
                raise BackendUnavailable(f"backend unreachable (no retry budget): {exc!r}") from exc
        try:
            for attempt in tenacity.Retrying(**self._options(began)):
                with attempt:
                    return fn()
        except tenacity.RetryError as exc:
            raise self._unavailable(exc) from exc.last_attempt.exception()
        raise AssertionError("unreachable")  # pragma: no cover

    async def acall(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` under the policy (asyncio sleeps)."""
        began = time.monotonic()
        try:
            return await fn()
        except Exception as exc:
            if not self.is_transient(exc):
                raise
            if self.budget <= 0:
                raise BackendUnavailable(f"backend unreachable (no retry budget): {exc!r}") from exc
        try:
            async for attempt in tenacity.AsyncRetrying(**self._options(began)):
                with attempt:
                    return await fn()
        except tenacity.RetryError as exc:
            raise self._unavailable(exc) from exc.last_attempt.exception()
        raise AssertionError("unreachable")  # pragma: no cover

    def _unavailable(self, exc: tenacity.RetryError) -> BackendUnavailable:
        last = exc.last_attempt.exception()
        return BackendUnavailable(
            f"backend unreachable for {self.budget:g}s ({exc.last_attempt.attempt_number + 1} attempts): {last!r}"
        )


def reconnect_retrying(max_wait: float = 2.0) -> tenacity.AsyncRetrying:
    """Backoff for a connection that must come back: retries any error, forever, waits capped at ``max_wait``."""
    return tenacity.AsyncRetrying(
        stop=tenacity.stop_never,
        wait=lambda state: _backoff(state.attempt_number, 0.05, max_wait),
        retry=tenacity.retry_if_exception_type(Exception),
        before_sleep=_log_retry,
    )


def _backoff(attempt: int, initial: float, cap: float) -> float:
    """Exponential backoff with additive jitter: ``initial * 2**(attempt-1) + U(0, initial)``, at most ``cap``."""
    return min(cap, initial * 2.0 ** min(attempt - 1, 32) + random.uniform(0, initial))


def _log_retry(state: tenacity.RetryCallState) -> None:
    """One line per retry; a client-side pool that was full (``MaxConnectionsError``) only at debug.

    A full pool says this process asked for more connections at once than it keeps,
    not that the server is failing: logged per attempt it turned one burst of reads into
    thousands of lines. The callers bound their concurrency (the blocking pool,
    :class:`broadcaster.backends.redis.RedisCommands`, the hub's batched repairs), so
    it should not happen at all; when it does, the final BackendUnavailable still says so.
    """
    exc = state.outcome.exception() if state.outcome is not None else None
    level = logging.DEBUG if isinstance(exc, rx.MaxConnectionsError) else logging.INFO
    log.log(level, "attempt %d failed (%r); retrying in %.2fs", state.attempt_number, exc,
            state.upcoming_sleep)
