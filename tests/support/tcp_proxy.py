"""A loopback TCP proxy for fault tests: pause a link silently, cut it, or refuse it.

``TcpProxy(target_port)`` listens on a free ``127.0.0.1`` port and forwards each
connection to the target. It runs its own asyncio loop on a daemon thread, so the
same object serves async tests, blocking code and subprocesses (give them its URL).

* ``pause()`` - stop forwarding, sockets stay open: both ends see a silent link (no
  FIN, no RST), like a frozen peer or a black-holed network. ``pause(upstream=False)``
  holds only the replies: requests reach the server, answers never come back (a
  timed-out request that was nevertheless applied). ``resume()`` forwards again, held
  bytes first. ``pause(..., drop=True)`` discards the bytes instead of holding them:
  they are lost for good (the connection is useless afterwards; clients reconnect).
* ``cut()`` - close every open connection (both sides see it drop); new ones work.
* ``block()`` - cut, and close every new connection as soon as it is accepted, until
  ``unblock()``: the target looks unreachable while it keeps running.

Every call returns once the proxy's loop applied it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

HOST = "127.0.0.1"
T = TypeVar("T")


class TcpProxy:
    """See the module docstring. Use as a context manager or call ``start()`` / ``stop()``."""

    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        """Connections accepted so far (refused ones included)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tcp-proxy-{target_port}", daemon=True)
        self._server: asyncio.Server | None = None
        self._up: asyncio.Event | None = None  # client -> target may flow
        self._down: asyncio.Event | None = None  # target -> client may flow
        self._dropping: set[str] = set()  # directions ("up", "down") whose bytes are discarded
        self._blocked = False
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """``redis://`` URL through the proxy (the target being a Redis server)."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def open_connections(self) -> int:
        return self._run(lambda: len(self._writers) // 2)

    def start(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    async def _listen(self) -> None:
        self._up, self._down = asyncio.Event(), asyncio.Event()
        self._up.set()
        self._down.set()
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._blocked:
            client_w.close()
            return
        try:
            target_r, target_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        assert self._up is not None and self._down is not None
        self._writers.update((client_w, target_w))
        try:
            await asyncio.gather(self._pump(client_r, target_w, self._up, "up"),
                                 self._pump(target_r, client_w, self._down, "down"), return_exceptions=True)
        finally:
            for w in (client_w, target_w):
                self._writers.discard(w)
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event,
                    direction: str) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if direction in self._dropping:
                    continue
                await flowing.wait()
                if writer.is_closing():
                    break
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def _run(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=10)

    def pause(self, *, upstream: bool = True, downstream: bool = True, drop: bool = False) -> None:
        """Hold (or with ``drop``, discard) the bytes of the given directions; connections stay open."""
        assert self._up is not None and self._down is not None
        up, down = self._up, self._down

        def apply() -> None:
            if upstream:
                self._dropping.add("up") if drop else up.clear()
            if downstream:
                self._dropping.add("down") if drop else down.clear()

        self._run(apply)

    def resume(self) -> None:
        """Forward both directions again, held bytes first."""
        assert self._up is not None and self._down is not None
        up, down = self._up, self._down

        def apply() -> None:
            self._dropping.clear()
            up.set()
            down.set()

        self._run(apply)

    def cut(self) -> None:
        """Close every proxied connection, both sides."""
        def close_all() -> None:
            for w in list(self._writers):
                w.close()

        self._run(close_all)

    def block(self) -> None:
        """Cut every connection and refuse new ones (accept, then close) until :meth:`unblock`."""
        def apply() -> None:
            self._blocked = True
            for w in list(self._writers):
                w.close()

        self._run(apply)

    def unblock(self) -> None:
        def apply() -> None:
            self._blocked = False

        self._run(apply)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
