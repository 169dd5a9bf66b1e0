"""History reads from many tasks coalesced into a few batched backend calls.

After a pub/sub reconnect every feed of a gateway repairs from history at once.
One backend call per feed would open as many connections as the pool allows and
queue (or fail) the rest; here the reads wait in one queue, and at most
``concurrency`` calls of :meth:`Backend.history_many` run at a time, each taking
up to ``batch_size`` queued reads (one round trip on Redis).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from broadcaster.backend import Backend, HistoryPage, HistoryRead
from broadcaster.errors import BackendUnavailable

log = logging.getLogger("broadcaster.hub")

DEFAULT_BATCH_SIZE = 50
DEFAULT_CONCURRENCY = 4

_Queued = tuple[HistoryRead, "asyncio.Future[HistoryPage]"]


class BatchedHistory:
    """``await reads.history(conv, since, limit)``: the backend's answer, read in a batch with others.

    A failed batch fails every read in it with the same exception (logged once
    here). A caller cancelled while waiting is skipped; :meth:`close` cancels the
    batches in flight and fails what is still queued with ``CancelledError``.
    """

    def __init__(self, backend: Backend, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self._backend = backend
        self._batch_size = max(1, batch_size)
        self._concurrency = max(1, concurrency)
        self._queue: deque[_Queued] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self.batches = 0
        """Backend calls made so far."""

    async def history(self, conv: str, since: int, limit: int | None) -> HistoryPage:
        future: asyncio.Future[HistoryPage] = asyncio.get_running_loop().create_future()
        self._queue.append((HistoryRead(conv, since, limit), future))
        if len(self._workers) < self._concurrency:
            worker = asyncio.create_task(self._work(), name="broadcaster-history-batch")
            self._workers.add(worker)
        return await future

    def _take(self) -> list[_Queued]:
        batch: list[_Queued] = []
        while self._queue and len(batch) < self._batch_size:
            item = self._queue.popleft()
            if not item[1].done():  # its caller gave up (cancelled)
                batch.append(item)
        return batch

    async def _work(self) -> None:
        try:
            await self._drain()
        finally:  # at once, not in a done callback: a read queued from now on must start a worker
            task = asyncio.current_task()
            if task is not None:
                self._workers.discard(task)

    async def _drain(self) -> None:
        while batch := self._take():
            self.batches += 1
            try:
                pages = await self._backend.history_many([read for read, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except BackendUnavailable as exc:
                log.warning("history read of %d conversation(s) failed: %s", len(batch), exc)
                self._fail(batch, exc)
                continue
            except Exception as exc:
                log.exception("history read of %d conversation(s) failed", len(batch))
                self._fail(batch, exc)
                continue
            for (_, future), page in zip(batch, pages, strict=True):
                if not future.done():
                    future.set_result(page)

    @staticmethod
    def _fail(batch: list[_Queued], exc: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        """Cancel the batches in flight; reads still queued end with ``CancelledError``."""
        workers = list(self._workers)
        for worker in workers:
            worker.cancel()
        if workers:
            await asyncio.wait(workers)
        while self._queue:
            self._queue.popleft()[1].cancel()
