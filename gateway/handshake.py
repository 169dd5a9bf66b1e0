"""Deadlines and size caps on incoming requests, the websocket handshake included.

uvicorn (0.3x-0.5x, httptools) leaves three gaps that a hostile client can use to
hold sockets and memory:

* No timer runs while a request is being received: the keep-alive timer runs only
  *between* requests and any byte cancels it. A client that connects and sends
  nothing, or trickles a request head a byte at a time ("slowloris"), holds its
  socket forever.
* httptools puts no bound on the request head: the URL and headers are
  accumulated in memory for as long as the client sends them.
* When the ``websockets`` sans-I/O parser rejects an upgrade request (a request
  line or header over 8 KiB, more than 128 headers), it prepares a 414 / 431
  answer that uvicorn never writes: the socket hangs.

:func:`http_protocol` returns uvicorn's httptools protocol with these closed:

* one timer per request, armed when the connection is made and when a request
  begins, disarmed when the request is complete (head and body) or, for an
  upgrade, when the websocket handshake is complete (accepted or refused by the
  app; from the upgrade on it is the websocket protocol's ``handshake_deadline``).
  When it fires the transport is closed. Established websockets are never
  affected; their liveness is checked by pings (``--ping-interval``);
* a request head over :data:`MAX_REQUEST_HEAD_BYTES` is answered 431 and closed;
* an upgrade that ``websockets`` rejected gets the answer it prepared, then close.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("gateway.handshake")

MAX_REQUEST_HEAD_BYTES = 64 * 1024
"""Request line plus headers; more is answered 431 (websockets caps upgrades lower: 8 KiB a line)."""

_HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
                   b"content-length: 24\r\nconnection: close\r\n\r\nrequest head too large.\n")


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadline and caps of the module docstring."""

    request_timeout: float = 10.0
    handshake_deadline: bool = True
    """Carry the deadline over to the websocket protocol after an upgrade (see :func:`http_protocol`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request_timer: asyncio.TimerHandle | None = None
        self._in_head = True
        self._head_bytes = 0  # raw bytes received since the current request head began
        self._parsed_head_bytes = 0  # URL and complete headers of the current request head
        self._head_too_large = False

    # ---- the request deadline ----------------------------------------------------------------

    def _arm(self) -> None:
        if self.request_timeout > 0 and self._request_timer is None:
            self._request_timer = self.loop.call_later(self.request_timeout, self._on_request_timeout)

    def _disarm(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _on_request_timeout(self) -> None:
        self._request_timer = None
        if self.transport is not None and not self.transport.is_closing():
            log.debug("dropped %s: no complete request within %.1fs", self.client, self.request_timeout)
            self.transport.close()

    # ---- uvicorn hooks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ---- the request head cap ----------------------------------------------------------------
    # Two counts, because httptools reports a header only once it is complete: raw bytes catch a
    # head that never ends (one endless header line), parsed bytes catch a head that ends inside
    # the chunk that makes it too large (the raw count of that chunk may include the body).

    def _refuse_head(self) -> None:
        self._head_too_large = True
        if not self.transport.is_closing():
            log.debug("dropped %s: request head over %d bytes", self.client, MAX_REQUEST_HEAD_BYTES)
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()

    def _count_parsed(self, size: int) -> None:
        self._parsed_head_bytes += size
        if self._parsed_head_bytes > MAX_REQUEST_HEAD_BYTES:
            self._head_too_large = True
            raise ValueError("request head too large")  # stops the parser; uvicorn then calls send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def data_received(self, data: bytes) -> None:
        if self._head_too_large:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_REQUEST_HEAD_BYTES:
            self._refuse_head()

    def on_url(self, url: bytes) -> None:
        self._count_parsed(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_parsed(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if not (self.parser.should_upgrade() and self._should_upgrade()):
            self._disarm()
            self._in_head, self._head_bytes, self._parsed_head_bytes = True, 0, 0  # the next head starts here
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        if not self.handshake_deadline:  # gateway.compat found the websocket protocol lacking what this needs
            self._disarm()
            return
        upgraded: Any = self.transport.get_protocol()  # uvicorn's sans-I/O protocol (probed by gateway.compat)
        conn = upgraded.conn
        if conn.handshake_exc is not None and not upgraded.handshake_initiated:
            # websockets refused the request head and queued its 414 / 431 answer; uvicorn does not send it
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(b"".join(conn.data_to_send()))
                self.transport.close()
            return
        # The deadline now covers the handshake, until the app accepts or refuses. It moves to a
        # timer that holds the websocket protocol only, so this HTTP protocol (parser, headers,
        # buffers: ~3 KB) is freed now rather than when the deadline passes; the websocket
        # protocol cancels it once accepted (``handshake_deadline``, see gateway.server).
        remaining = self._request_timer.when() - self.loop.time() if self._request_timer else self.request_timeout
        self._disarm()
        if self.request_timeout > 0:
            upgraded.handshake_deadline = self.loop.call_later(max(0.0, remaining), _close_unless_accepted, upgraded)


def _close_unless_accepted(protocol: Any) -> None:
    """The handshake deadline of an upgraded socket: close it unless the handshake is complete."""
    protocol.handshake_deadline = None
    if not protocol.handshake_complete and not protocol.transport.is_closing():
        log.debug("dropped %s: websocket handshake not complete in time", protocol.client)
        protocol.transport.close()


def http_protocol(timeout: float, *, handshake_deadline: bool = True) -> type[TimedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with a ``timeout`` seconds deadline (0: none).

    ``handshake_deadline`` False (``gateway.compat`` found the websocket protocol's fields
    missing and ``--compat`` allowed it): the deadline stops at the upgrade.
    """
    return type("TimedHttpToolsProtocol", (TimedHttpToolsProtocol,),
                {"request_timeout": float(timeout), "handshake_deadline": handshake_deadline})
