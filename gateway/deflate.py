"""permessage-deflate without per-socket zlib state, and frames compressed once for many sockets.

``--ws-compression shared`` (the default) negotiates permessage-deflate (RFC 7692) with
``server_no_context_takeover`` and ``client_no_context_takeover``, added to the response
when the client did not offer them (§7.1.1.1 / §7.1.1.2 let the server). websockets then
builds its compressor and decompressor per message and drops them after it, so an idle
socket keeps no zlib state (~36 KiB with context takeover, ``--ws-compression deflate``).

Without context takeover a message compressed with a fresh compressor is the same bytes
on every socket whose server window (``server_max_window_bits``) and compressor settings
are the same: the pool (gateway.connection) compresses a payload once per *frame kind*
(:func:`frame_kind`) and writes the frame (:func:`deflate_frame`) to each such socket.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import PerMessageDeflate, ServerPerMessageDeflateFactory

WINDOW_BITS = 12
"""Largest server window offered, as uvicorn's own factory (and websockets' default) does."""
COMPRESS_SETTINGS: dict[str, Any] = {"memLevel": 5}
"""zlib settings of every compressor (uvicorn's): the shared frames are built with these."""
PLAIN = 0
"""Frame kind of a socket without extensions (:func:`gateway.connection.text_frame`)."""

_EMPTY_BLOCK = b"\x00\x00\xff\xff"


def shared_factories() -> list[ServerExtensionFactory]:
    """The extension factories of ``shared`` mode: one permessage-deflate without context takeover either
    way. Stateless (negotiation only reads it), so one list serves every socket."""
    return _FACTORIES


_FACTORIES: list[ServerExtensionFactory] = [ServerPerMessageDeflateFactory(
    server_no_context_takeover=True, client_no_context_takeover=True, server_max_window_bits=WINDOW_BITS,
    client_max_window_bits=WINDOW_BITS, compress_settings=COMPRESS_SETTINGS)]


def frame_kind(extensions: Sequence[object]) -> int | None:
    """What frames a socket with these negotiated ``extensions`` can share: :data:`PLAIN` (none), the server
    window bits of a permessage-deflate without server context takeover and with our compressor settings,
    or None (context takeover, anything else: the socket frames its own messages)."""
    if not extensions:
        return PLAIN
    if len(extensions) != 1:
        return None
    (ext,) = extensions
    if (type(ext) is not PerMessageDeflate or not ext.local_no_context_takeover
            or ext.compress_settings != COMPRESS_SETTINGS or not 9 <= ext.local_max_window_bits <= 15):
        return None
    return int(ext.local_max_window_bits)


def compress(payload: bytes, bits: int) -> bytes:
    """``payload`` compressed as one permessage-deflate message by a fresh compressor with a window of
    ``bits``: the deflate data, its trailing 00 00 ff ff removed (RFC 7692 §7.2.1)."""
    compressor = zlib.compressobj(wbits=-bits, **COMPRESS_SETTINGS)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    if not data.endswith(_EMPTY_BLOCK):  # what a sync flush always ends with
        raise ValueError("zlib's sync flush did not end with an empty stored block")
    return data[:-4]


_HEADS = [bytes((0xC1, size)) for size in range(126)]


def deflate_frame(payload: bytes, bits: int) -> bytes | None:
    """``payload`` as one final, unmasked, compressed text frame (RSV1 set) for a socket of frame kind
    ``bits``; None when compressing does not make it smaller (then the plain text frame goes: RSV1
    clear means not compressed, RFC 7692 §6)."""
    data = compress(payload, bits)
    size = len(data)
    if size >= len(payload):
        return None
    if size < 126:
        return _HEADS[size] + data
    if size < 65536:
        return b"\xc1\x7e" + size.to_bytes(2, "big") + data
    return b"\xc1\x7f" + size.to_bytes(8, "big") + data
